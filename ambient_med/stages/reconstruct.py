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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ambient_med.diffusion.model import build_ddim, sigma_of
from ambient_med.diffusion.samplers import (
    FINAL_SENSE_DAMPING,
    PROJECTION_ROUNDS,
    ImageProjection,
    one_step_reconstruction,
    posterior_sample,
)
from ambient_med.diffusion.training import inference_operator
from ambient_med.errors import AmbientMedError
from ambient_med.evaluation.figures import recon_panel
from ambient_med.evaluation.metrics import METRICS, per_volume_metrics
from ambient_med.io.export import write_derived_series, write_png_grid, write_slice_volume
from ambient_med.io.kspace import calibrate, fit_kspace, is_raw, read_raw
from ambient_med.io.store import atomic_path, read_slices
from ambient_med.physics.acquisition import Acquisition
from ambient_med.physics.masks import (
    acs_lines,
    derive_seed,
    further_kspace_mask,
    further_pixel_mask,
)
from ambient_med.physics.operators import (
    Identity,
    MaskedOperator,
    MultiCoilSense,
    PixelMask,
    RealImage,
    SingleCoilFourier,
    alternate_projections,
    data_consistent,
)
from ambient_med.physics.recon import (
    acs_hann_phase,
    calibration_phase,
    choose_lambda,
    l1_wavelet,
    phase_project,
)
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
    if choice == "scan" and meta["mode"] == "ambient":
        if meta["kind"] in ("kspace", "native") and lines is not None and lines.ndim == 2:
            # B on the scan's own lines, seen as in training: through the scan's coils for a
            # native (multi-coil) model, single-coil for a k-space model.
            def from_scan(b: int, step: int) -> MaskedOperator:
                generator = torch.Generator().manual_seed(derive_seed(seed, "recon-op", step))
                tilde = further_kspace_mask(lines.bool(), generator)
                if meta["kind"] == "native":
                    return _reduced(op, tilde)
                return SingleCoilFourier(tilde, size)

            return from_scan, False
        if meta["kind"] == "pixel" and isinstance(op, PixelMask):
            # Inpainting: B hides a further share delta of the scan's own observed pixels.
            def from_pixels(b: int, step: int) -> MaskedOperator:
                generator = torch.Generator().manual_seed(derive_seed(seed, "recon-op", step))
                keep = further_pixel_mask(op.mask.bool(), float(meta["delta"]), generator)
                return PixelMask(keep)

            return from_pixels, False

    def training_style(b: int, step: int) -> MaskedOperator:
        return inference_operator(meta, b, size, size, derive_seed(seed, "recon-op", step))

    return training_style, choice == "fresh"


# The calibrations a scan's phase constraint may take its phase from (physics/recon.py), each
# from the scan's own measurements: the central ``reconstruct.phase_window`` of columns (box),
# or the auto-calibration lines under a Hann taper. ``off`` is no constraint.
PHASE_CALIBRATIONS = {
    "centre": lambda op, y, rc: calibration_phase(op, y, rc["phase_window"]),
    "acs_hann": lambda op, y, rc: acs_hann_phase(op, y),
}
# How much better than its baseline a phase calibration (over zero-filling: phase_calibration)
# or a sampler's contribution (over the guard's base: fold_fit) must predict a scan's held-back
# lines, in every fold, to be kept: a smaller gain may be chance. An unseen demo head cropped
# to nibabel's T1 field, its phase simulated over the crop as if it were a whole head,
# predicted them 0.9-1.6 % better under the central window's phase and lost 0.58 dB to
# zero-filled under it; the calibrations that helped on new scans were 7-46 % better. On the
# 4-coil T1 crop the pooled fit trusted DPS at 0.07 and it fell 0.08 dB below zero-filled
# (benchmarks/robust_prior.py). The same margin bounds how much worse than zero-filling a
# calibration may predict the lines outside its calibration region (chosen_calibration).
HELD_BACK_MARGIN = 0.05
# Alternations of the pocs baseline where nothing chooses another count (as many as the
# samplers' final ones), and the counts a scan's held-back lines choose among
# (with_alternations). Fifty is no optimum: from an estimated phase POCS semi-converges (a
# volume of the workflow's hold-out, 1 coil, R = 4: 0.26 dB better after 20, 1 dB worse after 200),
# and where the phase fits it is still gaining at 200 (nibabel's EPI +4.0 dB over zero-filled
# after 50, +4.6 after 150; the zero-padded T1 +5.5 -> +8.3).
POCS_ROUNDS = PROJECTION_ROUNDS
ALTERNATION_ROUNDS = (10, 20, 50, 100, 200)
# How much better each step from POCS_ROUNDS to the next count (chosen_rounds) must predict a
# scan's held-back lines: on an unseen demo head 100 rounds scored 1.2 % better than 50 and
# lost 0.26 dB; the steps that gained were 2.4-17 % better. Where the lines cannot tell counts
# apart (nibabel's T1 crop: within 0.1 %) the default stays, where 200 would cost 0.2 dB.
ROUNDS_MARGIN = 0.02
# SENSE dampings the alternations may use (PhaseCalibration.damping): data_consistent's, and
# the samplers' single final fit's. Neither suits every acquisition (end_on_data).
SENSE_DAMPINGS = (1e-2, FINAL_SENSE_DAMPING)


@dataclass(frozen=True)
class PhaseCalibration:
    """The phase constraint of a batch of slices: each slice's calibration phase ``phase``
    ``(N, H, W)``, whether its reconstructions are held to it (``constrained``, ``(N,)``
    bool), the calibration that gave it (``choice``, per slice: a key of
    :data:`PHASE_CALIBRATIONS` or ``off``), the SENSE damping of the alternations that
    hold an image to it (``damping``; ``None``: data_consistent's) and their count (``rounds``,
    one for all or ``(N,)``)."""

    phase: torch.Tensor
    constrained: torch.Tensor
    choice: tuple[str, ...]
    damping: float | None = None
    rounds: int | torch.Tensor = POCS_ROUNDS

    def subset(self, index: np.ndarray) -> PhaseCalibration:
        rows = torch.from_numpy(np.asarray(index))
        rounds = self.rounds[rows] if isinstance(self.rounds, torch.Tensor) else self.rounds
        return PhaseCalibration(
            self.phase[rows],
            self.constrained[rows],
            tuple(self.choice[i] for i in index),
            self.damping,
            rounds,
        )

    def project(self, image: torch.Tensor) -> torch.Tensor:
        """``(N, 2, H, W)``: each constrained slice's nearest magnitude under its phase; the
        others unchanged."""
        held = self.constrained.view(-1, 1, 1, 1)
        return torch.where(held, phase_project(image, self.phase), image)

    def projection(self):
        """:meth:`project` for the samplers; ``None`` when no slice is constrained."""
        return self.project if bool(self.constrained.any()) else None

    def pocs(self, op: MaskedOperator, y: torch.Tensor) -> torch.Tensor:
        """The pocs baseline ``(N, 2, H, W)``: ``rounds`` alternations between :meth:`project`
        and the data from the zero-filled image (Haacke et al., 1991); the zero-filled image
        itself on unconstrained slices."""
        zero_filled = op.A_adjoint(y)
        if not bool(self.constrained.any()):
            return zero_filled
        image = alternate_projections(
            op, zero_filled, y, self.project, self.rounds, damping=self.damping
        )
        return torch.where(self.constrained.view(-1, 1, 1, 1), image, zero_filled)


