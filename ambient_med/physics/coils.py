"""Coil sensitivity maps (ESPIRiT via sigpy) and coil combination, from ACS lines alone."""

from __future__ import annotations

import numpy as np
import sigpy as sp
from sigpy.mri.app import EspiritCalib

from ambient_med.errors import AmbientMedError


def acs_width(line_mask: np.ndarray) -> int:
    """Number of contiguous acquired columns around the centre column ``W // 2``."""
    width = line_mask.shape[-1]
    centre = width // 2
    if not line_mask[centre]:
        return 0
    left = centre
    while left > 0 and line_mask[left - 1]:
        left -= 1
    right = centre
    while right < width - 1 and line_mask[right + 1]:
        right += 1
    return right - left + 1


def espirit_maps(kspace: np.ndarray, line_mask: np.ndarray, crop: float = 0.0) -> np.ndarray:
    """ESPIRiT sensitivity maps from the fully sampled centre (ACS) of one slice.

    Only the ACS lines are passed to sigpy's ``EspiritCalib``: lines acquired outside the
    centre are zeroed first, so the maps never depend on more than the calibration data.

    Args:
        kspace: ``(coils, H, W)`` complex centred k-space (phase encoding along W).
        line_mask: ``(W,)`` boolean acquired columns.
        crop: ESPIRiT eigenvalue threshold for the support of the maps.

    Returns:
        ``(coils, H, W)`` complex64 maps (zero outside the object's support).
    """
    width = acs_width(line_mask)
    if width < 6:
        raise AmbientMedError(f"only {width} ACS lines: ESPIRiT needs at least 6")
    centre = kspace.shape[-1] // 2
    lo = centre - width // 2
    acs_only = np.zeros_like(kspace)
    acs_only[..., lo : lo + width] = kspace[..., lo : lo + width]
    kernel = min(6, width - 2)
    maps = EspiritCalib(
        acs_only.astype(np.complex64),
        calib_width=width,
        kernel_width=kernel,
        crop=crop,
        device=sp.cpu_device,
        show_pbar=False,
    ).run()
    return np.asarray(maps, dtype=np.complex64)


def sense_combine(coil_images: np.ndarray, maps: np.ndarray) -> np.ndarray:
    """Σ_c conj(S_c) x_c: ``(coils, H, W)`` → ``(H, W)`` complex (the adjoint of S)."""
    return np.sum(np.conj(maps) * coil_images, axis=0)


def rss(coil_images: np.ndarray) -> np.ndarray:
    """Root sum of squares over coils: ``(coils, H, W)`` → ``(H, W)`` magnitude."""
    return np.sqrt(np.sum(np.abs(coil_images) ** 2, axis=0))


def birdcage(coils: int, height: int, width: int) -> np.ndarray:
    """Simulated birdcage sensitivities (sigpy), normalised so that Σ_c |S_c|² = 1."""
    from sigpy.mri import birdcage_maps

    maps = birdcage_maps((coils, height, width), r=1.2).astype(np.complex64)
    return maps / np.sqrt(np.sum(np.abs(maps) ** 2, axis=0, keepdims=True))
