"""Raw k-space: fastMRI-style HDF5 and ISMRMRD (Cartesian) → one in-memory form.

fastMRI layout: ``kspace`` (slices, [coils,] H, W) complex, phase encoding along W; optional
``mask`` (W,), ``reconstruction_rss``, ``ismrmrd_header`` (XML). Files may be already
undersampled: unacquired lines are zero and/or listed in ``mask``; when there is no mask,
it is inferred from the data (a line is acquired when any sample of it is non-zero).
"""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from ambient_med.errors import AmbientMedError

log = logging.getLogger(__name__)

RAW_SUFFIXES = (".h5", ".hdf5", ".mrd")


@dataclass
class RawKspace:
    """One raw acquisition, every slice of it.

    Attributes:
        kspace: ``(slices, coils, H, W)`` complex64, centred, phase encoding along W.
        line_mask: ``(slices, W)`` boolean acquired phase-encode lines.
        identity_keys: what identifies the patient and study (for the pseudonym only).
        source: ``"fastmri"`` or ``"ismrmrd"``.
    """

    kspace: np.ndarray
    line_mask: np.ndarray
    identity_keys: tuple[str, ...]
    source: str

    @property
    def undersampled(self) -> bool:
        return not bool(self.line_mask.all())


def is_raw(path: Path) -> bool:
    return path.suffix.lower() in RAW_SUFFIXES


def _header_keys(xml: str | bytes | None) -> tuple[str, str]:
    """(patientID, studyInstanceUID) from an ISMRMRD XML header, empty when absent."""
    if not xml:
        return "", ""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return "", ""
    found = {}
    for element in root.iter():
        tag = element.tag.rsplit("}", 1)[-1]
        if tag in ("patientID", "studyInstanceUID") and element.text:
            found[tag] = element.text.strip()
    return found.get("patientID", ""), found.get("studyInstanceUID", "")


def infer_line_mask(kspace: np.ndarray) -> np.ndarray:
    """``(slices, coils, H, W)`` → ``(slices, W)``: True where any sample of a line is non-zero."""
    return np.abs(kspace).max(axis=(1, 2)) > 0


def _check_size(path: Path, shape: tuple[int, ...], max_voxels: int) -> None:
    if int(np.prod(shape, dtype=np.int64)) > max_voxels:
        raise AmbientMedError(
            f"'{path.name}': k-space of shape {shape} exceeds ingest.max_voxels={max_voxels}"
        )


def read_fastmri(path: Path, max_voxels: int) -> RawKspace:
    """Reads a fastMRI-style file, refusing oversized ones before reading any sample."""
    try:
        handle = h5py.File(path, "r")
    except OSError:
        raise AmbientMedError(f"'{path.name}': not a readable HDF5 file") from None
    with handle:
        if "kspace" not in handle:
            raise AmbientMedError(f"'{path.name}': HDF5 file without a 'kspace' dataset")
        dataset = handle["kspace"]
        if dataset.ndim not in (3, 4) or not np.issubdtype(dataset.dtype, np.complexfloating):
            raise AmbientMedError(
                f"'{path.name}': 'kspace' must be complex (slices, [coils,] H, W), "
                f"got {dataset.dtype} {dataset.shape}"
            )
        _check_size(path, dataset.shape, max_voxels)
        try:
            kspace = dataset[()].astype(np.complex64)
            stored_mask = handle["mask"][()] if "mask" in handle else None
            xml = handle["ismrmrd_header"][()] if "ismrmrd_header" in handle else None
        except OSError:
            raise AmbientMedError(f"'{path.name}': truncated or damaged HDF5 data") from None
    if kspace.ndim == 3:
        kspace = kspace[:, None]
    line_mask = infer_line_mask(kspace)
    if stored_mask is not None:
        stored = np.asarray(stored_mask).astype(bool).reshape(-1)
        if stored.shape[0] != kspace.shape[-1]:
            raise AmbientMedError(
                f"'{path.name}': 'mask' has {stored.shape[0]} entries for {kspace.shape[-1]} lines"
            )
        line_mask = line_mask & stored[None]
        kspace = kspace * stored[None, None, None, :]
    if isinstance(xml, bytes):
        xml = xml.decode(errors="replace")
    return RawKspace(kspace, line_mask, _header_keys(xml), "fastmri")


def is_ismrmrd(path: Path) -> bool:
    try:
        with h5py.File(path, "r") as handle:
            return "dataset" in handle and "xml" in handle["dataset"]
    except OSError:
        return False


