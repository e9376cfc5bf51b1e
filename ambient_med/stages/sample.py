"""Rule `sample`: prior samples with the fixed-mask sampler (docs/samplers.md) → NIfTI + PNG."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ambient_med.diffusion.model import build_ddim
from ambient_med.diffusion.samplers import sample_prior
from ambient_med.diffusion.training import inference_operator
from ambient_med.errors import AmbientMedError
from ambient_med.io.export import write_png_grid, write_slice_volume
from ambient_med.io.store import read_measurements
from ambient_med.physics.masks import derive_seed
from ambient_med.stages.common import load_model, magnitude

log = logging.getLogger(__name__)


def generate(
    net,
    meta: dict[str, Any],
    sample_cfg: dict[str, Any],
    seed: int,
    maps: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(N, C, H, W)`` prior samples, seeded; ``maps`` ``(N, coils, H, W)`` for native models."""
    size = int(meta["image_size"])
    ddim = build_ddim(meta["scheduler"], sample_cfg["steps"])

    def make_operator(batch: int, step: int):
        op_seed = derive_seed(seed, "sample-op", step)
        return inference_operator(meta, batch, size, size, op_seed, maps)

    generator = torch.Generator().manual_seed(derive_seed(seed, "sample"))
    shape = (sample_cfg["num_samples"], int(meta["image_channels"]), size, size)
    return sample_prior(
        net,
        ddim,
        make_operator,
        shape,
        generator,
        redraw_mask=sample_cfg["redraw_mask"],
        eta=sample_cfg["eta"],
    )


def coil_maps_for_sampling(measurements_path: Path, count: int, seed: int) -> torch.Tensor:
    """Coil maps of ``count`` training slices drawn by ``seed``: native models sample with the
    multi-coil operator they were trained with (maps carry coil profiles, not images)."""
    store = read_measurements(measurements_path)
    rows = store.index.rows("train")
    if store.maps is None or len(rows) == 0:
        raise AmbientMedError(f"measurement store '{measurements_path}': no coil maps")
    pick = np.random.default_rng(derive_seed(seed, "sample-maps")).choice(rows, size=count)
    return torch.from_numpy(store.maps[np.sort(pick)])


def run(
    cfg: dict[str, Any],
    model_path: Path,
    nifti_out: Path,
    grid_out: Path,
    measurements_path: Path | None = None,
) -> None:
    net, meta = load_model(model_path)
    seed = cfg["cohort"]["seed"]
    maps = None
    if meta["kind"] == "native" and meta["mode"] == "ambient" and measurements_path is not None:
        maps = coil_maps_for_sampling(measurements_path, cfg["sample"]["num_samples"], seed)
    samples = generate(net, meta, cfg["sample"], seed, maps)
    images = magnitude(samples)
    # Samples belong to no patient: a plain 1 mm grid, no scanner geometry.
    write_slice_volume(nifti_out, images, np.eye(4))
    write_png_grid(grid_out, images, columns=int(np.ceil(np.sqrt(len(images)))))
    log.info(
        "%d samples of a %s/%s model, %d DDIM steps; mean intensity %.3f",
        len(images),
        meta["mode"],
        meta["kind"],
        cfg["sample"]["steps"],
        float(images.mean()),
    )
