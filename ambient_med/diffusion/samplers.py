"""Samplers over a trained x0-predicting denoiser (docs/samplers.md)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from monai.networks.schedulers import DDIMScheduler
from torch import nn

from ambient_med.physics.operators import (
    MaskedOperator,
    MultiCoilSense,
    alternate_projections,
    data_consistent,
)

# Builds the inference operator Ã_inf for a batch: (batch size, step index) -> operator.
OperatorFactory = Callable[[int, int], MaskedOperator]
# A projection onto what is known of the image besides its measurements (e.g. a magnitude
# under the scan's calibration phase, physics/recon.py: phase_project), ``(B, C, H, W)`` in
# and out; applied to every x̂0 before the data are.
ImageProjection = Callable[[torch.Tensor], torch.Tensor]

# CG-SENSE damping of the projection that ends every reconstruction. The per-step projections
# keep data_consistent's 1e-2; one final projection at 1e-2 leaves the weakly determined part of
# the measurements unfitted, which the DC sampler's thirty projections do not: a native 4-coil
# model's DPS scored 3.1 dB below DC at R = 2 (33.88 vs 37.00) with it, 4.8 dB above with 1e-4
# (41.76), and 0.5 dB above at R = 4 (26.67 vs 26.21; 12 training-subject slices).
FINAL_SENSE_DAMPING = 1e-4
# Alternations between ``project`` and the data that end a reconstruction given a projection,
# unless the caller chooses a count (reconstruct chooses one per scan, the same as its pocs
# baseline's). With one, DC gained 1.29 dB over zero-filled on the default demo model's
# hold-out (1 coil, R = 4) (robust_prior_default_1coil_phase_w004.json, commit d313214), below
# pocs alone (1.59); with 50, 1.64 (robust_prior_default_1coil_phase.json).
PROJECTION_ROUNDS = 50


def end_on_data(
    op: MaskedOperator,
    image: torch.Tensor,
    measurements: torch.Tensor,
    project: ImageProjection | None = None,
    damping: float | None = None,
    rounds: int | torch.Tensor = PROJECTION_ROUNDS,
) -> torch.Tensor:
    """The last projection of a reconstruction onto its measurements (tighter for SENSE).

    With ``project`` (a projection onto another convex set the image lies in), alternating
    projections onto both sets from ``image`` — POCS started at the prior's estimate, so the
    constraints settle what they determine and the prior the rest — at SENSE damping
    ``damping`` (default: data_consistent's, the pocs baseline's). Which damping suits fifty
    fits depends on how well the coil maps explain the data, so the caller chooses it per scan
    (reconstruct's phase calibration): with the simulation's exact maps 1e-4 is right, with
    ESPIRiT maps estimated from a new scan fifty near-undamped fits amplify what the maps
    cannot explain (POCS from zero-filled on 4-coil new scans, 1e-2 → 1e-4: padded T1
    37.96 → 36.03 dB, EPI 33.30 → 25.76). How many alternations (``rounds``: an int or one
    per example) suit a scan is chosen per scan too (reconstruct's phase calibration), as
    many as its pocs baseline gets. Either way a prior that adds nothing ends exactly where
    the pocs baseline does. Without ``project``, one fit at :data:`FINAL_SENSE_DAMPING`."""
    if project is not None:
        return alternate_projections(op, image, measurements, project, rounds, damping=damping)
    damping = FINAL_SENSE_DAMPING if isinstance(op, MultiCoilSense) else None
    return data_consistent(op, image, measurements, damping=damping)


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


def _residual_norm(op: MaskedOperator, x0_hat: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (y - op.A(x0_hat)).flatten(1).norm(dim=1)


def posterior_sample(
    net: nn.Module,
    ddim: DDIMScheduler,
    make_operator: OperatorFactory,
    op: MaskedOperator,
    measurements: torch.Tensor,
    shape: tuple[int, int, int, int],
    generator: torch.Generator,
    method: str = "dps",
    zeta: float = 1.0,
    redraw_mask: bool = False,
    eta: float = 0.0,
    device: torch.device | str = "cpu",
    project: ImageProjection | None = None,
    end_damping: float | None = None,
    end_rounds: int | torch.Tensor = PROJECTION_ROUNDS,
) -> torch.Tensor:
    """Reconstructs images from measurements y = A x with the diffusion model as prior.

    ``method="dps"`` (Ambient DPS, docs/samplers.md): after each DDIM step,
    ``x_{t-1} -= ζ ∇_{x_t} ‖y − A x̂0‖² / ‖y − A x̂0‖``, the gradient taken through the
    network. ``method="dc"``: no gradient through the network; x̂0 is replaced by its
    data-consistent version (measured entries from y) before each DDIM update. ``project``
    (DC: every x̂0, before its data; DPS: the last) adds what else is known of the image;
    ``end_damping`` and ``end_rounds``: the SENSE damping and the count of the alternations
    that then end it (:func:`end_on_data`).

    Args:
        op: the acquisition operator A of each example (batched).
        measurements: y, shaped like ``op.A(x)``.
        shape: ``(B, C, H, W)`` of the images.

    Returns:
        ``(B, C, H, W)`` reconstructions, data-consistent (projected onto the measurements
        after the last step, for both methods).
    """
    if method not in ("dps", "dc"):
        raise ValueError(f"sampler must be 'dps' or 'dc', got {method!r}")
    x_t = torch.randn(shape, generator=generator).to(device)
    inference = make_operator(shape[0], 0)
    last = x_t
    for step, t in enumerate(ddim.timesteps):
        if redraw_mask and step > 0:
            inference = make_operator(shape[0], step)
        t_batch = torch.full((shape[0],), int(t), dtype=torch.long, device=device)
        if method == "dps":
            x_t = x_t.detach().requires_grad_(True)
            with torch.enable_grad():
                z = inference.A_adjoint(inference.A(x_t))
                x0_hat = net(z, inference.mask_image(), t_batch).float()
                norm = _residual_norm(op, x0_hat, measurements)
                # ∇‖r‖² / ‖r‖, with the denominator held fixed (docs/samplers.md).
                objective = (norm.square() / norm.detach().clamp(min=1e-12)).sum()
                grad = torch.autograd.grad(objective, x_t)[0]
            with torch.no_grad():
                x_prev, _ = ddim.step(
                    x0_hat.detach(), int(t), x_t.detach(), eta=eta, generator=generator
                )
                x_t = x_prev - zeta * grad
            x0_hat = x0_hat.detach()
            # DDIM's last step lands on x̂0 (ᾱ_prev = 1), so x_t now holds x̂0 with the final
            # likelihood update applied: keep it rather than the pre-update x̂0.
            last = x_t.detach()
        else:
            with torch.no_grad():
                z = inference.A_adjoint(inference.A(x_t))
                x0_hat = net(z, inference.mask_image(), t_batch).float()
                if project is not None:
                    x0_hat = project(x0_hat)
                x0_hat = data_consistent(op, x0_hat, measurements)
                x_t, _ = ddim.step(x0_hat, int(t), x_t, eta=eta, generator=generator)
            last = x0_hat
    # Every reconstruction ends on the data (a projection; CG for SENSE): without it DPS
    # scored below zero-filled.
    with torch.no_grad():
        return end_on_data(op, last, measurements, project, end_damping, end_rounds)


@torch.no_grad()
def one_step_reconstruction(
    net: nn.Module,
    op: MaskedOperator,
    measurements: torch.Tensor,
    t_min: int = 0,
    mask_op: MaskedOperator | None = None,
    project: ImageProjection | None = None,
    end_damping: float | None = None,
    end_rounds: int | torch.Tensor = PROJECTION_ROUNDS,
) -> torch.Tensor:
    """x̂ = DC(h_θ([A^H y, mask], t_min)): the denoiser applied once to the zero-filled
    image, then projected onto the measurements.

    ``mask_op`` supplies the mask channel when A's own is not what the model was trained to
    read (the identity for clean/naive models); ``project`` comes before the projection
    (:func:`end_on_data`, with ``end_damping`` and ``end_rounds``).
    """
    z = op.A_adjoint(measurements)
    mask_image = (mask_op or op).mask_image()
    t = torch.full((z.shape[0],), int(t_min), dtype=torch.long, device=z.device)
    x0_hat = net(z, mask_image, t).float()
    return end_on_data(op, x0_hat, measurements, project, end_damping, end_rounds)
