"""The simulated acquisition every retrospective experiment shares (docs/method.md).

magnitude slice × smooth phase (seeded per cohort seed and subject) × coil maps → centred
orthonormal 2-D FFT → phase-encode line mask → complex Gaussian noise.

Why the phase: the k-space of a real-valued image is conjugate-symmetric, so at R = 4 the
acquired lines and their mirror images cover about 37 % of k-space instead of 25 %. Learned
priors exploit that free information; zero-filling and compressed sensing do not, so
without a phase every comparison flatters the learned methods. Real acquisitions carry a
smooth phase (B0 inhomogeneity, coil phase, off-centre slices); here it is a low-order
polynomial in (x, y, slice position) whose coefficients depend on the subject alone, so the
phase of one subject is a single smooth 3-D field, as in a real scan.

The corrupt rule, the reconstruct rule, the clean-mode training set and every benchmark call
:func:`complex_slices` / :class:`Acquisition`; none builds its own.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ambient_med.physics.coils import birdcage
from ambient_med.physics.masks import LineMaskFunc, derive_seed
from ambient_med.physics.operators import (
    MaskedOperator,
    MultiCoilSense,
    SingleCoilFourier,
    add_measurement_noise,
    to_complex,
)

# Slice positions are normalised by this many slices, so that a 2 mm volume (~90 axial
# slices) sees about one period's worth of the z terms: smooth, but not constant.
SLICES_PER_UNIT = 64.0


def smooth_phase(
    height: int, width: int, subject_seed: int, slice_index: np.ndarray | Sequence[int]
) -> np.ndarray:
    """Smooth random phase maps (radians) of one subject's slices.

    φ(x, y, z) = π · s · (c0 + c1 x + c2 y + c3 z + c4 xy + c5 x² + c6 y² + c7 xz + c8 yz),
    x, y ∈ [−1, 1] over the field of view, z = slice index / :data:`SLICES_PER_UNIT`, the
    coefficients c ~ U(−1, 1) and the strength s ~ U(0.5, 1) drawn from ``subject_seed``.

    Returns:
        ``(N, H, W)`` float32, one map per entry of ``slice_index``.
    """
    rng = np.random.default_rng(subject_seed)
    c = rng.uniform(-1.0, 1.0, size=9)
    strength = rng.uniform(0.5, 1.0)
    yy, xx = np.meshgrid(
        np.linspace(-1.0, 1.0, height), np.linspace(-1.0, 1.0, width), indexing="ij"
    )
    z = np.asarray(slice_index, dtype=np.float64)[:, None, None] / SLICES_PER_UNIT
    poly = (
        c[0]
        + c[1] * xx
        + c[2] * yy
        + c[3] * z
        + c[4] * xx * yy
        + c[5] * xx**2
        + c[6] * yy**2
        + c[7] * xx * z
        + c[8] * yy * z
    )
    return (np.pi * strength * poly).astype(np.float32)


def subject_phase_seed(cohort_seed: int, subject: str) -> int:
    """The seed of a subject's phase: a function of (cohort seed, subject) only."""
    return derive_seed(cohort_seed, "phase", subject)


def complex_slices(
    images: np.ndarray,
    subjects: Sequence[str],
    slice_index: np.ndarray | Sequence[int],
    cohort_seed: int,
) -> np.ndarray:
    """Magnitude slices given their subject's smooth phase: the complex images a scanner
    would have reconstructed from fully sampled data.

    Args:
        images: ``(N, H, W)`` real magnitudes.
        subjects: ``N`` subject ids (pseudonyms), one per slice.
        slice_index: ``(N,)`` slice positions within their volume.

    Returns:
        ``(N, H, W)`` complex64 with ``|out| == images``.
    """
    images = np.asarray(images, dtype=np.float32)
    slice_index = np.asarray(slice_index)
    subjects = list(subjects)
    out = np.empty(images.shape, dtype=np.complex64)
    for subject in dict.fromkeys(subjects):
        rows = np.flatnonzero([s == subject for s in subjects])
        phase = smooth_phase(
            images.shape[-2],
            images.shape[-1],
            subject_phase_seed(cohort_seed, subject),
            slice_index[rows],
        )
        out[rows] = images[rows] * np.exp(1j * phase)
    return out


