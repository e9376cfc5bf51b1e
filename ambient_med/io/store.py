"""The HDF5 stores that stages hand to each other, written atomically.

``slices.h5`` (ingest; clean images — read only by `clean` training and by evaluation):
    images       (N, H, W) float32   normalised magnitude slices
    subject      (N,) int32          index of the slice's volume into the per-volume arrays
    slice_index  (N,) int32          axial index in the volume's canonical (RAS) grid
    subjects     (V,) str            pseudonymous subject id of each volume
    split        (V,) str            "train" or "holdout" (whole subjects, never slices)
    affines      (V, 4, 4) float64   RAS affine of each volume's resampled (H, W, k) grid

``raw.h5`` (ingest of raw k-space; the acquisition as it is, scaled):
    kspace       (N, coils, H, W) complex64   centred, phase encoding along W
    mask         (N, W) uint8                 acquired phase-encode lines
    maps         (N, coils, H, W) complex64   ESPIRiT maps from the ACS lines (ones: 1 coil)
    subject, slice_index, subjects, split, affines   as above

``{kind}.h5`` (corrupt; measurements only — never a clean image):
    measurements (N, C, H, W) float32  pixel: C = 1; kspace: C = 2 (real, imaginary);
                 (N, coils, H, W) complex64 for native multi-coil data
    mask         (N, H, W) or (N, W)   uint8 sampling mask of A (pixel or phase-encode lines)
    maps         (N, coils, H, W)      complex64 coil maps (native only)
    subject, slice_index, subjects, split, affines   as above
    attrs: kind, operator and its parameters
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ambient_med.errors import AmbientMedError


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path beside ``path``; renames it to ``path`` only on success.

    An interrupted writer therefore never leaves a file that looks complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates 0600 files; give the result the permissions a plain open() would.
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@dataclass
class SliceIndex:
    """Which subject and axial slice each stored row came from, and the subject split."""

    subject: np.ndarray
    slice_index: np.ndarray
    subjects: list[str]
    split: list[str]
    affines: np.ndarray

    def rows(self, split: str) -> np.ndarray:
        """Row indices whose subject is in ``split`` ("train" or "holdout")."""
        in_split = np.array([s == split for s in self.split], dtype=bool)
        return np.flatnonzero(in_split[self.subject])


@dataclass
class SliceStore:
    images: np.ndarray
    index: SliceIndex
    attrs: dict[str, Any] = field(default_factory=dict)


@dataclass
class MeasurementStore:
    measurements: np.ndarray
    mask: np.ndarray
    index: SliceIndex
    attrs: dict[str, Any] = field(default_factory=dict)
    maps: np.ndarray | None = None


@dataclass
class RawStore:
    kspace: np.ndarray
    mask: np.ndarray
    maps: np.ndarray
    index: SliceIndex
    attrs: dict[str, Any] = field(default_factory=dict)


def _write_index(h5: h5py.File, index: SliceIndex) -> None:
    h5.create_dataset("subject", data=index.subject.astype(np.int32))
    h5.create_dataset("slice_index", data=index.slice_index.astype(np.int32))
    h5.create_dataset("subjects", data=np.array(index.subjects, dtype=h5py.string_dtype()))
    h5.create_dataset("split", data=np.array(index.split, dtype=h5py.string_dtype()))
    h5.create_dataset("affines", data=index.affines.astype(np.float64))


def _read_index(h5: h5py.File) -> SliceIndex:
    return SliceIndex(
        subject=h5["subject"][()],
        slice_index=h5["slice_index"][()],
        subjects=[s.decode() for s in h5["subjects"][()]],
        split=[s.decode() for s in h5["split"][()]],
        affines=h5["affines"][()],
    )


def _write_attrs(h5: h5py.File, attrs: Mapping[str, Any]) -> None:
    for key, value in attrs.items():
        h5.attrs[key] = value


def _open(path: str | Path, kind: str) -> h5py.File:
    try:
        return h5py.File(path, "r")
    except (OSError, FileNotFoundError) as exc:
        raise AmbientMedError(
            f"{kind} '{path}': cannot be opened ({exc.__class__.__name__})"
        ) from None


def write_slices(path: str | Path, store: SliceStore) -> None:
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as h5:
        h5.create_dataset("images", data=store.images.astype(np.float32), chunks=True)
        _write_index(h5, store.index)
        _write_attrs(h5, store.attrs)


def read_slices(path: str | Path) -> SliceStore:
    with _open(path, "slice store") as h5:
        if "images" not in h5:
            raise AmbientMedError(f"slice store '{path}': has no 'images' dataset")
        return SliceStore(h5["images"][()], _read_index(h5), dict(h5.attrs))


def write_measurements(path: str | Path, store: MeasurementStore) -> None:
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as h5:
        measurements = store.measurements
        if not np.iscomplexobj(measurements):
            measurements = measurements.astype(np.float32)
        h5.create_dataset("measurements", data=measurements, chunks=True)
        h5.create_dataset("mask", data=store.mask.astype(np.uint8))
        if store.maps is not None:
            h5.create_dataset("maps", data=store.maps.astype(np.complex64), chunks=True)
        _write_index(h5, store.index)
        _write_attrs(h5, store.attrs)


def read_measurements(path: str | Path) -> MeasurementStore:
    with _open(path, "measurement store") as h5:
        if "measurements" not in h5 or "mask" not in h5:
            raise AmbientMedError(f"measurement store '{path}': lacks 'measurements' or 'mask'")
        maps = h5["maps"][()] if "maps" in h5 else None
        return MeasurementStore(
            h5["measurements"][()], h5["mask"][()], _read_index(h5), dict(h5.attrs), maps
        )


def write_raw(path: str | Path, store: RawStore) -> None:
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as h5:
        h5.create_dataset("kspace", data=store.kspace.astype(np.complex64), chunks=True)
        h5.create_dataset("mask", data=store.mask.astype(np.uint8))
        h5.create_dataset("maps", data=store.maps.astype(np.complex64), chunks=True)
        _write_index(h5, store.index)
        _write_attrs(h5, store.attrs)


def read_raw_store(path: str | Path) -> RawStore:
    with _open(path, "raw k-space store") as h5:
        if "kspace" not in h5:
            raise AmbientMedError(f"raw k-space store '{path}': has no 'kspace' dataset")
        return RawStore(
            h5["kspace"][()], h5["mask"][()], h5["maps"][()], _read_index(h5), dict(h5.attrs)
        )


def save_torch(path: str | Path, obj: Mapping[str, Any]) -> None:
    """``torch.save`` to a temporary name, then rename (no half-written checkpoint)."""
    import torch

    # Through a file handle: given a path, torch names the archive's inner folder after the
    # (random) temporary file, and two identical models would differ in their bytes.
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        torch.save(dict(obj), handle)


def load_torch(path: str | Path, what: str = "checkpoint") -> dict[str, Any]:
    """Loads a file written by :func:`save_torch` with ``weights_only=True`` (no pickled code)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise AmbientMedError(f"{what} '{path}': does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise AmbientMedError(
            f"{what} '{path}': not a loadable weights-only checkpoint ({exc.__class__.__name__})"
        ) from None


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, streamed (for provenance and resume checks)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
