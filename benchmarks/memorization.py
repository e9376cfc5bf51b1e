"""Does it copy its training scans? The seed experiment at small scale, swept over the
training-set size (docs/audit.md, issue: memorization audit).

Data: the demo cohort at 32x32 with planted canaries (``--canaries``: unique synthetic lesions
in 1, 4 and 16 consecutive training slices, plus as many never-planted reference canaries),
then for each training-set size n the n training slices evenly spread over the training
subjects (0 = all of them). For each n it trains a `clean` model and `ambient` models on the
same budget, one per training seed (every seed for n <= ``--all-seeds-up-to``, the first
otherwise), and every ``--curve-every`` steps draws samples and audits them against the n
training slices with the band-pass copy statistic (threshold: the 99th percentile of
held-out subjects' slices against the same n). At the end of training it also measures
canary exposure and reconstructs 12 held-out slices at R = 4 with the data-consistency
sampler.

    python benchmarks/memorization.py                  # CPU: n = 16, all, 64; 4000 steps
    python benchmarks/memorization.py --sizes 16 64 256 0 --steps 8000 --b-redraw both \
        --variants clean/kspace ambient/kspace ambient/pixel
    python benchmarks/memorization.py --short          # seconds: the test suite's version

Resumable: models resume from their checkpoints under ``--workdir`` and every row is appended
to ``rows.jsonl`` there as it is measured (and skipped when present); the result file is
rewritten after every model.

Writes benchmarks/results/memorization.json with rows of four kinds:
``{kind: "model", train_mode, corruption, b_redraw, n_train, steps, seed, n_samples,
threshold, frac_above, q50, q95, q99, psnr_r4}``; ``{kind: "curve", ..., step, frac_above,
q50, q99}`` (the same audit during training); ``{kind: "control", n_train, control,
flagged_fraction, n, expected, passed}`` (one set per n); ``{kind: "canary", train_mode,
canary, repeats, repeats_in_training, exposure, reference, reference_exposure, ...}``. Also
memorization_curve.png (copies and PSNR over n, copies over training steps) and
memorization_pairs.png (each model's four closest sample / training pairs).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
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
from ambient_med.evaluation.audit import (  # noqa: E402
    CopyStatistic,
    control_images,
    memorization_audit,
)
from ambient_med.evaluation.figures import grid_image  # noqa: E402
from ambient_med.evaluation.metrics import slice_metrics  # noqa: E402
from ambient_med.io.canaries import plant_canaries, read_canaries  # noqa: E402
from ambient_med.io.store import (  # noqa: E402
    SliceIndex,
    SliceStore,
    load_torch,
    read_slices,
    write_slices,
)
from ambient_med.physics.masks import derive_seed  # noqa: E402
from ambient_med.stages import corrupt, train  # noqa: E402
from ambient_med.stages.audit import canary_rows  # noqa: E402
from ambient_med.stages.common import example_keys, magnitude, spread_rows  # noqa: E402
from ambient_med.stages.reconstruct import (  # noqa: E402
    acquisition,
    diffusion_methods,
    undersample,
)
from ambient_med.stages.sample import generate  # noqa: E402


def subset_store(store: SliceStore, n_train: int) -> SliceStore:
    """``n_train`` training slices (evenly spread; 0 = all) plus every hold-out slice."""
    train_rows = store.index.rows("train")
    if n_train:
        train_rows = spread_rows(train_rows, n_train)
    rows = np.sort(np.concatenate([train_rows, store.index.rows("holdout")]))
    index = store.index
    return SliceStore(
        store.images[rows],
        SliceIndex(
            index.subject[rows], index.slice_index[rows], index.subjects, index.split, index.affines
        ),
        store.attrs,
    )


def variant_label(mode: str, corruption: str, b_redraw: bool) -> str:
    """Legend text of one trained variant, in words rather than config values."""
    if mode == "clean":
        return "clean images (baseline)"
    measured = {
        "kspace": "k-space lines, R = 4",
        "pixel": "pixel mask, p = 0.9",
        "native": "raw k-space",
    }.get(corruption, corruption)
    text = f"{mode} on {measured}"
    return text + (", B redrawn every step" if b_redraw else "")


def curve_png(path: Path, rows: list[dict], curves: list[dict] | None = None) -> None:
    """Privacy and quality against the training-set size, one line per variant (the mean
    over training seeds).

    Left: fraction of samples above the calibrated copy threshold against n_train. Middle:
    the privacy-quality trade-off, R = 4 reconstruction PSNR against that fraction, each
    point labelled with its n_train (models without a k-space prior have no PSNR). Right
    (with ``curves``): the fraction over training steps at the smallest n_train.
    """
    from ambient_med.evaluation.figures import new_figure, save_figure

    figure = new_figure(15.0 if curves else 10.0, 4.2)
    panels = figure.subplots(1, 3 if curves else 2)
    copies, tradeoff = panels[0], panels[1]
    variants = sorted({(r["train_mode"], r["corruption"], r["b_redraw"]) for r in rows})
    markers = ["o", "s", "^", "D", "v", "P"]
    smallest = min(r["n_train"] for r in rows)
    for i, key in enumerate(variants):
        mine = [r for r in rows if (r["train_mode"], r["corruption"], r["b_redraw"]) == key]
        sizes = sorted({r["n_train"] for r in mine})

        def mean(field: str, n: int, among: list[dict] = mine) -> float:
            return float(np.mean([r[field] for r in among if r["n_train"] == n]))

        above = [100 * mean("frac_above", n) for n in sizes]
        style = {"marker": markers[i % len(markers)], "linewidth": 1.6, "color": f"C{i}"}
        copies.plot(sizes, above, label=variant_label(*key), **style)
        psnr = np.array([mean("psnr_r4", n) for n in sizes], dtype=float)
        known = np.isfinite(psnr)
        if known.any():
            x_known = np.array(above)[known]
            tradeoff.plot(x_known, psnr[known], **style)
            for n, x, y in zip(np.array(sizes)[known], x_known, psnr[known], strict=True):
                tradeoff.annotate(
                    f"n={n}", (x, y), xytext=(4, 4), textcoords="offset points", fontsize=8
                )
        if curves:
            for seed in sorted({r["seed"] for r in curves}):
                points = sorted(
                    (r["step"], 100 * r["frac_above"])
                    for r in curves
                    if (r["train_mode"], r["corruption"], r["b_redraw"]) == key
                    and r["n_train"] == smallest
                    and r["seed"] == seed
                )
                if points:
                    panels[2].plot(
                        *zip(*points, strict=True), **style, alpha=1.0 if seed == 0 else 0.5
                    )
    copies.set_xscale("log", base=2)
    copies.set_xticks(sorted({r["n_train"] for r in rows}))
    copies.get_xaxis().set_major_formatter("{x:g}")
    copies.set_xlabel("training slices (n_train)")
    copies.set_ylabel("samples above the copy threshold (%)")
    copies.set_title("Copies against training-set size")
    tradeoff.set_xlabel("samples above the copy threshold (%)  ← more private")
    tradeoff.set_ylabel("R = 4 reconstruction PSNR (dB)  ↑ better")
    tradeoff.set_title("Privacy–quality trade-off")
    if curves:
        panels[2].set_xlabel("training step")
        panels[2].set_ylabel("samples above the copy threshold (%)")
        panels[2].set_title(f"Copies during training, n_train = {smallest} (each seed)")
    for axes in panels:
        axes.grid(True, alpha=0.3)
    figure.legend(loc="outside lower center", ncols=min(3, len(variants)), frameon=False)
    save_figure(figure, path)


def model_key(row: dict) -> tuple:
    """Which trained model a row belongs to."""
    fields = ("train_mode", "corruption", "b_redraw", "n_train_arg", "seed")
    return tuple(row.get(f) for f in fields)


def load_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append_row(path: Path, row: dict) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(row) + "\n")


def trained_to(cfg: dict, source: Path, out: Path, step: int) -> Path:
    """Trains (or resumes) the model of ``out`` until ``step``; returns the checkpoint holding
    the EMA weights at exactly that step."""
    checkpoint = out / "checkpoints" / "last.pt"
    if checkpoint.exists() and int(load_torch(checkpoint)["step"]) == step:
        return checkpoint
    train.run(cfg, source, out / "model.pt", out / "loss.csv", out / "checkpoints", stop_after=step)
    return checkpoint


def present_repeats(store: SliceStore, rows: np.ndarray) -> dict[str, int]:
    """Planted canary → how many of the training ``rows`` carry it."""
    names = store.index.subjects
    carried = {
        (names[s], int(k))
        for s, k in zip(store.index.subject[rows], store.index.slice_index[rows], strict=True)
    }
    return {
        c.name: sum((c.subject, k) in carried for k in c.slice_index or [])
        for c in read_canaries(store.attrs)
        if c.planted
    }


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=Path("config/config.yaml"))
    parser.add_argument("--workdir", type=Path, default=Path("benchmarks/work/memorization"))
    parser.add_argument("--results", type=Path, default=None, help="default: benchmarks/results")
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 0, 64])
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--curve-every", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument(
        "--all-seeds-up-to",
        type=int,
        default=16,
        help="train every --seeds only for n_train <= this (the first seed at larger n)",
    )
    parser.add_argument("--b-redraw", choices=["fixed", "redraw", "both"], default="fixed")
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["clean/kspace", "ambient/kspace"],
        help="train_mode/corruption pairs to train (clean/kspace: clean images, complex model)",
    )
    parser.add_argument("--canaries", type=int, nargs="*", default=[1, 4, 16])
    parser.add_argument(
        "--redo-controls",
        action="store_true",
        help="recompute the control rows (they depend on the data and the audit, not on models)",
    )
    parser.add_argument(
        "--reaudit",
        action="store_true",
        help="re-audit the trained models' final samples (after a change to the audit); rows "
        "of earlier steps keep the threshold they were measured with",
    )
    parser.add_argument("--short", action="store_true", help="tiny config, seconds")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    started = start(args.threads)
    results = args.results or RESULTS
    config = load_config(args.config, Path("config/tiny.yaml") if args.short else None)
    config["ingest"]["image_size"] = args.image_size
    config["corrupt"]["kspace"]["acceleration"] = 4
    config["train"] |= {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "checkpoint_every": math.gcd(args.steps, args.curve_every),
    }
    config["sample"] |= {"num_samples": args.samples, "steps": 3 if args.short else 50}
    # Every model of this benchmark's rows was trained with the unmeasured part of the
    # denoiser at scale sigma_data (the option came later); seeds and sizes stay comparable.
    config["model"]["unmeasured_scale"] = None
    audit_cfg = config["audit"]
    params = CopyStatistic.from_config(audit_cfg)
    seed = config["cohorts"]["demo"]["seed"]
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    full = work / f"slices{args.image_size}_canaries.h5"
    if not full.exists():
        store = read_slices(demo_slices(config, work, f"slices{args.image_size}.h5"))
        if args.canaries:
            store, _ = plant_canaries(store, args.canaries, seed)
        write_slices(full, store)
    store = read_slices(full)
    redraws = {"fixed": [False], "redraw": [True], "both": [False, True]}[args.b_redraw]
    variants = [tuple(v.split("/")) for v in args.variants]
    rows_path = work / "rows.jsonl"
    rows = load_rows(rows_path)
    if args.redo_controls or args.reaudit:
        stale = {"control"} | ({"model"} if args.reaudit else set())
        rows = [
            r
            for r in rows
            if r["kind"] not in stale
            and not (args.reaudit and r["kind"] == "curve" and r["step"] == args.steps)
        ]
        rows_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    done = {
        (model_key(r), r["kind"], r.get("step"), r.get("control"), r.get("canary")) for r in rows
    }
    curve_steps = list(range(args.curve_every, args.steps, args.curve_every)) + [args.steps]

    def record(row: dict) -> None:
        rows.append(row)
        append_row(rows_path, row)
        done.add(
            (model_key(row), row["kind"], row.get("step"), row.get("control"), row.get("canary"))
        )

    for n_arg in args.sizes:
        folder = work / f"n{n_arg or 'all'}"
        slices = folder / "slices.h5"
        if not slices.exists():
            write_slices(slices, subset_store(store, n_arg))
        sub = read_slices(slices)
        train_rows, holdout = sub.index.rows("train"), sub.index.rows("holdout")
        train_images, holdout_images = sub.images[train_rows], sub.images[holdout]
        groups = sub.index.subject[holdout]
        n_train = int(len(train_rows))
        keys = example_keys(sub.index.subjects, sub.index.subject, sub.index.slice_index)
        recon_rows = spread_rows(holdout, 12)
        repeats = present_repeats(sub, train_rows)
        controls = control_images(
            train_images,
            sub.index.slice_index[train_rows],
            seed,
            n=audit_cfg["control_slices"],
            noise=audit_cfg["control_noise"],
            blur=audit_cfg["control_blur"],
            mean_blur=audit_cfg["control_mean_blur"],
        )
        base = {"n_train_arg": n_arg, "n_train": n_train}
        if not any(r["kind"] == "control" and r["n_train_arg"] == n_arg for r in rows):
            # The controls depend on the training set and the threshold, not on a model.
            result = memorization_audit(
                train_images[:1],
                train_images,
                holdout_images,
                audit_cfg["quantile"],
                holdout_groups=groups,
                controls=controls,
                params=params,
            )
            for control in result.control_rows():
                record(base | {"train_mode": "", "seed": -1} | control)

        seeds = args.seeds if n_arg and n_arg <= args.all_seeds_up_to else args.seeds[:1]
        for train_seed in seeds:
            for mode, kind in variants:
                for b_redraw in redraws if mode == "ambient" else [False]:
                    ident = base | {
                        "train_mode": mode,
                        "corruption": kind,
                        "b_redraw": b_redraw,
                        "seed": train_seed,
                    }
                    if (model_key(ident), "model", None, None, None) in done:
                        continue
                    config["cohorts"]["demo"] |= {"train_mode": mode, "corruption": kind}
                    config["train"] |= {"b_redraw": b_redraw, "seed": train_seed}
                    source = slices
                    if mode != "clean":
                        source = folder / f"{kind}.h5"
                        if not source.exists():
                            corrupt.run(
                                stage_config(config, "demo", "corrupt"), kind, slices, source
                            )
                    name = f"{mode}_{kind}_{'redraw' if b_redraw else 'fixed'}_seed{train_seed}"
                    out = folder / name
                    cfg = stage_config(config, "demo", "train")
                    channels = 2 if kind != "pixel" else 1
                    sample_seed = derive_seed(seed, "memorization-samples", train_seed)
                    for step in curve_steps:
                        curve_done = (model_key(ident), "curve", step, None, None) in done
                        if curve_done and step != args.steps:
                            continue
                        checkpoint = trained_to(cfg, source, out, step)
                        net, meta = checkpoint_model(checkpoint, cfg, channels, args.image_size)
                        samples = magnitude(generate(net, meta, config["sample"], sample_seed))
                        result = memorization_audit(
                            samples,
                            train_images,
                            holdout_images,
                            audit_cfg["quantile"],
                            holdout_groups=groups,
                            params=params,
                        )
                        summary = result.summary(audit_cfg["quantile"])
                        if not curve_done:
                            shown = {
                                k: round(summary[k], 4)
                                for k in ("threshold", "frac_above", "q50", "q99")
                            }
                            record({"kind": "curve", "step": step} | ident | shown)
                    logging.info("%s: %.1f %% above", name, 100 * summary["frac_above"])
                    psnr = float("nan")
                    if channels == 2:
                        # R = 4, single coil, held-out slices with their phase, DC sampler.
                        rc = dict(config["reconstruct"]) | {"samplers": ["dc"], "coils": 1}
                        op, y = undersample(
                            acquisition(rc, 4, args.image_size, seed),
                            sub,
                            recon_rows,
                            keys,
                            "memorization-R4",
                        )
                        images, _ = diffusion_methods(net, meta, rc, op, y, seed)
                        psnr = float(
                            slice_metrics(sub.images[recon_rows], images["diffusion_dc"])[
                                "psnr"
                            ].mean()
                        )
                    for canary in canary_rows(sub.attrs, samples, holdout_images, params, mode):
                        if (model_key(ident), "canary", None, None, canary["canary"]) in done:
                            continue
                        record(
                            ident
                            | canary
                            | {"kind": "canary", "repeats_in_training": repeats[canary["canary"]]}
                        )
                    record(
                        {"kind": "model"}
                        | ident
                        | {
                            "steps": args.steps,
                            "n_samples": int(len(samples)),
                            "threshold": round(summary["threshold"], 4),
                            "frac_above": round(summary["frac_above"], 4),
                            "q50": round(summary["q50"], 4),
                            "q95": round(summary["q95"], 4),
                            "q99": round(summary["q99"], 4),
                            "psnr_r4": round(psnr, 3),
                        }
                    )
                    logging.info("%s", rows[-1])
                    order = np.argsort(-result.sample_ncc)[:4]
                    tiles = []
                    for i in order:
                        tiles += [samples[i], train_images[result.sample_index[i]]]
                    np.save(out / "pairs.npy", np.stack(tiles))
                    path = write_results("memorization", started, public(rows), results)
    path = write_results("memorization", started, public(rows), results)
    suffix = ".gpu" if machine_kind() == "gpu" else ""
    models = [r for r in rows if r["kind"] == "model"]
    if models:
        curve_png(
            results / f"memorization_curve{suffix}.png",
            models,
            [r for r in rows if r["kind"] == "curve"],
        )
        pairs_png(results / f"memorization_pairs{suffix}", work, models)
    print(f"wrote {path}")
    return path


def public(rows: list[dict]) -> list[dict]:
    """Result rows without the bookkeeping key (``n_train_arg``: the requested size)."""
    return [{k: v for k, v in r.items() if k != "n_train_arg"} for r in rows]


def pairs_png(stem: Path, work: Path, models: list[dict]) -> None:
    """The four closest sample / training pairs of each model, one row each, and a text file
    naming the rows."""
    from PIL import Image

    names, strips = [], []
    for r in models:
        out = (
            work
            / f"n{r['n_train_arg'] or 'all'}"
            / (
                f"{r['train_mode']}_{r['corruption']}_{'redraw' if r['b_redraw'] else 'fixed'}"
                f"_seed{r['seed']}"
            )
        )
        if (out / "pairs.npy").exists():
            strips.append(grid_image(np.load(out / "pairs.npy"), columns=8))
            names.append(f"{r['train_mode']}/{r['corruption']} n={r['n_train']} seed={r['seed']}")
    if not strips:
        return
    stacked = np.concatenate(strips, axis=0)
    Image.fromarray(stacked).resize(
        (stacked.shape[1] * 3, stacked.shape[0] * 3), Image.Resampling.NEAREST
    ).save(stem.with_suffix(".png"))
    stem.with_suffix(".txt").write_text(
        "rows, top to bottom (each: sample | nearest training image, 4 closest pairs):\n"
        + "\n".join(names)
        + "\n"
    )


if __name__ == "__main__":
    main()
