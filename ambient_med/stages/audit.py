"""Rule `audit`: does the model reproduce its training scans? → ``eval/memorization.json``.

For every generated sample, the highest normalised cross-correlation (foreground-masked
magnitude) with any training image; the threshold is the ``audit.quantile`` of the same
statistic for held-out subjects' real slices against the training set. Where the cohort has
no clean image (undersampled raw k-space), the audit compares against what exists — the
zero-filled training inputs — and says so in ``reference``.

Keys of memorization.json: cohort, mode, kind, reference, n_train, threshold,
threshold_quantile, frac_above (fraction of samples above the threshold), n_samples, q50,
q95, q99, max (of the samples' nearest-training NCC), holdout_q50/q95/q99,
holdout_frac_above (of the calibration set itself, ≈ 1 - quantile), n_holdout.
Also writes the closest pairs as a PNG: each sample beside its nearest training image.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from ambient_med.errors import AmbientMedError
from ambient_med.evaluation.audit import memorization_audit
from ambient_med.io.export import write_png_grid, write_table
from ambient_med.io.store import atomic_path, read_slices
from ambient_med.stages.common import load_examples

log = logging.getLogger(__name__)


def _zero_filled(measurements_path: Path, kind: str, split: str) -> np.ndarray:
    data = load_examples(measurements_path, "naive", kind, split, 0.0, True, 0)
    return data.targets.square().sum(dim=1).sqrt().numpy()


def run(
    cfg: dict[str, Any],
    samples_path: Path,
    slices_path: Path,
    memorization_out: Path,
    figure_out: Path,
    measurements_path: Path | None = None,
    kind: str | None = None,
    table_out: Path | None = None,
) -> None:
    quantile = cfg["audit"]["quantile"]
    samples = np.moveaxis(np.asarray(nib.load(str(samples_path)).dataobj, np.float32), -1, 0)
    store = read_slices(slices_path)
    train_rows, holdout_rows = store.index.rows("train"), store.index.rows("holdout")
    if len(train_rows) and len(holdout_rows):
        train, holdout = store.images[train_rows], store.images[holdout_rows]
        reference = "clean_training_slices"
    elif measurements_path is not None and kind is not None:
        train = _zero_filled(measurements_path, kind, "train")
        holdout = _zero_filled(measurements_path, kind, "holdout")
        reference = "zero_filled_training_inputs"
        log.info("no clean image in this cohort: auditing against zero-filled training inputs")
    else:
        raise AmbientMedError(f"slice store '{slices_path}': nothing to audit against")
    if samples.shape[1:] != train.shape[1:]:
        raise AmbientMedError(
            f"samples '{samples_path}' are {samples.shape[1:]}, training images {train.shape[1:]}"
        )
    result = memorization_audit(samples, train, holdout, quantile)
    summary = {
        "cohort": cfg["cohort"]["name"],
        "mode": cfg["cohort"]["train_mode"],
        "kind": cfg["cohort"]["corruption"],
        "reference": reference,
        "n_train": int(len(train)),
    } | result.summary(quantile)
    with atomic_path(memorization_out) as tmp:
        tmp.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    if table_out is not None:
        write_table(table_out, summary)
    order = np.argsort(-result.sample_ncc)[: cfg["audit"]["pairs"]]
    tiles = []
    for i in order:
        tiles += [samples[i], train[result.sample_index[i]]]
    write_png_grid(figure_out, np.stack(tiles), columns=8)
    log.info(
        "threshold %.4f (q%.2f of hold-out); %.1f%% of %d samples above; sample NCC q99 %.4f",
        result.threshold,
        quantile,
        100 * summary["frac_above"],
        len(samples),
        summary["q99"],
    )
