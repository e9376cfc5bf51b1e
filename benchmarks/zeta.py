"""DPS step size ζ (``reconstruct.zeta``) chosen by measurement, on training-subject slices.

For each model file given, DPS reconstructs 12 training-subject slices of the cohort's slice
store (never a hold-out slice: ζ is tuned where the test cannot see it) at each R, for each ζ,
beside the DC sampler on the same slices; one posterior sample, ``--sampling-steps`` steps.
Rows: ``{model, steps, coils, R, sampling_steps, zeta, dps, dc}`` (PSNR in dB).

    python benchmarks/zeta.py --slices benchmarks/work/gpu/slices.h5 \\
        --overlay benchmarks/gpu.yaml \\
        --model benchmarks/work/gpu_run1/models/ambient_seed0/model.fp16.pt:1 \\
        --model benchmarks/work/gpu_run1/models/native_ambient_seed0/model.fp16.pt:4 \\
        --accelerations 2 4 --zetas 0.5 1 2 4 8

(the models of ``gpu.sh``'s ``models_kspace.tar`` and ``models_other.tar``, unpacked).

``--model PATH:COILS`` tests the model through COILS simulated coils (1 for k-space models,
the training coil count for native ones). Model files in float16 (gpu.sh's archives) load as
float32 (``load_state_dict`` casts).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import open_cohort, write_results  # noqa: E402

from ambient_med.evaluation.metrics import per_volume_metrics  # noqa: E402
from ambient_med.stages.common import load_model, spread_rows  # noqa: E402
from ambient_med.stages.reconstruct import diffusion_methods, retrospective  # noqa: E402


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=Path("config/config.yaml"))
    parser.add_argument("--overlay", type=Path, default=None)
    parser.add_argument("--slices", type=Path, required=True, help="the cohort's slice store")
    parser.add_argument("--model", action="append", required=True, help="PATH:COILS")
    parser.add_argument("--accelerations", type=float, nargs="+", default=[2, 4])
    parser.add_argument("--zetas", type=float, nargs="+", default=[0.5, 1, 2, 4, 8])
    parser.add_argument("--sampling-steps", type=int, default=30)
    parser.add_argument("--results", type=Path, default=None, help="default: benchmarks/results")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    started, config, seed, store, keys = open_cohort(args)
    train_rows = store.index.rows("train")
    rows, validation = spread_rows(train_rows, 12), spread_rows(train_rows, 3)
    reference, volumes = store.images[rows], store.index.subject[rows]
    rc = dict(config["reconstruct"]) | {"posterior_samples": 1, "steps": args.sampling_steps}

    def psnr(images: np.ndarray) -> float:
        per_volume = per_volume_metrics(reference, images, volumes).values()
        return round(float(np.mean([m["psnr"] for m in per_volume])), 3)

    results = []
    for spec in args.model:
        path, _, coils = spec.rpartition(":")
        net, meta = load_model(path)  # float16 weights load into the float32 network
        for accel in args.accelerations:
            problem_rc = rc | {"coils": int(coils)}
            op, y, *_ = retrospective(
                problem_rc, accel, store, rows, validation, keys, seed, with_baselines=False
            )
            dc, _ = diffusion_methods(net, meta, rc | {"samplers": ["dc"]}, op, y, seed)
            for zeta in args.zetas:
                dps, _ = diffusion_methods(
                    net, meta, rc | {"samplers": ["dps"], "zeta": zeta}, op, y, seed
                )
                row = {
                    "model": str(path),
                    "steps": int(meta["steps"]),
                    "coils": int(coils),
                    "R": accel,
                    "sampling_steps": args.sampling_steps,
                    "zeta": zeta,
                    "dps": psnr(dps["diffusion_dps"]),
                    "dc": psnr(dc["diffusion_dc"]),
                }
                print(row, flush=True)
                results.append(row)
    path = write_results("zeta", started, results, args.results or Path("benchmarks/results"))
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
