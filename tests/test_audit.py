"""Memorization audit, its controls, canary exposure and generation metrics."""

import json

import numpy as np
import pytest
import torch
from conftest import tiny_config
from scipy import ndimage
from scipy.ndimage import gaussian_filter

from ambient_med.config import stage_config
from ambient_med.errors import AmbientMedError
from ambient_med.evaluation.audit import (
    Canary,
    CopyIndex,
    CopyStatistic,
    anatomy_features,
    band_pass,
    brain_masks,
    canary_exposure,
    conformal_threshold,
    control_images,
    foreground_masked,
    memorization_audit,
    nearest_copy,
    nearest_ncc,
    split_holdout,
)
from ambient_med.evaluation.generation import (
    generation_metrics,
    generation_report,
    random_features,
)
from ambient_med.io.export import write_slice_volume
from ambient_med.io.store import read_slices
from ambient_med.stages import audit, ingest


@pytest.fixture(scope="module")
def store(demo_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("audit")
    ingest.run(stage_config(tiny_config(), "demo", "ingest"), demo_dir, out / "s.h5", out / "m.csv")
    return out / "s.h5"


@pytest.fixture(scope="module")
def cohort(store):
    """(train, holdout, train slice positions, holdout subjects) of the tiny demo store."""
    slices = read_slices(store)
    train_rows, holdout_rows = slices.index.rows("train"), slices.index.rows("holdout")
    return (
        slices.images[train_rows],
        slices.images[holdout_rows],
        slices.index.slice_index[train_rows],
        slices.index.subject[holdout_rows],
    )


def test_nearest_ncc_known_values():
    rng = np.random.default_rng(0)
    refs = rng.random((5, 8, 8)).astype(np.float32) + 1.0
    best, index = nearest_ncc(np.stack([refs[3], 2.0 * refs[1] + 0.5]), refs)
    np.testing.assert_allclose(best, [1.0, 1.0], atol=1e-5)  # NCC ignores gain and offset
    np.testing.assert_array_equal(index, [3, 1])
    other = rng.random((1, 8, 8)).astype(np.float32) + 1.0
    assert nearest_ncc(other, refs)[0][0] < 0.6


def test_foreground_mask_zeroes_background_only():
    image = np.zeros((1, 10, 10), np.float32)
    image[0, 2:8, 2:8] = 1.0
    image[0, 0, 0] = 0.05  # background noise below 10 % of the 99th percentile
    masked = foreground_masked(image)
    assert masked[0, 0, 0] == 0 and masked[0, 5, 5] == 1.0


def test_band_pass_is_scipy_difference_of_gaussians():
    rng = np.random.default_rng(3)
    images = rng.random((3, 20, 24)).astype(np.float32)
    got = band_pass(torch.from_numpy(images), 0.7, 2.0).numpy()

    # scipy's "mirror" is torch's "reflect"; both sample a normalised Gaussian to 4 sigma.
    def smooth(sigma):
        return ndimage.gaussian_filter(images, (0, sigma, sigma), mode="mirror", truncate=4.0)

    np.testing.assert_allclose(got, smooth(0.7) - smooth(2.0), atol=1e-5)
    # A constant (an offset) has no band-pass content at all, borders included.
    flat = band_pass(torch.full((1, 20, 24), 3.0), 0.7, 2.0)
    assert flat.abs().max() < 1e-5


def test_brain_mask_fills_holes_and_ignores_gain_offset_and_noise():
    image = np.zeros((1, 24, 24), np.float32)
    image[0, 4:20, 4:20] = 1.0
    image[0, 10:14, 10:14] = 0.0  # a dark ventricle inside the head
    rng = np.random.default_rng(4)
    noisy = image + 0.03 * rng.standard_normal(image.shape).astype(np.float32)
    mask = brain_masks(image)
    assert mask[0, 12, 12] and mask[0, 5, 5] and not mask[0, 1, 1]
    np.testing.assert_array_equal(brain_masks(3.0 * image + 2.0), mask)
    # Noise moves at most a few boundary pixels and leaves no speckle in the background.
    differ = brain_masks(noisy) ^ mask
    assert differ.sum() <= 4
    assert not (differ & ~ndimage.binary_dilation(mask ^ ndimage.binary_erosion(mask))).any()
    eroded = brain_masks(image, erode=2)
    # Half-way up the (lightly smoothed) step is the square's edge; only its four corner
    # pixels, blurred from two sides, fall below. Eroded by 2 on each side: 12 x 12.
    assert mask.sum() == 16 * 16 - 4 and mask[0, 4, 10] and not mask[0, 3, 10]
    assert eroded.sum() == 12 * 12 and eroded[0, 6, 6] and not eroded[0, 5, 6]
    assert not brain_masks(np.full((1, 8, 8), 0.5, np.float32)).any()


def _reference_score(query, reference, params):
    """The copy statistic written out with scipy and numpy, shift by shift."""

    def smooth(image, sigma):
        return ndimage.gaussian_filter(image, sigma, mode="mirror", truncate=4.0)

    def prepare(image):
        x = image / image.std()
        head = brain_masks(image[None])[0]
        width = params.extend * params.sigma_coarse
        extended = smooth(x * head, width) / np.maximum(smooth(head.astype(float), width), 1e-6)
        x = np.where(head, x, extended)
        dog = smooth(x, params.sigma_fine) - smooth(x, params.sigma_coarse)
        mask = brain_masks(image[None], erode=params.erode)[0]
        return np.where(mask, dog - dog[mask].mean(), 0.0)

    q, r = prepare(query.astype(np.float64)), prepare(reference.astype(np.float64))
    s = params.max_shift
    padded = np.pad(q, s)
    height, width = q.shape
    scores = [
        2
        * np.sum(padded[s + dy : s + dy + height, s + dx : s + dx + width] * r)
        / (np.sum(q * q) + np.sum(r * r))
        for dy in range(-s, s + 1)
        for dx in range(-s, s + 1)
    ]
    return max(scores)


def test_copy_statistic_known_values_on_a_tiny_case():
    rng = np.random.default_rng(5)
    yy, xx = np.mgrid[:16, :16]
    head = ((yy - 7.5) ** 2 + (xx - 7.5) ** 2 < 6.5**2).astype(np.float32)
    images = head * (1.0 + 0.5 * rng.random((3, 16, 16)).astype(np.float32))
    params = CopyStatistic(sigma_fine=0.7, sigma_coarse=1.5, erode=1, max_shift=1, match_blurs=())
    got = CopyIndex(images[1:], params).matrix(images[:2])
    expected = [[_reference_score(q, r, params) for r in images[1:]] for q in images[:2]]
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert got[1, 0] == pytest.approx(1.0, abs=1e-5)  # a copy scores exactly 1
    assert got[0, 0] < 0.5  # different texture inside the same outline does not
    # Without anatomy inside the outline there is nothing to compare: a constant has no
    # features at all, and the bare head outline (its band-pass edge removed by the tissue
    # extension) scores about 0 against every textured head.
    _, energy = anatomy_features(np.full((1, 16, 16), 0.3, np.float32), params)
    assert float(energy[0]) == 0.0
    assert CopyIndex(images[1:2], params).matrix(np.full((1, 16, 16), 0.3, np.float32))[0, 0] == 0
    assert np.abs(CopyIndex(images, params).matrix(head[None])).max() < 0.05


def test_copy_statistic_ignores_gain_and_offset_and_finds_shifts(cohort):
    train, holdout, _, _ = cohort
    index = CopyIndex(train)
    base, where = index.nearest(holdout[:12])
    changed, where_changed = index.nearest(2.5 * holdout[:12] + 0.3)
    np.testing.assert_allclose(changed, base, atol=1e-4)
    np.testing.assert_array_equal(where_changed, where)
    # Gain and offset of the reference side do not matter either.
    np.testing.assert_allclose(
        CopyIndex(0.5 * train + 1.0).nearest(holdout[:12])[0], base, atol=1e-4
    )
    # A copy moved by (2, -1) pixels is found at full score within max_shift = 2, not without.
    moved = ndimage.shift(train[30:31], (0, 2, -1), order=0)
    best, found = index.nearest(moved)
    assert best[0] == pytest.approx(1.0, abs=1e-4) and found[0] == 30
    no_search = nearest_copy(moved, train, CopyStatistic(max_shift=0))[0][0]
    assert no_search < 0.9


def test_blurred_copies_match_a_blurred_reference(cohort):
    train, holdout, _, _ = cohort
    sharp_only = CopyIndex(train, CopyStatistic(match_blurs=()))
    with_blur = CopyIndex(train, CopyStatistic(match_blurs=(0.6,)))
    blurred = ndimage.gaussian_filter(train[10:14], (0, 0.6, 0.6))
    before, _ = sharp_only.nearest(blurred)
    after, found = with_blur.nearest(blurred)
    # Matched blur: each blurred copy finds its own source at full score; sharply, it does not.
    np.testing.assert_allclose(after, 1.0, atol=1e-4)
    np.testing.assert_array_equal(found, np.arange(10, 14))
    assert before.max() < 0.99
    # The score is a best over versions: never lower than the sharp one, for any query.
    base, _ = sharp_only.nearest(holdout[:12])
    widened, _ = with_blur.nearest(holdout[:12])
    assert np.all(widened >= base - 1e-6)
    assert with_blur.matrix(holdout[:3]).shape == (3, len(train))
    with pytest.raises(AmbientMedError, match="audit.match_blurs"):
        CopyStatistic(match_blurs=(0.0,))


def test_split_holdout_interleaves_within_subjects():
    groups = np.array([7, 7, 7, 3, 3, 3, 3])
    calibration, control = split_holdout(len(groups), groups)
    np.testing.assert_array_equal(calibration, [0, 2, 4, 6])
    np.testing.assert_array_equal(control, [1, 3, 5])
    assert set(groups[calibration]) == set(groups[control]) == {3, 7}
    with pytest.raises(AmbientMedError, match="at least 2"):
        split_holdout(1)


def test_control_images_are_seeded(cohort):
    train, _, levels, _ = cohort
    one = control_images(train, levels, seed=11, n=8)
    again = control_images(train, levels, seed=11, n=8)
    other = control_images(train, levels, seed=12, n=8)
    assert set(one) == {"exact", "shift1", "shift2", "noise", "blur", "silhouette", "blurred_mean"}
    for name in one:
        assert one[name].shape == (8, *train.shape[1:])
        np.testing.assert_array_equal(one[name], again[name])
    assert not np.array_equal(one["exact"], other["exact"])
    assert set(np.unique(one["silhouette"]).tolist()) == {0.0, 1.0}
    # Shifted controls are exact copies moved by whole pixels, the larger component 1 or 2.
    for name, distance in (("shift1", 1), ("shift2", 2)):
        for moved, original in zip(one[name], one["exact"], strict=True):
            matches = [
                (dy, dx)
                for dy in range(-2, 3)
                for dx in range(-2, 3)
                if np.array_equal(ndimage.shift(original, (dy, dx), order=0), moved)
            ]
            assert matches and max(map(abs, matches[0])) == distance


def test_conformal_threshold_is_the_finite_sample_order_statistic():
    scores = np.arange(1, 200, dtype=np.float64)  # 199 calibration scores 1..199
    # ⌈(199 + 1) · 0.99⌉ = 198: the 198th smallest.
    assert conformal_threshold(scores[::-1], 0.99) == 198.0
    assert conformal_threshold(scores, 0.5) == 100.0
    # Fewer than 99 scores: the largest, never an extrapolation above it.
    assert conformal_threshold(scores[:67], 0.99) == 67.0
    # The guarantee: over exchangeable draws, a fresh score exceeds the threshold at most
    # 1 − q of the time (here 2.0 %, against 3.9 % for the interpolated percentile).
    rng = np.random.default_rng(0)
    draws = rng.standard_normal((4000, 50))
    conformal = np.mean([d[49] > conformal_threshold(d[:49], 0.98) for d in draws])
    interpolated = np.mean([d[49] > np.quantile(d[:49], 0.98) for d in draws])
    assert conformal <= 0.02 + 0.007 < interpolated
    with pytest.raises(AmbientMedError, match="no calibration"):
        conformal_threshold(np.array([]), 0.99)


def test_control_sets_keep_their_size_on_a_small_training_set(cohort):
    train, _, levels, _ = cohort
    few, few_levels = train[:5], levels[:5]
    controls = control_images(few, few_levels, seed=3, n=20)
    assert all(images.shape == (20, *train.shape[1:]) for images in controls.values())
    # Every control is made from one of the 5 slices, and a slice drawn twice gets two
    # different noise draws (fresh realisations, not repeats).
    sources = [
        next(i for i in range(5) if np.array_equal(image, few[i])) for image in controls["exact"]
    ]
    repeated = [k for k in range(20) if sources.index(sources[k]) != k]
    assert repeated
    first = sources.index(sources[repeated[0]])
    assert not np.array_equal(controls["noise"][first], controls["noise"][repeated[0]])


def test_audit_flags_copies_but_not_held_out_slices(cohort):
    train, holdout, _, groups = cohort
    rng = np.random.default_rng(1)
    exact = train[10]
    perturbed = train[20] + 0.02 * rng.standard_normal(train[20].shape).astype(np.float32)
    shifted_noise = rng.random(train[0].shape).astype(np.float32)
    shift1 = ndimage.shift(train[40], (1, 0), order=0)
    shift2 = ndimage.shift(train[50], (-2, 2), order=0)
    blurred_noisy = ndimage.gaussian_filter(train[60], 0.8) + 0.03 * rng.standard_normal(
        train[60].shape
    ).astype(np.float32)
    silhouettes = brain_masks(train[[10, 20, 40]]).astype(np.float32)
    samples = np.stack([exact, perturbed, shifted_noise, shift1, shift2, blurred_noisy])
    samples = np.concatenate([samples, silhouettes])
    result = memorization_audit(samples, train, holdout, 0.99, holdout_groups=groups)
    assert result.sample_ncc[0] == pytest.approx(1.0, abs=1e-5)
    flagged = result.sample_ncc > result.threshold
    assert flagged.tolist() == [True, True, False, True, True, True, False, False, False]
    np.testing.assert_array_equal(result.sample_index[[0, 1, 3, 4, 5]], [10, 20, 40, 50, 60])
    # The calibration half itself sits at the chosen quantile: about 1 % above.
    allowed = 0.01 + 1 / len(result.holdout_ncc)  # the quantile of a finite calibration set
    assert result.summary(0.99)["holdout_frac_above"] <= allowed
    # The other half of the held-out subjects' slices, never used for the threshold, is not
    # flagged beyond what the quantile allows (one slice of a few dozen at most).
    control = result.control_ncc["holdout"]
    assert len(control) + len(result.holdout_ncc) == len(holdout)
    assert np.mean(control > result.threshold) <= 0.01 + 1 / len(control)


def test_controls_meet_targets_where_the_old_statistic_fails(cohort):
    train, holdout, levels, groups = cohort
    controls = control_images(train, levels, seed=1234, n=32)
    new = memorization_audit(train[:2], train, holdout, holdout_groups=groups, controls=controls)
    rows = {row["control"]: row for row in new.control_rows()}
    assert set(rows) == {*controls, "holdout"}
    for name in ("exact", "shift1", "shift2", "noise", "blur"):
        assert rows[name]["expected"] == "flagged" and rows[name]["flagged_fraction"] >= 0.95
    for name in ("silhouette", "blurred_mean"):
        assert rows[name]["expected"] == "not_flagged" and rows[name]["flagged_fraction"] <= 0.02
    assert rows["holdout"]["flagged_fraction"] <= 0.01 + 1 / rows["holdout"]["n"]
    # The whole-image NCC of masked magnitudes misses shifted copies and flags smooth means:
    # the controls can fail.
    old = memorization_audit(
        train[:2], train, holdout, holdout_groups=groups, controls=controls, method="magnitude_ncc"
    )
    old_rows = {row["control"]: row for row in old.control_rows()}
    assert old_rows["shift2"]["flagged_fraction"] < 0.5
    assert old_rows["blurred_mean"]["flagged_fraction"] > 0.5
    assert old.summary(0.99)["controls_passed"] is False


def test_audit_stage_writes_json_controls_and_figure(store, tmp_path):
    slices = read_slices(store)
    train = slices.images[slices.index.rows("train")]
    samples = np.concatenate([train[:2], np.zeros_like(train[:2]) + 0.5])
    write_slice_volume(tmp_path / "samples.nii.gz", samples, np.eye(4))
    cfg = stage_config(tiny_config(), "demo", "audit")
    cfg["audit"]["control_slices"] = 16
    audit.run(
        cfg,
        tmp_path / "samples.nii.gz",
        store,
        tmp_path / "memorization.json",
        tmp_path / "pairs.png",
        table_out=tmp_path / "memorization.tsv",
    )
    result = json.loads((tmp_path / "memorization.json").read_text())
    assert result["frac_above"] == pytest.approx(0.5)
    assert result["reference"] == "clean_training_slices"
    assert result["statistic"] == "bandpass"
    assert {"threshold", "q50", "q95", "q99", "max", "n_samples", "holdout_q99"} <= set(result)
    names = ["exact", "shift1", "shift2", "noise", "blur", "holdout", "silhouette"]
    names.append("blurred_mean")
    controls = {row["control"]: row for row in result["controls"]}
    assert set(controls) == set(names)
    for name, row in controls.items():
        assert row["kind"] == "control" and row["n"] > 0
        assert result[f"control_{name}_flagged"] == row["flagged_fraction"]
    assert controls["exact"]["n"] == 16 and controls["exact"]["flagged_fraction"] == 1.0
    assert (tmp_path / "pairs.png").stat().st_size > 0
    table = (tmp_path / "memorization.tsv").read_text()
    assert "frac_above\t0.5" in table and "control_shift2_flagged\t1" in table
    assert "\ncontrols\t" not in table  # the rows live in the JSON only
    # Same config, same seed: the same controls and numbers.
    audit.run(
        cfg,
        tmp_path / "samples.nii.gz",
        store,
        tmp_path / "again.json",
        tmp_path / "again.png",
    )
    assert json.loads((tmp_path / "again.json").read_text()) == result


def _plant(images, pattern, row, col):
    out = images.copy()
    h, w = pattern.shape
    out[:, row : row + h, col : col + w] += pattern
    return out


def test_canary_exposure_measures_planted_patterns(cohort):
    train, holdout, _, _ = cohort
    rng = np.random.default_rng(6)
    planted = Canary(0.4 * np.sign(rng.standard_normal((6, 6))).astype(np.float32), 12, 10)
    never = Canary(0.4 * np.sign(rng.standard_normal((6, 6))).astype(np.float32), 12, 10)
    elsewhere = Canary(planted.pattern, 18, 16)  # the planted pattern, at another place
    # Planted, as a canary would be, into slices whose head covers its place.
    hosts = train[brain_masks(train)[:, 12:18, 10:16].all(axis=(1, 2))]
    with_canary = _plant(hosts[:40], planted.pattern, 12, 10)
    # Reproduced one pixel off and a little blurred, as a model might.
    drifted = ndimage.gaussian_filter(ndimage.shift(with_canary, (0, 1, 0), order=0), (0, 0.5, 0.5))
    samples = np.concatenate([with_canary, drifted, hosts[40:80]])
    result = canary_exposure(samples, [planted, elsewhere], holdout, reference_canaries=[never])
    scores = result.scores[0]
    assert np.mean(scores[:80] > result.threshold[0]) >= 0.95
    assert np.mean(scores[80:] > result.threshold[0]) <= 0.05
    assert result.exposure[0] == pytest.approx(np.mean(scores > result.threshold[0]))
    assert 0.64 <= result.exposure[0] <= 0.7  # 80 of 120 samples carry it
    # Chance level: a never-planted pattern, or the planted one elsewhere, is "reproduced"
    # about as often as the per-place 99th percentile of held-out slices allows.
    assert result.exposure[1] <= 0.1 and result.reference_exposure[0] <= 0.1
    assert result.null_exposure[0] <= 0.01 + 1 / len(holdout)
    summary = result.summary()
    assert summary["canary_exposure_max"] == pytest.approx(result.exposure[0])
    assert summary["canary_reference_exposure_mean"] == pytest.approx(result.reference_exposure[0])
    # Gain and offset of the samples change nothing.
    again = canary_exposure(2.0 * samples + 0.1, [planted], holdout)
    np.testing.assert_allclose(again.scores[0], scores, atol=1e-4)


def test_canary_exposure_full_size_additive_canary(cohort):
    train, holdout, _, _ = cohort
    height, width = train.shape[1:]
    yy, xx = np.mgrid[:height, :width]
    mask = (yy - 14) ** 2 + (xx - 17) ** 2 <= 16
    pattern = np.where(mask, 0.3 * np.cos(1.6 * xx), 0.0).astype(np.float32)
    canary = Canary(pattern, mask=mask, name="ring")
    hosts = train[brain_masks(train)[:, 10:19, 13:22].all(axis=(1, 2))]
    samples = np.concatenate([hosts[:30] + pattern, hosts[30:60]])
    result = canary_exposure(samples, [canary], holdout)
    assert np.mean(result.scores[0, :30] > result.threshold[0]) >= 0.95
    assert np.mean(result.scores[0, 30:] > result.threshold[0]) <= 0.05
    with pytest.raises(AmbientMedError, match="does not fit"):
        canary_exposure(samples, [Canary(np.ones((4, 4)), height - 2, 0)], holdout)
    with pytest.raises(AmbientMedError, match="ring"):
        canary_exposure(samples, [Canary(pattern[:5], mask=mask, name="ring")], holdout)


def test_generation_metrics_rank_real_above_noise(store):
    slices = read_slices(store)
    real = slices.images[slices.index.rows("train")]
    holdout = slices.images[slices.index.rows("holdout")]
    rng = np.random.default_rng(2)
    noise = rng.random(holdout.shape).astype(np.float32)
    good = generation_metrics(real[: len(holdout)], holdout)
    bad = generation_metrics(noise, holdout)
    assert good["gen_frechet_random_features"] < bad["gen_frechet_random_features"]
    assert good["gen_mmd_pixels"] < bad["gen_mmd_pixels"]
    # The feature network is fixed: same images, same features.
    np.testing.assert_array_equal(random_features(holdout[:3]), random_features(holdout[:3]))


def test_generation_report_places_samples_between_anatomy_and_blobs(store):
    slices = read_slices(store)
    train = slices.images[slices.index.rows("train")]
    holdout = slices.images[slices.index.rows("holdout")]
    report = generation_report(train[: len(holdout) // 2], holdout)
    # Real slices of other subjects sit near the real floor, far from the blurred reference.
    assert (
        report["gen_frechet_random_features_real"] < report["gen_frechet_random_features_blurred"]
    )
    assert report["gen_frechet_random_features"] < report["gen_frechet_random_features_blurred"]
    blobs = generation_report(gaussian_filter(train[: len(holdout) // 2], (0, 2, 2)), holdout)
    assert blobs["gen_frechet_random_features"] > report["gen_frechet_random_features"]
