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
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

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
from ambient_med.diffusion.model import OnDevice  # noqa: E402
from ambient_med.evaluation.metrics import METRICS, bootstrap_ci, per_volume_metrics  # noqa: E402
from ambient_med.io.store import MeasurementStore, read_slices, write_measurements  # noqa: E402
from ambient_med.physics.acquisition import Acquisition, as_channels  # noqa: E402
from ambient_med.physics.masks import derive_seed, pixel_mask  # noqa: E402
from ambient_med.physics.operators import PixelMask  # noqa: E402
from ambient_med.stages import corrupt, train  # noqa: E402
from ambient_med.stages.common import (  # noqa: E402
    example_keys,
    load_model,
    slice_identity,
    spread_rows,
)
from ambient_med.stages.reconstruct import (  # noqa: E402
    diffusion_methods,
    held_back_errors,
    retrospective,
)

MODES = ("ambient", "naive", "clean")
SETTINGS = ("kspace", "pixel", "native")
NATIVE_COILS = 4


def per_volume_rows(store, rows: np.ndarray, per_volume: int) -> np.ndarray:
    """``per_volume`` evenly spaced slices of every volume among ``rows``."""
    picked = [
        spread_rows(rows[store.index.subject[rows] == v], per_volume)
        for v in np.unique(store.index.subject[rows])
    ]
    return np.concatenate(picked)


def holdout_rows(store, per_volume: int) -> np.ndarray:
    """``per_volume`` evenly spaced slices of every hold-out volume."""
    return per_volume_rows(store, store.index.rows("holdout"), per_volume)


