"""What the three training modes see, and one seeded, resumable optimisation loop."""

from __future__ import annotations

import math
from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ambient_med.diffusion.losses import AmbientObjective
from ambient_med.errors import AmbientMedError
from ambient_med.physics.masks import (
    LineMaskFunc,
    acs_lines,
    derive_seed,
    further_kspace_mask,
    further_pixel_mask,
    pixel_mask,
)
from ambient_med.physics.operators import (
    Identity,
    MaskedOperator,
    MultiCoilSense,
    PixelMask,
    SingleCoilFourier,
    mirror_rows,
    rotate_phase,
)

MODES = ("ambient", "naive", "clean")


def image_channels(kind: str) -> int:
    """Real images for pixel masking, complex (2 channels) for every k-space kind."""
    return 1 if kind == "pixel" else 2


def measurement_operator(
    kind: str, mask: torch.Tensor, height: int, maps: torch.Tensor | None = None
) -> MaskedOperator:
    """A of a batch from stored masks: ``(B, H, W)`` pixel or ``(B, W)`` line masks; with
    ``maps`` ``(B, coils, H, W)`` (kind ``native``), the multi-coil SENSE operator."""
    if kind == "pixel":
        return PixelMask(mask.bool()[:, None])
    if maps is not None:
        return MultiCoilSense(mask.bool(), maps)
    return SingleCoilFourier(mask.bool(), height)


@dataclass
class TrainingSet:
    """Training examples of one mode (docs/method.md).

    Attributes:
        targets: what the loss compares A x̂0 with: measurements y (ambient), the zero-filled
            A^H y (naive) or clean x0 (clean); ``(N, C, H, W)``, or ``(N, coils, H, W, 2)``
            for native multi-coil measurements.
        kind: ``"pixel"``, ``"kspace"`` or ``"native"``.
        mode: ``"ambient"``, ``"naive"`` or ``"clean"``.
        masks: A's masks (ambient only): ``(N, H, W)`` pixel or ``(N, W)`` line masks.
        further_masks: Ã = B A's masks when B is fixed per example (ambient only).
        maps: coil sensitivity maps ``(N, coils, H, W)`` complex (native ambient only).
        delta: pixel-mode probability that B hides an observed pixel.
        further_acceleration: k-space: Ã samples at R + k, k uniform in this ``(low, high)``.
    """

    targets: torch.Tensor
    kind: str
    mode: str
    masks: torch.Tensor | None = None
    further_masks: torch.Tensor | None = None
    maps: torch.Tensor | None = None
    delta: float = 0.1
    further_acceleration: tuple[float, float] = (1.0, 1.0)

    @property
    def image_channels(self) -> int:
        return image_channels(self.kind)

    @property
    def image_shape(self) -> tuple[int, int]:
        """(H, W) of the images the network works on."""
        if self.maps is not None:
            return int(self.maps.shape[-2]), int(self.maps.shape[-1])
        return int(self.targets.shape[-2]), int(self.targets.shape[-1])

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    @property
    def row_dim(self) -> int:
        """The targets' axis of image rows H (the readout direction of k-space kinds)."""
        return -3 if self.kind == "native" and self.mode == "ambient" else -2

    @property
    def complex_dim(self) -> int:
        """The targets' (real, imaginary) axis: last for native multi-coil measurements,
        else the channels."""
        return -1 if self.kind == "native" and self.mode == "ambient" else 1

    def subset(self, idx: torch.Tensor | np.ndarray) -> TrainingSet:
        """The examples ``idx`` (targets, masks and maps alike)."""

        def pick(value: torch.Tensor | None) -> torch.Tensor | None:
            return None if value is None else value[idx]

        return replace(
            self,
            targets=self.targets[idx],
            masks=pick(self.masks),
            further_masks=pick(self.further_masks),
            maps=pick(self.maps),
        )

    def batch(
        self,
        idx: torch.Tensor,
        generator: torch.Generator,
        device: torch.device | str,
        shard: slice = slice(None),
        mirrored: torch.Tensor | None = None,
        angles: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, MaskedOperator, MaskedOperator]:
        """(targets, A, Ã) of the examples ``idx[shard]``; B is redrawn from ``generator``
        unless fixed.

        B is drawn for every example of ``idx`` before ``shard`` is taken, so that every
        data-parallel rank consumes the generator exactly as a single process would.
        ``mirrored`` ``(len(idx),)`` bool: examples mirrored along their rows
        (:func:`~ambient_med.physics.operators.mirror_rows`), targets, 2-D masks and coil
        maps together (line masks over columns need nothing). ``angles`` ``(len(idx),)``:
        each example's targets times ``exp(i angle)``
        (:func:`~ambient_med.physics.operators.rotate_phase`; masks and maps need nothing).
        """
        targets = self.targets[idx[shard]]
        if mirrored is not None:
            targets = mirrored_where(targets, mirrored[shard], self.row_dim)
        if angles is not None:
            targets = rotate_phase(targets, angles[shard], self.complex_dim)
        targets = targets.to(device)
        b, (h, w) = len(range(len(idx))[shard]), self.image_shape
        if self.mode != "ambient":
            identity = Identity(b, h, w, device)
            return targets, identity, identity
        assert self.masks is not None
        mask = self.masks[idx]
        fixed = self.further_masks[idx] if self.further_masks is not None else None
        if mirrored is not None and mask.ndim == 3:
            mask = mirrored_where(mask, mirrored, -2)
            fixed = None if fixed is None else mirrored_where(fixed, mirrored, -2)
        if fixed is not None:
            tilde = fixed
        else:
            tilde = _draw_further(self.kind, mask, self.delta, generator, self.further_acceleration)
        maps = self.maps[idx[shard]] if self.maps is not None else None
        if maps is not None and mirrored is not None:
            maps = mirrored_where(maps, mirrored[shard], -2)
        maps = maps.to(device) if maps is not None else None
        mask, tilde = mask[shard].to(device), tilde[shard].to(device)
        op = measurement_operator(self.kind, mask, h, maps)
        return targets, op, measurement_operator(self.kind, tilde, h, maps)