def fixed_calibration(
    op: MaskedOperator, y: torch.Tensor, rc: dict[str, Any], name: str = "centre"
) -> PhaseCalibration:
    """Every slice held to the calibration ``name`` of :data:`PHASE_CALIBRATIONS`."""
    phase = PHASE_CALIBRATIONS[name](op, y, rc)
    return PhaseCalibration(phase, torch.ones(len(y), dtype=torch.bool), (name,) * len(y))


def calibration_folds(line_mask: torch.Tensor, seed: int) -> torch.Tensor:
    """The :func:`guard_folds` every phase-calibration choice holds back (the calibration's
    and the damping's alike), seeded apart from the guard's own."""
    return guard_folds(
        line_mask, torch.Generator().manual_seed(derive_seed(seed, "phase-calibration"))
    )


def calibration_edge_folds(line_mask: torch.Tensor) -> torch.Tensor:
    """``(2, N, W)``: each slice's outermost pair of calibration lines at ±e about the centre
    (the widest pair that :func:`acs_lines` holds both of), fold 0 holding +e and fold 1 −e.
    Each is the other's mirror, so a phase calibration is scored on them on any mask: pocs
    fills a line from its mirror (−k), and a random mask seldom acquires an outer line's
    mirror, which leaves the outer folds (:func:`calibration_folds`) nothing to tell a good
    phase from a bad one. Folds are empty on a slice whose centre holds no such pair."""
    run = acs_lines(line_mask.bool())
    centre = run.shape[-1] // 2
    offsets = torch.arange(1, centre)
    paired = run[..., centre + offsets] & run[..., centre - offsets]  # (N, centre - 1)
    widest = (paired.long() * offsets).amax(dim=-1)  # the largest offset of a pair; 0: none
    columns = torch.arange(run.shape[-1])
    has_pair = (widest > 0).unsqueeze(-1)
    plus = (columns == (centre + widest).unsqueeze(-1)) & has_pair
    minus = (columns == (centre - widest).unsqueeze(-1)) & has_pair
    return torch.stack([plus, minus])


