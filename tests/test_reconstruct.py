"""Metrics, baselines, samplers and the reconstruct stage."""

import json
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from conftest import tiny_config
from PIL import Image
from scipy.ndimage import uniform_filter
from torch import nn

from ambient_med.config import stage_config
from ambient_med.diffusion.model import build_ddim
from ambient_med.diffusion.samplers import (
    end_on_data,
    one_step_reconstruction,
    posterior_sample,
)
from ambient_med.evaluation.metrics import nrmse, psnr, slice_metrics, ssim
from ambient_med.physics.coils import birdcage
from ambient_med.physics.masks import LineMaskFunc
from ambient_med.physics.operators import (
    Identity,
    MultiCoilSense,
    SingleCoilFourier,
    alternate_projections,
    data_consistent,
    fft2c,
    to_channels,
)
from ambient_med.physics.recon import (
    acs_hann_phase,
    calibration_phase,
    choose_lambda,
    l1_wavelet,
    phase_constrained,
    phase_project,
)
from ambient_med.stages import corrupt, ingest, reconstruct, train


def _ssim_reference(x, y, data_range, window=7):
    """SSIM with a uniform window and population covariance, written out with scipy."""
    ux, uy = uniform_filter(x, window), uniform_filter(y, window)
    vx = uniform_filter(x * x, window) - ux * ux
    vy = uniform_filter(y * y, window) - uy * uy
    vxy = uniform_filter(x * y, window) - ux * uy
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
    pad = window // 2
    return s[pad:-pad, pad:-pad].mean()


def test_metrics_known_values():
    x = np.ones((8, 8))
    x[0, 0] = 2.0
    y = x.copy()
    y[1, 1] = 1.5  # one error of 0.5 among 64 pixels
    assert nrmse(x, y) == pytest.approx(0.5 / np.sqrt(63 + 4))
    assert psnr(x, y) == pytest.approx(20 * np.log10(2.0 / np.sqrt(0.25 / 64)))
    rng = np.random.default_rng(0)
    a = rng.random((40, 40))
    b = a + 0.1 * rng.standard_normal((40, 40))
    span = float(a.max() - a.min())
    assert ssim(a, a, span) == pytest.approx(1.0)
    assert ssim(a, b, span) == pytest.approx(_ssim_reference(a, b, span), abs=1e-5)
    per_slice = slice_metrics(np.stack([a, a]), np.stack([a, b]))
    assert per_slice["psnr"][0] > 100 and per_slice["ssim"][1] < 1


def _phantom(size=32):
    yy, xx = np.mgrid[:size, :size] / size - 0.5
    image = ((xx**2 + yy**2) < 0.16).astype(np.float32)
    image[(xx**2 + (yy - 0.1) ** 2) < 0.01] = 0.5
    return image


def test_cs_recovers_fully_sampled_data_and_picks_lambda():
    image = _phantom()
    kspace = fft2c(torch.from_numpy(np.stack([image, 0 * image]))[None])[0]
    ksp = (kspace[0] + 1j * kspace[1]).numpy()[None]
    full = np.ones(32, dtype=bool)
    rec = np.abs(l1_wavelet(ksp, np.ones_like(ksp), full, 1e-5, max_iter=100))
    assert nrmse(image, rec) < 0.02
    mask = LineMaskFunc([0.15], [3], "equispaced")(32, seed=0)
    lamda, scores = choose_lambda(
        lambda i, lam: np.abs(l1_wavelet(ksp * mask, np.ones_like(ksp), mask, lam)),
        [image],
        [1e-4, 1e-2, 10.0],
    )
    assert scores[10.0] > scores[lamda]  # an absurd weight loses


class Oracle(nn.Module):
    """Predicts a fixed image whatever it is shown (a prior that knows the answer)."""

    def __init__(self, image):
        super().__init__()
        self.image = image
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, z, mask_image, t):
        return self.scale * self.image.expand(z.shape[0], -1, -1, -1) + 0 * z