def unmeasured_scale(data: TrainingSet, fallback: float) -> float:
    """RMS of the training measurements on the entries B may hide (``model.unmeasured_scale:
    auto``): the typical size of what the denoiser predicts where Ã measured nothing.

    Pixel masks: the observed pixels. k-space: the acquired non-calibration lines (B never
    hides calibration lines), per real entry; native multi-coil data: summed over coils, the
    size of the image's own k-space there. ``fallback`` (σ_d) for modes other than ambient,
    whose Ã hides nothing, and for data without such entries.
    """
    if data.mode != "ambient" or data.masks is None:
        return fallback
    y = data.targets.double()
    if data.kind == "pixel":
        hidable = data.masks.bool()[:, None].expand_as(y)
        energy, count = y.square()[hidable].sum(), hidable.sum()
    else:
        lines = data.masks.bool() & ~acs_lines(data.masks.bool())  # (N, W)
        if data.maps is not None:  # (N, coils, H, W, 2): the coil-combined energy per entry
            per_column = y.square().sum(dim=(1, 2, 4)) / 2  # (N, W)
        else:  # (N, 2, H, W): both parts
            per_column = y.square().sum(dim=(1, 2)) / 2
        energy = per_column[lines].sum()
        count = lines.sum() * y.shape[-3 if data.maps is not None else -2]
    if count == 0 or energy <= 0:
        return fallback
    return float((energy / count).sqrt())


def concatenate(parts: list[TrainingSet], names: list[str]) -> TrainingSet:
    """One training set from several cohorts' sets of the same mode and kind (a pool).

    Raises:
        AmbientMedError: when the parts cannot share a batch (image size, coil count), naming
            the first part that differs (``names``: one label per part).
    """
    first = parts[0]
    for part, name in zip(parts[1:], names[1:], strict=True):
        if part.targets.shape[1:] != first.targets.shape[1:]:
            raise AmbientMedError(
                f"pooled store '{name}': examples of shape {tuple(part.targets.shape[1:])}, "
                f"'{names[0]}' has {tuple(first.targets.shape[1:])} (coil counts or image sizes "
                "differ)"
            )

    def join(field: str) -> torch.Tensor | None:
        values = [getattr(p, field) for p in parts]
        return None if values[0] is None else torch.cat(values)

    return replace(
        first,
        targets=join("targets"),
        masks=join("masks"),
        further_masks=join("further_masks"),
        maps=join("maps"),
    )


