"""Rule `bundle`: the cohort's model as a MONAI bundle, usable outside this workflow.

    results/{cohort}/bundle/
      configs/metadata.json    MONAI bundle metadata (versions, task, data formats)
      configs/inference.json   network_def, the sampler settings, pre/post-processing, run
      models/model.pt          the network's state dict (torch.load(weights_only=True))
      docs/README.md           what the model is, how it was trained, how to run it
      example/scan.h5          a small synthetic undersampled 4-coil acquisition (fastMRI HDF5)

    python -m monai.bundle run --bundle_root B --config_file B/configs/inference.json \
        --meta_file B/configs/metadata.json

reconstructs every raw k-space file of ``input_dir`` (default: the bundled example) into
``output_dir`` (default: ``B/output``) exactly as ``reconstruct.input`` does in the workflow:
centre crop, ESPIRiT maps from the ACS lines, the ACS-based scaling (pre-processing), then
zero-filled, CS and the diffusion samplers, written as NIfTI, a derived DICOM series and a
PNG panel (post-processing). The example is synthesised from the demo generator, never from
the cohort's scans: a bundle may leave the hospital, its example must hold no patient's data.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import monai
import numpy as np
import torch

from ambient_med import __version__
from ambient_med.diffusion.model import build_ddpm
from ambient_med.io.demo import (
    load_template,
    simulate_multicoil_kspace,
    synthesize_subject,
    write_fastmri,
)
from ambient_med.io.store import save_torch
from ambient_med.physics.masks import LineMaskFunc, derive_seed
from ambient_med.stages.common import load_model
from ambient_med.stages.reconstruct import reconstruct_new_files

log = logging.getLogger(__name__)

EXAMPLE_SLICES = 2
EXAMPLE_COILS = 4


def network_def(meta: dict[str, Any]) -> dict[str, Any]:
    """MONAI config of the network: the denoiser class and its arguments."""
    model = meta["model"]
    return {
        "_target_": "ambient_med.diffusion.model.AmbientDenoiser",
        "image_channels": int(meta["image_channels"]),
        "channels": list(model["channels"]),
        "attention_levels": list(model["attention_levels"]),
        "num_res_blocks": int(model["num_res_blocks"]),
        "norm_num_groups": int(model["norm_num_groups"]),
        "num_head_channels": int(model["num_head_channels"]),
        "alphas_cumprod": "$torch.tensor(@alphas_cumprod)",
        "preconditioning": model.get("preconditioning", "none"),
        "sigma_data": float(model.get("sigma_data", 0.5)),
    }


def inference_config(meta: dict[str, Any], cfg: dict[str, Any]) -> dict[str, Any]:
    """configs/inference.json: MONAI's conventional keys around the project's functions."""
    rc = {k: v for k, v in cfg["reconstruct"].items() if k != "input"}
    model_meta = {k: v for k, v in meta.items() if k not in ("provenance", "format")}
    return {
        "imports": [
            "$import pathlib",
            "$import torch",
            "$import monai",
            "$import ambient_med.stages.reconstruct",
        ],
        "bundle_root": ".",
        "input_dir": "$@bundle_root + '/example'",
        "output_dir": "$@bundle_root + '/output'",
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "scheduler": meta["scheduler"],
        # ᾱ_t of that schedule, which the preconditioning reads (float32 values, exact).
        "alphas_cumprod": build_ddpm(meta["scheduler"]).alphas_cumprod.tolist(),
        "network_def": network_def(meta),
        "network": "$@network_def.to(@device)",
        "checkpoint": "$torch.load(@bundle_root + '/models/model.pt', weights_only=True)",
        # What the model was trained on; the sampler needs it (mode, kind, Ã_inf, size).
        "model_meta": model_meta,
        # The inferer: the samplers and their settings (docs/README.md lists them).
        "inferer": {
            "reconstruct": rc,
            "ingest": {k: cfg["ingest"][k] for k in ("intensity_percentile", "intensity_band")},
            "cohort": {"seed": int(cfg["cohort"]["seed"])},
        },
        "preprocessing": (
            "centre crop to image_size, ESPIRiT coil maps from the ACS lines, k-space scaled "
            "by the ACS image (ambient_med.io.kspace.fit_kspace / calibrate)"
        ),
        "postprocessing": "magnitude; NIfTI per method, derived DICOM series, PNG panel",
        "initialize": [
            "$monai.utils.set_determinism(seed=@inferer#cohort#seed)",
            "$@network.load_state_dict(@checkpoint)",
            "$@network.eval()",
        ],
        # MONAI evaluates expressions with torch, numpy and monai in scope; the project's
        # entry point is reached through monai's optional_import.
        "reconstructor": "$monai.utils.optional_import('ambient_med.stages.bundle')[0].infer",
        "run": ["$@reconstructor(@network, @model_meta, @inferer, @input_dir, @output_dir)"],
    }


def infer(
    network: torch.nn.Module,
    model_meta: dict[str, Any],
    settings: dict[str, Any],
    input_dir: str | Path,
    output_dir: str | Path,
) -> int:
    """The bundle's ``run``: every raw k-space file of ``input_dir`` reconstructed into
    ``output_dir`` as ``reconstruct.input`` does (on the CPU; DPS needs gradients)."""
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    with torch.enable_grad():
        reports = reconstruct_new_files(
            network.cpu(), model_meta, settings, Path(input_dir), output
        )
    return len(reports)


def metadata(meta: dict[str, Any], cfg: dict[str, Any]) -> dict[str, Any]:
    size = int(meta["image_size"])
    return {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/"
        "0.8.1/meta_schema_20220324.json",
        "version": __version__,
        "changelog": {__version__: "written by ambient-med's bundle rule"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "optional_packages_version": {"ambient-med": __version__},
        "name": f"ambient-med {meta['mode']} {meta['kind']} prior ({cfg['cohort']['name']})",
        "task": "MRI reconstruction of undersampled Cartesian k-space with a diffusion prior",
        "description": (
            f"A {meta['mode']} diffusion model trained by ambient-med on "
            f"{meta['kind']}-corrupted data only ({int(meta['steps'])} steps)."
        ),
        "authors": "ambient-med",
        "copyright": "the cohort's owner; the example is synthetic (ICBM 2009a derived)",
        "network_data_format": {
            "inputs": {
                "kspace": {
                    "type": "kspace",
                    "format": "fastMRI HDF5 (slices, coils, H, W) complex64, optional mask",
                    "num_channels": 2,
                    "spatial_shape": [size, size],
                    "dtype": "complex64",
                    "value_range": [],
                    "is_patch_data": False,
                    "channel_def": {"0": "real", "1": "imaginary"},
                }
            },
            "outputs": {
                "image": {
                    "type": "image",
                    "format": "magnitude",
                    "num_channels": 1,
                    "spatial_shape": [size, size],
                    "dtype": "float32",
                    "value_range": [],
                    "is_patch_data": False,
                    "channel_def": {"0": "magnitude"},
                }
            },
        },
    }


def write_example(path: Path, size: int, seed: int) -> None:
    """A synthetic undersampled 4-coil acquisition at the model's size (R = 4)."""
    tissues, _ = load_template(4.0)
    volume = synthesize_subject(tissues, derive_seed(seed, "bundle-example"), 4.0)[0]
    middle = volume.shape[2] // 2
    slices = []
    for k in range(EXAMPLE_SLICES):
        plane = volume[:, :, middle + 2 * k].T[::-1]
        side = max(plane.shape)
        square = np.zeros((side, side), np.float32)
        square[: plane.shape[0], : plane.shape[1]] = plane
        resized = torch.nn.functional.interpolate(
            torch.from_numpy(square)[None, None], size=(size, size), mode="bilinear"
        )[0, 0].numpy()
        slices.append(resized / np.percentile(resized, 99.5))
    kspace = simulate_multicoil_kspace(np.stack(slices), EXAMPLE_COILS, seed)
    # At least 8 ACS lines: ESPIRiT calibrates the coil maps on them.
    acs = max(0.08, 8 / size)
    mask = LineMaskFunc([acs], [4], "random")(size, derive_seed(seed, "bundle-mask"))
    write_fastmri(path, kspace, mask)