@pytest.mark.parametrize("method", ["dc", "dps"])
def test_posterior_samplers_reach_the_truth_with_an_oracle_prior(method):
    truth = torch.from_numpy(np.stack([_phantom(), 0 * _phantom()]))[None]
    lines = torch.from_numpy(LineMaskFunc([0.15], [4], "equispaced")(32, seed=1))[None]
    op = SingleCoilFourier(lines, 32)
    y = op.A(truth)
    ddim = build_ddim({"num_train_timesteps": 100, "schedule": "linear_beta"}, 10)
    out = posterior_sample(
        Oracle(truth),
        ddim,
        lambda b, step: Identity(b, 32, 32),
        op,
        y,
        (1, 2, 32, 32),
        torch.Generator().manual_seed(0),
        method=method,
    )
    assert float((out - truth).norm() / truth.norm()) < 1e-3
    torch.testing.assert_close(op.A(out), y, atol=1e-5, rtol=0)
    single = one_step_reconstruction(Oracle(truth), op, y)
    torch.testing.assert_close(single, truth)


def test_dps_is_deterministic_and_seeded():
    torch.manual_seed(0)
    net = nn.Sequential()

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 2, 3, padding=1)

        def forward(self, z, mask_image, t):
            return self.conv(torch.cat([z, mask_image], 1))

    net = Tiny()
    lines = torch.from_numpy(LineMaskFunc([0.15], [4])(16, seed=2))[None].expand(2, -1)
    op = SingleCoilFourier(lines, 16)
    y = op.A(torch.randn(2, 2, 16, 16, generator=torch.Generator().manual_seed(1)))
    ddim = build_ddim({"num_train_timesteps": 50, "schedule": "linear_beta"}, 5)
    runs = [
        posterior_sample(
            net,
            ddim,
            lambda b, s: Identity(b, 16, 16),
            op,
            y,
            (2, 2, 16, 16),
            torch.Generator().manual_seed(3),
            method="dps",
        )
        for _ in range(2)
    ]
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)
    # Whatever the (untrained) network says, DPS and one-step end on the measurements.
    torch.testing.assert_close(op.A(runs[0]), y, atol=1e-5, rtol=0)
    torch.testing.assert_close(op.A(one_step_reconstruction(net, op, y)), y, atol=1e-5, rtol=0)


def test_reconstruct_stage_writes_nifti_dicom_png_and_metrics(demo_dir, tmp_path):
    cfg = tiny_config()
    ingest.run(stage_config(cfg, "demo", "ingest"), demo_dir, tmp_path / "s.h5", tmp_path / "m.csv")
    corrupt.run(
        stage_config(cfg, "demo", "corrupt"), "kspace", tmp_path / "s.h5", tmp_path / "k.h5"
    )
    train.run(
        stage_config(cfg, "demo", "train"),
        tmp_path / "k.h5",
        tmp_path / "model.pt",
        tmp_path / "loss.csv",
        tmp_path / "ck",
    )
    files = tmp_path / "files"
    cfg["reconstruct"] |= {"posterior_samples": 2, "inference_mask": "scan"}
    reconstruct.run(
        stage_config(cfg, "demo", "reconstruct"),
        tmp_path / "model.pt",
        tmp_path / "s.h5",
        files,
        tmp_path / "recon.json",
    )
    metrics = json.loads((tmp_path / "recon.json").read_text())
    for method in ("zero_filled", "cs_l1", "diffusion_dc", "diffusion_dps", "diffusion_one_step"):
        for name in ("psnr", "ssim", "ssim_fg", "nrmse", "psnr_std", "seconds_per_slice"):
            assert np.isfinite(metrics[f"{method}_R4_{name}"])
    assert metrics["holdout_slices"] == 4 and metrics["holdout_volumes"] == 2
    # phase_constraint: auto — one calibration per hold-out volume, counted in slices.
    assert sum(metrics["phase_calibration_R4"].values()) == 4

    niftis = sorted(files.glob("*_R4_diffusion_dc.nii.gz"))
    assert len(niftis) == 2  # one per hold-out volume
    # Two posterior samples: their mean is the reconstruction, their spread a map beside it.
    spread = nib.load(str(niftis[0]).replace("_diffusion_dc.", "_diffusion_dc_std."))
    values = np.asarray(spread.dataobj)
    assert values.shape == nib.load(niftis[0]).shape and values.min() >= 0 and values.max() > 0
    assert not list(files.glob("*_diffusion_one_step_std.nii.gz"))  # deterministic
    with Image.open(files / "uncertainty_R4.png") as picture:
        assert picture.format == "PNG"
    image = nib.load(niftis[0])
    assert image.shape[:2] == (32, 32) and nib.aff2axcodes(image.affine) == ("R", "A", "S")
    dicom_dir = Path(str(niftis[0]).removesuffix(".nii.gz") + "_dicom")
    series = sorted(dicom_dir.iterdir())
    assert len(series) == image.shape[2]
    ds = pydicom.dcmread(series[0])
    assert list(ds.ImageType) == ["DERIVED", "SECONDARY"]
    assert str(ds.PatientName) == "" and ds.PatientID.startswith("sub-")
    assert ds.pixel_array.shape == (32, 32)
    # Its geometry is the NIfTI's: first slice position in LPS = RAS origin with x, y negated.
    origin = image.affine @ [0, 0, 0, 1]
    np.testing.assert_allclose(
        ds.ImagePositionPatient, [-origin[0], -origin[1], origin[2]], atol=1e-3
    )
    with Image.open(files / "panel_R4.png") as panel:
        assert panel.format == "PNG" and panel.size[0] > panel.size[1]


