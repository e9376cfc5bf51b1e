"""Classical reconstructions, the baselines of docs/samplers.md: zero-filled, L1-wavelet CS and
phase-constrained POCS."""

from __future__ import annotations

import numpy as np
import sigpy as sp
import torch
from sigpy.mri.app import L1WaveletRecon

from ambient_med.physics.masks import acs_lines
from ambient_med.physics.operators import (
    MaskedOperator,
    alternate_projections,
    to_channels,
    to_complex,
)


def l1_wavelet(
    kspace: np.ndarray,
    maps: np.ndarray,
    mask: np.ndarray,
    lamda: float,
    max_iter: int = 60,
) -> np.ndarray:
    """Compressed sensing: argmin_x ½‖M F S x − y‖² + λ‖Ψ x‖₁ (Daubechies-4 wavelets), sigpy.

    sigpy's FFT is centred and orthonormal, the same convention as ours.

    Args:
        kspace: ``(coils, H, W)`` measured k-space (zeros elsewhere).
        maps: ``(coils, H, W)`` sensitivities (ones for single-coil).
        mask: ``(H, W)`` or ``(W,)`` sampling mask.

    Returns:
        ``(H, W)`` complex image.
    """
    height, width = kspace.shape[-2:]
    weights = np.broadcast_to(mask.reshape((1,) * (2 - mask.ndim) + mask.shape), (height, width))
    app = L1WaveletRecon(
        kspace.astype(np.complex64),
        maps.astype(np.complex64),
        lamda,
        weights=weights.astype(np.float32),
        max_iter=max_iter,
        device=sp.cpu_device,
        show_pbar=False,
    )
    return np.asarray(app.run())


def choose_lambda(
    reconstruct, references: list[np.ndarray], candidates: list[float]
) -> tuple[float, dict[float, float]]:
    """The λ with the lowest mean NRMSE on validation slices.

    Args:
        reconstruct: ``reconstruct(i, lamda) -> (H, W)`` magnitude of validation slice ``i``.
        references: magnitude references of the validation slices.

    Returns:
        (best λ, {λ: mean NRMSE}).
    """
    scores = {}
    for lamda in candidates:
        errors = [
            np.linalg.norm(reconstruct(i, lamda) - ref) / np.linalg.norm(ref)
            for i, ref in enumerate(references)
        ]
        scores[lamda] = float(np.mean(errors))
    return min(scores, key=scores.get), scores


def calibration_phase(
    op: MaskedOperator, measurements: torch.Tensor, window: float
) -> torch.Tensor:
    """The phase of each slice's low-resolution image: the measured lines among the central
    ``window`` share of k-space columns (at least three), zero-filled — what a partial-Fourier
    reconstruction takes as the image's phase.

    Args:
        op: a k-space operator over complex images ``(B, 2, H, W)``.
        measurements: y, shaped like ``op.A(x)``.

    Returns:
        ``(B, H, W)`` phase in radians.
    """
    columns = op.mask_image().shape[-1]
    half = max(1, round(window * columns / 2))
    keep = torch.zeros(columns, device=measurements.device)
    keep[columns // 2 - half : columns // 2 + half + 1] = 1.0
    return torch.angle(to_complex(op.restrict(keep).A_adjoint(measurements)))


def acs_hann_phase(op: MaskedOperator, measurements: torch.Tensor) -> torch.Tensor:
    """The phase of each slice's auto-calibration lines (its contiguous fully sampled centre)
    under a Hann taper, zero-filled: homodyne reconstruction's low-pass phase estimate (Noll et
    al., 1991). A box over the central lines rings; where the ringing turns a magnitude
    negative, its phase is off by π. The taper removes most of that ringing at the cost of a
    wider blur — a trade that pays with many calibration lines and loses with three, which is
    why reconstruct chooses between the two per scan (stages/reconstruct.py:
    phase_calibration).

    Args:
        op: a k-space operator over complex images ``(B, 2, H, W)`` with a ``line_mask``
            ``(B, W)``.
        measurements: y, shaped like ``op.A(x)``.

    Returns:
        ``(B, H, W)`` phase in radians.
    """
    calibration = acs_lines(op.line_mask.bool()).float()
    columns = calibration.shape[-1]
    offset = (torch.arange(columns, device=calibration.device) - columns // 2).abs().float()
    # Zero one column beyond the run's edge on either side: (lines + 1) / 2 from the centre.
    reach = (calibration.sum(dim=-1, keepdim=True) + 1.0) / 2.0
    taper = 0.5 + 0.5 * torch.cos(torch.pi * (offset / reach).clamp(max=1.0))
    return torch.angle(to_complex(op.restrict(calibration * taper).A_adjoint(measurements)))


def phase_project(image: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
    """The nearest image of the form r·e^{iφ} with r ≥ 0, pixel by pixel: a magnitude image
    under a known smooth phase φ. ``image``: ``(B, 2, H, W)``; ``phase``: ``(B, H, W)``."""
    turn = torch.polar(torch.ones_like(phase), phase)
    return to_channels((to_complex(image) * turn.conj()).real.clamp(min=0.0) * turn)


def phase_constrained(
    op: MaskedOperator,
    measurements: torch.Tensor,
    phase: torch.Tensor,
    iterations: int = 50,
) -> torch.Tensor:
    """Phase-constrained reconstruction by projections onto convex sets (POCS; Haacke et al.,
    1991, for partial Fourier): alternately the nearest magnitude image under ``phase``
    (:func:`phase_project`) and the nearest image that agrees with the measurements. An MR
    image is a non-negative magnitude times a smooth phase, so an unmeasured line whose mirror
    (−k) is measured is nearly known, and the constraint fills in much of the rest.

    Written here because sigpy and MONAI have no POCS for arbitrary masks and SENSE; it runs
    over this package's operators, so it serves single- and multi-coil scans alike.

    Returns:
        ``(B, 2, H, W)``, ending on the measurements.
    """
    return alternate_projections(
        op,
        op.A_adjoint(measurements),
        measurements,
        lambda image: phase_project(image, phase),
        iterations,
    )