def as_channels(images: np.ndarray) -> torch.Tensor:
    """``(N, H, W)`` real or complex → ``(N, C, H, W)``: 1 channel (real), or the (real,
    imaginary) pair of complex images."""
    if np.iscomplexobj(images):
        return torch.from_numpy(np.stack([images.real, images.imag], axis=1).astype(np.float32))
    return torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))[:, None]


class Acquisition:
    """Retrospective Cartesian undersampling of magnitude slices at one acceleration.

    Args:
        acceleration: R of the 1-D phase-encode mask.
        center_fraction: fraction of fully sampled centre (ACS) columns.
        mask_type: ``"random"`` or ``"equispaced"`` (fastMRI semantics).
        size: image side H = W.
        seed: the cohort seed; masks, phases and noise derive from it.
        coils: 1 (single-coil Fourier) or more (birdcage maps, SENSE operator).
        noise_sigma: complex Gaussian noise per k-space sample.
        phase: give each slice its subject's smooth phase (default). ``False`` only to
            measure what the phase-free (conjugate-symmetric) shortcut is worth.
    """

    def __init__(
        self,
        acceleration: float,
        center_fraction: float,
        mask_type: str,
        size: int,
        seed: int,
        coils: int = 1,
        noise_sigma: float = 0.0,
        phase: bool = True,
    ) -> None:
        self.func = LineMaskFunc([center_fraction], [acceleration], mask_type)
        self.coils = int(coils)
        self.sigma = float(noise_sigma)
        self.maps = torch.from_numpy(birdcage(self.coils, size, size)) if self.coils > 1 else None
        self.size = size
        self.seed = seed
        # A float, so that R = 4 and R = 4.0 seed the same masks (derive_seed prints it).
        self.acceleration = float(acceleration)
        self.phase = phase

    def operator(self, keys: Sequence[str]) -> MaskedOperator:
        """A of the slices named ``keys`` (one seeded line mask per key)."""
        masks = np.stack(
            [
                self.func(self.size, derive_seed(self.seed, "recon", self.acceleration, k))
                for k in keys
            ]
        )
        mask = torch.from_numpy(masks)
        if self.maps is None:
            return SingleCoilFourier(mask, self.size)
        return MultiCoilSense(mask, self.maps.expand(len(keys), -1, -1, -1))

    def images(
        self, images: np.ndarray, subjects: Sequence[str], slice_index: np.ndarray
    ) -> torch.Tensor:
        """The complex images the acquisition sees, ``(N, 2, H, W)``."""
        if self.phase:
            return as_channels(complex_slices(images, subjects, slice_index, self.seed))
        return as_channels(images.astype(np.complex64))

    def measure(
        self,
        op: MaskedOperator,
        images: np.ndarray,
        subjects: Sequence[str],
        slice_index: np.ndarray,
        noise_key: str,
    ) -> torch.Tensor:
        """y = A (|x| e^{iφ}) + n for magnitude slices ``images`` ``(N, H, W)``."""
        y = op.A(self.images(images, subjects, slice_index))
        generator = torch.Generator().manual_seed(derive_seed(self.seed, "noise", noise_key))
        return add_measurement_noise(y, op, self.sigma, generator)

    def numpy_kspace(self, op: MaskedOperator, y: torch.Tensor, i: int):
        """(coils, H, W) k-space, maps and mask of example ``i`` for sigpy."""
        if isinstance(op, MultiCoilSense):
            kspace = torch.view_as_complex(y[i].contiguous()).numpy()
            maps = op.maps[i].numpy()
        else:
            kspace = to_complex(y[i : i + 1]).numpy()
            maps = np.ones_like(kspace)
        return kspace, maps, op.line_mask[i].numpy()


def multicoil_kspace(images: np.ndarray, maps: np.ndarray) -> np.ndarray:
    """Fully sampled multi-coil k-space of complex slices.

    Args:
        images: ``(N, H, W)`` complex slices; maps: ``(coils, H, W)`` sensitivities.

    Returns:
        ``(N, coils, H, W)`` complex64, centred orthonormal 2-D FFT per coil.
    """
    coil_images = maps[None] * images[:, None]
    shifted = np.fft.ifftshift(coil_images, axes=(-2, -1))
    return np.fft.fftshift(np.fft.fft2(shifted, norm="ortho"), axes=(-2, -1)).astype(np.complex64)
