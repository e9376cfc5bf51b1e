"""Rule `audit`: does the model reproduce its training scans? → ``eval/memorization.json``.

For every generated sample, the band-pass copy statistic against its nearest training image
(:mod:`ambient_med.evaluation.audit`: anatomy inside the brain mask, gain and offset removed,
best over shifts of up to ``audit.max_shift`` pixels); the threshold is the split-conformal
``audit.quantile`` of the same statistic for one half of the held-out subjects' slices
(interleaved by slice within each subject) against the training set. Controls show, in every
run, that the audit can tell a copy: modified training slices must be flagged and non-copies
must not. Where the cohort has no clean image (undersampled raw k-space), the audit compares
against what exists — the zero-filled training inputs — and says so in ``reference``.

Keys of memorization.json: cohort, mode, kind, reference, n_train, statistic, threshold,
threshold_quantile, frac_above (fraction of samples above the threshold), n_samples, q50,
q95, q99, max (of the samples' nearest-training statistic), holdout_q50/q95/q99,
holdout_frac_above (of the calibration half itself, ≤ 1 - quantile), n_holdout (its size);
control_<name>_flagged per control, controls_passed (every control met its target) and
``controls``: rows ``{kind: "control", control, flagged_fraction, n, expected, passed}``.
Positive controls (``expected: flagged``, target ≥ 95 %): ``exact``, ``shift1``, ``shift2``,
``noise``, ``blur`` — training slices copied, shifted by 1 or 2 pixels, with noise, mildly
blurred. Negative controls (``expected: not_flagged``, target ≤ 2 %): ``holdout`` (the
held-out half not used for calibration), ``silhouette`` (binary head masks, no anatomy),
``blurred_mean`` (blurred mean of the training slices at a slice position).
``canaries`` (cohorts with ``cohorts.<name>.canaries``): rows ``{kind: "canary", train_mode,
canary, repeats, exposure, reference, reference_exposure}`` — the fraction of samples that
reproduce each planted canary at its place, beside the same for a never-planted reference
canary; ``canary_exposure_max`` and ``canary_reference_exposure_max`` flat.
The TSV table holds the flat keys (not the rows). Also writes the closest pairs as a PNG
(each sample beside its nearest training image) and, when asked, a histogram of the samples'
scores beside the held-out calibration half and the controls.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from ambient_med.errors import AmbientMedError
from ambient_med.evaluation.audit import (
    Canary,
    CopyStatistic,
    canary_exposure,
    control_images,
    memorization_audit,
)
from ambient_med.evaluation.figures import audit_histogram
from ambient_med.io.canaries import read_canaries
from ambient_med.io.export import write_png_grid, write_table
from ambient_med.io.store import atomic_path, read_measurements, read_slices
from ambient_med.stages.common import load_examples

log = logging.getLogger(__name__)


def _zero_filled(measurements_path: Path, kind: str, split: str) -> np.ndarray:
    data = load_examples(measurements_path, "naive", kind, split, 0.0, True, 0)
    return data.targets.square().sum(dim=1).sqrt().numpy()


def canary_rows(
    attrs: dict[str, Any],
    samples: np.ndarray,
    holdout: np.ndarray,
    params: CopyStatistic,
    train_mode: str,
) -> list[dict[str, Any]]:
    """Rows ``{kind: "canary", train_mode, canary, repeats, exposure, reference_exposure}``
    for a cohort with planted canaries (none otherwise). Each planted canary is paired with
    the never-planted reference canary of the same repeat count; thresholds are calibrated
    on held-out subjects' slices, which never carried one."""
    recorded = read_canaries(attrs)
    planted = [c for c in recorded if c.planted]
    references = {c.repeats: c for c in recorded if not c.planted}
    if not planted:
        return []

    def canary(c) -> Canary:
        return Canary(np.asarray(c.pattern, np.float32), c.row, c.col, name=c.name)

    paired = [references.get(c.repeats, c) for c in planted]
    result = canary_exposure(
        samples,
        [canary(c) for c in planted],
        holdout,
        reference_canaries=[canary(c) for c in paired],
        params=params,
    )
    return [
        {
            "kind": "canary",
            "train_mode": train_mode,
            "canary": c.name,
            "repeats": c.repeats,
            "exposure": float(result.exposure[k]),
            "reference": paired[k].name,
            "reference_exposure": float(result.reference_exposure[k]),
        }
        for k, c in enumerate(planted)
    ]


