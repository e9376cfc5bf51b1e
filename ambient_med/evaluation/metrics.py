"""Reconstruction metrics on magnitude images, fastMRI conventions.

Per volume, as fastMRI reports them: NRMSE = ‖x − x̂‖ / ‖x‖ and PSNR = 20 log10(max(x) /
RMSE) over the whole volume; SSIM with a 7×7 uniform window, K1 = 0.01, K2 = 0.03 and
data_range = max(x) of the reference volume, averaged over its slices (MONAI's SSIM, which
uses population rather than scikit-image's sample covariances: a 1 + 1/48 factor on the
variances, below the third decimal). Beside them ``ssim_fg``: the same SSIM map averaged only
inside the foreground (reference above :data:`FOREGROUND_LEVEL` of its volume maximum,
dilated), because an image with an exactly or nearly empty background is mostly scored on
that background (the reference plus 1 % of its max everywhere: 40 dB PSNR but SSIM 0.76).

:func:`bootstrap_ci` gives the 95 % interval of a mean over training seeds × volumes.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.metrics import SSIMMetric
from monai.metrics.regression import compute_ssim_and_cs
from scipy import ndimage

SSIM_WINDOW = 7
FOREGROUND_LEVEL = 0.05
FOREGROUND_DILATION = 2  # pixels
METRICS = ("psnr", "ssim", "ssim_fg", "nrmse")  # keys of volume_metrics


def nrmse(reference: np.ndarray, estimate: np.ndarray) -> float:
    return float(np.linalg.norm(reference - estimate) / np.linalg.norm(reference))


def psnr(reference: np.ndarray, estimate: np.ndarray, max_value: float | None = None) -> float:
    peak = float(reference.max()) if max_value is None else max_value
    rmse = float(np.sqrt(np.mean((reference - estimate) ** 2)))
    return float(20 * np.log10(peak / max(rmse, 1e-12)))


def ssim(reference: np.ndarray, estimate: np.ndarray, data_range: float | None = None) -> float:
    """SSIM of 2-D images (or the mean over a stack ``(N, H, W)``)."""
    span = float(reference.max() - reference.min()) if data_range is None else data_range
    metric = SSIMMetric(spatial_dims=2, data_range=span, kernel_type="uniform", win_size=7)
    ref = torch.as_tensor(np.atleast_3d(reference).reshape(-1, 1, *reference.shape[-2:]))
    est = torch.as_tensor(np.atleast_3d(estimate).reshape(-1, 1, *estimate.shape[-2:]))
    return float(metric(est.float(), ref.float()).mean())


def slice_metrics(reference: np.ndarray, estimate: np.ndarray) -> dict[str, np.ndarray]:
    """Per-slice NRMSE, PSNR and SSIM of one volume ``(N, H, W)`` (magnitudes).

    PSNR's peak and SSIM's data range come from the whole reference volume, as fastMRI does.
    """
    peak = float(reference.max())
    span = float(reference.max() - reference.min())
    return {
        "nrmse": np.array([nrmse(r, e) for r, e in zip(reference, estimate, strict=True)]),
        "psnr": np.array([psnr(r, e, peak) for r, e in zip(reference, estimate, strict=True)]),
        "ssim": np.array([ssim(r, e, span) for r, e in zip(reference, estimate, strict=True)]),
    }


def foreground_mask(volume: np.ndarray, level: float = FOREGROUND_LEVEL) -> np.ndarray:
    """``(N, H, W)`` boolean: pixels above ``level`` × the volume's maximum, holes filled and
    dilated by :data:`FOREGROUND_DILATION` pixels in-plane (edges of the head count)."""
    mask = volume > level * float(volume.max())
    structure = np.zeros((3, 3, 3), bool)
    structure[1] = ndimage.generate_binary_structure(2, 1)  # in-plane only
    mask = np.stack([ndimage.binary_fill_holes(m) for m in mask])
    return ndimage.binary_dilation(mask, structure, iterations=FOREGROUND_DILATION)


def _ssim_maps(reference: np.ndarray, estimate: np.ndarray, data_range: float) -> np.ndarray:
    """``(N, H − 6, W − 6)`` SSIM maps (valid 7×7 windows) of two ``(N, H, W)`` stacks."""
    ref = torch.as_tensor(reference, dtype=torch.float32)[:, None]
    est = torch.as_tensor(estimate, dtype=torch.float32)[:, None]
    maps, _ = compute_ssim_and_cs(
        est,
        ref,
        spatial_dims=2,
        kernel_size=(SSIM_WINDOW, SSIM_WINDOW),
        kernel_sigma=(1.5, 1.5),
        data_range=data_range,
        kernel_type="uniform",
    )
    return maps[:, 0].numpy()


def volume_metrics(reference: np.ndarray, estimate: np.ndarray) -> dict[str, float]:
    """PSNR, NRMSE, SSIM and ``ssim_fg`` of one volume ``(N, H, W)`` of magnitudes.

    PSNR and NRMSE are computed over the whole volume; SSIM is the mean of the per-slice
    SSIM maps with data_range = max(reference); ``ssim_fg`` averages the same maps over
    :func:`foreground_mask` (cropped to the valid windows).
    """
    reference = np.asarray(reference, dtype=np.float64)
    estimate = np.asarray(estimate, dtype=np.float64)
    if reference.shape != estimate.shape or reference.ndim != 3:
        raise ValueError(
            f"volumes must be (N, H, W) alike, got {reference.shape}, {estimate.shape}"
        )
    peak = float(reference.max())
    maps = _ssim_maps(reference, estimate, peak)
    crop = SSIM_WINDOW // 2
    fg = foreground_mask(reference)[:, crop:-crop, crop:-crop]
    return {
        "psnr": psnr(reference, estimate, peak),
        "nrmse": nrmse(reference, estimate),
        "ssim": float(maps.mean()),
        "ssim_fg": float(maps[fg].mean()) if fg.any() else float("nan"),
    }


def per_volume_metrics(
    reference: np.ndarray, estimate: np.ndarray, volume_ids: np.ndarray
) -> dict[int, dict[str, float]]:
    """:func:`volume_metrics` of each volume: slices grouped by ``volume_ids`` ``(N,)``."""
    return {
        int(v): volume_metrics(reference[volume_ids == v], estimate[volume_ids == v])
        for v in np.unique(volume_ids)
    }


def bootstrap_ci(
    values: np.ndarray, level: float = 0.95, resamples: int = 10000, seed: int = 0
) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean of ``values`` (seeds × volumes).

    Seeds and volumes are resampled independently with replacement (a two-way bootstrap):
    the interval reflects both training-seed and subject variation. A 1-D array is one seed.
    For a difference between methods, pass the paired difference matrix.

    Returns:
        (low, high) at ``level``.
    """
    table = np.atleast_2d(np.asarray(values, dtype=np.float64))
    n_seeds, n_volumes = table.shape
    rng = np.random.default_rng(seed)
    seeds = rng.integers(0, n_seeds, size=(resamples, n_seeds))
    volumes = rng.integers(0, n_volumes, size=(resamples, n_volumes))
    # mean over the resampled grid = mean over seeds of the per-seed mean over volumes.
    per_seed = table[seeds[:, :, None], volumes[:, None, :]].mean(axis=(1, 2))
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(per_seed, [tail, 1.0 - tail])
    return float(low), float(high)
