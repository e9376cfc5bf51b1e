"""What makes the ambient k-space prior learn: training variants side by side, over steps.

Each variant is the default config with a few keys changed (``--variant NAME key=value ...``,
values in JSON). Every variant trains an ambient model on the demo cohort's single-coil R = 4
measurements; every ``--every`` steps its EMA weights reconstruct the same 16 hold-out slices
(8 per hold-out subject, with their phase) at R = 4 with the one-step and DC samplers, and the
held-back ratio is measured on those and on 16 training slices: ‖prediction − y‖² / ‖y‖² on
acquired lines the network was not shown (1 = no better than zero-filling them). Zero-filled
and CS-L1 on the same slices are the first rows. ``--accelerations 4 8`` also scores the same
slices at R = 8 (a sparser scan than the model trained on). Rows:

    {kind: "baseline", R, zero_filled, cs_l1}
    {kind: "variant", variant, overrides, step, train_seconds, one_step, dc,
     held_back_holdout, held_back_train, loss_last100, [one_step_r8, dc_r8]}

    python benchmarks/ablation.py --steps 1000 --every 250 \\
        --variant sigma_data model.unmeasured_scale=null \\
        --variant redraw model.unmeasured_scale=null train.b_redraw=true \\
        --variant auto model.unmeasured_scale='"auto"'

Resumable: models train (and resume) under ``--workdir``; finished rows are kept in
``rows.jsonl`` there and not recomputed. One variant at a time (2 CPU cores).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import checkpoint_model, demo_slices, load_config, start, write_results  # noqa: E402

from ambient_med.config import stage_config  # noqa: E402
from ambient_med.errors import AmbientMedError  # noqa: E402
from ambient_med.evaluation.metrics import per_volume_metrics  # noqa: E402
from ambient_med.io.store import read_slices  # noqa: E402
from ambient_med.stages import corrupt, train  # noqa: E402
from ambient_med.stages.common import example_keys, spread_rows  # noqa: E402
from ambient_med.stages.reconstruct import (  # noqa: E402
    acquisition,
    diffusion_methods,
    held_back_errors,
    retrospective,
    undersample,
)


def parse_variants(specs: list[list[str]]) -> dict[str, dict[str, object]]:
    """``[[name, "section.key=json", ...], ...]`` → name → {"section.key": value}."""
    variants: dict[str, dict[str, object]] = {}
    for spec in specs:
        name, overrides = spec[0], {}
        for item in spec[1:]:
            key, sep, value = item.partition("=")
            if not sep or key.count(".") != 1:
                raise AmbientMedError(f"--variant {name}: expected section.key=value, got {item!r}")
            overrides[key] = json.loads(value)
        variants[name] = overrides
    return variants


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=Path("config/config.yaml"))
    parser.add_argument("--workdir", type=Path, default=Path("benchmarks/work/ablation"))
    parser.add_argument("--results", type=Path, default=None, help="default: benchmarks/results")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--every", type=int, default=250)
    parser.add_argument("--sampling-steps", type=int, default=30)
    parser.add_argument(
        "--accelerations",
        type=float,
        nargs="+",
        default=[4],
        help="test R; R = 4 is always scored (one_step, dc), others add one_step_rR, dc_rR",
    )
    parser.add_argument(
        "--variant", nargs="+", action="append", required=True, metavar="NAME KEY=VALUE"
    )
    parser.add_argument("--short", action="store_true", help="tiny config, seconds")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    started = start(args.threads)
    variants = parse_variants(args.variant)
    config = load_config(args.config, Path("config/tiny.yaml") if args.short else None)
    config["cohorts"]["demo"] |= {"corruption": "kspace", "train_mode": "ambient"}
    config["train"] |= {"steps": args.steps, "checkpoint_every": args.every}
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    slices = demo_slices(config, work)
    measurements = work / "kspace.h5"
    if not measurements.exists():
        corrupt.run(stage_config(config, "demo", "corrupt"), "kspace", slices, measurements)
    store = read_slices(slices)
    keys = example_keys(store.index.subjects, store.index.subject, store.index.slice_index)
    holdout = spread_rows(store.index.rows("holdout"), 16)
    train_rows = spread_rows(store.index.rows("train"), 16)
    validation = spread_rows(store.index.rows("train"), 6)
    seed = config["cohorts"]["demo"]["seed"]
    rc = dict(config["reconstruct"]) | {"coils": 1, "steps": args.sampling_steps}
    tests = {
        R: retrospective(rc, R, store, holdout, validation, keys, seed)[:3]
        for R in sorted({4.0, *args.accelerations})
    }
    op, y, _ = tests[4.0]
    acq = acquisition(rc, 4, store.images.shape[-1], seed)
    op_train, y_train = undersample(acq, store, train_rows, keys, "ablation-train")
    reference, volumes = store.images[holdout], store.index.subject[holdout]

    def psnr(images: np.ndarray) -> float:
        per_volume = per_volume_metrics(reference, images, volumes).values()
        return round(float(np.mean([m["psnr"] for m in per_volume])), 3)

    rows_path = work / "rows.jsonl"
    rows = []
    if rows_path.exists():
        rows = [json.loads(line) for line in rows_path.read_text().splitlines()]
    done = {(r["variant"], r["step"]) for r in rows if r["kind"] == "variant"}

    def record(row: dict) -> None:
        rows.append(row)
        with open(rows_path, "a") as handle:
            handle.write(json.dumps(row) + "\n")
        logging.info("%s", row)

    for R, (_, _, baselines) in tests.items():
        # The R = 4 baseline row predates the R field.
        if not any(r["kind"] == "baseline" and r.get("R", 4.0) == R for r in rows):
            record(
                {
                    "kind": "baseline",
                    "R": R,
                    "zero_filled": psnr(baselines["zero_filled"]),
                    "cs_l1": psnr(baselines["cs_l1"]),
                }
            )
    for name, overrides in variants.items():
        variant_config = copy.deepcopy(config)
        for key, value in overrides.items():
            section, field = key.split(".")
            variant_config[section][field] = value
        cfg = stage_config(variant_config, "demo", "train")
        out = work / name
        for step in range(args.every, args.steps + 1, args.every):
            if (name, step) in done:
                continue
            began = time.time()
            paths = (out / "model.pt", out / "loss.csv", out / "checkpoints")
            train.run(cfg, measurements, *paths, stop_after=step)
            seconds = time.time() - began
            net, meta = checkpoint_model(
                out / "checkpoints" / "last.pt", cfg, 2, store.images.shape[-1]
            )
            images, _ = diffusion_methods(
                net, meta, rc | {"samplers": ["one_step", "dc"]}, op, y, seed
            )
            loss = np.loadtxt(out / "checkpoints" / "loss.csv", delimiter=",", skiprows=1)
            other_r = {}
            for R, (op_r, y_r, _) in tests.items():
                if R == 4.0:
                    continue
                extra, _ = diffusion_methods(
                    net, meta, rc | {"samplers": ["one_step", "dc"]}, op_r, y_r, seed
                )
                other_r[f"one_step_r{R:g}"] = psnr(extra["diffusion_one_step"])
                other_r[f"dc_r{R:g}"] = psnr(extra["diffusion_dc"])
            record(
                {
                    "kind": "variant",
                    "variant": name,
                    "overrides": overrides,
                    "step": step,
                    "train_seconds": round(seconds, 1),
                    "one_step": psnr(images["diffusion_one_step"]),
                    "dc": psnr(images["diffusion_dc"]),
                    "held_back_holdout": round(
                        float(np.nanmedian(held_back_errors(net, meta, op, y, seed))), 4
                    ),
                    "held_back_train": round(
                        float(np.nanmedian(held_back_errors(net, meta, op_train, y_train, seed))),
                        4,
                    ),
                    "loss_last100": round(float(np.atleast_2d(loss)[-100:, 1].mean()), 4),
                }
                | other_r
            )
    path = write_results("ablation", started, rows, args.results or Path("benchmarks/results"))
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
