"""The benchmarks' short versions write the rows their contracts promise."""

import json
import sys

import numpy as np
import pytest
from conftest import REPO

from ambient_med.io.store import read_slices


def test_reconstruction_benchmark_short_run_writes_the_contract(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import reconstruction
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    argv = ["--short", "--workdir", str(tmp_path / "work"), "--results", str(tmp_path / "out")]
    argv += ["--seeds", "0", "1", "--modes", "ambient", "naive", "--slices-per-volume", "2"]
    argv += ["--accelerations", "4", "--samplers", "dc", "--inference-masks", "fresh"]
    argv += ["--steps", "4", "--curve-steps", "2", "--threads", "1"]
    argv += ["--settings", "kspace", "pixel", "native"]
    path = reconstruction.main(argv)
    rows = json.loads(path.read_text())["rows"]
    keys = {"method", "train_mode", "corruption", "sampler", "R", "p", "coils", "seeds"}
    keys |= {"volumes", "psnr", "psnr_ci95", "ssim", "ssim_fg", "nrmse", "seconds_per_slice"}
    assert all(set(row) == keys for row in rows)
    by = {(r["method"], r["train_mode"], r["corruption"], r["sampler"]): r for r in rows}
    assert by[("zero_filled", "", "kspace", "")]["seeds"] == 1
    ambient = by[("diffusion", "ambient", "kspace", "dc")]
    assert ambient["seeds"] == 2 and ambient["volumes"] == 2 and ambient["coils"] == 1
    low, high = ambient["psnr_ci95"]
    assert low <= ambient["psnr"] <= high
    assert ("diffusion", "ambient", "kspace", "dc:fresh") in by
    # The paired difference is the difference of the two means.
    diff = by[("difference", "ambient-naive", "kspace", "dc")]
    naive = by[("diffusion", "naive", "kspace", "dc")]
    assert np.isclose(diff["psnr"], ambient["psnr"] - naive["psnr"], atol=2e-3)
    # Pixel masking: inpainting rows at the config's p, with their own baselines.
    pixel = by[("diffusion", "ambient", "pixel", "dc")]
    assert pixel["R"] is None and 0 < pixel["p"] < 1
    assert ("interpolated", "", "pixel", "") in by
    assert ("difference", "ambient-naive", "pixel", "dc") in by
    # Natively multi-coil: an ambient model only, tested through the scan's coils beside CS.
    native = by[("diffusion", "ambient", "native", "dc")]
    assert native["coils"] == 4 and by[("cs_l1", "", "native", "")]["coils"] == 4
    assert ("diffusion", "naive", "native", "dc") not in by
    # Resumable: a second run trains nothing new and reproduces the same rows.
    again = json.loads(reconstruction.main(argv).read_text())["rows"]
    assert again == rows
    curve = json.loads((tmp_path / "out" / "reconstruction_curve.json").read_text())["rows"]
    steps = {(r["train_mode"], r["sampler"], r["step"]) for r in curve}
    assert steps >= {("ambient", "dc", 2), ("ambient", "one_step", 4), ("naive", "dc", 4)}
    assert all("held_back_ratio" in r for r in curve if r["train_mode"] == "ambient")
    assert (tmp_path / "out" / "reconstruction_curve.png").read_bytes()[:4] == b"\x89PNG"


def _benchmark(name: str):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(REPO / "benchmarks"))