def test_the_last_projection_fits_sense_measurements_tighter_than_a_step_does():
    """end_on_data: exactly data_consistent for orthonormal operators; for SENSE a fit of the
    measurements several times tighter than the per-step projection's (which left DPS 3.1 dB
    below DC on a native 4-coil model at R = 2)."""
    generator = torch.Generator().manual_seed(0)
    lines = torch.from_numpy(np.stack([LineMaskFunc([0.08], [2])(32, seed=s) for s in range(2)]))
    sense = MultiCoilSense(lines, torch.from_numpy(birdcage(4, 32, 32)).expand(2, -1, -1, -1))
    truth, start = torch.randn(2, 2, 2, 32, 32, generator=generator)
    y = sense.A(truth)

    def residual(image: torch.Tensor) -> float:
        return float((sense.A(image) - y).norm() / y.norm())

    step, last = residual(data_consistent(sense, start, y)), residual(end_on_data(sense, start, y))
    assert last < step / 3, (step, last)
    fourier = SingleCoilFourier(lines, 32)
    torch.testing.assert_close(
        end_on_data(fourier, start, fourier.A(truth)),
        data_consistent(fourier, start, fourier.A(truth)),
    )


def _smooth_phase(size: int) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    return 1.2 * xx - 0.8 * yy + 0.6 * xx * yy


def test_phase_project_is_the_nearest_magnitude_under_the_phase():
    generator = torch.Generator().manual_seed(0)
    phase = _smooth_phase(16)[None]
    image = torch.randn(1, 2, 16, 16, generator=generator)
    projected = phase_project(image, phase)
    torch.testing.assert_close(phase_project(projected, phase), projected)  # idempotent
    magnitude_under_phase = to_channels(
        torch.rand(1, 16, 16, generator=generator) * torch.polar(torch.ones(1, 16, 16), phase)
    )
    torch.testing.assert_close(phase_project(magnitude_under_phase, phase), magnitude_under_phase)
    # Nearer to the image than any other member of the set.
    for _ in range(5):
        other = phase_project(torch.randn(1, 2, 16, 16, generator=generator), phase)
        assert (image - projected).norm() <= (image - other).norm()


def test_pocs_fills_unmeasured_lines_of_a_magnitude_image_under_a_smooth_phase():
    """A non-negative image under a smooth phase, R = 3 equispaced, 20 % centre: the central
    lines give the phase to within 0.25 rad on the object; POCS under the true phase cuts the
    zero-filled error by more than a third, under the estimated one by a tenth (the margin the
    phase estimate leaves, as on real scans), and ends on the measurements; under a flat
    phase it does worse."""
    size = 32
    phase = _smooth_phase(size)
    magnitude = torch.from_numpy(_phantom(size))
    truth = to_channels((magnitude * torch.polar(torch.ones(size, size), phase))[None])
    lines = torch.from_numpy(LineMaskFunc([0.2], [3], "equispaced")(size, seed=0))[None]
    op = SingleCoilFourier(lines, size)
    y = op.A(truth)

    def error(image: torch.Tensor) -> float:
        return float((image - truth).norm() / truth.norm())

    estimate = calibration_phase(op, y, 0.1)
    assert estimate.shape == (1, size, size)
    off = torch.angle(torch.polar(torch.ones(size, size), estimate[0] - phase))
    assert float(off[magnitude > 0].abs().max()) < 0.25
    zero_filled = error(op.A_adjoint(y))
    assert error(phase_constrained(op, y, phase[None])) < 0.65 * zero_filled
    pocs = phase_constrained(op, y, estimate)
    assert error(pocs) < 0.9 * zero_filled, (error(pocs), zero_filled)
    torch.testing.assert_close(op.A(pocs), y, atol=1e-5, rtol=0)
    assert error(phase_constrained(op, y, torch.zeros(1, size, size))) > error(pocs)


