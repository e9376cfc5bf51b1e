"""DICOM series → canonical RAS volumes (pydicom).

Files are grouped by SeriesInstanceUID, slices are ordered by their position along the slice
normal (never by InstanceNumber or file name), and RescaleSlope/Intercept are applied.
Identifying attributes are read only to derive a pseudonym and are never returned in messages.
"""

from __future__ import annotations

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


@dataclass
class SeriesFiles:
    """The files of one series with the header fields needed to assemble it."""

    files: list[Path] = field(default_factory=list)
    headers: list[pydicom.Dataset] = field(default_factory=list)


@dataclass
class DicomVolume:
    files: list[Path]
    data: np.ndarray  # (X, Y, Z) float32, canonical RAS
    affine: np.ndarray  # (4, 4) RAS
    identity_keys: tuple[str, str]  # (PatientID, StudyInstanceUID): for the pseudonym only


def read_header(path: Path) -> pydicom.Dataset | None:
    """The header without pixel data, or None when the file is not DICOM."""
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, EOFError, OSError, ValueError, TypeError, KeyError):
        return None


def group_series(
    headers: dict[Path, pydicom.Dataset],
) -> tuple[dict[str, SeriesFiles], dict[Path, str]]:
    """Groups DICOM headers by SeriesInstanceUID.

    Returns:
        (series by uid, skipped files with the reason a radiographer would accept).
    """
    series: dict[str, SeriesFiles] = defaultdict(SeriesFiles)
    skipped: dict[Path, str] = {}
    for path, ds in headers.items():
        modality = str(ds.get("Modality", ""))
        if modality != "MR":
            skipped[path] = f"modality {modality or 'missing'} is not MR"
        elif "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds:
            skipped[path] = "no ImagePositionPatient/ImageOrientationPatient (not a placed image)"
        elif "SeriesInstanceUID" not in ds:
            skipped[path] = "no SeriesInstanceUID"
        else:
            group = series[str(ds.SeriesInstanceUID)]
            group.files.append(path)
            group.headers.append(ds)
    return dict(series), skipped


def _orientation(ds: pydicom.Dataset) -> tuple[np.ndarray, np.ndarray]:
    iop = np.asarray(ds.ImageOrientationPatient, dtype=np.float64)
    return iop[:3], iop[3:]


def assemble_series(group: SeriesFiles, max_voxels: int) -> DicomVolume:
    """Stacks one series into a canonical RAS volume.

    Raises:
        AmbientMedError: inconsistent orientation, duplicate positions, differing slice sizes,
            a volume over ``max_voxels`` (checked before any pixel is read), missing pixels.
    """
    first = group.headers[0]
    row_cos, col_cos = _orientation(first)
    for ds in group.headers[1:]:
        r, c = _orientation(ds)
        if not (np.allclose(r, row_cos, atol=1e-4) and np.allclose(c, col_cos, atol=1e-4)):
            raise AmbientMedError("series has slices with inconsistent ImageOrientationPatient")
    sizes = {(int(ds.Rows), int(ds.Columns)) for ds in group.headers}
    if len(sizes) != 1:
        raise AmbientMedError(f"series mixes slice sizes {sorted(sizes)}")
    rows, cols = sizes.pop()
    frames = len(group.headers)
    if rows * cols * frames > max_voxels:
        raise AmbientMedError(
            f"series of {frames} slices of {rows}x{cols} exceeds ingest.max_voxels={max_voxels}"
        )
    normal = np.cross(row_cos, col_cos)
    positions = np.array(
        [np.asarray(ds.ImagePositionPatient, dtype=np.float64) for ds in group.headers]
    )
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    if frames > 1 and np.min(np.diff(along[order])) < 1e-3:
        raise AmbientMedError("series has two slices at the same position")

    pixel_spacing = np.asarray(first.get("PixelSpacing", [1.0, 1.0]), dtype=np.float64)
    planes = []
    for idx in order:
        path = group.files[idx]
        try:
            ds = pydicom.dcmread(path)
            pixels = ds.pixel_array.astype(np.float32)
        except AttributeError:
            raise AmbientMedError(f"'{path.name}': no PixelData") from None
        except Exception as exc:
            raise AmbientMedError(
                f"'{path.name}': pixel data unreadable ({exc.__class__.__name__})"
            ) from None
        slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
        planes.append(pixels * slope + intercept)

    # Voxel (i, j, k) = column i, row j of the k-th slice along the normal.
    data = np.stack([plane.T for plane in planes], axis=-1)
    affine_lps = np.eye(4)
    affine_lps[:3, 0] = row_cos * pixel_spacing[1]
    affine_lps[:3, 1] = col_cos * pixel_spacing[0]
    if frames > 1:
        affine_lps[:3, 2] = (positions[order[-1]] - positions[order[0]]) / (frames - 1)
    else:
        affine_lps[:3, 2] = normal * float(first.get("SliceThickness", 1.0) or 1.0)
    affine_lps[:3, 3] = positions[order[0]]
    image = nib.as_closest_canonical(nib.Nifti1Image(data, LPS_TO_RAS @ affine_lps))
    keys = (str(first.get("PatientID", "")), str(first.get("StudyInstanceUID", "")))
    return DicomVolume(
        files=[group.files[i] for i in order],
        data=np.asarray(image.dataobj, dtype=np.float32),
        affine=image.affine,
        identity_keys=keys,
    )
