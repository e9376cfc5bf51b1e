"""The evidence the benchmarks stand on: distinct demo subjects, a phase in every simulated
acquisition, per-volume metrics and their bootstrap intervals."""

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import DEMO_VOXEL_MM

from ambient_med.errors import AmbientMedError
from ambient_med.evaluation.metrics import (
    bootstrap_ci,
    foreground_mask,
    per_volume_metrics,
    volume_metrics,
)
from ambient_med.io.demo import (
    _load,
    load_template,
    posed,
    subject_orientation,
    subject_zoom,
    synthesize_subject,
    template_path,
    zoomed,
)
from ambient_med.physics.acquisition import Acquisition, complex_slices, smooth_phase
from ambient_med.physics.operators import SingleCoilFourier, fft2c, to_complex


def _conjugate_asymmetry(kspace: np.ndarray) -> float:
    """‖K(k) − conj(K(−k))‖ / ‖K‖ on the centred grid (even sizes: DC at N // 2, so the
    mirror of index i is N − i, leaving row/column 0 without a partner)."""
    inner = kspace[..., 1:, 1:]
    mirror = np.conj(inner[..., ::-1, ::-1])
    return float(np.linalg.norm(inner - mirror) / np.linalg.norm(inner))


@pytest.fixture(scope="module")
def tissues():
    return load_template(4.0)[0]


@pytest.fixture(scope="module")
def head_slices(tissues):
    volume = synthesize_subject(tissues, 11, 4.0)[0]
    middle = volume.shape[2] // 2
    # Three axial slices, cropped to an even 48 x 48 square around the head.
    return np.stack([volume[:48, 4:52, middle + k].T for k in (-2, 0, 2)]) / volume.max()


def test_simulated_kspace_is_not_conjugate_symmetric(head_slices):
    subjects = ["sub-x"] * 3
    index = np.array([10, 12, 14])
    with_phase = Acquisition(4, 0.08, "random", 48, seed=5)
    without = Acquisition(4, 0.08, "random", 48, seed=5, phase=False)
    ops = SingleCoilFourier(torch.ones(3, 48, dtype=torch.bool), 48)  # fully sampled
    y = to_complex(with_phase.measure(ops, head_slices, subjects, index, "t")).numpy()
    y_real = to_complex(without.measure(ops, head_slices, subjects, index, "t")).numpy()
    # The control: a real image's k-space mirrors itself (the free lines of the old setup).
    assert _conjugate_asymmetry(y_real) < 1e-5
    assert _conjugate_asymmetry(y) > 0.3
    # Metrics stay on magnitudes: the inverse FFT's magnitude is the reference.
    unshifted = np.fft.ifft2(np.fft.ifftshift(y, axes=(-2, -1)), norm="ortho")
    image = np.fft.fftshift(unshifted, axes=(-2, -1))
    np.testing.assert_allclose(np.abs(image), head_slices, atol=1e-5)


def test_phase_depends_on_cohort_seed_and_subject_only():
    images = np.ones((4, 16, 16), np.float32)
    subjects = ["s1", "s1", "s2", "s2"]
    index = np.array([3, 4, 3, 4])
    a = complex_slices(images, subjects, index, cohort_seed=1)
    np.testing.assert_array_equal(a, complex_slices(images, subjects, index, cohort_seed=1))
    assert not np.allclose(a[0], a[2])  # another subject, another phase
    assert not np.allclose(a, complex_slices(images, subjects, index, cohort_seed=2))
    # One subject's phase is one smooth field: neighbouring slices differ only a little,
    # neighbouring pixels by a small step.
    phase = smooth_phase(16, 16, 7, [3, 4])
    assert np.abs(phase[1] - phase[0]).max() < 0.2
    assert np.abs(np.diff(phase[0], axis=-1)).max() < 2 * np.pi * 2 / 15
    assert np.ptp(phase[0]) > 0.5  # yet it varies over the field of view


