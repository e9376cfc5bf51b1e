"""The Snakemake workflow itself: lint, format, dry run, and one real tiny run."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
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


def _snakemake(
    work: Path, *args: str, check: bool = True, env: dict | None = None
) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", *args],
        cwd=work,
        env=env or _env(),
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


def test_ddp_rule_runs_under_torchrun_and_asks_for_the_gpus(tmp_path):
    work = _workdir(tmp_path)
    distributed = {"nproc_per_node": 4, "nnodes": 1}
    (work / "ddp.yaml").write_text(
        yaml.safe_dump({"train": {"device": "cuda", "distributed": distributed}})
    )
    proc = _snakemake(work, "train", "-n", "-p", "--configfile", "config/config.yaml", "ddp.yaml")
    out = proc.stdout + proc.stderr
    block = out.split("rule train_model:")[1].split("rule ")[0]
    assert "torchrun --nnodes 1 --nproc-per-node 4 --standalone -m ambient_med train" in out
    assert "gpu=4" in block


def test_bad_config_fails_with_one_line_naming_the_key(tmp_path):
    work = _workdir(tmp_path)
    (work / "bad.yaml").write_text("train:\n  steps: -3\n")
    proc = _snakemake(work, "-n", "--configfile", "bad.yaml", check=False)
    assert proc.returncode != 0
    assert "config key 'train.steps': -3 is less than the minimum of 1" in proc.stdout + proc.stderr


def _screenshot(page: Path, out: Path) -> None:
    """Opens the report in headless Chromium (when installed) and checks it rendered."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (.ci/run installs it)")
    subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={out.parent / 'chromium-profile'}",
            "--window-size=1280,900",
            "--virtual-time-budget=8000",
            f"--screenshot={out}",
            page.as_uri(),
        ],
        capture_output=True,
        timeout=180,
        check=True,
    )
    with Image.open(out) as shot:
        pixels = np.asarray(shot.convert("L"))
    # The page drew something — the navigation pane, its text, the workflow graph — and is not
    # a blank canvas (a blank or error page is near-uniform white).
    assert pixels.std() > 10 and (pixels < 128).mean() > 0.005


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
    assert metrics["recon_diffusion_dc_R4_psnr"] > 0 and metrics["recon_cs_l1_R4_ssim"] > 0
    import pydicom

    files = results / "reconstruct" / "files"
    assert any(files.glob("*_R4_diffusion_dc.nii.gz"))
    dicom = next(files.glob("*_dicom"))
    assert pydicom.dcmread(next(dicom.iterdir())).ImageType[0] == "DERIVED"
    with Image.open(files / "panel_R4.png") as panel:
        assert panel.format == "PNG"
    memorization = json.loads((results / "eval" / "memorization.json").read_text())
    assert {"threshold", "frac_above", "q99", "controls_passed"} <= set(memorization)
    controls = {row["control"] for row in memorization["controls"]}
    assert controls == {"exact", "shift1", "shift2", "noise", "blur"} | {
        "holdout",
        "silhouette",
        "blurred_mean",
    }
    assert "gen_frechet_random_features" in metrics
    for png in (
        "corrupt/kspace_examples.png",
        "train/loss.png",
        "eval/closest_pairs.png",
        "eval/audit_histogram.png",
    ):
        with Image.open(results / png) as picture:
            assert picture.format == "PNG"
    bundle = results / "bundle"
    for part in ("configs/inference.json", "configs/metadata.json", "models/model.pt"):
        assert (bundle / part).is_file(), part
    assert (bundle / "example" / "scan.h5").is_file()
    report = _snakemake(work, "--report", "report.html", "--configfile", "config/tiny.yaml")
    assert report.returncode == 0
    html = (work / "report.html").read_text(errors="replace")
    for section in (
        "What training saw",
        "Training",
        "Samples",
        "Reconstruction",
        "Memorization audit",
        "Metrics",
        "Provenance",
    ):
        assert section in html, section
    # Every figure is embedded (the report is one self-contained file).
    for figure in (
        "kspace_examples.png",
        "loss.png",
        "grid.png",
        "panel_R4.png",
        "closest_pairs.png",
        "audit_histogram.png",
    ):
        assert figure in html, figure
    _screenshot(work / "report.html", tmp_path / "report.png")
    for rule in ("ingest", "train", "sample", "reconstruct", "audit", "evaluate"):
        assert (results / "logs" / f"{rule}.log").exists()
        assert (results / "benchmarks" / f"{rule}.tsv").exists()
    # Nothing left to do: the same config reruns nothing.
    proc = _snakemake(work, "all", "-n", "--configfile", "config/tiny.yaml")
    assert "Nothing to be done" in proc.stdout + proc.stderr


