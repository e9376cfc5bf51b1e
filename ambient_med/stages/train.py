"""Rule `train_model`: fit the denoiser on corrupted data (or a baseline), resumably.

Checkpoints live in ``results/{cohort}/train/checkpoints/``, which is not a declared output,
so Snakemake does not delete them when a job fails: rerunning the same command resumes from
the last checkpoint, provided the config and the input file are unchanged.
"""

from __future__ import annotations

import csv
import logging
import os
import sys
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ambient_med import __version__
from ambient_med.config import config_hash
from ambient_med.diffusion.losses import AmbientObjective
from ambient_med.diffusion.model import build_ddim, build_ddpm, build_denoiser
from ambient_med.diffusion.samplers import sample_prior
from ambient_med.diffusion.training import (
    Trainer,
    TrainingSet,
    concatenate,
    ema_weights,
    inference_operator,
    unmeasured_scale,
)
from ambient_med.errors import AmbientMedError
from ambient_med.evaluation.figures import loss_curve
from ambient_med.io.export import write_table
from ambient_med.io.store import atomic_path, load_torch, save_torch, sha256_file
from ambient_med.physics.masks import derive_seed
from ambient_med.stages.common import MODEL_FORMAT, load_examples

log = logging.getLogger(__name__)

LOSS_COLUMNS = ("step", "loss")  # no wall time: same config, same bytes


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise AmbientMedError("config key 'train.device': cuda requested but not available")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass(frozen=True)
class ProcessGroup:
    """This process's place in a data-parallel run (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def writes(self) -> bool:
        """Rank 0 alone writes checkpoints, logs and the model."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()


