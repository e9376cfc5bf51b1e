"""Rule `demo_data`: write the demo cohort's hospital-shaped inputs."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ambient_med.io.demo import write_demo_cohort

log = logging.getLogger(__name__)


def run(cfg: dict[str, Any], output: Path) -> None:
    demo = cfg["demo"]
    written = write_demo_cohort(
        Path(output),
        subjects=demo["subjects"],
        voxel_mm=demo["voxel_mm"],
        dicom_every=demo["dicom_every"],
        seed=cfg["cohort"]["seed"],
        contrast=demo["contrast"],
    )
    for name, kind in written:
        log.info("wrote %s (%s)", name, kind)
