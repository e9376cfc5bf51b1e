"""Does a contrast-, plane- and scale-randomised demo prior help on scans unlike the demo cohort?

Three ambient k-space models of the demo cohort, the same budget and subjects: ``t1w_axial``
(the default demo: T1-weighted, axial, whole head), ``mixed`` (``demo.contrast: mixed``,
``demo.orientation: mixed`` — SynthSeg-style randomisation of contrast and slice plane) and
``mixed_zoom`` (the same, with ``demo.zoom: [1, 4]``: fields of view down to a quarter of the
head). Each reconstructs the same new scans the way a user would, through
``reconstruct.input``: real MR slices that ship with nibabel and pydicom (T1-weighted
``anatomical.nii``, a 66 x 82 mm crop of a brain; the T2*-weighted EPI ``example4d``; the
spin-echo ``MR_small``), demo heads no model saw (T1w / T2w / PD axial, T1w coronal), and two
controls for the field of view (the unseen T1w head cropped as the real T1 is, the real T1
zero-padded into a whole-head field of view), each given a smooth phase and coil maps that
span a head-sized field (``--scan-field head``, :func:`head_field`: a crop gets its part of a
head's; ``fov``: each scan's own field, the simulation before), 4 coils and R = 4
(equispaced, 20 % centre) and written as fastMRI files. Rows: ``{model, scan, psnr: {method:
dB}, domain_shift_score, domain_shift_threshold, out_of_distribution, prior_gain,
phase_calibration}`` with zero-filled, CS and pocs beside the diffusion samplers (PSNR
against the fully sampled coil-combined image, on the model's intensity scale).

    python benchmarks/robust_prior.py            # CPU: a few minutes per model
    python benchmarks/robust_prior.py --short    # seconds: the test suite's version

The same scans through a model trained elsewhere — e.g. the workflow's default demo model
(``snakemake --cores 2 train``), the one a user gets — instead of the three:

    python benchmarks/robust_prior.py --model results/demo/train/model.pt \
        --model-slices results/demo/ingest/slices.h5 --name robust_prior_default \
        --scans t1_anatomical t1_anatomical_padded epi_b0 t2_spin_echo demo_t1w_crop

(``--scans``: a subset of the scans, each with the seed it has in the full run;
``--mask-draws K``: each scan acquired K times with K line masks, a row each — on the T1's
41 columns one mask's draw moves the result by a dB.) The scans
are acquired with 4 coils, equispaced, a 20 % centre (ESPIRiT's 6 calibration lines on the
T1's 41 columns; it leaves the T1 two lines outside the centre); ``--coils 1
--center-fraction 0.08 --mask-type random`` acquires them as the workflow's
``reconstruct`` does by default (no coil maps to estimate). Each model also gets a row
``cohort_holdout``: the workflow's own reconstruction metrics (PSNR) on its cohort's hold-out,
what the prior gains where it is in distribution.

A control for the real T1: ``--crop-prior`` trains (and scores) one prior instead, on demo
T1w heads cropped exactly as the T1 is and brought onto the grid as the T1 is — a prior that
knows the T1's field of view and band; at the default demo model's budget:

    python benchmarks/robust_prior.py --crop-prior --image-size 64 --steps 600 --subjects 8 \
        --name robust_prior_crop_1coil --scans t1_anatomical demo_t1w_crop \
        --coils 1 --center-fraction 0.08 --mask-type random

A control for anatomy: ``--t1-prior`` trains one prior on the real T1's own slices that the
scan does not hold (each its own pseudo-subject, the last two held out) — a prior of the very
head it reconstructs; its hold-out row is then two of those slices:

    python benchmarks/phase_model.py --cohort-phase varied --t1-prior --image-size 64 \
        --steps 1200 --name robust_prior_t1own_rot_varied_1coil \
        --workdir benchmarks/work/robust_t1own --scans t1_anatomical demo_t1w_crop \
        --coils 1 --center-fraction 0.08 --mask-type random --rotate-phase --mirror-rows

``--phase-constraint on|off|auto`` and ``--phase-window`` set ``reconstruct.phase_constraint``
and ``reconstruct.phase_window`` (the pocs column is there either way). Resumable: models
are trained (and resumed) under ``--workdir``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, demo_slices, load_config, start, write_results  # noqa: E402

from ambient_med.config import stage_config  # noqa: E402
from ambient_med.io.demo import (  # noqa: E402
    load_template,
    posed,
    pseudo_subject,
    simulate_multicoil_kspace,
    write_fastmri,
)
from ambient_med.io.kspace import fit_kspace  # noqa: E402
from ambient_med.io.slicing import intensity_scale  # noqa: E402
from ambient_med.io.store import SliceIndex, SliceStore, load_torch, write_slices  # noqa: E402
from ambient_med.physics.masks import LineMaskFunc  # noqa: E402
from ambient_med.stages import corrupt, reconstruct, train  # noqa: E402

MODELS = {
    "t1w_axial": {"contrast": "t1w", "orientation": "axial", "zoom": [1.0, 1.0]},
    "mixed": {"contrast": "mixed", "orientation": "mixed", "zoom": [1.0, 1.0]},
    # ... and scale: crops down to a quarter of the head's extent (nibabel's T1 is a
    # 66 x 82 mm crop of a brain; a demo head cropped alike is as far out of distribution).
    "mixed_zoom": {"contrast": "mixed", "orientation": "mixed", "zoom": [1.0, 4.0]},
}
# Demo heads no model saw: (contrast, plane).
NEW_HEADS = {
    "demo_t1w_axial": ("t1w", "axial"),
    "demo_t2w_axial": ("t2w", "axial"),
    "demo_pd_axial": ("pd", "axial"),
    "demo_t1w_coronal": ("t1w", "coronal"),
}
NEW_HEAD_SEED = 4242
METHODS = ("zero_filled", "cs_l1", "pocs", "diffusion_dc", "diffusion_dps", "diffusion_one_step")
REPORTED = (
    "prior_gain",
    "domain_shift_score",
    "domain_shift_threshold",
    "held_back_shift_score",
    "out_of_distribution",
    "phase_calibration",
    "sense_damping",
    "pocs_rounds",
    "cs_lambda",
)


def covered(planes: np.ndarray, share: float) -> np.ndarray:
    """``(S,)`` True for the planes ``(S, H, W)`` where the head (above 10 % of the volume's
    maximum) covers more than ``share`` of the plane."""
    return (planes > 0.1 * planes.max()).mean(axis=(1, 2)) > share


def centre_crop(planes: np.ndarray, height: int, width: int) -> np.ndarray:
    """The central ``height x width`` of each plane ``(S, H, W)``."""
    x0, y0 = (planes.shape[1] - height) // 2, (planes.shape[2] - width) // 2
    return planes[:, x0 : x0 + height, y0 : y0 + width]


def real_slices() -> dict[str, np.ndarray]:
    """Real MR images shipped with the dependencies, as magnitude slices: nibabel's
    T1-weighted ``anatomical.nii`` and the first volume of its EPI ``example4d.nii.gz``
    (T2*-weighted), and pydicom's spin-echo ``MR_small.dcm``."""
    import nibabel as nib
    import pydicom
    from pydicom.data import get_testdata_file

    data = os.path.join(os.path.dirname(nib.__file__), "tests", "data")
    anatomical = np.asarray(nib.load(os.path.join(data, "anatomical.nii")).dataobj, np.float32)
    epi = np.asarray(nib.load(os.path.join(data, "example4d.nii.gz")).dataobj, np.float32)[..., 0]
    spin_echo = pydicom.dcmread(get_testdata_file("MR_small.dcm")).pixel_array.astype(np.float32)

    def axial(volume: np.ndarray, every: int) -> np.ndarray:
        planes = np.moveaxis(volume, 2, 0)
        return planes[covered(planes, 0.2)][::every]

    return {
        "t1_anatomical": axial(anatomical, 3),
        "epi_b0": axial(epi, 4),
        "t2_spin_echo": spin_echo[None],
    }


