"""Rule `evaluate`: hold-out metrics of a trained model → ``eval/metrics.json`` (flat).

Keys:
    cohort, mode, kind, steps: what was evaluated.
    holdout_slices: clean hold-out slices used (evenly spaced, at most evaluate.max_slices).
    x0_mse_t{t}: mean squared error of the x0-prediction per image entry at noise level t
        (DESIGN.md §3.6; the ambient model sees Ã_inf x_t, the baselines all of x_t).
    x0_nrmse_t{t}: sqrt(x0_mse / mean(x0²)).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from ambient_med.diffusion.denoising import x0_prediction_error
from ambient_med.diffusion.model import build_ddpm
from ambient_med.diffusion.training import to_image_channels
from ambient_med.errors import AmbientMedError
from ambient_med.io.store import atomic_path, read_slices
from ambient_med.stages.common import load_model

log = logging.getLogger(__name__)


def run(cfg: dict[str, Any], model_path: Path, slices_path: Path, metrics_out: Path) -> None:
    net, meta = load_model(model_path)
    store = read_slices(slices_path)
    rows = store.index.rows("holdout")
    if len(rows) == 0:
        raise AmbientMedError(f"slice store '{slices_path}': no hold-out slice to evaluate")
    limit = cfg["evaluate"]["max_slices"]
    if len(rows) > limit:
        rows = rows[np.linspace(0, len(rows) - 1, limit).round().astype(int)]
    x0 = to_image_channels(store.images[rows], meta["kind"])
    alphas = build_ddpm(meta["scheduler"]).alphas_cumprod
    timesteps = [t for t in cfg["evaluate"]["timesteps"] if t < len(alphas)]
    errors = x0_prediction_error(net, meta, x0, alphas, timesteps, cfg["cohort"]["seed"])
    power = float(x0.square().mean())
    metrics: dict[str, Any] = {
        "cohort": cfg["cohort"]["name"],
        "mode": meta["mode"],
        "kind": meta["kind"],
        "steps": int(meta["steps"]),
        "holdout_slices": len(rows),
    }
    for t, mse in errors.items():
        metrics[f"x0_mse_t{t}"] = mse
        metrics[f"x0_nrmse_t{t}"] = float(np.sqrt(mse / power))
        log.info("t=%d: x0 MSE %.5f (NRMSE %.3f)", t, mse, metrics[f"x0_nrmse_t{t}"])
    with atomic_path(metrics_out) as tmp:
        tmp.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