def mirrored_where(data: torch.Tensor, mirrored: torch.Tensor, dim: int) -> torch.Tensor:
    """``data`` ``(N, ...)`` with the examples flagged in ``mirrored`` ``(N,)`` mirrored along
    ``dim`` (:func:`~ambient_med.physics.operators.mirror_rows`), the others as they are."""
    flags = mirrored.to(data.device).view(-1, *([1] * (data.ndim - 1)))
    return torch.where(flags, mirror_rows(data, dim), data)


def _draw_further(
    kind: str,
    mask: torch.Tensor,
    delta: float,
    generator: torch.Generator,
    further_acceleration: tuple[float, float] = (1.0, 1.0),
) -> torch.Tensor:
    if kind == "pixel":
        return further_pixel_mask(mask.bool()[:, None], delta, generator)[:, 0]
    return further_kspace_mask(mask.bool(), generator, further_acceleration)


def fixed_further_masks(
    kind: str,
    masks: torch.Tensor,
    example_keys: list[str],
    delta: float,
    seed: int,
    further_acceleration: tuple[float, float] = (1.0, 1.0),
) -> torch.Tensor:
    """Ã masks fixed per example, each seeded by (cohort seed, example key) as published."""
    rows = []
    for n, key in enumerate(example_keys):
        generator = torch.Generator().manual_seed(derive_seed(seed, "further", key))
        rows.append(_draw_further(kind, masks[n : n + 1], delta, generator, further_acceleration))
    return torch.cat(rows)


def inference_operator(
    meta: Mapping[str, Any],
    batch: int,
    height: int,
    width: int,
    seed: int,
    maps: torch.Tensor | None = None,
) -> MaskedOperator:
    """Ã_inf of the training kind (docs/samplers.md); the identity for `clean` and `naive`.

    ``meta`` holds ``mode``, ``kind``, ``delta``, the ``corrupt`` config section used at
    training time and, for native data, ``native_line_mask`` (an acquired mask of the
    training data, redrawn here through B). Native models use ``maps`` ``(batch, coils, H, W)``
    when given, else a single-coil Fourier operator. Seeded: same seed, same operator.
    """
    if meta["mode"] != "ambient":
        return Identity(batch, height, width)
    generator = torch.Generator().manual_seed(seed)
    corrupt = meta["corrupt"]
    if meta["kind"] == "native":
        native = torch.tensor(meta["native_line_mask"], dtype=torch.bool)
        tilde = _draw_further("native", native.expand(batch, -1), 0.0, generator)
        return measurement_operator("native", tilde, height, maps)
    if meta["kind"] == "pixel":
        keep = [
            pixel_mask((height, width), corrupt["pixel"]["p"], derive_seed(seed, i))
            for i in range(batch)
        ]
        mask = torch.from_numpy(np.stack(keep))
    else:
        kspace = corrupt["kspace"]
        func = LineMaskFunc(
            [kspace["center_fraction"]], [kspace["acceleration"]], kspace["mask_type"]
        )
        mask = torch.from_numpy(np.stack([func(width, derive_seed(seed, i)) for i in range(batch)]))
    return measurement_operator(
        meta["kind"], _draw_further(meta["kind"], mask, meta["delta"], generator), height
    )


