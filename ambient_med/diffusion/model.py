"""The denoiser h_θ: a MONAI DiffusionModelUNet predicting x0 from [z, mask channel(s)],
wrapped in EDM's preconditioning (Karras et al., 2022) adapted to corrupted inputs.

The samplers and the objective speak the variance-preserving language of MONAI's DDPM/DDIM
schedulers: ``z = sqrt(ᾱ_t) x0 + sqrt(1 − ᾱ_t) ε`` seen through Ã, timestep ``t``. The
wrapper turns that into EDM's variance-exploding view, ``x = z / sqrt(ᾱ_t)`` with noise level
``σ_t = sqrt((1 − ᾱ_t) / ᾱ_t)``, and returns

    D(x; σ) = c_skip(σ) · x + P_Ã[c_out(σ) · F] + (I − P_Ã)[s_u · G],
    (F, G) = UNet([c_in(σ) · x, mask, (ones)], t)   (two outputs),

with EDM's c_skip = σ_d² / (σ² + σ_d²), c_out = σ σ_d / sqrt(σ² + σ_d²), c_in =
1 / sqrt(σ² + σ_d²). P_Ã projects onto what the network's input operator Ã measured (pixel
mode: the mask; k-space: F^H M F with the line mask M); for `clean` and `naive` models
Ã = I, so D is exactly EDM's. Why the split: inside Ã's range the task is pure denoising
at level σ, where EDM's skip passes a nearly clean input through (a bare x0-predictor after
1000 CPU steps returned a 38 dB input at 24 dB, which capped every sampler). Outside it
nothing is observed whatever σ is: x is zero there and the answer is a prediction from
context, so a skip-scaled c_out ≈ σ would force F to grow like 1/σ as σ → 0. Its scale s_u
is EDM's argument applied to that part: the typical size of what it predicts. For k-space
that is not σ_d: the lines B hides are non-calibration lines, whose entries are ~6× smaller
than σ_d = 0.5 in the demo cohort (RMS 0.08), so with s_u = σ_d the held-back lines were a
few per cent of the loss and the prior learned them slowly. ``model.unmeasured_scale: auto``
sets s_u to that RMS, measured on the training measurements
(:func:`~ambient_med.diffusion.training.unmeasured_scale`); R = 4 hold-out PSNR after 1000
steps rose from 23.41 to 23.90 dB (one-step) and 23.36 to 23.78 dB (DC).
The loss (``AmbientObjective``, weighting ``edm``) weights the two parts to match.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from monai.networks.nets import DiffusionModelUNet
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler
from torch import nn

from ambient_med.physics.operators import fft2c, ifft2c

PRECONDITIONING = ("none", "edm")


def sigma_of(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """EDM noise level of VP timesteps: σ = sqrt((1 − ᾱ) / ᾱ)."""
    return ((1.0 - alphas_cumprod) / alphas_cumprod).sqrt()


def project_measured(values: torch.Tensor, mask_image: torch.Tensor) -> torch.Tensor:
    """P_Ã: the part of images ``(B, C, H, W)`` that Ã measures. ``mask_image`` ``(B, 1, H,
    W)`` is a pixel mask (C = 1) or a k-space sampling mask (C = 2, complex images)."""
    mask = mask_image.to(values.dtype)
    if values.shape[1] == 1:
        return values * mask
    return ifft2c(fft2c(values) * mask)


class AmbientDenoiser(nn.Module):
    """x̂0 = h_θ([z, mask, (ones)], t).

    Real images (pixel mode) give 2 input channels (z, mask); complex images (k-space mode)
    give 4 (real, imaginary, mask, ones), the published layout.

    Args:
        image_channels: 1 for real images, 2 for complex images as (real, imaginary).
        channels, attention_levels, num_res_blocks, norm_num_groups, num_head_channels:
            passed to :class:`monai.networks.nets.DiffusionModelUNet`.
        alphas_cumprod: ``(T,)`` ᾱ_t of the training schedule (needed for ``edm``).
        preconditioning: ``"edm"`` (see the module docstring) or ``"none"`` (the UNet's
            output is x̂0 directly).
        sigma_data: σ_d of EDM's preconditioning.
        unmeasured_scale: output scale s_u of the prediction where Ã measured nothing (the
            ``σ_data · G`` term above becomes ``s_u · G``); None = σ_d.
    """

    def __init__(
        self,
        image_channels: int,
        channels: tuple[int, ...] = (16, 32, 64),
        attention_levels: tuple[bool, ...] = (False, False, True),
        num_res_blocks: int = 1,
        norm_num_groups: int = 16,
        num_head_channels: int = 32,
        alphas_cumprod: torch.Tensor | None = None,
        preconditioning: str = "none",
        sigma_data: float = 0.5,
        unmeasured_scale: float | None = None,
    ) -> None:
        super().__init__()
        if preconditioning not in PRECONDITIONING:
            raise ValueError(f"preconditioning must be one of {PRECONDITIONING}")
        if preconditioning == "edm" and alphas_cumprod is None:
            raise ValueError("EDM preconditioning needs the schedule's alphas_cumprod")
        self.image_channels = image_channels
        self.preconditioning = preconditioning
        self.sigma_data = float(sigma_data)
        # A buffer, not a plain attribute: "auto" resolves from the training data when the
        # trainer is built, and the number must travel with the weights.
        scale = self.sigma_data if unmeasured_scale is None else float(unmeasured_scale)
        self.register_buffer("unmeasured_scale", torch.tensor(scale))
        if alphas_cumprod is not None:
            self.register_buffer("alphas_cumprod", alphas_cumprod.float().clone())
        extra = 2 if image_channels == 2 else 1
        self.unet = DiffusionModelUNet(
            spatial_dims=2,
            in_channels=image_channels + extra,
            # EDM: two outputs, the denoising residual on what Ã measured and the image
            # where it measured nothing (their targets differ in kind; one shared output
            # leaked the residual's noise into the unmeasured lines).
            out_channels=image_channels * (2 if preconditioning == "edm" else 1),
            channels=tuple(channels),
            attention_levels=tuple(attention_levels),
            num_res_blocks=num_res_blocks,
            norm_num_groups=norm_num_groups,
            num_head_channels=num_head_channels,
            # PyTorch's fused scaled_dot_product_attention instead of MONAI's einsum and
            # softmax: the same weights and (to float rounding) the same outputs, without
            # materialising the (HW)² attention matrix — the middle block attends over
            # (H/2^(L-1))² positions, 1 GiB per call for a batch of 8 of the default net at
            # 256². Measured on 2 CPU threads: the tiny test net (middle block at 32²) runs 3.3×
            # faster at 64², the default net at 64² 1.1-1.5× at batch 8 (two measurements)
            # and trains 3-5 % faster.
            use_flash_attention=True,
        )

    def forward(self, z: torch.Tensor, mask_image: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """z: ``(B, C, H, W)``; mask_image: ``(B, 1, H, W)``; t: ``(B,)`` → x̂0 ``(B, C, H, W)``."""
        if self.preconditioning == "none":
            return self._unet(z, mask_image, t)
        abar = self.alphas_cumprod[t.long()].view(-1, 1, 1, 1).to(z.dtype)
        sigma = sigma_of(abar)
        x = z / abar.sqrt()
        sd2 = self.sigma_data**2
        c_in = (sigma.square() + sd2).rsqrt()
        c_skip = sd2 / (sigma.square() + sd2)
        c_out = sigma * self.sigma_data * c_in
        residual, image = self._unet(c_in * x, mask_image, t).to(x.dtype).chunk(2, dim=1)
        unmeasured = image - project_measured(image, mask_image)
        return (
            c_skip * x
            + c_out * project_measured(residual, mask_image)
            + self.unmeasured_scale * unmeasured
        )

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # Weights saved before the scale became a buffer were trained at sigma_data.
        state_dict.setdefault(prefix + "unmeasured_scale", torch.tensor(self.sigma_data))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _unet(self, z: torch.Tensor, mask_image: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        parts = [z, mask_image.to(z.dtype)]
        if self.image_channels == 2:
            parts.append(torch.ones_like(mask_image, dtype=z.dtype))
        return self.unet(torch.cat(parts, dim=1), timesteps=t)


class OnDevice(nn.Module):
    """A denoiser run on ``device`` for callers whose tensors stay on the CPU.

    The samplers and operators work on CPU tensors (small FFTs and masks); only the network
    call moves. Inputs go to ``device``, x̂0 comes back to the CPU as float32, and autograd
    passes through both copies, so DPS's gradient through the network still works.
    """

    def __init__(self, net: nn.Module, device: torch.device | str) -> None:
        super().__init__()
        self.device = torch.device(device)
        self.net = net.to(self.device)

    def forward(self, z: torch.Tensor, mask_image: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Same shapes as the wrapped denoiser's; the result is on the CPU."""
        moved = (x.to(self.device) for x in (z, mask_image, t))
        return self.net(*moved).float().cpu()


