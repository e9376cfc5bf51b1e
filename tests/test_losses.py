import numpy as np
import pytest
import torch
from torch import nn

from ambient_med.diffusion.losses import AmbientObjective
from ambient_med.diffusion.model import AmbientDenoiser, build_ddpm, sigma_of
from ambient_med.physics.masks import LineMaskFunc
from ambient_med.physics.operators import Identity, PixelMask, SingleCoilFourier, fft2c

SCHEDULE = {"num_train_timesteps": 100, "schedule": "linear_beta"}


class Echo(nn.Module):
    """A 'network' whose output is a fixed function of its input: z scaled, plus a bias."""

    def __init__(self, channels: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, z, mask_image, t):
        return 0.5 * z + self.bias


def _objective():
    return AmbientObjective(build_ddpm(SCHEDULE).alphas_cumprod)


def _kspace_ops(batch=2, size=16):
    lines = torch.from_numpy(
        np.stack([LineMaskFunc([0.125], [4])(size, seed=s) for s in range(batch)])
    )
    op = SingleCoilFourier(lines, size)
    tilde_lines = lines.clone()
    tilde_lines[:, 0] = False  # B drops some observed lines (harmless when unobserved)
    tilde_lines[:, -1] = False
    return op, SingleCoilFourier(tilde_lines & lines, size)


def test_identity_input_is_the_schedulers_x_t():
    ddpm = build_ddpm(SCHEDULE)
    objective = AmbientObjective(ddpm.alphas_cumprod)
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 1, 8, 8, generator=generator)
    noise = torch.randn(4, 1, 8, 8, generator=generator)
    t = torch.tensor([0, 10, 50, 99])
    z = objective.noisy_input(x0, Identity(4, 8, 8), t, noise)
    torch.testing.assert_close(z, ddpm.add_noise(x0, noise, t))


def test_kspace_loss_ignores_what_a_did_not_measure():
    """Changing x0 on unmeasured k-space lines changes neither y nor the loss."""
    op, op_tilde = _kspace_ops()
    generator = torch.Generator().manual_seed(1)
    x0 = torch.randn(2, 2, 16, 16, generator=generator)
    # A perturbation living only on unmeasured lines: F^H of k-space zero on measured lines.
    kspace_noise = torch.randn(2, 2, 16, 16, generator=generator) * (1 - op.measurement_mask)
    from ambient_med.physics.operators import ifft2c

    x0_other = x0 + 10.0 * ifft2c(kspace_noise)
    y, y_other = op.A(x0), op.A(x0_other)
    torch.testing.assert_close(y, y_other, atol=1e-5, rtol=0)
    noise = torch.randn(2, 2, 16, 16, generator=generator)
    t = torch.tensor([5, 60])
    net = Echo(2)
    loss, _ = _objective()(net, y, op, op_tilde, t, noise)
    loss_other, _ = _objective()(net, y_other, op, op_tilde, t, noise)
    assert loss.item() == pytest.approx(loss_other.item(), rel=1e-5)


def test_pixel_loss_gradient_is_zero_on_unobserved_pixels():
    generator = torch.Generator().manual_seed(2)
    keep = torch.rand(2, 1, 12, 12, generator=generator) > 0.6
    op = PixelMask(keep)
    op_tilde = op.restrict(torch.rand(2, 1, 12, 12, generator=generator) > 0.1)
    x0 = torch.rand(2, 1, 12, 12, generator=generator)
    y = op.A(x0)
    prediction = torch.randn(2, 1, 12, 12, generator=generator, requires_grad=True)

    class Fixed(nn.Module):
        def forward(self, z, mask_image, t):
            return prediction

    loss, _ = _objective()(Fixed(), y, op, op_tilde, torch.tensor([3, 7]), torch.zeros_like(y))
    loss.backward()
    assert torch.all(prediction.grad[~keep] == 0)
    assert torch.all(prediction.grad[keep] != 0)


