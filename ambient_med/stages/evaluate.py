"""Rule `evaluate`: hold-out metrics of a trained model → ``eval/metrics.json`` (flat).

Keys:
    cohort, mode, kind, steps: what was evaluated.
    holdout_slices: clean hold-out slices used (evenly spaced, at most evaluate.max_slices);
        0 when the cohort has no clean image (undersampled raw k-space).
    x0_mse_t{t}: mean squared error of the x0-prediction per image entry at noise level t
        (docs/method.md; the ambient model sees Ã_inf x_t, the baselines all of x_t).
    x0_nrmse_t{t}: sqrt(x0_mse / mean(x0²)).
    holdout_measured: hold-out examples of the measurement store used.
    heldout_observed_mse_t{t}: the training objective on hold-out measurements (error on
        entries the acquisition measured); needs no clean image.
    gen_mmd_pixels, gen_frechet_random_features: generation quality of the `sample` rule's
        samples against half of the hold-out slices; ``..._real`` the same distance for the
        other half (the floor), ``..._blurred`` for that half blurred (what blobs score) —
        see ambient_med/evaluation/generation.py.
    recon_*: the reconstruct rule's metrics (see ambient_med/stages/reconstruct.py), e.g.
        recon_diffusion_dc_R4_psnr, recon_cs_l1_R8_ssim_std, recon_zero_filled_R4_nrmse.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from ambient_med.diffusion.denoising import heldout_observed_error, x0_prediction_error
from ambient_med.diffusion.losses import AmbientObjective
from ambient_med.diffusion.model import build_ddpm
from ambient_med.errors import AmbientMedError
from ambient_med.evaluation.generation import generation_report
from ambient_med.io.export import write_table
from ambient_med.io.store import atomic_path, read_slices
from ambient_med.stages.common import clean_images, load_examples, load_model, spread_rows

log = logging.getLogger(__name__)


def run(
    cfg: dict[str, Any],
    model_path: Path,
    slices_path: Path,
    metrics_out: Path,
    measurements_path: Path | None = None,
    reconstruction_path: Path | None = None,
    samples_path: Path | None = None,
    table_out: Path | None = None,
) -> None:
    net, meta = load_model(model_path)
    limit = cfg["evaluate"]["max_slices"]
    alphas = build_ddpm(meta["scheduler"]).alphas_cumprod
    timesteps = [t for t in cfg["evaluate"]["timesteps"] if t < len(alphas)]
    seed = cfg["cohort"]["seed"]
    metrics: dict[str, Any] = {
        "cohort": cfg["cohort"]["name"],
        "mode": meta["mode"],
        "kind": meta["kind"],
        "steps": int(meta["steps"]),
        "holdout_slices": 0,
    }

    store = read_slices(slices_path)
    rows = spread_rows(store.index.rows("holdout"), limit)
    if len(rows) and meta["kind"] != "native":
        x0 = clean_images(store, rows, meta["kind"], seed)
        errors = x0_prediction_error(net, meta, x0, alphas, timesteps, seed)
        power = float(x0.square().mean())
        metrics["holdout_slices"] = len(rows)
        for t, mse in errors.items():
            metrics[f"x0_mse_t{t}"] = mse
            metrics[f"x0_nrmse_t{t}"] = float(np.sqrt(mse / power))
            log.info("t=%d: x0 MSE %.5f (NRMSE %.3f)", t, mse, metrics[f"x0_nrmse_t{t}"])
    else:
        log.info("no clean hold-out slice for this model: x0 error not measured")

    if measurements_path is not None and meta["mode"] != "clean":
        data = load_examples(
            measurements_path, meta["mode"], meta["kind"], "holdout", meta["delta"], False, seed
        )
        data = data.subset(spread_rows(np.arange(len(data)), limit))
        objective = AmbientObjective(alphas)
        errors = heldout_observed_error(net, objective, data, timesteps, seed)
        metrics["holdout_measured"] = len(data)
        for t, mse in errors.items():
            metrics[f"heldout_observed_mse_t{t}"] = mse
            log.info("t=%d: hold-out error on measured entries %.5f", t, mse)
    if samples_path is not None and len(store.index.rows("holdout")):
        samples = np.moveaxis(np.asarray(nib.load(str(samples_path)).dataobj, np.float32), -1, 0)
        holdout_images = store.images[store.index.rows("holdout")]
        if samples.shape[1:] == holdout_images.shape[1:] and len(samples) > 1:
            metrics |= generation_report(samples, holdout_images, seed)
    if reconstruction_path is not None:
        try:
            recon = json.loads(Path(reconstruction_path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise AmbientMedError(
                f"reconstruction metrics '{reconstruction_path}': unreadable ({exc})"
            ) from None
        metrics |= {f"recon_{key}": value for key, value in recon.items()}
    with atomic_path(metrics_out) as tmp:
        tmp.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    if table_out is not None:
        write_table(table_out, metrics)
