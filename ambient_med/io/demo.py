"""The demo cohort: synthetic, hospital-shaped inputs built from the ICBM 2009a maps.

What it is: subjects synthesised from the tissue probability maps that ship inside nilearn's
wheel (the ICBM 2009a nonlinear symmetric T1, grey- and white-matter maps), in the manner of
SynthSeg (Billot et al., 2023): a strong random affine + elastic deformation, random
per-tissue intensities (T1w-like by default; T2w- and PD-like available, or a mix), a pose
that puts axial (default), coronal or sagittal planes on the slice axis, optionally a
smaller field of view (a crop of part of the brain), partial-volume mixing, a unique set of
lesions per subject, a blurred point-spread function, a bias field and a Rician noise
floor, so that the background is not exactly zero. The undeformed
template is never a subject. What it is not: real scans. It exercises the whole workflow and
gives the benchmarks distinct subjects with shared anatomy, nothing more.

The template data are Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre,
Montreal Neurological Institute, McGill University; see README.md for the full notice.
Subjects are written alternately as NIfTI volumes and as DICOM series (MR Image Storage, one
file per slice) carrying made-up identifying tags, so that de-identification can be seen to
work.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.transforms import Rand3DElastic, RandBiasField
from pydicom.uid import generate_uid
from scipy import ndimage

from ambient_med.errors import AmbientMedError
from ambient_med.io.export import UID_PREFIX, mr_slice_dataset
from ambient_med.physics.masks import derive_seed

TEMPLATE_FILE = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
TISSUE_FILES = {
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
# Channels of the tissue stack; background is what they leave of 1.
TISSUES = ("wm", "gm", "csf", "skull", "scalp", "lesion")
# Mean intensity ranges per tissue and contrast (WM of T1w ≈ 1). Lesions: T1-hypointense,
# T2/PD-hyperintense, as demyelinating or vascular white-matter lesions appear.
CONTRASTS: dict[str, dict[str, tuple[float, float]]] = {
    "t1w": {
        "wm": (0.85, 1.0),
        "gm": (0.45, 0.65),
        "csf": (0.08, 0.22),
        "skull": (0.02, 0.08),
        "scalp": (0.6, 1.0),
        "lesion": (0.25, 0.5),
    },
    "t2w": {
        "wm": (0.3, 0.42),
        "gm": (0.5, 0.65),
        "csf": (0.9, 1.0),
        "skull": (0.02, 0.08),
        "scalp": (0.35, 0.6),
        "lesion": (0.7, 0.9),
    },
    "pd": {
        "wm": (0.6, 0.7),
        "gm": (0.75, 0.88),
        "csf": (0.85, 1.0),
        "skull": (0.03, 0.1),
        "scalp": (0.6, 0.85),
        "lesion": (0.85, 1.0),
    },
}
# Written volumes are scaled so that intensity 1 of the table above is this value.
INTENSITY_SCALE = 200.0


def _nilearn_data(name: str) -> Path:
    try:
        import nilearn
    except ImportError:
        raise AmbientMedError(
            "the demo cohort needs nilearn<0.14 (pip install 'nilearn<0.14')"
        ) from None
    path = Path(nilearn.__file__).parent / "datasets" / "data" / name
    if not path.is_file():
        raise AmbientMedError(f"nilearn {nilearn.__version__} does not ship {name}")
    return path


def template_path() -> Path:
    """Path of the T1 template inside nilearn's installed package."""
    return _nilearn_data(TEMPLATE_FILE)


def _load(path: Path, voxel_mm: float) -> tuple[np.ndarray, np.ndarray]:
    image = nib.as_closest_canonical(nib.load(str(path)))
    data = np.asarray(image.dataobj, dtype=np.float32)
    affine = image.affine.copy()
    if voxel_mm != 1.0:
        data = ndimage.zoom(data, 1.0 / voxel_mm, order=1, prefilter=False).astype(np.float32)
        affine[:3, :3] = affine[:3, :3] * voxel_mm
    return data, affine


