"""The MONAI bundle: written from a trained model, run with MONAI's own command."""

import json
import subprocess
import sys

import h5py
import nibabel as nib
import numpy as np
import torch
from conftest import tiny_config
from monai.bundle import ConfigParser

from ambient_med.config import stage_config
from ambient_med.io.kspace import read_raw
from ambient_med.stages import bundle, corrupt, ingest, train


def test_bundle_runs_with_monai_bundle_run(demo_dir, tmp_path):
    cfg = tiny_config()
    cfg["reconstruct"] |= {"samplers": ["dc", "one_step"], "steps": 3}
    slices, measurements = tmp_path / "s.h5", tmp_path / "k.h5"
    ingest.run(stage_config(cfg, "demo", "ingest"), demo_dir, slices, tmp_path / "m.csv")
    corrupt.run(stage_config(cfg, "demo", "corrupt"), "kspace", slices, measurements)
    model = tmp_path / "model.pt"
    paths = (model, tmp_path / "loss.csv", tmp_path / "ck")
    train.run(stage_config(cfg, "demo", "train"), measurements, *paths)
    root = tmp_path / "bundle"
    bundle.run(stage_config(cfg, "demo", "bundle"), model, root)
    for part in ("configs/metadata.json", "configs/inference.json", "docs/README.md"):
        assert (root / part).is_file(), part
    metadata = json.loads((root / "configs" / "metadata.json").read_text())
    assert {"version", "monai_version", "network_data_format", "task"} <= set(metadata)

    # The state dict loads with weights_only into the bundle's own network_def.
    parser = ConfigParser()
    parser.read_config(root / "configs" / "inference.json")
    parser["bundle_root"] = str(root)
    net = parser.get_parsed_content("network_def")
    state = torch.load(root / "models" / "model.pt", weights_only=True)
    net.load_state_dict(state)
    original = torch.load(model, weights_only=True)["state_dict"]
    assert all(torch.equal(state[k], original[k]) for k in original)

    command = [sys.executable, "-m", "monai.bundle", "run", "--bundle_root", str(root)]
    command += ["--config_file", str(root / "configs" / "inference.json")]
    command += ["--meta_file", str(root / "configs" / "metadata.json")]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    output = root / "output"
    dc = nib.load(output / "new000_diffusion_dc.nii.gz")
    zero_filled = np.asarray(nib.load(output / "new000_zero_filled.nii.gz").dataobj)
    assert dc.shape == zero_filled.shape == (32, 32, bundle.EXAMPLE_SLICES)
    assert np.isfinite(np.asarray(dc.dataobj)).all()
    assert (output / "panel_new000.png").is_file()
    # The example is an undersampled acquisition, not a full scan.
    raw = read_raw(root / "example" / "scan.h5", 10**10)
    assert 0.15 < raw.line_mask.mean() < 0.5
    with h5py.File(root / "example" / "scan.h5") as handle:
        assert "reconstruction_rss" not in handle