def demo_head(contrast: str, plane: str, size: int, voxel_mm: float = 3.0) -> np.ndarray:
    """Slices of a demo subject no cohort holds (seed :data:`NEW_HEAD_SEED`), ``(S, size,
    size)``, every fourth of those with the head covering 30 % of the plane."""
    tissues, _ = load_template(voxel_mm)
    volume = posed(pseudo_subject(tissues, NEW_HEAD_SEED, voxel_mm, contrast), plane)
    planes = torch.from_numpy(np.moveaxis(volume, 2, 0)[:, None].astype(np.float32))
    planes = F.interpolate(planes, size=(size, size), mode="bilinear", antialias=True)[:, 0]
    planes = planes.numpy()
    return planes[covered(planes, 0.3)][::4]


def field_of_view_controls(real_t1: np.ndarray, voxel_mm: float = 2.0) -> dict[str, np.ndarray]:
    """Two controls for the real T1's field of view, a 66 x 82 mm crop of the brain at 2 mm
    (33 x 41 voxels): the unseen demo T1w head cropped alike (``demo_t1w_crop``: anatomy
    the demo knows, the real scan's field of view), and the real slices zero-padded into a
    220 mm whole-head field of view (``t1_anatomical_padded``)."""
    tissues, _ = load_template(voxel_mm)
    volume = posed(pseudo_subject(tissues, NEW_HEAD_SEED, voxel_mm, "t1w"), "axial")
    planes = np.moveaxis(volume, 2, 0)
    height, width = real_t1.shape[1:]
    crop = centre_crop(planes[covered(planes, 0.3)][::4], height, width)
    side = round(220 / voxel_mm)
    padded = np.zeros((len(real_t1), side, side), np.float32)
    px, py = (side - height) // 2, (side - width) // 2
    padded[:, px : px + height, py : py + width] = real_t1
    return {"demo_t1w_crop": crop, "t1_anatomical_padded": padded}


