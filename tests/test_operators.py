import numpy as np
import pytest
import torch

from ambient_med.physics.coils import birdcage
from ambient_med.physics.masks import LineMaskFunc, poisson_mask
from ambient_med.physics.operators import (
    Identity,
    MultiCoilSense,
    PixelMask,
    RealImage,
    SingleCoilFourier,
    add_measurement_noise,
    data_consistent,
    fft2c,
    ifft2c,
    mirror_rows,
    rotate_phase,
    to_complex,
)

torch.manual_seed(0)


def _inner(a: torch.Tensor, b: torch.Tensor) -> float:
    """Real inner product of real tensors (complex values held as channel pairs)."""
    return float((a.double() * b.double()).sum())


def _operators(batch=3, height=24, width=20):
    generator = torch.Generator().manual_seed(1)
    lines = torch.from_numpy(
        np.stack([LineMaskFunc([0.1], [4])(width, seed=s) for s in range(batch)])
    )
    pixels = torch.rand(batch, 1, height, width, generator=generator) > 0.7
    fourier = SingleCoilFourier(lines, height)
    keep = torch.rand(batch, width, generator=generator) > 0.3
    return [
        ("pixel", PixelMask(pixels), 1),
        ("identity", Identity(batch, height, width), 2),
        ("single_coil", fourier, 2),
        ("single_coil_restricted", fourier.restrict(keep), 2),
    ]


@pytest.mark.parametrize("case", range(4))
def test_adjointness(case):
    name, op, channels = _operators()[case]
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(3, channels, 24, 20, generator=generator)
    y = torch.randn(3, channels, 24, 20, generator=generator)
    lhs, rhs = _inner(op.A(x), y), _inner(x, op.A_adjoint(y))
    assert lhs == pytest.approx(rhs, rel=1e-5, abs=1e-5), name


@pytest.mark.parametrize("case", range(4))
def test_a_a_adjoint_is_identity_on_measured_entries(case):
    _, op, channels = _operators()[case]
    y = torch.randn(3, channels, 24, 20, generator=torch.Generator().manual_seed(3))
    measured = op.observed(y)
    np.testing.assert_allclose(op.A(op.A_adjoint(y)), y * measured, atol=1e-5)


def test_fft2c_is_the_centred_orthonormal_fft():
    image = torch.randn(2, 2, 16, 12, generator=torch.Generator().manual_seed(4))
    z = (image[:, 0] + 1j * image[:, 1]).numpy()
    expected = np.fft.fftshift(
        np.fft.fft2(np.fft.ifftshift(z, axes=(-2, -1)), norm="ortho"), axes=(-2, -1)
    )
    got = fft2c(image)
    np.testing.assert_allclose(got[:, 0] + 1j * got[:, 1], expected, atol=1e-5)
    np.testing.assert_allclose(ifft2c(got), image, atol=1e-5)
    # Parseval: orthonormal.
    assert float(got.square().sum()) == pytest.approx(float(image.square().sum()), rel=1e-5)


def test_dc_of_a_constant_image_sits_at_the_centre_column():
    image = torch.zeros(1, 2, 8, 8)
    image[:, 0] = 1.0
    kspace = fft2c(image)
    magnitude = kspace.square().sum(1).sqrt()[0]
    assert magnitude[4, 4] == pytest.approx(8.0)
    assert float(magnitude.sum()) == pytest.approx(8.0)


def _sense(batch=2, height=24, width=20, coils=4):
    lines = torch.from_numpy(
        np.stack([LineMaskFunc([0.15], [3])(width, seed=s) for s in range(batch)])
    )
    maps = torch.from_numpy(birdcage(coils, height, width)).expand(batch, -1, -1, -1)
    return MultiCoilSense(lines, maps)


def test_sense_adjointness_and_coil_normalisation():
    op = _sense()
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(2, 2, 24, 20, generator=generator)
    y = torch.randn(2, 4, 24, 20, 2, generator=generator)
    assert _inner(op.A(x), y) == pytest.approx(_inner(x, op.A_adjoint(y)), rel=1e-5)
    # Σ|S|² = 1: with every line measured, A^H A = I.
    full = MultiCoilSense(torch.ones(2, 20, dtype=torch.bool), op.maps)
    torch.testing.assert_close(full.A_adjoint(full.A(x)), x, atol=1e-5, rtol=0)


def test_two_dimensional_poisson_masks():
    mask = poisson_mask((64, 64), 4.0, calib=12, seed=3)
    assert mask.shape == (64, 64) and mask[26:38, 26:38].all()
    assert 64 * 64 / mask.sum() == pytest.approx(4.0, rel=0.15)
    np.testing.assert_array_equal(mask, poisson_mask((64, 64), 4.0, calib=12, seed=3))
    op = SingleCoilFourier(torch.from_numpy(mask)[None], 64)
    generator = torch.Generator().manual_seed(6)
    x, y = (
        torch.randn(1, 2, 64, 64, generator=generator),
        torch.randn(1, 2, 64, 64, generator=generator),
    )
    assert _inner(op.A(x), y) == pytest.approx(_inner(x, op.A_adjoint(y)), rel=1e-5)
    assert torch.equal(op.observed(y)[0, 0].bool(), torch.from_numpy(mask))


