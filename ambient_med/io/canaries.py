"""Planted canaries: unique synthetic lesions put into chosen training slices before any
corruption, so that an audit can ask how often a model reproduces each one (the canary
method of Carlini et al., "The Secret Sharer", brought to images).

A canary is a small textured blob, unique to its seed, added at one place in ``repeats``
consecutive slices of one training subject (1, 4 and 16 by default: rare to common). Reference
canaries are made the same way and given places too, but never planted: their exposure is the
chance level a model reaches without having seen them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np
from scipy import ndimage

from ambient_med.errors import AmbientMedError
from ambient_med.io.store import SliceStore
from ambient_med.physics.masks import derive_seed

# Additive amplitude, in the slice store's units (a foreground percentile of each volume is 1).
AMPLITUDE = 0.6
# Foreground level a canary's whole box must lie above, in every slice that carries it.
FOREGROUND = 0.25


@dataclass
class PlantedCanary:
    """One canary: its pattern, its place, and where it was planted (nowhere for a
    reference canary)."""

    name: str
    repeats: int
    row: int
    col: int
    pattern: list[list[float]]
    planted: bool
    subject: str = ""
    slice_index: list[int] | None = None


def canary_pattern(size: int, seed: int) -> np.ndarray:
    """``(size, size)`` float32: smoothed noise inside a disc, peak |value| = :data:`AMPLITUDE`,
    a seeded sign (bright or dark lesion)."""
    rng = np.random.default_rng(seed)
    texture = ndimage.gaussian_filter(rng.standard_normal((size, size)), 0.8)
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
    disc = np.clip((size / 2) - np.sqrt(yy**2 + xx**2), 0.0, 1.0)
    blob = (np.abs(texture) + 0.5) * disc
    sign = 1.0 if rng.random() < 0.5 else -1.0
    return (sign * AMPLITUDE * blob / blob.max()).astype(np.float32)


def _place(images: np.ndarray, size: int, rng: np.random.Generator) -> tuple[int, int] | None:
    """A top-left corner whose ``size``² box is foreground in every one of ``images``."""
    inside = (images > FOREGROUND).all(axis=0)
    # Box sums by an integral image: the box must be all foreground.
    box = ndimage.uniform_filter(inside.astype(np.float32), size, mode="constant")
    offset = size // 2
    valid = np.argwhere(box[offset : inside.shape[0] - size + offset + 1, offset:] > 0.999)
    valid = valid[valid[:, 1] <= inside.shape[1] - size]
    if not len(valid):
        return None
    row, col = valid[rng.integers(len(valid))]
    return int(row), int(col)


def plant_canaries(
    store: SliceStore, repeats: Sequence[int], seed: int, size: int | None = None
) -> tuple[SliceStore, list[PlantedCanary]]:
    """Plants one canary per entry of ``repeats`` into training slices; also draws as many
    reference canaries (never planted).

    Args:
        store: the clean slice store (before corruption).
        repeats: consecutive slices carrying each canary, e.g. ``[1, 4, 16]``.
        seed: the cohort seed; every choice derives from it.
        size: canary side in pixels (default: an eighth of the slice, at least 7).

    Returns:
        (the store with the canaries added, planted + reference canaries).
    """
    images = store.images.copy()
    side = size or max(7, images.shape[-1] // 8)
    rng = np.random.default_rng(derive_seed(seed, "canaries"))
    train_rows = store.index.rows("train")
    subjects = np.unique(store.index.subject[train_rows])
    if not len(subjects):
        raise AmbientMedError("canaries: the cohort has no training subject to plant them in")
    canaries: list[PlantedCanary] = []
    for number, (count, planted) in enumerate(
        [(r, True) for r in repeats] + [(r, False) for r in repeats]
    ):
        subject = int(subjects[number % len(subjects)])
        rows = train_rows[store.index.subject[train_rows] == subject]
        rows = rows[np.argsort(store.index.slice_index[rows])]
        if len(rows) < count:
            raise AmbientMedError(
                f"canaries: {count} repeats asked, a training subject has only {len(rows)} slices"
            )
        # Consecutive slices around the subject's largest cross-section.
        area = (images[rows] > FOREGROUND).sum(axis=(1, 2))
        start = int(np.clip(np.argmax(area) - count // 2, 0, len(rows) - count))
        chosen = rows[start : start + count]
        where = _place(images[chosen], side, rng)
        if where is None:
            raise AmbientMedError(f"canaries: no {side}-pixel place inside the head")
        pattern = canary_pattern(side, derive_seed(seed, "canary", number))
        row, col = where
        if planted:
            images[chosen, row : row + side, col : col + side] += pattern
        canaries.append(
            PlantedCanary(
                name=f"{'canary' if planted else 'reference'}{number:02d}",
                repeats=count,
                row=row,
                col=col,
                pattern=pattern.tolist(),
                planted=planted,
                subject=store.index.subjects[subject] if planted else "",
                slice_index=store.index.slice_index[chosen].tolist() if planted else None,
            )
        )
    attrs = dict(store.attrs) | {"canaries": canaries_json(canaries)}
    return replace(store, images=np.clip(images, 0.0, None), attrs=attrs), canaries


def canaries_json(canaries: Sequence[PlantedCanary]) -> str:
    return json.dumps([asdict(c) for c in canaries])


def read_canaries(attrs: dict) -> list[PlantedCanary]:
    """The canaries recorded in a slice store's attributes (none when absent)."""
    text = attrs.get("canaries")
    if not text:
        return []
    return [PlantedCanary(**entry) for entry in json.loads(text)]