def test_two_demo_subjects_differ_in_lesions_and_shape(tissues):
    first, info_a = synthesize_subject(tissues, 100, 4.0)
    second, info_b = synthesize_subject(tissues, 101, 4.0)
    assert info_a.lesions and info_b.lesions
    centres_a = {lesion.centre for lesion in info_a.lesions}
    centres_b = {lesion.centre for lesion in info_b.lesions}
    assert centres_a.isdisjoint(centres_b)
    assert info_a.intensities != info_b.intensities
    head_a = first > 0.3 * np.percentile(first, 99)
    head_b = second > 0.3 * np.percentile(second, 99)
    dice = 2 * (head_a & head_b).sum() / (head_a.sum() + head_b.sum())
    assert dice < 0.95  # different shapes, not one head with new intensities
    # Same seed, same subject (reruns are bit-identical).
    np.testing.assert_array_equal(first, synthesize_subject(tissues, 100, 4.0)[0])
    # A noise floor: the background is not exactly zero.
    assert (first == 0).mean() < 0.01


def test_the_template_never_appears_as_a_subject(demo_dir):
    template, _ = _load(template_path(), DEMO_VOXEL_MM)
    for path in sorted(demo_dir.glob("volume_*.nii.gz")):
        volume = np.asarray(nib.as_closest_canonical(nib.load(path)).dataobj, np.float32)
        assert volume.shape == template.shape
        correlation = np.corrcoef(volume.ravel(), template.ravel())[0, 1]
        assert correlation < 0.9, path.name


def test_contrasts_reorder_tissue_intensities(tissues):
    t1 = synthesize_subject(tissues, 5, 4.0, "t1w")[1].intensities
    t2 = synthesize_subject(tissues, 5, 4.0, "t2w")[1].intensities
    assert t1["wm"] > t1["gm"] > t1["csf"]
    assert t2["csf"] > t2["gm"] > t2["wm"]


def test_poses_put_each_anatomical_plane_on_the_slice_axis(tissues):
    volume = synthesize_subject(tissues, 5, 4.0)[0]
    x, y, z = volume.shape
    coronal, sagittal = posed(volume, "coronal"), posed(volume, "sagittal")
    assert posed(volume, "axial").shape == (x, y, z)
    assert coronal.shape == (x, z, y) and sagittal.shape == (y, z, x)
    # Slice k of the posed volume is the anatomical plane k: constant y, constant x.
    np.testing.assert_array_equal(coronal[..., 7], volume[:, 7, :])
    np.testing.assert_array_equal(sagittal[..., 7], volume[7, :, :])
    chosen = [subject_orientation("mixed", 1234, s) for s in range(12)]
    assert set(chosen) == {"axial", "coronal", "sagittal"}
    assert chosen == [subject_orientation("mixed", 1234, s) for s in range(12)]
    assert subject_orientation("coronal", 1234, 3) == "coronal"
    with pytest.raises(AmbientMedError, match="demo.orientation"):
        subject_orientation("oblique", 1234, 0)


def test_zoom_crops_the_head_and_keeps_the_affine_true(tissues):
    volume = synthesize_subject(tissues, 11, 4.0)[0]
    affine = np.diag([4.0, 4.0, 4.0, 1.0])
    affine[:3, 3] = [-90.0, -126.0, -72.0]
    crop, placed = zoomed(volume, affine, 2.5, seed=3)
    nx, ny, nz = volume.shape
    assert crop.shape == (round(nx / 2.5), round(ny / 2.5), nz)
    # The crop is a window of the volume, and its affine puts each voxel where it was.
    x0, y0, _ = np.round(np.linalg.solve(affine, placed @ [0, 0, 0, 1])[:3]).astype(int)
    np.testing.assert_array_equal(crop, volume[x0 : x0 + crop.shape[0], y0 : y0 + crop.shape[1]])
    # Brain, not air: the window holds more head per voxel than the whole plane does.
    assert (crop > 0.1 * volume.max()).mean() > (volume > 0.1 * volume.max()).mean()
    assert zoomed(volume, affine, 1.0, seed=3)[0] is volume
    # [1, 1] draws nothing; a range draws a seeded factor per subject, inside it.
    assert subject_zoom((1.0, 1.0), 1234, 5) == 1.0
    factors = [subject_zoom((1.0, 4.0), 1234, s) for s in range(12)]
    assert all(1.0 <= f <= 4.0 for f in factors) and len(set(factors)) == 12
    assert factors == [subject_zoom((1.0, 4.0), 1234, s) for s in range(12)]
    with pytest.raises(AmbientMedError, match="demo.zoom"):
        subject_zoom((2.0, 1.5), 1234, 0)


