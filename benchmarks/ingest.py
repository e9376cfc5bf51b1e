"""Ingest speed against a bare read of the same files (target: ingest ≤ 2x the bare read).

Writes demo inputs (DICOM series, one file per slice; NIfTI volumes), then times the full
`ingest` stage (header scan, grouping, geometry, decoding, reorientation, normalisation,
resizing, de-identification, atomic HDF5 + manifest writes) against the least any reader must
do: ``pydicom.dcmread(f).pixel_array`` per DICOM file, ``nibabel.load(f).get_fdata()`` per
NIfTI file.

    python benchmarks/ingest.py [--subjects 3] [--repeats 3]

Writes benchmarks/results/ingest.json with rows {format, files, slices, ingest_s,
bare_read_s, ratio}.
"""

from __future__ import annotations

import argparse
import csv
import logging
import shutil
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_results  # noqa: E402

from ambient_med.config import load_config, stage_config  # noqa: E402
from ambient_med.io.demo import write_demo_cohort  # noqa: E402
from ambient_med.stages import ingest  # noqa: E402


def bare_read(folder: Path, fmt: str) -> float:
    start = time.perf_counter()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        if fmt == "nifti":
            np.asarray(nib.load(path).get_fdata(dtype=np.float32))
        else:
            pydicom.dcmread(path).pixel_array  # noqa: B018
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=Path("config/config.yaml"))
    parser.add_argument("--subjects", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="best of N for each timing")
    parser.add_argument("--workdir", type=Path, default=Path("benchmarks/work/ingest"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(2)
    started = time.time()
    config = load_config(args.config)
    cfg = stage_config(config, "demo", "ingest")
    cfg["cohort"]["holdout_subjects"] = 1
    rows = []
    for fmt, dicom_every in (("dicom", 1), ("nifti", args.subjects + 1)):
        folder = args.workdir / fmt
        if folder.exists():
            shutil.rmtree(folder)
        # subjects + 1 so that the NIfTI cohort gets `subjects` volumes (subject 0 is NIfTI
        # in every layout) and the DICOM cohort `subjects` series plus that one volume.
        write_demo_cohort(folder, args.subjects, 1.0, dicom_every, seed=7)
        if fmt == "dicom":
            for extra in folder.glob("*.nii.gz"):
                extra.unlink()
        files = [p for p in folder.rglob("*") if p.is_file()]
        # Bare read and ingest alternate, so that a busy spell of a shared machine slows both
        # rather than one of them; each keeps its best time.
        bare_times, timings = [], []
        out = args.workdir / f"out_{fmt}"
        for _ in range(args.repeats):
            bare_times.append(bare_read(folder, fmt))
            start = time.perf_counter()
            ingest.run(cfg, folder, out / "slices.h5", out / "manifest.csv", out / "raw.h5")
            timings.append(time.perf_counter() - start)
        bare = min(bare_times)
        with open(out / "manifest.csv") as handle:
            volumes = {r["volume"]: int(r["slices"]) for r in csv.DictReader(handle)}
        axial = sum(nib.load(f).shape[2] for f in files) if fmt == "nifti" else len(files)
        rows.append(
            {
                "format": fmt,
                "files": len(files),
                "slices": axial,
                "slices_kept": sum(volumes.values()),
                "ingest_s": round(min(timings), 3),
                "bare_read_s": round(bare, 3),
                "ratio": round(min(timings) / bare, 3),
            }
        )
        print(rows[-1])
    print(f"wrote {write_results('ingest', started, rows)}")


if __name__ == "__main__":
    main()
