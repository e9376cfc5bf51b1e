"""Rule `ingest`: DICOM series, NIfTI volumes and raw k-space → de-identified stores + manifest.

Writes ``slices.h5`` (normalised axial magnitude slices of image inputs, and of raw k-space
that was fully sampled), ``raw.h5`` (raw k-space as acquired, with ESPIRiT coil maps from
the ACS lines) and ``manifest.csv`` (one row per input file, and per link or special file that
cannot be one). A file that cannot be used is skipped with a one-line reason and the rest is
ingested — unless ``ingest.strict`` is set. Files of the other kind than the cohort's
``source`` (raw k-space in an images cohort, images in a raw one) are skipped likewise.
Input folders are only read; every output is written under a temporary name and renamed.
"""

from __future__ import annotations

import csv
import errno
import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ambient_med.errors import AmbientMedError
from ambient_med.io.canaries import plant_canaries
from ambient_med.io.dicom import Header, assemble_series, group_series, scan_header
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


def _list_inputs(root: Path) -> tuple[list[Path], dict[Path, tuple[str, str]]]:
    """Every file under ``root`` and every entry that cannot be one, with its reason.

    Folder links are followed once (a link back into a folder already searched is listed,
    not followed again), so a loop cannot hang ingest; dangling links, link loops, a second
    path to the same file and special files (FIFOs, sockets, devices) get a manifest row
    instead of vanishing. Hidden files (``.name``) are ignored.
    """
    if not root.exists():
        raise AmbientMedError(f"input folder '{root}': does not exist")
    if not root.is_dir():
        raise AmbientMedError(f"input folder '{root}': is not a folder")
    files: list[Path] = []
    unusable: dict[Path, tuple[str, str]] = {}
    # Files and folders by (device, inode): a link, or a hard link, to one seen already is
    # recognised without resolving every path.
    paths_of: dict[tuple[int, int], list[tuple[bool, Path]]] = {}
    searched: set[tuple[int, int]] = set()
    linked: list[tuple[Path, tuple[int, int]]] = []

    def walk(folder: Path, identity: tuple[int, int]) -> None:
        searched.add(identity)
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            unusable[folder] = ("unknown", f"folder cannot be read ({_os_reason(exc)})")
            return
        for entry in entries:
            path = folder / entry.name
            try:
                info = entry.stat()  # follows links: ELOOP / ENOENT name what is wrong
            except OSError as exc:
                if entry.is_symlink() and exc.errno == errno.ENOENT:
                    unusable[path] = ("unknown", "dangling symbolic link (its target is missing)")
                elif exc.errno == errno.ELOOP:
                    unusable[path] = ("unknown", "symbolic link loop (the link never resolves)")
                else:
                    unusable[path] = ("unknown", f"cannot be read ({_os_reason(exc)})")
                continue
            key = (info.st_dev, info.st_ino)
            if stat.S_ISDIR(info.st_mode):
                if entry.is_symlink():
                    linked.append((path, key))  # after the real folders: they keep their paths
                else:
                    walk(path, key)
                continue
            if entry.name.startswith("."):
                continue
            if not stat.S_ISREG(info.st_mode):
                unusable[path] = ("unknown", "not a regular file (a FIFO, socket or device)")
                continue
            paths_of.setdefault(key, []).append((entry.is_symlink(), path))

    root_info = root.stat()
    walk(root, (root_info.st_dev, root_info.st_ino))
    while linked:
        path, key = linked.pop(0)
        if key in searched:
            unusable[path] = (
                "unknown",
                "symbolic link to a folder already searched (a loop or a second path)",
            )
        else:
            walk(path, key)
    for paths in paths_of.values():
        # One path per file: the file itself rather than a link to it, else the first link.
        kept = min(paths)[1]
        files.append(kept)
        for _, path in paths:
            if path != kept:
                unusable[path] = (
                    "unknown",
                    f"same file as '{_rel(root, kept)}' (a link to it, or a copy by hard link)",
                )
    if not files and not unusable:
        raise AmbientMedError(f"input folder '{root}': contains no files")
    return sorted(files), unusable


def _os_reason(exc: OSError) -> str:
    if isinstance(exc, PermissionError):
        return "permission denied"
    return (exc.strerror or exc.__class__.__name__).lower()


def _rel(root: Path, path: Path) -> str:
    return path.relative_to(root).as_posix()


def _source_mismatch(fmt: str, source: str | None, cohort: str) -> str | None:
    """Why a file of format ``fmt`` does not belong in a cohort of ``source``, or None."""
    key = f"cohorts.{cohort}.source"
    if source == "images" and fmt == "raw":
        return (
            f"raw k-space file, but {key} is 'images': give raw files a cohort of their own "
            "with source: kspace and corruption: native"
        )
    if source == "kspace" and fmt in ("dicom", "nifti"):
        return (
            f"{'DICOM' if fmt == 'dicom' else 'NIfTI'} image, but {key} is 'kspace' (raw "
            "k-space only): give images a cohort of their own with source: images"
        )
    return None


