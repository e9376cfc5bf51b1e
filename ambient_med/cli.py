"""``ambient-med <stage>``: one subcommand per Snakemake rule.

Each subcommand reads the config (a YAML file, or the JSON slice a Snakemake rule passes),
validates it, and calls one stage. Failures print one line — the file or config key and the
reason — and exit with status 2; set AMBIENT_MED_DEBUG=1 for a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ambient_med import __version__
from ambient_med.config import load_config, stage_config
from ambient_med.errors import AmbientMedError

log = logging.getLogger("ambient_med")

STAGES: dict[str, str] = {
    "demo-data": "Write the demo cohort's inputs (NIfTI volumes and DICOM series with made-up "
    "patient tags) from the ICBM 2009a template shipped in nilearn.",
    "ingest": "Read a folder of DICOM series and NIfTI volumes, de-identify, reorient to RAS, "
    "normalise and resize axial slices into a slice store; write a manifest of every file.",
    "corrupt": "Turn clean slices into measurements y = A x0 (pixel masking or single-coil "
    "Cartesian k-space undersampling) with masks and operator metadata, no clean image.",
    "train": "Train the ambient diffusion denoiser (or the clean/naive baseline) on the "
    "corrupted measurements; resumes from the last checkpoint after an interruption.",
    "sample": "Draw prior samples from a trained model with the fixed-mask DDIM sampler; "
    "write them as NIfTI and as a PNG grid.",
    "reconstruct": "Undersample hold-out scans retrospectively and reconstruct them with "
    "zero-filling, L1-wavelet compressed sensing and the diffusion prior (DC, DPS, one-step); "
    "write NIfTI, derived DICOM, PNG panels and PSNR/SSIM/NRMSE.",
    "audit": "Memorization audit: every sample's nearest training slice under a copy statistic "
    "that sees anatomy, a threshold calibrated on held-out subjects, controls and canaries; "
    "JSON, the closest pairs and a histogram.",
    "bundle": "Write the cohort's model as a MONAI bundle (configs, state dict, docs and a "
    "synthetic example that `python -m monai.bundle run` reconstructs).",
    "evaluate": "Measure a trained model on clean hold-out slices (x0-prediction error at "
    "several noise levels) into a flat metrics.json.",
}


def _config_args(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--config",
        type=Path,
        default=None,
        help="YAML config file (default: config/config.yaml)",
    )
    source.add_argument(
        "--config-json",
        default=None,
        help="the stage's validated config slice as JSON (what Snakemake rules pass)",
    )
    parser.add_argument("--cohort", required=True, help="cohort name under 'cohorts:'")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ambient-med",
        description="Ambient diffusion for MRI: train generative models on undersampled or "
        "masked scans only. Each subcommand is one stage of the Snakemake workflow.",
    )
    parser.add_argument("--version", action="version", version=f"ambient-med {__version__}")
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    parsers = {
        name: sub.add_parser(name, help=text, description=text) for name, text in STAGES.items()
    }
    for p in parsers.values():
        _config_args(p)
    parsers["demo-data"].add_argument("--output", type=Path, required=True, help="folder to write")
    p = parsers["ingest"]
    p.add_argument("--input", type=Path, required=True, help="folder of DICOM/NIfTI files")
    p.add_argument("--slices", type=Path, required=True, help="slice store to write (.h5)")
    p.add_argument("--manifest", type=Path, required=True, help="manifest to write (.csv)")
    p.add_argument("--raw", type=Path, default=None, help="raw k-space store to write (.h5)")
    p = parsers["corrupt"]
    p.add_argument("--kind", choices=["pixel", "kspace", "native"], required=True)
    p.add_argument("--slices", type=Path, default=None, help="slice store from ingest")
    p.add_argument("--raw", type=Path, default=None, help="raw k-space store (kind native)")
    p.add_argument("--examples", type=Path, default=None, help="PNG of what training sees")
    p.add_argument("--output", type=Path, required=True, help="measurement store to write")
    p = parsers["train"]
    p.add_argument(
        "--input",
        type=Path,
        nargs="+",
        required=True,
        help="measurement store from corrupt (the slice store for train_mode: clean); for a "
        "pool, one per member cohort, in the pool's order",
    )
    p.add_argument("--model", type=Path, required=True, help="model file to write (.pt)")
    p.add_argument("--loss-log", type=Path, required=True, help="loss CSV to write")
    p.add_argument(
        "--checkpoints",
        type=Path,
        required=True,
        help="folder for resumable checkpoints (not a Snakemake output: kept on failure)",
    )
    p.add_argument("--loss-plot", type=Path, default=None, help="PNG of the loss curve")
    p.add_argument("--provenance", type=Path, default=None, help="TSV of versions and hashes")
    p = parsers["sample"]
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--nifti", type=Path, required=True, help="samples as a NIfTI volume")
    p.add_argument("--grid", type=Path, required=True, help="samples as a PNG grid")
    p.add_argument(
        "--measurements", type=Path, default=None, help="measurement store (native: coil maps)"
    )
    p = parsers["reconstruct"]
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--slices", type=Path, required=True, help="slice store (hold-out split used)")
    p.add_argument("--files", type=Path, required=True, help="folder for NIfTI/DICOM/PNG outputs")
    p.add_argument("--metrics", type=Path, required=True, help="reconstruction metrics JSON")
    p = parsers["audit"]
    p.add_argument("--samples", type=Path, required=True, help="samples NIfTI of `sample`")
    p.add_argument("--slices", type=Path, required=True, help="slice store (train/hold-out)")
    p.add_argument("--memorization", type=Path, required=True, help="JSON to write")
    p.add_argument("--figure", type=Path, required=True, help="closest-pairs PNG to write")
    p.add_argument("--table", type=Path, default=None, help="the JSON as a TSV table")
    p.add_argument(
        "--histogram", type=Path, default=None, help="PNG: samples vs held-out vs controls"
    )
    p.add_argument(
        "--measurements",
        type=Path,
        default=None,
        help="measurement store: zero-filled references when there is no clean image",
    )
    p = parsers["bundle"]
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--output", type=Path, required=True, help="bundle folder to write")
    p = parsers["evaluate"]
    p.add_argument("--samples", type=Path, default=None, help="adds generation-quality metrics")
    p.add_argument("--table", type=Path, default=None, help="the metrics as a TSV table")
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--slices", type=Path, required=True, help="slice store (hold-out split used)")
    p.add_argument("--metrics", type=Path, required=True, help="metrics JSON to write")
    p.add_argument(
        "--measurements",
        type=Path,
        default=None,
        help="measurement store: adds the hold-out error on measured entries",
    )
    p.add_argument(
        "--reconstruction",
        type=Path,
        default=None,
        help="metrics JSON of the reconstruct rule, merged with the prefix 'recon_'",
    )
    return parser


def _stage_cfg(args: argparse.Namespace, stage: str) -> dict[str, Any]:
    if args.config_json is not None:
        try:
            cfg = json.loads(args.config_json)
        except json.JSONDecodeError as exc:
            raise AmbientMedError(f"--config-json: not valid JSON ({exc.msg})") from None
        if cfg.get("cohort", {}).get("name") != args.cohort:
            raise AmbientMedError(f"--config-json: is not the config of cohort '{args.cohort}'")
        return cfg
    config = load_config(args.config or Path("config/config.yaml"))
    return stage_config(config, args.cohort, stage)


def _dispatch(args: argparse.Namespace) -> None:
    stage = args.stage
    if stage == "demo-data":
        from ambient_med.stages import demo_data

        demo_data.run(_stage_cfg(args, "demo_data"), args.output)
    elif stage == "ingest":
        from ambient_med.stages import ingest

        cfg = _stage_cfg(args, "ingest")
        ingest.run(cfg, args.input, args.slices, args.manifest, args.raw)
    elif stage == "corrupt":
        from ambient_med.stages import corrupt

        cfg = _stage_cfg(args, "corrupt")
        corrupt.run(cfg, args.kind, args.slices, args.output, args.raw, args.examples)
    elif stage == "train":
        from ambient_med.stages import train

        cfg = _stage_cfg(args, "train")
        train.run(
            cfg,
            args.input,
            args.model,
            args.loss_log,
            args.checkpoints,
            loss_plot=args.loss_plot,
            provenance_table=args.provenance,
        )
    elif stage == "sample":
        from ambient_med.stages import sample

        cfg = _stage_cfg(args, "sample")
        sample.run(cfg, args.model, args.nifti, args.grid, args.measurements)
    elif stage == "reconstruct":
        from ambient_med.stages import reconstruct

        cfg = _stage_cfg(args, "reconstruct")
        reconstruct.run(cfg, args.model, args.slices, args.files, args.metrics)
    elif stage == "audit":
        from ambient_med.stages import audit

        cfg = _stage_cfg(args, "audit")
        kind = cfg["cohort"]["corruption"]
        audit.run(
            cfg,
            args.samples,
            args.slices,
            args.memorization,
            args.figure,
            args.measurements,
            kind,
            args.table,
            args.histogram,
        )
    elif stage == "bundle":
        from ambient_med.stages import bundle

        bundle.run(_stage_cfg(args, "bundle"), args.model, args.output)
    elif stage == "evaluate":
        from ambient_med.stages import evaluate

        cfg = _stage_cfg(args, "evaluate")
        evaluate.run(
            cfg,
            args.model,
            args.slices,
            args.metrics,
            args.measurements,
            args.reconstruction,
            args.samples,
            args.table,
        )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        import torch

        # Snakemake may grant more threads than the machine has (--cores 8 on 2 cores);
        # processes that torchrun starts on one node share them.
        share = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(max(1, min(args.threads, os.cpu_count() or 1) // share))
        if int(os.environ.get("RANK", "0")) > 0:
            logging.getLogger().setLevel(logging.WARNING)  # rank 0 speaks for the run
        _dispatch(args)
    except AmbientMedError as exc:
        print(f"ambient-med {args.stage}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ambient-med {args.stage}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # never a bare traceback for the user; opt in for debugging
        if os.environ.get("AMBIENT_MED_DEBUG"):
            traceback.print_exc()
        print(
            f"ambient-med {args.stage}: internal error: {exc.__class__.__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''} (AMBIENT_MED_DEBUG=1 for details)",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
