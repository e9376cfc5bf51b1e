"""The reconstruction benchmark on one GPU in a fixed wall-clock budget (run by gpu.sh).

A CPU session trains one model at a time; a GPU is mostly idle with one small UNet. Here every
model of the benchmark trains at once, each in its own process on the same GPU, for
``--train-seconds``, saving its EMA weights every ``--snapshot-every`` steps. Each setting's
models are then scored at the last step all of them reached (and at earlier snapshots, the
curve), again one process per model, with ``reconstruction.py``'s own code; their score files
are merged and written as ``reconstruction.gpu.json`` (same contract as the CPU file),
``reconstruction_curve.gpu.json`` and their Markdown and PNG.

    bash benchmarks/gpu.sh    # python benchmarks/gpu.py run --overlay benchmarks/gpu.yaml ...

Every random draw is seeded as on the CPU; what the wall-clock budget decides is only how many
steps each model reaches, and the scored step is the same for every model of a setting.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import demo_slices, load_config, start  # noqa: E402
from reconstruction import main as reconstruction_main  # noqa: E402
from reconstruction import training_stores  # noqa: E402

from ambient_med.config import stage_config  # noqa: E402
from ambient_med.io.store import load_torch, save_torch  # noqa: E402
from ambient_med.stages.train import (  # noqa: E402
    build_trainer,
    load_training_set,
    model_file,
    provenance,
)

log = logging.getLogger("gpu")
HERE = Path(__file__).resolve()


def model_dir(work: Path, setting: str, mode: str, seed: int) -> Path:
    """The model folder ``reconstruction.py`` reads for this setting, mode and seed."""
    name = f"{mode}_seed{seed}" if setting == "kspace" else f"{setting}_{mode}_seed{seed}"
    return work / name


def jobs(
    seeds: list[int],
    pixel_seeds: list[int],
    native_seeds: list[int],
    kspace_modes: tuple[str, ...] = ("ambient", "naive", "clean"),
) -> list[tuple]:
    """(setting, mode, seed) of every model: k-space ``kspace_modes``, pixel all modes,
    native ambient."""
    out = [("kspace", m, s) for s in seeds for m in kspace_modes]
    out += [("pixel", m, s) for s in pixel_seeds for m in ("ambient", "naive", "clean")]
    out += [("native", "ambient", s) for s in native_seeds]
    return out


def train_one(args: argparse.Namespace) -> None:
    """One model: train until the wall-clock deadline, an EMA snapshot every few steps (one
    torch thread: many of these share the GPU machine's cores; more where one trains alone)."""
    start(args.threads)
    config = load_config(args.config, args.overlay)
    config["cohorts"]["demo"]["train_mode"] = args.mode
    config["cohorts"]["demo"]["corruption"] = args.setting
    config["train"]["seed"] = args.seed
    work = args.workdir
    source = work / ("slices.h5" if args.mode == "clean" else f"{args.setting}.h5")
    cfg = stage_config(config, "demo", "train")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = load_training_set(cfg, source)
    trainer = build_trainer(cfg, data, device)
    prov = provenance(cfg, source)
    out = model_dir(work, args.setting, args.mode, args.seed)
    snapshots = out / "snapshots"
    snapshots.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    with open(out / "loss.csv", "w") as losses:
        losses.write("step,loss\n")
        while time.time() < args.until and trainer.step < args.max_steps:
            loss = trainer.train_step()
            losses.write(f"{trainer.step},{loss:.6g}\n")
            if trainer.step % args.snapshot_every == 0:
                path = snapshots / f"step_{trainer.step:06d}.pt"
                save_torch(path, model_file(cfg, data, trainer.state_dict(), prov))
    seconds = time.perf_counter() - began
    summary = {"steps": trainer.step, "seconds_per_step": round(seconds / max(trainer.step, 1), 4)}
    (out / "train.json").write_text(json.dumps(summary) + "\n")
    log.info("%s %s seed %d: %s", args.setting, args.mode, args.seed, summary)


def snapshot_steps(folder: Path) -> set[int]:
    return {int(p.stem.removeprefix("step_")) for p in (folder / "snapshots").glob("step_*.pt")}


def run(args: argparse.Namespace) -> None:
    """Stores, parallel training, parallel scoring, merged results (see the module doc)."""
    began = start(2)
    config = load_config(args.config, args.overlay)
    work, results = args.workdir, args.results
    work.mkdir(parents=True, exist_ok=True)
    results.mkdir(parents=True, exist_ok=True)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    todo = jobs(args.seeds, args.pixel_seeds, args.native_seeds, tuple(args.kspace_modes))
    settings = sorted({s for s, _, _ in todo})
    training_stores(config, work, settings)
    log.info("stores ready after %.0f s", time.time() - began)

    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    until = time.time() + args.train_seconds
    common = ["--workdir", str(work), "--config", str(args.config)]
    common += ["--overlay", str(args.overlay)] if args.overlay else []
    trainers = []
    for setting, mode, seed in todo:
        command = [sys.executable, str(HERE), "train", *common, "--setting", setting]
        command += ["--mode", mode, "--seed", str(seed), "--until", str(until)]
        command += ["--snapshot-every", str(args.snapshot_every)]
        command += ["--max-steps", str(args.max_steps)]
        handle = open(logs / f"train_{setting}_{mode}_{seed}.log", "w")
        trainers.append(
            (
                (setting, mode, seed),
                subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env),
            )
        )

    # Zero-filled and CS on the CPU while the GPU trains.
    score_args = [
        "--workdir",
        str(work),
        "--config",
        str(args.config),
        "--sampling-steps",
        str(args.sampling_steps),
        "--posterior-samples",
        str(args.posterior_samples),
        "--inference-masks",
        *args.inference_masks,
        "--accelerations",
        *[f"{r:g}" for r in args.accelerations],
        "--threads",
        "1",
    ]
    score_args += ["--overlay", str(args.overlay)] if args.overlay else []
    if args.no_baselines:  # scored by an earlier run on the same test problems
        log.info("baselines not scored (--no-baselines)")
    else:
        score_baselines(score_args, settings, work, began)
    if shutil.which("nvidia-smi"):
        query = ["--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader"]
        load = subprocess.run(["nvidia-smi", *query], capture_output=True, text=True, check=False)
        log.info("GPU while training (utilisation, memory): %s", load.stdout.strip())
    for key, process in trainers:
        if process.wait() != 0:
            log.error("training %s failed: see %s", key, logs)

    # Each setting is scored at the last snapshot every one of its models reached.
    final: dict[str, int] = {}
    for setting in settings:
        reached = [snapshot_steps(model_dir(work, s, m, k)) for s, m, k in todo if s == setting]
        common_steps = set.intersection(*reached) if reached else set()
        if common_steps:
            final[setting] = max(common_steps)
    for setting, mode, seed in todo:
        folder = model_dir(work, setting, mode, seed)
        summary = folder / "train.json"
        if summary.exists():
            log.info("trained %s %s %d: %s", setting, mode, seed, summary.read_text().strip())
        if setting in final:
            step_file = folder / "snapshots" / f"step_{final[setting]:06d}.pt"
            shutil.copyfile(step_file, folder / "model.pt")
    log.info("scored steps per setting: %s", final)
    # Curve: the CPU session's budget (1500 steps) and quarters of the scored step, each on
    # the snapshot grid.
    every, last = args.snapshot_every, final.get("kspace", 0)
    quarters = (round(last * q / 4 / every) * every for q in (1, 2, 3))
    curve = sorted({step for step in (1500, *quarters) if 0 < step < last and step % every == 0})
    log.info("curve steps: %s", curve)

    scorers = []
    for setting, mode, seed in todo:
        if setting not in final:
            continue
        name = f"{setting}_{mode}_{seed}"
        command = [
            sys.executable,
            str(HERE.parent / "reconstruction.py"),
            *score_args,
            "--seeds",
            str(seed),
            "--settings",
            setting,
            "--modes",
            mode,
            "--steps",
            str(final[setting]),
            "--curve-steps",
            *[str(c) for c in curve],
            "--skip-baselines",
            "--scores",
            f"scores_{name}.jsonl",
            "--results",
            str(work / f"results_{name}"),
        ]
        handle = open(logs / f"score_{name}.log", "w")
        scorers.append(
            (name, subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env))
        )
    deadline = began + args.total_seconds
    for name, process in scorers:
        try:
            process.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            process.kill()
            log.warning("scoring %s stopped at the deadline: its scores so far are kept", name)
        else:
            if process.returncode != 0:
                log.error("scoring %s failed: see %s", name, logs / f"score_{name}.log")

    # Merge every run's scores and write the results in the contract's form.
    with open(work / "scores.jsonl", "w") as merged:
        for part in sorted(work.glob("scores_*.jsonl")):
            merged.write(part.read_text())
    reconstruction_main(
        [
            *score_args,
            "--seeds",
            *[str(s) for s in sorted({k for _, _, k in todo})],
            "--settings",
            *settings,
            "--steps",
            str(final.get("kspace", 0) or 1),
            "--aggregate-only",
            "--results",
            str(results),
        ]
    )
    shutil.copyfile(work / "scores.jsonl", results / "scores.jsonl")
    pack_models(work, todo, results)
    log.info("done after %.0f s", time.time() - began)