# Scans whose voxel size (mm) says how much of a head they show; their simulated phase and coil
# maps span a head-sized field (HEAD_FIELD_MM) or their own, whichever is larger. The others
# show a whole head on their grid: the demo heads, drawn onto it, and the spin echo, whose
# DICOM pixel spacing (0.31 mm, a 20 mm field) does not describe its whole-head image.
SCAN_VOXEL_MM = {"t1_anatomical": 2.0, "demo_t1w_crop": 2.0, "epi_b0": 2.0}
HEAD_FIELD_MM = 220.0


def head_field(name: str, shape: tuple[int, int], scan_field: str) -> tuple[int, int] | None:
    """The field ``(FH, FW)`` (pixels) the simulated phase and coil maps of scan ``name`` of
    in-plane ``shape`` span: with ``scan_field="head"`` a head-sized field where the scan
    shows less (nibabel's T1, a 66 x 82 mm crop, sees the smooth phase of a head vary over
    its 66 mm as a head's does there); ``None`` (the scan's own field, as a whole-head scan
    has) otherwise — with ``"fov"``, how these scans were simulated before."""
    if scan_field != "head" or name not in SCAN_VOXEL_MM:
        return None
    side = round(HEAD_FIELD_MM / SCAN_VOXEL_MM[name])
    return max(shape[0], side), max(shape[1], side)


def write_scan(
    folder: Path,
    name: str,
    slices: np.ndarray,
    seed: int,
    coils: int = 4,
    center_fraction: float = 0.2,
    mask_type: str = "equispaced",
    field: tuple[int, int] | None = None,
    mask_seed: int | None = None,
) -> np.ndarray:
    """Magnitude slices → ``coils``-coil k-space with a smooth phase (over the head ``field``,
    :func:`head_field`), R = 4 (by default equispaced with a 20 % centre: ESPIRiT needs 6
    calibration lines of the T1's 41 phase-encode columns), written as a fastMRI file;
    returns the fully sampled k-space (which the file never holds). ``seed`` draws the
    phase and, unless ``mask_seed`` does, the line mask."""
    kspace = simulate_multicoil_kspace(
        slices.astype(np.float32), coils=coils, seed=seed, head_field=field
    )
    line_mask = LineMaskFunc([center_fraction], [4], mask_type)(
        kspace.shape[-1], seed if mask_seed is None else mask_seed
    )
    write_fastmri(folder / f"{name}.h5", kspace, line_mask)
    return kspace


def reference_magnitudes(full: np.ndarray, size: int) -> np.ndarray:
    """The image the model's grid can show of fully sampled k-space ``(S, coils, H, W)``:
    fitted as a file's is, then root-sum-of-squares over coils."""
    fitted, _ = fit_kspace(full, np.ones((len(full), full.shape[-1]), bool), size)
    axes = (-2, -1)
    coil_images = np.fft.fftshift(
        np.fft.ifft2(np.fft.ifftshift(fitted, axes=axes), norm="ortho"), axes=axes
    )
    return np.sqrt((np.abs(coil_images) ** 2).sum(axis=1))


def grid_magnitudes(planes: np.ndarray, size: int) -> np.ndarray:
    """Magnitude planes ``(S, h, w)`` brought onto the model's ``size`` grid as a new scan's
    k-space is (:func:`reference_magnitudes`: zero-padded), ``(S, size, size)``."""
    kspace = np.fft.fftshift(
        np.fft.fft2(np.fft.ifftshift(planes, axes=(-2, -1)), norm="ortho"), axes=(-2, -1)
    )
    return reference_magnitudes(kspace[:, None], size)


