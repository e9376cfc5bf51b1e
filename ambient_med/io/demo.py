"""The demo cohort: hospital-shaped inputs made from the ICBM 2009a T1 template.

The template ships inside nilearn's wheel, so no download happens. Copyright (C) 1993-2009
Louis Collins, McConnell Brain Imaging Centre, Montreal Neurological Institute, McGill
University; see README.md for the full notice. Subject 0 is the template itself; the others
are seeded random affine + elastic deformations with a bias field and a contrast change
(MONAI transforms), so the cohort is not one brain. Subjects are written alternately as NIfTI
volumes and as DICOM series (MR Image Storage, one file per slice) carrying made-up
identifying tags, so that de-identification can be seen to work.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.transforms import Rand3DElastic, RandAdjustContrast, RandBiasField
from pydicom.uid import generate_uid
from scipy import ndimage

from ambient_med.errors import AmbientMedError
from ambient_med.io.export import UID_PREFIX, mr_slice_dataset
from ambient_med.physics.masks import derive_seed

TEMPLATE_FILE = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"


def template_path() -> Path:
    """Path of the template inside nilearn's installed package."""
    try:
        import nilearn
    except ImportError:
        raise AmbientMedError(
            "the demo cohort needs nilearn<0.14 (pip install 'nilearn<0.14')"
        ) from None
    path = Path(nilearn.__file__).parent / "datasets" / "data" / TEMPLATE_FILE
    if not path.is_file():
        raise AmbientMedError(f"nilearn {nilearn.__version__} does not ship {TEMPLATE_FILE}")
    return path


def load_template(voxel_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """The template as float32 (X, Y, Z) in RAS, resampled to ``voxel_mm`` isotropic."""
    image = nib.as_closest_canonical(nib.load(str(template_path())))
    data = np.asarray(image.dataobj, dtype=np.float32)
    affine = image.affine.copy()
    if voxel_mm != 1.0:
        zoom = 1.0 / voxel_mm
        data = ndimage.zoom(data, zoom, order=1, prefilter=False).astype(np.float32)
        affine[:3, :3] = affine[:3, :3] * voxel_mm
    return data, affine


def pseudo_subject(template: np.ndarray, seed: int, voxel_mm: float) -> np.ndarray:
    """A seeded random deformation and intensity change of the template."""
    mm = 1.0 / voxel_mm
    elastic = Rand3DElastic(
        sigma_range=(6 * mm, 8 * mm),
        magnitude_range=(100 * mm, 200 * mm),
        prob=1.0,
        rotate_range=(0.12, 0.12, 0.12),
        scale_range=(0.08, 0.08, 0.08),
        translate_range=(4 * mm, 4 * mm, 4 * mm),
        padding_mode="zeros",
    )
    bias = RandBiasField(prob=1.0, coeff_range=(0.1, 0.25))
    contrast = RandAdjustContrast(prob=1.0, gamma=(0.8, 1.25))
    image = torch.from_numpy(template)[None]
    for offset, transform in enumerate((elastic, bias, contrast)):
        transform.set_random_state(seed=derive_seed(seed, "demo-transform", offset))
        image = transform(image)
    data = np.asarray(image[0], dtype=np.float32)
    return np.clip(data, 0.0, None)


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray, flip_x: bool) -> None:
    """Writes a float32 NIfTI; ``flip_x`` stores it as LAS, to exercise reorientation."""
    if flip_x:
        flip = np.eye(4)
        flip[0, 0] = -1
        flip[0, 3] = data.shape[0] - 1
        data = data[::-1]
        affine = affine @ flip
    image = nib.Nifti1Image(np.ascontiguousarray(data), affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    nib.save(image, str(path))


def write_dicom_series(
    folder: Path,
    data: np.ndarray,
    affine: np.ndarray,
    subject: int,
    seed: int,
    identity: dict[str, str] | None = None,
) -> None:
    """Writes a RAS volume as an axial MR series, one file per slice, standard orientation.

    Pixel ``[r, c]`` of slice ``k`` is voxel ``(X-1-c, Y-1-r, k)``, so rows run anterior →
    posterior and columns right → left (patient's left on the image right is DICOM's usual
    axial view: row cosine (1, 0, 0), column cosine (0, 1, 0) in LPS). Intensities are stored
    as int16 with RescaleSlope/Intercept. Files are named by a hash and numbered against the
    slice order, so a reader must sort by geometry. ``identity`` overrides the made-up
    patient attributes (PatientName, PatientID, PatientBirthDate, InstitutionName, ...).
    """
    folder.mkdir(parents=True, exist_ok=True)
    nx, ny, nz = data.shape
    slope, intercept = 0.05, -10.0
    stored = np.round((data - intercept) / slope).astype(np.int16)
    ras_to_lps = np.diag([-1.0, -1.0, 1.0])
    row_cos = ras_to_lps @ (-affine[:3, 0] / np.linalg.norm(affine[:3, 0]))
    col_cos = ras_to_lps @ (-affine[:3, 1] / np.linalg.norm(affine[:3, 1]))
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    uids = tuple(
        generate_uid(UID_PREFIX, [str(seed), part, str(subject)])
        for part in ("study", "series", "frame")
    )
    birth = datetime.date(1950, 1, 1) + datetime.timedelta(days=997 * subject + 123)
    for k in range(nz):
        position = ras_to_lps @ (affine @ np.array([nx - 1, ny - 1, k, 1.0]))[:3]
        ds = mr_slice_dataset(
            generate_uid(UID_PREFIX, [str(seed), "sop", str(subject), str(k)]),
            uids,
            position,
            row_cos,
            col_cos,
            spacing,
            (ny, nx),
        )
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
        ds.SeriesDescription = "T1 demo (ICBM 2009a derived)"
        # Made-up identifying attributes: ingest must never let these reach an output.
        ds.PatientName = f"DEMOPATIENT^SUBJECT{subject:02d}"
        ds.PatientID = f"DEMO-PID-{subject:02d}-7Q4"
        ds.PatientBirthDate = birth.strftime("%Y%m%d")
        ds.PatientSex = "O"
        ds.InstitutionName = "AMBIENT DEMO HOSPITAL"
        ds.StudyDate = "20260101"
        ds.PatientPosition = "HFS"
        for keyword, value in (identity or {}).items():
            setattr(ds, keyword, value)
        ds.SeriesNumber = 1
        ds.InstanceNumber = nz - k  # deliberately against the slice order
        ds.SpacingBetweenSlices = round(float(spacing[2]), 6)
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept
        plane = stored[::-1, ::-1, k].T  # [r, c] = voxel (X-1-c, Y-1-r, k)
        ds.PixelData = np.ascontiguousarray(plane).tobytes()
        name = f"IM_{derive_seed(seed, subject, k):08x}.dcm"
        ds.save_as(folder / name, enforce_file_format=True)


def write_demo_cohort(out_dir: Path, subjects: int, voxel_mm: float, dicom_every: int, seed: int):
    """Writes the demo inputs into ``out_dir`` (atomically: a temporary folder, then a rename).

    Returns:
        One ``(relative path, format)`` per written subject.
    """
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.part")
    if tmp.exists():
        _rmtree(tmp)
    tmp.mkdir(parents=True)
    template, affine = load_template(voxel_mm)
    written = []
    for subject in range(subjects):
        volume = template if subject == 0 else pseudo_subject(template, seed + subject, voxel_mm)
        if (subject + 1) % dicom_every == 0:
            name = f"series_{subject:02d}"
            write_dicom_series(tmp / name, volume, affine, subject, seed)
            written.append((name, "dicom"))
        else:
            name = f"volume_{subject:02d}.nii.gz"
            write_nifti(tmp / name, volume, affine, flip_x=subject % 4 == 2)
            written.append((name, "nifti"))
    if out_dir.exists():
        _rmtree(out_dir)
    os.replace(tmp, out_dir)
    return written


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path)