def join_process_group(device_name: str) -> ProcessGroup:
    """The process group torchrun describes in the environment (``WORLD_SIZE``, ``RANK``,
    ``LOCAL_RANK``, rendezvous), joined with NCCL on CUDA and gloo on CPU; one process
    otherwise."""
    device = resolve_device(device_name)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return ProcessGroup(device=device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return ProcessGroup(torch.distributed.get_rank(), world_size, device)


def load_training_set(cfg: dict[str, Any], input_path: Path | Sequence[Path]) -> TrainingSet:
    """The training split as the configured mode sees it (docs/method.md); for a pool, every
    member's store (``input_path``, one per member in order), each with its own seed."""
    cohort = cfg["cohort"]
    paths = [Path(input_path)] if isinstance(input_path, str | Path) else list(input_path)
    members = cohort.get("members") or [cohort]
    if len(paths) != len(members):
        raise AmbientMedError(
            f"cohort '{cohort['name']}': {len(paths)} input store(s) for {len(members)} cohort(s)"
        )
    parts = [
        load_examples(
            path,
            mode=cohort["train_mode"],
            kind=cohort["corruption"],
            split="train",
            delta=cfg["train"]["delta"],
            b_redraw=cfg["train"]["b_redraw"],
            seed=member["seed"],
            cohort=member["name"],
            further_acceleration=tuple(cfg["train"]["further_acceleration"]),
        )
        for path, member in zip(paths, members, strict=True)
    ]
    return parts[0] if len(parts) == 1 else concatenate(parts, [str(p) for p in paths])


def training_seed(cfg: dict[str, Any]) -> int:
    """``train.seed`` (initialisation and every training draw), else the cohort seed. The
    data — split, masks, phases, fixed B — always follow the cohort seed, so models of
    several training seeds are compared on the same measurements and hold-out subjects."""
    seed = cfg["train"].get("seed")
    return cfg["cohort"]["seed"] if seed is None else int(seed)


def build_trainer(
    cfg: dict[str, Any], data: TrainingSet, device: torch.device, group: ProcessGroup | None = None
) -> Trainer:
    seed = training_seed(cfg)
    torch.manual_seed(seed)  # network initialisation
    net = build_denoiser(cfg["model"], data.image_channels, cfg["scheduler"])
    if cfg["model"].get("unmeasured_scale") == "auto":
        # Resolved from the data before the EMA copy is made; the objective reads it back.
        net.unmeasured_scale.fill_(unmeasured_scale(data, net.sigma_data))
        log.info("unmeasured_scale auto: %.4g", float(net.unmeasured_scale))
    ddpm = build_ddpm(cfg["scheduler"])
    objective = AmbientObjective(
        ddpm.alphas_cumprod,
        cfg["train"]["loss_weighting"],
        noise_distribution=cfg["train"]["noise_distribution"],
        sigma_data=net.sigma_data,
        unmeasured_scale=float(net.unmeasured_scale),
    )
    train = cfg["train"]
    group = group or ProcessGroup(device=device)
    if train["batch_size"] % group.world_size:
        raise AmbientMedError(
            f"config key 'train.batch_size': {train['batch_size']} examples do not split evenly "
            f"over {group.world_size} data-parallel processes"
        )
    return Trainer(
        net,
        objective,
        data,
        batch_size=train["batch_size"],
        lr=train["lr"],
        ema_decay=train["ema_decay"],
        seed=seed,
        device=device,
        rank=group.rank,
        world_size=group.world_size,
        mirror=train["mirror_rows"],
        # Real (pixel-masked) images have no phase to rotate.
        rotate=train["rotate_phase"] and data.image_channels == 2,
    )


def provenance(cfg: dict[str, Any], input_path: Path | Sequence[Path]) -> dict[str, Any]:
    versions = {"ambient_med": __version__}
    for package in ("torch", "monai", "numpy", "nibabel", "pydicom", "h5py"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "absent"
    # The number of data-parallel processes does not change what is computed (Trainer), so
    # it is left out: a run resumes on another number of processes, e.g. fewer GPUs.
    computed = {**cfg, "train": {k: v for k, v in cfg["train"].items() if k != "distributed"}}
    return {
        "versions": versions,
        "config_sha256": config_hash(computed),
        "inputs": input_hashes(cfg, input_path),
    }


def input_hashes(cfg: dict[str, Any], input_path: Path | Sequence[Path]) -> dict[str, str]:
    """SHA-256 of each input store, named by file (``cohort/file`` for a pool's members,
    whose stores share file names)."""
    if isinstance(input_path, str | Path):
        return {Path(input_path).name: sha256_file(input_path)}
    members = [m["name"] for m in cfg["cohort"].get("members", [])]
    if len(members) != len(input_path):
        return {Path(p).name: sha256_file(p) for p in input_path}
    return {
        f"{member}/{Path(p).name}": sha256_file(p)
        for member, p in zip(members, input_path, strict=True)
    }


def _trim_loss_log(path: Path, step: int) -> None:
    """Drops rows logged after the checkpoint we resume from (they will be redone)."""
    if not path.exists():
        return
    with open(path, newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if int(r["step"]) <= step]
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=LOSS_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def run(
    cfg: dict[str, Any],
    input_path: Path,
    model_out: Path,
    loss_out: Path,
    checkpoint_dir: Path,
    stop_after: int | None = None,
    loss_plot: Path | None = None,
    provenance_table: Path | None = None,
) -> None:
    """Trains to ``train.steps``; ``stop_after`` ends early (tests of resumption).

    Under torchrun every process trains its share of each batch (:class:`Trainer`); rank 0
    alone writes the checkpoint, the loss log, TensorBoard events and the model, and every
    rank resumes from the same checkpoint.
    """
    train_cfg = cfg["train"]
    group = join_process_group(train_cfg["device"])
    try:
        data, prov = _train(cfg, group, input_path, model_out, checkpoint_dir, stop_after)
        if group.writes and (stop_after is None or stop_after >= train_cfg["steps"]):
            _finish(
                cfg, data, prov, model_out, loss_out, checkpoint_dir, loss_plot, provenance_table
            )
        group.barrier()
    finally:
        if group.world_size > 1:
            torch.distributed.destroy_process_group()


def _train(
    cfg: dict[str, Any],
    group: ProcessGroup,
    input_path: Path,
    model_out: Path,
    checkpoint_dir: Path,
    stop_after: int | None,
) -> tuple[TrainingSet, dict[str, Any]]:
    """The optimisation loop; returns the training set and the run's provenance."""
    train_cfg = cfg["train"]
    data = load_training_set(cfg, input_path)
    if len(data) == 0:
        raise AmbientMedError(f"input '{input_path}': no training slice")
    trainer = build_trainer(cfg, data, group.device, group)
    prov = provenance(cfg, input_path)

    checkpoint_dir = Path(checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = checkpoint_dir / "last.pt"
    loss_log = checkpoint_dir / "loss.csv"
    if checkpoint.exists():
        state = load_torch(checkpoint)
        if (
            state.get("config_sha256") == prov["config_sha256"]
            and state.get("inputs") == prov["inputs"]
        ):
            trainer.load_state_dict(state)
            log.info("resuming from step %d (%s)", trainer.step, checkpoint)
        else:
            log.info("checkpoint %s is from another config or input: starting over", checkpoint)
            group.barrier()  # every rank has read it before rank 0 removes it
            if group.writes:
                checkpoint.unlink()
                loss_log.unlink(missing_ok=True)
    if group.writes:
        _trim_loss_log(loss_log, trainer.step)
        if not loss_log.exists():
            with open(loss_log, "w", newline="") as handle:
                csv.writer(handle).writerow(LOSS_COLUMNS)

    total = train_cfg["steps"]
    log.info(
        "training %s/%s on %d slices, %s%s, %d parameters",
        cfg["cohort"]["train_mode"],
        data.kind,
        len(data),
        group.device,
        f" × {group.world_size} processes" if group.world_size > 1 else "",
        sum(p.numel() for p in trainer.module.parameters()),
    )
    bar = tqdm(
        total=total,
        initial=trainer.step,
        desc="train",
        file=sys.stderr,
        mininterval=1.0 if sys.stderr.isatty() else 15.0,
        disable=not group.writes,
    )
    start, first_step = time.perf_counter(), trainer.step
    board = TensorBoardLog(Path(model_out).parent / "tb", cfg, data) if group.writes else None
    with open(loss_log, "a", newline="") if group.writes else nullcontext() as handle:
        writer = csv.writer(handle) if handle is not None else None
        while trainer.step < total:
            loss = trainer.train_step()
            if writer is not None and board is not None:
                writer.writerow((trainer.step, f"{loss:.6g}"))
                board.loss(trainer.step, loss)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            if trainer.step % train_cfg["checkpoint_every"] == 0 or trainer.step == total:
                if handle is not None and board is not None:
                    handle.flush()
                    save_torch(checkpoint, trainer.state_dict() | prov_keys(prov))
                    board.samples(trainer)
                group.barrier()  # the checkpoint is on disk before any rank goes on
            if stop_after is not None and trainer.step >= stop_after:
                break
    bar.close()
    if board is not None:
        board.close()
    done = trainer.step - first_step
    log.info("%.3f s per step", (time.perf_counter() - start) / max(1, done))
    return data, prov


def model_file(
    cfg: dict[str, Any], data: TrainingSet, state: dict[str, Any], prov: dict[str, Any]
) -> dict[str, Any]:
    """The model file's contents for a :meth:`Trainer.state_dict` ``state``: its EMA weights
    (on the CPU) and what sampling and reconstruction need to know of the training run."""
    model = {
        "format": MODEL_FORMAT,
        "state_dict": {k: v.detach().cpu() for k, v in ema_weights(state).items()},
        "steps": int(state["step"]),
        "mode": cfg["cohort"]["train_mode"],
        "kind": data.kind,
        "image_channels": data.image_channels,
        "image_size": data.image_shape[-1],
        "delta": float(cfg["train"]["delta"]),
        "model": cfg["model"],
        "scheduler": cfg["scheduler"],
        "corrupt": cfg["corrupt"],
        "cohort": cfg["cohort"]["name"],
        "seed": cfg["cohort"]["seed"],
        "provenance": prov,
    }
    if data.masks is not None and data.kind == "native":
        # An acquired mask of the training data: Ã_inf at sampling redraws B on it.
        model["native_line_mask"] = data.masks[0].tolist()
    return model


def _finish(
    cfg: dict[str, Any],
    data: TrainingSet,
    prov: dict[str, Any],
    model_out: Path,
    loss_out: Path,
    checkpoint_dir: Path,
    loss_plot: Path | None,
    provenance_table: Path | None,
) -> None:
    """Writes the model file (EMA weights of the final checkpoint), the loss log, its plot and
    the provenance table."""
    loss_log = Path(checkpoint_dir) / "loss.csv"
    state = load_torch(Path(checkpoint_dir) / "last.pt")
    total = int(state["step"])
    kind = data.kind
    model = model_file(cfg, data, state, prov)
    save_torch(model_out, model)
    with atomic_path(loss_out) as tmp:
        tmp.write_bytes(loss_log.read_bytes())
    history = np.loadtxt(loss_log, delimiter=",", skiprows=1, ndmin=2)
    final = history[:, 1]
    if loss_plot is not None:
        mode = cfg["cohort"]["train_mode"]
        loss_curve(
            loss_plot,
            history[:, 0],
            final,
            f"{mode}/{kind} training loss per step",
            ylabel="loss on measured entries" if mode != "clean" else "loss",
        )
    if provenance_table is not None:
        record = {f"version_{k}": v for k, v in prov["versions"].items()}
        record |= {f"input_sha256_{k}": v for k, v in prov["inputs"].items()}
        record |= {"config_sha256": prov["config_sha256"], "steps": total}
        record |= {"mode": cfg["cohort"]["train_mode"], "kind": kind}
        write_table(provenance_table, record)
    log.info("done: %d steps, mean loss of the last 50 steps %.5f", total, final[-50:].mean())


class TensorBoardLog:
    """TensorBoard event files beside the model (``train/tb/``): the loss at every step and,
    at every checkpoint, a grid of prior samples from the EMA weights (a short DDIM run with
    its own seeded generator, so training draws are untouched). Not a declared output:
    event files carry wall times, and the workflow's outputs stay byte-reproducible."""

    SAMPLES = 4
    SAMPLE_STEPS = 20

    def __init__(self, folder: Path, cfg: dict[str, Any], data: TrainingSet) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(folder))
        self.meta = {
            "mode": cfg["cohort"]["train_mode"],
            "kind": data.kind,
            "delta": float(cfg["train"]["delta"]),
            "corrupt": cfg["corrupt"],
        }
        if data.masks is not None and data.kind == "native":
            self.meta["native_line_mask"] = data.masks[0].tolist()
        self.shape = (self.SAMPLES, data.image_channels, *data.image_shape)
        self.ddim = build_ddim(cfg["scheduler"], self.SAMPLE_STEPS)
        self.seed = int(cfg["cohort"]["seed"])

    def loss(self, step: int, value: float) -> None:
        self.writer.add_scalar("train/loss", value, step)

    @torch.no_grad()
    def samples(self, trainer: Trainer) -> None:
        net = trainer.ema.module
        was_training = net.training
        net.eval()
        height, width = self.shape[-2:]
        generator = torch.Generator().manual_seed(derive_seed(self.seed, "tensorboard"))

        def operator(batch: int, step: int):
            return inference_operator(self.meta, batch, height, width, derive_seed(self.seed, step))

        images = sample_prior(
            net, self.ddim, operator, self.shape, generator, device=trainer.device
        )
        magnitudes = images.float().square().sum(dim=1, keepdim=True).sqrt().cpu()
        peak = magnitudes.flatten(1).amax(dim=1).clamp(min=1e-6).view(-1, 1, 1, 1)
        self.writer.add_images("samples", magnitudes / peak, trainer.step)
        net.train(was_training)

    def close(self) -> None:
        self.writer.close()


def prov_keys(prov: dict[str, Any]) -> dict[str, Any]:
    return {"config_sha256": prov["config_sha256"], "inputs": prov["inputs"]}
