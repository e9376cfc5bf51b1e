"""The reconstruction benchmark's short version writes the rows its contract promises."""

import json
import sys

import numpy as np
from conftest import REPO


def test_reconstruction_benchmark_short_run_writes_the_contract(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import reconstruction
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    argv = ["--short", "--workdir", str(tmp_path / "work"), "--results", str(tmp_path / "out")]
    argv += ["--seeds", "0", "1", "--modes", "ambient", "naive", "--slices-per-volume", "2"]
    argv += ["--accelerations", "4", "--samplers", "dc", "--inference-masks", "fresh"]
    argv += ["--steps", "4", "--curve-steps", "2", "--threads", "1"]
    path = reconstruction.main(argv)
    rows = json.loads(path.read_text())["rows"]
    keys = {"method", "train_mode", "corruption", "sampler", "R", "p", "coils", "seeds"}
    keys |= {"volumes", "psnr", "psnr_ci95", "ssim", "ssim_fg", "nrmse", "seconds_per_slice"}
    assert all(set(row) == keys for row in rows)
    by = {(r["method"], r["train_mode"], r["sampler"]): r for r in rows}
    assert by[("zero_filled", "", "")]["seeds"] == 1
    ambient = by[("diffusion", "ambient", "dc")]
    assert ambient["seeds"] == 2 and ambient["volumes"] == 2 and ambient["corruption"] == "kspace"
    low, high = ambient["psnr_ci95"]
    assert low <= ambient["psnr"] <= high
    assert ("diffusion", "ambient", "dc:fresh") in by
    # The paired difference is the difference of the two means.
    diff = by[("difference", "ambient-naive", "dc")]
    naive = by[("diffusion", "naive", "dc")]
    assert np.isclose(diff["psnr"], ambient["psnr"] - naive["psnr"], atol=2e-3)
    # Resumable: a second run trains nothing new and reproduces the same rows.
    again = json.loads(reconstruction.main(argv).read_text())["rows"]
    assert again == rows
    curve = json.loads((tmp_path / "out" / "reconstruction_curve.json").read_text())["rows"]
    assert {(r["train_mode"], r["step"]) for r in curve} >= {("ambient", 2), ("ambient", 4)}
