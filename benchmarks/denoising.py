"""Hold-out x0-prediction error of `ambient` vs `naive` vs `clean` after equal training.

For each corruption (k-space R = 4, pixel p = 0.8) and mode, trains a model on the demo
cohort with the default config's architecture and the same number of steps, then measures
the full-image x0 error on clean hold-out slices at several noise levels (DESIGN.md §3.6).

    python benchmarks/denoising.py                 # default config, its step count
    python benchmarks/denoising.py --steps 300     # shorter

Writes benchmarks/results/denoising.json (DESIGN.md §7) with rows
{mode, corruption, steps, noise_level, x0_mse}. Remember that the ambient model sees Ã x_t
while the baselines see all of x_t, so this error is not the final comparison of modes —
reconstruction quality is.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import demo_slices, start, write_results  # noqa: E402

from ambient_med.config import load_config, stage_config  # noqa: E402
from ambient_med.diffusion.denoising import x0_prediction_error  # noqa: E402
from ambient_med.diffusion.model import build_ddpm  # noqa: E402
from ambient_med.io.store import read_slices  # noqa: E402
from ambient_med.stages import corrupt, train  # noqa: E402
from ambient_med.stages.common import clean_images, load_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=Path("config/config.yaml"))
    parser.add_argument("--steps", type=int, default=None, help="default: train.steps")
    parser.add_argument("--workdir", type=Path, default=Path("benchmarks/work/denoising"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    started = start(args.threads)

    config = load_config(args.config)
    if args.steps:
        config["train"]["steps"] = args.steps
    config["train"]["checkpoint_every"] = config["train"]["steps"]
    work = args.workdir
    slices = demo_slices(config, work)
    store = read_slices(slices)
    holdout = store.index.rows("holdout")
    seed = config["cohorts"]["demo"]["seed"]
    timesteps = config["evaluate"]["timesteps"]

    rows = []
    for kind in ("kspace", "pixel"):
        measurements = work / f"{kind}.h5"
        if not measurements.exists():
            corrupt.run(stage_config(config, "demo", "corrupt"), kind, slices, measurements)
        for mode in ("ambient", "naive", "clean"):
            config["cohorts"]["demo"] |= {"corruption": kind, "train_mode": mode}
            cfg = stage_config(config, "demo", "train")
            out = work / f"{mode}_{kind}"
            source = slices if mode == "clean" else measurements
            tick = time.time()
            train.run(cfg, source, out / "model.pt", out / "loss.csv", out / "checkpoints")
            net, meta = load_model(out / "model.pt")
            x0 = clean_images(store, holdout, kind, seed)
            alphas = build_ddpm(meta["scheduler"]).alphas_cumprod
            errors = x0_prediction_error(net, meta, x0, alphas, timesteps, seed=0)
            for t, mse in errors.items():
                rows.append(
                    {
                        "mode": mode,
                        "corruption": kind,
                        "steps": config["train"]["steps"],
                        "noise_level": t,
                        "x0_mse": round(mse, 6),
                        "train_seconds": round(time.time() - tick, 1),
                    }
                )
            logging.info("%s/%s: %s", mode, kind, errors)
    path = write_results("denoising", started, rows)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
