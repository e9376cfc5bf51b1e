"""The ambient objective (docs/method.md) — one class for `ambient`, `naive` and `clean`.

The three modes differ only in what they hand to :class:`AmbientObjective`:

- ``ambient``: y = A x0 as measured, A the acquisition, Ã = B A a further corruption.
- ``naive``: y = A^H (measurements), treated as a clean image: A = Ã = identity.
- ``clean``: y = x0, A = Ã = identity (the only mode that may read clean images).
"""

from __future__ import annotations

import torch
from torch import nn

from ambient_med.diffusion.model import sigma_of
from ambient_med.physics.operators import MaskedOperator

WEIGHTINGS = ("none", "min_snr", "edm")
NOISE_DISTRIBUTIONS = ("uniform", "edm")


class AmbientObjective:
    """E_t,ε ‖A h_θ(z_t, Ã, t) − y‖², penalising only entries that A measured.

    The network input is the zero-filled image of the noisy further-corrupted data,
    ``z = Ã^H( sqrt(ᾱ_t) B y + sqrt(1 − ᾱ_t) Ã ε )``, computable without x0 because
    ``Ã x0 = B y``. The squared residual is summed over measured real-valued entries
    (k-space: real and imaginary parts of each acquired sample) and divided by their count,
    per example; entries A did not measure contribute nothing, whatever the prediction there.

    Weighting ``edm`` (with the EDM-preconditioned denoiser): entries that Ã kept get EDM's
    λ(σ) = (σ² + σ_d²) / (σ σ_d)², entries that A measured but B hid get 1 / s_u² — the
    inverse squared output scale of each part of the denoiser, so that the network's raw
    output F is trained at unit scale everywhere (EDM's argument, per part).

    Args:
        alphas_cumprod: ``(T,)`` ᾱ_t of the training schedule.
        weighting: ``"none"``, ``"min_snr"`` (weight min(SNR_t, γ), for x0-prediction) or
            ``"edm"``.
        snr_gamma: γ of min-SNR weighting.
        noise_distribution: ``"uniform"`` (t uniform over the schedule) or ``"edm"`` (ln σ ~
            N(p_mean, p_std²), EDM's log-normal, snapped to the nearest timestep).
        sigma_data: σ_d of EDM's weighting.
        unmeasured_scale: s_u, the denoiser's output scale where Ã measured nothing
            (:class:`~ambient_med.diffusion.model.AmbientDenoiser`); None = σ_d.
    """

    def __init__(
        self,
        alphas_cumprod: torch.Tensor,
        weighting: str = "none",
        snr_gamma: float = 5.0,
        noise_distribution: str = "uniform",
        sigma_data: float = 0.5,
        p_mean: float = -1.2,
        p_std: float = 1.2,
        unmeasured_scale: float | None = None,
    ) -> None:
        if weighting not in WEIGHTINGS:
            raise ValueError(f"loss weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        if noise_distribution not in NOISE_DISTRIBUTIONS:
            raise ValueError(f"noise distribution must be one of {NOISE_DISTRIBUTIONS}")
        self.alphas_cumprod = alphas_cumprod.float()
        self.weighting = weighting
        self.snr_gamma = snr_gamma
        self.noise_distribution = noise_distribution
        self.sigma_data = sigma_data
        self.unmeasured_scale = sigma_data if unmeasured_scale is None else unmeasured_scale
        self.p_mean, self.p_std = p_mean, p_std
        self.log_sigmas = sigma_of(self.alphas_cumprod).log()

    def sample_timesteps(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``(n,)`` training timesteps drawn from ``generator`` (CPU)."""
        if self.noise_distribution == "uniform":
            return torch.randint(len(self.alphas_cumprod), (n,), generator=generator)
        log_sigma = self.p_mean + self.p_std * torch.randn(n, generator=generator)
        # σ_t increases with t: the nearest level by log-distance.
        return (self.log_sigmas[None, :] - log_sigma[:, None]).abs().argmin(dim=1)

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
        """Per-example weights ``(B,)`` of ``none`` and ``min_snr``; EDM's λ(σ_t) for ``edm``."""
        if self.weighting == "edm":
            sigma = self.log_sigmas.to(t.device)[t].exp()
            sd2 = self.sigma_data**2
            return (sigma.square() + sd2) / (sigma * self.sigma_data).square()
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
        count = observed.flatten(1).sum(1).clamp(min=1.0)
        weights = self.weights(t)
        if self.weighting == "edm":
            kept = op_tilde.observed(residual) * observed
            shape = (-1, *([1] * (residual.ndim - 1)))
            entry = weights.view(shape) * kept + (observed - kept) / self.unmeasured_scale**2
            return ((residual.square() * entry).flatten(1).sum(1) / count).mean(), x0_hat
        per_example = (residual.square() * observed).flatten(1).sum(1) / count
        return (weights * per_example).sum() / weights.sum(), x0_hat