def simulate_multicoil_kspace(images: np.ndarray, coils: int, seed: int) -> np.ndarray:
    """Fully sampled multi-coil k-space of magnitude slices (DESIGN.md §6).

    Each slice gets birdcage coil maps (sigpy), normalised so that ``Σ_c |S_c|² = 1``, and a
    seeded smooth (low-order polynomial) phase, as real acquisitions have; then the centred
    orthonormal 2-D FFT. Phase encoding runs along the last axis.

    Args:
        images: ``(N, H, W)`` real slices.

    Returns:
        ``(N, coils, H, W)`` complex64 k-space.
    """
    from ambient_med.physics.coils import birdcage

    n, height, width = images.shape
    maps = birdcage(coils, height, width)
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.linspace(-1, 1, height), np.linspace(-1, 1, width), indexing="ij")
    out = np.empty((n, coils, height, width), dtype=np.complex64)
    for i in range(n):
        a, b, c, d = rng.uniform(-1.0, 1.0, size=4)
        phase = np.exp(1j * np.pi * (a * xx + b * yy + 0.5 * c * xx * yy + 0.25 * d))
        coil_images = maps * (images[i] * phase)[None]
        shifted = np.fft.ifftshift(coil_images, axes=(-2, -1))
        out[i] = np.fft.fftshift(np.fft.fft2(shifted, norm="ortho"), axes=(-2, -1))
    return out


def write_fastmri(
    path: Path, kspace: np.ndarray, line_mask: np.ndarray | None = None, with_mask: bool = True
) -> None:
    """Writes a fastMRI-style HDF5 file: ``kspace`` (slices, coils, H, W) complex64, zeroed on
    unacquired lines when ``line_mask`` (W,) is given, plus a ``mask`` dataset if asked."""
    import h5py

    data = kspace.astype(np.complex64)
    with h5py.File(path, "w") as handle:
        if line_mask is not None:
            data = data * line_mask[None, None, None, :]
            if with_mask:
                handle.create_dataset("mask", data=line_mask.astype(bool))
        handle.create_dataset("kspace", data=data)
        handle.attrs["acquisition"] = "AXT1_DEMO"