def test_alternations_run_each_example_its_own_count():
    """``rounds`` per example: each example of the batch comes back as it would from a run
    of its own count (bit for bit: the single-coil projection acts on each alone)."""
    size = 32
    phase = _smooth_phase(size)
    truth = to_channels(
        (torch.from_numpy(_phantom(size)) * torch.polar(torch.ones(size, size), phase))[None]
    ).expand(2, -1, -1, -1)
    masks = [LineMaskFunc([0.2], [3], "random")(size, seed=s) for s in range(2)]
    op = SingleCoilFourier(torch.from_numpy(np.stack(masks)), size)
    y = op.A(truth)

    def project(image: torch.Tensor) -> torch.Tensor:
        return phase_project(image, phase.expand(len(image), -1, -1))

    start = op.A_adjoint(y)
    both = alternate_projections(op, start, y, project, torch.tensor([3, 7]))
    for example, count in enumerate((3, 7)):
        alone = alternate_projections(op, start, y, project, count)
        torch.testing.assert_close(both[example], alone[example], atol=0.0, rtol=0.0)
    assert not torch.equal(both[0], alternate_projections(op, start, y, project, 7)[0])


def test_the_hann_tapered_calibration_phase_does_not_ring():
    """Under a constant phase, the auto-calibration lines under a Hann taper give that phase
    over the whole object; a box over the same lines rings, and its phase strays."""
    size = 32
    magnitude = torch.from_numpy(_phantom(size))
    truth = to_channels((magnitude * torch.polar(torch.ones(size, size), torch.tensor(0.7)))[None])
    lines = torch.from_numpy(LineMaskFunc([0.25], [3], "equispaced")(size, seed=0))[None]
    op = SingleCoilFourier(lines, size)
    y = op.A(truth)
    inside = magnitude > 0

    def stray(phase: torch.Tensor) -> float:
        return float(
            torch.angle(torch.polar(torch.ones(size, size), phase[0] - 0.7))[inside].abs().max()
        )

    assert stray(acs_hann_phase(op, y)) < 0.01
    assert stray(calibration_phase(op, y, 0.25)) > 0.1


def test_auto_phase_calibration_is_chosen_per_scan_on_held_back_lines():
    """``phase_constraint: auto``: a scan that is a magnitude under a smooth phase gets a
    calibration (and pocs beats zero-filled on it); a scan whose phase is noise gets none
    (its pocs is its zero-filled image); ``true`` holds every slice to the central window,
    ``false`` to nothing."""
    size = 64
    magnitude = torch.from_numpy(_phantom(size))
    generator = torch.Generator().manual_seed(0)
    smooth = magnitude * torch.polar(torch.ones(size, size), _smooth_phase(size))
    noise = torch.rand(size, size, generator=generator) * 2 * torch.pi
    rough = magnitude * torch.polar(torch.ones(size, size), noise)
    truth = to_channels(torch.stack([smooth, smooth, rough, rough]))
    masks = [LineMaskFunc([0.125], [3], "random")(size, seed=s) for s in range(4)]
    op = SingleCoilFourier(torch.from_numpy(np.stack(masks)), size)
    y = op.A(truth)
    rc = {"phase_constraint": "auto", "phase_window": 0.1}
    calibration = reconstruct.phase_calibration(rc, op, y, seed=0, groups=np.array([7, 7, 3, 3]))
    assert calibration.choice[0] == calibration.choice[1] != "off"
    assert calibration.choice[2:] == ("off", "off")
    pocs, zero_filled = calibration.pocs(op, y), op.A_adjoint(y)
    torch.testing.assert_close(pocs[2:], zero_filled[2:])

    def error(image: torch.Tensor) -> torch.Tensor:
        return (image - truth)[:2].flatten(1).norm(dim=1) / truth[:2].flatten(1).norm(dim=1)

    assert bool((error(pocs) < 0.8 * error(zero_filled)).all()), (error(pocs), error(zero_filled))
    torch.testing.assert_close(op.A(pocs), y, atol=1e-5, rtol=0)
    fixed = reconstruct.phase_calibration(rc | {"phase_constraint": True}, op, y, seed=0)
    assert fixed.choice == ("centre",) * 4 and bool(fixed.constrained.all())
    assert reconstruct.phase_calibration(rc | {"phase_constraint": False}, op, y, seed=0) is None