@pytest.mark.parametrize("case", ["single_coil", "pixel", "sense", "real"])
def test_data_consistency_matches_the_measurements(case):
    generator = torch.Generator().manual_seed(7)
    if case == "sense":
        op, channels = _sense(), 2
    elif case == "real":
        op, channels = RealImage(_operators()[2][1]), 1
    else:
        _, op, channels = {"single_coil": _operators()[2], "pixel": _operators()[0]}[case]
    truth = torch.randn(
        op.mask_image().shape[0], channels, *op.mask_image().shape[-2:], generator=generator
    )
    y = op.A(truth)
    guess = torch.randn(truth.shape, generator=generator)
    fixed = data_consistent(op, guess, y, iterations=30)
    residual = float((op.A(fixed) - y).norm() / y.norm())
    before = float((op.A(guess) - y).norm() / y.norm())
    # SENSE is solved by CG, not projected: close after 30 iterations on white noise.
    assert residual < (0.05 * before if case == "sense" else 1e-3)
    if op.orthonormal:  # an exact projection: nothing changes where nothing was measured
        unmeasured = op.A_adjoint(op.A(fixed - guess))
        torch.testing.assert_close(unmeasured, fixed - guess, atol=1e-5, rtol=0)


def test_sense_data_consistency_is_least_squares_when_no_image_fits_every_coil():
    generator = torch.Generator().manual_seed(9)
    op = _sense()
    truth = torch.randn(
        op.mask_image().shape[0], 2, *op.mask_image().shape[-2:], generator=generator
    )
    clean = op.A(truth)
    # Measurements off A's range (as with estimated coil maps): no image reproduces them.
    y = clean + 0.3 * op.observed(clean) * torch.randn(clean.shape, generator=generator)
    guess = torch.randn(truth.shape, generator=generator)
    fixed = data_consistent(op, guess, y)
    floor = float((op.A(op.A_adjoint(y)) - y).norm())
    assert float((op.A(fixed) - y).norm()) <= floor


def test_measurement_noise_has_the_configured_level():
    _, op, _ = _operators(batch=3, height=64, width=64)[2]
    y = torch.zeros(3, 2, 64, 64)
    noisy = add_measurement_noise(y, op, 0.1, torch.Generator().manual_seed(8))
    measured = op.observed(y).bool()
    complex_std = noisy.square().sum(1)[measured[:, 0]].mean().sqrt()
    assert float(complex_std) == pytest.approx(0.1, rel=0.05)
    assert not noisy[~measured].any()


@pytest.mark.parametrize("height", [24, 23])
def test_mirrored_rows_are_measured_through_the_same_line_mask(height):
    """Mirroring an image's rows mirrors its centred k-space by the same index map, so a line
    mask over columns measures the mirrored image as the mirrored measurements; a 2-D mask
    and coil maps must be mirrored with it."""
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(3, 2, height, 20, generator=generator)
    lines = torch.from_numpy(np.stack([LineMaskFunc([0.1], [4])(20, seed=s) for s in range(3)]))
    fourier = SingleCoilFourier(lines, height)
    torch.testing.assert_close(fourier.A(mirror_rows(x)), mirror_rows(fourier.A(x)))
    # The centre row N // 2 stays where it is: for an even N that is not a plain flip.
    torch.testing.assert_close(mirror_rows(x)[..., height // 2, :], x[..., height // 2, :])
    plain = torch.allclose(fourier.A(torch.flip(x, (-2,))), mirror_rows(fourier.A(x)))
    assert plain == (height % 2 == 1)
    grid = torch.from_numpy(
        np.stack([poisson_mask((height, 20), 3.0, 4, seed=s) for s in range(3)])
    )
    two_d = SingleCoilFourier(grid, height)
    flipped_grid = SingleCoilFourier(mirror_rows(grid), height)
    torch.testing.assert_close(flipped_grid.A(mirror_rows(x)), mirror_rows(two_d.A(x)))
    maps = torch.from_numpy(birdcage(4, height, 20)).expand(3, -1, -1, -1)
    sense = MultiCoilSense(lines, maps)
    mirrored_sense = MultiCoilSense(lines, mirror_rows(maps))
    # Measurements (B, coils, H, W, 2): rows are axis -3.
    torch.testing.assert_close(
        mirrored_sense.A(mirror_rows(x)), mirror_rows(sense.A(x), -3), atol=1e-5, rtol=1e-5
    )


def test_a_global_phase_commutes_with_every_complex_operator():
    """rotate_phase is exp(iθ) per example: A(e^{iθ} x) = e^{iθ} A(x) for the Fourier and
    SENSE operators, the magnitude stays, and θ = π negates."""
    generator = torch.Generator().manual_seed(6)
    x = torch.randn(3, 2, 16, 12, generator=generator)
    angles = torch.tensor([0.3, 2.0, -1.1])
    rotated = rotate_phase(x, angles)
    expected = to_complex(x) * torch.exp(1j * angles.to(torch.complex64)).view(-1, 1, 1)
    torch.testing.assert_close(to_complex(rotated), expected)
    torch.testing.assert_close(to_complex(rotated).abs(), to_complex(x).abs())
    torch.testing.assert_close(rotate_phase(x, torch.full((3,), torch.pi)), -x)
    lines = torch.from_numpy(np.stack([LineMaskFunc([0.1], [3])(12, seed=s) for s in range(3)]))
    fourier = SingleCoilFourier(lines, 16)
    torch.testing.assert_close(fourier.A(rotated), rotate_phase(fourier.A(x), angles))
    sense = MultiCoilSense(lines, torch.from_numpy(birdcage(4, 16, 12)).expand(3, -1, -1, -1))
    # Multi-coil measurements (B, coils, H, W, 2): the pair is the last axis.
    torch.testing.assert_close(
        sense.A(rotated), rotate_phase(sense.A(x), angles, -1), atol=1e-5, rtol=1e-5
    )
