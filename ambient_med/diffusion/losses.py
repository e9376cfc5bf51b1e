"""The ambient objective (DESIGN.md §3) — one class for `ambient`, `naive` and `clean`.

The three modes differ only in what they hand to :class:`AmbientObjective`:

- ``ambient``: y = A x0 as measured, A the acquisition, Ã = B A a further corruption.
- ``naive``: y = A^H (measurements), treated as a clean image: A = Ã = identity.
- ``clean``: y = x0, A = Ã = identity (the only mode that may read clean images).
"""

from __future__ import annotations

import torch
from torch import nn

from ambient_med.physics.operators import MaskedOperator


class AmbientObjective:
    """E_t,ε ‖A h_θ(z_t, Ã, t) − y‖², penalising only entries that A measured.

    The network input is the zero-filled image of the noisy further-corrupted data,
    ``z = Ã^H( sqrt(ᾱ_t) B y + sqrt(1 − ᾱ_t) Ã ε )``, computable without x0 because
    ``Ã x0 = B y``. The squared residual is summed over measured real-valued entries
    (k-space: real and imaginary parts of each acquired sample) and divided by their count,
    per example; entries A did not measure contribute nothing, whatever the prediction there.

    Args:
        alphas_cumprod: ``(T,)`` ᾱ_t of the training schedule.
        weighting: ``"none"`` or ``"min_snr"`` (weight min(SNR_t, γ), for x0-prediction).
        snr_gamma: γ of min-SNR weighting.
    """

    def __init__(
        self, alphas_cumprod: torch.Tensor, weighting: str = "none", snr_gamma: float = 5.0
    ) -> None:
        if weighting not in ("none", "min_snr"):
            raise ValueError(f"loss weighting must be 'none' or 'min_snr', got {weighting!r}")
        self.alphas_cumprod = alphas_cumprod.float()
        self.weighting = weighting
        self.snr_gamma = snr_gamma

    def _coefficients(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, ...]:
        abar = self.alphas_cumprod.to(like.device)[t].view(-1, *([1] * (like.ndim - 1)))
        return abar.sqrt(), (1.0 - abar).sqrt()

    def noisy_input(
        self, y: torch.Tensor, op_tilde: MaskedOperator, t: torch.Tensor, noise: torch.Tensor
    ) -> torch.Tensor:
        """z = Ã^H( sqrt(ᾱ_t) B y + sqrt(1 − ᾱ_t) Ã ε ), ``(B, C, H, W)``.

        ``y`` holds measurements of A (zeros elsewhere); Ã^H masks it down to B y.
        With Ã = I this is the usual x_t.
        """
        # y and Ã ε are both measurements: one broadcast shape serves both.
        signal, sigma = self._coefficients(t, y)
        return op_tilde.A_adjoint(signal * y + sigma * op_tilde.A(noise))

    def weights(self, t: torch.Tensor) -> torch.Tensor:
        if self.weighting == "none":
            return torch.ones(t.shape, dtype=torch.float32, device=t.device)
        abar = self.alphas_cumprod.to(t.device)[t]
        snr = abar / (1.0 - abar)
        return snr.clamp(max=self.snr_gamma)

    def __call__(
        self,
        net: nn.Module,
        y: torch.Tensor,
        op: MaskedOperator,
        op_tilde: MaskedOperator,
        t: torch.Tensor,
        noise: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (scalar loss, x̂0 ``(B, C, H, W)``)."""
        z = self.noisy_input(y, op_tilde, t, noise)
        x0_hat = net(z, op_tilde.mask_image(), t).float()
        residual = op.A(x0_hat) - y
        observed = op.observed(residual)
        per_example = (residual.square() * observed).flatten(1).sum(1) / observed.flatten(1).sum(
            1
        ).clamp(min=1.0)
        weights = self.weights(t)
        return (weights * per_example).sum() / weights.sum(), x0_hat