def test_a_calibration_is_imposed_where_held_back_lines_support_it_and_its_edges_do_not_refute_it():
    """Held-back squared errors, two outer folds then two edge folds (energy 10 each): the
    outer lines support a phase by predicting every fold 5 % better than zero-filling, or the
    edge lines by predicting both 5 % better while no outer fold is 5 % worse; both edges 5 %
    worse refute it whatever the outer lines say; the best on the outer lines among the
    rest; an outer fold with no held-back line says nothing, and edge folds with none leave
    the outer lines to decide."""
    energy = np.full(4, 10.0)
    off = np.full(4, 10.0)

    def choose(centre, acs_hann, folds_energy=energy):
        residual = {"off": off, "centre": np.array(centre), "acs_hann": np.array(acs_hann)}
        return reconstruct.chosen_calibration(residual, folds_energy)

    assert reconstruct.HELD_BACK_MARGIN == pytest.approx(0.05)
    unmoved = [10.0, 10.0, 10.0, 10.0]
    assert choose([9.85, 9.85, 9.85, 9.85], unmoved) == "off"  # 1.5 % everywhere: chance
    assert choose([9.0, 9.0, 10.0, 10.0], unmoved) == "centre"  # the outer lines support it
    assert choose([9.0, 9.0, 34.0, 9.2], unmoved) == "centre"  # one edge worse: no refutation
    # Both edges worse: refuted, as the Hann phase that lost 7.5 dB on the T1 crop was.
    assert choose([9.0, 9.0, 18.0, 30.0], unmoved) == "off"
    # Outer lines no mirror of which was acquired: every phase scores as zero-filling does
    # there, and the edges decide.
    assert choose([10.0, 10.0, 3.0, 2.0], unmoved) == "centre"
    assert choose([10.4, 10.0, 3.0, 2.0], unmoved) == "centre"  # 4 % worse: within the margin
    assert choose([10.6, 10.0, 3.0, 2.0], unmoved) == "off"  # 6 % worse in one outer fold
    assert choose([9.5, 9.5, 3.0, 2.0], [9.0, 9.0, 5.0, 5.0]) == "acs_hann"  # best outside
    no_outer_line = np.array([10.0, 0.0, 10.0, 10.0])
    assert choose([9.0, 9.0, 3.0, 2.0], [9.0, 9.0, 3.0, 2.0], no_outer_line) == "off"
    # A centre with no mirrored pair: the outer lines alone decide.
    no_edge_pair = np.array([10.0, 10.0, 0.0, 0.0])
    assert choose([9.0, 9.0, 0.0, 0.0], unmoved, no_edge_pair) == "centre"
    assert choose([10.0, 10.0, 0.0, 0.0], unmoved, no_edge_pair) == "off"


def test_calibration_edge_folds_hold_the_widest_mirrored_pair_of_the_centre():
    """16 columns, DC at 8: a centre run 6..10 gives the pair 10 / 6; the run 7..10 the pair
    9 / 7 (10's mirror, 6, is not acquired); a run of the DC line alone no pair. Outer lines
    (1, 14) are never held."""
    line_mask = torch.zeros(3, 16, dtype=torch.bool)
    line_mask[0, 6:11] = True
    line_mask[0, [1, 14]] = True
    line_mask[1, 7:11] = True
    line_mask[2, [8, 10]] = True
    folds = reconstruct.calibration_edge_folds(line_mask)
    assert folds.shape == (2, 3, 16)
    held = [[torch.nonzero(folds[k, i]).flatten().tolist() for k in range(2)] for i in range(3)]
    assert held == [[[10], [6]], [[9], [7]], [[], []]]


def _sense_scan(size: int, coil_shift: int = 0):
    """A magnitude phantom under a smooth phase, 3 slices, 4 birdcage coils, R = 4 random
    with a 20 % centre: the SENSE operator and measurements taken through its coil maps
    rolled by ``coil_shift`` columns (0: the operator's maps explain the data exactly)."""
    image = torch.from_numpy(_phantom(size)) * torch.polar(
        torch.ones(size, size), _smooth_phase(size)
    )
    truth = to_channels(image[None]).expand(3, -1, -1, -1).contiguous()
    lines = [LineMaskFunc([0.2], [4], "random")(size, seed=s) for s in range(3)]
    maps = torch.from_numpy(birdcage(4, size, size))[None].expand(3, -1, -1, -1)
    sense = MultiCoilSense(torch.from_numpy(np.stack(lines)), maps)
    acquired = MultiCoilSense(sense.line_mask, maps.roll(coil_shift, dims=-1))
    return sense, acquired.A(truth), truth