def readme(meta: dict[str, Any], cfg: dict[str, Any]) -> str:
    rc = cfg["reconstruct"]
    return f"""# {metadata(meta, cfg)["name"]}

A MONAI bundle written by ambient-med. The network (`configs/inference.json`, `network_def`)
is a MONAI `DiffusionModelUNet` with EDM preconditioning, trained as a `{meta["mode"]}`
model on `{meta["kind"]}` data for {int(meta["steps"])} steps; it never saw a fully sampled
image unless the mode is `clean`. `models/model.pt` is its state dict
(`torch.load(..., weights_only=True)`).

Run it on the bundled synthetic example (or set `input_dir` to a folder of fastMRI HDF5 /
ISMRMRD files of the same contrast and size):

    python -m monai.bundle run --bundle_root . --config_file configs/inference.json \\
        --meta_file configs/metadata.json

It writes, under `output_dir`, for every file: zero-filled, L1-wavelet CS and the diffusion
samplers {", ".join(rc["samplers"])} ({rc["steps"]} steps, network operator
`{rc["inference_mask"]}`, {rc["posterior_samples"]} posterior sample(s)) as NIfTI volumes,
a derived DICOM series of the first sampler and a PNG panel. Every diffusion reconstruction
ends data-consistent: it agrees with the acquired k-space on every acquired sample.

The example holds no patient data: it is synthesised from the ICBM 2009a template (Copyright
(C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre, Montreal Neurological Institute,
McGill University).
"""


def run(cfg: dict[str, Any], model_path: Path, out_dir: Path) -> None:
    net, meta = load_model(model_path)
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.part")
    if tmp.exists():
        shutil.rmtree(tmp)
    for folder in ("configs", "models", "docs", "example"):
        (tmp / folder).mkdir(parents=True)
    save_torch(tmp / "models" / "model.pt", net.state_dict())
    (tmp / "configs" / "inference.json").write_text(
        json.dumps(inference_config(meta, cfg), indent=2) + "\n"
    )
    (tmp / "configs" / "metadata.json").write_text(json.dumps(metadata(meta, cfg), indent=2) + "\n")
    (tmp / "docs" / "README.md").write_text(readme(meta, cfg))
    write_example(tmp / "example" / "scan.h5", int(meta["image_size"]), cfg["cohort"]["seed"])
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    log.info("bundle written to %s", out_dir)
