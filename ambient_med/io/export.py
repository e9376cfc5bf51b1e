"""Writers for what people open: NIfTI volumes of slices, PNG grids and plots, atomically."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from ambient_med.evaluation.figures import save_grid
from ambient_med.io.store import atomic_path


def write_slice_volume(path: str | Path, slices: np.ndarray, affine: np.ndarray) -> None:
    """``(N, H, W)`` slices → a NIfTI volume ``(H, W, N)`` (float32)."""
    volume = np.ascontiguousarray(np.moveaxis(slices.astype(np.float32), 0, -1))
    image = nib.Nifti1Image(volume, affine)
    image.set_sform(affine, code=2)
    image.set_qform(affine, code=2)
    with atomic_path(path) as tmp:
        # nibabel picks compression from the suffix, so write under the final name's suffix.
        staged = tmp.with_name(tmp.name + "".join(Path(path).suffixes))
        try:
            nib.save(image, str(staged))
            staged.replace(tmp)
        finally:
            staged.unlink(missing_ok=True)


def write_png_grid(path: str | Path, images: np.ndarray, columns: int = 4) -> None:
    with atomic_path(path) as tmp:
        save_grid(tmp, images, columns)


# pydicom's UID root; UIDs are derived deterministically from names, so reruns match.
UID_PREFIX = "1.2.826.0.1.3680043.8.498."


def mr_slice_dataset(
    sop_uid: str,
    series_uids: tuple[str, str, str],
    position_lps: np.ndarray,
    row_cos: np.ndarray,
    col_cos: np.ndarray,
    spacing: np.ndarray,
    shape: tuple[int, int],
):
    """An MR Image Storage dataset with file meta, UIDs and slice geometry, no pixels yet.

    Args:
        series_uids: (StudyInstanceUID, SeriesInstanceUID, FrameOfReferenceUID).
        position_lps: ImagePositionPatient of the first pixel (LPS, mm).
        row_cos, col_cos: direction cosines of rows and columns (LPS).
        spacing: voxel sizes (x, y, z) in mm of the grid; PixelSpacing is (y, x).
        shape: (Rows, Columns).
    """
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, sop_uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = series_uids
    ds.Modality = "MR"
    ds.ImagePositionPatient = [round(float(v), 4) for v in position_lps]
    ds.ImageOrientationPatient = [round(float(v), 6) for v in (*row_cos, *col_cos)]
    ds.PixelSpacing = [round(float(spacing[1]), 6), round(float(spacing[0]), 6)]
    ds.SliceThickness = round(float(spacing[2]), 6)
    ds.Rows, ds.Columns = shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    return ds


def write_derived_series(
    folder: str | Path,
    slices: np.ndarray,
    affine: np.ndarray,
    subject: str,
    description: str,
    uid_seed: str,
) -> None:
    """A derived DICOM series (MR Image Storage) of reconstructed axial slices.

    New UIDs (deterministic in ``uid_seed``), ImageType DERIVED\\SECONDARY, geometry from the
    RAS ``affine`` of the ``(H, W, N)`` grid, and no identifying attribute: PatientID is the
    pseudonym and PatientName is empty. Written to a temporary folder, then renamed.

    Args:
        slices: ``(N, H, W)`` magnitudes; pixel ``[r, c]`` of slice ``k`` is voxel ``(c, r, k)``.
    """
    import shutil

    from pydicom.uid import generate_uid

    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.part")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    ras_to_lps = np.diag([-1.0, -1.0, 1.0])
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    row_cos = ras_to_lps @ (affine[:3, 0] / spacing[0])
    col_cos = ras_to_lps @ (affine[:3, 1] / spacing[1])
    peak = float(slices.max()) or 1.0
    slope = peak / 4095.0
    stored = np.clip(np.round(slices / slope), 0, 4095).astype(np.uint16)
    uids = tuple(
        generate_uid(UID_PREFIX, [uid_seed, part]) for part in ("study", "series", "frame")
    )
    for k in range(len(slices)):
        position = ras_to_lps @ (affine @ np.array([0.0, 0.0, k, 1.0]))[:3]
        ds = mr_slice_dataset(
            generate_uid(UID_PREFIX, [uid_seed, "sop", str(k)]),
            uids,
            position,
            row_cos,
            col_cos,
            spacing,
            (slices.shape[2], slices.shape[1]),
        )
        ds.ImageType = ["DERIVED", "SECONDARY"]
        ds.SeriesDescription = description[:64]
        ds.PatientName = ""
        ds.PatientID = subject
        ds.PatientBirthDate = ""
        ds.PatientSex = ""
        ds.StudyDate = ""
        ds.StudyTime = ""
        ds.AccessionNumber = ""
        ds.ReferringPhysicianName = ""
        ds.StudyID = ""
        ds.SeriesNumber = 900
        ds.InstanceNumber = k + 1
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
        ds.PixelRepresentation = 0
        ds.RescaleSlope, ds.RescaleIntercept = round(slope, 10), 0.0
        ds.PixelData = np.ascontiguousarray(stored[k].T).tobytes()
        ds.save_as(tmp / f"IM{k + 1:04d}.dcm", enforce_file_format=True)
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)


def write_table(path: str | Path, record: dict) -> None:
    """A flat record as a two-column TSV (key, value): Snakemake's report shows it as a table."""
    lines = ["key\tvalue"]
    for key in sorted(record):
        value = record[key]
        if isinstance(value, float):
            value = f"{value:.6g}"
        lines.append(f"{key}\t{value}")
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
