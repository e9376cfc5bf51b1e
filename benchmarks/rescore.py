"""Hold-out scores of trained model files side by side, with paired differences.

For models trained elsewhere (``gpu.sh``'s archives, or ``gpu.py train`` on the CPU): each
``--model NAME=PATH`` reconstructs the same hold-out slices of a cohort's slice store (8 per
hold-out volume: ``reconstruction.scored_slices``) at each R with each sampler, beside
zero-filled and CS; per-volume PSNR. ``--pair A-B`` adds ``A − B`` per volume, both for the
best sampler of each model (the issue's rule) and sampler by sampler, with a bootstrap
interval over volumes. Rows: ``{model, R, sampler, psnr, ssim_fg, volumes}`` and
``{pair, R, sampler, difference, ci}``. Reconstruction settings are the config's (overlay
applied), except ``--sampling-steps`` and ``--posterior-samples``.

    python benchmarks/gpu.py train --workdir benchmarks/work/cpu9 --overlay benchmarks/gpu.yaml \\
        --setting kspace --mode ambient --seed 0 --max-steps 2000 --threads 2 \\
        --until $(( $(date +%s) + 10800 ))          # 33 min on 2 CPU cores
    python benchmarks/rescore.py --slices benchmarks/work/gpu/slices.h5 \\
        --overlay benchmarks/gpu.yaml --accelerations 8 4 \\
        --model further_1_5=benchmarks/work/cpu9/ambient_seed0/snapshots/step_002000.pt \\
        --model further_1_1=benchmarks/work/gpu_run1/models/ambient_seed0/model.fp16.pt \\
        --model naive=benchmarks/work/gpu_run1/models/naive_seed0/model.fp16.pt \\
        --pair further_1_5-naive --pair further_1_1-naive --pair further_1_5-further_1_1

(``gpu.py train`` needs ``kspace.h5`` beside ``slices.h5`` in its workdir: ``gpu.sh``'s
stores.) ``--training-subjects N`` scores N of the training subjects instead, alike: the gap
to the hold-out is what the models learned of their own subjects rather than of anatomy.
Scores land in ``--workdir``/scores.jsonl as they come; a rerun skips what is there.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import open_cohort, write_results  # noqa: E402
from reconstruction import per_volume_rows, score_records, scored_slices  # noqa: E402

from ambient_med.evaluation.metrics import bootstrap_ci  # noqa: E402
from ambient_med.stages.common import load_model  # noqa: E402
from ambient_med.stages.reconstruct import diffusion_methods, retrospective  # noqa: E402


def summary(records: list[dict], pairs: list[str]) -> list[dict]:
    """Mean rows per (model, R, sampler) and paired difference rows per ``A-B``."""
    table: dict[tuple, dict[int, dict]] = {}
    for r in records:
        table.setdefault((r["model"], r["R"], r["sampler"]), {})[r["volume"]] = r
    rows = []
    for (model, accel, sampler), by_volume in sorted(table.items(), key=str):
        values = [by_volume[v] for v in sorted(by_volume)]
        rows.append(
            {
                "model": model,
                "R": accel,
                "sampler": sampler,
                "psnr": round(float(np.mean([v["psnr"] for v in values])), 3),
                "ssim_fg": round(float(np.mean([v["ssim_fg"] for v in values])), 4),
                "volumes": len(values),
            }
        )

    def psnr(model: str, accel: float, sampler: str) -> np.ndarray | None:
        found = table.get((model, accel, sampler))
        return None if found is None else np.array([found[v]["psnr"] for v in sorted(found)])

    for pair in pairs:
        first, second = pair.split("-")
        for accel in sorted({r["R"] for r in records}):
            samplers = sorted({s for m, a, s in table if m == first and a == accel})

            def best(model: str, accel: float = accel, samplers: list[str] = samplers) -> str:
                means = {s: float(np.mean(psnr(model, accel, s))) for s in samplers}
                return max(means, key=means.get)

            if not samplers or not any(m == second and a == accel for m, a, _ in table):
                continue
            choices = [("best", best(first), best(second))]
            choices += [(s, s, s) for s in samplers if psnr(second, accel, s) is not None]
            for label, mine, theirs in choices:
                difference = psnr(first, accel, mine) - psnr(second, accel, theirs)
                low, high = bootstrap_ci(difference)
                rows.append(
                    {
                        "pair": pair,
                        "R": accel,
                        "sampler": label if label != "best" else f"best ({mine} vs {theirs})",
                        "difference": round(float(difference.mean()), 3),
                        "ci": [round(low, 3), round(high, 3)],
                    }
                )
    return rows


def training_rows(store, subjects: int, per_volume: int) -> np.ndarray:
    """``per_volume`` evenly spaced slices of ``subjects`` evenly spaced training subjects."""
    rows = store.index.rows("train")
    volumes = np.unique(store.index.subject[rows])
    picked = volumes[np.unique(np.linspace(0, len(volumes) - 1, subjects).round().astype(int))]
    return per_volume_rows(store, rows[np.isin(store.index.subject[rows], picked)], per_volume)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=Path("config/config.yaml"))
    parser.add_argument("--overlay", type=Path, default=None)
    parser.add_argument("--slices", type=Path, required=True, help="the cohort's slice store")
    parser.add_argument("--model", action="append", required=True, help="NAME=PATH")
    parser.add_argument("--pair", action="append", default=[], help="NAME-NAME")
    parser.add_argument("--accelerations", type=float, nargs="+", default=[8, 4])
    parser.add_argument("--samplers", nargs="+", default=["one_step", "dc", "dps"])
    parser.add_argument("--sampling-steps", type=int, default=30)
    parser.add_argument("--posterior-samples", type=int, default=4)
    parser.add_argument("--slices-per-volume", type=int, default=8)
    parser.add_argument("--workdir", type=Path, default=Path("benchmarks/work/rescore"))
    parser.add_argument("--name", default="rescore", help="results file NAME.json")
    parser.add_argument("--results", type=Path, default=None, help="default: benchmarks/results")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--training-subjects",
        type=int,
        default=0,
        help="score this many training subjects (evenly spaced) instead of the hold-out",
    )
    args = parser.parse_args(argv)
    started, config, seed, store, keys = open_cohort(args)
    holdout, volumes, validation, reference = scored_slices(store, args.slices_per_volume)
    if args.training_subjects:
        # The generalisation gap: the same scoring on subjects the models trained on.
        holdout = training_rows(store, args.training_subjects, args.slices_per_volume)
        volumes, reference = store.index.subject[holdout], store.images[holdout]
    rc = dict(config["reconstruct"]) | {
        "steps": args.sampling_steps,
        "posterior_samples": args.posterior_samples,
        "coils": 1,
    }
    args.workdir.mkdir(parents=True, exist_ok=True)
    scores = args.workdir / "scores.jsonl"
    records = [json.loads(line) for line in scores.open()] if scores.exists() else []
    done = {(r["model"], r["R"], r["sampler"]) for r in records}

    def keep(images: np.ndarray, seconds: float, **fields) -> None:
        new = score_records(reference, images, volumes, seconds, **fields)
        with scores.open("a") as handle:
            handle.writelines(json.dumps(r) + "\n" for r in new)
        records.extend(new)
        mean = np.mean([r["psnr"] for r in new])
        print(f"{fields} PSNR {mean:.3f} ({seconds:.2f} s/slice)", flush=True)

    for accel in args.accelerations:
        todo_baselines = any((b, accel, "") not in done for b in ("zero_filled", "cs_l1", "pocs"))
        op, y, baseline, seconds, _, calibration = retrospective(
            rc, accel, store, holdout, validation, keys, seed, with_baselines=todo_baselines
        )
        for method, images in baseline.items():
            if (method, accel, "") not in done:
                keep(images, seconds[method], model=method, R=accel, sampler="")
        for spec in args.model:
            name, _, path = spec.partition("=")
            todo = [s for s in args.samplers if (name, accel, s) not in done]
            if not todo:
                continue
            net, meta = load_model(path)  # float16 archives load into the float32 network
            for sampler in todo:
                began = time.perf_counter()
                images, _ = diffusion_methods(
                    net, meta, rc | {"samplers": [sampler]}, op, y, seed, calibration=calibration
                )
                took = (time.perf_counter() - began) / len(holdout)
                keep(images[f"diffusion_{sampler}"], took, model=name, R=accel, sampler=sampler)
    rows = summary(records, args.pair)
    path = write_results(args.name, started, rows, args.results or Path("benchmarks/results"))
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