def psnr_on_model_scale(truth: np.ndarray, zero_filled: np.ndarray, image: np.ndarray) -> float:
    """PSNR of ``image`` against ``truth`` brought to the reconstructions' intensity scale (the
    median ratio of zero-filled to truth over the head)."""
    inside = truth > 0.2 * truth.max()
    scaled = truth * np.median(zero_filled[inside] / np.maximum(truth[inside], 1e-9))
    mse = float(np.mean((scaled - image) ** 2))
    return 10 * np.log10(float(scaled.max()) ** 2 / mse)


CROP_SEED = 5000
# Mask seed of a scan's further acquisitions (--mask-draws): its own seed plus this per draw.
MASK_DRAW_STRIDE = 1000
T1_MATRIX = (33, 41)  # nibabel's anatomical.nii in plane, 2 mm voxels


def train_prior(config: dict, folder: Path, slices: Path) -> Path:
    """A k-space model of the slice store ``slices``, trained (or resumed) under ``folder``
    with ``config``'s demo cohort settings; returns the model file. Modes other than
    ``clean`` train on the measurements ``corrupt`` makes of it."""
    cfg = stage_config(config, "demo", "train")
    examples = slices
    if cfg["cohort"]["train_mode"] != "clean":
        examples = folder / "kspace.h5"
        if not examples.exists():
            corrupt.run(stage_config(config, "demo", "corrupt"), "kspace", slices, examples)
    train.run(cfg, examples, folder / "model.pt", folder / "loss.csv", folder / "ck")
    return folder / "model.pt"


def crop_cohort(config: dict, folder: Path, size: int, subjects: int) -> Path:
    """A slice store of demo T1w heads cropped as nibabel's T1 is — 66 x 82 mm at 2 mm (33 x
    41 voxels), brought onto the ``size`` grid the way the new-scan path brings the T1 (its
    k-space zero-padded) — ``subjects`` of them (seeds ``CROP_SEED + i``, none a scan here),
    the last two held out. The control for a prior that knows the T1's field of view and
    band: what such a prior gains at a given budget."""
    slices = folder / "slices.h5"
    if slices.exists():
        return slices
    tissues, _ = load_template(2.0)
    ingest = config["ingest"]
    images, subject, slice_index = [], [], []
    for number in range(subjects):
        volume = posed(pseudo_subject(tissues, CROP_SEED + number, 2.0, "t1w"), "axial")
        planes = np.moveaxis(volume, 2, 0)
        kept = np.flatnonzero(covered(planes, 0.3))
        crops = centre_crop(planes[kept], *T1_MATRIX)
        on_grid = grid_magnitudes(crops, size)
        on_grid /= intensity_scale(
            on_grid, ingest["intensity_percentile"], ingest["intensity_band"]
        )
        images.append(on_grid.astype(np.float32))
        subject += [number] * len(crops)
        slice_index += kept.tolist()
    index = SliceIndex(
        np.asarray(subject, np.int32),
        np.asarray(slice_index, np.int32),
        [f"crop{number}" for number in range(subjects)],
        ["train"] * (subjects - 2) + ["holdout"] * 2,
        np.stack([np.eye(4)] * subjects),
    )
    write_slices(slices, SliceStore(np.concatenate(images), index, {"cohort": "demo"}))
    return slices


def t1_cohort(config: dict, folder: Path, size: int) -> Path:
    """A slice store of the real T1's own slices that no scan here holds (the scan takes every
    third of ``anatomical.nii``'s covered planes; these are the ones between), each its own
    pseudo-subject (so each gets its own simulated phase), brought onto the ``size`` grid as
    the scan is, the last two held out. The control for anatomy: a prior of the very head it
    reconstructs, at a given budget, is the most a prior of that budget can gain on the scan."""
    import nibabel as nib

    slices = folder / "slices.h5"
    if slices.exists():
        return slices
    data = os.path.join(os.path.dirname(nib.__file__), "tests", "data", "anatomical.nii")
    volume = np.asarray(nib.load(data).dataobj, np.float32)
    planes = np.moveaxis(volume, 2, 0)
    kept = np.flatnonzero(covered(planes, 0.2))
    unscanned = np.setdiff1d(kept, kept[::3])
    on_grid = grid_magnitudes(planes[unscanned], size)
    ingest = config["ingest"]
    on_grid /= intensity_scale(on_grid, ingest["intensity_percentile"], ingest["intensity_band"])
    count = len(unscanned)
    index = SliceIndex(
        np.arange(count, dtype=np.int32),
        unscanned.astype(np.int32),
        [f"t1slice{number}" for number in range(count)],
        ["train"] * (count - 2) + ["holdout"] * 2,
        np.stack([np.eye(4)] * count),
    )
    write_slices(slices, SliceStore(on_grid.astype(np.float32), index, {"cohort": "demo"}))
    return slices