def load_template(voxel_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """The tissue stack of the template, resampled to ``voxel_mm`` isotropic, in RAS.

    Returns:
        ``(len(TISSUES), X, Y, Z)`` float32 probabilities (WM, GM, CSF, skull, scalp and an
        empty lesion channel; background = 1 − their sum) and the 4×4 affine. CSF is the
        brain mask of the skull-stripped T1 minus GM and WM; skull and scalp are shells
        outside it, made from a distance map, so the head has an outline as real scans do.
    """
    t1, affine = _load(template_path(), voxel_mm)
    gm = _load(_nilearn_data(TISSUE_FILES["gm"]), voxel_mm)[0] / 255.0
    wm = _load(_nilearn_data(TISSUE_FILES["wm"]), voxel_mm)[0] / 255.0
    brain = ndimage.binary_fill_holes(t1 > 0.02 * t1.max())
    brain_soft = ndimage.gaussian_filter(brain.astype(np.float32), 0.5 / voxel_mm)
    total = np.maximum(gm + wm, 1e-6)
    scale = np.minimum(1.0, brain_soft / total)
    gm, wm = gm * scale, wm * scale
    csf = np.clip(brain_soft - gm - wm, 0.0, 1.0)
    outside = ndimage.distance_transform_edt(~brain) * voxel_mm  # mm from the brain
    skull = ((outside > 0) & (outside <= 4.0)).astype(np.float32)
    scalp = ((outside > 4.0) & (outside <= 9.0)).astype(np.float32)
    shells = [ndimage.gaussian_filter(x, 0.7 / voxel_mm) * (1 - brain_soft) for x in (skull, scalp)]
    stack = np.stack([wm, gm, csf, *shells, np.zeros_like(wm)]).astype(np.float32)
    return np.clip(stack, 0.0, 1.0), affine


@dataclass
class Lesion:
    """One ellipsoidal lesion: centre (voxel indices), radii (mm), contrast multiplier."""

    centre: tuple[int, int, int]
    radii_mm: tuple[float, float, float]
    contrast: float


@dataclass
class SubjectInfo:
    """What made a synthetic subject: enough to tell two subjects apart in a test."""

    seed: int
    contrast: str
    intensities: dict[str, float]
    lesions: list[Lesion] = field(default_factory=list)


def _deform(tissues: np.ndarray, seed: int, voxel_mm: float) -> np.ndarray:
    """One seeded random affine + elastic deformation applied to every tissue channel."""
    mm = 1.0 / voxel_mm
    elastic = Rand3DElastic(
        sigma_range=(6 * mm, 8 * mm),
        magnitude_range=(120 * mm, 240 * mm),
        prob=1.0,
        rotate_range=(0.2, 0.2, 0.2),
        scale_range=(0.12, 0.12, 0.12),
        translate_range=(6 * mm, 6 * mm, 6 * mm),
        padding_mode="zeros",
    )
    elastic.set_random_state(seed=derive_seed(seed, "demo-deform"))
    out = elastic(torch.from_numpy(tissues))
    return np.clip(np.asarray(out, dtype=np.float32), 0.0, 1.0)


def _add_lesions(
    tissues: np.ndarray, rng: np.random.Generator, voxel_mm: float
) -> tuple[np.ndarray, list[Lesion]]:
    """Plants 1–6 soft-edged ellipsoids centred in white matter (the lesion channel takes
    their share from the tissues they overlap)."""
    wm = tissues[0]
    candidates = np.argwhere(wm > 0.6)
    lesions = []
    grid = np.indices(wm.shape, dtype=np.float32)
    lesion = np.zeros_like(wm)
    for _ in range(int(rng.integers(1, 7))):
        centre = tuple(int(v) for v in candidates[rng.integers(len(candidates))])
        radii = tuple(float(r) for r in rng.uniform(2.0, 7.0, size=3))
        distance = sum(((grid[a] - centre[a]) * voxel_mm / radii[a]) ** 2 for a in range(3)) ** 0.5
        # Soft edge: one voxel of partial volume around the ellipsoid.
        lesion = np.maximum(lesion, np.clip((1.0 - distance) * min(radii) / voxel_mm, 0, 1))
        lesions.append(Lesion(centre, radii, 0.0))
    brain = tissues[:3].sum(axis=0)
    lesion = lesion * np.clip(brain, 0.0, 1.0)
    out = tissues.copy()
    out[:3] *= 1.0 - lesion[None]
    out[TISSUES.index("lesion")] = lesion
    return out, lesions


def synthesize_subject(
    tissues: np.ndarray, seed: int, voxel_mm: float, contrast: str = "t1w"
) -> tuple[np.ndarray, SubjectInfo]:
    """One synthetic subject from the template's tissue stack (SynthSeg-style).

    Args:
        tissues: ``(len(TISSUES), X, Y, Z)`` from :func:`load_template`.
        seed: every random choice of this subject derives from it.
        contrast: ``"t1w"``, ``"t2w"`` or ``"pd"``.

    Returns:
        ``(X, Y, Z)`` float32 magnitude volume (≥ 0, noisy background) and its description.
    """
    if contrast not in CONTRASTS:
        raise AmbientMedError(
            f"config key 'demo.contrast': {contrast!r} is not one of {list(CONTRASTS)}"
        )
    rng = np.random.default_rng(derive_seed(seed, "demo-subject"))
    deformed = _deform(tissues, seed, voxel_mm)
    deformed, lesions = _add_lesions(deformed, rng, voxel_mm)
    table = CONTRASTS[contrast]
    means = {name: float(rng.uniform(*table[name])) for name in TISSUES}
    for lesion in lesions:
        lesion.contrast = means["lesion"]
    # Partial volume: each voxel mixes its tissues' intensities by their probabilities;
    # a little smooth texture per tissue keeps regions from being perfectly flat.
    volume = np.zeros(deformed.shape[1:], np.float32)
    for k, name in enumerate(TISSUES):
        texture = ndimage.gaussian_filter(
            rng.standard_normal(volume.shape).astype(np.float32), 1.5 / voxel_mm
        )
        texture /= max(float(texture.std()), 1e-6)
        volume += deformed[k] * means[name] * (1.0 + 0.04 * texture)
    volume = ndimage.gaussian_filter(volume, rng.uniform(0.3, 0.8))  # point-spread function
    bias = RandBiasField(prob=1.0, coeff_range=(0.1, 0.3))
    bias.set_random_state(seed=derive_seed(seed, "demo-bias"))
    volume = np.asarray(bias(torch.from_numpy(volume)[None])[0], dtype=np.float32)
    # Rician noise floor: the magnitude of a complex signal with Gaussian noise.
    sigma = rng.uniform(0.01, 0.025)
    real = volume + sigma * rng.standard_normal(volume.shape).astype(np.float32)
    imag = sigma * rng.standard_normal(volume.shape).astype(np.float32)
    volume = np.sqrt(real**2 + imag**2) * INTENSITY_SCALE
    info = SubjectInfo(seed, contrast, means, lesions)
    return volume.astype(np.float32), info


def pseudo_subject(
    tissues: np.ndarray, seed: int, voxel_mm: float, contrast: str = "t1w"
) -> np.ndarray:
    """The volume of :func:`synthesize_subject` (what the demo writer stores)."""
    return synthesize_subject(tissues, seed, voxel_mm, contrast)[0]


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
        ds.SeriesDescription = "synthetic demo (ICBM 2009a derived)"
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


def subject_contrast(contrast: str, seed: int, subject: int) -> str:
    """The contrast of demo subject ``subject``: the configured one, or a seeded choice per
    subject for ``"mixed"``."""
    if contrast != "mixed":
        return contrast
    names = sorted(CONTRASTS)
    return names[derive_seed(seed, "demo-contrast", subject) % len(names)]


# Which canonical axis lies along the written volume's slice axis, per plane: the head is
# posed so that an axial reader of the file sees that anatomical plane.
ORIENTATIONS: dict[str, tuple[int, int, int]] = {
    "axial": (0, 1, 2),  # slices of constant z: x right, y anterior
    "coronal": (0, 2, 1),  # constant y: x right, z superior
    "sagittal": (1, 2, 0),  # constant x: y anterior, z superior
}


def subject_orientation(orientation: str, seed: int, subject: int) -> str:
    """The slice plane of demo subject ``subject``: the configured one, or a seeded choice per
    subject for ``"mixed"``."""
    if orientation != "mixed":
        if orientation not in ORIENTATIONS:
            raise AmbientMedError(
                f"config key 'demo.orientation': {orientation!r} is not one of "
                f"{[*ORIENTATIONS, 'mixed']}"
            )
        return orientation
    names = sorted(ORIENTATIONS)
    return names[derive_seed(seed, "demo-orientation", subject) % len(names)]


def posed(volume: np.ndarray, orientation: str) -> np.ndarray:
    """``volume`` (X, Y, Z, RAS) turned so that the planes of ``orientation`` lie along its
    last axis — the subject's head posed in the scanner so that an axial reading of the file
    shows coronal or sagittal anatomy (domain randomisation of the slice plane, as SynthSeg
    randomises pose). The voxels stay isotropic, so the file's affine still fits."""
    return np.ascontiguousarray(np.transpose(volume, ORIENTATIONS[orientation]))


def subject_zoom(zoom: tuple[float, float], seed: int, subject: int) -> float:
    """The in-plane zoom of demo subject ``subject``: 1 (the whole head in the field of view)
    when ``zoom`` is ``(1, 1)``, else a seeded draw, uniform in ``[zoom[0], zoom[1]]``."""
    low, high = float(zoom[0]), float(zoom[1])
    if not 1.0 <= low <= high:
        raise AmbientMedError(f"config key 'demo.zoom': need 1 <= low <= high, got {list(zoom)}")
    if high == 1.0:
        return 1.0  # draws nothing: cohorts written before the key existed keep their bytes
    rng = np.random.default_rng(derive_seed(seed, "demo-zoom", subject))
    return float(rng.uniform(low, high))


def zoomed(
    volume: np.ndarray, affine: np.ndarray, factor: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """An in-plane crop of ``volume`` (X, Y, Z) to ``1 / factor`` of its extent, the slice axis
    kept whole, and the affine that still places its voxels — the small field of view of a
    protocol (or a cropped export) that shows part of the brain at the same voxel size.

    The window is centred on the head's centre of mass with a seeded shift of up to a quarter
    of the room it has. Domain randomisation of scale, as SynthSeg randomises resolution: a
    prior trained only on whole heads takes a brain crop for another domain.
    """
    if factor <= 1.0:
        return volume, affine
    rng = np.random.default_rng(seed)
    profile = volume.clip(min=0).sum(axis=2)
    starts = []
    for axis, size in enumerate(volume.shape[:2]):
        width = max(8, round(size / factor))
        weights = profile.sum(axis=1 - axis)
        centre = float((weights * np.arange(size)).sum() / max(weights.sum(), 1e-9))
        room = size - width
        start = centre - width / 2 + rng.uniform(-0.25, 0.25) * room
        starts.append((int(np.clip(round(start), 0, room)), width))
    (x0, wx), (y0, wy) = starts
    shifted = affine.copy()
    shifted[:3, 3] = affine[:3, :3] @ np.array([x0, y0, 0.0]) + affine[:3, 3]
    return np.ascontiguousarray(volume[x0 : x0 + wx, y0 : y0 + wy]), shifted


def write_demo_cohort(
    out_dir: Path,
    subjects: int,
    voxel_mm: float,
    dicom_every: int,
    seed: int,
    contrast: str = "t1w",
    orientation: str = "axial",
    zoom: tuple[float, float] = (1.0, 1.0),
):
    """Writes the demo inputs into ``out_dir`` (atomically: a temporary folder, then a rename).

    Subject ``s`` is :func:`pseudo_subject` with seed ``seed + s``; none is the template.
    ``contrast`` and ``orientation`` (``axial``, ``coronal``, ``sagittal`` or ``mixed``, a
    seeded choice per subject) set what each subject's slices show; ``zoom`` the range of
    its in-plane field of view (:func:`zoomed`; ``(1, 1)``: the whole head).

    Returns:
        One ``(relative path, format)`` per written subject.
    """
    tissues, affine = load_template(voxel_mm)
    written = []
    pose = (subjects, voxel_mm, seed, contrast, orientation, zoom)
    for subject, volume, tmp, placed in _subjects(out_dir, tissues, affine, *pose):
        if (subject + 1) % dicom_every == 0:
            name = f"series_{subject:02d}"
            write_dicom_series(tmp / name, volume, placed, subject, seed)
            written.append((name, "dicom"))
        else:
            name = f"volume_{subject:02d}.nii.gz"
            write_nifti(tmp / name, volume, placed, flip_x=subject % 4 == 2)
            written.append((name, "nifti"))
    return written


def write_demo_raw_cohort(
    out_dir: Path,
    subjects: int,
    voxel_mm: float,
    seed: int,
    contrast: str = "t1w",
    coils: int = 4,
    acceleration: float = 4,
    center_fraction: float = 0.08,
    min_foreground: float = 0.15,
    orientation: str = "axial",
    zoom: tuple[float, float] = (1.0, 1.0),
) -> list[tuple[str, str]]:
    """Writes the demo subjects as a scanner would have stored an undersampled acquisition:
    one fastMRI-style file per subject (``scan_SS.h5``), multi-coil k-space of its axial
    slices with their smooth phase, acquired on one equispaced line mask per file (the
    ``mask`` dataset) and zero elsewhere. No image of the subject is written.

    Slices whose head covers less than ``min_foreground`` of the plane are left out, as a
    protocol's slab would. Written atomically, like :func:`write_demo_cohort`.
    """
    from ambient_med.physics.masks import LineMaskFunc

    tissues, affine = load_template(voxel_mm)
    masks = LineMaskFunc([center_fraction], [acceleration], "equispaced")
    written = []
    pose = (subjects, voxel_mm, seed, contrast, orientation, zoom)
    for subject, volume, tmp, _ in _subjects(out_dir, tissues, affine, *pose):
        axial = np.moveaxis(volume, 2, 0).astype(np.float32)  # (slices, x, y)
        covered = (axial > 0.1 * axial.max()).mean(axis=(1, 2))
        axial = axial[covered >= min_foreground]
        kspace = simulate_multicoil_kspace(axial, coils, derive_seed(seed, "raw-demo", subject))
        line_mask = masks(kspace.shape[-1], derive_seed(seed, "raw-demo-mask", subject))
        name = f"scan_{subject:02d}.h5"
        write_fastmri(tmp / name, kspace, line_mask)
        written.append((name, "fastmri"))
    return written


def _subjects(
    out_dir: Path,
    tissues: np.ndarray,
    affine: np.ndarray,
    subjects: int,
    voxel_mm: float,
    seed: int,
    contrast: str,
    orientation: str = "axial",
    zoom: tuple[float, float] = (1.0, 1.0),
) -> Iterator[tuple[int, np.ndarray, Path, np.ndarray]]:
    """``(subject, volume, folder to write into, volume's affine)`` for every demo subject;
    the folder is a temporary sibling of ``out_dir`` that replaces it once every subject is
    written."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.part")
    if tmp.exists():
        _rmtree(tmp)
    tmp.mkdir(parents=True)
    for subject in range(subjects):
        kind = subject_contrast(contrast, seed, subject)
        volume = pseudo_subject(tissues, seed + subject, voxel_mm, kind)
        volume = posed(volume, subject_orientation(orientation, seed, subject))
        factor = subject_zoom(zoom, seed, subject)
        crop_seed = derive_seed(seed, "demo-zoom-window", subject)
        volume, placed = zoomed(volume, affine, factor, crop_seed)
        yield subject, volume, tmp, placed
    if out_dir.exists():
        _rmtree(out_dir)
    os.replace(tmp, out_dir)


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path)


def file_phased(images: np.ndarray, seed: int) -> np.ndarray:
    """``(N, H, W)`` complex: magnitude slices of one subject (named by ``seed``) at
    consecutive positions, given the shared simulator's smooth phase, as a simulated file of
    them holds them (:func:`simulate_multicoil_kspace`)."""
    from ambient_med.physics.acquisition import complex_slices

    return complex_slices(images, [f"file-{seed}"] * len(images), np.arange(len(images)), seed)


def simulate_multicoil_kspace(
    images: np.ndarray, coils: int, seed: int, head_field: tuple[int, int] | None = None
) -> np.ndarray:
    """Fully sampled multi-coil k-space of magnitude slices, as a scanner file would hold.

    The slices are one subject (named by ``seed``) of consecutive positions: each gets the
    shared simulator's smooth phase, then birdcage coil maps (sigpy, ``Σ_c |S_c|² = 1``)
    and the centred orthonormal 2-D FFT. Phase encoding runs along the last axis.

    Phase and coil maps vary over the head-sized field a scanner's do, not over whatever
    the slices show: ``head_field`` ``(FH, FW)`` pixels (at the slices' spacing) is that field,
    and slices smaller than it (a crop of a head) get its central ``H x W`` part. Default:
    the slices' own ``(H, W)``, right for slices that show a whole head.

    Args:
        images: ``(N, H, W)`` real slices.

    Returns:
        ``(N, coils, H, W)`` complex64 k-space.
    """
    from ambient_med.physics.acquisition import multicoil_kspace
    from ambient_med.physics.coils import birdcage

    height, width = images.shape[-2:]
    field_height, field_width = head_field or (height, width)
    if field_height < height or field_width < width:
        raise ValueError(f"head_field {head_field} is smaller than the slices ({height} x {width})")
    top, left = (field_height - height) // 2, (field_width - width) // 2
    inside = (slice(top, top + height), slice(left, left + width))
    embedded = np.zeros((len(images), field_height, field_width), np.float32)
    embedded[:, inside[0], inside[1]] = images
    # Phased over the whole field, then cropped: the crop's phase is the head's there.
    phased = file_phased(embedded, seed)[:, inside[0], inside[1]]
    maps = birdcage(coils, field_height, field_width)[:, inside[0], inside[1]]
    return multicoil_kspace(phased, maps)


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
