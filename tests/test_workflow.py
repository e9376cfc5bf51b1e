"""The Snakemake workflow itself: lint, format, dry run, and one real tiny run."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import pytest
import torch
from conftest import REPO
from PIL import Image


def _env():
    env = dict(os.environ)
    # The rules call the `ambient-med` console script installed beside this interpreter.
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


def _workdir(tmp_path: Path) -> Path:
    work = tmp_path / "wf"
    work.mkdir()
    shutil.copy(REPO / "Snakefile", work / "Snakefile")
    shutil.copytree(REPO / "config", work / "config")
    shutil.copytree(REPO / "envs", work / "envs")
    return work


def _snakemake(work: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", *args],
        cwd=work,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def test_lint_is_clean(tmp_path):
    proc = _snakemake(_workdir(tmp_path), "--lint")
    assert "Congratulations, your workflow is in a good condition!" in proc.stdout + proc.stderr


def test_snakefmt_check():
    snakefmt = shutil.which("snakefmt", path=str(Path(sys.executable).parent))
    assert snakefmt, "snakefmt is a dev dependency"
    proc = subprocess.run([snakefmt, "--check", str(REPO / "Snakefile")], capture_output=True)
    assert proc.returncode == 0, proc.stderr.decode()


def test_dry_run_lists_ingest_corrupt_train(tmp_path):
    proc = _snakemake(_workdir(tmp_path), "-n", "train")
    out = proc.stdout + proc.stderr
    for rule in ("demo_data", "ingest", "corrupt", "train_model"):
        assert f"rule {rule}:" in out
    # Clean images never reach training: train_model's only input is the k-space store.
    block = out.split("rule train_model:")[1].split("rule ")[0]
    assert "input: results/demo/corrupt/kspace.h5\n" in block


def test_bad_config_fails_with_one_line_naming_the_key(tmp_path):
    work = _workdir(tmp_path)
    (work / "bad.yaml").write_text("train:\n  steps: -3\n")
    proc = _snakemake(work, "-n", "--configfile", "bad.yaml", check=False)
    assert proc.returncode != 0
    assert "config key 'train.steps': -3 is less than the minimum of 1" in proc.stdout + proc.stderr


@pytest.mark.slow
def test_tiny_workflow_end_to_end(tmp_path):
    work = _workdir(tmp_path)
    _snakemake(work, "all", "--cores", "2", "--configfile", "config/tiny.yaml")
    results = work / "results" / "demo"
    model = torch.load(results / "train" / "model.pt", weights_only=True)
    assert model["mode"] == "ambient" and model["kind"] == "kspace" and model["steps"] == 6
    assert (results / "corrupt" / "pixel.h5").exists()
    assert nib.load(results / "sample" / "samples.nii.gz").shape == (32, 32, 4)
    with Image.open(results / "sample" / "grid.png") as grid:
        assert grid.format == "PNG"
    metrics = json.loads((results / "eval" / "metrics.json").read_text())
    assert {"x0_mse_t10", "x0_mse_t50", "mode", "steps"} <= set(metrics)
    for rule in ("ingest", "train", "sample", "evaluate"):
        assert (results / "logs" / f"{rule}.log").exists()
        assert (results / "benchmarks" / f"{rule}.tsv").exists()
    # Nothing left to do: the same config reruns nothing.
    proc = _snakemake(work, "all", "-n", "--configfile", "config/tiny.yaml")
    assert "Nothing to be done" in proc.stdout + proc.stderr
