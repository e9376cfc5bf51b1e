"""Does it copy its training scans? The seed experiment at small scale, swept over the
training-set size (DESIGN.md §5, issue: memorization audit).

For each training-set size n (slices of the demo cohort at 32x32, evenly spread over the
training subjects), trains a `clean` model and `ambient` models (pixel p = 0.9 and k-space
R = 4) with the same budget, draws samples with the fixed-mask sampler, audits them against
the n training slices (threshold: the 99th percentile of held-out subjects' slices against the
same n), and reconstructs held-out slices at R = 4 with the data-consistency sampler.

    python benchmarks/memorization.py                          # CPU: n = 16, 64; 3000 steps
    python benchmarks/memorization.py --sizes 16 64 256 0 --steps 8000 --b-redraw both

n = 0 means every training slice. Writes benchmarks/results/memorization.json with rows
{train_mode, corruption, n_train, b_redraw, steps, n_samples, threshold, frac_above, q50, q95,
q99, psnr_r4}, memorization_curve.png (fraction above threshold against n) and
memorization_pairs.png (closest sample/training pairs of the first and last model).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, demo_slices, machine_kind, start, write_results  # noqa: E402

from ambient_med.config import load_config, stage_config  # noqa: E402
from ambient_med.evaluation.audit import memorization_audit  # noqa: E402
from ambient_med.evaluation.figures import grid_image  # noqa: E402
from ambient_med.evaluation.metrics import slice_metrics  # noqa: E402
from ambient_med.io.store import SliceIndex, SliceStore, read_slices, write_slices  # noqa: E402
from ambient_med.stages import corrupt, train  # noqa: E402
from ambient_med.stages.common import example_keys, load_model, magnitude, spread_rows  # noqa: E402
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


def curve_png(path: Path, rows: list[dict]) -> None:
    """Privacy and quality against the training-set size, one line per variant.

    Left: fraction of samples above the calibrated copy threshold against n_train. Right:
    the privacy-quality trade-off, R = 4 reconstruction PSNR against that fraction, each
    point labelled with its n_train (models without a k-space prior have no PSNR).
    """
    from ambient_med.evaluation.figures import new_figure, save_figure

    figure = new_figure(10.0, 4.2)
    copies, tradeoff = figure.subplots(1, 2)
    variants = sorted({(r["train_mode"], r["corruption"], r["b_redraw"]) for r in rows})
    markers = ["o", "s", "^", "D", "v", "P"]
    for i, key in enumerate(variants):
        mine = sorted(
            (r for r in rows if (r["train_mode"], r["corruption"], r["b_redraw"]) == key),
            key=lambda r: r["n_train"],
        )
        sizes = [r["n_train"] for r in mine]
        above = [100 * r["frac_above"] for r in mine]
        style = {"marker": markers[i % len(markers)], "linewidth": 1.6, "color": f"C{i}"}
        copies.plot(sizes, above, label=variant_label(*key), **style)
        psnr = np.array([r["psnr_r4"] for r in mine], dtype=float)
        known = np.isfinite(psnr)
        if known.any():
            x_known = np.array(above)[known]
            tradeoff.plot(x_known, psnr[known], **style)
            for n, x, y in zip(np.array(sizes)[known], x_known, psnr[known], strict=True):
                tradeoff.annotate(
                    f"n={n}", (x, y), xytext=(4, 4), textcoords="offset points", fontsize=8
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
    for axes in (copies, tradeoff):
        axes.grid(True, alpha=0.3)
    figure.legend(loc="outside lower center", ncols=min(3, len(variants)), frameon=False)
    save_figure(figure, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=Path("config/config.yaml"))
    parser.add_argument("--workdir", type=Path, default=Path("benchmarks/work/memorization"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--b-redraw", choices=["fixed", "redraw", "both"], default="fixed")
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["clean/kspace", "ambient/pixel", "ambient/kspace"],
        help="train_mode/corruption pairs to train (clean/kspace: clean images, complex model)",
    )
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    started = start(args.threads)
    config = load_config(args.config)
    config["ingest"]["image_size"] = 32
    config["corrupt"]["pixel"]["p"] = 0.9
    config["corrupt"]["kspace"]["acceleration"] = 4
    config["train"] |= {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "checkpoint_every": args.steps,
    }
    config["sample"] |= {"num_samples": args.samples, "steps": 50}
    work = args.workdir
    full = demo_slices(config, work, "slices32.h5")
    store = read_slices(full)
    redraws = {"fixed": [False], "redraw": [True], "both": [False, True]}[args.b_redraw]
    variants = [tuple(v.split("/")) for v in args.variants]
    seed = config["cohorts"]["demo"]["seed"]
    rows, pair_figures = [], []
    for n_train in args.sizes:
        folder = work / f"n{n_train or 'all'}"
        slices = folder / "slices.h5"
        if not slices.exists():
            write_slices(slices, subset_store(store, n_train))
        sub = read_slices(slices)
        train_images = sub.images[sub.index.rows("train")]
        holdout = sub.index.rows("holdout")
        keys = example_keys(sub.index.subjects, sub.index.subject, sub.index.slice_index)
        recon_rows = spread_rows(holdout, 12)
        for mode, kind in variants:
            for b_redraw in redraws if mode == "ambient" else [False]:
                config["cohorts"]["demo"] |= {"train_mode": mode, "corruption": kind}
                config["train"]["b_redraw"] = b_redraw
                source = slices
                if mode != "clean":
                    source = folder / f"{kind}.h5"
                    if not source.exists():
                        corrupt.run(stage_config(config, "demo", "corrupt"), kind, slices, source)
                out = folder / f"{mode}_{kind}_{'redraw' if b_redraw else 'fixed'}"
                cfg = stage_config(config, "demo", "train")
                train.run(cfg, source, out / "model.pt", out / "loss.csv", out / "checkpoints")
                net, meta = load_model(out / "model.pt")
                samples = magnitude(generate(net, meta, config["sample"], seed))
                result = memorization_audit(samples, train_images, sub.images[holdout])
                summary = result.summary(0.99)
                # Reconstruction at R = 4 of held-out slices, single-coil, DC sampler.
                rc = dict(config["reconstruct"]) | {"samplers": ["dc"], "coils": 1}
                psnr = float("nan")
                if meta["image_channels"] == 2:
                    acq = acquisition(rc, 4, 32, seed)
                    op, y = undersample(acq, sub, recon_rows, keys, "memorization-R4")
                    reference = sub.images[recon_rows]
                    images, _ = diffusion_methods(net, meta, rc, op, y, seed)
                    psnr = float(slice_metrics(reference, images["diffusion_dc"])["psnr"].mean())
                rows.append(
                    {
                        "train_mode": mode,
                        "corruption": kind,
                        "n_train": int(len(train_images)),
                        "b_redraw": b_redraw,
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
                pair_figures.append(
                    (f"{mode}/{kind} n={len(train_images)}", grid_image(np.stack(tiles), columns=8))
                )
    path = write_results("memorization", started, rows)
    suffix = ".gpu" if machine_kind() == "gpu" else ""
    curve_png(RESULTS / f"memorization_curve{suffix}.png", rows)
    from PIL import Image

    stacked = np.concatenate([fig for _, fig in pair_figures], axis=0)
    Image.fromarray(stacked).resize(
        (stacked.shape[1] * 3, stacked.shape[0] * 3), Image.Resampling.NEAREST
    ).save(RESULTS / f"memorization_pairs{suffix}.png")
    (RESULTS / f"memorization_pairs{suffix}.txt").write_text(
        "rows, top to bottom (each: sample | nearest training image, 4 closest pairs):\n"
        + "\n".join(name for name, _ in pair_figures)
        + "\n"
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
