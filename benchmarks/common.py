"""Helpers shared by the benchmark scripts: the result file every benchmark writes."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine_kind() -> str:
    """'gpu' when CUDA is in use, else 'cpu': results of the two never share a file."""
    return "gpu" if torch.cuda.is_available() else "cpu"


def machine_description() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, {os.cpu_count()} CPU cores"
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"


def commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_results(
    name: str,
    started: float,
    rows: list[dict[str, Any]],
    folder: Path = RESULTS,
    scored_on: tuple[str, str] | None = None,
) -> Path:
    """Writes ``benchmarks/results/NAME.json`` (CPU) or ``NAME.gpu.json`` (GPU) atomically.

    ``scored_on``: ``(kind, description)`` of the machine that computed the rows, when they are
    only gathered here (scores computed on a GPU machine, aggregated on a CPU one)."""
    folder.mkdir(parents=True, exist_ok=True)
    kind, machine = scored_on or (machine_kind(), machine_description())
    suffix = ".gpu.json" if kind == "gpu" else ".json"
    path = folder / f"{name}{suffix}"
    payload = {
        "commit": commit(),
        "machine": machine,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "seconds": round(time.time() - started, 1),
        "rows": rows,
    }
    tmp = path.with_suffix(".part")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(path)
    return path


def load_config(path: Path, overlay: Path | None = None) -> dict:
    """A config file, optionally overlaid section by section (as Snakemake's --configfile
    overlays do), validated."""
    import yaml

    from ambient_med.config import load_config as load_validated
    from ambient_med.config import validate_config

    if overlay is None:
        return load_validated(path)
    merged = yaml.safe_load(Path(path).read_text())
    for key, value in yaml.safe_load(Path(overlay).read_text()).items():
        if isinstance(value, dict):
            merged.setdefault(key, {}).update(value)
        else:
            merged[key] = value
    return validate_config(merged)


def start(threads: int) -> float:
    """Logging and torch threads as every benchmark sets them; returns the start time."""
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(threads)
    return time.time()


def open_cohort(args) -> tuple[float, dict, int, Any, list[str]]:
    """What the scripts that score models on a cohort's slice store share, from their
    ``--threads``, ``--config``, ``--overlay`` and ``--slices``: (start time, validated config,
    the demo cohort's seed, the slice store, each row's example key)."""
    from ambient_med.io.store import read_slices
    from ambient_med.stages.common import example_keys

    started = start(args.threads)
    config = load_config(args.config, args.overlay)
    store = read_slices(args.slices)
    keys = example_keys(store.index.subjects, store.index.subject, store.index.slice_index)
    return started, config, config["cohorts"]["demo"]["seed"], store, keys


def demo_slices(config: dict, work: Path, name: str = "slices.h5") -> Path:
    """The demo cohort's inputs and slice store under ``work``, made once and reused."""
    from ambient_med.config import stage_config
    from ambient_med.stages import demo_data, ingest

    inputs, slices = work / "inputs", work / name
    if slices.exists():  # the inputs are only needed to make it (a copy may travel alone)
        return slices
    if not inputs.exists():
        demo_data.run(stage_config(config, "demo", "demo_data"), inputs)
    ingest.run(stage_config(config, "demo", "ingest"), inputs, slices, work / "manifest.csv")
    return slices


def checkpoint_model(checkpoint: Path, cfg: dict, image_channels: int, image_size: int):
    """The EMA denoiser of a training checkpoint (mid-run), ready to sample with."""
    from ambient_med.diffusion.model import build_denoiser
    from ambient_med.diffusion.training import ema_weights
    from ambient_med.io.store import load_torch

    state = load_torch(checkpoint)
    net = build_denoiser(cfg["model"], image_channels, cfg["scheduler"])
    net.load_state_dict(ema_weights(state))
    net.eval()
    meta = {
        "mode": cfg["cohort"]["train_mode"],
        "kind": cfg["cohort"]["corruption"],
        "image_channels": image_channels,
        "image_size": image_size,
        "delta": cfg["train"]["delta"],
        "scheduler": cfg["scheduler"],
        "corrupt": cfg["corrupt"],
        "steps": int(state["step"]),
    }
    return net, meta
