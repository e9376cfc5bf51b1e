"""Memorization audit and generation metrics."""

import json

import numpy as np
import pytest
from conftest import tiny_config

from ambient_med.config import stage_config
from ambient_med.evaluation.audit import foreground_masked, memorization_audit, nearest_ncc
from ambient_med.evaluation.generation import generation_metrics, random_features
from ambient_med.io.export import write_slice_volume
from ambient_med.io.store import read_slices
from ambient_med.stages import audit, ingest


@pytest.fixture(scope="module")
def store(demo_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("audit")
    ingest.run(stage_config(tiny_config(), "demo", "ingest"), demo_dir, out / "s.h5", out / "m.csv")
    return out / "s.h5"


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


def test_audit_flags_copies_but_not_held_out_slices(store):
    slices = read_slices(store)
    train = slices.images[slices.index.rows("train")]
    holdout = slices.images[slices.index.rows("holdout")]
    rng = np.random.default_rng(1)
    exact = train[10]
    perturbed = train[20] + 0.02 * rng.standard_normal(train[20].shape).astype(np.float32)
    shifted_noise = rng.random(train[0].shape).astype(np.float32)
    samples = np.stack([exact, perturbed, shifted_noise])
    result = memorization_audit(samples, train, holdout, quantile=0.99)
    assert result.sample_ncc[0] == pytest.approx(1.0, abs=1e-5)
    flagged = result.sample_ncc > result.threshold
    assert flagged.tolist() == [True, True, False]
    assert result.sample_index[0] == 10 and result.sample_index[1] == 20
    # The calibration set itself sits at the chosen quantile: about 1 % above.
    allowed = 0.01 + 1 / len(holdout)  # the quantile of a finite calibration set
    assert result.summary(0.99)["holdout_frac_above"] <= allowed
    # Held-out subjects' slices, audited as if they were samples, are not flagged (beyond
    # the 1 % the quantile allows).
    again = memorization_audit(holdout, train, holdout, quantile=0.99)
    assert np.mean(again.sample_ncc > again.threshold) <= allowed


def test_audit_stage_writes_json_and_figure(store, tmp_path):
    slices = read_slices(store)
    train = slices.images[slices.index.rows("train")]
    samples = np.concatenate([train[:2], np.zeros_like(train[:2]) + 0.5])
    write_slice_volume(tmp_path / "samples.nii.gz", samples, np.eye(4))
    cfg = stage_config(tiny_config(), "demo", "audit")
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
    assert {"threshold", "q50", "q95", "q99", "n_samples"} <= set(result)
    assert (tmp_path / "pairs.png").stat().st_size > 0
    assert "frac_above\t0.5" in (tmp_path / "memorization.tsv").read_text()


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
