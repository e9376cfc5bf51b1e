"""Rule `demo_data`: write the demo cohort's hospital-shaped inputs: DICOM series and NIfTI
volumes (``source: images``), or undersampled multi-coil raw k-space files as a scanner
stores them (``source: kspace``; corrupt.kspace's acceleration and centre fraction)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ambient_med.io.demo import write_demo_cohort, write_demo_raw_cohort

log = logging.getLogger(__name__)


def run(cfg: dict[str, Any], output: Path) -> None:
    demo = cfg["demo"]
    if cfg["cohort"]["source"] == "kspace":
        kspace = cfg["corrupt"]["kspace"]
        written = write_demo_raw_cohort(
            Path(output),
            subjects=demo["subjects"],
            voxel_mm=demo["voxel_mm"],
            seed=cfg["cohort"]["seed"],
            contrast=demo["contrast"],
            acceleration=kspace["acceleration"],
            center_fraction=kspace["center_fraction"],
            orientation=demo["orientation"],
            zoom=tuple(demo["zoom"]),
        )
        for name, kind in written:
            log.info("wrote %s (%s)", name, kind)
        return
    written = write_demo_cohort(
        Path(output),
        subjects=demo["subjects"],
        voxel_mm=demo["voxel_mm"],
        dicom_every=demo["dicom_every"],
        seed=cfg["cohort"]["seed"],
        contrast=demo["contrast"],
        orientation=demo["orientation"],
        zoom=tuple(demo["zoom"]),
    )
    for name, kind in written:
        log.info("wrote %s (%s)", name, kind)
