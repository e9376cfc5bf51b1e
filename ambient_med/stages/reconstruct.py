"""Rule `reconstruct`: undersampled hold-out scans → reconstructions, with honest baselines.

For every hold-out volume of the cohort, each configured acceleration R is applied
retrospectively by the shared simulator (``ambient_med.physics.acquisition``): each slice
gets its subject's smooth phase, then 1-D Cartesian lines; single-coil, or multi-coil with
simulated birdcage sensitivities when ``reconstruct.coils > 1``; optional complex Gaussian
noise. The same
measurements are then reconstructed by:

- ``zero_filled``: |A^H y|;
- ``cs_l1``: L1-wavelet compressed sensing (sigpy), λ chosen on training-subject slices;
- ``diffusion_<sampler>``: the trained model as a prior — ``dc`` (data consistency, no
  gradient through the network), ``dps`` (Ambient DPS) and ``one_step``.

With ``reconstruct.input`` set, every raw k-space file of that folder (new undersampled
scans, fastMRI HDF5 or ISMRMRD) is also reconstructed as acquired, without a reference.

Writes, under ``reconstruct/files/``: one NIfTI per volume, method and R (the volume's
grid affine), a derived DICOM series of the first diffusion sampler per volume and R, and a
PNG panel per R (reference | zero-filled | CS | diffusion, with error maps); and
``reconstruct/metrics.json``: flat keys ``{method}_R{R}_{psnr,ssim,ssim_fg,nrmse}`` (per
volume as fastMRI computes them, then the mean over hold-out volumes; magnitudes against the
magnitude reference), ``..._std`` (spread over volumes), ``{method}_R{R}_seconds_per_slice``
and ``holdout_volumes``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ambient_med.diffusion.model import build_ddim
from ambient_med.diffusion.samplers import one_step_reconstruction, posterior_sample
from ambient_med.diffusion.training import inference_operator
from ambient_med.errors import AmbientMedError
from ambient_med.evaluation.figures import recon_panel
from ambient_med.evaluation.metrics import METRICS, per_volume_metrics
from ambient_med.io.export import write_derived_series, write_png_grid, write_slice_volume
from ambient_med.io.kspace import calibrate, fit_kspace, is_raw, read_raw
from ambient_med.io.store import atomic_path, read_slices
from ambient_med.physics.acquisition import Acquisition
from ambient_med.physics.masks import derive_seed, further_kspace_mask
from ambient_med.physics.operators import (
    Identity,
    MaskedOperator,
    MultiCoilSense,
    RealImage,
    SingleCoilFourier,
)
from ambient_med.physics.recon import choose_lambda, l1_wavelet
from ambient_med.stages.common import (
    example_keys,
    load_model,
    magnitude,
    slice_identity,
    spread_rows,
)

log = logging.getLogger(__name__)


def acquisition(rc: dict[str, Any], acceleration: float, size: int, seed: int) -> Acquisition:
    """The simulated acquisition of the ``reconstruct`` config section at one R."""
    return Acquisition(
        acceleration,
        rc["center_fraction"],
        rc["mask_type"],
        size,
        seed,
        coils=rc["coils"],
        noise_sigma=rc["noise_sigma"],
    )


def network_operator_factory(
    meta: dict[str, Any], rc: dict[str, Any], op: MaskedOperator, seed: int
):
    """Ã_inf for the network while reconstructing, per ``reconstruct.inference_mask``:
    ``fixed`` (one training-style mask per slice, kept — A-DPS), ``fresh`` (a new one at
    every step) or ``scan`` (B drawn on the scan's own acquired lines, kept). Returns
    ``(factory(batch, step) -> operator, redraw every step?)``."""
    size = int(meta["image_size"])
    choice = rc["inference_mask"]
    lines = getattr(op, "line_mask", None)
    if (
        choice == "scan"
        and meta["mode"] == "ambient"
        and meta["kind"] == "kspace"
        and (lines is not None and lines.ndim == 2)
    ):

        def from_scan(b: int, step: int) -> MaskedOperator:
            generator = torch.Generator().manual_seed(derive_seed(seed, "recon-op", step))
            return SingleCoilFourier(further_kspace_mask(lines.bool(), generator), size)

        return from_scan, False

    def training_style(b: int, step: int) -> MaskedOperator:
        return inference_operator(meta, b, size, size, derive_seed(seed, "recon-op", step))

    return training_style, choice == "fresh"


def _diffusion(net, meta, rc, op, y, seed, sampler) -> tuple[np.ndarray, np.ndarray | None]:
    """Magnitude reconstructions of a batch with the model as prior: the mean of
    ``reconstruct.posterior_samples`` samples, and their per-pixel standard deviation of
    magnitudes (``None`` for one sample or the deterministic one-step method)."""
    size = int(meta["image_size"])
    channels = int(meta["image_channels"])
    model_op = RealImage(op) if channels == 1 else op
    batch = y.shape[0]
    if sampler == "one_step":
        mask_op = model_op if meta["mode"] == "ambient" else Identity(batch, size, size)
        return magnitude(one_step_reconstruction(net, model_op, y, rc["t_min"], mask_op)), None
    ddim = build_ddim(meta["scheduler"], rc["steps"])
    make_operator, redraw = network_operator_factory(meta, rc, op, seed)
    draws = []
    for k in range(rc["posterior_samples"]):
        generator = torch.Generator().manual_seed(derive_seed(seed, "recon", sampler, k))
        draws.append(
            posterior_sample(
                net,
                ddim,
                make_operator,
                model_op,
                y,
                (batch, channels, size, size),
                generator,
                method=sampler,
                zeta=rc["zeta"],
                redraw_mask=redraw,
            )
        )
    # The posterior mean is an average of data-consistent images, hence data-consistent.
    mean = magnitude(torch.stack(draws).mean(dim=0))
    spread = np.stack([magnitude(d) for d in draws]).std(axis=0) if len(draws) > 1 else None
    return mean, spread


def _panel(path: Path, columns: list[tuple[str, np.ndarray]], reference: np.ndarray) -> None:
    """PNG: top row images, bottom row |error| ×5 against the reference (first column),
    with colour bars and each method's PSNR on this slice. Without a fully sampled
    reference (new scans: the first column is zero-filled), differences and no PSNR."""
    recon_panel(path, columns, reference, error_gain=5.0, scored=columns[0][0] == "reference")
    with atomic_path(path.with_suffix(".txt")) as tmp:
        tmp.write_text(" | ".join(name for name, _ in columns) + "\n(bottom row: |error| x5)\n")


def baselines(
    acq: Acquisition,
    op: MaskedOperator,
    y: torch.Tensor,
    validation: tuple[MaskedOperator, torch.Tensor, np.ndarray],
    lambdas: list[float],
) -> tuple[dict[str, np.ndarray], dict[str, float], float]:
    """Zero-filled and L1-wavelet CS reconstructions of ``y``, λ chosen on ``validation``
    (operator, measurements and magnitude references of training-subject slices, never the
    hold-out).

    Returns:
        ({method: (N, H, W) magnitudes}, {method: seconds per slice}, chosen λ).
    """
    n = y.shape[0]
    start = time.perf_counter()
    results = {"zero_filled": magnitude(op.A_adjoint(y))}
    seconds = {"zero_filled": (time.perf_counter() - start) / n}
    val_op, val_y, val_images = validation

    def cs(i: int, lamda: float, op_=val_op, y_=val_y) -> np.ndarray:
        return np.abs(l1_wavelet(*acq.numpy_kspace(op_, y_, i), lamda))

    lamda, _ = choose_lambda(cs, list(val_images), lambdas)
    start = time.perf_counter()
    results["cs_l1"] = np.stack([cs(i, lamda, op, y) for i in range(n)]).astype(np.float32)
    seconds["cs_l1"] = (time.perf_counter() - start) / n
    return results, seconds, lamda


def undersample(
    acq: Acquisition, store, rows: np.ndarray, keys: list[str], noise_key: str
) -> tuple[MaskedOperator, torch.Tensor]:
    """(A, y) of the store rows ``rows``: each slice with its subject's phase, its own mask."""
    op = acq.operator([keys[r] for r in rows])
    subjects, slice_index = slice_identity(store, rows)
    return op, acq.measure(op, store.images[rows], subjects, slice_index, noise_key)


def retrospective(
    rc: dict[str, Any],
    acceleration: float,
    store,
    holdout: np.ndarray,
    validation: np.ndarray,
    keys: list[str],
    seed: int,
):
    """Undersamples the hold-out rows of ``store`` at one acceleration and runs the baselines.

    Returns:
        (A, y, {method: magnitudes}, {method: seconds per slice}, CS λ) — the diffusion
        methods then reconstruct the same ``y`` with the same ``A``.
    """
    tag = f"R{acceleration:g}"
    acq = acquisition(rc, acceleration, store.images.shape[-1], seed)
    op, y = undersample(acq, store, holdout, keys, f"holdout-{tag}")
    val_op, val_y = undersample(acq, store, validation, keys, f"validation-{tag}")
    val = (val_op, val_y, store.images[validation])
    results, seconds, lamda = baselines(acq, op, y, val, list(rc["cs_lambdas"]))
    return op, y, results, seconds, lamda


def diffusion_methods(
    net,
    meta: dict[str, Any],
    rc: dict[str, Any],
    op: MaskedOperator,
    y: torch.Tensor,
    seed: int,
    uncertainty: dict[str, np.ndarray] | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Reconstructions of ``y`` with each configured sampler, batched. When
    ``uncertainty`` is given, it receives each sampler's per-pixel standard deviation over
    its posterior samples (samplers with more than one sample only)."""
    results, seconds = {}, {}
    n = y.shape[0]
    for sampler in rc["samplers"]:
        start = time.perf_counter()
        parts = [
            _diffusion(net, meta, rc, _subset(op, b), y[b], seed, sampler)
            for b in _batches(n, rc["batch_size"])
        ]
        name = f"diffusion_{sampler}"
        results[name] = np.concatenate([mean for mean, _ in parts])
        seconds[name] = (time.perf_counter() - start) / n
        if uncertainty is not None and parts[0][1] is not None:
            uncertainty[name] = np.concatenate([spread for _, spread in parts])
    return results, seconds


def reconstruct_new_files(
    net, meta: dict[str, Any], cfg: dict[str, Any], folder: Path, files_dir: Path
) -> int:
    """Reconstructs every raw k-space file of ``folder`` as acquired (no reference exists).

    Each file is prepared exactly as ingest prepares training data (centre crop to the
    model's size, ESPIRiT maps from the ACS lines, the ACS-based scaling), then reconstructed
    by zero-filling, CS (the middle candidate λ: there is no reference to choose it on) and
    the diffusion samplers. Outputs: NIfTI per method, a derived DICOM series of the first
    sampler, a PNG panel (zero-filled | CS | samplers). Returns the number of files.
    """
    rc = cfg["reconstruct"]
    seed = cfg["cohort"]["seed"]
    size = int(meta["image_size"])
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file() and is_raw(p))
    if not files:
        raise AmbientMedError(f"config key 'reconstruct.input': no raw k-space file in '{folder}'")
    lamda = sorted(rc["cs_lambdas"])[len(rc["cs_lambdas"]) // 2]
    samplers = list(rc["samplers"])
    for number, path in enumerate(files):
        raw = read_raw(path, 10**10)
        kspace, lines = fit_kspace(raw.kspace, raw.line_mask, size)
        ingest = cfg["ingest"]
        maps, kspace, _ = calibrate(
            kspace,
            lines,
            0.0,
            path.name,
            ingest["intensity_percentile"],
            ingest["intensity_band"],
        )
        op = MultiCoilSense(torch.from_numpy(lines), torch.from_numpy(maps))
        y = torch.view_as_real(torch.from_numpy(kspace)).float()
        results = {"zero_filled": magnitude(op.A_adjoint(y))}
        results["cs_l1"] = np.stack(
            [np.abs(l1_wavelet(kspace[s], maps[s], lines[s], lamda)) for s in range(len(kspace))]
        ).astype(np.float32)
        learned, _ = diffusion_methods(net, meta, rc, op, y, seed)
        results |= learned
        name = f"new{number:03d}"
        for method, images in results.items():
            write_slice_volume(files_dir / f"{name}_{method}.nii.gz", images, np.eye(4))
        primary = f"diffusion_{samplers[0]}" if samplers else "cs_l1"
        write_derived_series(
            files_dir / f"{name}_{primary}_dicom",
            results[primary],
            np.eye(4),
            name,
            f"ambient-med {primary}",
            f"{seed}/{name}/{primary}",
        )
        middle = len(kspace) // 2
        columns = [(m, images[middle]) for m, images in results.items()]
        _panel(files_dir / f"panel_{name}.png", columns, results["zero_filled"][middle])
        log.info("%s: %d slices reconstructed (%s)", name, len(kspace), path.name)
    return len(files)


def run(
    cfg: dict[str, Any], model_path: Path, slices_path: Path, files_dir: Path, metrics_out: Path
) -> None:
    net, meta = load_model(model_path)
    rc = cfg["reconstruct"]
    seed = cfg["cohort"]["seed"]
    files_dir = Path(files_dir)
    files_dir.mkdir(parents=True, exist_ok=True)
    metrics: dict[str, Any] = {
        "cohort": cfg["cohort"]["name"],
        "model_mode": meta["mode"],
        "model_kind": meta["kind"],
        "coils": rc["coils"],
        "noise_sigma": rc["noise_sigma"],
        "holdout_slices": 0,
    }
    if rc["input"]:
        metrics["new_files"] = reconstruct_new_files(net, meta, cfg, Path(rc["input"]), files_dir)
    store = read_slices(slices_path)
    holdout = spread_rows(store.index.rows("holdout"), rc["max_slices"])
    if meta["kind"] == "native" or len(holdout) == 0:
        # Undersampled raw cohorts have no clean reference to undersample and compare with.
        log.info("no clean hold-out slice: retrospective reconstruction skipped")
        with atomic_path(metrics_out) as tmp:
            tmp.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
        return
    keys = example_keys(store.index.subjects, store.index.subject, store.index.slice_index)
    validation = spread_rows(store.index.rows("train"), rc["validation_slices"])
    reference = store.images[holdout]
    volumes = store.index.subject[holdout]
    samplers = list(rc["samplers"])
    metrics["holdout_slices"] = len(holdout)
    metrics["holdout_volumes"] = len(np.unique(volumes))
    for acceleration in rc["accelerations"]:
        tag = f"R{acceleration:g}"
        op, y, results, seconds, lamda = retrospective(
            rc, acceleration, store, holdout, validation, keys, seed
        )
        metrics[f"cs_l1_{tag}_lambda"] = lamda
        spread: dict[str, np.ndarray] = {}
        learned, learned_seconds = diffusion_methods(net, meta, rc, op, y, seed, spread)
        results |= learned
        seconds |= learned_seconds
        for method, images in results.items():
            per_volume = per_volume_metrics(reference, images, volumes)
            for name in METRICS:
                values = np.array([scores[name] for scores in per_volume.values()])
                metrics[f"{method}_{tag}_{name}"] = float(values.mean())
                metrics[f"{method}_{tag}_{name}_std"] = float(values.std())
            metrics[f"{method}_{tag}_seconds_per_slice"] = seconds[method]
            log.info(
                "%s %s: PSNR %.2f dB, SSIM %.3f (foreground %.3f), NRMSE %.3f, %.2f s/slice",
                tag,
                method,
                metrics[f"{method}_{tag}_psnr"],
                metrics[f"{method}_{tag}_ssim"],
                metrics[f"{method}_{tag}_ssim_fg"],
                metrics[f"{method}_{tag}_nrmse"],
                seconds[method],
            )
        _write_volumes(files_dir, store, holdout, results, tag, samplers, seed)
        if spread:
            # Posterior standard deviation beside each reconstruction: NIfTI per volume and
            # a PNG grid (one row per sampler, evenly spaced slices).
            maps = {f"{method}_std": values for method, values in spread.items()}
            _write_volumes(files_dir, store, holdout, maps, tag, [], seed, dicom=False)
            picks = spread_rows(np.arange(len(holdout)), 4)
            tiles = np.concatenate([values[picks] for values in spread.values()])
            write_png_grid(files_dir / f"uncertainty_{tag}.png", tiles, columns=len(picks))
        middle = len(holdout) // 2
        columns = [("reference", reference[middle])]
        columns += [(m, results[m][middle]) for m in ("zero_filled", "cs_l1")]
        columns += [(f"diffusion_{s}", results[f"diffusion_{s}"][middle]) for s in samplers]
        _panel(files_dir / f"panel_{tag}.png", columns, reference[middle])
    with atomic_path(metrics_out) as tmp:
        tmp.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")


def _batches(n: int, size: int) -> list[np.ndarray]:
    return [np.arange(s, min(n, s + size)) for s in range(0, n, size)]


def _subset(op: MaskedOperator, idx: np.ndarray) -> MaskedOperator:
    index = torch.from_numpy(idx)
    if isinstance(op, MultiCoilSense):
        return MultiCoilSense(op.line_mask[index], op.maps[index])
    return SingleCoilFourier(op.line_mask[index], op.height)


def _write_volumes(files_dir, store, rows, results, tag, samplers, seed, dicom=True) -> None:
    """NIfTI per volume and method; a derived DICOM series of the first diffusion sampler
    (unless ``dicom`` is false)."""
    volumes = store.index.subject[rows]
    for v in np.unique(volumes):
        picked = np.flatnonzero(volumes == v)
        k = store.index.slice_index[rows[picked]]
        # The volume's grid, starting at its first reconstructed slice.
        affine = store.index.affines[v].copy()
        affine[:3, 3] = (affine @ np.array([0.0, 0.0, float(k.min()), 1.0]))[:3]
        if len(k) > 1:
            affine[:3, 2] = affine[:3, 2] * float(np.median(np.diff(np.sort(k))))
        subject = store.index.subjects[v]
        name = f"{subject}_vol{v:03d}_{tag}"
        for method, images in results.items():
            write_slice_volume(files_dir / f"{name}_{method}.nii.gz", images[picked], affine)
        if not dicom:
            continue
        primary = f"diffusion_{samplers[0]}" if samplers else "cs_l1"
        write_derived_series(
            files_dir / f"{name}_{primary}_dicom",
            results[primary][picked],
            affine,
            subject,
            f"ambient-med {primary} {tag}",
            f"{seed}/{subject}/{v}/{tag}/{primary}",
        )
