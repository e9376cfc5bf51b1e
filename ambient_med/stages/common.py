"""What several stages share: loading a trained model and the examples a mode sees."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ambient_med.diffusion.model import AmbientDenoiser, build_denoiser
from ambient_med.diffusion.training import TrainingSet, fixed_further_masks
from ambient_med.errors import AmbientMedError
from ambient_med.io.store import SliceStore, load_torch, read_measurements, read_slices
from ambient_med.physics.acquisition import as_channels, complex_slices
from ambient_med.physics.operators import MultiCoilSense, PixelMask, SingleCoilFourier

MODEL_FORMAT = "ambient-med/model/2"  # 2: EDM preconditioning, schedule buffer


def load_model(path: str | Path) -> tuple[AmbientDenoiser, dict[str, Any]]:
    """The EMA denoiser (eval mode) and the model file's metadata."""
    state = load_torch(path, what="model")
    if state.get("format") != MODEL_FORMAT:
        raise AmbientMedError(
            f"model '{path}': format {state.get('format')!r} is not {MODEL_FORMAT}"
        )
    net = build_denoiser(state["model"], int(state["image_channels"]), state["scheduler"])
    net.load_state_dict(state["state_dict"])
    net.eval()
    meta = {k: v for k, v in state.items() if k != "state_dict"}
    return net, meta


def spread_rows(rows: np.ndarray, limit: int) -> np.ndarray:
    """At most ``limit`` evenly spaced entries of ``rows`` (all of them when fewer)."""
    if len(rows) <= limit:
        return rows
    return rows[np.linspace(0, len(rows) - 1, limit).round().astype(int)]


def magnitude(images: torch.Tensor) -> np.ndarray:
    """``(N, C, H, W)`` real or (real, imaginary) → ``(N, H, W)`` magnitude."""
    return images.detach().square().sum(dim=1).sqrt().numpy()


def example_keys(subjects: list[str], subject: np.ndarray, slice_index: np.ndarray) -> list[str]:
    """A stable name per stored slice: its pseudonymous subject and axial index."""
    return [
        f"{subjects[v]}:{k}" for v, k in zip(subject.tolist(), slice_index.tolist(), strict=True)
    ]


def slice_identity(store: SliceStore, rows: np.ndarray) -> tuple[list[str], np.ndarray]:
    """(subject pseudonym, slice index) of the store rows ``rows``: what seeds their phase."""
    subjects = [store.index.subjects[v] for v in store.index.subject[rows]]
    return subjects, store.index.slice_index[rows]


def clean_images(store: SliceStore, rows: np.ndarray, kind: str, seed: int) -> torch.Tensor:
    """The clean images of ``rows`` in a model's layout ``(N, C, H, W)``.

    Pixel mode: the real magnitudes (1 channel). K-space kinds: the complex images the
    simulated acquisition starts from — magnitude × the subject's smooth phase — so clean
    models, evaluations and measurements all see the same objects (docs/method.md).
    """
    images = store.images[rows]
    if kind == "pixel":
        return as_channels(images)
    return as_channels(complex_slices(images, *slice_identity(store, rows), seed))


def load_examples(
    path: str | Path,
    mode: str,
    kind: str,
    split: str,
    delta: float,
    b_redraw: bool,
    seed: int,
    cohort: str = "",
    further_acceleration: tuple[float, float] = (1.0, 1.0),
) -> TrainingSet:
    """The ``split`` rows of a store as a training mode sees them (docs/method.md).

    ``clean`` reads the slice store (clean images); every other mode reads the measurement
    store of ``kind`` and never a clean image.
    """
    if mode == "clean":
        store = read_slices(path)
        rows = store.index.rows(split)
        return TrainingSet(clean_images(store, rows, kind, seed), kind, mode, delta=delta)
    meas = read_measurements(path)
    if meas.attrs.get("kind") != kind:
        raise AmbientMedError(
            f"measurement store '{path}': holds kind {meas.attrs.get('kind')!r}, config key "
            f"'cohorts.{cohort}.corruption' asks for {kind!r}"
        )
    rows = meas.index.rows(split)
    masks = torch.from_numpy(meas.mask[rows].astype(bool))
    maps = None
    if kind == "native":
        y = torch.view_as_real(torch.from_numpy(meas.measurements[rows])).float()
        maps = torch.from_numpy(meas.maps[rows])
        op = MultiCoilSense(masks, maps)
    else:
        y = torch.from_numpy(meas.measurements[rows])
        height = y.shape[-2]
        op = PixelMask(masks[:, None]) if kind == "pixel" else SingleCoilFourier(masks, height)
    if mode == "naive":
        return TrainingSet(op.A_adjoint(y), kind, mode, delta=delta)
    further = None
    if not b_redraw:
        keys = example_keys(meas.index.subjects, meas.index.subject, meas.index.slice_index)
        rows_keys = [keys[r] for r in rows]
        further = fixed_further_masks(kind, masks, rows_keys, delta, seed, further_acceleration)
    return TrainingSet(
        y,
        kind,
        mode,
        masks=masks,
        further_masks=further,
        maps=maps,
        delta=delta,
        further_acceleration=further_acceleration,
    )
