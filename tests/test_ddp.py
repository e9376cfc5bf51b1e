"""Data-parallel training under torchrun (gloo on CPU) computes what one process computes."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys

import pytest
import torch
from conftest import REPO, tiny_config

from ambient_med.config import stage_config, validate_config
from ambient_med.errors import AmbientMedError
from ambient_med.stages import corrupt, ingest, train

STEPS = 6
# Float32 sums over 2 shards instead of 1 batch, then 6 Adam steps: what may differ is the
# order of additions, far below these tolerances.
LOSS_RTOL = 1e-4
WEIGHT_ATOL = 1e-5


def _config() -> dict:
    # Redrawn B exercises the shared generator hardest: every rank draws all of it.
    cfg = tiny_config(train_mode="ambient", corruption="kspace")
    cfg["train"] |= {"steps": STEPS, "batch_size": 4, "checkpoint_every": 3, "b_redraw": True}
    return cfg


@pytest.fixture(scope="module")
def measurements(demo_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    cfg = _config()
    ingest.run(stage_config(cfg, "demo", "ingest"), demo_dir, out / "slices.h5", out / "m.csv")
    corrupt.run(stage_config(cfg, "demo", "corrupt"), "kspace", out / "slices.h5", out / "k.h5")
    return out / "k.h5"


def _torchrun(cfg: dict, measurements, out, processes: int) -> subprocess.CompletedProcess:
    """The train_model rule's command with train.distributed.nproc_per_node = processes."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node", str(processes), "-m", "ambient_med", "train"]
    command += ["--cohort", "demo", "--config-json", json.dumps(stage_config(cfg, "demo", "train"))]
    command += ["--threads", "2", "--input", str(measurements), "--model", str(out / "model.pt")]
    command += ["--loss-log", str(out / "loss.csv"), "--checkpoints", str(out / "checkpoints")]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO)


def _losses(path) -> list[float]:
    return [float(row["loss"]) for row in csv.DictReader(path.open())]


def _assert_same_model(a_path, b_path) -> None:
    a = torch.load(a_path, weights_only=True)
    b = torch.load(b_path, weights_only=True)
    assert a["steps"] == b["steps"] == STEPS
    for key, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][key], value, rtol=0, atol=WEIGHT_ATOL)


def test_ddp_two_gloo_processes_match_one_process(measurements, tmp_path):
    cfg = _config()
    one = tmp_path / "one"
    train.run(
        stage_config(cfg, "demo", "train"),
        measurements,
        one / "model.pt",
        one / "loss.csv",
        one / "checkpoints",
    )
    two = tmp_path / "two"
    done = _torchrun(cfg, measurements, two, 2)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "× 2 processes" in done.stderr  # it really ran data-parallel
    # Rank 0 alone writes: one loss row per step, no duplicate.
    assert [int(r["step"]) for r in csv.DictReader((two / "loss.csv").open())] == list(
        range(1, STEPS + 1)
    )
    assert _losses(two / "loss.csv") == pytest.approx(_losses(one / "loss.csv"), rel=LOSS_RTOL)
    _assert_same_model(one / "model.pt", two / "model.pt")


def test_ddp_resumes_a_checkpoint_of_another_world_size(measurements, tmp_path):
    """Interrupted after 4 steps in one process (checkpoint at 3), finished by 2 processes:
    the same model as one uninterrupted process."""
    cfg = _config()
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    stage = stage_config(cfg, "demo", "train")
    train.run(stage, measurements, straight / "model.pt", straight / "loss.csv", straight / "c")
    train.run(
        stage, measurements, resumed / "model.pt", resumed / "loss.csv", resumed / "checkpoints", 4
    )
    assert not (resumed / "model.pt").exists()
    done = _torchrun(cfg, measurements, resumed, 2)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from step 3" in done.stderr
    _assert_same_model(straight / "model.pt", resumed / "model.pt")


@pytest.mark.parametrize(
    ("distributed", "key"),
    [
        ({"nproc_per_node": 3}, "train.batch_size"),
        ({"nnodes": 2, "nproc_per_node": 2}, "train.distributed.rdzv_endpoint"),
    ],
)
def test_ddp_config_that_cannot_run_is_one_line_naming_the_key(distributed, key):
    cfg = _config()
    cfg["train"]["distributed"] = distributed
    with pytest.raises(AmbientMedError, match=rf"^config key '{re.escape(key)}': [^\n]*$"):
        validate_config(cfg)
