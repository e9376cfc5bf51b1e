"""Reconstruction metrics on magnitude images, fastMRI conventions (DESIGN.md §5).

NRMSE = ‖x − x̂‖ / ‖x‖; PSNR = 20 log10(max(x) / RMSE); SSIM with a 7×7 uniform window,
K1 = 0.01, K2 = 0.03 and data_range = max(x) − min(x) of the reference volume — the settings
of fastMRI's evaluation (scikit-image's defaults), through MONAI's SSIM metric.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.metrics import SSIMMetric


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
