"""New scans through `reconstruct.input`: real MR data from the dependencies' own test files,
the residual on the measurements, and a warning when a scan is unlike the training cohort."""

from __future__ import annotations

import json
import logging
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import REPO, tiny_config

from ambient_med.config import load_config, stage_config
from ambient_med.physics.masks import acs_lines
from ambient_med.physics.recon import l1_wavelet
from ambient_med.stages import corrupt, ingest, reconstruct, train
from ambient_med.stages.common import magnitude

sys.path.insert(0, str(REPO / "benchmarks"))
try:
    # The new scans of the robust-prior benchmark: real MR slices shipped with nibabel and
    # pydicom, demo heads no cohort holds, and how a scanner file is made of them.
    import robust_prior
finally:
    sys.path.remove(str(REPO / "benchmarks"))

TRAIN_STEPS = 300
SAMPLERS = ["dc", "dps", "one_step"]


def _config(demo_contrast: str = "t1w") -> dict:
    cfg = tiny_config()
    cfg["train"] |= {"steps": TRAIN_STEPS, "checkpoint_every": TRAIN_STEPS, "batch_size": 8}
    cfg["reconstruct"] |= {"samplers": SAMPLERS, "accelerations": [4], "steps": 10}
    cfg["demo"]["contrast"] = demo_contrast
    return cfg


@pytest.fixture(scope="module")
def t1_model(demo_dir, tmp_path_factory):
    """A k-space ambient model of the tiny T1-weighted demo cohort (seconds of training)."""
    out = tmp_path_factory.mktemp("t1_model")
    cfg = _config()
    ingest.run(stage_config(cfg, "demo", "ingest"), demo_dir, out / "s.h5", out / "m.csv")
    corrupt.run(stage_config(cfg, "demo", "corrupt"), "kspace", out / "s.h5", out / "k.h5")
    stage = stage_config(cfg, "demo", "train")
    train.run(stage, out / "k.h5", out / "model.pt", out / "loss.csv", out / "ck")
    return out


def _reconstruct(model_dir, folder, tmp_path, cfg) -> dict:
    cfg["reconstruct"]["input"] = str(folder)
    files = tmp_path / "files"
    reconstruct.run(
        stage_config(cfg, "demo", "reconstruct"),
        model_dir / "model.pt",
        model_dir / "s.h5",
        files,
        tmp_path / "metrics.json",
    )
    return json.loads((tmp_path / "metrics.json").read_text())