class Trainer:
    """Adam + EMA over :class:`AmbientObjective`; every random draw comes from one generator.

    The generator, weights, EMA and optimizer state are all in :meth:`state_dict`, so a run
    resumed from a checkpoint continues exactly as if it had not been interrupted.

    Data-parallel (``world_size`` > 1, inside an initialised ``torch.distributed`` process
    group): the network is wrapped in DistributedDataParallel and every rank draws the whole
    global batch of ``batch_size`` examples (indices, B, timesteps, noise) from the same seeded
    generator, then trains on its own contiguous ``batch_size / world_size`` of them. The
    gradient DDP averages is then the single-process gradient of the same global batch (the
    loss is a mean over examples), so a run depends on the seed and not on how many processes
    share it, up to floating-point summation order.

    ``mirror``: each example is mirrored along its rows with probability 1/2
    (``train.mirror_rows``). ``rotate``: each complex example is multiplied by a global phase
    ``exp(iθ)``, θ uniform in [0, 2π) (``train.rotate_phase``).
    """

    def __init__(
        self,
        net: nn.Module,
        objective: AmbientObjective,
        data: TrainingSet,
        batch_size: int,
        lr: float,
        ema_decay: float,
        seed: int,
        device: torch.device | str = "cpu",
        rank: int = 0,
        world_size: int = 1,
        mirror: bool = False,
        rotate: bool = False,
    ) -> None:
        if batch_size % world_size:
            raise ValueError(f"batch size {batch_size} is not divisible by {world_size} ranks")
        if rotate and data.image_channels != 2:
            raise ValueError("a global phase needs complex images (a k-space kind)")
        self.device = torch.device(device)
        self.module = net.to(self.device)
        self.net: nn.Module = self.module
        if world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = DistributedDataParallel(self.module, device_ids=ids)
        self.rank, self.world_size = rank, world_size
        self.objective = objective
        self.data = data
        self.batch_size = batch_size
        self.num_timesteps = int(objective.alphas_cumprod.shape[0])
        self.optimizer = torch.optim.Adam(self.module.parameters(), lr=lr)
        self.ema = AveragedModel(
            self.module, multi_avg_fn=get_ema_multi_avg_fn(ema_decay), use_buffers=True
        )
        self.generator = torch.Generator().manual_seed(seed)
        self.mirror, self.rotate = mirror, rotate
        self.step = 0

    def _autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    def train_step(self) -> float:
        """One optimisation step on a random batch; returns the loss (of the global batch,
        averaged over ranks)."""
        local = self.batch_size // self.world_size
        shard = slice(self.rank * local, (self.rank + 1) * local)
        idx = torch.randint(len(self.data), (self.batch_size,), generator=self.generator)
        mirrored = None
        if self.mirror:
            # Augmentation: half the examples mirrored along the rows (the readout axis),
            # measurements and operator alike, so each stays a measurement of an image.
            mirrored = torch.rand(self.batch_size, generator=self.generator) < 0.5
        angles = None
        if self.rotate:
            # Augmentation: a global phase per example. Real scans carry arbitrary receive and
            # B0 phase; without it a prior's DC gain moved by up to 1 dB with e^{iθ}
            # (benchmarks/results/phase_rotation.json).
            angles = 2 * math.pi * torch.rand(self.batch_size, generator=self.generator)
        y, op, op_tilde = self.data.batch(idx, self.generator, self.device, shard, mirrored, angles)
        t = self.objective.sample_timesteps(self.batch_size, self.generator)[shard]
        shape = (self.batch_size, self.data.image_channels, *self.data.image_shape)
        noise = torch.randn(shape, generator=self.generator)[shard].to(self.device)
        self.net.train()
        with self._autocast():
            loss, _ = self.objective(self.net, y, op, op_tilde, t.to(self.device), noise)
        value = loss.detach().float()
        if self.world_size > 1:
            torch.distributed.all_reduce(value)
            value /= self.world_size
        if not math.isfinite(value.item()):
            raise FloatingPointError(f"training loss became {value.item()} at step {self.step}")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.ema.update_parameters(self.module)
        self.step += 1
        return float(value.item())

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "model": self.module.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.module.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.step = int(state["step"])


def ema_weights(checkpoint: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The EMA network's weights (as used for sampling and evaluation) from a
    :meth:`Trainer.state_dict`: ``AveragedModel`` keeps them under ``module.``."""
    prefix = "module."
    return {k[len(prefix) :]: v for k, v in checkpoint["ema"].items() if k.startswith(prefix)}
