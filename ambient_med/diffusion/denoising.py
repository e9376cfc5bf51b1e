"""The sanity signal of docs/method.md: full-image x0-prediction error on clean hold-out data.

An evaluation only — never a training input. Not comparable across modes: the ambient
denoiser sees Ã x_t, the baselines all of x_t.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ambient_med.diffusion.losses import AmbientObjective
from ambient_med.diffusion.training import TrainingSet, inference_operator
from ambient_med.physics.masks import derive_seed


@torch.no_grad()
def x0_prediction_error(
    net: nn.Module,
    meta: Mapping[str, Any],
    x0: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    timesteps: Sequence[int],
    seed: int,
    batch_size: int = 32,
) -> dict[int, float]:
    """Mean squared error ‖x̂0 − x0‖² per entry at each noise level t.

    Args:
        net: the denoiser ``net(z, mask_image, t)``.
        meta: the model file's metadata (``mode``, ``kind``, ``delta``, ``corrupt``).
        x0: ``(N, C, H, W)`` clean hold-out images in the model's layout.
        alphas_cumprod: ``(T,)`` of the training schedule.
        timesteps: noise levels to evaluate.
        seed: seeds the noise and, for ambient models, the inference masks Ã_inf.

    Returns:
        ``{t: mse}``.
    """
    n, _, height, width = x0.shape
    errors: dict[int, float] = {}
    for t in timesteps:
        generator = torch.Generator().manual_seed(derive_seed(seed, "x0-error", t))
        abar = alphas_cumprod[int(t)].float()
        total = 0.0
        for start in range(0, n, batch_size):
            clean = x0[start : start + batch_size]
            b = clean.shape[0]
            noise = torch.randn(clean.shape, generator=generator)
            x_t = abar.sqrt() * clean + (1 - abar).sqrt() * noise
            op = inference_operator(meta, b, height, width, derive_seed(seed, "op", t, start))
            t_batch = torch.full((b,), int(t), dtype=torch.long)
            x0_hat = net(op.A_adjoint(op.A(x_t)), op.mask_image(), t_batch).float()
            total += float((x0_hat - clean).square().sum())
        errors[int(t)] = total / x0.numel()
    return errors


@torch.no_grad()
def heldout_observed_error(
    net: nn.Module,
    objective: AmbientObjective,
    data: TrainingSet,
    timesteps: Sequence[int],
    seed: int,
    batch_size: int = 32,
) -> dict[int, float]:
    """The training objective on held-out examples, per noise level t.

    Needs no clean image: for ambient and naive models it is the error on entries the
    acquisition measured, so it is defined even for cohorts that were never fully sampled.

    Returns:
        ``{t: mean loss}`` (per measured real entry, averaged over examples).
    """
    errors: dict[int, float] = {}
    n = len(data)
    for t in timesteps:
        generator = torch.Generator().manual_seed(derive_seed(seed, "heldout", t))
        total = 0.0
        for start in range(0, n, batch_size):
            idx = torch.arange(start, min(n, start + batch_size))
            y, op, op_tilde = data.batch(idx, generator, "cpu")
            noise = torch.randn(
                (len(idx), data.image_channels, *data.image_shape), generator=generator
            )
            t_batch = torch.full((len(idx),), int(t), dtype=torch.long)
            loss, _ = objective(net, y, op, op_tilde, t_batch, noise)
            total += float(loss) * len(idx)
        errors[int(t)] = total / max(n, 1)
    return errors
