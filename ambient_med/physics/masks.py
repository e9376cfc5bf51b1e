"""Sampling masks: 1-D Cartesian phase-encode line masks, pixel masks, and the further
corruption B of ambient training (docs/method.md).

Every mask is a pure function of an integer seed, and seeds are derived from names with
:func:`derive_seed`, so that a mask depends only on (cohort seed, subject, slice) and reruns
are bit-identical on any machine.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import torch
from monai.apps.reconstruction.transforms.array import EquispacedKspaceMask, RandomKspaceMask

MASK_TYPES = ("random", "equispaced")


def derive_seed(*parts: object) -> int:
    """A 32-bit seed from any printable parts, stable across Python runs and machines.

    Python's ``hash`` is salted per process, so it cannot be used for reproducible seeds.
    """
    text = "/".join(str(part) for part in parts)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")


class LineMaskFunc:
    """A fastMRI-style 1-D Cartesian phase-encode mask, seeded per call.

    Wraps MONAI's ``RandomKspaceMask`` / ``EquispacedKspaceMask`` (which follow
    ``fastmri/data/subsample.py``) so that a mask is a pure function of ``(num_cols, seed)``.

    Args:
        center_fractions: fraction of central (low-frequency) columns always kept.
        accelerations: undersampling factors; one (center_fraction, acceleration) pair is
            chosen per call when several are given.
        mask_type: ``"random"`` (columns kept with the probability that gives the nominal
            acceleration in expectation) or ``"equispaced"``.
    """

    def __init__(
        self,
        center_fractions: Sequence[float],
        accelerations: Sequence[float],
        mask_type: str = "random",
    ) -> None:
        if mask_type not in MASK_TYPES:
            raise ValueError(f"mask_type must be one of {MASK_TYPES}, got {mask_type!r}")
        cls = RandomKspaceMask if mask_type == "random" else EquispacedKspaceMask
        self._monai_mask = cls(
            center_fractions=list(center_fractions),
            accelerations=list(accelerations),
            spatial_dims=2,
            is_complex=True,
        )
        self.center_fractions = tuple(center_fractions)
        self.accelerations = tuple(accelerations)
        self.mask_type = mask_type

    def __call__(self, num_cols: int, seed: int) -> np.ndarray:
        """Returns a boolean mask of shape ``(num_cols,)`` over the phase-encode axis."""
        self._monai_mask.set_random_state(seed=seed)
        # MONAI draws the mask while masking k-space (coils, H, W, 2); a 1-row dummy
        # costs nothing and keeps the sampling logic MONAI's own.
        self._monai_mask(torch.zeros(1, 1, num_cols, 2))
        return self._monai_mask.mask.reshape(-1).numpy() > 0


def pixel_mask(shape: Sequence[int], p: float, seed: int) -> np.ndarray:
    """Boolean mask of ``shape`` keeping each pixel independently with probability ``1 - p``."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"pixel drop probability p must be in [0, 1), got {p}")
    return np.random.default_rng(seed).random(tuple(shape)) >= p


def acs_lines(line_mask: torch.Tensor) -> torch.Tensor:
    """The fully sampled centre (auto-calibration) lines of 1-D masks.

    Args:
        line_mask: ``(..., W)`` boolean; the centred k-space has its DC column at ``W // 2``.

    Returns:
        ``(..., W)`` boolean: the contiguous run of observed columns that contains ``W // 2``.
    """
    width = line_mask.shape[-1]
    centre = width // 2
    observed = line_mask.bool()
    idx = torch.arange(width, device=line_mask.device)
    # Distance from the centre to the first unobserved column on each side.
    missing = ~observed
    big = torch.full_like(idx, width)
    right = torch.where(missing & (idx >= centre), idx, big).amin(dim=-1, keepdim=True)
    left = torch.where(missing & (idx <= centre), idx, -torch.ones_like(idx)).amax(
        dim=-1, keepdim=True
    )
    return observed & (idx > left) & (idx < right)


def further_line_count(
    num_cols: int, num_observed: torch.Tensor, extra: float | torch.Tensor = 1.0
) -> torch.Tensor:
    """Lines that the further-corrupted operator Ã = B A keeps.

    Ã samples at acceleration R + ``extra`` where A samples at R = W / n, i.e. it keeps
    ``floor(W n / (W + extra · n))`` lines. With ``extra = 1``, the published arithmetic of
    docs/method.md: 106, 64, 45, 35 of 320 columns for R = 2, 4, 6, 8.
    """
    if isinstance(extra, float | int) and extra == 1:  # integer arithmetic, as published
        return torch.div(num_cols * num_observed, num_cols + num_observed, rounding_mode="floor")
    kept = num_cols * num_observed / (num_cols + extra * num_observed)
    return torch.floor(kept).long()


def further_kspace_mask(
    line_mask: torch.Tensor,
    generator: torch.Generator,
    extra_acceleration: tuple[float, float] = (1.0, 1.0),
) -> torch.Tensor:
    """Draws B for k-space: drops observed non-ACS lines until Ã keeps
    :func:`further_line_count` lines (never fewer than the ACS lines).

    Args:
        line_mask: ``(N, W)`` boolean mask of A.
        generator: CPU generator; the draw depends on it alone.
        extra_acceleration: ``(low, high)``: Ã samples at R + k, with k drawn uniformly in
            [low, high] per row (``train.further_acceleration``); (1, 1) is the published
            R + 1 and draws nothing for k.

    Returns:
        ``(N, W)`` boolean mask of Ã = B A (a subset of ``line_mask``).
    """
    line_mask = line_mask.bool()
    num_cols = line_mask.shape[-1]
    acs = acs_lines(line_mask)
    droppable = line_mask & ~acs
    low, high = (float(v) for v in extra_acceleration)
    extra: float | torch.Tensor = low
    if high > low:
        extra = low + (high - low) * torch.rand(line_mask.shape[0], generator=generator)
        extra = extra.to(line_mask.device)
    keep_total = further_line_count(num_cols, line_mask.sum(-1), extra)
    to_drop = (line_mask.sum(-1) - keep_total).clamp(min=0)
    to_drop = torch.minimum(to_drop, droppable.sum(-1))
    # Random scores on the CPU generator; non-droppable columns sort last.
    scores = torch.rand(line_mask.shape, generator=generator).to(line_mask.device)
    scores = torch.where(droppable, scores, torch.full_like(scores, 2.0))
    rank = scores.argsort(dim=-1).argsort(dim=-1)
    dropped = rank < to_drop.unsqueeze(-1)
    return line_mask & ~dropped


def further_pixel_mask(
    pixel_keep: torch.Tensor, delta: float, generator: torch.Generator
) -> torch.Tensor:
    """Draws B for pixel masks: keeps each observed pixel with probability ``1 - delta``.

    Args:
        pixel_keep: ``(N, 1, H, W)`` boolean mask of A.

    Returns:
        Boolean mask of Ã = B A, same shape, a subset of ``pixel_keep``.
    """
    draw = torch.rand(pixel_keep.shape, generator=generator).to(pixel_keep.device)
    return pixel_keep.bool() & (draw >= delta)


def poisson_mask(shape: tuple[int, int], acceleration: float, calib: int, seed: int) -> np.ndarray:
    """2-D variable-density Poisson-disc sampling mask (sigpy), fully sampled ``calib`` box.

    Returns:
        ``(H, W)`` boolean mask; about ``H W / acceleration`` samples.
    """
    from sigpy.mri import poisson

    mask = poisson(tuple(shape), acceleration, calib=(calib, calib), seed=seed, dtype=np.float32)
    return mask > 0
