"""Planted canaries: put into training slices before corruption, measured by the audit."""

import json

import numpy as np
import pytest
from conftest import tiny_config

from ambient_med.config import stage_config
from ambient_med.io.canaries import canary_pattern, read_canaries
from ambient_med.io.export import write_slice_volume
from ambient_med.io.store import read_slices
from ambient_med.stages import audit, ingest


@pytest.fixture(scope="module")
def planted(demo_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("canaries")
    cfg = tiny_config(canaries=[1, 4])
    ingest.run(stage_config(cfg, "demo", "ingest"), demo_dir, out / "c.h5", out / "m.csv")
    plain = tiny_config()
    ingest.run(stage_config(plain, "demo", "ingest"), demo_dir, out / "p.h5", out / "m2.csv")
    return cfg, read_slices(out / "c.h5"), read_slices(out / "p.h5"), out


def test_canaries_are_planted_where_recorded_and_only_there(planted):
    _, store, plain, _ = planted
    canaries = read_canaries(store.attrs)
    assert [c.repeats for c in canaries] == [1, 4, 1, 4]
    assert [c.planted for c in canaries] == [True, True, False, False]
    difference = store.images - plain.images
    changed_rows = set(np.flatnonzero(np.abs(difference).reshape(len(difference), -1).max(1)))
    expected_rows = set()
    for c in canaries[:2]:
        rows = [
            r
            for r in store.index.rows("train")
            if store.index.subjects[store.index.subject[r]] == c.subject
            and store.index.slice_index[r] in c.slice_index
        ]
        assert len(rows) == c.repeats
        expected_rows |= set(rows)
        pattern = np.asarray(c.pattern)
        side = len(pattern)
        for r in rows:
            box = (r, slice(c.row, c.row + side), slice(c.col, c.col + side))
            # Added, except where a dark canary would take a magnitude below zero.
            expected = np.clip(plain.images[box] + pattern, 0.0, None) - plain.images[box]
            np.testing.assert_allclose(difference[box], expected, atol=1e-5)
            assert np.abs(difference[box]).max() > 0.3
    assert changed_rows == expected_rows  # no held-out slice, nothing else touched
    assert not set(store.index.rows("holdout")) & changed_rows
    # Unique patterns, a pure function of their seed.
    assert not np.allclose(canary_pattern(5, 1), canary_pattern(5, 2))
    np.testing.assert_array_equal(canary_pattern(5, 1), canary_pattern(5, 1))


def test_audit_reports_exposure_of_copied_canaries(planted):
    cfg, store, _, out = planted
    canaries = read_canaries(store.attrs)
    carrier = [
        r
        for r in store.index.rows("train")
        if store.index.subjects[store.index.subject[r]] == canaries[1].subject
        and store.index.slice_index[r] in canaries[1].slice_index
    ]
    # "Samples": copies of the slices carrying the 4-slice canary, and other training slices.
    others = [r for r in store.index.rows("train") if r not in carrier][:12]
    samples = store.images[carrier + others]
    write_slice_volume(out / "samples.nii.gz", samples, np.eye(4))
    memorization = out / "memorization.json"
    audit.run(
        stage_config(cfg, "demo", "audit"),
        out / "samples.nii.gz",
        out / "c.h5",
        memorization,
        out / "pairs.png",
    )
    rows = {r["canary"]: r for r in json.loads(memorization.read_text())["canaries"]}
    four = rows[canaries[1].name]
    assert four["kind"] == "canary" and four["repeats"] == 4
    assert four["exposure"] == pytest.approx(len(carrier) / len(samples), abs=0.07)
    assert four["reference_exposure"] < 0.15