def test_fold_alternations_continue_where_they_stopped():
    """Held-back errors read at 2 and 5 alternations, then at 9 by the same run, are those of
    fresh runs to the bit (the damping choice reuses its fifty rounds); a count already passed
    is refused."""
    sense, y, _ = _sense_scan(32, coil_shift=4)
    calibration = reconstruct.fixed_calibration(sense, y, {"phase_window": 0.2}, name="centre")
    folds = reconstruct.calibration_folds(sense.line_mask, seed=0)

    def run() -> reconstruct.FoldAlternations:
        return reconstruct.FoldAlternations(sense, y, folds, calibration.project, 1e-2)

    continued = run()
    early = continued.residuals((2, 5))
    late = continued.residuals((9,))
    fresh = run().residuals((2, 5, 9))
    for count, residual in (early | late).items():
        torch.testing.assert_close(residual, fresh[count], atol=0.0, rtol=0.0)
    assert float(fresh[9].sum()) > 0 and not torch.equal(fresh[2], fresh[9])
    with pytest.raises(ValueError, match="already run"):
        continued.residuals((5, 12))


@pytest.mark.parametrize("coil_shift, damping", [(0, 1e-4), (4, 1e-2)])
def test_the_sense_damping_of_pocs_is_chosen_on_held_back_lines(coil_shift, damping):
    """Fifty CG-SENSE fits want little damping where the coil maps explain the data and more
    where they do not (maps off by four columns: 1e-4 more than triples the error); the
    calibration picks it by the held-back lines, and the pick is the better of the two."""
    sense, y, truth = _sense_scan(32, coil_shift)
    rc = {"phase_constraint": True, "phase_window": 0.2}
    calibration = reconstruct.phase_calibration(rc, sense, y, seed=0)
    assert calibration.damping == damping

    def error(candidate: float) -> float:
        image = replace(calibration, damping=candidate).pocs(sense, y)
        return float((image - truth).norm() / truth.norm())

    assert error(damping) < min(error(d) for d in reconstruct.SENSE_DAMPINGS if d != damping)


def test_the_alternation_count_steps_from_the_default_only_while_each_step_earns_it():
    """Held-back errors after 10 / 20 / 50 / 100 / 200 alternations relative to 50 (the
    scans' own, docs/samplers.md): a step is taken while it lowers the error by 2 %, and the
    walk stops at the first that does not; of the walks up and down the lower end wins."""

    def choose(errors: list[float]) -> int:
        counts = reconstruct.ALTERNATION_ROUNDS
        return reconstruct.chosen_rounds(dict(zip(counts, errors, strict=True)))

    assert reconstruct.ALTERNATION_ROUNDS == (10, 20, 50, 100, 200)
    assert reconstruct.POCS_ROUNDS == 50 and reconstruct.ROUNDS_MARGIN == pytest.approx(0.02)
    assert choose([1.085, 1.041, 1.0, 0.988, 0.997]) == 50  # 1.2 % better: not enough
    assert choose([1.146, 1.075, 1.0, 0.965, 0.964]) == 100  # 200 adds 0.1 %: stop at 100
    assert choose([1.197, 1.120, 1.0, 0.924, 0.827]) == 200  # still gaining
    assert choose([0.946, 0.953, 1.0, 1.071, 1.169]) == 20  # down; 10 adds 0.7 %
    assert choose([0.984, 0.976, 1.0, 1.086, 1.287]) == 20  # a hold-out volume: 2.4 %
    assert choose([0.97, 0.99, 1.0, 0.97, 0.90]) == 200  # made up: both ways, the lower end
    assert choose([0.0] * 5) == 50  # no held-back line: nothing to choose on


