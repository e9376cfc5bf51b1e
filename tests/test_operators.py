import numpy as np
import pytest
import torch

from ambient_med.physics.masks import LineMaskFunc
from ambient_med.physics.operators import Identity, PixelMask, SingleCoilFourier, fft2c, ifft2c

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