def test_loss_is_the_mean_over_observed_entries():
    """Known value: prediction 0, y = 1 on the observed pixels -> loss exactly 1."""
    keep = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    keep[0, 0, :2] = True  # 8 observed pixels
    op = PixelMask(keep)
    y = op.A(torch.ones(1, 1, 4, 4))

    class Zero(nn.Module):
        def forward(self, z, mask_image, t):
            return torch.zeros_like(z)

    loss, _ = _objective()(Zero(), y, op, op, torch.tensor([10]), torch.zeros_like(y))
    assert float(loss) == pytest.approx(1.0)


def test_network_input_never_contains_what_b_hid():
    """z depends on measured entries kept by Ã only: entries B dropped do not leak in."""
    op, op_tilde = _kspace_ops()
    generator = torch.Generator().manual_seed(3)
    y = op.A(torch.randn(2, 2, 16, 16, generator=generator))
    hidden = op.measurement_mask * (1 - op_tilde.measurement_mask)
    y_changed = y + 5.0 * hidden * torch.randn(y.shape, generator=generator)
    noise = torch.randn(2, 2, 16, 16, generator=generator)
    t = torch.tensor([20, 80])
    objective = _objective()
    z = objective.noisy_input(y, op_tilde, t, noise)
    torch.testing.assert_close(z, objective.noisy_input(y_changed, op_tilde, t, noise))
    # ... while the loss does see them (that is what teaches the model to predict them).
    loss, _ = objective(Echo(2), y, op, op_tilde, t, noise)
    loss_changed, _ = objective(Echo(2), y_changed, op, op_tilde, t, noise)
    assert loss.item() != pytest.approx(loss_changed.item())
    assert fft2c(z).mul(1 - op_tilde.measurement_mask).abs().max() < 1e-5


def test_min_snr_weighting_downweights_low_snr():
    abar = build_ddpm(SCHEDULE).alphas_cumprod
    objective = AmbientObjective(abar, "min_snr", 5.0)
    w = objective.weights(torch.tensor([0, 99]))
    assert float(w[0]) == pytest.approx(5.0)  # SNR ~ 1e4, clamped at gamma
    assert float(w[1]) == pytest.approx(float(abar[99] / (1 - abar[99])), rel=1e-5)


class ConstantUNet(nn.Module):
    """Stands in for MONAI's UNet: returns the same value everywhere."""

    def __init__(self, value: float):
        super().__init__()
        self.value = value

    def forward(self, x, timesteps):
        return torch.full((x.shape[0], 2, *x.shape[2:]), self.value)  # (F, G)


def _edm_denoiser(image_channels: int, value: float) -> AmbientDenoiser:
    net = AmbientDenoiser(
        image_channels,
        channels=(8, 8),
        attention_levels=(False, False),
        norm_num_groups=4,
        num_head_channels=4,
        alphas_cumprod=build_ddpm(SCHEDULE).alphas_cumprod,
        preconditioning="edm",
    )
    net.unet = ConstantUNet(value)
    return net


def test_edm_denoiser_passes_a_nearly_clean_input_through():
    net = _edm_denoiser(1, value=0.0)  # the UNet contributes nothing
    alphas = build_ddpm(SCHEDULE).alphas_cumprod
    x0 = torch.rand(2, 1, 8, 8)
    t = torch.zeros(2, dtype=torch.long)
    x_t = alphas[0].sqrt() * x0 + (1 - alphas[0]).sqrt() * 0.01 * torch.randn_like(x0)
    out = net(x_t, torch.ones(2, 1, 8, 8), t)
    # σ_0 = 0.01: c_skip = 0.25 / (0.25 + 1e-4) ≈ 0.9996 of the VE-scaled input.
    torch.testing.assert_close(out, x_t / alphas[0].sqrt(), atol=2e-3, rtol=1e-3)
    # At high noise the skip fades: c_skip = σ_d² / (σ² + σ_d²).
    t_high = torch.full((2,), 99, dtype=torch.long)
    sigma = sigma_of(alphas[99])
    expected = 0.25 / (sigma**2 + 0.25) * x_t / alphas[99].sqrt()
    torch.testing.assert_close(net(x_t, torch.ones(2, 1, 8, 8), t_high), expected)
    assert 0.25 / (sigma**2 + 0.25) < 0.5