def test_new_scans_report_the_prior_gain_and_end_on_their_data(t1_model, tmp_path, caplog):
    folder = tmp_path / "new"
    folder.mkdir()
    robust_prior.write_scan(folder, "a_t1", robust_prior.demo_head("t1w", "axial", 32), seed=1)
    robust_prior.write_scan(folder, "b_t2", robust_prior.demo_head("t2w", "axial", 32), seed=2)
    with caplog.at_level(logging.WARNING):
        metrics = _reconstruct(t1_model, folder, tmp_path, _config())
    scans = metrics["new_scans"]  # files in name order, named new000, new001
    assert [s["scan"] for s in scans] == ["new000", "new001"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for scan in scans:
        errors = np.array(scan["held_back_error"])
        assert len(errors) == scan["slices"] and (errors > 0).all()
        assert len(scan["denoising_error"]) == scan["slices"]
        assert scan["prior_gain"] == pytest.approx(1 - np.median(errors), abs=1e-3)
        assert {"domain_shift_score", "domain_shift_threshold", "out_of_distribution"} <= set(scan)
        assert scan["phase_calibration"] in ("off", *reconstruct.PHASE_CALIBRATIONS)
        flagged = scan["out_of_distribution"] or scan["prior_gain"] <= 0
        assert flagged == any(m.startswith(f"{scan['scan']}: ") for m in warnings)
        # Every diffusion reconstruction of every slice ends on its measurements: no further
        # from them than A^H y itself (the floor with estimated coil maps).
        floor = np.array(scan["residual"]["zero_filled"])
        assert set(scan["residual"]) == {"zero_filled", "pocs"} | {
            f"diffusion_{s}" for s in SAMPLERS
        }
        for method, residuals in scan["residual"].items():
            assert len(residuals) == scan["slices"]
            assert (np.array(residuals) <= floor + 1e-3).all(), method
    # The T1-weighted model knows a T1-weighted head of a new subject, and not a T2-weighted
    # one: the warning fires on the other contrast only.
    t1, t2 = scans
    print({s["scan"]: (s["domain_shift_score"], s["domain_shift_threshold"]) for s in scans})
    assert not t1["out_of_distribution"] and t2["out_of_distribution"]
    assert t2["domain_shift_score"] > t1["domain_shift_score"]
    assert any(m.startswith("new001: unlike the training cohort") for m in warnings)


def test_a_new_scan_gets_the_cs_lambda_its_cohort_validates_for_its_acquisition(t1_model, tmp_path):
    """A new scan has no reference to choose CS's λ on: it gets the one the cohort's
    training slices choose when acquired with its coils and R — for a scan acquired as the
    workflow acquires its hold-out (1 coil, R = 4), the workflow's own ``cs_l1_R4_lambda``;
    and its CS output is that λ's reconstruction."""
    folder = tmp_path / "new"
    folder.mkdir()
    cfg = _config()
    rc = cfg["reconstruct"]
    robust_prior.write_scan(
        folder,
        "a_t1",
        robust_prior.demo_head("t1w", "axial", 32),
        seed=1,
        coils=1,
        center_fraction=rc["center_fraction"],
        mask_type=rc["mask_type"],
    )
    metrics = _reconstruct(t1_model, folder, tmp_path, cfg)
    (scan,) = metrics["new_scans"]
    assert scan["cs_lambda"] == metrics["cs_l1_R4_lambda"]
    assert scan["cs_lambda"] in rc["cs_lambdas"]
    op, y, kspace, maps, lines = reconstruct.new_scan_measurements(
        folder / "a_t1.h5", 32, stage_config(cfg, "demo", "reconstruct")["ingest"]
    )
    expected = np.abs(l1_wavelet(kspace[0], maps[0], lines[0], scan["cs_lambda"]))
    written = nib.load(tmp_path / "files" / "new000_cs_l1.nii.gz").get_fdata()[..., 0]
    np.testing.assert_allclose(written, expected, atol=1e-5)


def test_shift_verdict_flags_a_scan_beyond_the_cohort():
    rng = np.random.default_rng(0)
    # The cohort: the prior predicts 40 % of held-back energy and leaves 20 % of the noise.
    reference = {
        "held_back": 0.6 + 0.05 * rng.standard_normal(200),
        "denoising": 0.2 + 0.02 * rng.standard_normal(200),
    }

    def scan(held_back: float, denoising: float) -> dict[str, np.ndarray]:
        return {
            "held_back": held_back + 0.05 * rng.standard_normal(12),
            "denoising": denoising + 0.02 * rng.standard_normal(12),
        }

    inside = reconstruct.shift_verdict(scan(0.6, 0.2), reference)
    unlike = reconstruct.shift_verdict(scan(0.6, 0.4), reference)  # denoised worse
    unhelped = reconstruct.shift_verdict(scan(0.95, 0.2), reference)  # predicted worse
    assert not inside["out_of_distribution"]
    assert unlike["out_of_distribution"] and unhelped["out_of_distribution"]
    assert inside["prior_gain"] == pytest.approx(0.4, abs=0.05)
    assert unlike["domain_shift_score"] == pytest.approx(0.4 / 0.2, rel=0.1)
    assert unhelped["held_back_shift_score"] == pytest.approx(0.95 / 0.6, rel=0.1)
    alone = {"held_back": np.full(3, 1.1), "denoising": np.full(3, 0.5)}
    assert reconstruct.shift_verdict(alone, None) == {"prior_gain": -0.1}


def test_guard_folds_split_the_outer_lines_and_leave_the_centre():
    line_mask = torch.zeros(3, 32, dtype=torch.bool)
    line_mask[:, 13:19] = True  # six calibration lines
    line_mask[0, [2, 6, 25, 29]] = True  # four lines outside the centre
    line_mask[1, [4]] = True  # one: nothing to cross-check with
    folds = reconstruct.guard_folds(line_mask, torch.Generator().manual_seed(0))
    assert folds.shape == (reconstruct.GUARD_FOLDS, 3, 32)
    outer = line_mask.clone()
    outer[:, 13:19] = False
    # Each outer line in exactly one fold, no calibration line in any.
    assert torch.equal(folds.sum(0), outer.long())
    assert [int(f[0].sum()) for f in folds] == [2, 2]
    assert sorted(int(f[1].sum()) for f in folds) == [0, 1]
    assert not folds[:, 2].any()
    again = reconstruct.guard_folds(line_mask, torch.Generator().manual_seed(0))
    assert torch.equal(folds, again)


def test_the_guard_cross_checks_only_slices_with_two_lines_in_every_fold():
    line_mask = torch.zeros(5, 41, dtype=torch.bool)
    line_mask[:, 16:24] = True  # eight calibration lines, as R = 4 with a 20 % centre gives
    line_mask[0, [3, 35]] = True  # the T1 crop's two outer lines: one per fold
    line_mask[1, [3, 9, 35]] = True  # three: one fold of one line
    line_mask[2, [3, 9, 30, 35]] = True  # four: two per fold
    line_mask[3, [1, 3, 5, 9, 30, 33, 35, 38]] = True  # eight; row 4: none
    folds = reconstruct.guard_folds(line_mask, torch.Generator().manual_seed(3))
    checkable = reconstruct.cross_checkable(folds)
    assert checkable.tolist() == [False, False, True, True, False]


def test_a_slice_too_thin_to_cross_check_gets_its_scans_pooled_fit():
    agreement = torch.tensor([2.0, 1.0, -3.0])
    energy = torch.tensor([4.0, 1.0, 5.0])
    target = torch.tensor([10.0, 10.0, 10.0])
    checkable = torch.tensor([True, False, False])
    pooled = float(agreement.sum() / energy.sum())  # 0.0: the third slice cancels the rest
    fit = reconstruct.fold_fit(agreement, energy, target, checkable, pooled=True)
    torch.testing.assert_close(fit, torch.tensor([0.5, pooled, pooled]))
    fit = reconstruct.fold_fit(agreement, energy, target, checkable, pooled=False)
    torch.testing.assert_close(fit, torch.tensor([0.5, 0.0, 0.0]))
    agreement[2] = 3.0  # pooled: 6 / 10, lowering the error by 36 / (10 * 30) = 12 %
    fit = reconstruct.fold_fit(agreement, energy, target, checkable, pooled=True)
    torch.testing.assert_close(fit[1:], torch.full((2,), 0.6))


def test_a_fit_that_lowers_the_held_back_error_by_less_than_the_margin_counts_as_none():
    """Slice 0 lowers its fold's error by ⟨a, t⟩² / (‖a‖² ‖t‖²) = 4 / 40 = 10 %, slice 1 by
    0.25 / 40 < 1 %: chance, trusted at 0 though its least-squares scale is 0.125."""
    assert reconstruct.HELD_BACK_MARGIN == pytest.approx(0.05)
    agreement = torch.tensor([2.0, 0.5])
    energy = torch.tensor([4.0, 4.0])
    target = torch.tensor([10.0, 10.0])
    checkable = torch.tensor([True, True])
    fit = reconstruct.fold_fit(agreement, energy, target, checkable, pooled=False)
    torch.testing.assert_close(fit, torch.tensor([0.5, 0.0]))
    # Pooled over both: 2.5² / (8 * 20) = 3.9 %, below the margin as well.
    fit = reconstruct.fold_fit(agreement, energy, target, ~checkable, pooled=True)
    torch.testing.assert_close(fit, torch.zeros(2))


def test_real_scans_from_the_dependencies_go_through_reconstruct_input(t1_model, tmp_path):
    folder = tmp_path / "real"
    folder.mkdir()
    truths = {}
    for number, (name, slices) in enumerate(sorted(robust_prior.real_slices().items())):
        field = robust_prior.head_field(name, slices.shape[1:], "head")
        full = robust_prior.write_scan(
            folder, f"{number}_{name}", slices, seed=10 + number, field=field
        )
        # The reference the model's grid can show: the fully sampled k-space fitted the way
        # the file's is, root-sum-of-squares over coils.
        truths[name] = robust_prior.reference_magnitudes(full, 32)
    cfg = _config()
    metrics = _reconstruct(t1_model, folder, tmp_path, cfg)
    assert metrics["new_files"] == 3
    files = tmp_path / "files"
    table = {}
    for number, name in enumerate(sorted(truths)):
        scan = f"new{number:03d}"
        zero_filled = np.moveaxis(nib.load(files / f"{scan}_zero_filled.nii.gz").get_fdata(), -1, 0)
        # Outputs are on the model's intensity scale: the reference is brought to it.
        row = {}
        for method in ["zero_filled", "cs_l1"] + [f"diffusion_{s}" for s in SAMPLERS]:
            image = np.moveaxis(nib.load(files / f"{scan}_{method}.nii.gz").get_fdata(), -1, 0)
            row[method] = robust_prior.psnr_on_model_scale(truths[name], zero_filled, image)
        table[name] = row
    print(json.dumps(table, indent=1))
    # A model of 300 steps on 4 synthetic subjects cannot help on these scans; what must hold
    # is that the guard keeps every sampler at zero-filled instead of below it (without it,
    # DC fell 8 dB below on the T1 slice; with one held-back draw instead of two
    # cross-checked folds, one-step fell 0.76 dB below). Measured: every sampler equals
    # zero-filled.
    for name, row in table.items():
        for sampler in SAMPLERS:
            assert row[f"diffusion_{sampler}"] >= row["zero_filled"] - 0.05, (name, sampler, row)
    assert np.isfinite([v for row in table.values() for v in row.values()]).all()
    report = {s["scan"]: s for s in metrics["new_scans"]}
    for scan in report.values():
        trust = scan["guard_trust"]
        assert set(trust) == {f"diffusion_{s}" for s in SAMPLERS}
        assert all(0.0 <= g <= 1.0 for values in trust.values() for g in values)


def _t1_crop_acquired(folder, scan_field: str, mask_seed: int):
    """nibabel's T1 crop as robust_prior.py acquires it at 1 coil (random, 8 % centre, R = 4,
    its phase over ``scan_field``), read back as ``reconstruct.input`` reads a raw file
    (:func:`reconstruct.new_scan_measurements`): the operator, measurements and fully sampled
    reference on the 64 grid."""
    slices = robust_prior.real_slices()["t1_anatomical"]
    full = robust_prior.write_scan(
        folder,
        "t1",
        slices,
        seed=16,
        coils=1,
        center_fraction=0.08,
        mask_type="random",
        field=robust_prior.head_field("t1_anatomical", slices.shape[1:], scan_field),
        mask_seed=mask_seed,
    )
    ingest_cfg = load_config(REPO / "config" / "config.yaml")["ingest"]
    op, y, *_ = reconstruct.new_scan_measurements(folder / "t1.h5", 64, ingest_cfg)
    return op, y, robust_prior.reference_magnitudes(full, 64)


def _gain_over_zero_filled(op, y, truth, image) -> float:
    zero_filled = magnitude(op.A_adjoint(y))
    return robust_prior.psnr_on_model_scale(
        truth, zero_filled, magnitude(image)
    ) - robust_prior.psnr_on_model_scale(truth, zero_filled, zero_filled)


def _outer_ratio(errors, name: str) -> np.ndarray:
    """Per outer fold, a calibration's held-back error over zero-filling's (slices pooled)."""
    outer = slice(0, reconstruct.GUARD_FOLDS)
    return errors[name][0][outer].sum(1) / errors["off"][0][outer].sum(1)


def test_a_phase_is_weighed_on_its_edge_lines_where_no_outer_line_has_its_mirror(tmp_path):
    """The real T1 crop under its part of a head's phase, on a line mask (the benchmark's
    third draw) that acquired no outer line's mirror: the outer folds score the calibration
    within 1 % of zero-filling — no evidence either way — while its pocs gains ~2 dB; the
    edge lines see it, and auto imposes the Hann-tapered calibration."""
    op, y, truth = _t1_crop_acquired(tmp_path, "head", mask_seed=2016)
    line_mask = op.line_mask.bool()[0]
    outer = line_mask & ~acs_lines(line_mask)
    mirrored = torch.roll(torch.flip(outer, [-1]), 1, -1)  # column j -> 64 - j: frequency -k
    assert not bool((outer & mirrored).any()) and bool(outer.any())
    rc = {"phase_constraint": "auto", "phase_window": 0.04}
    errors = reconstruct.calibration_errors(op, y, rc, seed=1234)
    assert np.all(np.abs(_outer_ratio(errors, "acs_hann") - 1.0) < 0.02)
    calibration = reconstruct.phase_calibration(rc, op, y, seed=1234)
    assert set(calibration.choice) == {"acs_hann"}
    assert _gain_over_zero_filled(op, y, truth, calibration.pocs(op, y)) > 1.0


def test_a_phase_that_predicts_the_outer_lines_but_not_its_edges_is_refused(tmp_path):
    """The same crop given a whole head's phase over its 66 mm (the old simulation), under the
    workflow's seed: the Hann-tapered calibration predicts the outer lines better than
    zero-filling in every fold, yet both its edge lines worse, and its pocs loses over 3 dB;
    auto refuses it, and what it does impose ends no worse than zero-filled."""
    op, y, truth = _t1_crop_acquired(tmp_path, "fov", mask_seed=16)
    rc = {"phase_constraint": "auto", "phase_window": 0.04}
    errors = reconstruct.calibration_errors(op, y, rc, seed=1234)
    assert np.all(_outer_ratio(errors, "acs_hann") < 1.0)
    edge = slice(reconstruct.GUARD_FOLDS, None)
    edge_ratio = errors["acs_hann"][0][edge].sum(1) / errors["off"][0][edge].sum(1)
    assert np.all(edge_ratio > 1.0 + reconstruct.HELD_BACK_MARGIN)
    hann = reconstruct.fixed_calibration(op, y, rc, "acs_hann").pocs(op, y)
    assert _gain_over_zero_filled(op, y, truth, hann) < -3.0
    calibration = reconstruct.phase_calibration(rc, op, y, seed=1234)
    assert "acs_hann" not in calibration.choice
    assert _gain_over_zero_filled(op, y, truth, calibration.pocs(op, y)) > -0.05