def scored_slices(store, per_volume: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """What every diffusion score of this benchmark is measured on: ``(hold-out rows, their
    volumes, training-subject rows that choose CS's λ, hold-out reference images)``."""
    holdout = holdout_rows(store, per_volume)
    validation = spread_rows(store.index.rows("train"), 6)
    return holdout, store.index.subject[holdout], validation, store.images[holdout]


def curve_rows(records: list[dict], total: int) -> list[dict]:
    """PSNR at R = 4 over training steps per mode and sampler (mean over seeds × volumes, with
    interval), the ambient model's held-back prediction ratio, and the paired ambient − naive
    difference at each step. Records of the final models count at step ``total``."""
    by_key: dict[tuple, dict] = defaultdict(dict)
    held: dict[tuple, list] = defaultdict(list)
    for r in records:
        step = r.get("step", total)
        by_key[(r["train_mode"], r["sampler"], step)][(r["seed"], r["volume"])] = r["psnr"]
        if r.get("held_back") is not None:
            held[(r["train_mode"], r["sampler"], step)].append(r["held_back"])
    rows = []
    for (mode, sampler, step), values in sorted(by_key.items()):
        row = _curve_row(mode, sampler, step, _table(values))
        if held.get((mode, sampler, step)):
            row["held_back_ratio"] = round(float(np.mean(held[(mode, sampler, step)])), 4)
        rows.append(row)
        naive = by_key.get(("naive", sampler, step))
        if mode == "ambient" and naive and set(naive) == set(values):
            diff = _table(values) - _table(naive)
            rows.append(_curve_row("ambient-naive", sampler, step, diff))
    return rows


def _curve_row(mode: str, sampler: str, step: int, table: np.ndarray) -> dict:
    """One curve row: the mean of a seeds × volumes ``table`` of PSNR at R = 4 (or of paired
    differences) with its bootstrap interval."""
    low, high = bootstrap_ci(table)
    return {
        "train_mode": mode,
        "step": step,
        "sampler": sampler,
        "R": 4,
        "cells": table.size,
        "psnr": round(float(table.mean()), 3),
        "psnr_ci95": [round(low, 3), round(high, 3)],
    }


def curve_png(path: Path, rows: list[dict], records: list[dict]) -> None:
    """PSNR at R = 4 over training steps, one line per mode and sampler (left), beside the
    zero-filled and CS level of the same slices; the ambient model's held-back prediction
    ratio over the same steps (right: 1 = predicts no unmeasured k-space)."""
    from ambient_med.evaluation.figures import new_figure, save_figure

    figure = new_figure(11.0, 4.2)
    psnr_ax, held_ax = figure.subplots(1, 2)
    lines = sorted({(r["train_mode"], r["sampler"]) for r in rows if r["train_mode"] in MODES})
    for mode, sampler in lines:
        points = sorted(
            (r["step"], r["psnr"])
            for r in rows
            if (r["train_mode"], r["sampler"]) == (mode, sampler)
        )
        style = "-" if sampler == "dc" else "--"
        steps, values = np.array(points).T
        psnr_ax.plot(
            steps,
            values,
            style,
            marker="o",
            color=f"C{MODES.index(mode)}",
            label=f"{mode} {sampler}",
        )
    for method, colour in (("zero_filled", "0.4"), ("cs_l1", "0.7")):
        level = [
            r["psnr"]
            for r in records
            if r["method"] == method and r["corruption"] == "kspace" and r["R"] == 4
        ]
        if level:
            psnr_ax.axhline(float(np.mean(level)), color=colour, linestyle=":", label=method)
    psnr_ax.set(xlabel="training step", ylabel="PSNR at R = 4 [dB]", title="hold-out, 1 coil")
    psnr_ax.legend(fontsize=7)
    held = sorted(
        (r["step"], r["held_back_ratio"])
        for r in rows
        if r["train_mode"] == "ambient" and r["sampler"] == "dc" and "held_back_ratio" in r
    )
    if held:
        held_ax.plot(*np.array(held).T, marker="o", color="C0")
        held_ax.axhline(1.0, color="0.4", linestyle=":")
    held_ax.set(
        xlabel="training step",
        ylabel="held-back error / held-back energy",
        title="ambient: unmeasured k-space predicted (lower is better)",
    )
    save_figure(figure, path)


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
        key = (
            r["method"],
            r["train_mode"],
            r["corruption"],
            r["sampler"],
            r["R"],
            r.get("p"),
            r["coils"],
        )
        groups[key].append(r)
    rows = []
    tables = {}
    for key, group in sorted(groups.items(), key=lambda item: tuple(str(x) for x in item[0])):
        _, mode, corruption, sampler, accel, p, coils = key
        seeds = sorted({r["seed"] for r in group})
        volumes = sorted({r["volume"] for r in group})
        table = {
            name: np.array(
                [[_find(group, s, v)[name] for v in volumes] for s in seeds], dtype=np.float64
            )
            for name in (*METRICS, "seconds_per_slice")
        }
        tables[(mode, corruption, sampler, accel, p, coils)] = (seeds, volumes, table["psnr"])
        rows.append(
            _row(key, seeds, volumes, table["psnr"])
            | {
                name: round(float(table[name].mean()), 4)
                for name in ("ssim", "ssim_fg", "nrmse", "seconds_per_slice")
            }
        )
    # Paired differences: same seed index and volume, ambient against each baseline.
    for (mode, corruption, sampler, accel, p, coils), (seeds, volumes, psnr) in tables.items():
        if mode != "ambient":
            continue
        for other in ("naive", "clean"):
            match = tables.get((other, corruption, sampler, accel, p, coils))
            if match is None or match[0] != seeds or match[1] != volumes:
                continue
            key = ("difference", f"ambient-{other}", corruption, sampler, accel, p, coils)
            rows.append(_row(key, seeds, volumes, psnr - match[2]))
    return rows


def _row(key: tuple, seeds: list, volumes: list, psnr: np.ndarray) -> dict:
    """One contract row: the mean PSNR over seeds × volumes and its bootstrap interval (the
    other metrics are null unless the caller adds them)."""
    method, mode, corruption, sampler, accel, p, coils = key
    low, high = bootstrap_ci(psnr)
    return {
        "method": method,
        "train_mode": mode,
        "corruption": corruption,
        "sampler": sampler,
        "R": accel,
        "p": p,
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
        "| method | train_mode | corruption | sampler | R / p | coils | seeds×vols "
        "| PSNR [95 % CI] | SSIM | SSIM fg | NRMSE |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        ci = r["psnr_ci95"]

        def fmt(value, digits=3):
            return "" if value is None else f"{value:.{digits}f}"

        level = f"p = {r['p']:g}" if r["p"] is not None else f"R = {r['R']:g}"
        lines.append(
            f"| {r['method']} | {r['train_mode']} | {r['corruption']} | {r['sampler']} | "
            f"{level} | {r['coils']} | {r['seeds']}×{r['volumes']} | "
            f"{r['psnr']:.2f} [{ci[0]:.2f}, {ci[1]:.2f}] | "
            f"{fmt(r['ssim'])} | {fmt(r['ssim_fg'])} | {fmt(r['nrmse'])} |"
        )
    path.write_text("\n".join(lines) + "\n")


def interpolated(y: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Inpainting baseline: piecewise-linear interpolation of the kept pixels (Delaunay,
    scipy), nearest kept pixel outside their hull. ``y``, ``keep``: ``(N, H, W)``."""
    from scipy.interpolate import griddata

    out = np.empty_like(y)
    grid = np.indices(y.shape[1:]).reshape(2, -1).T
    for i in range(len(y)):
        points = np.argwhere(keep[i])
        values = y[i][keep[i]]
        linear = griddata(points, values, grid, method="linear")
        nearest = griddata(points, values, grid, method="nearest")
        out[i] = np.where(np.isnan(linear), nearest, linear).reshape(y.shape[1:])
    return out.astype(np.float32)


def pixel_problem(store, rows: np.ndarray, keys: list[str], p: float, seed: int):
    """(A, y) of inpainting the magnitude slices ``rows`` with a fraction ``p`` of pixels
    missing, one seeded mask per slice."""
    size = store.images.shape[-1]
    keep = np.stack(
        [pixel_mask((size, size), p, derive_seed(seed, "pixel-test", keys[r])) for r in rows]
    )
    op = PixelMask(torch.from_numpy(keep)[:, None])
    return op, op.A(as_channels(store.images[rows])), keep


def native_store(config: dict, store, keys: list[str], path: Path) -> None:
    """The measurement store of a natively multi-coil cohort: every slice acquired by the
    shared simulator with ``coils`` birdcage coils on its own random R = 4 line mask (seeded
    apart from the test masks), A = M F S, and nothing else kept. The maps stored are the
    simulator's: at 64² the 8 % centre holds 5 lines, fewer than ESPIRiT needs (6)."""
    kspace_cfg = config["corrupt"]["kspace"]
    seed = derive_seed(config["cohorts"]["demo"]["seed"], "native-train")
    acq = Acquisition(
        kspace_cfg["acceleration"],
        kspace_cfg["center_fraction"],
        kspace_cfg["mask_type"],
        store.images.shape[-1],
        seed,
        coils=NATIVE_COILS,
    )
    rows = np.arange(len(store.images))
    op = acq.operator(keys)
    subjects, slice_index = slice_identity(store, rows)
    y = acq.measure(op, store.images, subjects, slice_index, "native-train")
    attrs = {
        "kind": "native",
        "operator": "multi_coil_sense",
        "fft": "centred orthonormal 2-D",
        "coils": NATIVE_COILS,
        "cohort": "demo",
        "seed": config["cohorts"]["demo"]["seed"],
        "image_size": int(store.images.shape[-1]),
        "observed_fraction": float(op.line_mask.float().mean()),
        "phase_encode_axis": "last",
    }
    measurements = torch.view_as_complex(y.contiguous()).numpy()
    maps = op.maps.numpy().astype(np.complex64)
    write_measurements(
        path,
        MeasurementStore(measurements, op.line_mask.numpy(), store.index, attrs, maps=maps),
    )


def training_stores(config: dict, work: Path, settings) -> tuple[Path, dict[str, Path]]:
    """The demo cohort's slice store under ``work`` and the measurement store each of
    ``settings`` trains on, made once and reused: ``(slices, {setting: store path})``."""
    slices = demo_slices(config, work)
    sources = {s: work / f"{s}.h5" for s in SETTINGS}
    for kind in ("kspace", "pixel"):
        if kind in settings and not sources[kind].exists():
            corrupt.run(stage_config(config, "demo", "corrupt"), kind, slices, sources[kind])
    if "native" in settings and not sources["native"].exists():
        store = read_slices(slices)
        keys = example_keys(store.index.subjects, store.index.subject, store.index.slice_index)
        native_store(config, store, keys, sources["native"])
    return slices, sources


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=Path("config/config.yaml"))
    parser.add_argument("--workdir", type=Path, default=Path("benchmarks/work/reconstruction"))
    parser.add_argument("--steps", type=int, default=None, help="training steps per model")
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--modes", nargs="+", default=list(MODES))
    parser.add_argument(
        "--settings",
        nargs="+",
        default=list(SETTINGS),
        choices=SETTINGS,
        help="kspace: 1-coil R = 4 training; pixel: p-masked; native: 4-coil R = 4 (ambient)",
    )
    parser.add_argument("--slices-per-volume", type=int, default=8)
    parser.add_argument("--accelerations", type=float, nargs="+", default=[2, 4, 6, 8])
    parser.add_argument("--samplers", nargs="+", default=["dc", "dps", "one_step"])
    parser.add_argument("--sampling-steps", type=int, default=50)
    parser.add_argument("--posterior-samples", type=int, default=None, help="default: the config's")
    parser.add_argument(
        "--inference-masks",
        nargs="*",
        default=["fixed", "fresh", "scan"],
        help="ambient k-space models: also run DC with each reconstruct.inference_mask",
    )
    parser.add_argument(
        "--curve-steps",
        type=int,
        nargs="*",
        default=[250, 500, 750],
        help="k-space models: also score DC and one-step at R = 4 (and, for ambient, the "
        "held-back prediction ratio) from the EMA weights at these training steps",
    )
    parser.add_argument("--short", action="store_true", help="tiny config, seconds")
    parser.add_argument(
        "--overlay", type=Path, default=None, help="config overlay (a section replaces its keys)"
    )
    parser.add_argument(
        "--scores",
        default="scores.jsonl",
        help="score file under --workdir (parallel runs each append to their own)",
    )
    parser.add_argument(
        "--aggregate-only",
        action="store_true",
        help="only rewrite the result files from the scores already in --scores",
    )
    parser.add_argument(
        "--scored-on",
        nargs=2,
        metavar=("KIND", "MACHINE"),
        help="with --aggregate-only: the machine that computed the scores (cpu or gpu, and its "
        "description); gpu names the files NAME.gpu.json",
    )
    parser.add_argument(
        "--skip-baselines",
        action="store_true",
        help="score only the diffusion methods (another run scores zero-filled and CS)",
    )
    parser.add_argument("--results", type=Path, default=None, help="default: benchmarks/results")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    started = start(args.threads)
    config = load_config(args.config, Path("config/tiny.yaml") if args.short else args.overlay)
    if args.short:
        args.sampling_steps = min(args.sampling_steps, 3)
    if args.steps:
        config["train"]["steps"] = args.steps
    curve_steps = [c for c in args.curve_steps if c < config["train"]["steps"]]
    # Checkpoints land on every curve step (and the interval divides the budget).
    config["train"]["checkpoint_every"] = math.gcd(config["train"]["steps"], *curve_steps)
    pixel_p = float(config["corrupt"]["pixel"]["p"])

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    slices, sources = training_stores(config, work, args.settings)
    store = read_slices(slices)
    keys = example_keys(store.index.subjects, store.index.subject, store.index.slice_index)
    holdout, volumes, validation, reference = scored_slices(store, args.slices_per_volume)
    rc = dict(config["reconstruct"]) | {"samplers": args.samplers, "steps": args.sampling_steps}
    if args.posterior_samples:
        rc["posterior_samples"] = args.posterior_samples
    seed = config["cohorts"]["demo"]["seed"]
    scores_path = work / args.scores
    records = load_scores(scores_path)
    curve = [r for r in records if r["method"] == "curve"]
    records = [r for r in records if r["method"] != "curve"]

    def record_key(r: dict) -> tuple:
        return (
            r["method"],
            r["train_mode"],
            r["corruption"],
            r["seed"],
            r["R"],
            r.get("p"),
            r["sampler"],
        )

    done = {record_key(r) for r in records}
    curve_done = {(r["train_mode"], r["seed"], r["step"]) for r in curve}
    results_dir = args.results or RESULTS
    note = (
        f"Demo cohort, {len(np.unique(volumes))} hold-out volumes × {args.slices_per_volume} "
        f"slices, {config['train']['steps']} training steps, {args.sampling_steps} sampling "
        f"steps, {rc['posterior_samples']} posterior sample(s) averaged. kspace: 1-coil R = 4 "
        f"training, 1-coil test with a smooth phase; pixel: p = {pixel_p:g} training and "
        f"inpainting test; native: {NATIVE_COILS}-coil R = 4 training, {NATIVE_COILS}-coil test."
    )

    scored_on = tuple(args.scored_on) if args.scored_on else None
    gpu = (scored_on[0] if scored_on else machine_kind()) == "gpu"

    def save() -> Path:
        rows = aggregate(records)
        path = write_results("reconstruction", started, rows, results_dir, scored_on)
        total = config["train"]["steps"]
        if curve:
            rows_curve = curve_rows(curve, total)
            write_results("reconstruction_curve", started, rows_curve, results_dir, scored_on)
            suffix_png = ".gpu.png" if gpu else ".png"
            curve_png(results_dir / f"reconstruction_curve{suffix_png}", rows_curve, records)
        write_markdown(rows, results_dir / f"reconstruction{'.gpu' if gpu else ''}.md", note)
        return path

    def keep(into: list[dict], images: np.ndarray, seconds: float, **fields) -> None:
        """Scores per hold-out volume, appended to ``scores.jsonl`` and to ``into``."""
        new = score_records(reference, images, volumes, seconds, **fields)
        append_scores(scores_path, new)
        into.extend(new)
        logging.info("%s: PSNR %.2f", fields, np.mean([r["psnr"] for r in new]))

    # Test problems of each setting and level: (A, y, phase calibration), built once with
    # their baselines.
    problems: dict[tuple, tuple] = {}

    def problem(setting: str, level: float) -> tuple:
        key = (setting, level)
        if key in problems:
            return problems[key]
        coils = NATIVE_COILS if setting == "native" else 1
        fields = {"corruption": setting, "coils": coils, "train_mode": "", "sampler": ""}
        if setting == "pixel":
            op, y, keep_mask = pixel_problem(store, holdout, keys, level, seed)
            fields |= {"R": None, "p": level}
            baseline, seconds, calibration = {}, {}, None
            if not args.skip_baselines:
                start_time = time.perf_counter()
                filled = interpolated(y[:, 0].numpy(), keep_mask)
                baseline = {"zero_filled": np.abs(y[:, 0].numpy()), "interpolated": np.abs(filled)}
                seconds = {"zero_filled": 0.0, "interpolated": time.perf_counter() - start_time}
                seconds["interpolated"] /= len(holdout)
        else:
            settings_rc = rc | {"coils": coils}
            op, y, baseline, seconds, _, calibration = retrospective(
                settings_rc,
                level,
                store,
                holdout,
                validation,
                keys,
                seed,
                with_baselines=not args.skip_baselines,
            )
            fields |= {"R": level, "p": None}
        for method, images in baseline.items():
            if record_key(fields | {"method": method, "seed": 0}) not in done:
                keep(records, images, seconds[method], method=method, seed=0, **fields)
        problems[key] = (op, y, calibration)
        return op, y

    if args.aggregate_only:
        path = save()
        print(f"wrote {path}")
        return path

    levels = {
        "kspace": args.accelerations,
        "native": args.accelerations,
        "pixel": [pixel_p],
    }
    for setting in args.settings:
        for level in levels[setting]:
            problem(setting, level)
    path = save()

    for train_seed in args.seeds:
        for setting in args.settings:
            modes = ["ambient"] if setting == "native" else args.modes
            for mode in modes:
                variants = (
                    [f"dc:{m}" for m in args.inference_masks]
                    if (mode, setting) == ("ambient", "kspace")
                    else []
                )

                wanted = [*args.samplers, *variants]
                todo_all = [
                    (level, sampler)
                    for level in levels[setting]
                    for sampler in wanted
                    if record_key(diffusion_fields(setting, mode, level, sampler, train_seed))
                    not in done
                ]
                if not todo_all:
                    continue
                config["cohorts"]["demo"]["train_mode"] = mode
                config["cohorts"]["demo"]["corruption"] = setting
                config["train"]["seed"] = train_seed
                out = work / (
                    f"{mode}_seed{train_seed}"
                    if setting == "kspace"
                    else f"{setting}_{mode}_seed{train_seed}"
                )
                source = slices if mode == "clean" else sources[setting]
                cfg = stage_config(config, "demo", "train")
                channels = 1 if setting == "pixel" else 2
                # Curve points: EMA weights saved by a training run of its own (gpu.py; scored
                # after the final model), else training up to each step here.
                snapshots = out / "snapshots"
                kspace_curve = curve_steps if setting == "kspace" else []
                for step in kspace_curve:
                    if (mode, train_seed, step) in curve_done or snapshots.exists():
                        continue
                    if (out / "model.pt").exists():  # trained already: no step to stop at
                        continue
                    paths = (out / "model.pt", out / "loss.csv", out / "checkpoints")
                    train.run(cfg, source, *paths, stop_after=step)
                    net, meta = checkpoint_model(
                        out / "checkpoints" / "last.pt", cfg, channels, store.images.shape[-1]
                    )
                    op, y, calibration = problem("kspace", 4)
                    curve_record(
                        net, meta, rc, op, y, calibration, seed, mode, train_seed, step, keep, curve
                    )
                if not (out / "model.pt").exists():
                    train.run(cfg, source, out / "model.pt", out / "loss.csv", out / "checkpoints")
                net, meta = load_model(out / "model.pt")
                net = on_device(net)
                if setting == "kspace" and (mode, train_seed, config["train"]["steps"]) not in (
                    curve_done
                ):
                    op, y, calibration = problem("kspace", 4)
                    curve_record(
                        net,
                        meta,
                        rc,
                        op,
                        y,
                        calibration,
                        seed,
                        mode,
                        train_seed,
                        meta["steps"],
                        keep,
                        curve,
                    )
                for level in levels[setting]:
                    op, y, calibration = problem(setting, level)
                    # Each sampler is scored and kept on its own (a stopped run keeps the rest).
                    # "dc:<inference_mask>": the DC sampler with another network operator while
                    # reconstructing, measured on ambient k-space models.
                    for sampler in [s for lv, s in todo_all if lv == level]:
                        sampler_rc = rc | {"samplers": [sampler]}
                        if sampler.startswith("dc:"):
                            sampler_rc = rc | {
                                "samplers": ["dc"],
                                "inference_mask": sampler.split(":", 1)[1],
                            }
                        learned, learned_seconds = diffusion_methods(
                            net, meta, sampler_rc, op, y, seed, calibration=calibration
                        )
                        (name,) = learned
                        row = diffusion_fields(setting, mode, level, sampler, train_seed)
                        keep(records, learned[name], learned_seconds[name], **row)
                for step in kspace_curve:
                    snapshot = snapshots / f"step_{step:06d}.pt"
                    if (mode, train_seed, step) in curve_done or not snapshot.exists():
                        continue
                    net, meta = load_model(snapshot)
                    op, y, calibration = problem("kspace", 4)
                    curve_record(
                        on_device(net),
                        meta,
                        rc,
                        op,
                        y,
                        calibration,
                        seed,
                        mode,
                        train_seed,
                        step,
                        keep,
                        curve,
                    )
                path = save()
    print(f"wrote {path}")
    return path


def on_device(net: torch.nn.Module) -> torch.nn.Module:
    """The network on the GPU when there is one (the samplers' own tensors stay on the CPU)."""
    if torch.cuda.is_available():
        return OnDevice(net, "cuda")
    return net


def diffusion_fields(setting: str, mode: str, level: float, sampler: str, seed: int) -> dict:
    """The identifying fields of a diffusion score: ``level`` is R, or p for pixel masks."""
    pixel = setting == "pixel"
    return {
        "method": "diffusion",
        "train_mode": mode,
        "corruption": setting,
        "sampler": sampler,
        "R": None if pixel else level,
        "p": level if pixel else None,
        "coils": NATIVE_COILS if setting == "native" else 1,
        "seed": seed,
    }


def curve_record(
    net, meta, rc, op, y, calibration, seed, mode, train_seed, step, keep, curve
) -> None:
    """DC and one-step PSNR at R = 4 from one training step's EMA weights and, for ambient
    models, the median held-back prediction ratio (1: no better than zero-filling)."""
    rc = rc | {"samplers": ["dc", "one_step"]}
    learned, seconds = diffusion_methods(net, meta, rc, op, y, seed, calibration=calibration)
    held = None
    if mode == "ambient":
        held = round(float(np.median(held_back_errors(net, meta, op, y, seed))), 4)
    for sampler in ("dc", "one_step"):
        keep(
            curve,
            learned[f"diffusion_{sampler}"],
            seconds[f"diffusion_{sampler}"],
            method="curve",
            train_mode=mode,
            corruption="kspace",
            coils=1,
            sampler=sampler,
            R=4,
            p=None,
            seed=train_seed,
            step=int(step),
            held_back=held,
        )


if __name__ == "__main__":
    main()