def test_edm_denoiser_predicts_unmeasured_entries_at_data_scale():
    net = _edm_denoiser(1, value=1.0)  # F ≡ 1
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., ::2] = 1.0
    t = torch.zeros(1, dtype=torch.long)
    out = net(torch.zeros(1, 1, 8, 8), mask, t)
    sigma = float(sigma_of(build_ddpm(SCHEDULE).alphas_cumprod[0]))
    c_out = sigma * 0.5 / (sigma**2 + 0.25) ** 0.5
    # Entries Ã measured: the skip plus c_out F (tiny at small σ); the rest: σ_d F.
    torch.testing.assert_close(out[..., ::2], torch.full((1, 1, 8, 4), c_out))
    torch.testing.assert_close(out[..., 1::2], torch.full((1, 1, 8, 4), 0.5))


def test_unmeasured_scale_sets_the_prediction_scale_and_its_loss_weight():
    net = _edm_denoiser(1, value=1.0)  # F ≡ G ≡ 1
    net.unmeasured_scale.fill_(0.08)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., ::2] = 1.0
    out = net(torch.zeros(1, 1, 8, 8), mask, torch.zeros(1, dtype=torch.long))
    torch.testing.assert_close(out[..., 1::2], torch.full((1, 1, 8, 4), 0.08))
    # The scale is a buffer: it travels with the weights; weights saved before it existed
    # load at σ_d, the scale they were trained at.
    state = net.state_dict()
    fresh = _edm_denoiser(1, value=1.0)
    fresh.load_state_dict(state)
    assert float(fresh.unmeasured_scale) == pytest.approx(0.08)
    del state["unmeasured_scale"]
    fresh.load_state_dict(state)
    assert float(fresh.unmeasured_scale) == pytest.approx(0.5)
    # A residual of 1 on an entry B hid costs 1 / s_u².
    mask = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    mask[..., :2] = True
    keep = mask.clone()
    keep[..., 1] = False
    alphas = build_ddpm(SCHEDULE).alphas_cumprod
    objective = AmbientObjective(alphas, "edm", unmeasured_scale=0.1)

    class Hidden(nn.Module):
        def forward(self, z, mask_image, t):
            return (~keep).float()  # right where Ã kept, off by 1 where B hid

    zero = torch.zeros(1, 1, 4, 4)
    loss, _ = objective(Hidden(), zero, PixelMask(mask), PixelMask(keep), torch.tensor([50]), zero)
    assert float(loss) == pytest.approx(4 * 100.0 / 8)


def test_edm_weighting_per_part_and_lognormal_noise_levels():
    alphas = build_ddpm({"num_train_timesteps": 1000, "schedule": "linear_beta"}).alphas_cumprod
    objective = AmbientObjective(alphas, "edm", noise_distribution="edm")
    t = objective.sample_timesteps(4000, torch.Generator().manual_seed(0))
    log_sigma = sigma_of(alphas[t]).log()
    assert float(log_sigma.median()) == pytest.approx(-1.2, abs=0.1)
    assert float(log_sigma.std()) == pytest.approx(1.2, abs=0.15)
    # Loss: a residual of 1 on a kept entry costs λ(σ), on an entry B hid 1 / σ_d² = 4.
    mask = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    mask[..., :2] = True
    keep = mask.clone()
    keep[..., 1] = False
    op, op_tilde = PixelMask(mask), PixelMask(keep)

    class Fixed(nn.Module):
        def forward(self, z, mask_image, t):
            return torch.ones(1, 1, 4, 4)

    y = torch.zeros(1, 1, 4, 4)
    t0 = torch.tensor([500])
    loss, _ = objective(Fixed(), y, op, op_tilde, t0, torch.zeros(1, 1, 4, 4))
    lam = float(objective.weights(t0))
    assert float(loss) == pytest.approx((4 * lam + 4 * 4.0) / 8)
