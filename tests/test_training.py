"""Corrupt → train → sample/evaluate through the stage functions, on the tiny config."""

import csv
import hashlib

import h5py
import numpy as np
import pytest
import torch
from conftest import tiny_config

from ambient_med.config import stage_config
from ambient_med.io.store import read_measurements, read_slices, save_torch
from ambient_med.physics.acquisition import complex_slices
from ambient_med.physics.operators import fft2c
from ambient_med.stages import corrupt, evaluate, ingest, sample, train


@pytest.fixture(scope="module")
def slices(demo_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ingest")
    cfg = stage_config(tiny_config(), "demo", "ingest")
    ingest.run(cfg, demo_dir, out / "slices.h5", out / "manifest.csv")
    return out / "slices.h5"


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("kind", ["kspace", "pixel"])
def test_corrupt_holds_measurements_only_and_is_bit_identical(slices, tmp_path, kind):
    cfg = stage_config(tiny_config(), "demo", "corrupt")
    corrupt.run(cfg, kind, slices, tmp_path / "a.h5")
    corrupt.run(cfg, kind, slices, tmp_path / "b.h5")
    assert _sha(tmp_path / "a.h5") == _sha(tmp_path / "b.h5")

    with h5py.File(tmp_path / "a.h5") as h5:
        assert "images" not in h5
        assert set(h5) == {"measurements", "mask", "subject", "slice_index", "subjects"} | {
            "split",
            "affines",
        }
    meas = read_measurements(tmp_path / "a.h5")
    clean = read_slices(slices).images
    if kind == "pixel":
        mask = meas.mask.astype(bool)
        assert not meas.measurements[:, 0][~mask].any()  # unobserved pixels are zero
        np.testing.assert_array_equal(meas.measurements[:, 0][mask], clean[mask])
        assert mask.mean() == pytest.approx(1 - cfg["corrupt"]["pixel"]["p"], abs=0.02)
    else:
        lines = meas.mask.astype(bool)
        assert meas.measurements.shape[1] == 2 and lines.shape == clean.shape[::2]
        assert not meas.measurements[:, :, :, ~lines[0]][0].any()
        # The acquisition starts from the magnitude times the subject's smooth phase.
        store = read_slices(slices)
        subjects = [store.index.subjects[v] for v in store.index.subject]
        phased = complex_slices(clean, subjects, store.index.slice_index, cfg["cohort"]["seed"])
        np.testing.assert_allclose(np.abs(phased), clean, rtol=1e-5, atol=1e-6)
        assert np.abs(np.angle(phased[clean > 0.1])).max() > 0.5  # a real phase, not ~0
        full = fft2c(torch.from_numpy(np.stack([phased.real, phased.imag], 1))).numpy()
        expected = full * lines[:, None, None, :]
        np.testing.assert_allclose(meas.measurements, expected, atol=1e-5)
        assert clean.shape[-1] / lines.sum(-1).mean() == pytest.approx(4, rel=0.25)


def _train(cfg, input_path, out, stop_after=None):
    train.run(
        stage_config(cfg, "demo", "train"),
        input_path,
        out / "model.pt",
        out / "loss.csv",
        out / "checkpoints",
        stop_after=stop_after,
    )


@pytest.fixture(scope="module")
def kspace_store(slices, tmp_path_factory):
    out = tmp_path_factory.mktemp("corrupt") / "kspace.h5"
    corrupt.run(stage_config(tiny_config(), "demo", "corrupt"), "kspace", slices, out)
    return out


def test_interrupted_training_resumes_to_the_same_model(kspace_store, tmp_path):
    cfg = tiny_config()
    _train(cfg, kspace_store, tmp_path / "straight")
    # Interrupted after 4 steps (checkpoint at 3), then the same command again.
    _train(cfg, kspace_store, tmp_path / "resumed", stop_after=4)
    assert not (tmp_path / "resumed" / "model.pt").exists()
    _train(cfg, kspace_store, tmp_path / "resumed")

    a = torch.load(tmp_path / "straight" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "model.pt", weights_only=True)
    assert a["steps"] == b["steps"] == cfg["train"]["steps"]
    for key in a["state_dict"]:
        torch.testing.assert_close(a["state_dict"][key], b["state_dict"][key], rtol=0, atol=0)
    rows = list(csv.DictReader((tmp_path / "resumed" / "loss.csv").open()))
    assert [int(r["step"]) for r in rows] == list(range(1, cfg["train"]["steps"] + 1))
    assert (tmp_path / "straight" / "loss.csv").read_bytes() == (
        tmp_path / "resumed" / "loss.csv"
    ).read_bytes()
    assert a["provenance"]["versions"]["monai"]
    assert a["provenance"]["inputs"]["kspace.h5"] == _sha(kspace_store)


def test_checkpoint_of_another_config_is_not_resumed(kspace_store, tmp_path, caplog):
    _train(tiny_config(), kspace_store, tmp_path, stop_after=3)
    other = tiny_config()
    other["train"]["lr"] = 1e-3
    import logging

    with caplog.at_level(logging.INFO):
        _train(other, kspace_store, tmp_path)
    assert "starting over" in caplog.text


@pytest.mark.parametrize(
    ("mode", "kind"), [("ambient", "pixel"), ("naive", "kspace"), ("clean", "kspace")]
)
def test_every_mode_trains_samples_and_evaluates(slices, tmp_path, mode, kind):
    cfg = tiny_config(train_mode=mode, corruption=kind)
    if mode == "clean":
        source = slices
    else:
        source = tmp_path / f"{kind}.h5"
        corrupt.run(stage_config(cfg, "demo", "corrupt"), kind, slices, source)
    _train(cfg, source, tmp_path)
    model = torch.load(tmp_path / "model.pt", weights_only=True)
    assert model["mode"] == mode and model["kind"] == kind

    sample.run(
        stage_config(cfg, "demo", "sample"),
        tmp_path / "model.pt",
        tmp_path / "s.nii.gz",
        tmp_path / "grid.png",
    )
    import nibabel as nib
    from PIL import Image

    volume = nib.load(tmp_path / "s.nii.gz")
    assert volume.shape == (32, 32, cfg["sample"]["num_samples"])
    assert np.isfinite(volume.get_fdata()).all()
    assert Image.open(tmp_path / "grid.png").size[0] > 64

    evaluate.run(
        stage_config(cfg, "demo", "evaluate"),
        tmp_path / "model.pt",
        slices,
        tmp_path / "metrics.json",
    )
    import json

    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["mode"] == mode
    for t in cfg["evaluate"]["timesteps"]:
        assert metrics[f"x0_mse_t{t}"] > 0


def test_saved_models_are_byte_identical(tmp_path):
    state = {"w": torch.arange(6.0).reshape(2, 3), "steps": 3}
    save_torch(tmp_path / "a.pt", state)
    save_torch(tmp_path / "b.pt", state)
    assert _sha(tmp_path / "a.pt") == _sha(tmp_path / "b.pt")
    assert torch.load(tmp_path / "a.pt", weights_only=True)["steps"] == 3


def test_training_writes_tensorboard_loss_and_sample_grids(kspace_store, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _train(tiny_config(), kspace_store, tmp_path)
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0})
    events.Reload()
    losses = events.Scalars("train/loss")
    logged = np.loadtxt(tmp_path / "loss.csv", delimiter=",", skiprows=1)
    assert [e.step for e in losses] == logged[:, 0].astype(int).tolist()
    np.testing.assert_allclose([e.value for e in losses], logged[:, 1], rtol=1e-4)
    grids = events.Images("samples")
    assert [g.step for g in grids] == [3, 6]  # every checkpoint of the tiny config


