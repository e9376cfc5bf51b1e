"""DICOM series → canonical RAS volumes (pydicom, with pylibjpeg/pyjpegls pixel handlers).

Handles what scanners and PACS export: single-frame files and Enhanced (multi-frame) MR, any
transfer syntax pydicom's handlers decode (JPEG baseline/lossless, JPEG 2000, JPEG-LS, RLE,
implicit VR, big endian), MONOCHROME1, signed and unsigned pixels, per-frame rescale.
Files are grouped by SeriesInstanceUID and frames ordered by their position along the slice
normal — never by InstanceNumber or file name. Localizers, projections, non-MR and non-image
objects are skipped with a stated reason. Identifying attributes are read only to derive a
pseudonym and never appear in a message.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from ambient_med.errors import AmbientMedError

# DICOM patient coordinates are LPS; NIfTI/nibabel world coordinates are RAS.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
LOCALIZER_WORDS = re.compile(
    r"locali[sz]er|scout|survey|pilot|3[- ]?plane|tri[- ]?plane|aahscout|plan_", re.I
)


@dataclass
class Frame:
    """One 2-D image of a series: a single-frame file or one frame of a multi-frame file."""

    path: Path
    frame: int | None
    position: np.ndarray  # ImagePositionPatient (LPS, mm)
    orientation: np.ndarray  # ImageOrientationPatient: row cosines, then column cosines
    spacing: tuple[float, float]  # PixelSpacing: between rows, between columns (mm)
    rows: int
    columns: int
    slope: float
    intercept: float


@dataclass
class SeriesFrames:
    frames: list[Frame] = field(default_factory=list)
    identity_keys: tuple[str, str] = ("", "")
    datasets: dict[Path, pydicom.Dataset] = field(default_factory=dict)


@dataclass
class DicomVolume:
    files: list[Path]
    frame_files: list[Path]  # the file of each axial plane, in volume order
    data: np.ndarray  # (X, Y, Z) float32, canonical RAS
    affine: np.ndarray  # (4, 4) RAS
    identity_keys: tuple[str, str]  # (PatientID, StudyInstanceUID): for the pseudonym only


def read_header(path: Path) -> pydicom.Dataset | None:
    """The dataset with its pixel data deferred (read from the file only when decoded), or
    None when the file is not DICOM. One parse per file serves grouping and decoding."""
    try:
        return pydicom.dcmread(path, defer_size="64 KB")
    except (InvalidDicomError, EOFError, OSError, ValueError, TypeError, KeyError, IndexError):
        return None


def is_dicomdir(path: Path, ds: pydicom.Dataset) -> bool:
    sop = ds.file_meta.get("MediaStorageSOPClassUID", "") if hasattr(ds, "file_meta") else ""
    return path.name.upper().startswith("DICOMDIR") or str(sop) == MEDIA_STORAGE_DIRECTORY


def skip_reason(ds: pydicom.Dataset) -> str | None:
    """Why a DICOM object is not an MR slice stack a model should learn from, or None."""
    if "SOPClassUID" not in ds and "Modality" not in ds:
        return "damaged or truncated DICOM header (no SOPClassUID or Modality)"
    modality = str(ds.get("Modality", ""))
    if modality != "MR":
        return f"modality {modality or 'missing'} is not MR"
    if "Rows" not in ds or "Columns" not in ds:
        return "not an image object (no Rows/Columns)"
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    description = " ".join(str(ds.get(tag, "")) for tag in ("SeriesDescription", "ProtocolName"))
    if "LOCALIZER" in image_type or LOCALIZER_WORDS.search(description):
        return "localizer/scout, not a diagnostic slice stack"
    if any("PROJECTION" in v for v in image_type):
        return "projection image (MIP), not a slice"
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        return "colour image, not MR magnitude"
    return None


def _functional(ds: pydicom.Dataset, frame: int, sequence: str) -> pydicom.Dataset | None:
    """An item of a functional group macro: per-frame first, then shared."""
    for groups, index in (
        ("PerFrameFunctionalGroupsSequence", frame),
        ("SharedFunctionalGroupsSequence", 0),
    ):
        items = ds.get(groups)
        if items and len(items) > index and sequence in items[index]:
            return items[index][sequence][0]
    return None


def frames_of(path: Path, ds: pydicom.Dataset) -> list[Frame]:
    """The frames of a DICOM file with their geometry.

    Raises:
        AmbientMedError: no usable geometry.
    """
    rows, columns = int(ds.Rows), int(ds.Columns)
    count = int(ds.get("NumberOfFrames", 1) or 1)
    if count > 1 and "PerFrameFunctionalGroupsSequence" in ds:
        frames = []
        for i in range(count):
            position = _functional(ds, i, "PlanePositionSequence")
            orientation = _functional(ds, i, "PlaneOrientationSequence")
            measures = _functional(ds, i, "PixelMeasuresSequence")
            transform = _functional(ds, i, "PixelValueTransformationSequence")
            if position is None or orientation is None:
                raise AmbientMedError("multi-frame file without per-frame plane position")
            frames.append(
                Frame(
                    path,
                    i,
                    np.asarray(position.ImagePositionPatient, dtype=np.float64),
                    np.asarray(orientation.ImageOrientationPatient, dtype=np.float64),
                    tuple(float(v) for v in (measures or ds).get("PixelSpacing", [1.0, 1.0])),
                    rows,
                    columns,
                    float((transform or ds).get("RescaleSlope", 1.0) or 1.0),
                    float((transform or ds).get("RescaleIntercept", 0.0) or 0.0),
                )
            )
        return frames
    if count > 1:
        raise AmbientMedError("multi-frame file without functional groups (legacy multi-frame)")
    if "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds:
        raise AmbientMedError("no ImagePositionPatient/ImageOrientationPatient")
    return [
        Frame(
            path,
            None,
            np.asarray(ds.ImagePositionPatient, dtype=np.float64),
            np.asarray(ds.ImageOrientationPatient, dtype=np.float64),
            tuple(float(v) for v in ds.get("PixelSpacing", [1.0, 1.0])),
            rows,
            columns,
            float(ds.get("RescaleSlope", 1.0) or 1.0),
            float(ds.get("RescaleIntercept", 0.0) or 0.0),
        )
    ]


def group_series(
    headers: dict[Path, pydicom.Dataset],
) -> tuple[dict[str, SeriesFrames], dict[Path, str]]:
    """Groups the frames of DICOM headers by SeriesInstanceUID.

    Returns:
        (series by uid, skipped files with the reason a radiographer would accept).
    """
    series: dict[str, SeriesFrames] = defaultdict(SeriesFrames)
    skipped: dict[Path, str] = {}
    seen_instances: dict[str, Path] = {}
    for path, ds in headers.items():
        if is_dicomdir(path, ds):
            skipped[path] = "DICOMDIR (a directory index, no image)"
            continue
        reason = skip_reason(ds)
        if reason is None and "SeriesInstanceUID" not in ds:
            reason = "no SeriesInstanceUID"
        sop = str(ds.get("SOPInstanceUID", ""))
        if reason is None and sop in seen_instances:
            reason = (
                f"duplicate of the same instance (SOPInstanceUID) in '{seen_instances[sop].name}'"
            )
        if reason is None:
            try:
                frames = frames_of(path, ds)
            except AmbientMedError as exc:
                reason = str(exc)
        if reason is not None:
            skipped[path] = reason
            continue
        seen_instances[sop] = path
        group = series[str(ds.SeriesInstanceUID)]
        group.frames.extend(frames)
        group.datasets[path] = ds
        group.identity_keys = (str(ds.get("PatientID", "")), str(ds.get("StudyInstanceUID", "")))
    return dict(series), skipped


def _read_pixels(path: Path, ds: pydicom.Dataset | None = None) -> np.ndarray:
    """All frames of a file as float32 ``(frames, rows, cols)``, MONOCHROME1 inverted."""
    if ds is None:
        try:
            ds = pydicom.dcmread(path)
        except Exception as exc:
            raise AmbientMedError(f"'{path.name}': unreadable ({exc.__class__.__name__})") from None
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        raise AmbientMedError(f"'{path.name}': no PixelData")
    try:
        pixels = ds.pixel_array
    except Exception as exc:
        # One line, without pydicom's multi-line hints.
        detail = str(exc).splitlines()[0][:120] if str(exc) else exc.__class__.__name__
        raise AmbientMedError(f"'{path.name}': pixel data unreadable ({detail})") from None
    pixels = pixels.astype(np.float32)
    if pixels.ndim == 2:
        pixels = pixels[None]
    if str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":
        # MONOCHROME1 shows the minimum as white: invert within the stored range so that, as
        # in MONOCHROME2, higher values mean more signal.
        bits = int(ds.get("BitsStored", 16))
        if int(ds.get("PixelRepresentation", 0)) == 1:
            pixels = -1.0 - pixels
        else:
            pixels = float(2**bits - 1) - pixels
    return pixels


def _volume(frames: list[Frame], planes: list[np.ndarray], keys: tuple[str, str]) -> DicomVolume:
    """A canonical RAS volume from frames already ordered along the normal."""
    first = frames[0]
    row_cos, col_cos = first.orientation[:3], first.orientation[3:]
    # Voxel (i, j, k) = column i, row j of the k-th plane along the normal.
    data = np.stack([plane.T for plane in planes], axis=-1)
    affine_lps = np.eye(4)
    affine_lps[:3, 0] = row_cos * first.spacing[1]
    affine_lps[:3, 1] = col_cos * first.spacing[0]
    if len(frames) > 1:
        affine_lps[:3, 2] = (frames[-1].position - frames[0].position) / (len(frames) - 1)
    else:
        affine_lps[:3, 2] = np.cross(row_cos, col_cos)
    affine_lps[:3, 3] = first.position
    image = nib.as_closest_canonical(nib.Nifti1Image(data, LPS_TO_RAS @ affine_lps))
    return DicomVolume(
        files=sorted({f.path for f in frames}),
        frame_files=[f.path for f in frames],
        data=np.asarray(image.dataobj, dtype=np.float32),
        affine=image.affine,
        identity_keys=keys,
    )


def assemble_series(
    group: SeriesFrames, max_voxels: int
) -> tuple[list[DicomVolume], dict[Path, str]]:
    """Stacks one series into canonical RAS volumes.

    A file whose pixels cannot be decoded is dropped (and returned with its reason); the
    series is then split at any gap in the slice positions, so the rest is still used with
    correct geometry.

    Returns:
        (volumes, {dropped file: reason}).

    Raises:
        AmbientMedError: the whole series is unusable — inconsistent orientation, duplicate
            positions, differing slice sizes, or over ``max_voxels`` (checked before any
            pixel is read).
    """
    frames = group.frames
    first = frames[0]
    for frame in frames[1:]:
        if not np.allclose(frame.orientation, first.orientation, atol=1e-4):
            raise AmbientMedError("slices with inconsistent ImageOrientationPatient")
    sizes = {(f.rows, f.columns) for f in frames}
    if len(sizes) != 1:
        raise AmbientMedError(f"slices of different sizes {sorted(sizes)}")
    rows, cols = sizes.pop()
    if rows * cols * len(frames) > max_voxels:
        raise AmbientMedError(
            f"{len(frames)} slices of {rows}x{cols} exceed ingest.max_voxels={max_voxels}"
        )
    normal = np.cross(first.orientation[:3], first.orientation[3:])
    along = np.array([f.position @ normal for f in frames])
    order = np.argsort(along, kind="stable")
    steps = np.diff(along[order])
    if len(frames) > 1 and np.min(steps) < 1e-3:
        raise AmbientMedError("two slices at the same position")
    spacing = float(np.median(steps)) if len(steps) else 0.0

    pixels_of: dict[Path, np.ndarray] = {}
    dropped: dict[Path, str] = {}
    for frame in frames:
        if frame.path in pixels_of or frame.path in dropped:
            continue
        try:
            pixels = _read_pixels(frame.path, group.datasets.get(frame.path))
            if pixels.shape[1:] != (rows, cols):
                raise AmbientMedError(f"'{frame.path.name}': pixel data is not {rows}x{cols}")
            pixels_of[frame.path] = pixels
        except AmbientMedError as exc:
            dropped[frame.path] = str(exc)

    # Contiguous runs of decodable frames: a dropped or missing slice starts a new run.
    runs: list[list[int]] = []
    previous = None
    for idx in order:
        if frames[idx].path in dropped:
            previous = None
            continue
        gap = previous is not None and along[idx] - along[previous] > 1.5 * spacing
        if previous is None or gap:
            runs.append([])
        runs[-1].append(int(idx))
        previous = idx
    volumes = []
    for run in runs:
        run_frames = [frames[i] for i in run]
        planes = [pixels_of[f.path][f.frame or 0] * f.slope + f.intercept for f in run_frames]
        volumes.append(_volume(run_frames, planes, group.identity_keys))
    return volumes, dropped