def calibration_errors(
    op: MaskedOperator, y: torch.Tensor, rc: dict[str, Any], seed: int
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """How well the pocs baseline under each calibration predicts each slice's own acquired
    lines it is not given, each fold reconstructed from the rest (the calibration phase too).
    Folds: first the :data:`GUARD_FOLDS` of :func:`calibration_folds` (the lines outside the
    calibration region, as the guard validates), then the two of
    :func:`calibration_edge_folds` (the calibration region's edge lines, whose phase comes
    from the narrower centre that remains). Per calibration and ``off`` (the zero-filled image
    of the rest): ``(residual, energy)``, each ``(GUARD_FOLDS + 2, N)`` — per fold, the
    held-back lines' squared error and their squared measurements."""
    folds = torch.cat([calibration_folds(op.line_mask, seed), calibration_edge_folds(op.line_mask)])
    names = ("off", *PHASE_CALIBRATIONS)
    residual = {name: torch.zeros(len(folds), len(y)) for name in names}
    energy = torch.zeros(len(folds), len(y))
    for fold, held_lines in enumerate(folds):
        op_rest, y_rest, held = held_back_split(op, y, held_lines)
        energy[fold] = (y.square() * held).flatten(1).sum(1)
        for name in names:
            if name == "off":
                image = op_rest.A_adjoint(y_rest)
            else:
                image = fixed_calibration(op_rest, y_rest, rc, name).pocs(op_rest, y_rest)
            residual[name][fold] = ((op.A(image) - y).square() * held).flatten(1).sum(1)
    return {name: (residual[name].numpy(), energy.numpy()) for name in names}


def chosen_calibration(residual: dict[str, np.ndarray], energy: np.ndarray) -> str:
    """The calibration a scan is held to, from its :func:`calibration_errors` pooled over its
    slices: ``residual`` per calibration and ``off``, and the held-back lines' ``energy``, each
    ``(GUARD_FOLDS + 2,)`` (outer folds, then edge folds). A phase is imposed only where the
    held-back lines support it — it predicts the outer lines better than zero-filling by
    :data:`HELD_BACK_MARGIN` in every fold (a smaller gain may be chance), or both edge lines
    better by the margin with no outer fold worse by more than it — and its edge lines do not
    refute it (both predicted worse than zero-filling by more than the margin); among those,
    the one that predicts the outer lines best (the folds pooled); ``off`` when none is, or
    where an outer fold holds no line (nothing says a phase fits there). Where the centre
    holds no mirrored pair, the edges neither support nor refute.

    Why two kinds of folds: pocs fills a line from its mirror, and a random mask seldom
    acquires an outer line's mirror — on nibabel's T1 crop three of four masks acquired none,
    the outer folds scored every phase within 1 % of zero-filling, and the calibration gained
    0.2-2 dB; the edge lines are each other's mirror on every mask. They are the harsher test
    (their phase comes from a narrower centre, and near the centre a phase error meets the
    largest magnitudes: on demo heads under a whole head's phase the central window's phase
    predicted one edge 3.4 times worse than zero-filling and gained 1.9 dB), so they support a
    phase only where the outer lines do not argue against it and refute one only where both
    fail. Under a phase that varies across the T1 crop as a whole head's does, the Hann
    calibration predicted the outer lines 7 % better, both edges 1.8-3 times worse, and lost
    7.5 dB (docs/samplers.md)."""
    outer, edge = slice(0, GUARD_FOLDS), slice(GUARD_FOLDS, None)
    if not (energy[outer] > 0).all():
        return "off"
    edges_held = bool((energy[edge] > 0).all())
    off = residual["off"]
    better, worse = 1.0 - HELD_BACK_MARGIN, 1.0 + HELD_BACK_MARGIN

    def within(name: str, folds: slice, factor: float) -> bool:
        return bool((residual[name][folds] <= factor * off[folds]).all())

    def supported(name: str) -> bool:
        by_edges = edges_held and within(name, edge, better) and within(name, outer, worse)
        return within(name, outer, better) or by_edges

    def refuted(name: str) -> bool:
        return edges_held and bool((residual[name][edge] > worse * off[edge]).all())

    eligible = {
        name: float(residual[name][outer].sum())
        for name in PHASE_CALIBRATIONS
        if supported(name) and not refuted(name)
    }
    return min(eligible, key=eligible.get) if eligible else "off"


def phase_calibration(
    rc: dict[str, Any],
    op: MaskedOperator,
    y: torch.Tensor,
    seed: int,
    groups: np.ndarray | None = None,
) -> PhaseCalibration | None:
    """The phase constraint ``reconstruct.phase_constraint`` asks for: ``None`` when off (and
    for pixel masks), every slice under the central window's phase when ``true``, and with
    ``auto`` one choice per scan (``groups``, ``(N,)``: the slices' scan or volume; default
    all one scan) among the calibrations of :data:`PHASE_CALIBRATIONS` and none, by how well
    each predicts the scan's held-back lines (:func:`calibration_errors` pooled over its
    slices, :func:`chosen_calibration`). No calibration suits every scan (docs/samplers.md,
    1 coil): on the real EPI the taper's phase lets pocs gain 0.7 dB more than the window's;
    on the spin echo the window's costs 3 dB and none is chosen. Where no phase fits, the
    scan is reconstructed without the constraint."""
    setting = rc["phase_constraint"]
    if setting is False or isinstance(op, PixelMask):
        return None
    if setting is True:
        return with_alternations(fixed_calibration(op, y, rc), op, y, seed, groups)
    groups = np.zeros(len(y), np.int64) if groups is None else np.asarray(groups)
    errors = calibration_errors(op, y, rc, seed)
    choice = ["off"] * len(y)
    for group in np.unique(groups):
        members = groups == group
        best = chosen_calibration(
            {name: residual[:, members].sum(1) for name, (residual, _) in errors.items()},
            errors["off"][1][:, members].sum(1),
        )
        for i in np.flatnonzero(members):
            choice[i] = best
    batch, _, height, width = op.A_adjoint(y).shape
    phase = torch.zeros(batch, height, width)
    for name in PHASE_CALIBRATIONS:
        chosen = torch.tensor([c == name for c in choice])
        if bool(chosen.any()):
            phase = torch.where(chosen.view(-1, 1, 1), PHASE_CALIBRATIONS[name](op, y, rc), phase)
    constrained = torch.tensor([c != "off" for c in choice])
    calibration = PhaseCalibration(phase, constrained, tuple(choice))
    return with_alternations(calibration, op, y, seed, groups)


class FoldAlternations:
    """Each fold of ``folds`` (``(K, N, W)`` held-back lines) predicted by alternations between
    ``project`` and the data (at SENSE ``damping``), started from the zero-filled image of the
    other lines and advanced in place, so that a later count continues where an earlier one
    stopped."""

    def __init__(
        self,
        op: MaskedOperator,
        y: torch.Tensor,
        folds: torch.Tensor,
        project: ImageProjection,
        damping: float | None,
    ) -> None:
        self.op, self.y, self.project, self.damping = op, y, project, damping
        self.splits = [held_back_split(op, y, held_lines) for held_lines in folds]
        self.images = [op_rest.A_adjoint(y_rest) for op_rest, y_rest, _ in self.splits]
        self.rounds = 0

    def residuals(self, counts: tuple[int, ...]) -> dict[int, torch.Tensor]:
        """Per count of ``counts`` (none below the alternations already run), ``(N,)`` each
        slice's squared error on its held-back lines after that many alternations, summed
        over the folds."""
        if min(counts) <= self.rounds:
            raise ValueError(f"{self.rounds} alternations already run: {min(counts)} is past")
        residual = {rounds: torch.zeros(len(self.y)) for rounds in counts}
        for fold, (op_rest, y_rest, held) in enumerate(self.splits):
            image = self.images[fold]
            for step in range(self.rounds + 1, max(counts) + 1):
                image = data_consistent(op_rest, self.project(image), y_rest, damping=self.damping)
                if step in residual:
                    residual[step] += (
                        ((self.op.A(image) - self.y).square() * held).flatten(1).sum(1)
                    )
            self.images[fold] = image
        self.rounds = max(counts)  # every count lies past the rounds run before (above)
        return residual


def with_alternations(
    calibration: PhaseCalibration,
    op: MaskedOperator,
    y: torch.Tensor,
    seed: int,
    groups: np.ndarray | None = None,
) -> PhaseCalibration:
    """``calibration`` with the alternations under which its pocs baseline best predicts the
    held-back lines (the outer folds of :func:`calibration_folds`, :class:`FoldAlternations`):
    for SENSE the damping of :data:`SENSE_DAMPINGS` (after :data:`POCS_ROUNDS`, pooled over
    the batch's constrained slices) — how far the fits may go depends on how well the coil
    maps explain the data (exact in simulation, estimated on new scans) — then per scan
    (``groups``, ``(N,)``; default all one) the count of :data:`ALTERNATION_ROUNDS`, pooled
    over its constrained slices, by :func:`chosen_rounds` (each step from :data:`POCS_ROUNDS`
    must earn its place): from an estimated phase POCS semi-converges, where the phase fits it
    goes on gaining, and how soon either shows differs by scan (docs/samplers.md)."""
    rows = calibration.constrained
    if not bool(rows.any()):
        return calibration
    folds = calibration_folds(op.line_mask, seed)
    fewer = tuple(count for count in ALTERNATION_ROUNDS if count <= POCS_ROUNDS)
    more = tuple(count for count in ALTERNATION_ROUNDS if count > POCS_ROUNDS)
    dampings = SENSE_DAMPINGS if isinstance(op, MultiCoilSense) else (None,)
    runs = {d: FoldAlternations(op, y, folds, calibration.project, d) for d in dampings}
    early = {d: run.residuals(fewer) for d, run in runs.items()}
    damping = min(dampings, key=lambda d: float(early[d][POCS_ROUNDS][rows].sum()))
    residual = early[damping] | runs[damping].residuals(more)
    groups = np.zeros(len(y), np.int64) if groups is None else np.asarray(groups)
    rounds = torch.full((len(y),), POCS_ROUNDS)
    for group in np.unique(groups):
        members = torch.from_numpy(groups == group) & rows
        pooled = {count: float(r[members].sum()) for count, r in residual.items()}
        rounds[members] = chosen_rounds(pooled)
    return replace(calibration, damping=damping, rounds=rounds)


def chosen_rounds(residual: dict[int, float]) -> int:
    """The alternation count of a scan from its held-back squared error after each count of
    :data:`ALTERNATION_ROUNDS` (:meth:`FoldAlternations.residuals`, pooled over its slices): from
    :data:`POCS_ROUNDS`, a step to the next count up (or down) is taken while it lowers the
    error by :data:`ROUNDS_MARGIN`; of the two walks, the one that ends lower. Each step must
    earn its place because the folds, which reconstruct from fewer lines than the scan has,
    place the best count up to twice too far (docs/samplers.md); where no line was held back
    the count stays."""
    counts = sorted(residual)
    chosen = POCS_ROUNDS
    for direction in (-1, 1):
        at = counts.index(POCS_ROUNDS)
        while 0 <= at + direction < len(counts):
            step = counts[at + direction]
            if not residual[step] < (1.0 - ROUNDS_MARGIN) * residual[counts[at]]:
                break
            at += direction
        if residual[counts[at]] < residual[chosen]:
            chosen = counts[at]
    return chosen


def _diffusion(
    net, meta, rc, op, y, seed, sampler, calibration: PhaseCalibration | None
) -> tuple[np.ndarray, np.ndarray | None, torch.Tensor]:
    """Magnitude reconstructions of a batch with the model as prior: the mean of
    ``reconstruct.posterior_samples`` samples, their per-pixel standard deviation of
    magnitudes (``None`` for one sample or the deterministic one-step method), and the mean
    itself ``(B, C, H, W)`` before taking magnitudes. ``calibration``: the batch's phase
    constraint (complex models only)."""
    size = int(meta["image_size"])
    channels = int(meta["image_channels"])
    # A prior over real images reconstructs k-space through RealImage; inpainting masks
    # act on real images already.
    model_op = RealImage(op) if channels == 1 and not isinstance(op, PixelMask) else op
    batch = y.shape[0]
    project = calibration.projection() if calibration is not None and channels == 2 else None
    end_damping = calibration.damping if calibration is not None else None
    end_rounds = calibration.rounds if calibration is not None else PROJECTION_ROUNDS
    if sampler == "one_step":
        mask_op = model_op if meta["mode"] == "ambient" else Identity(batch, size, size)
        image = one_step_reconstruction(
            net, model_op, y, rc["t_min"], mask_op, project, end_damping, end_rounds
        )
        return magnitude(image), None, image
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
                project=project,
                end_damping=end_damping,
                end_rounds=end_rounds,
            )
        )
    # The posterior mean is an average of data-consistent images, hence data-consistent.
    image = torch.stack(draws).mean(dim=0)
    spread = np.stack([magnitude(d) for d in draws]).std(axis=0) if len(draws) > 1 else None
    return magnitude(image), spread, image


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
    lamda: float,
    calibration: PhaseCalibration,
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Zero-filled, L1-wavelet CS (weight ``lamda``, :func:`validated_cs_lambda`) and
    phase-constrained POCS (under ``calibration``, :meth:`PhaseCalibration.pocs`)
    reconstructions of ``y``.

    Returns:
        ({method: (N, H, W) magnitudes}, {method: seconds per slice}).
    """
    n = y.shape[0]
    start = time.perf_counter()
    results = {"zero_filled": magnitude(op.A_adjoint(y))}
    seconds = {"zero_filled": (time.perf_counter() - start) / n}
    start = time.perf_counter()
    results["cs_l1"] = np.stack(
        [np.abs(l1_wavelet(*acq.numpy_kspace(op, y, i), lamda)) for i in range(n)]
    ).astype(np.float32)
    seconds["cs_l1"] = (time.perf_counter() - start) / n
    start = time.perf_counter()
    results["pocs"] = magnitude(calibration.pocs(op, y))
    seconds["pocs"] = (time.perf_counter() - start) / n
    return results, seconds


def undersample(
    acq: Acquisition, store, rows: np.ndarray, keys: list[str], noise_key: str
) -> tuple[MaskedOperator, torch.Tensor]:
    """(A, y) of the store rows ``rows``: each slice with its subject's phase, its own mask."""
    op = acq.operator([keys[r] for r in rows])
    subjects, slice_index = slice_identity(store, rows)
    return op, acq.measure(op, store.images[rows], subjects, slice_index, noise_key)


