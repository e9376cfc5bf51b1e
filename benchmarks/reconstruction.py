"""Reconstruction quality of `clean`, `ambient` and `naive` priors against the baselines.

Trains (or reuses) the three models on the demo cohort at 64x64 with the same budget —
k-space corruption at R = 4 for `ambient`/`naive` — then undersamples the hold-out slices at
R = 2, 4, 6, 8, single-coil and 4-coil (simulated birdcage sensitivities, SENSE operator),
and reconstructs them with zero-filling, L1-wavelet CS (λ chosen on training-subject slices)
and each diffusion sampler (dc, dps, one_step).

    python benchmarks/reconstruction.py                      # CPU settings (below)
    python benchmarks/reconstruction.py --gpu                # longer: 20k steps, 500 sampling steps

CPU settings, shrunk to fit about two hours on 2 cores: the default config's model and
training budget (1000 steps), `--slices` hold-out slices (12), 50 DDIM steps. Models are
shared with benchmarks/denoising.py when both use the same work folder and config.

Writes benchmarks/results/reconstruction.json (DESIGN.md §7) with rows {method, train_mode,
sampler, R, coils, psnr, ssim, nrmse, seconds_per_slice} and a markdown table beside it.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, demo_slices, machine_kind, start, write_results  # noqa: E402

from ambient_med.config import load_config, stage_config  # noqa: E402
from ambient_med.evaluation.metrics import slice_metrics  # noqa: E402
from ambient_med.io.store import read_slices  # noqa: E402
from ambient_med.stages import corrupt, train  # noqa: E402
from ambient_med.stages.common import example_keys, load_model, spread_rows  # noqa: E402
from ambient_med.stages.reconstruct import diffusion_methods, retrospective  # noqa: E402

MODES = ("clean", "ambient", "naive")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=Path("config/config.yaml"))
    parser.add_argument("--workdir", type=Path, default=Path("benchmarks/work/denoising"))
    parser.add_argument("--steps", type=int, default=None, help="training steps per model")
    parser.add_argument("--slices", type=int, default=12, help="hold-out slices")
    parser.add_argument("--accelerations", type=float, nargs="+", default=[2, 4, 6, 8])
    parser.add_argument("--coils", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--samplers", nargs="+", default=["dc", "dps", "one_step"])
    parser.add_argument("--sampling-steps", type=int, default=50)
    parser.add_argument("--gpu", action="store_true", help="GPU-sized run: longer everything")
    parser.add_argument(
        "--retrain",
        action="store_true",
        help="train even where the work folder already holds a model (default: reuse it)",
    )
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    started = start(args.threads)
    config = load_config(args.config)
    if args.gpu:
        config["train"] |= {"steps": 20000, "batch_size": 32, "device": "cuda"}
        args.sampling_steps, args.slices = 500, 100
    if args.steps:
        config["train"]["steps"] = args.steps
    config["train"]["checkpoint_every"] = config["train"]["steps"]

    work = args.workdir
    slices = demo_slices(config, work)
    measurements = work / "kspace.h5"
    if not measurements.exists():
        corrupt.run(stage_config(config, "demo", "corrupt"), "kspace", slices, measurements)
    models = {}
    for mode in MODES:
        config["cohorts"]["demo"] |= {"corruption": "kspace", "train_mode": mode}
        out = work / f"{mode}_kspace"
        source = slices if mode == "clean" else measurements
        cfg = stage_config(config, "demo", "train")
        if args.retrain or not (out / "model.pt").exists():
            train.run(cfg, source, out / "model.pt", out / "loss.csv", out / "checkpoints")
        models[mode] = load_model(out / "model.pt")
        if models[mode][1]["steps"] != config["train"]["steps"]:
            raise SystemExit(f"{out / 'model.pt'} has {models[mode][1]['steps']} steps: --retrain")

    store = read_slices(slices)
    keys = example_keys(store.index.subjects, store.index.subject, store.index.slice_index)
    holdout = spread_rows(store.index.rows("holdout"), args.slices)
    validation = spread_rows(store.index.rows("train"), 6)
    reference = store.images[holdout]
    rc = dict(config["reconstruct"])
    rc |= {"samplers": args.samplers, "steps": args.sampling_steps}
    seed = config["cohorts"]["demo"]["seed"]
    rows = []

    def record(method, mode, sampler, acceleration, coils, images, seconds):
        scores = slice_metrics(reference, images)
        rows.append(
            {
                "method": method,
                "train_mode": mode,
                "sampler": sampler,
                "R": acceleration,
                "coils": coils,
                "psnr": round(float(scores["psnr"].mean()), 3),
                "ssim": round(float(scores["ssim"].mean()), 4),
                "nrmse": round(float(scores["nrmse"].mean()), 4),
                "seconds_per_slice": round(seconds, 4),
            }
        )
        logging.info("%s", rows[-1])

    for coils in args.coils:
        rc["coils"] = coils
        for acceleration in args.accelerations:
            op, y, results, seconds, _ = retrospective(
                rc, acceleration, store, holdout, validation, keys, seed
            )
            for method in ("zero_filled", "cs_l1"):
                record(method, "", "", acceleration, coils, results[method], seconds[method])
            for mode, (net, meta) in models.items():
                learned, learned_seconds = diffusion_methods(net, meta, rc, op, y, seed)
                for name, images in learned.items():
                    sampler = name.removeprefix("diffusion_")
                    record(
                        "diffusion",
                        mode,
                        sampler,
                        acceleration,
                        coils,
                        images,
                        learned_seconds[name],
                    )

    path = write_results("reconstruction", started, rows)
    suffix = ".gpu.md" if machine_kind() == "gpu" else ".md"
    lines = [
        "| method | train_mode | sampler | R | coils | PSNR | SSIM | NRMSE | s/slice |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['train_mode']} | {r['sampler']} | {r['R']:g} | {r['coils']} "
            f"| {r['psnr']:.2f} | {r['ssim']:.3f} | {r['nrmse']:.3f} | "
            f"{r['seconds_per_slice']:.3f} |"
        )
    (RESULTS / f"reconstruction{suffix}").write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
