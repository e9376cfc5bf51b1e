"""The denoiser h_θ: a MONAI DiffusionModelUNet predicting x0 from [z, mask channel(s)]."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from monai.networks.nets import DiffusionModelUNet
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler
from torch import nn


class AmbientDenoiser(nn.Module):
    """x̂0 = h_θ([z, mask, (ones)], t).

    Real images (pixel mode) give 2 input channels (z, mask); complex images (k-space mode)
    give 4 (real, imaginary, mask, ones), the published layout (DESIGN.md §3.3).

    Args:
        image_channels: 1 for real images, 2 for complex images as (real, imaginary).
        channels, attention_levels, num_res_blocks, norm_num_groups, num_head_channels:
            passed to :class:`monai.networks.nets.DiffusionModelUNet`.
    """

    def __init__(
        self,
        image_channels: int,
        channels: tuple[int, ...] = (16, 32, 64),
        attention_levels: tuple[bool, ...] = (False, False, True),
        num_res_blocks: int = 1,
        norm_num_groups: int = 16,
        num_head_channels: int = 32,
    ) -> None:
        super().__init__()
        self.image_channels = image_channels
        extra = 2 if image_channels == 2 else 1
        self.unet = DiffusionModelUNet(
            spatial_dims=2,
            in_channels=image_channels + extra,
            out_channels=image_channels,
            channels=tuple(channels),
            attention_levels=tuple(attention_levels),
            num_res_blocks=num_res_blocks,
            norm_num_groups=norm_num_groups,
            num_head_channels=num_head_channels,
        )

    def forward(self, z: torch.Tensor, mask_image: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """z: ``(B, C, H, W)``; mask_image: ``(B, 1, H, W)``; t: ``(B,)`` → x̂0 ``(B, C, H, W)``."""
        parts = [z, mask_image.to(z.dtype)]
        if self.image_channels == 2:
            parts.append(torch.ones_like(mask_image, dtype=z.dtype))
        return self.unet(torch.cat(parts, dim=1), timesteps=t)


def build_denoiser(model_cfg: Mapping[str, Any], image_channels: int) -> AmbientDenoiser:
    """Builds the network from the ``model`` config section."""
    return AmbientDenoiser(
        image_channels=image_channels,
        channels=tuple(model_cfg["channels"]),
        attention_levels=tuple(model_cfg["attention_levels"]),
        num_res_blocks=int(model_cfg["num_res_blocks"]),
        norm_num_groups=int(model_cfg["norm_num_groups"]),
        num_head_channels=int(model_cfg["num_head_channels"]),
    )


def build_ddpm(scheduler_cfg: Mapping[str, Any]) -> DDPMScheduler:
    """Training schedule: x0-prediction ("sample"), no clipping (DESIGN.md §3.3)."""
    return DDPMScheduler(
        num_train_timesteps=int(scheduler_cfg["num_train_timesteps"]),
        schedule=scheduler_cfg["schedule"],
        prediction_type="sample",
        clip_sample=False,
    )


def build_ddim(scheduler_cfg: Mapping[str, Any], num_inference_steps: int) -> DDIMScheduler:
    """Sampling schedule on the same noise levels as :func:`build_ddpm`."""
    ddim = DDIMScheduler(
        num_train_timesteps=int(scheduler_cfg["num_train_timesteps"]),
        schedule=scheduler_cfg["schedule"],
        prediction_type="sample",
        clip_sample=False,
    )
    ddim.set_timesteps(num_inference_steps)
    return ddim