def test_unmeasured_scale_auto_is_the_rms_of_the_entries_b_may_hide():
    from ambient_med.diffusion.training import TrainingSet, unmeasured_scale

    # k-space: 2 examples of (2, 4, 8); lines 3, 4 (centre, calibration) and 0, 6 acquired.
    lines = torch.zeros(2, 8, dtype=torch.bool)
    lines[:, [0, 3, 4, 6]] = True
    y = torch.zeros(2, 2, 4, 8)
    y[:, :, :, [3, 4]] = 10.0  # calibration lines: never hidden, do not count
    y[0, 0, :, 0], y[0, 1, :, 6] = 3.0, 4.0
    y[1, 1, :, 0] = 1.0
    data = TrainingSet(targets=y, kind="kspace", mode="ambient", masks=lines)
    # Real entries on lines 0 and 6: 2 examples x 2 lines x 4 rows x 2 parts = 32 entries.
    expected = ((4 * 9 + 4 * 16 + 4 * 1) / 32) ** 0.5
    assert unmeasured_scale(data, 0.5) == pytest.approx(expected)
    # Pixel masks: the observed pixels.
    keep = torch.zeros(1, 4, 4, dtype=torch.bool)
    keep[0, 0, :2] = True
    image = torch.zeros(1, 1, 4, 4)
    image[0, 0, 0, :2] = torch.tensor([3.0, 4.0])
    pixel = TrainingSet(targets=image, kind="pixel", mode="ambient", masks=keep)
    assert unmeasured_scale(pixel, 0.5) == pytest.approx((25 / 2) ** 0.5)
    # Naive and clean models hide nothing: σ_d.
    naive = TrainingSet(targets=image, kind="pixel", mode="naive")
    assert unmeasured_scale(naive, 0.5) == 0.5


