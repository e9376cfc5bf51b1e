"""What a training step costs: against MONAI's plain DDPM step, and data-parallel.

1. ``step_ratio``: one training step of each mode (ambient on k-space and on pixels, naive,
   clean; the default config's UNet, batch and image size, on the demo cohort's stores)
   against a plain MONAI DDPM step with the same UNet body and batch: noise, ``add_noise``,
   ``DiffusionModelUNet``, MSE on the noise, Adam. Both are timed in alternating blocks in one
   process, so the machine's noise hits both alike; the ratio is of the medians.
2. ``ddp``: seconds per step of the ambient k-space step under torchrun with 1 and 2 gloo
   processes on CPU (the same global batch; ``--threads`` shared between the processes), and
   the efficiency t_1 / (W · t_W).

    python benchmarks/training.py               # CPU: about 5 minutes
    python benchmarks/training.py --short       # seconds: the test suite's version

Writes benchmarks/results/training.json (training.gpu.json on a GPU) with rows
``{what: "step_ratio", mode, ratio, seconds_per_step, monai_seconds_per_step}`` and
``{what: "ddp", world_size, seconds_per_step, efficiency}``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, demo_slices, load_config, start, write_results  # noqa: E402

from ambient_med.config import stage_config  # noqa: E402
from ambient_med.stages import corrupt  # noqa: E402
from ambient_med.stages.train import (  # noqa: E402
    build_trainer,
    join_process_group,
    load_training_set,
)

MODES = {
    "ambient/kspace": ("ambient", "kspace"),
    "ambient/pixel": ("ambient", "pixel"),
    "naive/kspace": ("naive", "kspace"),
    "clean/kspace": ("clean", "kspace"),
}


def stores(config: dict, work: Path) -> dict[str, Path]:
    """The demo cohort's slice store and its pixel and k-space measurement stores."""
    slices = demo_slices(config, work)
    paths = {"clean": slices}
    for kind in ("kspace", "pixel"):
        paths[kind] = work / f"{kind}.h5"
        if not paths[kind].exists():
            corrupt.run(stage_config(config, "demo", "corrupt"), kind, slices, paths[kind])
    return paths


def train_cfg(config: dict, mode: str, kind: str) -> dict:
    config["cohorts"]["demo"] |= {"train_mode": mode, "corruption": kind}
    return stage_config(config, "demo", "train")


class MonaiStep:
    """The plain MONAI DDPM training step (MONAI's 2-D DDPM tutorial), with the UNet body the
    config builds: image channels in, the same number out (ε-prediction)."""

    def __init__(self, cfg: dict, images: torch.Tensor, batch: int, seed: int) -> None:
        from monai.networks.nets import DiffusionModelUNet
        from monai.networks.schedulers import DDPMScheduler

        model = cfg["model"]
        torch.manual_seed(seed)
        self.unet = DiffusionModelUNet(
            spatial_dims=2,
            in_channels=images.shape[1],
            out_channels=images.shape[1],
            channels=tuple(model["channels"]),
            attention_levels=tuple(model["attention_levels"]),
            num_res_blocks=model["num_res_blocks"],
            norm_num_groups=model["norm_num_groups"],
            num_head_channels=model["num_head_channels"],
            use_flash_attention=True,  # as ambient_med's denoiser: the same attention kernel
        )
        self.scheduler = DDPMScheduler(num_train_timesteps=cfg["scheduler"]["num_train_timesteps"])
        self.optimizer = torch.optim.Adam(self.unet.parameters(), lr=cfg["train"]["lr"])
        self.images, self.batch = images, batch
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self) -> float:
        idx = torch.randint(len(self.images), (self.batch,), generator=self.generator)
        x0 = self.images[idx]
        noise = torch.randn(x0.shape, generator=self.generator)
        t = torch.randint(
            self.scheduler.num_train_timesteps, (self.batch,), generator=self.generator
        )
        noisy = self.scheduler.add_noise(original_samples=x0, noise=noise, timesteps=t)
        loss = torch.nn.functional.mse_loss(self.unet(noisy, timesteps=t), noise)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return float(loss.item())


