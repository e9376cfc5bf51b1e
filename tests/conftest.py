"""Shared fixtures: a small demo cohort written once per test session."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
import yaml

from ambient_med.config import validate_config
from ambient_med.io.demo import write_demo_cohort

REPO = Path(__file__).resolve().parents[1]

# Small enough for seconds: 4 subjects at 3 mm (66 x 78 x 63 voxels), 32 x 32 slices; two
# of them are held out (config.yaml's holdout_subjects).
DEMO_SUBJECTS = 4
DEMO_VOXEL_MM = 3.0
DEMO_SEED = 1234


@pytest.fixture(autouse=True)
def _few_threads():
    # Under pytest-xdist (pyproject's addopts: two workers) each worker takes one of the two
    # cores; run alone, a test takes both.
    torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "inputs"
    write_demo_cohort(out, DEMO_SUBJECTS, DEMO_VOXEL_MM, dicom_every=2, seed=DEMO_SEED)
    return out


def tiny_config(**cohort_overrides) -> dict:
    """config/config.yaml merged with config/tiny.yaml, validated; cohort 'demo' overridable."""
    base = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    tiny = yaml.safe_load((REPO / "config" / "tiny.yaml").read_text())
    merged = copy.deepcopy(base)
    for key, value in tiny.items():
        if isinstance(value, dict):
            merged.setdefault(key, {}).update(value)
        else:
            merged[key] = value
    merged["cohorts"]["demo"].update(cohort_overrides)
    return validate_config(merged)
