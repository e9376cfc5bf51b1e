"""Several sites: a demo scanner that writes raw undersampled k-space, and pooled models."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import REPO, tiny_config

from ambient_med.config import stage_config, validate_config
from ambient_med.errors import AmbientMedError
from ambient_med.io.kspace import read_fastmri
from ambient_med.io.store import read_raw_store, read_slices
from ambient_med.stages import audit, corrupt, demo_data, ingest, sample, train


def test_raw_demo_cohort_is_undersampled_multicoil_kspace_only(tmp_path):
    cfg = tiny_config(source="kspace", corruption="native")
    cfg["demo"]["subjects"] = 3
    out = tmp_path / "scanner"
    demo_data.run(stage_config(cfg, "demo", "demo_data"), out)
    files = sorted(out.iterdir())
    assert [f.name for f in files] == ["scan_00.h5", "scan_01.h5", "scan_02.h5"]
    raw = read_fastmri(files[0], max_voxels=10**9)
    assert raw.kspace.ndim == 4 and raw.kspace.shape[1] == 4  # slices, coils, H, W
    lines = raw.line_mask.astype(bool)  # (slices, W): one acquisition, one mask per file
    assert (lines == lines[0]).all()
    acceleration = cfg["corrupt"]["kspace"]["acceleration"]
    assert lines[0].size / lines[0].sum() == pytest.approx(acceleration, rel=0.2)
    assert not raw.kspace[..., ~lines[0]].any() and raw.kspace[..., lines[0]].any()
    # Ingest sees a raw cohort: k-space and coil maps, and no image at all.
    slices, raw_store = tmp_path / "slices.h5", tmp_path / "raw.h5"
    ingest.run(stage_config(cfg, "demo", "ingest"), out, slices, tmp_path / "m.csv", raw_store)
    assert len(read_slices(slices).images) == 0
    assert len(read_raw_store(raw_store).kspace) > 0


def _pool_config() -> dict:
    cfg = tiny_config()
    cfg["cohorts"]["site_b"] = dict(cfg["cohorts"]["demo"]) | {"seed": 77}
    cfg["pools"] = {"consortium": {"cohorts": ["demo", "site_b"], "seed": 5}}
    return validate_config(cfg)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"cohorts": ["demo", "nowhere"]}, "no cohort named 'nowhere'"),
        ({"cohorts": ["demo"]}, "pools.consortium.cohorts"),
    ],
)
def test_pool_config_errors_name_the_key(change, message):
    cfg = _pool_config()
    cfg["pools"]["consortium"] |= change
    with pytest.raises(AmbientMedError, match=message):
        validate_config(cfg)


def test_pool_members_must_share_the_kind_of_measurement():
    cfg = _pool_config()
    cfg["cohorts"]["site_b"]["corruption"] = "pixel"
    with pytest.raises(AmbientMedError, match=r"pools.consortium.cohorts'.*corruption"):
        validate_config(cfg)


def test_pool_trains_on_every_member_and_is_audited_per_member(demo_dir, tmp_path):
    cfg = _pool_config()
    stores, training_rows = {}, {}
    for site in ("demo", "site_b"):
        folder = tmp_path / site
        ingest.run(stage_config(cfg, site, "ingest"), demo_dir, folder / "s.h5", folder / "m.csv")
        corrupt.run(stage_config(cfg, site, "corrupt"), "kspace", folder / "s.h5", folder / "k.h5")
        stores[site] = folder / "k.h5"
        training_rows[site] = len(read_slices(folder / "s.h5").index.rows("train"))
    pool = stage_config(cfg, "consortium", "train")
    data = train.load_training_set(pool, [stores["demo"], stores["site_b"]])
    assert len(data) == sum(training_rows.values())
    # Each member keeps its own split and masks: its examples are its own store's.
    alone = train.load_training_set(stage_config(cfg, "site_b", "train"), stores["site_b"])
    torch.testing.assert_close(data.targets[-len(alone) :], alone.targets)
    torch.testing.assert_close(data.further_masks[-len(alone) :], alone.further_masks)

    out = tmp_path / "consortium"
    train.run(
        pool, [stores["demo"], stores["site_b"]], out / "model.pt", out / "loss.csv", out / "ck"
    )
    model = torch.load(out / "model.pt", weights_only=True)
    assert set(model["provenance"]["inputs"]) == {"demo/k.h5", "site_b/k.h5"}
    assert model["cohort"] == "consortium" and model["seed"] == 5
    samples = out / "samples.nii.gz"
    sample.run(
        stage_config(cfg, "consortium", "sample"),
        out / "model.pt",
        samples,
        out / "grid.png",
        stores["demo"],
    )
    for site in ("demo", "site_b"):
        report = out / site / "memorization.json"
        audit.run(
            stage_config(cfg, site, "audit"),
            samples,
            tmp_path / site / "s.h5",
            report,
            out / site / "pairs.png",
            stores[site],
            "kspace",
        )
        result = json.loads(report.read_text())
        assert result["cohort"] == site and result["n_train"] == training_rows[site]
        assert {r["control"] for r in result["controls"]} >= {"exact", "holdout"}


def test_multisite_example_plans_every_site_and_the_pool(tmp_path):
    work = tmp_path / "wf"
    work.mkdir()
    shutil.copy(REPO / "Snakefile", work / "Snakefile")
    for folder in ("config", "envs"):
        shutil.copytree(REPO / folder, work / folder)
    command = [sys.executable, "-m", "snakemake", "all", "-n", "--configfile"]
    command += ["config/multisite.yaml"]
    done = subprocess.run(command, cwd=work, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout + done.stderr
    for site in ("demo", "masked", "scanner", "second_site", "consortium"):
        assert f"results/{site}/train/model.pt" in out
    assert "results/scanner/corrupt/native.h5" in out
    for site in ("demo", "second_site"):
        assert f"results/consortium/eval/{site}/memorization.json" in out
    # The pool's training job reads both members' stores and nothing else.
    block = out.split("wildcards: cohort=consortium")[0].rsplit("rule train_model:", 1)[1]
    inputs = block.split("input:")[1].split("\n")[0].strip()
    assert sorted(inputs.split(", ")) == [
        "results/demo/corrupt/kspace.h5",
        "results/second_site/corrupt/kspace.h5",
    ]