def test_volume_metrics_match_a_hand_computation():
    reference = np.zeros((2, 16, 16))
    reference[:, 4:12, 4:12] = 2.0
    error = np.zeros_like(reference)
    error[0, 5, 5] = 0.5
    error[1, 6, 7] = -0.5
    scores = volume_metrics(reference, reference + error)
    rmse = np.sqrt(2 * 0.25 / reference.size)
    assert scores["psnr"] == pytest.approx(20 * np.log10(2.0 / rmse))
    assert scores["nrmse"] == pytest.approx(np.sqrt(0.5) / np.sqrt(2 * 64 * 4.0))
    assert volume_metrics(reference, reference)["ssim"] == pytest.approx(1.0)
    # 1 % of the maximum added to the background only: SSIM over the whole image drops,
    # SSIM over the (dilated) head does not move much.
    head = np.zeros((1, 48, 48))
    head[:, 18:30, 18:30] = 2.0
    shifted = volume_metrics(head, head + 0.02 * (head == 0))
    assert shifted["ssim"] < 0.8
    assert shifted["ssim_fg"] > shifted["ssim"] + 0.1
    mask = foreground_mask(reference)
    assert mask[0, 4, 4] and mask[0, 2, 8] and not mask[0, 0, 0]  # dilated by 2 pixels
    per_volume = per_volume_metrics(
        np.concatenate([reference, reference]),
        np.concatenate([reference + error, reference]),
        np.array([0, 0, 1, 1]),
    )
    assert per_volume[0]["psnr"] == pytest.approx(scores["psnr"])
    assert per_volume[1]["nrmse"] == 0.0


def test_bootstrap_interval_on_known_samples():
    # Two volumes, one seed: resampled means are 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4.
    assert bootstrap_ci(np.array([0.0, 1.0])) == (0.0, 1.0)
    assert bootstrap_ci(np.full((3, 4), 2.5)) == (2.5, 2.5)
    rng = np.random.default_rng(0)
    values = rng.normal(10.0, 2.0, size=400)
    low, high = bootstrap_ci(values)
    half_width = 1.96 * values.std() / np.sqrt(len(values))
    assert low == pytest.approx(values.mean() - half_width, abs=0.05)
    assert high == pytest.approx(values.mean() + half_width, abs=0.05)
    # Seed-to-seed spread widens the interval beyond the volume spread alone.
    table = rng.normal(0.0, 0.1, size=(3, 20)) + np.array([[-1.0], [0.0], [1.0]])
    assert np.subtract(*bootstrap_ci(table)[::-1]) > 1.0


def test_acquisition_masks_do_not_depend_on_how_r_is_written():
    # R = 4 from a YAML config (an int) and from a command line (a float) are one acquisition.
    masks = [Acquisition(r, 0.08, "random", 64, seed=3).operator(["a", "b"]) for r in (4, 4.0)]
    assert torch.equal(masks[0].line_mask, masks[1].line_mask)


def test_acquisition_operator_matches_fft(head_slices):
    acq = Acquisition(4, 0.08, "random", 48, seed=3)
    op = acq.operator(["a", "b", "c"])
    y = acq.measure(op, head_slices, ["s"] * 3, np.arange(3), "k")
    x = acq.images(head_slices, ["s"] * 3, np.arange(3))
    torch.testing.assert_close(y, fft2c(x) * op.measurement_mask)