def test_the_alternation_count_is_chosen_per_scan_on_held_back_lines():
    """Two scans in one batch: under a constant phase, which the Hann calibration gets
    exactly, pocs is still gaining at 50 alternations, and the held-back lines take it
    further — which the truth confirms; the other scan, under a smooth phase the calibration
    only approximates, keeps its own count; a null prior's reconstruction ends at the count
    its scan chose."""
    size = 64
    magnitude = torch.from_numpy(_phantom(size))
    constant = magnitude * torch.polar(torch.ones(size, size), torch.tensor(0.7))
    smooth = magnitude * torch.polar(torch.ones(size, size), _smooth_phase(size))
    truth = to_channels(torch.stack([constant] * 3 + [smooth] * 3))
    masks = [LineMaskFunc([0.08], [4], "random")(size, seed=s % 3) for s in range(6)]
    op = SingleCoilFourier(torch.from_numpy(np.stack(masks)), size)
    y = op.A(truth)
    rc = {"phase_constraint": "auto", "phase_window": 0.04}
    groups = np.array([0, 0, 0, 1, 1, 1])
    calibration = reconstruct.phase_calibration(rc, op, y, seed=0, groups=groups)
    assert bool(calibration.constrained.all())
    rounds = calibration.rounds.tolist()
    assert rounds[:3] == [rounds[0]] * 3 and rounds[3:] == [rounds[3]] * 3
    assert rounds[0] > reconstruct.POCS_ROUNDS and rounds[3] == reconstruct.POCS_ROUNDS

    def error(image: torch.Tensor) -> float:
        return float((image - truth)[:3].norm() / truth[:3].norm())

    default = replace(calibration, rounds=reconstruct.POCS_ROUNDS)
    assert error(calibration.pocs(op, y)) < error(default.pocs(op, y))
    ended = end_on_data(
        op, op.A_adjoint(y), y, calibration.project, calibration.damping, calibration.rounds
    )
    torch.testing.assert_close(ended, calibration.pocs(op, y), atol=0.0, rtol=0.0)


def test_under_a_phase_constraint_a_sense_reconstruction_ends_as_pocs_would():
    """end_on_data with a projection and the calibration's damping and alternation count,
    started at the zero-filled image, is the pocs baseline to the bit: a prior that adds
    nothing gives back pocs."""
    sense, y, _ = _sense_scan(32, coil_shift=4)
    rc = {"phase_constraint": True, "phase_window": 0.2}
    calibration = reconstruct.phase_calibration(rc, sense, y, seed=0)
    torch.testing.assert_close(
        end_on_data(
            sense,
            sense.A_adjoint(y),
            y,
            calibration.project,
            calibration.damping,
            calibration.rounds,
        ),
        calibration.pocs(sense, y),
        atol=0.0,
        rtol=0.0,
    )


@pytest.mark.parametrize("method", ["dc", "dps"])
def test_a_phase_projection_keeps_samplers_on_the_data(method):
    """With ``project`` the DC sampler projects every x̂0 before its data, DPS its last:
    both still end on the measurements, and with an oracle prior that already lies in the
    set the projection changes nothing."""
    size = 32
    truth = to_channels(
        (
            torch.from_numpy(_phantom(size))
            * torch.polar(torch.ones(size, size), _smooth_phase(size))
        )[None]
    )
    lines = torch.from_numpy(LineMaskFunc([0.15], [4], "equispaced")(size, seed=1))[None]
    op = SingleCoilFourier(lines, size)
    y = op.A(truth)
    ddim = build_ddim({"num_train_timesteps": 100, "schedule": "linear_beta"}, 10)

    def reconstruct_under(phase: torch.Tensor) -> torch.Tensor:
        return posterior_sample(
            Oracle(truth),
            ddim,
            lambda b, step: Identity(b, size, size),
            op,
            y,
            (1, 2, size, size),
            torch.Generator().manual_seed(0),
            method=method,
            project=lambda image: phase_project(image, phase),
        )

    out = reconstruct_under(_smooth_phase(size)[None])
    assert float((out - truth).norm() / truth.norm()) < 1e-3
    torch.testing.assert_close(op.A(out), y, atol=1e-5, rtol=0)
    wrong = torch.zeros(1, size, size)  # a flat phase: the oracle leaves the set each step
    torch.testing.assert_close(op.A(reconstruct_under(wrong)), y, atol=1e-5, rtol=0)
    single = one_step_reconstruction(
        Oracle(truth), op, y, project=lambda image: phase_project(image, wrong)
    )
    torch.testing.assert_close(op.A(single), y, atol=1e-5, rtol=0)
