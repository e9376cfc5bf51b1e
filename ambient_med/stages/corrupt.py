"""Rule `corrupt`: clean slices → measurements y = A x0, masks and operator metadata.

The output holds no clean image: pixel mode keeps only the observed pixels, k-space mode only
the acquired phase-encode lines of the slice given its subject's smooth phase
(``ambient_med.physics.acquisition``). Each mask is a pure function of (cohort seed, kind, subject,
slice), so reruns are bit-identical.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ambient_med.errors import AmbientMedError
from ambient_med.io.export import write_png_grid
from ambient_med.io.store import (
    MeasurementStore,
    read_raw_store,
    read_slices,
    write_measurements,
)
from ambient_med.physics.masks import LineMaskFunc, derive_seed, pixel_mask
from ambient_med.physics.operators import PixelMask, SingleCoilFourier
from ambient_med.stages.common import clean_images, example_keys, spread_rows

log = logging.getLogger(__name__)
KINDS = ("pixel", "kspace", "native")


def _examples(store: MeasurementStore, kind: str, path: Path, count: int = 8) -> None:
    """What training sees, for the report: zero-filled images (pixel, k-space) or, for raw
    data, log-magnitude k-space (coil root-sum-of-squares) — never a clean image."""
    rows = spread_rows(store.index.rows("train"), count)
    if kind == "native":
        kspace = np.abs(store.measurements[rows])
        tiles = np.log1p(np.sqrt((kspace**2).sum(axis=1)) * 100.0)
    else:
        mask = torch.from_numpy(store.mask[rows].astype(bool))
        y = torch.from_numpy(store.measurements[rows])
        height = y.shape[-2]
        op = PixelMask(mask[:, None]) if kind == "pixel" else SingleCoilFourier(mask, height)
        tiles = op.A_adjoint(y).square().sum(dim=1).sqrt().numpy()
    write_png_grid(path, tiles, columns=4)


def run_native(
    cfg: dict[str, Any], raw_path: Path, output: Path, examples: Path | None = None
) -> None:
    """Kind ``native``: the raw acquisition exactly as it is — A = M F S with the acquired
    line mask M and the ESPIRiT maps S of ingest. Nothing is added or removed."""
    raw = read_raw_store(raw_path)
    if len(raw.kspace) == 0:
        raise AmbientMedError(
            f"raw k-space store '{raw_path}': empty; config key "
            f"'cohorts.{cfg['cohort']['name']}.source' must be 'kspace' for corruption 'native'"
        )
    measurements = raw.kspace * raw.mask[:, None, None, :].astype(np.complex64)
    observed = float(raw.mask.mean())
    attrs = {
        "kind": "native",
        "operator": "multi_coil_sense",
        "fft": "centred orthonormal 2-D",
        "coils": int(raw.kspace.shape[1]),
        "cohort": cfg["cohort"]["name"],
        "seed": cfg["cohort"]["seed"],
        "image_size": int(raw.kspace.shape[-1]),
        "observed_fraction": observed,
        "phase_encode_axis": "last",
    }
    store = MeasurementStore(measurements, raw.mask, raw.index, attrs, maps=raw.maps)
    write_measurements(output, store)
    if examples is not None:
        _examples(store, "native", examples)
    log.info(
        "native: %d slices, %d coils, acquired fraction %.3f (acceleration %.2f)",
        len(raw.kspace),
        raw.kspace.shape[1],
        observed,
        1.0 / max(observed, 1e-9),
    )


def run(
    cfg: dict[str, Any],
    kind: str,
    slices_path: Path,
    output: Path,
    raw_path: Path | None = None,
    examples: Path | None = None,
) -> None:
    if kind not in KINDS:
        raise AmbientMedError(f"corruption kind '{kind}': expected one of {KINDS}")
    if kind == "native":
        if raw_path is None:
            raise AmbientMedError("corruption kind 'native' needs the raw k-space store (--raw)")
        run_native(cfg, raw_path, output, examples)
        return
    store = read_slices(slices_path)
    if len(store.images) == 0:
        raise AmbientMedError(
            f"slice store '{slices_path}': no image slices to corrupt (undersampled raw data "
            "can only be trained on with corruption 'native')"
        )
    seed = cfg["cohort"]["seed"]
    n, height, width = store.images.shape
    keys = example_keys(store.index.subjects, store.index.subject, store.index.slice_index)
    # K-space: each slice carries its subject's smooth phase, so no line is free (its
    # conjugate mirror is not the same information any more).
    x0 = clean_images(store, np.arange(n), kind, seed)
    settings = cfg["corrupt"][kind]
    if kind == "pixel":
        masks = np.stack(
            [
                pixel_mask((height, width), settings["p"], derive_seed(seed, kind, key))
                for key in keys
            ]
        )
        op = PixelMask(torch.from_numpy(masks)[:, None])
        attrs = {"operator": "pixel_mask", "p": settings["p"]}
        observed = masks.mean()
    else:
        func = LineMaskFunc(
            [settings["center_fraction"]], [settings["acceleration"]], settings["mask_type"]
        )
        masks = np.stack([func(width, derive_seed(seed, kind, key)) for key in keys])
        op = SingleCoilFourier(torch.from_numpy(masks), height)
        attrs = {
            "operator": "single_coil_cartesian",
            "fft": "centred orthonormal 2-D",
            "acceleration": settings["acceleration"],
            "center_fraction": settings["center_fraction"],
            "mask_type": settings["mask_type"],
            "phase_encode_axis": "last",
            "phase": "smooth random, seeded per (cohort seed, subject)",
        }
        observed = masks.mean()
    with torch.no_grad():
        measurements = op.A(x0).numpy()
    attrs |= {
        "kind": kind,
        "cohort": cfg["cohort"]["name"],
        "seed": seed,
        "image_size": height,
        "observed_fraction": float(observed),
    }
    result = MeasurementStore(measurements, masks, store.index, attrs)
    write_measurements(output, result)
    if examples is not None:
        _examples(result, kind, examples)
    log.info(
        "%s: %d slices, observed fraction %.3f (effective acceleration %.2f)",
        kind,
        n,
        observed,
        1.0 / max(observed, 1e-9),
    )
