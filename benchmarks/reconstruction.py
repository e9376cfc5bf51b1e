"""Reconstruction quality of `ambient`, `naive` and `clean` priors against the baselines,
over several training seeds and every hold-out volume, with 95 % bootstrap intervals.

Data: the demo cohort (distinct synthetic subjects, 2 of them held out), every simulated
acquisition with its subject's smooth phase. Models: the config's UNet and budget (or
``--steps``), k-space R = 4 training for `ambient`/`naive`, one model per training seed
(``train.seed``; the data and hold-out stay the same). Test: the hold-out slices undersampled
at each ``--accelerations`` R (single-coil), reconstructed by zero-filling, L1-wavelet CS (λ
chosen on training-subject slices) and each diffusion sampler.

    python benchmarks/reconstruction.py                  # CPU: 3 seeds, default budget
    python benchmarks/reconstruction.py --short          # seconds: the test suite's version

Resumable: models are trained (and resumed) under ``--workdir``; per-volume scores are
appended to ``scores.jsonl`` there and skipped when present, and the result file is rewritten
after every model, so a killed run loses at most one model's work.

Writes benchmarks/results/reconstruction.json (rows {method, train_mode, corruption,
sampler, R, p, coils, seeds, volumes, psnr, psnr_ci95, ssim, ssim_fg, nrmse,
seconds_per_slice}; `method` "difference" rows hold the paired ambient − naive and ambient −
clean PSNR per sampler and R) and reconstruction.md beside it.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    RESULTS,
    checkpoint_model,
    demo_slices,
    load_config,
    machine_kind,
    start,
    write_results,
)

from ambient_med.config import stage_config  # noqa: E402
from ambient_med.evaluation.metrics import METRICS, bootstrap_ci, per_volume_metrics  # noqa: E402
from ambient_med.io.store import read_slices  # noqa: E402
from ambient_med.stages import corrupt, train  # noqa: E402
from ambient_med.stages.common import example_keys, load_model, spread_rows  # noqa: E402
from ambient_med.stages.reconstruct import diffusion_methods, retrospective  # noqa: E402

MODES = ("ambient", "naive", "clean")


def holdout_rows(store, per_volume: int) -> np.ndarray:
    """``per_volume`` evenly spaced slices of every hold-out volume."""
    rows = store.index.rows("holdout")
    picked = [
        spread_rows(rows[store.index.subject[rows] == v], per_volume)
        for v in np.unique(store.index.subject[rows])
    ]
    return np.concatenate(picked)


def curve_rows(records: list[dict]) -> list[dict]:
    """PSNR over training steps per mode (mean over seeds × volumes, with interval), and the
    paired ambient − naive difference at each step."""
    by_key: dict[tuple, dict] = defaultdict(dict)
    for r in records:
        by_key[(r["train_mode"], r["step"])][(r["seed"], r["volume"])] = r["psnr"]
    rows = []
    for (mode, step), values in sorted(by_key.items()):
        table = _table(values)
        low, high = bootstrap_ci(table)
        rows.append(
            {
                "train_mode": mode,
                "step": step,
                "sampler": "dc",
                "R": 4,
                "cells": table.size,
                "psnr": round(float(table.mean()), 3),
                "psnr_ci95": [round(low, 3), round(high, 3)],
            }
        )
        naive = by_key.get(("naive", step))
        if mode == "ambient" and naive and set(naive) == set(values):
            diff = _table(values) - _table(naive)
            low, high = bootstrap_ci(diff)
            rows.append(
                {
                    "train_mode": "ambient-naive",
                    "step": step,
                    "sampler": "dc",
                    "R": 4,
                    "cells": diff.size,
                    "psnr": round(float(diff.mean()), 3),
                    "psnr_ci95": [round(low, 3), round(high, 3)],
                }
            )
    return rows


def _table(values: dict[tuple[int, int], float]) -> np.ndarray:
    seeds = sorted({s for s, _ in values})
    volumes = sorted({v for _, v in values})
    return np.array([[values[(s, v)] for v in volumes] for s in seeds])


def load_scores(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append_scores(path: Path, records: list[dict]) -> None:
    with open(path, "a") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")


def score_records(reference, images, volumes, seconds, **keys) -> list[dict]:
    return [
        keys | {"volume": v, "seconds_per_slice": seconds} | scores
        for v, scores in per_volume_metrics(reference, images, volumes).items()
    ]


def aggregate(records: list[dict]) -> list[dict]:
    """Rows of the contract: mean over seeds × volumes, bootstrap interval of the PSNR."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in records:
        key = (r["method"], r["train_mode"], r["corruption"], r["sampler"], r["R"], r["coils"])
        groups[key].append(r)
    rows = []
    tables = {}
    for key, group in sorted(groups.items(), key=lambda item: tuple(str(x) for x in item[0])):
        _, mode, corruption, sampler, accel, coils = key
        seeds = sorted({r["seed"] for r in group})
        volumes = sorted({r["volume"] for r in group})
        table = {
            name: np.array(
                [[_find(group, s, v)[name] for v in volumes] for s in seeds], dtype=np.float64
            )
            for name in (*METRICS, "seconds_per_slice")
        }
        tables[(mode, corruption, sampler, accel, coils)] = (seeds, volumes, table["psnr"])
        rows.append(
            _row(key, seeds, volumes, table["psnr"])
            | {
                name: round(float(table[name].mean()), 4)
                for name in ("ssim", "ssim_fg", "nrmse", "seconds_per_slice")
            }
        )
    # Paired differences: same seed index and volume, ambient against each baseline.
    for (mode, corruption, sampler, accel, coils), (seeds, volumes, psnr) in tables.items():
        if mode != "ambient":
            continue
        for other in ("naive", "clean"):
            match = tables.get((other, corruption, sampler, accel, coils))
            if match is None or match[0] != seeds or match[1] != volumes:
                continue
            key = ("difference", f"ambient-{other}", corruption, sampler, accel, coils)
            rows.append(_row(key, seeds, volumes, psnr - match[2]))
    return rows