def score_baselines(score_args: list[str], settings: list[str], work: Path, began: float) -> None:
    """Zero-filled and CS on every test problem, into ``scores_baselines.jsonl``."""
    try:
        reconstruction_main(
            [
                *score_args,
                "--seeds",
                "--settings",
                *settings,
                "--scores",
                "scores_baselines.jsonl",
                "--results",
                str(work / "results_baselines"),
            ]
        )
        log.info("baselines scored after %.0f s", time.time() - began)
    except Exception:  # the diffusion scores are still worth having without them
        log.exception("baselines failed")


def pack_models(work: Path, todo: list[tuple], results: Path) -> None:
    """The scored models' weights in float16, two archives (under 16 MiB each), so that they
    can be scored again or audited elsewhere."""
    for archive, wanted in (("models_kspace.tar", True), ("models_other.tar", False)):
        with tarfile.open(results / archive, "w") as tar:
            for setting, mode, seed in todo:
                folder = model_dir(work, setting, mode, seed)
                if (setting == "kspace") != wanted or not (folder / "model.pt").exists():
                    continue
                state = load_torch(folder / "model.pt", what="model")
                state["state_dict"] = {k: v.half() for k, v in state["state_dict"].items()}
                half = folder / "model.fp16.pt"
                save_torch(half, state)
                tar.add(half, arcname=f"{folder.name}/model.fp16.pt")
                for extra in ("loss.csv", "train.json"):
                    if (folder / extra).exists():
                        tar.add(folder / extra, arcname=f"{folder.name}/{extra}")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("run", "train", "prepare"):
        p = sub.add_parser(name)
        p.add_argument("--config", type=Path, default=Path("config/config.yaml"))
        p.add_argument("--overlay", type=Path, default=None)
        p.add_argument("--workdir", type=Path, default=Path("benchmarks/work/gpu"))
        p.add_argument("--snapshot-every", type=int, default=500)
    run_p = sub.choices["run"]
    run_p.add_argument("--results", type=Path, required=True)
    run_p.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    run_p.add_argument("--pixel-seeds", type=int, nargs="*", default=[])
    run_p.add_argument("--native-seeds", type=int, nargs="*", default=[0])
    run_p.add_argument("--train-seconds", type=float, default=280.0)
    run_p.add_argument("--total-seconds", type=float, default=480.0, help="scoring ends by then")
    run_p.add_argument("--sampling-steps", type=int, default=30)
    run_p.add_argument("--kspace-modes", nargs="+", default=["ambient", "naive", "clean"])
    run_p.add_argument("--max-steps", type=int, default=1_000_000, help="per model")
    run_p.add_argument("--accelerations", type=float, nargs="+", default=[4, 8, 2, 6])
    run_p.add_argument("--inference-masks", nargs="*", default=["fixed", "fresh"])
    run_p.add_argument("--no-baselines", action="store_true", help="diffusion scores only")
    run_p.add_argument("--posterior-samples", type=int, default=4)
    train_p = sub.choices["train"]
    train_p.add_argument("--setting", choices=("kspace", "pixel", "native"), required=True)
    train_p.add_argument("--mode", choices=("ambient", "naive", "clean"), required=True)
    train_p.add_argument("--seed", type=int, required=True)
    train_p.add_argument("--until", type=float, required=True, help="wall-clock end (epoch s)")
    train_p.add_argument("--max-steps", type=int, default=1_000_000)
    train_p.add_argument("--threads", type=int, default=1)
    return parser.parse_args(argv)


if __name__ == "__main__":
    arguments = parse()
    if arguments.command == "train":
        train_one(arguments)
    elif arguments.command == "prepare":  # the slice store alone, e.g. for a GPU machine
        print(demo_slices(load_config(arguments.config, arguments.overlay), arguments.workdir))
    else:
        run(arguments)
