"""One intensity convention: a scan reaches the network at the same scale whether it comes as
an image series or as raw k-space, fully sampled or undersampled."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config

from ambient_med.config import stage_config
from ambient_med.io.demo import (
    load_template,
    pseudo_subject,
    simulate_multicoil_kspace,
    write_fastmri,
)
from ambient_med.io.slicing import band_image, intensity_scale, robust_scale
from ambient_med.io.store import read_raw_store, read_slices
from ambient_med.physics.masks import LineMaskFunc
from ambient_med.stages import ingest

SIZE = 32


@pytest.fixture(scope="module")
def scan() -> np.ndarray:
    """One synthetic head, ``(slices, 32, 32)`` axial planes (X, Y), arbitrary scanner units."""
    tissues, _ = load_template(3.0)
    volume = pseudo_subject(tissues, 99, 3.0, "t1w")
    planes = torch.from_numpy(np.moveaxis(volume, 2, 0)[:, None].astype(np.float32))
    planes = F.interpolate(planes, size=(SIZE, SIZE), mode="bilinear", antialias=True)[:, 0]
    planes = planes.numpy()[::6] * 731.0  # every sixth plane; a scanner's arbitrary units
    return planes[(planes > 0.1 * planes.max()).mean(axis=(1, 2)) > 0.15]


def test_band_image_keeps_only_the_central_columns():
    width = 20
    columns = np.arange(width)
    slow = np.exp(2j * np.pi * 1 * columns / width)  # one cycle: inside a 4-column band
    fast = np.exp(2j * np.pi * 6 * columns / width)  # six cycles: outside it
    image = np.tile(2.0 * slow + 5.0 * fast, (1, 3, 1))
    np.testing.assert_allclose(band_image(image, 0.2), 2.0, atol=1e-9)
    # The whole band is the identity on magnitudes, and the scale is then robust_scale's.
    rng = np.random.default_rng(0)
    noise = rng.standard_normal((2, 16, width))
    np.testing.assert_allclose(band_image(noise, 1.0), np.abs(noise), atol=1e-12)
    assert intensity_scale(noise, 99.5, 1.0) == pytest.approx(robust_scale(np.abs(noise), 99.5))


def _scale_from_nifti(scan, tmp_path) -> float:
    folder = tmp_path / "nifti"
    folder.mkdir()
    affine = np.diag([3.0, 3.0, 9.0, 1.0])
    for copy in range(2):  # a cohort needs a training and a hold-out subject
        nib.save(nib.Nifti1Image(np.moveaxis(scan, 0, 2), affine), folder / f"head{copy}.nii.gz")
    cfg = tiny_config(holdout_subjects=1)
    out = tmp_path / "nifti_out"
    ingest.run(stage_config(cfg, "demo", "ingest"), folder, out / "s.h5", out / "m.csv")
    store = read_slices(out / "s.h5")
    stored, truth = store.images, scan[store.index.slice_index]
    inside = truth > 0.2 * truth.max()
    return float(np.median(truth[inside] / stored[inside]))


def _scale_from_raw(scan, tmp_path, acceleration: int | None) -> float:
    folder = tmp_path / f"raw{acceleration}"
    folder.mkdir()
    kspace = simulate_multicoil_kspace(scan, coils=4, seed=3)
    line_mask = None
    if acceleration:
        line_mask = LineMaskFunc([0.2], [acceleration], "equispaced")(SIZE, 5)
    for copy in range(2):
        write_fastmri(folder / f"head{copy}.h5", kspace, line_mask)
    cfg = tiny_config(
        source="kspace", corruption="native", demo=False, input=str(folder), holdout_subjects=1
    )
    out = tmp_path / f"raw_out{acceleration}"
    stage = stage_config(cfg, "demo", "ingest")
    ingest.run(stage, folder, out / "s.h5", out / "m.csv", out / "raw.h5")
    stored = read_raw_store(out / "raw.h5").kspace
    written = kspace if line_mask is None else kspace * line_mask
    written = np.concatenate([written, written])
    nonzero = np.abs(stored) > 0
    return float(np.median(np.abs(written[nonzero]) / np.abs(stored[nonzero])))


@pytest.mark.parametrize("acceleration", [None, 4])
def test_image_series_and_raw_kspace_of_one_scan_reach_the_model_at_one_scale(
    scan, tmp_path, monkeypatch, acceleration
):
    monkeypatch.setenv("AMBIENT_MED_SITE_SECRET", "test-site-secret")
    from_images = _scale_from_nifti(scan, tmp_path)
    from_raw = _scale_from_raw(scan, tmp_path, acceleration)
    assert from_raw / from_images == pytest.approx(1.0, abs=0.05)