def main(argv: list[str] | None = None) -> Path:
    import nibabel as nib

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=Path("config/config.yaml"))
    parser.add_argument("--workdir", type=Path, default=Path("benchmarks/work/robust_prior"))
    parser.add_argument("--results", type=Path, default=None, help="default: benchmarks/results")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--subjects", type=int, default=12)
    parser.add_argument("--short", action="store_true", help="tiny config, seconds")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--model", type=Path, default=None, help="score this model file instead of training three"
    )
    parser.add_argument("--model-slices", type=Path, default=None, help="its cohort's slice store")
    parser.add_argument("--name", default="robust_prior", help="results file NAME.json")
    parser.add_argument("--scans", nargs="+", default=None, help="only these scans (default: all)")
    parser.add_argument(
        "--crop-prior",
        action="store_true",
        help="train and score one prior of demo T1w heads cropped as the real T1 is (a control)",
    )
    parser.add_argument(
        "--t1-prior",
        action="store_true",
        help="train and score one prior of the real T1's own unscanned slices (a control)",
    )
    parser.add_argument(
        "--rotate-phase", action="store_true", help="train with train.rotate_phase: true"
    )
    parser.add_argument(
        "--mirror-rows", action="store_true", help="train with train.mirror_rows: true"
    )
    parser.add_argument(
        "--phase-constraint",
        choices=("on", "off", "auto"),
        help="reconstruct.phase_constraint (default: the config's)",
    )
    parser.add_argument(
        "--phase-window", type=float, help="reconstruct.phase_window (default: the config's)"
    )
    parser.add_argument(
        "--train-mode",
        choices=("ambient", "naive", "clean"),
        default="ambient",
        help="clean: the control a prior of fully sampled images gives",
    )
    acquired = parser.add_argument_group("how the new scans are acquired (R = 4)")
    acquired.add_argument("--coils", type=int, default=4)
    acquired.add_argument("--center-fraction", type=float, default=0.2)
    acquired.add_argument("--mask-type", choices=("equispaced", "random"), default="equispaced")
    acquired.add_argument(
        "--mask-draws",
        type=int,
        default=1,
        help="acquire each scan this many times, each with its own line mask (a row each): "
        "how much of a scan's result is its one mask",
    )
    acquired.add_argument(
        "--scan-field",
        choices=("head", "fov"),
        default="head",
        help="what the simulated phase and coil maps span: a head-sized field (head), or each "
        "scan's own field of view (fov: a crop's vary over it as a head's over the head)",
    )
    args = parser.parse_args(argv)
    if sum(map(bool, (args.model, args.crop_prior, args.t1_prior))) > 1:
        parser.error("--model, --crop-prior and --t1-prior each name the one prior to score")
    if args.mask_draws < 1:
        parser.error("--mask-draws must be at least 1")
    if args.model and not args.model_slices:
        parser.error("--model needs --model-slices (the hold-out the domain-shift score uses)")
    if args.model:  # the demo heads are drawn on the given model's grid
        args.image_size = int(load_torch(args.model, what="model")["image_size"])
    started = start(args.threads)
    config = load_config(args.config, Path("config/tiny.yaml") if args.short else None)
    config["ingest"]["image_size"] = args.image_size
    config["demo"]["subjects"] = args.subjects
    config["train"] |= {
        "steps": args.steps,
        "checkpoint_every": args.steps,
        "rotate_phase": args.rotate_phase,
        "mirror_rows": args.mirror_rows,
    }
    config["reconstruct"] |= {"accelerations": [4], "samplers": ["dc", "dps", "one_step"]}
    if args.phase_constraint:
        setting = {"on": True, "off": False, "auto": "auto"}
        config["reconstruct"]["phase_constraint"] = setting[args.phase_constraint]
    if args.phase_window:
        config["reconstruct"]["phase_window"] = args.phase_window
    config["cohorts"]["demo"] |= {"corruption": "kspace", "train_mode": args.train_mode}
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)

    scans = work / "new_scans"
    heads = {name: demo_head(c, p, args.image_size) for name, (c, p) in NEW_HEADS.items()}
    real = real_slices()
    new = {**real, **heads, **field_of_view_controls(real["t1_anatomical"])}
    scans.mkdir(exist_ok=True)
    for stale in scans.glob("*.h5"):  # an earlier run's scan list may have been another
        stale.unlink()
    # reconstruct.input reads files in name order and names them new000, new001, ...
    # Each scan keeps its number (and so its seed: phase, coils, mask) when --scans picks some.
    numbers = {name: number for number, name in enumerate(sorted(new))}
    unknown = set(args.scans or ()) - set(numbers)
    if unknown:
        parser.error(f"--scans: no scan named {', '.join(sorted(unknown))}")
    names = sorted(args.scans or numbers, key=numbers.get)
    # (scan, draw, fully sampled k-space) per file, in the files' name order. Draw 0 is the
    # scan's own acquisition; further draws acquire the same phased scan with other masks.
    written = []
    for name in names:
        number = numbers[name]
        for draw in range(args.mask_draws):
            stem = f"{number:02d}_{name}" + (f"_m{draw}" if args.mask_draws > 1 else "")
            full = write_scan(
                scans,
                stem,
                new[name],
                seed=10 + number,
                coils=args.coils,
                center_fraction=args.center_fraction,
                mask_type=args.mask_type,
                field=head_field(name, new[name].shape[1:], args.scan_field),
                mask_seed=10 + number + MASK_DRAW_STRIDE * draw,
            )
            written.append((name, draw, full))

    # (name, model file, its cohort's slice store, where its outputs go)
    models = []
    if args.model:  # a model trained elsewhere, e.g. the workflow's default demo model
        models.append(("given", args.model, args.model_slices, work / "given"))
    if args.crop_prior:
        folder = work / "t1_crop"
        folder.mkdir(exist_ok=True)
        slices = crop_cohort(config, folder, args.image_size, args.subjects)
        models.append(("t1_crop", train_prior(config, folder, slices), slices, folder))
    if args.t1_prior:
        folder = work / "t1_own"
        folder.mkdir(exist_ok=True)
        slices = t1_cohort(config, folder, args.image_size)
        models.append(("t1_own", train_prior(config, folder, slices), slices, folder))
    for model, demo in (
        MODELS.items() if not (args.model or args.crop_prior or args.t1_prior) else ()
    ):
        config["demo"] |= demo
        folder = work / model
        folder.mkdir(exist_ok=True)
        slices = demo_slices(config, folder)
        models.append((model, train_prior(config, folder, slices), slices, folder))

    rows = []
    for model, model_path, slices, folder in models:
        rc_cfg = stage_config(config, "demo", "reconstruct")
        rc_cfg["reconstruct"]["input"] = str(scans)
        files = folder / "files"
        metrics_path = folder / "metrics.json"
        reconstruct.run(rc_cfg, model_path, slices, files, metrics_path)
        metrics = json.loads(metrics_path.read_text())
        reports = {r["scan"]: r for r in metrics["new_scans"]}
        # The same model on its own cohort's hold-out (the workflow's reconstruct metrics:
        # its acquisition, its PSNR): what the prior gains where it is in distribution.
        rows.append(
            {
                "model": model,
                "image_size": args.image_size,
                "scan": "cohort_holdout",
                "slices": metrics["holdout_slices"],
                "psnr": {m: round(metrics[f"{m}_R4_psnr"], 3) for m in METHODS},
            }
        )
        for number, (name, draw, full) in enumerate(written):
            scan = f"new{number:03d}"
            images = {
                m: np.moveaxis(nib.load(files / f"{scan}_{m}.nii.gz").get_fdata(), -1, 0)
                for m in METHODS
            }
            truth = reference_magnitudes(full, args.image_size)
            report = reports[scan]
            rows.append(
                {
                    "model": model,
                    "image_size": args.image_size,
                    "scan": name,
                    **({"mask_draw": draw} if args.mask_draws > 1 else {}),
                    "slices": report["slices"],
                    "psnr": {
                        m: round(psnr_on_model_scale(truth, images["zero_filled"], im), 3)
                        for m, im in images.items()
                    },
                    **{key: report.get(key) for key in REPORTED},
                }
            )
            logging.info("%s", rows[-1])
    path = write_results(args.name, started, rows, args.results or RESULTS)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