def seconds_per_step(step, steps: int) -> float:
    began = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - began) / steps


def step_ratios(config: dict, paths: dict[str, Path], steps: int, repeats: int) -> list[dict]:
    rows = []
    device = torch.device("cpu")
    for name, (mode, kind) in MODES.items():
        cfg = train_cfg(config, mode, kind)
        data = load_training_set(cfg, paths["clean" if mode == "clean" else kind])
        ours = build_trainer(cfg, data, device)
        # Images of the same count, channels and size (their content does not change the cost).
        images = torch.randn(len(data), data.image_channels, *data.image_shape)
        monai = MonaiStep(cfg, images, cfg["train"]["batch_size"], seed=0)
        for _ in range(3):  # warm-up: allocator, MKL plans
            ours.train_step()
            monai()
        ours_times, monai_times = [], []
        for _ in range(repeats):
            ours_times.append(seconds_per_step(ours.train_step, steps))
            monai_times.append(seconds_per_step(monai, steps))
        ratio = float(np.median(ours_times) / np.median(monai_times))
        rows.append(
            {
                "what": "step_ratio",
                "mode": name,
                "ratio": round(ratio, 3),
                "seconds_per_step": round(float(np.median(ours_times)), 4),
                "monai_seconds_per_step": round(float(np.median(monai_times)), 4),
            }
        )
        print(rows[-1], flush=True)
    return rows


def ddp_worker(config: dict, paths: dict[str, Path], steps: int, out: Path) -> None:
    """One torchrun process: times ``steps`` ambient k-space steps after a warm-up; rank 0
    writes the seconds per step to ``out``."""
    cfg = train_cfg(config, "ambient", "kspace")
    group = join_process_group("cpu")
    trainer = build_trainer(cfg, load_training_set(cfg, paths["kspace"]), group.device, group)
    for _ in range(3):
        trainer.train_step()
    group.barrier()
    seconds = seconds_per_step(trainer.train_step, steps)
    if group.writes:
        out.write_text(json.dumps({"world_size": group.world_size, "seconds": seconds}))
    if group.world_size > 1:
        torch.distributed.destroy_process_group()


def ddp_rows(argv: list[str], work: Path, threads: int, sizes: list[int]) -> list[dict]:
    rows, base = [], None
    for world_size in sizes:
        out = work / f"ddp{world_size}.json"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        command += ["--nproc-per-node", str(world_size), __file__, *argv, "--ddp-worker", str(out)]
        env = os.environ | {"OMP_NUM_THREADS": str(max(1, threads // world_size))}
        subprocess.run(command, check=True, env=env)
        seconds = json.loads(out.read_text())["seconds"]
        base = base or seconds
        rows.append(
            {
                "what": "ddp",
                "world_size": world_size,
                "seconds_per_step": round(seconds, 4),
                "efficiency": round(base / (world_size * seconds), 3),
            }
        )
        print(rows[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> Path | None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=Path("config/config.yaml"))
    parser.add_argument("--workdir", type=Path, default=Path("benchmarks/work/training"))
    parser.add_argument("--results", type=Path, default=None, help="default: benchmarks/results")
    parser.add_argument("--steps", type=int, default=5, help="steps per timed block")
    parser.add_argument("--repeats", type=int, default=12, help="timed blocks per side")
    parser.add_argument("--ddp-steps", type=int, default=30)
    parser.add_argument("--world-sizes", type=int, nargs="*", default=[1, 2])
    parser.add_argument("--short", action="store_true", help="tiny config, seconds")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ddp-worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    config = load_config(args.config, Path("config/tiny.yaml") if args.short else None)
    config["train"]["device"] = "cpu"
    if args.ddp_worker is not None:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        ddp_worker(config, stores(config, args.workdir), args.ddp_steps, args.ddp_worker)
        return None
    started = start(args.threads)
    args.workdir.mkdir(parents=True, exist_ok=True)
    paths = stores(config, args.workdir)
    rows = step_ratios(config, paths, args.steps, args.repeats)
    rows += ddp_rows(argv, args.workdir, args.threads, args.world_sizes)
    path = write_results("training", started, rows, args.results or RESULTS)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
