"""Rule `corrupt`: clean slices → measurements y = A x0, masks and operator metadata.

The output holds no clean image: pixel mode keeps only the observed pixels, k-space mode only
the acquired phase-encode lines. Each mask is a pure function of (cohort seed, kind, subject,
slice), so reruns are bit-identical.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ambient_med.diffusion.training import to_image_channels
from ambient_med.errors import AmbientMedError
from ambient_med.io.store import MeasurementStore, read_slices, write_measurements
from ambient_med.physics.masks import LineMaskFunc, derive_seed, pixel_mask
from ambient_med.physics.operators import PixelMask, SingleCoilFourier

log = logging.getLogger(__name__)
KINDS = ("pixel", "kspace")


def example_keys(subjects: list[str], subject: np.ndarray, slice_index: np.ndarray) -> list[str]:
    """A stable name per stored slice: its pseudonymous subject and axial index."""
    return [
        f"{subjects[v]}:{k}" for v, k in zip(subject.tolist(), slice_index.tolist(), strict=True)
    ]


def run(cfg: dict[str, Any], kind: str, slices_path: Path, output: Path) -> None:
    if kind not in KINDS:
        raise AmbientMedError(f"corruption kind '{kind}': expected one of {KINDS}")
    store = read_slices(slices_path)
    seed = cfg["cohort"]["seed"]
    n, height, width = store.images.shape
    keys = example_keys(store.index.subjects, store.index.subject, store.index.slice_index)
    x0 = to_image_channels(store.images, kind)
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
    write_measurements(output, MeasurementStore(measurements, masks, store.index, attrs))
    log.info(
        "%s: %d slices, observed fraction %.3f (effective acceleration %.2f)",
        kind,
        n,
        observed,
        1.0 / max(observed, 1e-9),
    )
