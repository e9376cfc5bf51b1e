"""Measurement operators A with ``A`` and ``A_adjoint`` (deepinv style), batched in torch.

Images are real tensors ``(B, C, H, W)``: ``C = 1`` for real (pixel-mode) images, ``C = 2`` for
complex images held as (real, imaginary) channels. Measurements use the same layout: a masked
image for :class:`PixelMask`, centred k-space as (real, imaginary) channels for
:class:`SingleCoilFourier`. Every operator here is a mask times an orthonormal map, so
``A A^H`` is the identity on measured entries and ``restrict`` composes a further mask B into
``Ã = B A``.
"""

from __future__ import annotations

import torch
from monai.networks.blocks.fft_utils_t import fftn_centered_t, ifftn_centered_t


def fft2c(image: torch.Tensor) -> torch.Tensor:
    """Centred orthonormal 2-D FFT. ``(B, 2, H, W)`` real/imag channels in and out."""
    # MONAI's helper wants the real/imaginary pair last: (..., H, W, 2).
    return fftn_centered_t(image.permute(0, 2, 3, 1), spatial_dims=2).permute(0, 3, 1, 2)


def ifft2c(kspace: torch.Tensor) -> torch.Tensor:
    """Centred orthonormal inverse 2-D FFT. ``(B, 2, H, W)`` in and out."""
    return ifftn_centered_t(kspace.permute(0, 2, 3, 1), spatial_dims=2).permute(0, 3, 1, 2)


class MaskedOperator:
    """A = M T with T orthonormal (identity or Fourier) and M a 0/1 mask on its output.

    Subclasses define ``measurement_mask`` (broadcastable to measurements), ``transform`` and
    ``inverse_transform`` (T and T^H), and ``mask_image`` (what the network sees of the mask).
    """

    def transform(self, image: torch.Tensor) -> torch.Tensor:
        return image

    def inverse_transform(self, data: torch.Tensor) -> torch.Tensor:
        return data

    @property
    def measurement_mask(self) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def A(self, image: torch.Tensor) -> torch.Tensor:
        """Forward operator: image ``(B, C, H, W)`` → measurements ``(B, C, H, W)``."""
        return self.transform(image) * self.measurement_mask

    def A_adjoint(self, measurements: torch.Tensor) -> torch.Tensor:
        """Adjoint: measurements → image (the zero-filled reconstruction)."""
        return self.inverse_transform(measurements * self.measurement_mask)

    def observed(self, like: torch.Tensor) -> torch.Tensor:
        """0/1 float tensor, shaped like the measurements ``like``, marking measured entries."""
        return self.measurement_mask.to(like.dtype).expand_as(like)

    def mask_image(self) -> torch.Tensor:  # pragma: no cover - abstract
        """``(B, 1, H, W)`` mask channel for the network."""
        raise NotImplementedError

    def restrict(self, keep: torch.Tensor) -> MaskedOperator:  # pragma: no cover - abstract
        """Ã = B A: the same operator with fewer measured entries (``keep`` is B's mask)."""
        raise NotImplementedError


class PixelMask(MaskedOperator):
    """A = diag(m): pixel inpainting. ``mask``: ``(B, 1, H, W)`` boolean or 0/1."""

    def __init__(self, mask: torch.Tensor) -> None:
        self.mask = mask.float()

    @property
    def measurement_mask(self) -> torch.Tensor:
        return self.mask

    def mask_image(self) -> torch.Tensor:
        return self.mask

    def restrict(self, keep: torch.Tensor) -> PixelMask:
        return PixelMask(self.mask * keep.float())


class Identity(PixelMask):
    """A = I on images of shape ``(B, C, H, W)``: the `clean` and `naive` baselines."""

    def __init__(self, batch: int, height: int, width: int, device: torch.device | str = "cpu"):
        super().__init__(torch.ones(batch, 1, height, width, device=device))


class SingleCoilFourier(MaskedOperator):
    """A = M F: centred orthonormal 2-D FFT, then a 1-D phase-encode line mask.

    Args:
        line_mask: ``(B, W)`` boolean, True on acquired phase-encode columns (the last axis).
        height: number of readout rows H.
    """

    def __init__(self, line_mask: torch.Tensor, height: int) -> None:
        self.line_mask = line_mask.float()
        self.height = height

    def transform(self, image: torch.Tensor) -> torch.Tensor:
        return fft2c(image)

    def inverse_transform(self, data: torch.Tensor) -> torch.Tensor:
        return ifft2c(data)

    @property
    def measurement_mask(self) -> torch.Tensor:
        return self.line_mask[:, None, None, :]

    def mask_image(self) -> torch.Tensor:
        return self.measurement_mask.expand(-1, 1, self.height, -1)

    def restrict(self, keep: torch.Tensor) -> SingleCoilFourier:
        return SingleCoilFourier(self.line_mask * keep.float(), self.height)


def to_complex(image: torch.Tensor) -> torch.Tensor:
    """``(B, 2, H, W)`` real/imaginary channels → ``(B, H, W)`` complex."""
    return torch.complex(image[:, 0].float(), image[:, 1].float())


def to_channels(image: torch.Tensor) -> torch.Tensor:
    """``(B, H, W)`` complex → ``(B, 2, H, W)`` real/imaginary channels."""
    return torch.stack([image.real, image.imag], dim=1)


class MultiCoilSense(MaskedOperator):
    """A = M F S: coil sensitivities, centred orthonormal 2-D FFT per coil, line mask.

    Measurements are ``(B, coils, H, W, 2)`` (real/imaginary last, MONAI's FFT layout).
    Not orthonormal: ``A A^H = I`` on measured entries holds only when ``Σ_c |S_c|² = 1`` and
    the maps are smooth, so data consistency with this operator is solved, not projected.

    Args:
        line_mask: ``(B, W)`` boolean acquired phase-encode columns.
        maps: ``(B, coils, H, W)`` complex sensitivity maps.
    """

    def __init__(self, line_mask: torch.Tensor, maps: torch.Tensor) -> None:
        self.line_mask = line_mask.float()
        self.maps = maps

    def transform(self, image: torch.Tensor) -> torch.Tensor:
        coil_images = self.maps * to_complex(image)[:, None]
        return fftn_centered_t(torch.view_as_real(coil_images), spatial_dims=2)

    def inverse_transform(self, data: torch.Tensor) -> torch.Tensor:
        coil_images = torch.view_as_complex(ifftn_centered_t(data, spatial_dims=2).contiguous())
        return to_channels((self.maps.conj() * coil_images).sum(dim=1))

    @property
    def measurement_mask(self) -> torch.Tensor:
        return self.line_mask[:, None, None, :, None]

    def mask_image(self) -> torch.Tensor:
        height = self.maps.shape[-2]
        return self.line_mask[:, None, None, :].expand(-1, 1, height, -1)

    def restrict(self, keep: torch.Tensor) -> MultiCoilSense:
        return MultiCoilSense(self.line_mask * keep.float(), self.maps)