def run(
    cfg: dict[str, Any],
    samples_path: Path,
    slices_path: Path,
    memorization_out: Path,
    figure_out: Path,
    measurements_path: Path | None = None,
    kind: str | None = None,
    table_out: Path | None = None,
    histogram_out: Path | None = None,
) -> None:
    audit_cfg = cfg["audit"]
    quantile = audit_cfg["quantile"]
    params = CopyStatistic.from_config(audit_cfg)
    samples = np.moveaxis(np.asarray(nib.load(str(samples_path)).dataobj, np.float32), -1, 0)
    store = read_slices(slices_path)
    index = store.index
    train_rows, holdout_rows = index.rows("train"), index.rows("holdout")
    if len(train_rows) and len(holdout_rows):
        train, holdout = store.images[train_rows], store.images[holdout_rows]
        reference = "clean_training_slices"
    elif measurements_path is not None and kind is not None:
        train = _zero_filled(measurements_path, kind, "train")
        holdout = _zero_filled(measurements_path, kind, "holdout")
        # The same rows, in the same order, as load_examples took them.
        index = read_measurements(measurements_path).index
        train_rows, holdout_rows = index.rows("train"), index.rows("holdout")
        reference = "zero_filled_training_inputs"
        log.info("no clean image in this cohort: auditing against zero-filled training inputs")
    else:
        raise AmbientMedError(f"slice store '{slices_path}': nothing to audit against")
    if samples.shape[1:] != train.shape[1:]:
        raise AmbientMedError(
            f"samples '{samples_path}' are {samples.shape[1:]}, training images {train.shape[1:]}"
        )
    if len(holdout) < 2:
        raise AmbientMedError(
            f"slice store '{slices_path}': {len(holdout)} held-out slice(s), the audit's "
            f"calibration needs at least 2 (config key 'cohorts.{cfg['cohort']['name']}."
            "holdout_subjects')"
        )
    controls = control_images(
        train,
        index.slice_index[train_rows],
        cfg["cohort"]["seed"],
        n=audit_cfg["control_slices"],
        noise=audit_cfg["control_noise"],
        blur=audit_cfg["control_blur"],
        mean_blur=audit_cfg["control_mean_blur"],
    )
    result = memorization_audit(
        samples,
        train,
        holdout,
        quantile,
        holdout_groups=index.subject[holdout_rows],
        controls=controls,
        params=params,
    )
    summary = {
        "cohort": cfg["cohort"]["name"],
        "mode": cfg["cohort"]["train_mode"],
        "kind": cfg["cohort"]["corruption"],
        "reference": reference,
        "n_train": int(len(train)),
    } | result.summary(quantile)
    rows = result.control_rows()
    canaries = canary_rows(store.attrs, samples, holdout, params, cfg["cohort"]["train_mode"])
    if canaries:
        summary["canary_exposure_max"] = max(r["exposure"] for r in canaries)
        summary["canary_reference_exposure_max"] = max(r["reference_exposure"] for r in canaries)
    payload = summary | {"controls": rows, "canaries": canaries}
    with atomic_path(memorization_out) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    if table_out is not None:
        write_table(table_out, summary)
    if histogram_out is not None:
        labels = {
            "exact": "training copies",
            "shift2": "training copies, shifted 2 px",
            "blur": "training copies, blurred",
            "silhouette": "head silhouettes",
            "holdout": "other held-out half",
        }
        audit_histogram(
            histogram_out,
            result.holdout_ncc,
            result.sample_ncc,
            result.threshold,
            {
                text: result.control_ncc[name]
                for name, text in labels.items()
                if name in result.control_ncc
            },
            xlabel="copy statistic against the nearest training slice",
            title=f"Memorization audit, {cfg['cohort']['name']} ({cfg['cohort']['train_mode']})",
        )
    order = np.argsort(-result.sample_ncc)[: audit_cfg["pairs"]]
    tiles = []
    for i in order:
        tiles += [samples[i], train[result.sample_index[i]]]
    write_png_grid(figure_out, np.stack(tiles), columns=8)
    for row in rows:
        if not row["passed"]:
            # The audit's verdict is unreliable at this scale; say so rather than fail.
            log.warning(
                "control %s: %.1f%% of %d flagged, expected %s (target %s)",
                row["control"],
                100 * row["flagged_fraction"],
                row["n"],
                row["expected"],
                "≥ 95 %" if row["expected"] == "flagged" else "≤ 2 %",
            )
    log.info(
        "threshold %.4f (q%.2f of hold-out); %.1f%% of %d samples above; sample score q99 %.4f",
        result.threshold,
        quantile,
        100 * summary["frac_above"],
        len(samples),
        summary["q99"],
    )