def build_denoiser(
    model_cfg: Mapping[str, Any],
    image_channels: int,
    scheduler_cfg: Mapping[str, Any] | None = None,
) -> AmbientDenoiser:
    """Builds the network from the ``model`` (and, for EDM, ``scheduler``) config sections."""
    preconditioning = model_cfg.get("preconditioning", "none")
    scale = model_cfg.get("unmeasured_scale")
    alphas = build_ddpm(scheduler_cfg).alphas_cumprod if scheduler_cfg is not None else None
    return AmbientDenoiser(
        image_channels=image_channels,
        channels=tuple(model_cfg["channels"]),
        attention_levels=tuple(model_cfg["attention_levels"]),
        num_res_blocks=int(model_cfg["num_res_blocks"]),
        norm_num_groups=int(model_cfg["norm_num_groups"]),
        num_head_channels=int(model_cfg["num_head_channels"]),
        alphas_cumprod=alphas,
        preconditioning=preconditioning,
        sigma_data=float(model_cfg.get("sigma_data", 0.5)),
        # "auto" is resolved by the trainer (or loaded with the weights): sigma_data until then.
        unmeasured_scale=None if scale in (None, "auto") else float(scale),
    )


def build_ddpm(scheduler_cfg: Mapping[str, Any]) -> DDPMScheduler:
    """Training schedule: x0-prediction ("sample"), no clipping (docs/method.md)."""
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
