"""Volumes → normalised, square, resized axial slices."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def robust_scale(volume: np.ndarray, percentile: float) -> float:
    """Intensity that maps to 1.0: ``percentile`` of the voxels above 5 % of the maximum.

    A percentile of the foreground, not the maximum, so that a few hot voxels (vessels,
    artefacts) do not darken the whole volume.
    """
    finite = volume[np.isfinite(volume)]
    peak = float(finite.max()) if finite.size else 0.0
    if peak <= 0:
        return 0.0
    foreground = finite[finite > 0.05 * peak]
    return float(np.percentile(foreground, percentile))


def band_columns(width: int, band: float) -> np.ndarray:
    """``(width,)`` bool: the central ``round(band · width)`` k-space columns (at least one),
    the DC column at ``width // 2`` as in the centred FFT."""
    count = max(1, int(round(band * width)))
    columns = np.zeros(width, dtype=bool)
    start = width // 2 - count // 2
    columns[start : start + count] = True
    return columns


def band_image(images: np.ndarray, band: float) -> np.ndarray:
    """``|images|`` low-passed to the central ``band`` of phase-encode (last-axis) k-space
    columns: what an acquisition's central lines alone show. ``(..., H, W)`` real or complex."""
    kspace = np.fft.fftshift(np.fft.fft(np.fft.ifftshift(images, axes=-1), axis=-1), axes=-1)
    kspace[..., ~band_columns(images.shape[-1], band)] = 0
    return np.abs(np.fft.fftshift(np.fft.ifft(np.fft.ifftshift(kspace, axes=-1), axis=-1), axes=-1))


def intensity_scale(images: np.ndarray, percentile: float, band: float) -> float:
    """The one intensity convention of everything that reaches the network: a volume is
    divided by the ``percentile`` of the foreground of its :func:`band_image` — the image of
    its central ``band`` of k-space columns (``ingest.intensity_band``).

    Image volumes (DICOM, NIfTI) and raw k-space files of the same scan get the same number:
    an undersampled acquisition holds those central lines too (its auto-calibration lines), so
    the scale never needs a full image — and a fully sampled image is not scaled by a
    statistic that an undersampled scan of it could not reproduce.

    Args:
        images: ``(S, H, W)`` slices of one volume, real magnitudes or complex.
    """
    return robust_scale(band_image(np.asarray(images), band), percentile)


def axial_slices(
    volume: np.ndarray,
    affine: np.ndarray,
    image_size: int,
    percentile: float,
    min_foreground_fraction: float,
    band: float = 0.08,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Normalised axial slices of a canonical (RAS) volume.

    Each axial plane ``volume[:, :, k]`` (X = right, Y = anterior) is zero-padded to a centred
    square and resized to ``image_size`` with an anti-aliased bilinear filter; the resized
    volume is divided by :func:`intensity_scale`; planes whose foreground (> 0.1 after scaling)
    covers less than ``min_foreground_fraction`` of the square are dropped.

    Args:
        volume: ``(X, Y, Z)`` float array in canonical RAS orientation.
        affine: its ``(4, 4)`` voxel → RAS affine.

    Returns:
        ``slices (K, image_size, image_size) float32``, ``kept (K,)`` axial indices into Z,
        and the ``(4, 4)`` affine of the resampled grid ``(u, v, k)``.
    """
    volume = volume.astype(np.float32, copy=False)
    if not np.isfinite(volume).all():  # counted in the manifest; replaced here
        volume = np.nan_to_num(volume, nan=0.0, posinf=0.0, neginf=0.0)
    nx, ny, nz = volume.shape
    side = max(nx, ny)
    pad_x, pad_y = (side - nx) // 2, (side - ny) // 2
    square = np.zeros((nz, 1, side, side), dtype=np.float32)
    square[:, 0, pad_x : pad_x + nx, pad_y : pad_y + ny] = np.moveaxis(volume, 2, 0)
    resized = F.interpolate(
        torch.from_numpy(square),
        size=(image_size, image_size),
        mode="bilinear",
        align_corners=False,
        antialias=True,
    )[:, 0].numpy()
    # Normalise on the resized volume: the same intensities as before resizing up to the
    # filter, at a fraction of the cost of a percentile over every source voxel.
    scale = intensity_scale(resized, percentile, band)
    if scale > 0:
        resized = resized / scale
    foreground = (resized > 0.1).mean(axis=(1, 2))
    kept = np.flatnonzero(foreground >= min_foreground_fraction)

    # Resampled pixel u covers padded voxels around (u + 0.5) * f - 0.5, f = side / size.
    factor = side / image_size
    grid = np.eye(4)
    grid[0, 0] = grid[1, 1] = factor
    grid[0, 3] = 0.5 * factor - 0.5 - pad_x
    grid[1, 3] = 0.5 * factor - 0.5 - pad_y
    return resized[kept].astype(np.float32), kept, affine @ grid