def test_memorization_benchmark_short_run_writes_the_contract(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    memorization = _benchmark("memorization")
    argv = ["--short", "--workdir", str(tmp_path / "work"), "--results", str(tmp_path / "out")]
    argv += ["--sizes", "4", "0", "--steps", "4", "--curve-every", "2", "--samples", "8"]
    argv += ["--seeds", "0", "1", "--all-seeds-up-to", "4", "--canaries", "1", "2"]
    argv += ["--threads", "1"]
    rows = json.loads(memorization.main(argv).read_text())["rows"]
    models = [r for r in rows if r["kind"] == "model"]
    keys = {"kind", "train_mode", "corruption", "b_redraw", "n_train", "steps", "seed"}
    keys |= {"n_samples", "threshold", "frac_above", "q50", "q95", "q99", "psnr_r4"}
    assert all(set(r) == keys for r in models)
    # Both seeds at the smallest size, the first seed at "all"; every variant each time.
    sizes = sorted({r["n_train"] for r in models})
    assert sizes[0] == 4 and len(sizes) == 2
    assert {(r["n_train"], r["seed"]) for r in models} == {(4, 0), (4, 1), (sizes[1], 0)}
    curve = {
        (r["n_train"], r["train_mode"], r["seed"], r["step"]) for r in rows if r["kind"] == "curve"
    }
    assert (4, "ambient", 1, 2) in curve and (4, "ambient", 1, 4) in curve
    controls = [r for r in rows if r["kind"] == "control"]
    assert {r["control"] for r in controls} >= {"exact", "shift1", "shift2", "noise", "blur"}
    assert {r["n_train"] for r in controls} == set(sizes)
    exact = [r for r in controls if r["control"] == "exact"]
    assert all(r["flagged_fraction"] == 1.0 for r in exact)  # a training copy is always caught
    canaries = [r for r in rows if r["kind"] == "canary"]
    assert {"exposure", "reference_exposure", "repeats", "repeats_in_training"} <= set(canaries[0])
    # With every training slice, every planted canary is in the training set as planted.
    assert all(
        r["repeats_in_training"] == r["repeats"] for r in canaries if r["n_train"] == sizes[1]
    )
    # Resumable: a second run trains nothing new and reproduces the same rows.
    assert json.loads(memorization.main(argv).read_text())["rows"] == rows
    assert (tmp_path / "out" / "memorization_curve.png").stat().st_size > 0


def test_training_benchmark_short_run_writes_the_contract(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    training = _benchmark("training")
    argv = ["--short", "--workdir", str(tmp_path / "work"), "--results", str(tmp_path / "out")]
    argv += ["--steps", "1", "--repeats", "1", "--ddp-steps", "2", "--threads", "1"]
    rows = json.loads(training.main(argv).read_text())["rows"]
    ratios = {r["mode"]: r for r in rows if r["what"] == "step_ratio"}
    assert set(ratios) == {"ambient/kspace", "ambient/pixel", "naive/kspace", "clean/kspace"}
    for row in ratios.values():
        expected = row["seconds_per_step"] / row["monai_seconds_per_step"]
        assert row["ratio"] == pytest.approx(expected, rel=0.01)
    ddp = {r["world_size"]: r for r in rows if r["what"] == "ddp"}
    assert set(ddp) == {1, 2} and ddp[1]["efficiency"] == 1.0
    assert ddp[2]["efficiency"] == pytest.approx(
        ddp[1]["seconds_per_step"] / (2 * ddp[2]["seconds_per_step"]), rel=0.01
    )


def test_robust_prior_benchmark_short_run_writes_the_contract(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    robust_prior = _benchmark("robust_prior")
    argv = ["--short", "--workdir", str(tmp_path / "work"), "--results", str(tmp_path / "out")]
    # One coil: the SENSE path of new scans is tested in test_raw_kspace.py; with
    # 4 coils the phase constraint's CG-SENSE projections made this test 5.6 minutes long.
    argv += ["--steps", "4", "--subjects", "4", "--threads", "1", "--coils", "1"]
    rows = json.loads(robust_prior.main(argv).read_text())["rows"]
    scans = {"t1_anatomical", "epi_b0", "t2_spin_echo", *robust_prior.NEW_HEADS}
    scans |= {"demo_t1w_crop", "t1_anatomical_padded"}  # the field-of-view controls
    scans |= {"cohort_holdout"}  # each model on its own cohort's hold-out
    assert {(r["model"], r["scan"]) for r in rows} == {
        (model, scan) for model in robust_prior.MODELS for scan in scans
    }
    for row in rows:
        assert set(row["psnr"]) == set(robust_prior.METHODS)
        assert np.isfinite(list(row["psnr"].values())).all()
        if row["scan"] != "cohort_holdout":
            assert {"domain_shift_score", "out_of_distribution", "prior_gain"} <= set(row)
    # A model file scored alone (--model), on some of the scans (--scans), gets the very
    # numbers it got beside the others on all of them: each scan keeps its seed.
    trained = tmp_path / "work" / "t1w_axial"
    argv += ["--model", str(trained / "model.pt"), "--model-slices", str(trained / "slices.h5")]
    argv += ["--scans", "t2_spin_echo", "demo_t1w_crop", "--name", "given"]
    given = json.loads(robust_prior.main(argv).read_text())["rows"]
    assert {r["model"] for r in given} == {"given"}
    before = {r["scan"]: r for r in rows if r["model"] == "t1w_axial"}
    assert {r["scan"] for r in given} == {"t2_spin_echo", "demo_t1w_crop", "cohort_holdout"}
    for row in given:
        assert row["psnr"] == before[row["scan"]]["psnr"]
        assert row.get("domain_shift_score") == before[row["scan"]].get("domain_shift_score")


def test_robust_prior_crop_prior_sees_the_t1_band(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    robust_prior = _benchmark("robust_prior")
    argv = ["--short", "--workdir", str(tmp_path / "work"), "--results", str(tmp_path / "out")]
    argv += ["--steps", "2", "--subjects", "3", "--threads", "1", "--image-size", "64"]
    argv += ["--crop-prior", "--scans", "t1_anatomical", "--coils", "1"]
    argv += ["--center-fraction", "0.08", "--mask-type", "random"]
    rows = json.loads(robust_prior.main(argv).read_text())["rows"]
    assert {(r["model"], r["scan"]) for r in rows} == {
        ("t1_crop", "t1_anatomical"),
        ("t1_crop", "cohort_holdout"),
    }
    store = read_slices(tmp_path / "work" / "t1_crop" / "slices.h5")
    assert store.index.split == ["train", "holdout", "holdout"]
    # The crops reach the grid as the 33 x 41 T1 does, k-space zero-padded: what the prior
    # learns has (almost) nothing beyond the T1's band. Measured: 4e-6 of the energy (the
    # magnitude's spread); the default cohort's whole heads, resampled in image space, 8e-3.
    spectrum = np.abs(np.fft.fftshift(np.fft.fft2(store.images), axes=(-2, -1))) ** 2
    band = np.zeros((64, 64), bool)
    band[16:49, 12:53] = True
    assert spectrum[:, ~band].sum() < 1e-4 * spectrum.sum()
    with pytest.raises(SystemExit):
        robust_prior.main(argv + ["--model", "m.pt", "--model-slices", "s.h5"])
    # The same prior under rotated phases: a global phase leaves zero-filled unchanged.
    phase_rotation = _benchmark("phase_rotation")
    argv = ["--workdir", str(tmp_path / "work"), "--results", str(tmp_path / "out")]
    argv += ["--rotations", "0", "180", "--every", "8"]
    rotated = json.loads(phase_rotation.main(argv + ["--threads", "1"]).read_text())["rows"]
    assert {(r["subject"], r["phase"], r["rotation_deg"]) for r in rotated} == {
        (s, p, d) for s in (1, 2) for p in ("cohort", "file", "none") for d in (0.0, 180.0)
    }
    for row in rotated:
        turned = [
            r for r in rotated if r["subject"] == row["subject"] and r["phase"] == row["phase"]
        ]
        assert row["zero_filled"] == turned[0]["zero_filled"]
        assert np.isfinite(row["diffusion_dc"])


def test_robust_prior_t1_prior_holds_only_slices_the_scan_does_not(tmp_path, monkeypatch):
    """--t1-prior: a cohort of the real T1's own planes between the scanned ones, each its
    own pseudo-subject, the last two held out; none of them is a plane of the scan."""
    monkeypatch.chdir(REPO)
    robust_prior = _benchmark("robust_prior")
    argv = ["--short", "--workdir", str(tmp_path / "work"), "--results", str(tmp_path / "out")]
    argv += ["--steps", "2", "--threads", "1", "--image-size", "64", "--t1-prior"]
    argv += ["--scans", "t1_anatomical", "--coils", "1", "--center-fraction", "0.08"]
    argv += ["--mask-type", "random"]
    rows = json.loads(robust_prior.main(argv).read_text())["rows"]
    assert {(r["model"], r["scan"]) for r in rows} == {
        ("t1_own", "t1_anatomical"),
        ("t1_own", "cohort_holdout"),
    }
    store = read_slices(tmp_path / "work" / "t1_own" / "slices.h5")
    count = len(store.index.split)
    assert store.index.split == ["train"] * (count - 2) + ["holdout"] * 2
    assert len(set(store.index.subjects)) == count
    planes = robust_prior.real_slices()["t1_anatomical"]
    scanned = robust_prior.grid_magnitudes(planes, 64)
    scanned /= scanned.max(axis=(1, 2), keepdims=True)
    own = store.images / store.images.max(axis=(1, 2), keepdims=True)
    gaps = np.abs(own[:, None] - scanned[None]).mean(axis=(2, 3))
    assert gaps.min() > 1e-3  # no scanned plane among the prior's
    with pytest.raises(SystemExit):
        robust_prior.main(argv + ["--crop-prior"])


def test_ablation_benchmark_short_run_writes_the_contract(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    ablation = _benchmark("ablation")
    work = tmp_path / "work"
    argv = ["--short", "--workdir", str(work), "--results", str(tmp_path / "out")]
    argv += ["--steps", "4", "--every", "2", "--sampling-steps", "2"]
    argv += ["--variant", "sigma_data", "model.unmeasured_scale=null"]
    argv += ["--variant", "auto", 'model.unmeasured_scale="auto"', "train.b_redraw=true"]
    rows = json.loads(ablation.main(argv).read_text())["rows"]
    baseline = [r for r in rows if r["kind"] == "baseline"]
    assert len(baseline) == 1 and baseline[0]["cs_l1"] > 0
    variants = [r for r in rows if r["kind"] == "variant"]
    assert {(r["variant"], r["step"]) for r in variants} == {
        (v, s) for v in ("sigma_data", "auto") for s in (2, 4)
    }
    assert variants[-1]["overrides"] == {"model.unmeasured_scale": "auto", "train.b_redraw": True}
    for row in variants:
        assert 0 < row["held_back_holdout"] < 10 and np.isfinite(row["dc"])
    # Resumed: nothing is recomputed, the same rows come back.
    again = json.loads(ablation.main(argv).read_text())["rows"]
    assert again == rows
    with pytest.raises(Exception, match="section.key=value"):
        ablation.main([*argv[:5], "--variant", "bad", "unmeasured_scale"])


def test_gpu_benchmark_trains_models_side_by_side_and_scores_their_snapshots(tmp_path, monkeypatch):
    # On the CPU, tiny: two models train at once to a fixed step count (not a time budget),
    # then are scored at their last common snapshot, the curve at an earlier one.
    import tarfile

    import torch

    from ambient_med.diffusion.model import build_denoiser
    from ambient_med.io.store import read_slices

    monkeypatch.chdir(REPO)
    gpu = _benchmark("gpu")
    out = tmp_path / "out"
    argv = ["run", "--overlay", "config/tiny.yaml", "--workdir", str(tmp_path / "work")]
    argv += ["--results", str(out), "--seeds", "0", "--kspace-modes", "ambient", "naive"]
    argv += ["--native-seeds", "--max-steps", "6", "--snapshot-every", "3"]
    argv += ["--train-seconds", "600", "--total-seconds", "1200", "--no-baselines"]
    argv += ["--inference-masks", "--accelerations", "4", "--sampling-steps", "2"]
    argv += ["--posterior-samples", "1"]
    gpu.run(gpu.parse(argv))
    rows = json.loads((out / "reconstruction.json").read_text())["rows"]
    by = {(r["method"], r["train_mode"], r["sampler"], r["R"]): r for r in rows}
    for mode in ("ambient", "naive"):
        for sampler in ("dc", "dps", "one_step"):
            assert by[("diffusion", mode, sampler, 4.0)]["seeds"] == 1
    assert ("difference", "ambient-naive", "dc", 4.0) in by
    curve = json.loads((out / "reconstruction_curve.json").read_text())["rows"]
    assert {(r["train_mode"], r["step"]) for r in curve} >= {("ambient", 3), ("naive", 6)}
    with tarfile.open(out / "models_kspace.tar") as tar:
        assert json.loads(tar.extractfile("ambient_seed0/train.json").read())["steps"] == 6
        tar.extract("ambient_seed0/model.fp16.pt", tmp_path / "models")
    state = torch.load(tmp_path / "models" / "ambient_seed0" / "model.fp16.pt", weights_only=True)
    assert state["steps"] == 6
    assert all(
        v.dtype == torch.float16 for v in state["state_dict"].values() if v.is_floating_point()
    )
    net = build_denoiser(state["model"], state["image_channels"], state["scheduler"])
    net.load_state_dict({k: v.float() for k, v in state["state_dict"].items()})

    # The archived models scored side by side on the cohort's hold-out, with a paired
    # difference (rescore.py): each pair row is the difference of the two models' means over
    # the same volumes; a rerun finds every score already there.
    rescore = _benchmark("rescore")
    with tarfile.open(out / "models_kspace.tar") as tar:
        tar.extract("naive_seed0/model.fp16.pt", tmp_path / "models")
    models = {m: tmp_path / "models" / f"{m}_seed0" / "model.fp16.pt" for m in ("ambient", "naive")}
    argv = ["--overlay", "config/tiny.yaml", "--slices", str(tmp_path / "work" / "slices.h5")]
    argv += [arg for m, path in models.items() for arg in ("--model", f"{m}={path}")]
    argv += ["--pair", "ambient-naive", "--accelerations", "4", "--sampling-steps", "2"]
    argv += ["--posterior-samples", "1", "--workdir", str(tmp_path / "rescore")]
    argv += ["--results", str(out), "--threads", "1"]
    rows = json.loads(rescore.main(argv).read_text())["rows"]
    means = {(r["model"], r["sampler"]): r["psnr"] for r in rows if "model" in r}
    assert set(means) == {("zero_filled", ""), ("cs_l1", ""), ("pocs", "")} | {
        (m, s) for m in models for s in ("one_step", "dc", "dps")
    }
    pairs = {r["sampler"]: r for r in rows if "pair" in r}
    assert len(pairs) == 4 and any(s.startswith("best (") for s in pairs)
    for sampler in ("one_step", "dc", "dps"):
        gap = means[("ambient", sampler)] - means[("naive", sampler)]
        assert pairs[sampler]["difference"] == pytest.approx(gap, abs=2e-3)
        low, high = pairs[sampler]["ci"]
        assert low <= pairs[sampler]["difference"] <= high
    scores = (tmp_path / "rescore" / "scores.jsonl").read_text()
    assert json.loads(rescore.main(argv).read_text())["rows"] == rows
    assert (tmp_path / "rescore" / "scores.jsonl").read_text() == scores
    # --training-subjects: evenly spaced slices of training subjects, never a hold-out one.
    store = read_slices(tmp_path / "work" / "slices.h5")
    picked = rescore.training_rows(store, 2, 3)
    subjects = store.index.subject[picked]
    assert set(picked) <= set(store.index.rows("train")) and len(np.unique(subjects)) == 2
    assert all((subjects == s).sum() == 3 for s in np.unique(subjects))


def test_the_phase_ablation_swaps_only_the_cohorts_phase():
    """phase_model.py: every slice its own seeded map (``slice``), scaled by one u in [0, 1]
    per slice (``varied``); magnitudes kept; a file's slices keep the workflow's phase."""
    phase_model = _benchmark("phase_model")
    from ambient_med.physics.acquisition import complex_slices

    images = np.random.default_rng(0).uniform(0.5, 1.0, (4, 8, 8)).astype(np.float32)
    subjects, positions = ["a", "a", "a", "b"], np.array([3, 4, 5, 3])
    per_slice = phase_model.per_slice_phase(varied=False)(images, subjects, positions, 7)
    varied = phase_model.per_slice_phase(varied=True)(images, subjects, positions, 7)
    for phased in (per_slice, varied):
        np.testing.assert_allclose(np.abs(phased), images, rtol=1e-5)
    again = phase_model.per_slice_phase(varied=True)(images, subjects, positions, 7)
    assert np.array_equal(varied, again)
    # Each slice's varied phase is its per-slice phase times one factor u in [0, 1].
    for n in range(4):
        base, scaled = np.angle(per_slice[n] / images[n]), np.angle(varied[n] / images[n])
        centre = (slice(3, 5), slice(3, 5))  # small phases: no wrapping
        u = np.median(scaled[centre] / base[centre])
        assert 0.0 <= u <= 1.0
    workflow = complex_slices(images, subjects, positions, 7)
    assert not np.allclose(per_slice, workflow)
    files = ["file-3"] * 4
    np.testing.assert_array_equal(
        phase_model.per_slice_phase(True)(images, files, positions, 7),
        complex_slices(images, files, positions, 7),
    )