def validated_cs_lambda(
    rc: dict[str, Any], acq: Acquisition, store, rows: np.ndarray, keys: list[str], tag: str
) -> float:
    """The CS weight of ``reconstruct.cs_lambdas`` with the lowest NRMSE on the store rows
    ``rows`` — training-subject slices, never the hold-out — acquired by ``acq`` (noise key
    ``validation-{tag}``)."""
    op, y = undersample(acq, store, rows, keys, f"validation-{tag}")

    def cs(i: int, lamda: float) -> np.ndarray:
        return np.abs(l1_wavelet(*acq.numpy_kspace(op, y, i), lamda))

    return choose_lambda(cs, list(store.images[rows]), list(rc["cs_lambdas"]))[0]


def retrospective(
    rc: dict[str, Any],
    acceleration: float,
    store,
    holdout: np.ndarray,
    validation: np.ndarray,
    keys: list[str],
    seed: int,
    with_baselines: bool = True,
):
    """Undersamples the hold-out rows of ``store`` at one acceleration, chooses its phase
    constraint (:func:`phase_calibration`, per volume) and runs the baselines (unless
    ``with_baselines`` is false: then the dictionaries are empty and λ is None).

    Returns:
        (A, y, {method: magnitudes}, {method: seconds per slice}, CS λ, calibration) — the
        diffusion methods then reconstruct the same ``y`` with the same ``A`` and
        calibration.
    """
    tag = f"R{acceleration:g}"
    acq = acquisition(rc, acceleration, store.images.shape[-1], seed)
    op, y = undersample(acq, store, holdout, keys, f"holdout-{tag}")
    calibration = phase_calibration(rc, op, y, seed, store.index.subject[holdout])
    if not with_baselines:
        return op, y, {}, {}, None, calibration
    lamda = validated_cs_lambda(rc, acq, store, validation, keys, tag)
    # The pocs baseline runs with the constraint off too: the central window's phase.
    pocs_calibration = calibration or fixed_calibration(op, y, rc)
    results, seconds = baselines(acq, op, y, lamda, pocs_calibration)
    return op, y, results, seconds, lamda, calibration