IDENTITIES = [
    {
        "PatientName": "Smithson^Alicia^Q",
        "PatientID": "MRN-99812-ZX",
        "PatientBirthDate": "19761231",
        "InstitutionName": "Saint Elsewhere Hospital",
    },
    {
        "PatientName": "Okonkwo^Benedikt",
        "PatientID": "MRN-55170-QW",
        "PatientBirthDate": "19590704",
        "InstitutionName": "Saint Elsewhere Hospital",
    },
]


def _identity_cohort(root: Path) -> Path:
    """Two patients' series with known identifiers, plus one broken series of a third."""
    import pydicom

    from ambient_med.io.demo import load_template, pseudo_subject, write_dicom_series

    template, affine = load_template(4.0)
    folder = root / "pacs_export"
    for s, identity in enumerate(IDENTITIES):
        volume = pseudo_subject(template, 77 + s, 4.0)
        write_dicom_series(folder / f"study{s}", volume, affine, 10 + s, 5, identity)
    broken = {**IDENTITIES[0], "PatientID": "MRN-31337-BR", "PatientName": "Brokenfield^Carl"}
    write_dicom_series(folder / "study2", pseudo_subject(template, 79, 4.0), affine, 12, 5, broken)
    victim = sorted((folder / "study2").iterdir())[3]
    ds = pydicom.dcmread(victim)
    ds.Rows = ds.Rows - 1
    ds.PixelData = ds.PixelData[: ds.Rows * ds.Columns * 2]
    ds.save_as(victim)
    return folder


def test_no_identifier_reaches_outputs_logs_or_errors(tmp_path):
    work = _workdir(tmp_path)
    folder = _identity_cohort(tmp_path)
    (work / "site.yaml").write_text(
        f"cohorts:\n  site:\n    input: {folder}\n    holdout_subjects: 1\n"
    )
    targets = ["results/site/corrupt/kspace.h5", "results/site/ingest/manifest.csv"]
    args = [*targets, "--cores", "2", "--configfile", "config/tiny.yaml", "site.yaml"]

    # Without a site secret: a one-line refusal, and still no identifier anywhere.
    env = _env()
    env.pop("AMBIENT_MED_SITE_SECRET", None)
    env.pop("AMBIENT_MED_SITE_SECRET_FILE", None)
    failed = _snakemake(work, *args, check=False, env=env)
    assert failed.returncode != 0
    log = (work / "results" / "site" / "logs" / "ingest.log").read_text()
    assert log.strip().splitlines()[-1].startswith("ambient-med ingest: error: no site secret")

    env["AMBIENT_MED_SITE_SECRET"] = "a-site-secret-kept-outside-results"
    ok = _snakemake(work, *args, env=env)
    manifest = (work / "results" / "site" / "ingest" / "manifest.csv").read_text()
    assert "series refused: slices of different sizes" in manifest
    assert manifest.count(",ingested,") == 2 * len(list((folder / "study0").iterdir()))

    tokens = set()
    for identity in [*IDENTITIES, {"PatientID": "MRN-31337-BR", "PatientName": "Brokenfield^Carl"}]:
        for value in identity.values():
            tokens.add(value)
            tokens.update(part for part in value.split("^") if len(part) > 3)
    tokens.update({"Elsewhere", "1976-12-31", "19761231"})
    haystacks = {"stdout/stderr": (failed.stdout + failed.stderr + ok.stdout + ok.stderr).encode()}
    for root in (work / "results", work / ".snakemake" / "log"):
        for path in root.rglob("*"):
            if path.is_file():
                haystacks[str(path.relative_to(work))] = path.read_bytes()
    assert len(haystacks) > 8
    for where, blob in haystacks.items():
        for token in tokens:
            assert token.encode() not in blob, f"{token!r} found in {where}"
