"""Rule `ingest`: DICOM series and NIfTI volumes → de-identified slice store + manifest.

Every input file gets one manifest row. A file that cannot be used is skipped with a
one-line reason; the rest is ingested.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ambient_med.errors import AmbientMedError
from ambient_med.io.dicom import assemble_series, group_series, read_header
from ambient_med.io.identity import pseudonym, site_secret
from ambient_med.io.nifti import is_nifti, read_nifti
from ambient_med.io.slicing import axial_slices
from ambient_med.io.store import SliceIndex, SliceStore, atomic_path, write_slices
from ambient_med.physics.masks import derive_seed

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = ("file", "format", "status", "reason", "subject", "split", "slices")


@dataclass
class Volume:
    subject: str
    files: list[Path]
    fmt: str
    data: np.ndarray
    affine: np.ndarray


def _list_inputs(root: Path) -> list[Path]:
    if not root.exists():
        raise AmbientMedError(f"input folder '{root}': does not exist")
    if not root.is_dir():
        raise AmbientMedError(f"input folder '{root}': is not a folder")
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise AmbientMedError(f"input folder '{root}': contains no files")
    return files


def _read_volumes(
    root: Path, files: list[Path], secret: bytes, max_voxels: int
) -> tuple[list[Volume], dict[Path, tuple[str, str]]]:
    """Reads every usable volume; returns them and {file: (format, skip reason)}."""
    volumes: list[Volume] = []
    skipped: dict[Path, tuple[str, str]] = {}
    headers = {}
    for path in files:
        rel = path.relative_to(root).as_posix()
        if is_nifti(path):
            try:
                data, affine = read_nifti(path, max_voxels)
            except AmbientMedError as exc:
                skipped[path] = ("nifti", str(exc))
                continue
            volumes.append(Volume(pseudonym(secret, "nifti", rel), [path], "nifti", data, affine))
            continue
        header = read_header(path)
        if header is None:
            skipped[path] = ("unknown", "neither DICOM nor NIfTI")
        else:
            headers[path] = header
    series, not_images = group_series(headers)
    for path, reason in not_images.items():
        skipped[path] = ("dicom", reason)
    for uid in sorted(series):
        group = series[uid]
        try:
            volume = assemble_series(group, max_voxels)
        except AmbientMedError as exc:
            for path in group.files:
                skipped[path] = ("dicom", f"series refused: {exc}")
            continue
        subject = pseudonym(secret, "dicom", *volume.identity_keys)
        volumes.append(Volume(subject, volume.files, "dicom", volume.data, volume.affine))
    return volumes, skipped


def _split(subjects: list[str], holdout: int, seed: int) -> dict[str, str]:
    """Hold-out subjects chosen by a seeded hash of their pseudonym (order-independent)."""
    if len(subjects) <= holdout:
        raise AmbientMedError(
            f"config key 'cohorts.<cohort>.holdout_subjects': {holdout} leaves no training "
            f"subject among {len(subjects)}"
        )
    ranked = sorted(subjects, key=lambda s: derive_seed(seed, "holdout", s))
    return {s: ("holdout" if i < holdout else "train") for i, s in enumerate(ranked)}


def run(cfg: dict[str, Any], input_dir: Path, slices_out: Path, manifest_out: Path) -> None:
    cohort = cfg["cohort"]
    ingest = cfg["ingest"]
    root = Path(input_dir)
    files = _list_inputs(root)
    secret = site_secret(demo=cohort["demo"])
    volumes, skipped = _read_volumes(root, files, secret, ingest["max_voxels"])
    if not volumes:
        raise AmbientMedError(f"input folder '{root}': no usable DICOM series or NIfTI volume")

    # Rows of the store point at volumes; a subject may own several volumes (series).
    volumes.sort(key=lambda v: (v.subject, v.files[0].as_posix()))
    subjects = sorted({v.subject for v in volumes})
    split = _split(subjects, cohort["holdout_subjects"], cohort["seed"])
    images, volume_idx, slice_idx, affines = [], [], [], []
    per_file: dict[Path, tuple[str, int]] = {}
    for v, volume in enumerate(volumes):
        slices, kept, grid_affine = axial_slices(
            volume.data,
            volume.affine,
            ingest["image_size"],
            ingest["intensity_percentile"],
            ingest["min_foreground_fraction"],
        )
        affines.append(grid_affine)
        images.append(slices)
        volume_idx.append(np.full(len(kept), v))
        slice_idx.append(kept)
        if volume.fmt == "dicom":  # one file per axial slice, in slice order
            kept_set = set(kept.tolist())
            for k, path in enumerate(volume.files):
                per_file[path] = (volume.subject, int(k in kept_set))
        else:
            per_file[volume.files[0]] = (volume.subject, len(kept))
        log.info("%s: %s volume, %d slices kept", volume.subject, volume.fmt, len(kept))

    size = ingest["image_size"]
    store = SliceStore(
        images=np.concatenate(images) if images else np.zeros((0, size, size), np.float32),
        index=SliceIndex(
            subject=np.concatenate(volume_idx),
            slice_index=np.concatenate(slice_idx),
            subjects=[v.subject for v in volumes],
            split=[split[v.subject] for v in volumes],
            affines=np.stack(affines),
        ),
        attrs={"cohort": cohort["name"], "image_size": size},
    )
    if len(store.index.rows("train")) == 0:
        raise AmbientMedError(f"input folder '{root}': no training slice left after ingest")
    write_slices(slices_out, store)
    _write_manifest(manifest_out, root, files, per_file, skipped, split)
    log.info(
        "ingested %d slices of %d subjects (%d hold-out); %d of %d files skipped",
        len(store.images),
        len(subjects),
        sum(v == "holdout" for v in split.values()),
        len(skipped),
        len(files),
    )


def _write_manifest(path, root, files, per_file, skipped, split) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=MANIFEST_COLUMNS)
        writer.writeheader()
        for file in files:
            row = {"file": file.relative_to(root).as_posix()}
            if file in per_file:
                subject, count = per_file[file]
                fmt = "nifti" if is_nifti(file) else "dicom"
                row |= {"format": fmt, "status": "ingested", "reason": ""}
                row |= {"subject": subject, "split": split[subject], "slices": count}
            else:
                fmt, reason = skipped[file]
                row |= {"format": fmt, "status": "skipped", "reason": reason}
                row |= {"subject": "", "split": "", "slices": 0}
            writer.writerow(row)