def diffusion_methods(
    net,
    meta: dict[str, Any],
    rc: dict[str, Any],
    op: MaskedOperator,
    y: torch.Tensor,
    seed: int,
    uncertainty: dict[str, np.ndarray] | None = None,
    images_out: dict[str, np.ndarray] | None = None,
    calibration: PhaseCalibration | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Magnitude reconstructions of ``y`` with each configured sampler, batched. When
    ``uncertainty`` is given, it receives each sampler's per-pixel standard deviation over
    its posterior samples (samplers with more than one sample only); ``images_out`` receives
    the reconstructions before magnitudes, ``(N, C, H, W)``. ``calibration``: the phase
    constraint; by default :func:`phase_calibration` of ``y`` as one scan."""
    results, seconds = {}, {}
    n = y.shape[0]
    if calibration is None and int(meta["image_channels"]) == 2:
        calibration = phase_calibration(rc, op, y, seed)
    for sampler in rc["samplers"]:
        start = time.perf_counter()
        parts = [
            _diffusion(
                net,
                meta,
                rc,
                _subset(op, b),
                y[b],
                seed,
                sampler,
                None if calibration is None else calibration.subset(b),
            )
            for b in _batches(n, rc["batch_size"])
        ]
        name = f"diffusion_{sampler}"
        results[name] = np.concatenate([mean for mean, _, _ in parts])
        seconds[name] = (time.perf_counter() - start) / n
        if uncertainty is not None and parts[0][1] is not None:
            uncertainty[name] = np.concatenate([spread for _, spread, _ in parts])
        if images_out is not None:
            images_out[name] = torch.cat([image for _, _, image in parts]).numpy()
    return results, seconds


# Noise level of the held-back prediction test, as a fraction of the schedule's length: low,
# so that what is scored is the prior's prediction of lines the network does not see.
HELD_BACK_LEVEL = 0.02
HELD_BACK_DRAWS = 4
# Disjoint sets of acquired lines the guard holds back in turn (sampler_trust), and the fewest
# lines a fold must hold for its fit to count: folds of one line each let a demo prior trained
# with demo.zoom through on nibabel's T1 crop (trust 0.18-0.25 on two slices; DC 0.48 dB
# below zero-filled on the scan).
GUARD_FOLDS = 2
GUARD_MIN_FOLD_LINES = 2
# Noise level (EDM σ, model intensity scale) of the denoising score: high enough that the
# answer leans on what the prior knows, low enough that the anatomy still shows through.
DENOISING_SIGMA = 0.3
# Slices of the cohort's hold-out subjects the shift score is calibrated on.
SHIFT_REFERENCE_SLICES = 24


def _reduced(op: MaskedOperator, line_mask: torch.Tensor) -> MaskedOperator:
    """``op`` with another line mask (the same coil maps)."""
    if isinstance(op, MultiCoilSense):
        return MultiCoilSense(line_mask, op.maps)
    return SingleCoilFourier(line_mask, op.height)


def held_back_split(
    op: MaskedOperator, y: torch.Tensor, held_lines: torch.Tensor
) -> tuple[MaskedOperator, torch.Tensor, torch.Tensor]:
    """One fold of :func:`guard_folds`: the operator and measurements of the acquired lines
    it keeps, and the mask (shaped like ``y``) of the acquired entries it holds back."""
    op_rest = _reduced(op, op.line_mask.bool() & ~held_lines)
    return op_rest, y * op_rest.observed(y), op.observed(y) * (1.0 - op_rest.observed(y))


def _prediction(net, op_tilde: MaskedOperator, y: torch.Tensor, t: int, abar: float, noise):
    """x̂0 of the network shown ``y`` through Ã (``op_tilde``) at timestep ``t`` (ᾱ_t =
    ``abar``), as in training: z = Ã^H(sqrt(ᾱ_t) y + sqrt(1 − ᾱ_t) Ã ε)."""
    z = op_tilde.A_adjoint(abar**0.5 * y + (1.0 - abar) ** 0.5 * op_tilde.A(noise))
    return net(z, op_tilde.mask_image(), torch.full((len(y),), t, dtype=torch.long)).float()


@torch.no_grad()
def held_back_errors(
    net, meta: dict[str, Any], op: MaskedOperator, y: torch.Tensor, seed: int
) -> np.ndarray:
    """``(B,)`` how well the model predicts each slice's own measured lines it is not shown.

    B drops some of the scan's acquired lines (as in training, Ã = B A); the network sees the
    rest at a low noise level and predicts x̂0; the score is ‖x̂0's held-back lines − y's‖² /
    ‖y's held-back lines‖², averaged over :data:`HELD_BACK_DRAWS` draws of B. Below 1 the prior
    predicts unmeasured k-space better than zero-filling does; at 1 or above it adds nothing on
    this scan; NaN where the scan has no line to hold back (every acquired line is a
    calibration line). Needs no clean image. Ambient models only (others never saw a masked
    input).
    """
    t = max(1, int(round(HELD_BACK_LEVEL * int(meta["scheduler"]["num_train_timesteps"]))))
    abar = float(build_ddim(meta["scheduler"], 1).alphas_cumprod[t])
    generator = torch.Generator().manual_seed(derive_seed(seed, "held-back"))
    scores = torch.zeros(len(y))
    for _ in range(HELD_BACK_DRAWS):
        op_tilde = _reduced(op, further_kspace_mask(op.line_mask, generator))
        shape = (len(y), int(meta["image_channels"]), *op.mask_image().shape[-2:])
        noise = torch.randn(shape, generator=generator)
        residual = op.A(_prediction(net, op_tilde, y, t, abar, noise)) - y
        held = op.observed(residual) * (1.0 - op_tilde.observed(residual))
        energy = (y.square() * held).flatten(1).sum(1)
        # A slice whose acquired lines are all calibration lines has none to hold back:
        # its score is undefined (NaN), not perfect.
        scores += (residual.square() * held).flatten(1).sum(1) / energy.where(
            energy > 0, torch.tensor(float("nan"))
        )
    return (scores / HELD_BACK_DRAWS).numpy()


@torch.no_grad()
def denoising_errors(
    net, meta: dict[str, Any], op: MaskedOperator, y: torch.Tensor, seed: int
) -> np.ndarray:
    """``(B,)`` the share of injected noise the model leaves on each slice's measured entries.

    The scan's own measurements get noise of EDM level :data:`DENOISING_SIGMA` (on the
    model's intensity scale) on every acquired line, as in training with Ã = A; the score is
    ‖A x̂0 − y‖² / (σ² · number of measured entries), averaged over :data:`HELD_BACK_DRAWS`
    noise draws: about 1 for a denoiser that returns its input, lower the better the prior
    knows images like this one. Unlike the held-back error it does not need the prior to
    predict unmeasured lines, only to know the anatomy and contrast it sees, so it tells a
    scan unlike the cohort apart even from a young model. Ambient models only.
    """
    alphas = build_ddim(meta["scheduler"], 1).alphas_cumprod
    t = int((sigma_of(alphas) - DENOISING_SIGMA).abs().argmin())
    abar = float(alphas[t])
    sigma2 = (1.0 - abar) / abar  # EDM σ² of timestep t
    generator = torch.Generator().manual_seed(derive_seed(seed, "denoising"))
    scores = torch.zeros(len(y))
    for _ in range(HELD_BACK_DRAWS):
        shape = (len(y), int(meta["image_channels"]), *op.mask_image().shape[-2:])
        noise = torch.randn(shape, generator=generator)
        residual = op.A(_prediction(net, op, y, t, abar, noise)) - y
        measured = op.observed(residual)
        count = measured.flatten(1).sum(1).clamp(min=1.0)
        scores += (residual.square() * measured).flatten(1).sum(1) / (sigma2 * count)
    return (scores / HELD_BACK_DRAWS).numpy()


def shift_reference(
    net, meta, cfg: dict[str, Any], store, coils: int, acceleration: float
) -> dict[str, np.ndarray] | None:
    """:func:`prior_scores` of the cohort's own hold-out slices, acquired as the new scan was
    (``coils``, R = ``acceleration``) by the shared simulator; None without clean hold-out
    slices."""
    rows = spread_rows(store.index.rows("holdout"), SHIFT_REFERENCE_SLICES)
    if len(rows) == 0:
        return None
    rc = dict(cfg["reconstruct"]) | {"coils": coils}
    seed = cfg["cohort"]["seed"]
    keys = example_keys(store.index.subjects, store.index.subject, store.index.slice_index)
    acq = acquisition(rc, acceleration, store.images.shape[-1], seed)
    op, y = undersample(acq, store, rows, keys, "domain-shift-reference")
    return prior_scores(net, meta, op, y, seed)


def cohort_cs_lambda(cfg: dict[str, Any], store, coils: int, acceleration: float) -> float | None:
    """The CS λ the workflow's own reconstruction takes for ``coils`` coils at R =
    ``acceleration``: :func:`validated_cs_lambda` on the cohort's training-subject validation
    slices acquired so, as :func:`retrospective` chooses it; None without them. A new scan has
    no reference to choose λ on, and one fixed λ does not suit it: the middle candidate (3e-3)
    put CS 2.4 dB below zero-filling on nibabel's T1 crop at 1 coil, where the cohort's
    (1e-3) leaves it 0.2 dB below (docs/samplers.md)."""
    rc = dict(cfg["reconstruct"]) | {"coils": coils}
    rows = spread_rows(store.index.rows("train"), rc["validation_slices"])
    if len(rows) == 0:
        return None
    keys = example_keys(store.index.subjects, store.index.subject, store.index.slice_index)
    acq = acquisition(rc, acceleration, store.images.shape[-1], cfg["cohort"]["seed"])
    return validated_cs_lambda(rc, acq, store, rows, keys, f"R{acceleration:g}")


def prior_scores(
    net, meta: dict[str, Any], op: MaskedOperator, y: torch.Tensor, seed: int
) -> dict[str, np.ndarray]:
    """Per slice, :func:`held_back_errors` (``held_back``) and :func:`denoising_errors`
    (``denoising``) of a scan."""
    return {
        "held_back": held_back_errors(net, meta, op, y, seed),
        "denoising": denoising_errors(net, meta, op, y, seed),
    }


def guard_folds(line_mask: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``(GUARD_FOLDS, N, W)`` the acquired lines each fold of the guard holds back: every
    acquired line outside a slice's calibration region goes to one fold, seeded at random,
    and each fold gets at least one line where the slice has as many to give. A slice with
    fewer such lines than folds has an empty fold (the guard cannot cross-check it)."""
    line_mask = line_mask.bool()
    outer = line_mask & ~acs_lines(line_mask)
    scores = torch.rand(line_mask.shape, generator=generator).masked_fill(~outer, float("inf"))
    rank = scores.argsort(dim=-1).argsort(dim=-1)  # 0, 1, ... over each slice's outer lines
    return torch.stack([outer & (rank % GUARD_FOLDS == k) for k in range(GUARD_FOLDS)])


def cross_checkable(folds: torch.Tensor) -> torch.Tensor:
    """``(N,)`` True where every fold of :func:`guard_folds` (``(GUARD_FOLDS, N, W)``) holds
    at least :data:`GUARD_MIN_FOLD_LINES` lines: only there can the guard trust a sampler."""
    return (folds.sum(dim=-1) >= GUARD_MIN_FOLD_LINES).all(dim=0)


def fold_fit(
    agreement: torch.Tensor,
    energy: torch.Tensor,
    target_energy: torch.Tensor,
    checkable: torch.Tensor,
    pooled: bool,
) -> torch.Tensor:
    """``(B,)`` least-squares scales of a sampler's contribution onto one fold's held-back
    lines, from each slice's ``agreement`` ⟨added, target⟩, ``energy`` ‖added‖² and
    ``target_energy`` ‖target‖² (each ``(B,)``): its own where ``checkable``; elsewhere the
    scan's pooled scale (from the sums) where ``pooled`` allows it, else 0. A scale counts
    only where it lowers the held-back error by :data:`HELD_BACK_MARGIN` of the target's
    energy or more (⟨added, target⟩² ≥ margin · ‖added‖² · ‖target‖²); else it is 0."""

    def scale(agree: torch.Tensor, added: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        material = agree.square() >= HELD_BACK_MARGIN * added * target
        return (agree / added.clamp(min=1e-12)).where(material, torch.zeros_like(agree))

    own = scale(agreement, energy, target_energy)
    scan = scale(agreement.sum(), energy.sum(), target_energy.sum()) if pooled else torch.zeros(())
    return own.where(checkable, scan.expand_as(own))


def guard_base(
    op: MaskedOperator, y: torch.Tensor, calibration: PhaseCalibration | None
) -> torch.Tensor:
    """``(N, 2, H, W)`` what the guard keeps of a scan when it trusts no sampler: the pocs
    baseline under the scan's phase ``calibration`` — which :func:`phase_calibration` has
    already weighed against zero-filling on the same held-back lines — and the zero-filled
    image on slices without one."""
    return op.A_adjoint(y) if calibration is None else calibration.pocs(op, y)


def sampler_trust(
    net,
    meta: dict[str, Any],
    rc: dict[str, Any],
    op: MaskedOperator,
    y: torch.Tensor,
    seed: int,
    calibration: PhaseCalibration | None = None,
) -> dict[str, np.ndarray]:
    """Per diffusion sampler, ``(B,)`` how much of its contribution each slice's own data
    support (the ``reconstruct.guard``), validated the way self-supervised MRI methods
    validate, and cross-checked: the acquired lines outside the calibration region are split
    into :data:`GUARD_FOLDS` folds (:func:`guard_folds`); for each fold, every sampler
    reconstructs from the other lines and its contribution beyond :func:`guard_base` of those
    (pocs under ``calibration``, else zero-filled) is scaled onto the fold's lines (least
    squares, :func:`fold_fit`). The trust is the smallest scale over the folds, clipped to
    [0, 1]: 0 where some fold is predicted no better — by less than :data:`HELD_BACK_MARGIN`
    — than by that base. A slice with too few such lines to give
    every fold :data:`GUARD_MIN_FOLD_LINES` (:func:`cross_checkable`) cannot be cross-checked
    alone — a line or two that happen to fit say nothing of the many the prior fills in — and
    gets the scan's pooled trust instead: the same least-squares scale over all the scan's
    slices (``y`` is one scan), as long as each pooled fold holds that many lines; 0
    otherwise. ``calibration``: the scan's phase constraint, kept in every fold (its
    calibration lines are never held back)."""
    generator = torch.Generator().manual_seed(derive_seed(seed, "guard"))
    folds = guard_folds(op.line_mask, generator)
    checkable = cross_checkable(folds)
    # The whole scan as one slice: can its folds be cross-checked?
    pooled_checkable = bool(cross_checkable(folds.flatten(1)[:, None]))
    trust: dict[str, torch.Tensor] = {}
    if not (bool(checkable.any()) or pooled_checkable):  # spare the reconstructions
        return {f"diffusion_{s}": np.zeros(len(y), np.float32) for s in rc["samplers"]}
    for held_lines in folds:
        op_rest, y_rest, held = held_back_split(op, y, held_lines)
        base = op.A(guard_base(op_rest, y_rest, calibration))
        target = (y - base) * held
        images: dict[str, np.ndarray] = {}
        diffusion_methods(
            net, meta, rc, op_rest, y_rest, seed, images_out=images, calibration=calibration
        )
        for method, image in images.items():
            added = (op.A(torch.from_numpy(image)) - base) * held
            fit = fold_fit(
                (added * target).flatten(1).sum(1),
                added.square().flatten(1).sum(1),
                target.square().flatten(1).sum(1),
                checkable,
                pooled_checkable,
            )
            trust[method] = torch.minimum(trust.get(method, fit), fit)
    return {method: fit.clamp(0.0, 1.0).numpy() for method, fit in trust.items()}


def shift_verdict(
    scores: dict[str, np.ndarray], reference: dict[str, np.ndarray] | None
) -> dict[str, Any]:
    """The verdict on a scan from its slices' :func:`prior_scores`.

    ``prior_gain``: 1 − the median held-back error, the share of unmeasured k-space energy the
    prior predicts (≤ 0: it cannot help here). With ``reference`` (the same scores of the
    cohort's hold-out acquired alike), per statistic the scan's median over the reference
    median — ``domain_shift_score`` (denoising) and ``held_back_shift_score`` — with the
    reference's 95th percentile as the same ratio (``..._threshold``); ``out_of_distribution``
    when either median exceeds its reference's 95th percentile.
    """
    held_back = _median(scores["held_back"])
    verdict: dict[str, Any] = {"prior_gain": _rounded(1.0 - held_back)}
    if reference is None:
        return verdict
    beyond = False
    for name, key in (("denoising", "domain_shift"), ("held_back", "held_back_shift")):
        median, base = _median(scores[name]), _median(reference[name])
        limit = float(np.nanquantile(reference[name], 0.95))
        verdict[f"{key}_score"] = _rounded(median / base)
        verdict[f"{key}_threshold"] = _rounded(limit / base)
        beyond |= bool(median > limit)  # False where undefined (NaN)
    verdict["reference_prior_gain"] = _rounded(1.0 - _median(reference["held_back"]))
    verdict["out_of_distribution"] = bool(beyond)
    return verdict


def _median(values: np.ndarray) -> float:
    """Median over the defined values; NaN when none is."""
    values = np.asarray(values, dtype=np.float64)
    return float(np.median(values[np.isfinite(values)])) if np.isfinite(values).any() else np.nan


def _rounded(value: float) -> float | None:
    """4 decimals for the report; None (JSON null) where undefined."""
    return round(float(value), 4) if np.isfinite(value) else None


def data_residual(op: MaskedOperator, y: torch.Tensor, images: np.ndarray) -> list[float]:
    """Per slice ‖A x − y‖ / ‖y‖ of complex reconstructions ``(B, C, H, W)``."""
    x = torch.from_numpy(images)
    residual = (op.A(x) - y).flatten(1).norm(dim=1) / y.flatten(1).norm(dim=1).clamp(min=1e-12)
    return [round(float(r), 6) for r in residual]


def new_scan_measurements(
    path: Path, size: int, ingest: dict[str, Any]
) -> tuple[MultiCoilSense, torch.Tensor, np.ndarray, np.ndarray, np.ndarray]:
    """A raw k-space file as ``reconstruct.input`` reconstructs it: fitted to the model's
    ``size`` grid, coil maps from its calibration lines, scaled by the ``ingest`` section's
    intensity convention. Returns the operator, its measurements ``y`` ``(S, coils, size,
    size, 2)``, and the scaled k-space ``(S, coils, size, size)``, maps (same shape) and line
    mask ``(S, size)`` they are made of."""
    raw = read_raw(path, 10**10)
    kspace, lines = fit_kspace(raw.kspace, raw.line_mask, size)
    maps, kspace, _ = calibrate(
        kspace, lines, 0.0, path.name, ingest["intensity_percentile"], ingest["intensity_band"]
    )
    op = MultiCoilSense(torch.from_numpy(lines), torch.from_numpy(maps))
    return op, torch.view_as_real(torch.from_numpy(kspace)).float(), kspace, maps, lines


def reconstruct_new_files(
    net,
    meta: dict[str, Any],
    cfg: dict[str, Any],
    folder: Path,
    files_dir: Path,
    store=None,
) -> list[dict[str, Any]]:
    """Reconstructs every raw k-space file of ``folder`` as acquired (no reference exists).

    Each file is prepared exactly as ingest prepares training data (centre crop to the
    model's size, ESPIRiT maps from the ACS lines, the ACS-based scaling), then reconstructed
    by zero-filling, CS (λ as the cohort's own reconstruction chooses it for the scan's coils
    and R, :func:`cohort_cs_lambda`; the middle candidate without the cohort's slices) and the
    diffusion samplers. Outputs: NIfTI per method, a derived DICOM series of the first
    sampler, a PNG panel (zero-filled | CS | samplers).

    Returns one report per file (named ``newNNN``, never by its file name): per slice, each
    diffusion method's residual ‖A x − y‖ / ‖y‖ on the measurements and, for ambient models,
    :func:`held_back_errors`, with :func:`shift_verdict` against the cohort's hold-out slices
    acquired alike (from ``store``); a scan out of the cohort's distribution, or one the prior
    cannot help, is also a warning in the log.
    """
    rc = cfg["reconstruct"]
    seed = cfg["cohort"]["seed"]
    size = int(meta["image_size"])
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file() and is_raw(p))
    if not files:
        raise AmbientMedError(f"config key 'reconstruct.input': no raw k-space file in '{folder}'")
    samplers = list(rc["samplers"])
    reports: list[dict[str, Any]] = []
    references: dict[tuple[int, int], np.ndarray | None] = {}
    lambdas: dict[tuple[int, int], float | None] = {}
    clean_store = store if store is not None and meta["kind"] != "native" else None
    for number, path in enumerate(files):
        op, y, kspace, maps, lines = new_scan_measurements(path, size, cfg["ingest"])
        zero_filled = op.A_adjoint(y)
        results = {"zero_filled": magnitude(zero_filled)}
        # The cohort acquired like this scan: its coils, its R (rounded to a whole one).
        rate = max(2, round(lines.shape[-1] / float(lines.sum(-1).mean())))
        setting = (int(kspace.shape[1]), rate)
        if setting not in lambdas:
            lambdas[setting] = (
                None if clean_store is None else cohort_cs_lambda(cfg, clean_store, *setting)
            )
        # Without the cohort's slices, the middle candidate.
        lamda = lambdas[setting] or sorted(rc["cs_lambdas"])[len(rc["cs_lambdas"]) // 2]
        results["cs_l1"] = np.stack(
            [np.abs(l1_wavelet(kspace[s], maps[s], lines[s], lamda)) for s in range(len(kspace))]
        ).astype(np.float32)
        calibration = phase_calibration(rc, op, y, seed)
        pocs = (calibration or fixed_calibration(op, y, rc)).pocs(op, y)
        results["pocs"] = magnitude(pocs)
        complex_images: dict[str, np.ndarray] = {}
        learned, _ = diffusion_methods(
            net, meta, rc, op, y, seed, images_out=complex_images, calibration=calibration
        )
        name = f"new{number:03d}"
        report: dict[str, Any] = {"scan": name, "slices": int(len(kspace)), "cs_lambda": lamda}
        if calibration is not None:
            report["phase_calibration"] = calibration.choice[0]
            if calibration.damping is not None:
                report["sense_damping"] = calibration.damping
            if bool(calibration.constrained.any()):
                report["pocs_rounds"] = int(torch.as_tensor(calibration.rounds).max())
        if rc["guard"]:
            # Keep of each slice's contribution beyond its base — pocs where the scan's
            # held-back lines chose a phase constraint, else zero-filled — only the share
            # those lines support: none where the sampler predicts them no better, so a scan
            # the prior cannot help comes back as that base. (With estimated coil maps
            # zero-filled is not data-consistent either; it is the floor users know.)
            trust = sampler_trust(net, meta, rc, op, y, seed, calibration)
            report["guard_trust"] = {m: [round(float(g), 4) for g in v] for m, v in trust.items()}
            base = zero_filled if calibration is None else pocs
            for method, image in complex_images.items():
                scale = torch.from_numpy(trust[method]).view(-1, 1, 1, 1)
                guarded = base + scale * (torch.from_numpy(image) - base)
                complex_images[method] = guarded.numpy()
                learned[method] = magnitude(guarded)
        if meta["mode"] == "ambient" and meta["image_channels"] == 2:
            scores = prior_scores(net, meta, op, y, seed)
            report["held_back_error"] = [_rounded(e) for e in scores["held_back"]]
            report["denoising_error"] = [_rounded(e) for e in scores["denoising"]]
        results |= learned
        # Zero-filled A^H y is the floor: with estimated coil maps no image fits every coil's
        # lines exactly, so what a sampler must not do is land further from them.
        complex_images["zero_filled"] = zero_filled.numpy()
        complex_images["pocs"] = pocs.numpy()
        report["residual"] = {m: data_residual(op, y, im) for m, im in complex_images.items()}
        if "held_back_error" in report:
            if store is not None and setting not in references:
                references[setting] = shift_reference(net, meta, cfg, store, *setting)
            report |= shift_verdict(scores, references.get(setting))
            if report.get("out_of_distribution"):
                log.warning(
                    "%s: unlike the training cohort (the prior denoises it %s× worse than the "
                    "cohort hold-out, threshold %s×; predicts its held-back lines %s× worse, "
                    "threshold %s×); every reconstruction still ends on its measurements",
                    name,
                    *(
                        "n/a" if report[k] is None else f"{report[k]:.2f}"
                        for k in (
                            "domain_shift_score",
                            "domain_shift_threshold",
                            "held_back_shift_score",
                            "held_back_shift_threshold",
                        )
                    ),
                )
            if report["prior_gain"] is not None and report["prior_gain"] <= 0:
                log.warning(
                    "%s: the prior predicts none of its unmeasured k-space (gain %.3f): expect "
                    "zero-filled quality from the diffusion samplers",
                    name,
                    report["prior_gain"],
                )
        reports.append(report)
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
    return reports


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
    store = read_slices(slices_path)
    if rc["input"]:
        scans = reconstruct_new_files(net, meta, cfg, Path(rc["input"]), files_dir, store)
        metrics["new_files"] = len(scans)
        metrics["new_scans"] = scans
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
        op, y, results, seconds, lamda, calibration = retrospective(
            rc, acceleration, store, holdout, validation, keys, seed
        )
        metrics[f"cs_l1_{tag}_lambda"] = lamda
        if calibration is not None:
            # Slices per calibration the phase constraint chose (docs/samplers.md).
            metrics[f"phase_calibration_{tag}"] = {
                name: calibration.choice.count(name) for name in sorted(set(calibration.choice))
            }
            if calibration.damping is not None:
                metrics[f"sense_damping_{tag}"] = calibration.damping
            # Slices per count of the alternations that end pocs and the samplers.
            counts = torch.as_tensor(calibration.rounds).expand(len(y))[calibration.constrained]
            metrics[f"pocs_rounds_{tag}"] = {
                str(count): int((counts == count).sum()) for count in counts.unique().tolist()
            }
        spread: dict[str, np.ndarray] = {}
        learned, learned_seconds = diffusion_methods(
            net, meta, rc, op, y, seed, spread, calibration=calibration
        )
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
        columns += [(m, results[m][middle]) for m in ("zero_filled", "cs_l1", "pocs")]
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
    if isinstance(op, PixelMask):
        return PixelMask(op.mask[index])
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
