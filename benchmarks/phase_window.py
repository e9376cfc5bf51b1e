"""The calibration window of the phase constraint (``reconstruct.phase_window``), chosen by
measurement on training-subject slices (never the hold-out), as CS's λ and DPS's ζ are.

For each window, the pocs baseline (physics/recon.py: phase_constrained) reconstructs
``--slices-used`` training-subject slices of the cohort's slice store at each R — each slice
under its subject's simulated phase, acquired as ``reconstruct`` acquires the hold-out — and,
with ``--model``, the DC sampler does with ``reconstruct.phase_constraint`` on, beside the
same sampler with it off; and both under ``reconstruct.phase_constraint: auto`` (window
``auto``: each subject's calibration chosen on its own held-back lines; ``chosen`` counts
slices per calibration). Rows: ``{R, window, zero_filled, pocs[, dc, dc_unconstrained][,
chosen]}`` (PSNR in dB, mean over subjects).

    python benchmarks/phase_window.py --slices results/demo/ingest/slices.h5 \\
        --model results/demo/train/model.pt

(the workflow's default demo cohort and model: ``snakemake --cores 2 train``); ``--coils 4
--name phase_window_4coil`` acquires them with 4 simulated coils (SENSE).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import open_cohort, write_results  # noqa: E402

from ambient_med.evaluation.metrics import per_volume_metrics  # noqa: E402
from ambient_med.physics.recon import calibration_phase, phase_constrained  # noqa: E402
from ambient_med.stages.common import load_model, spread_rows  # noqa: E402
from ambient_med.stages.reconstruct import (  # noqa: E402
    diffusion_methods,
    magnitude,
    phase_calibration,
    retrospective,
)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=Path("config/config.yaml"))
    parser.add_argument("--overlay", type=Path, default=None)
    parser.add_argument("--slices", type=Path, required=True, help="the cohort's slice store")
    parser.add_argument("--model", type=Path, default=None, help="also score DC with the model")
    parser.add_argument("--accelerations", type=float, nargs="+", default=[4, 8])
    parser.add_argument("--windows", type=float, nargs="+", default=[0.04, 0.1, 0.16, 0.25])
    parser.add_argument("--slices-used", type=int, default=24)
    parser.add_argument("--coils", type=int, default=None, help="default: reconstruct.coils")
    parser.add_argument("--name", default="phase_window")
    parser.add_argument("--results", type=Path, default=None, help="default: benchmarks/results")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    started, config, seed, store, keys = open_cohort(args)
    train_rows = store.index.rows("train")
    rows = spread_rows(train_rows, args.slices_used)
    reference, volumes = store.images[rows], store.index.subject[rows]
    rc = dict(config["reconstruct"]) | {"posterior_samples": 1}
    if args.coils:
        rc["coils"] = args.coils
    net, meta = load_model(args.model) if args.model else (None, None)

    def psnr(images: np.ndarray) -> float:
        per_volume = per_volume_metrics(reference, images, volumes).values()
        return round(float(np.mean([m["psnr"] for m in per_volume])), 3)

    results = []
    for accel in args.accelerations:
        op, y, *_ = retrospective(rc, accel, store, rows, rows, keys, seed, with_baselines=False)
        zero_filled = psnr(magnitude(op.A_adjoint(y)))
        unconstrained = None
        if net is not None:
            rc_dc = rc | {"samplers": ["dc"], "phase_constraint": False}
            images, _ = diffusion_methods(net, meta, rc_dc, op, y, seed)
            unconstrained = psnr(images["diffusion_dc"])
        for window in args.windows:
            pocs = phase_constrained(op, y, calibration_phase(op, y, window))
            row = {"R": accel, "window": window, "zero_filled": zero_filled}
            row["pocs"] = psnr(magnitude(pocs))
            if net is not None:
                rc_dc = rc | {"samplers": ["dc"], "phase_constraint": True, "phase_window": window}
                images, _ = diffusion_methods(net, meta, rc_dc, op, y, seed)
                row |= {"dc": psnr(images["diffusion_dc"]), "dc_unconstrained": unconstrained}
            print(row, flush=True)
            results.append(row)
        # reconstruct.phase_constraint: auto — one calibration per subject, chosen on its own
        # held-back lines (stages/reconstruct.py: phase_calibration).
        rc_auto = rc | {"phase_constraint": "auto"}
        calibration = phase_calibration(rc_auto, op, y, seed, volumes)
        row = {"R": accel, "window": "auto", "zero_filled": zero_filled}
        row["pocs"] = psnr(magnitude(calibration.pocs(op, y)))
        row["chosen"] = {c: calibration.choice.count(c) for c in sorted(set(calibration.choice))}
        # Slices per alternation count their subject's held-back lines chose.
        counts = torch.as_tensor(calibration.rounds).expand(len(y))[calibration.constrained]
        row["rounds"] = {str(n): int((counts == n).sum()) for n in counts.unique().tolist()}
        if net is not None:
            rc_dc = rc_auto | {"samplers": ["dc"]}
            images, _ = diffusion_methods(net, meta, rc_dc, op, y, seed, calibration=calibration)
            row |= {"dc": psnr(images["diffusion_dc"]), "dc_unconstrained": unconstrained}
        print(row, flush=True)
        results.append(row)
    path = write_results(args.name, started, results, args.results or Path("benchmarks/results"))
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
