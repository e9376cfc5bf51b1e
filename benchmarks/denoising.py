"""The denoiser's pass-through ceiling, before and after EDM preconditioning, and its hold-out
x0-prediction error over noise levels.

For each mode and `model.preconditioning` asked for, trains a model on the demo cohort (k-space
R = 4 measurements, or clean slices for `clean`) with the default config's architecture and
budget, then, on clean hold-out slices (with their subjects' phase):

- pass-through: a nearly clean input — x_t at the smallest timestep whose input PSNR is at
  least ``--input-psnr`` dB (38 by default) — and the PSNR of what the network returns. A
  denoiser that cannot pass its input through caps every sampler's quality at its output PSNR.
  The ambient model sees its input through a training-style Ã, as it always does, so its output
  is compared with the same ceiling;
- the full-image x0 error at ``evaluate.timesteps``. It is not comparable across modes (the
  ambient network sees Ã x_t, the others all of x_t): reconstruction quality is the comparison.

    python benchmarks/denoising.py                                  # clean: none vs edm
    python benchmarks/denoising.py --modes clean naive ambient --preconditioning edm

Models are kept under ``--workdir`` and reused. Writes benchmarks/results/denoising.json with
rows {what: "pass_through", mode, preconditioning, steps, t, input_psnr, output_psnr} and
{what: "x0_mse", mode, preconditioning, steps, noise_level, x0_mse}.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import demo_slices, load_config, start, write_results  # noqa: E402

from ambient_med.config import stage_config  # noqa: E402
from ambient_med.diffusion.denoising import x0_prediction_error  # noqa: E402
from ambient_med.diffusion.model import build_ddpm  # noqa: E402
from ambient_med.diffusion.training import inference_operator  # noqa: E402
from ambient_med.evaluation.metrics import psnr  # noqa: E402
from ambient_med.io.store import read_slices  # noqa: E402
from ambient_med.stages import corrupt, train  # noqa: E402
from ambient_med.stages.common import clean_images, load_model, magnitude  # noqa: E402

OFF = {"preconditioning": "none", "loss_weighting": "none", "noise_distribution": "uniform"}


@torch.no_grad()
def pass_through(net, meta, x0: torch.Tensor, alphas: torch.Tensor, input_psnr: float, seed: int):
    """(t, input PSNR, output PSNR) at the smallest t whose noisy input is ≥ ``input_psnr``."""
    reference = magnitude(x0)
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(x0.shape, generator=generator)
    best = None
    for t in range(len(alphas)):
        abar = alphas[t]
        x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
        level = psnr(reference, magnitude(x_t / abar.sqrt()))
        if level < input_psnr:
            break
        best = (t, x_t, level)
    if best is None:
        raise SystemExit(f"no timestep gives an input PSNR of {input_psnr} dB")
    t, x_t, level = best
    n, _, height, width = x0.shape
    op = inference_operator(meta, n, height, width, seed)
    out = net(op.A_adjoint(op.A(x_t)), op.mask_image(), torch.full((n,), t, dtype=torch.long))
    return t, level, psnr(reference, magnitude(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=Path("config/config.yaml"))
    parser.add_argument("--modes", nargs="+", default=["clean"])
    parser.add_argument("--preconditioning", nargs="+", default=["none", "edm"])
    parser.add_argument("--steps", type=int, default=None, help="default: train.steps")
    parser.add_argument("--input-psnr", type=float, default=38.0)
    parser.add_argument("--slices", type=int, default=24, help="hold-out slices")
    parser.add_argument("--workdir", type=Path, default=Path("benchmarks/work/denoising"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    started = start(args.threads)

    config = load_config(args.config)
    if args.steps:
        config["train"]["steps"] = args.steps
    config["train"]["checkpoint_every"] = min(250, config["train"]["steps"])
    config["cohorts"]["demo"]["corruption"] = "kspace"
    work = args.workdir
    slices = demo_slices(config, work)
    measurements = work / "kspace.h5"
    if not measurements.exists():
        corrupt.run(stage_config(config, "demo", "corrupt"), "kspace", slices, measurements)
    store = read_slices(slices)
    seed = config["cohorts"]["demo"]["seed"]
    holdout = store.index.rows("holdout")
    holdout = holdout[np.linspace(0, len(holdout) - 1, args.slices).round().astype(int)]
    x0 = clean_images(store, holdout, "kspace", seed)
    timesteps = config["evaluate"]["timesteps"]
    rows = []
    for precond in args.preconditioning:
        settings = OFF if precond == "none" else {}
        for mode in args.modes:
            trial = {k: dict(v) if isinstance(v, dict) else v for k, v in config.items()}
            trial["cohorts"] = {"demo": dict(config["cohorts"]["demo"], train_mode=mode)}
            trial["model"] |= {k: v for k, v in settings.items() if k == "preconditioning"}
            trial["train"] |= {k: v for k, v in settings.items() if k != "preconditioning"}
            out = work / f"{mode}_kspace_{precond}"
            source = slices if mode == "clean" else measurements
            if not (out / "model.pt").exists():
                cfg = stage_config(trial, "demo", "train")
                train.run(cfg, source, out / "model.pt", out / "loss.csv", out / "checkpoints")
            net, meta = load_model(out / "model.pt")
            alphas = build_ddpm(meta["scheduler"]).alphas_cumprod
            t, level, output = pass_through(net, meta, x0, alphas, args.input_psnr, seed)
            common = {"mode": mode, "preconditioning": precond, "steps": int(meta["steps"])}
            rows.append(
                {"what": "pass_through"}
                | common
                | {"t": t, "input_psnr": round(level, 2), "output_psnr": round(output, 2)}
            )
            logging.info("%s", rows[-1])
            errors = x0_prediction_error(net, meta, x0, alphas, timesteps, seed=0)
            for noise_level, mse in errors.items():
                rows.append(
                    {"what": "x0_mse"}
                    | common
                    | {"noise_level": noise_level, "x0_mse": round(mse, 6)}
                )
    path = write_results("denoising", started, rows)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
