"""Is the prior blind to a global phase? DC reconstructions of the crop prior's hold-out.

A global phase e^{iθ} means nothing physically (|x| is the image) and commutes with every
operator here (A(e^{iθ} x) = e^{iθ} A x), so a prior should reconstruct e^{iθ} x as well as
x. Here the prior of ``robust_prior.py --crop-prior`` (its ``--workdir``) reconstructs its
hold-out subjects, every ``--every``-th slice, with one mask per subject (1 coil, random R = 4,
8 % centre, as ``robust_prior.py --coils 1 ...`` writes them), under three phases — the
cohort's (the subject's smooth phase, as the workflow's hold-out has it), the one
``robust_prior.write_scan`` gives a file of those slices, and none (the magnitude images:
what is left to gain where no phase spreads the image's k-space) — each rotated by
``--rotations`` degrees. Rows: ``{subject, phase, rotation_deg, zero_filled, diffusion_dc}``
(PSNR dB, as ``robust_prior.py`` computes it). Zero-filled does not move with θ; DC should
not either.

    python benchmarks/phase_rotation.py --workdir benchmarks/work/robust_crop24
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, load_config, start, write_results  # noqa: E402
from robust_prior import psnr_on_model_scale  # noqa: E402

from ambient_med.config import stage_config  # noqa: E402
from ambient_med.io.demo import file_phased  # noqa: E402
from ambient_med.io.store import read_slices  # noqa: E402
from ambient_med.physics.acquisition import as_channels, complex_slices  # noqa: E402
from ambient_med.physics.masks import LineMaskFunc  # noqa: E402
from ambient_med.physics.operators import SingleCoilFourier  # noqa: E402
from ambient_med.stages import reconstruct  # noqa: E402
from ambient_med.stages.common import load_model, slice_identity  # noqa: E402


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=Path("config/config.yaml"))
    parser.add_argument("--workdir", type=Path, required=True, help="robust_prior's --workdir")
    parser.add_argument("--results", type=Path, default=None, help="default: benchmarks/results")
    parser.add_argument("--name", default="phase_rotation")
    parser.add_argument("--rotations", type=float, nargs="+", default=[0, 90, 180, 270])
    parser.add_argument("--every", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    started = start(args.threads)
    config = load_config(args.config)
    config["reconstruct"] |= {"accelerations": [4], "samplers": ["dc"], "guard": False}
    config["cohorts"]["demo"] |= {"corruption": "kspace", "train_mode": "ambient"}
    cfg = stage_config(config, "demo", "reconstruct")
    rc, seed = cfg["reconstruct"], cfg["cohort"]["seed"]
    # The one prior robust_prior.py trained there: --crop-prior's or --t1-prior's.
    folder = next(
        (args.workdir / name for name in ("t1_crop", "t1_own") if (args.workdir / name).is_dir()),
        args.workdir / "t1_crop",
    )
    store = read_slices(folder / "slices.h5")
    net, meta = load_model(folder / "model.pt")
    size = store.images.shape[-1]
    rows_out = []
    for subject in np.unique(store.index.subject[store.index.rows("holdout")]):
        rows = np.flatnonzero(store.index.subject == subject)[:: args.every]
        truth = store.images[rows]
        line_mask = LineMaskFunc([0.08], [4], "random")(size, int(subject))
        op = SingleCoilFourier(torch.from_numpy(np.tile(line_mask, (len(rows), 1))), size)
        names, positions = slice_identity(store, rows)
        phases = {
            "cohort": complex_slices(truth, names, positions, seed),
            "file": file_phased(truth, int(subject)),
            "none": truth.astype(np.complex64),
        }
        for phase, images in phases.items():
            for degrees in args.rotations:
                rotated = images * np.exp(1j * np.deg2rad(degrees)).astype(np.complex64)
                y = op.A(as_channels(rotated))
                zero_filled = reconstruct.magnitude(op.A_adjoint(y))
                dc, _ = reconstruct.diffusion_methods(net, meta, rc, op, y, seed)
                rows_out.append(
                    {
                        "subject": int(subject),
                        "phase": phase,
                        "rotation_deg": degrees,
                        "zero_filled": round(
                            psnr_on_model_scale(truth, zero_filled, zero_filled), 3
                        ),
                        "diffusion_dc": round(
                            psnr_on_model_scale(truth, zero_filled, dc["diffusion_dc"]), 3
                        ),
                    }
                )
                print(rows_out[-1], flush=True)
    path = write_results(args.name, started, rows_out, args.results or RESULTS)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