def _row(key: tuple, seeds: list, volumes: list, psnr: np.ndarray) -> dict:
    """One contract row: the mean PSNR over seeds × volumes and its bootstrap interval (the
    other metrics are null unless the caller adds them)."""
    method, mode, corruption, sampler, accel, coils = key
    low, high = bootstrap_ci(psnr)
    return {
        "method": method,
        "train_mode": mode,
        "corruption": corruption,
        "sampler": sampler,
        "R": accel,
        "p": None,
        "coils": coils,
        "seeds": len(seeds),
        "volumes": len(volumes),
        "psnr": round(float(psnr.mean()), 3),
        "psnr_ci95": [round(low, 3), round(high, 3)],
        "ssim": None,
        "ssim_fg": None,
        "nrmse": None,
        "seconds_per_slice": None,
    }


def _find(group: list[dict], seed: int, volume: int) -> dict:
    for r in group:
        if r["seed"] == seed and r["volume"] == volume:
            return r
    raise KeyError((seed, volume))


def write_markdown(rows: list[dict], path: Path, note: str) -> None:
    lines = [
        note,
        "",
        "| method | train_mode | sampler | R | seeds×vols | PSNR [95 % CI] | SSIM | SSIM fg "
        "| NRMSE |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        ci = r["psnr_ci95"]

        def fmt(value, digits=3):
            return "" if value is None else f"{value:.{digits}f}"

        lines.append(
            f"| {r['method']} | {r['train_mode']} | {r['sampler']} | {r['R']:g} | "
            f"{r['seeds']}×{r['volumes']} | {r['psnr']:.2f} [{ci[0]:.2f}, {ci[1]:.2f}] | "
            f"{fmt(r['ssim'])} | {fmt(r['ssim_fg'])} | {fmt(r['nrmse'])} |"
        )
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=Path("config/config.yaml"))
    parser.add_argument("--workdir", type=Path, default=Path("benchmarks/work/reconstruction"))
    parser.add_argument("--steps", type=int, default=None, help="training steps per model")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--modes", nargs="+", default=list(MODES))
    parser.add_argument("--slices-per-volume", type=int, default=8)
    parser.add_argument("--accelerations", type=float, nargs="+", default=[4, 8])
    parser.add_argument("--samplers", nargs="+", default=["dc", "dps", "one_step"])
    parser.add_argument("--sampling-steps", type=int, default=50)
    parser.add_argument(
        "--inference-masks",
        nargs="*",
        default=["fixed", "fresh", "scan"],
        help="ambient models: also run DC with each reconstruct.inference_mask (dc:<mask>)",
    )
    parser.add_argument(
        "--curve-steps",
        type=int,
        nargs="*",
        default=[250, 500, 750],
        help="also score DC at R = 4 from the EMA weights at these training steps",
    )
    parser.add_argument("--short", action="store_true", help="tiny config, seconds")
    parser.add_argument("--results", type=Path, default=None, help="default: benchmarks/results")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    started = start(args.threads)
    config = load_config(args.config, Path("config/tiny.yaml") if args.short else None)
    if args.short:
        args.sampling_steps = min(args.sampling_steps, 3)
    if args.steps:
        config["train"]["steps"] = args.steps
    curve_steps = [c for c in args.curve_steps if c < config["train"]["steps"]]
    # Checkpoints land on every curve step (and the interval divides the budget).
    config["train"]["checkpoint_every"] = math.gcd(config["train"]["steps"], *curve_steps)
    config["cohorts"]["demo"]["corruption"] = "kspace"

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    slices = demo_slices(config, work)
    measurements = work / "kspace.h5"
    if not measurements.exists():
        corrupt.run(stage_config(config, "demo", "corrupt"), "kspace", slices, measurements)
    store = read_slices(slices)
    keys = example_keys(store.index.subjects, store.index.subject, store.index.slice_index)
    holdout = holdout_rows(store, args.slices_per_volume)
    volumes = store.index.subject[holdout]
    validation = spread_rows(store.index.rows("train"), 6)
    reference = store.images[holdout]
    rc = dict(config["reconstruct"]) | {
        "samplers": args.samplers,
        "steps": args.sampling_steps,
        "coils": 1,
    }
    seed = config["cohorts"]["demo"]["seed"]
    scores_path = work / "scores.jsonl"
    records = load_scores(scores_path)
    curve = [r for r in records if r["method"] == "curve"]
    records = [r for r in records if r["method"] != "curve"]
    done = {(r["method"], r["train_mode"], r["seed"], r["R"], r["sampler"]) for r in records}
    curve_done = {(r["train_mode"], r["seed"], r["step"]) for r in curve}
    base = {"corruption": "kspace", "coils": 1}
    results_dir = args.results or RESULTS
    note = (
        f"Demo cohort, {len(np.unique(volumes))} hold-out volumes × {args.slices_per_volume} "
        f"slices, {config['train']['steps']} training steps, {args.sampling_steps} sampling "
        "steps; k-space R = 4 training; single-coil test with a smooth phase."
    )

    def save() -> Path:
        rows = aggregate(records)
        path = write_results("reconstruction", started, rows, results_dir)
        total = config["train"]["steps"]
        finals = [
            r | {"step": total}
            for r in records
            if r["method"] == "diffusion" and r["sampler"] == "dc" and r["R"] == 4
        ]
        if curve:
            write_results("reconstruction_curve", started, curve_rows(curve + finals), results_dir)
        suffix = ".gpu.md" if machine_kind() == "gpu" else ".md"
        write_markdown(rows, results_dir / f"reconstruction{suffix}", note)
        return path

    def keep(into: list[dict], images: np.ndarray, seconds: float, **keys) -> None:
        """Scores per hold-out volume, appended to ``scores.jsonl`` and to ``into``."""
        new = score_records(reference, images, volumes, seconds, **keys, **base)
        append_scores(scores_path, new)
        into.extend(new)
        logging.info("%s: PSNR %.2f", keys, np.mean([r["psnr"] for r in new]))

    problems = {}
    for accel in args.accelerations:
        if ("zero_filled", "", 0, accel, "") in done:
            continue
        op, y, results, seconds, _ = retrospective(
            rc, accel, store, holdout, validation, keys, seed
        )
        problems[accel] = (op, y)
        for method in ("zero_filled", "cs_l1"):
            keep(
                records,
                results[method],
                seconds[method],
                method=method,
                train_mode="",
                sampler="",
                R=accel,
                seed=0,
            )
    path = save()

    for train_seed in args.seeds:
        for mode in args.modes:
            variants = [f"dc:{m}" for m in args.inference_masks] if mode == "ambient" else []
            if all(
                ("diffusion", mode, train_seed, a, sampler) in done
                for a in args.accelerations
                for sampler in [*args.samplers, *variants]
            ):
                continue
            config["cohorts"]["demo"]["train_mode"] = mode
            config["train"]["seed"] = train_seed
            out = work / f"{mode}_seed{train_seed}"
            source = slices if mode == "clean" else measurements
            cfg = stage_config(config, "demo", "train")
            for step in curve_steps:
                if (mode, train_seed, step) in curve_done or (out / "model.pt").exists():
                    continue
                paths = (out / "model.pt", out / "loss.csv", out / "checkpoints")
                train.run(cfg, source, *paths, stop_after=step)
                net, meta = checkpoint_model(
                    out / "checkpoints" / "last.pt", cfg, 2, store.images.shape[-1]
                )
                if 4 not in problems:
                    op, y, *_ = retrospective(rc, 4, store, holdout, validation, keys, seed)
                    problems[4] = (op, y)
                learned, learned_seconds = diffusion_methods(
                    net, meta, rc | {"samplers": ["dc"]}, *problems[4], seed
                )
                keep(
                    curve,
                    learned["diffusion_dc"],
                    learned_seconds["diffusion_dc"],
                    method="curve",
                    train_mode=mode,
                    sampler="dc",
                    R=4,
                    seed=train_seed,
                    step=step,
                )
            if not (out / "model.pt").exists():
                train.run(cfg, source, out / "model.pt", out / "loss.csv", out / "checkpoints")
            net, meta = load_model(out / "model.pt")
            for accel in args.accelerations:
                wanted = list(args.samplers)
                if mode == "ambient":
                    wanted += [f"dc:{m}" for m in args.inference_masks]
                todo = [s for s in wanted if ("diffusion", mode, train_seed, accel, s) not in done]
                if not todo:
                    continue
                if accel not in problems:
                    op, y, *_ = retrospective(rc, accel, store, holdout, validation, keys, seed)
                    problems[accel] = (op, y)
                op, y = problems[accel]
                learned, learned_seconds = diffusion_methods(
                    net, meta, rc | {"samplers": [t for t in todo if ":" not in t]}, op, y, seed
                )
                # The network's operator while reconstructing, measured on ambient models
                # with the DC sampler: "dc:<inference_mask>".
                for variant in [t for t in todo if t.startswith("dc:")]:
                    mask = variant.split(":", 1)[1]
                    extra, extra_seconds = diffusion_methods(
                        net, meta, rc | {"samplers": ["dc"], "inference_mask": mask}, op, y, seed
                    )
                    learned[f"diffusion_{variant}"] = extra["diffusion_dc"]
                    learned_seconds[f"diffusion_{variant}"] = extra_seconds["diffusion_dc"]
                for name, images in learned.items():
                    keep(
                        records,
                        images,
                        learned_seconds[name],
                        method="diffusion",
                        train_mode=mode,
                        sampler=name.removeprefix("diffusion_"),
                        R=accel,
                        seed=train_seed,
                    )
            path = save()
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