def read_ismrmrd(path: Path, max_voxels: int) -> RawKspace:
    """Reads Cartesian ISMRMRD raw data (the ``ismrmrd`` package) into the fastMRI form.

    Readout runs along H and ``kspace_encode_step_1`` along W; noise scans are ignored.
    """
    import ismrmrd
    import ismrmrd.xsd

    try:
        dataset = ismrmrd.Dataset(str(path), "dataset", create_if_needed=False)
    except Exception:
        raise AmbientMedError(f"'{path.name}': not a readable ISMRMRD file") from None
    try:
        xml = dataset.read_xml_header()
        header = ismrmrd.xsd.CreateFromDocument(xml)
        encoding = header.encoding[0]
        if (
            str(
                encoding.trajectory.value
                if hasattr(encoding.trajectory, "value")
                else encoding.trajectory
            ).lower()
            != "cartesian"
        ):
            raise AmbientMedError(f"'{path.name}': only Cartesian ISMRMRD data is supported")
        matrix = encoding.encodedSpace.matrixSize
        slices = 1
        limits = encoding.encodingLimits
        if limits is not None and limits.slice is not None:
            slices = int(limits.slice.maximum) + 1
        count = dataset.number_of_acquisitions()
        if count == 0:
            raise AmbientMedError(f"'{path.name}': no acquisitions")
        first = dataset.read_acquisition(0)
        coils = int(first.active_channels)
        shape = (slices, coils, int(matrix.x), int(matrix.y))
        _check_size(path, shape, max_voxels)
        kspace = np.zeros(shape, dtype=np.complex64)
        for i in range(count):
            acq = dataset.read_acquisition(i)
            if acq.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT):
                continue
            data = np.asarray(acq.data, dtype=np.complex64)
            if data.shape != (coils, shape[2]):
                raise AmbientMedError(
                    f"'{path.name}': acquisition {i} has shape {data.shape}, expected "
                    f"{(coils, shape[2])} (non-Cartesian or oversampled readout)"
                )
            kspace[acq.idx.slice, :, :, acq.idx.kspace_encode_step_1] = data
    except AmbientMedError:
        raise
    except Exception as exc:
        raise AmbientMedError(
            f"'{path.name}': ISMRMRD data unreadable ({exc.__class__.__name__})"
        ) from None
    finally:
        dataset.close()
    return RawKspace(kspace, infer_line_mask(kspace), _header_keys(xml), "ismrmrd")


def read_raw(path: Path, max_voxels: int) -> RawKspace:
    """fastMRI or ISMRMRD, whichever the file is."""
    if is_ismrmrd(path):
        return read_ismrmrd(path, max_voxels)
    return read_fastmri(path, max_voxels)


def fit_kspace(
    kspace: np.ndarray, line_mask: np.ndarray, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Centre-crops (or zero-pads) k-space to ``size x size``: the image keeps its field of view
    at the resolution ``size`` allows. Returns the new k-space and line mask.

    Cropping k-space rather than resizing images is the only resampling that keeps the
    measurements measurements: every kept sample is one the scanner acquired.
    """
    *lead, height, width = kspace.shape
    out = np.zeros((*lead, size, size), dtype=kspace.dtype)
    mask = np.zeros((*line_mask.shape[:-1], size), dtype=bool)

    def window(n: int) -> tuple[slice, slice]:
        if n >= size:
            start = n // 2 - size // 2
            return slice(start, start + size), slice(0, size)
        start = size // 2 - n // 2
        return slice(0, n), slice(start, start + n)

    (src_h, dst_h), (src_w, dst_w) = window(height), window(width)
    out[..., dst_h, dst_w] = kspace[..., src_h, src_w]
    mask[..., dst_w] = line_mask[..., src_w]
    return out, mask


def calibrate(
    kspace: np.ndarray,
    line_mask: np.ndarray,
    crop: float,
    name: str,
    percentile: float = 99.5,
    band: float = 0.08,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Coil maps, scaled k-space and — for fully sampled data only — magnitude images.

    Maps are ESPIRiT's from the ACS lines of each slice (ones for single-coil data). Scaling:
    the convention of image volumes (:func:`~ambient_med.io.slicing.intensity_scale`), measured
    on the SENSE-combined image of the central ``band`` of k-space columns, which every
    acquisition with that many calibration lines holds. Where a slice's calibration lines are
    narrower than the band, the lines it has are used (and a warning says so).

    Args:
        kspace: ``(slices, coils, H, W)`` complex; line_mask: ``(slices, W)``.

    Returns:
        ``(maps, kspace / scale, images or None)`` — images ``(slices, H, W)`` only when every
        line was acquired.
    """
    import torch

    from ambient_med.io.slicing import band_columns, robust_scale
    from ambient_med.physics.coils import espirit_maps
    from ambient_med.physics.masks import acs_lines
    from ambient_med.physics.operators import MultiCoilSense

    slices, coils = kspace.shape[:2]
    if coils == 1:
        maps = np.ones_like(kspace)
    else:
        try:
            maps = np.stack([espirit_maps(kspace[s], line_mask[s], crop) for s in range(slices)])
        except AmbientMedError as exc:
            raise AmbientMedError(f"'{name}': {exc}") from None
    wanted = torch.from_numpy(band_columns(kspace.shape[-1], band))
    central = acs_lines(torch.from_numpy(line_mask)) & wanted
    if (central.sum(-1) < wanted.sum()).any():
        log.warning(
            "'%s': calibration lines narrower than ingest.intensity_band (%d of %d central "
            "columns): its intensity scale is measured on fewer",
            name,
            int(central.sum(-1).min()),
            int(wanted.sum()),
        )
    maps_t = torch.from_numpy(maps)
    measured = torch.view_as_real(torch.from_numpy(kspace))
    magnitude = MultiCoilSense(central, maps_t).A_adjoint(measured).square().sum(1).sqrt()
    scale = robust_scale(magnitude.numpy(), percentile)
    if not scale > 0:
        raise AmbientMedError(f"'{name}': the central k-space lines hold no signal")
    images = None
    if bool(line_mask.all()):
        full = MultiCoilSense(torch.from_numpy(line_mask), maps_t).A_adjoint(measured / scale)
        images = full.square().sum(1).sqrt().numpy().astype(np.float32)
    return maps.astype(np.complex64), (kspace / scale).astype(np.complex64), images
