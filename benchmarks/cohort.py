"""What the demo cohort gives away: how close held-out subjects come to training, and what
the phase-free (conjugate-symmetric) shortcut was worth to zero-filling.

No training: the demo inputs and slice store of the config, then
- the audit statistic of every held-out slice against the training set (its median and
  99th percentile: a cohort of one brain deformed six times scored 0.977–0.982, as close as
  a copy);
- zero-filled PSNR / SSIM / ssim_fg at each R, per hold-out volume, with the smooth phase of
  the shared simulator and without it (a real-valued image, whose k-space mirrors itself),
  and the same after filling unacquired lines from their acquired mirror images
  (``conjugate_filled``): what a learned prior could get for free without the phase.

    python benchmarks/cohort.py            # → benchmarks/results/cohort.json

Rows: {what: "audit", statistic, n_holdout, n_train, median, q99} and {what: "zero_filled",
phase, R, volumes, psnr, psnr_ci95, ssim, ssim_fg} (and the same with what: "conjugate_filled").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import demo_slices, load_config, start, write_results  # noqa: E402

from ambient_med.evaluation import audit  # noqa: E402
from ambient_med.evaluation.metrics import bootstrap_ci, per_volume_metrics  # noqa: E402
from ambient_med.io.store import read_slices  # noqa: E402
from ambient_med.physics.acquisition import Acquisition  # noqa: E402
from ambient_med.stages.common import example_keys, magnitude, slice_identity  # noqa: E402


def audit_rows(train: np.ndarray, holdout: np.ndarray) -> list[dict]:
    """The nearest-training statistic of held-out slices, for each statistic available."""
    statistics = {"magnitude_ncc": audit.nearest_ncc, "copy_statistic": audit.nearest_copy}
    rows = []
    for name, nearest in statistics.items():
        best = nearest(holdout, train)[0]
        rows.append(
            {
                "what": "audit",
                "statistic": name,
                "n_holdout": len(holdout),
                "n_train": len(train),
                "median": round(float(np.median(best)), 4),
                "q99": round(float(np.quantile(best, 0.99)), 4),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=Path("config/config.yaml"))
    parser.add_argument("--workdir", type=Path, default=Path("benchmarks/work/cohort"))
    parser.add_argument("--accelerations", type=float, nargs="+", default=[2, 4, 8])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    started = start(args.threads)
    config = load_config(args.config)
    store = read_slices(demo_slices(config, args.workdir))
    train_rows, holdout_rows = store.index.rows("train"), store.index.rows("holdout")
    rows = audit_rows(store.images[train_rows], store.images[holdout_rows])

    keys = example_keys(store.index.subjects, store.index.subject, store.index.slice_index)
    rc = config["reconstruct"]
    seed = config["cohorts"]["demo"]["seed"]
    subjects, slice_index = slice_identity(store, holdout_rows)
    volumes = store.index.subject[holdout_rows]
    reference = store.images[holdout_rows]
    for accel in args.accelerations:
        for phase in (True, False):
            acq = Acquisition(
                accel,
                rc["center_fraction"],
                rc["mask_type"],
                reference.shape[-1],
                seed,
                phase=phase,
            )
            op = acq.operator([keys[r] for r in holdout_rows])
            y = acq.measure(op, reference, subjects, slice_index, "cohort")
            for method, kspace in (("zero_filled", y), ("conjugate_filled", conjugate_fill(y))):
                # The plain inverse FFT: A^H would mask the filled entries away again.
                image = magnitude(op.inverse_transform(kspace))
                scores = per_volume_metrics(reference, image, volumes)
                rows.append(summary_row(method, phase, accel, scores))
    for row in rows:
        print(row)
    print(f"wrote {write_results('cohort', started, rows)}")


def conjugate_fill(y: torch.Tensor) -> torch.Tensor:
    """Fills each unacquired k-space entry with the conjugate of its mirror image where that
    was acquired: exact for a real-valued image (K(−k) = conj K(k)), the gift a phase takes
    away. ``y``: ``(N, 2, H, W)`` masked centred k-space (zeros where not acquired)."""
    k = torch.complex(y[:, 0], y[:, 1])
    mirror = torch.zeros_like(k)
    # Centred grid with DC at N // 2: index i mirrors to N − i (row/column 0 have none).
    mirror[:, 1:, 1:] = k[:, 1:, 1:].flip(-2, -1).conj()
    filled = torch.where(k != 0, k, mirror)
    return torch.stack([filled.real, filled.imag], dim=1)


def summary_row(method: str, phase: bool, accel: float, scores: dict) -> dict:
    psnr = np.array([s["psnr"] for s in scores.values()])
    low, high = bootstrap_ci(psnr)
    return {
        "what": method,
        "phase": phase,
        "R": accel,
        "volumes": len(scores),
        "psnr": round(float(psnr.mean()), 3),
        "psnr_ci95": [round(low, 3), round(high, 3)],
        "ssim": round(float(np.mean([s["ssim"] for s in scores.values()])), 4),
        "ssim_fg": round(float(np.mean([s["ssim_fg"] for s in scores.values()])), 4),
    }


if __name__ == "__main__":
    main()