@pytest.mark.parametrize("case", ["kspace", "native", "pixel", "kspace_naive"])
def test_mirrored_examples_are_measurements_of_mirrored_images(case):
    """train.mirror_rows: a mirrored example's targets are exactly what its (mirrored)
    operator measures of the mirrored clean image — for line masks, coil maps and pixel masks
    — and B still hides only acquired entries."""
    from ambient_med.diffusion.training import TrainingSet, mirrored_where
    from ambient_med.physics.coils import birdcage
    from ambient_med.physics.masks import LineMaskFunc
    from ambient_med.physics.operators import MultiCoilSense, PixelMask, SingleCoilFourier

    n, height, width = 6, 16, 12
    generator = torch.Generator().manual_seed(0)
    kind = case.removesuffix("_naive")
    x = torch.randn(n, 1 if kind == "pixel" else 2, height, width, generator=generator)
    maps = None
    if kind == "pixel":
        masks = torch.rand(n, height, width, generator=generator) > 0.3
        op = PixelMask(masks[:, None])
    else:
        lines = np.stack([LineMaskFunc([0.1], [3])(width, seed=s) for s in range(n)])
        masks = torch.from_numpy(lines)
        if kind == "native":
            maps = torch.from_numpy(birdcage(3, height, width)).expand(n, -1, -1, -1)
            op = MultiCoilSense(masks, maps)
        else:
            op = SingleCoilFourier(masks, height)
    if case.endswith("naive"):
        data = TrainingSet(op.A_adjoint(op.A(x)), kind, "naive")
    else:
        data = TrainingSet(op.A(x), kind, "ambient", masks=masks, maps=maps, delta=0.3)
    idx = torch.tensor([0, 3, 5, 1])
    mirrored = torch.tensor([True, False, True, True])
    targets, a, a_tilde = data.batch(
        idx, torch.Generator().manual_seed(1), "cpu", mirrored=mirrored
    )
    image = mirrored_where(x[idx], mirrored, -2)
    if case.endswith("naive"):
        sub = SingleCoilFourier(masks[idx], height)
        torch.testing.assert_close(targets, sub.A_adjoint(sub.A(image)), atol=1e-5, rtol=1e-5)
        return
    torch.testing.assert_close(targets, a.A(image), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(targets, data.targets[idx])  # something was mirrored
    seen = a_tilde.measurement_mask.expand_as(targets) > 0
    assert (a.measurement_mask.expand_as(targets)[seen] > 0).all()


@pytest.mark.parametrize("case", ["kspace", "native", "kspace_naive"])
def test_phase_rotated_examples_are_measurements_of_rotated_images(case):
    """train.rotate_phase: an example's targets are exactly what its operator measures of the
    clean image times exp(iθ) (ambient), or that image's zero-filled estimate (naive); B still
    hides only acquired entries."""
    from ambient_med.diffusion.training import TrainingSet
    from ambient_med.physics.coils import birdcage
    from ambient_med.physics.masks import LineMaskFunc
    from ambient_med.physics.operators import MultiCoilSense, SingleCoilFourier, rotate_phase

    n, height, width = 5, 16, 12
    x = torch.randn(n, 2, height, width, generator=torch.Generator().manual_seed(2))
    masks = torch.from_numpy(np.stack([LineMaskFunc([0.1], [3])(width, seed=s) for s in range(n)]))
    maps = None
    if case == "native":
        maps = torch.from_numpy(birdcage(3, height, width)).expand(n, -1, -1, -1)
        op = MultiCoilSense(masks, maps)
    else:
        op = SingleCoilFourier(masks, height)
    if case.endswith("naive"):
        data = TrainingSet(op.A_adjoint(op.A(x)), "kspace", "naive")
    else:
        data = TrainingSet(op.A(x), case, "ambient", masks=masks, maps=maps)
    idx = torch.tensor([4, 0, 2])
    angles = torch.tensor([0.5, 3.0, -2.0])
    targets, a, a_tilde = data.batch(idx, torch.Generator().manual_seed(1), "cpu", angles=angles)
    image = rotate_phase(x[idx], angles)
    if case.endswith("naive"):
        sub = SingleCoilFourier(masks[idx], height)
        torch.testing.assert_close(targets, sub.A_adjoint(sub.A(image)), atol=1e-5, rtol=1e-5)
    else:
        torch.testing.assert_close(targets, a.A(image), atol=1e-5, rtol=1e-5)
        seen = a_tilde.measurement_mask.expand_as(targets) > 0
        assert (a.measurement_mask.expand_as(targets)[seen] > 0).all()
    assert not torch.allclose(targets, data.targets[idx], atol=1e-3)
