"""Samplers over a trained x0-predicting denoiser (DESIGN.md §4)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from monai.networks.schedulers import DDIMScheduler
from torch import nn

from ambient_med.physics.operators import MaskedOperator

# Builds the inference operator Ã_inf for a batch: (batch size, step index) -> operator.
OperatorFactory = Callable[[int, int], MaskedOperator]


@torch.no_grad()
def sample_prior(
    net: nn.Module,
    ddim: DDIMScheduler,
    make_operator: OperatorFactory,
    shape: tuple[int, int, int, int],
    generator: torch.Generator,
    redraw_mask: bool = False,
    eta: float = 0.0,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Fixed-mask prior sampler: x̂0 = h_θ([Ã_inf-corrupted x_t, mask], t), then a DDIM step.

    Args:
        net: the denoiser, called as ``net(z, mask_image, t)``.
        ddim: a DDIM scheduler with ``prediction_type="sample"`` and timesteps set.
        make_operator: builds Ã_inf; called once (fixed mask, the published sampler) or at
            every step when ``redraw_mask`` is set.
        shape: ``(B, C, H, W)`` of the samples.
        generator: CPU generator for the initial noise and DDIM's η-noise.

    Returns:
        ``(B, C, H, W)`` samples (x̂0 of the last step).
    """
    x_t = torch.randn(shape, generator=generator).to(device)
    operator = make_operator(shape[0], 0)
    x0_hat = x_t
    for step, t in enumerate(ddim.timesteps):
        if redraw_mask and step > 0:
            operator = make_operator(shape[0], step)
        z = operator.A_adjoint(operator.A(x_t))
        t_batch = torch.full((shape[0],), int(t), dtype=torch.long, device=device)
        x0_hat = net(z, operator.mask_image(), t_batch).float()
        x_t, _ = ddim.step(x0_hat, int(t), x_t, eta=eta, generator=generator)
    return x0_hat