def read_inputs(
    root: Path,
    files: list[Path],
    secret: bytes,
    ingest: dict[str, Any],
    source: str | None = None,
    cohort: str = "<name>",
) -> tuple[list[Volume], dict[Path, tuple[str, str]]]:
    """Reads every usable volume; returns them and {file: (format, skip reason)}.

    Args:
        source: the cohort's ``source`` (``images`` or ``kspace``): files of the other kind
            are skipped with a reason. None accepts both.
        cohort: the cohort's name, for messages.
    """
    max_voxels = ingest["max_voxels"]
    volumes: list[Volume] = []
    skipped: dict[Path, tuple[str, str]] = {}
    headers: dict[Path, Header] = {}
    for path in files:
        try:
            if os.path.getsize(path) == 0:
                skipped[path] = ("unknown", "empty file (0 bytes)")
                continue
        except OSError as exc:
            skipped[path] = ("unknown", f"cannot be read ({_os_reason(exc)})")
            continue
        fmt = "nifti" if is_nifti(path) else "raw" if is_raw(path) else None
        mismatch = _source_mismatch(fmt, source, cohort) if fmt else None
        if mismatch is not None:
            skipped[path] = (fmt, mismatch)
            continue
        try:
            if fmt == "nifti":
                data, affine = read_nifti(path, max_voxels, ingest["nifti_volume"])
                nonfinite = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
                subject = pseudonym(secret, "nifti", _rel(root, path))
                volumes.append(Volume(subject, [path], "nifti", data, affine, nonfinite))
                continue
            if fmt == "raw":
                raw = read_raw(path, max_voxels)
                keys = raw.identity_keys if any(raw.identity_keys) else ("file", _rel(root, path))
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
            skipped[path] = (fmt, str(exc))
            continue
        except OSError as exc:
            skipped[path] = (fmt, f"cannot be read ({_os_reason(exc)})")
            continue
        header = scan_header(path)
        if header is None:
            skipped[path] = ("unknown", "neither DICOM, NIfTI nor raw k-space")
        elif isinstance(header, str):
            skipped[path] = ("dicom", header)
        elif (mismatch := _source_mismatch("dicom", source, cohort)) is not None:
            skipped[path] = ("dicom", mismatch)
        else:
            headers[path] = header
    series, not_used = group_series(headers, max_voxels)
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


def _split(
    subjects: list[str], holdout: int, seed: int, cohort: str, source: str = "images"
) -> dict[str, str]:
    """Hold-out subjects chosen by a seeded hash of their pseudonym (order-independent).

    Raises:
        AmbientMedError: fewer than ``holdout + 1`` subjects — saying what to do instead.
    """
    if len(subjects) <= holdout:
        advice = f"add scans of at least {holdout + 1 - len(subjects)} more subject(s)"
        if source == "kspace":
            advice += (
                ", or, to reconstruct these scans with a model trained on another cohort, "
                "name their folder in reconstruct.input instead of making them a cohort"
            )
        raise AmbientMedError(
            f"config key 'cohorts.{cohort}.holdout_subjects': {holdout} hold-out subject(s) "
            f"leave no training subject among the {len(subjects)} ingested: {advice}"
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
    files, unusable = _list_inputs(root)
    secret = site_secret(demo=cohort["demo"])
    volumes, skipped = read_inputs(
        root, files, secret, ingest, source=cohort.get("source"), cohort=cohort["name"]
    )
    skipped |= unusable
    files = sorted([*files, *unusable])
    for path, (_, reason) in sorted(skipped.items()):
        log.info("skipped %s: %s", _rel(root, path), reason)
    if skipped and ingest["strict"]:
        path, (_, reason) = sorted(skipped.items())[0]
        raise AmbientMedError(
            f"ingest.strict: {len(skipped)} file(s) skipped, first '{_rel(root, path)}': {reason}"
        )
    if not volumes:
        detail = ""
        if skipped:
            path, (_, reason) = sorted(skipped.items())[0]
            detail = (
                f" ({len(skipped)} of {len(files)} skipped, first '{_rel(root, path)}': "
                f"{reason}; every reason is in the log)"
            )
        raise AmbientMedError(
            f"input folder '{root}': no usable DICOM, NIfTI or raw k-space{detail}"
        )

    # Rows of the stores point at volumes; a subject may own several volumes (series).
    volumes.sort(key=lambda v: (v.subject, v.files[0].as_posix()))
    subjects = sorted({v.subject for v in volumes})
    split = _split(
        subjects,
        cohort["holdout_subjects"],
        cohort["seed"],
        cohort["name"],
        cohort.get("source", "images"),
    )
    size = ingest["image_size"]
    image_rows: dict[str, list] = {"images": [], "volume": [], "slice": []}
    raw_rows: dict[str, list] = {"kspace": [], "mask": [], "maps": [], "volume": [], "slice": []}
    affines, per_volume_slices = [], []
    for v, volume in enumerate(volumes):
        if volume.kspace is not None:
            maps, kspace, images = calibrate(
                volume.kspace,
                volume.line_mask,
                ingest["espirit_crop"],
                volume.files[0].name,
                ingest["intensity_percentile"],
                ingest["intensity_band"],
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
            ingest["intensity_band"],
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
    if cohort.get("canaries") and len(images):
        # Before any corruption: clean models see them as they are, ambient ones only
        # through the measurements (the audit then measures who reproduces them).
        slice_store, planted = plant_canaries(slice_store, cohort["canaries"], cohort["seed"])
        log.info(
            "planted %d canaries (in %s training slices) and drew as many references",
            sum(c.planted for c in planted),
            "/".join(str(c.repeats) for c in planted if c.planted),
        )
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
