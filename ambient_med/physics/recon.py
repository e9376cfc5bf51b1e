"""Classical reconstructions, the baselines of docs/samplers.md: zero-filled and L1-wavelet CS."""

from __future__ import annotations

import numpy as np
import sigpy as sp
from sigpy.mri.app import L1WaveletRecon


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
