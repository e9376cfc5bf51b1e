"""Rule `ingest`: DICOM series, NIfTI volumes and raw k-space → de-identified stores + manifest.

Writes ``slices.h5`` (normalised axial magnitude slices of image inputs, and of raw k-space
that was fully sampled), ``raw.h5`` (raw k-space as acquired, with ESPIRiT coil maps from
the ACS lines) and ``manifest.csv`` (one row per input file). A file that cannot be used is
skipped with a one-line reason and the rest is ingested — unless ``ingest.strict`` is set.
Input folders are only read; every output is written under a temporary name and renamed.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ambient_med.errors import AmbientMedError
from ambient_med.io.dicom import assemble_series, group_series, read_header
from ambient_med.io.identity import pseudonym, site_secret
from ambient_med.io.kspace import calibrate, fit_kspace, is_raw, read_raw
from ambient_med.io.nifti import is_nifti, read_nifti
from ambient_med.io.slicing import axial_slices
from ambient_med.io.store import (
    RawStore,
    SliceIndex,
    SliceStore,
    atomic_path,
    write_raw,
    write_slices,
)
from ambient_med.physics.masks import derive_seed

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = (
    "file",
    "format",
    "status",
    "reason",
    "subject",
    "split",
    "volume",
    "slices",
    "nonfinite",
)


@dataclass
class Volume:
    """One usable input volume: image data, or raw k-space (then ``kspace`` is set)."""

    subject: str
    files: list[Path]
    fmt: str
    data: np.ndarray | None = None  # (X, Y, Z) canonical RAS magnitude
    affine: np.ndarray = field(default_factory=lambda: np.eye(4))
    nonfinite: int = 0
    kspace: np.ndarray | None = None  # (slices, coils, H, W) complex, fitted to image_size
    line_mask: np.ndarray | None = None  # (slices, W)


def _list_inputs(root: Path) -> list[Path]:
    if not root.exists():
        raise AmbientMedError(f"input folder '{root}': does not exist")
    if not root.is_dir():
        raise AmbientMedError(f"input folder '{root}': is not a folder")
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise AmbientMedError(f"input folder '{root}': contains no files")
    return files


def _rel(root: Path, path: Path) -> str:
    return path.relative_to(root).as_posix()


def read_inputs(
    root: Path, files: list[Path], secret: bytes, ingest: dict[str, Any]
) -> tuple[list[Volume], dict[Path, tuple[str, str]]]:
    """Reads every usable volume; returns them and {file: (format, skip reason)}."""
    max_voxels = ingest["max_voxels"]
    volumes: list[Volume] = []
    skipped: dict[Path, tuple[str, str]] = {}
    headers = {}
    for path in files:
        rel = _rel(root, path)
        try:
            if is_nifti(path):
                data, affine = read_nifti(path, max_voxels, ingest["nifti_volume"])
                nonfinite = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
                subject = pseudonym(secret, "nifti", rel)
                volumes.append(Volume(subject, [path], "nifti", data, affine, nonfinite))
                continue
            if is_raw(path):
                raw = read_raw(path, max_voxels)
                keys = raw.identity_keys if any(raw.identity_keys) else ("file", rel)
                kspace, mask = fit_kspace(raw.kspace, raw.line_mask, ingest["image_size"])
                volumes.append(
                    Volume(
                        pseudonym(secret, "raw", *keys),
                        [path],
                        raw.source,
                        kspace=kspace,
                        line_mask=mask,
                    )
                )
                continue
        except AmbientMedError as exc:
            skipped[path] = ("nifti" if is_nifti(path) else "raw", str(exc))
            continue
        except PermissionError:
            skipped[path] = ("unknown", "cannot be read (permission denied)")
            continue
        header = read_header(path)
        if header is None:
            reason = "neither DICOM, NIfTI nor raw k-space"
            try:
                with open(path, "rb"):
                    pass
            except OSError:
                reason = "cannot be read (permission denied or I/O error)"
            skipped[path] = ("unknown", reason)
        else:
            headers[path] = header
    series, not_used = group_series(headers)
    for path, reason in not_used.items():
        skipped[path] = ("dicom", reason)
    for uid in sorted(series):
        group = series[uid]
        try:
            parts, dropped = assemble_series(group, max_voxels)
        except AmbientMedError as exc:
            for frame in group.frames:
                skipped[frame.path] = ("dicom", f"series refused: {exc}")
            continue
        for path, reason in dropped.items():
            skipped[path] = ("dicom", reason)
        for part in parts:
            subject = pseudonym(secret, "dicom", *part.identity_keys)
            volumes.append(Volume(subject, part.files, "dicom", part.data, part.affine))
    return volumes, skipped


def _split(subjects: list[str], holdout: int, seed: int, cohort: str) -> dict[str, str]:
    """Hold-out subjects chosen by a seeded hash of their pseudonym (order-independent)."""
    if len(subjects) <= holdout:
        raise AmbientMedError(
            f"config key 'cohorts.{cohort}.holdout_subjects': {holdout} leaves no training "
            f"subject among the {len(subjects)} ingested"
        )
    ranked = sorted(subjects, key=lambda s: derive_seed(seed, "holdout", s))
    return {s: ("holdout" if i < holdout else "train") for i, s in enumerate(ranked)}


def run(
    cfg: dict[str, Any],
    input_dir: Path,
    slices_out: Path,
    manifest_out: Path,
    raw_out: Path | None = None,
) -> None:
    cohort = cfg["cohort"]
    ingest = cfg["ingest"]
    root = Path(input_dir)
    files = _list_inputs(root)
    secret = site_secret(demo=cohort["demo"])
    volumes, skipped = read_inputs(root, files, secret, ingest)
    for path, (_, reason) in sorted(skipped.items()):
        log.info("skipped %s: %s", _rel(root, path), reason)
    if skipped and ingest["strict"]:
        path, (_, reason) = sorted(skipped.items())[0]
        raise AmbientMedError(
            f"ingest.strict: {len(skipped)} file(s) skipped, first '{_rel(root, path)}': {reason}"
        )
    if not volumes:
        raise AmbientMedError(f"input folder '{root}': no usable DICOM, NIfTI or raw k-space")

    # Rows of the stores point at volumes; a subject may own several volumes (series).
    volumes.sort(key=lambda v: (v.subject, v.files[0].as_posix()))
    subjects = sorted({v.subject for v in volumes})
    split = _split(subjects, cohort["holdout_subjects"], cohort["seed"], cohort["name"])
    size = ingest["image_size"]
    image_rows: dict[str, list] = {"images": [], "volume": [], "slice": []}
    raw_rows: dict[str, list] = {"kspace": [], "mask": [], "maps": [], "volume": [], "slice": []}
    affines, per_volume_slices = [], []
    for v, volume in enumerate(volumes):
        if volume.kspace is not None:
            maps, kspace, images = calibrate(
                volume.kspace, volume.line_mask, ingest["espirit_crop"], volume.files[0].name
            )
            n = kspace.shape[0]
            raw_rows["kspace"].append(kspace)
            raw_rows["mask"].append(volume.line_mask)
            raw_rows["maps"].append(maps)
            raw_rows["volume"].append(np.full(n, v))
            raw_rows["slice"].append(np.arange(n))
            if images is not None:
                image_rows["images"].append(images)
                image_rows["volume"].append(np.full(n, v))
                image_rows["slice"].append(np.arange(n))
            affines.append(np.eye(4))
            per_volume_slices.append(n)
            state = "undersampled" if not volume.line_mask.all() else "fully sampled"
            log.info("%s: %s raw k-space, %d slices, %s", volume.subject, volume.fmt, n, state)
            continue
        slices, kept, grid_affine = axial_slices(
            volume.data,
            volume.affine,
            size,
            ingest["intensity_percentile"],
            ingest["min_foreground_fraction"],
        )
        affines.append(grid_affine)
        image_rows["images"].append(slices)
        image_rows["volume"].append(np.full(len(kept), v))
        image_rows["slice"].append(kept)
        per_volume_slices.append(len(kept))
        log.info("%s: %s volume, %d slices kept", volume.subject, volume.fmt, len(kept))

    index_args = {
        "subjects": [v.subject for v in volumes],
        "split": [split[v.subject] for v in volumes],
        "affines": np.stack(affines),
    }

    def index(rows: dict[str, list]) -> SliceIndex:
        return SliceIndex(
            subject=np.concatenate(rows["volume"]) if rows["volume"] else np.zeros(0, int),
            slice_index=np.concatenate(rows["slice"]) if rows["slice"] else np.zeros(0, int),
            **index_args,
        )

    images = (
        np.concatenate(image_rows["images"])
        if image_rows["images"]
        else np.zeros((0, size, size), np.float32)
    )
    slice_store = SliceStore(images, index(image_rows), {"cohort": cohort["name"]})
    raw_index = index(raw_rows)
    if len(slice_store.index.rows("train")) + len(raw_index.rows("train")) == 0:
        raise AmbientMedError(f"input folder '{root}': no training slice left after ingest")
    write_slices(slices_out, slice_store)
    if raw_out is not None:
        if raw_rows["kspace"]:
            coils = {k.shape[1] for k in raw_rows["kspace"]}
            if len(coils) > 1:
                raise AmbientMedError(
                    f"input folder '{root}': raw files with different coil counts {sorted(coils)}"
                )
            raw = RawStore(
                np.concatenate(raw_rows["kspace"]),
                np.concatenate(raw_rows["mask"]),
                np.concatenate(raw_rows["maps"]),
                raw_index,
                {"cohort": cohort["name"], "scaling": "p99 of ACS-only SENSE image = 1"},
            )
        else:
            empty = np.zeros((0, 1, size, size), np.complex64)
            raw = RawStore(empty, np.zeros((0, size), np.uint8), empty, raw_index)
        write_raw(raw_out, raw)
    _write_manifest(manifest_out, root, files, volumes, per_volume_slices, skipped, split)
    log.info(
        "ingested %d image slices and %d raw k-space slices of %d subjects (%d hold-out); "
        "%d of %d files skipped",
        len(images),
        len(raw_index.subject),
        len(subjects),
        sum(v == "holdout" for v in split.values()),
        len(skipped),
        len(files),
    )


def _write_manifest(path, root, files, volumes, per_volume_slices, skipped, split) -> None:
    by_file = {}
    for v, volume in enumerate(volumes):
        for file in volume.files:
            by_file[file] = (v, volume)
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=MANIFEST_COLUMNS)
        writer.writeheader()
        for file in files:
            row = {"file": _rel(root, file)}
            if file in by_file:
                v, volume = by_file[file]
                row |= {"format": volume.fmt, "status": "ingested", "reason": ""}
                row |= {"subject": volume.subject, "split": split[volume.subject]}
                row |= {"volume": f"vol-{v:03d}", "slices": per_volume_slices[v]}
                row |= {"nonfinite": volume.nonfinite}
            else:
                fmt, reason = skipped[file]
                row |= {"format": fmt, "status": "skipped", "reason": reason}
                row |= {"subject": "", "split": "", "volume": "", "slices": 0, "nonfinite": 0}
            writer.writerow(row)
