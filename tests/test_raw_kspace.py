"""Raw k-space: fastMRI-style HDF5 and ISMRMRD, already undersampled, multi-coil."""

import json

import h5py
import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config
from PIL import Image

from ambient_med.config import stage_config
from ambient_med.io.demo import simulate_multicoil_kspace, write_fastmri
from ambient_med.io.kspace import read_fastmri, read_ismrmrd
from ambient_med.io.store import read_measurements, read_raw_store, read_slices
from ambient_med.physics.coils import espirit_maps
from ambient_med.physics.masks import LineMaskFunc
from ambient_med.stages import corrupt, evaluate, ingest, sample, train

SIZE = 48
NEW_SLICES = 2


@pytest.fixture(scope="module")
def truth(demo_dir, tmp_path_factory):
    """Ground-truth magnitude slices (N, 48, 48) of the demo subjects, never written to results."""
    out = tmp_path_factory.mktemp("truth")
    cfg = stage_config(tiny_config(), "demo", "ingest")
    ingest.run(cfg, demo_dir, out / "s.h5", out / "m.csv")
    images = torch.from_numpy(read_slices(out / "s.h5").images)[:, None]
    return F.interpolate(images, size=(SIZE, SIZE), mode="bilinear", antialias=True)[:, 0].numpy()


def _coil_images(kspace: np.ndarray) -> np.ndarray:
    """Centred orthonormal inverse 2-D FFT over the last two axes (simulate_multicoil_kspace's
    inverse, before the coil maps)."""
    axes = (-2, -1)
    return np.fft.fftshift(
        np.fft.ifft2(np.fft.ifftshift(kspace, axes=axes), norm="ortho"), axes=axes
    )


def _line_mask(seed):
    return LineMaskFunc([0.17], [3], "equispaced")(SIZE, seed)


@pytest.fixture(scope="module")
def raw_cohort(truth, tmp_path_factory):
    """Three undersampled 4-coil fastMRI-style files (one without a `mask` dataset)."""
    folder = tmp_path_factory.mktemp("raw") / "scanner"
    folder.mkdir()
    masks = {}
    for f in range(3):
        rows = truth[f * 12 : f * 12 + 6]
        kspace = simulate_multicoil_kspace(rows, coils=4, seed=f)
        masks[f] = _line_mask(f)
        write_fastmri(folder / f"file_{f}.h5", kspace, masks[f], with_mask=f != 2)
    return folder, masks


def raw_config(folder):
    cfg = tiny_config(
        demo=False, source="kspace", corruption="native", input=str(folder), holdout_subjects=1
    )
    cfg["ingest"]["image_size"] = SIZE
    return cfg


def test_fastmri_reader_infers_the_mask(raw_cohort):
    folder, masks = raw_cohort
    for f in range(3):
        raw = read_fastmri(folder / f"file_{f}.h5", max_voxels=10**9)
        assert raw.kspace.shape == (6, 4, SIZE, SIZE) and raw.undersampled
        np.testing.assert_array_equal(raw.line_mask, np.tile(masks[f], (6, 1)))


def test_espirit_uses_acs_lines_only(truth):
    kspace = simulate_multicoil_kspace(truth[5:6], coils=4, seed=3)[0]
    mask = _line_mask(0)
    maps = espirit_maps(kspace * mask, mask)
    changed = kspace.copy()
    outer = mask.copy()
    outer[SIZE // 2 - 6 : SIZE // 2 + 6] = False  # acquired lines outside the ACS
    changed[..., outer] *= 5.0
    np.testing.assert_allclose(espirit_maps(changed * mask, mask), maps, atol=1e-5)
    # Maps combine the coils back to the image: |Σ conj(S) x_c| follows the truth.
    combined = np.abs(np.sum(np.conj(maps) * _coil_images(kspace), axis=0))
    assert np.corrcoef(combined.ravel(), truth[5].ravel())[0, 1] > 0.98


def test_a_crop_gets_the_phase_and_coil_maps_of_its_part_of_the_head(truth):
    """A 20 x 30 crop simulated inside its 48 x 48 head field holds the coil images the whole
    slice has there; simulated on its own, its phase and maps would span it alone."""
    whole = _coil_images(simulate_multicoil_kspace(truth[:2], coils=3, seed=4))
    crop = truth[:2, 14:34, 9:39]
    inside = _coil_images(simulate_multicoil_kspace(crop, coils=3, seed=4, head_field=(48, 48)))
    np.testing.assert_allclose(inside, whole[..., 14:34, 9:39], atol=1e-5)
    alone = _coil_images(simulate_multicoil_kspace(crop, coils=3, seed=4))
    np.testing.assert_allclose(np.sqrt((np.abs(alone) ** 2).sum(1)), crop, atol=1e-4)
    assert np.abs(alone - inside).max() > 0.1 * crop.max()
    same = simulate_multicoil_kspace(truth[:2], coils=3, seed=4, head_field=(SIZE, SIZE))
    np.testing.assert_array_equal(same, simulate_multicoil_kspace(truth[:2], coils=3, seed=4))
    with pytest.raises(ValueError, match="smaller than the slices"):
        simulate_multicoil_kspace(truth[:2], coils=3, seed=4, head_field=(40, 48))


def test_ismrmrd_reads_back_as_written(truth, tmp_path):
    import ismrmrd

    kspace = simulate_multicoil_kspace(truth[:2], coils=2, seed=9)
    mask = _line_mask(4)
    header = f"""<?xml version="1.0"?>
<ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD">
  <experimentalConditions><H1resonanceFrequency_Hz>63500000</H1resonanceFrequency_Hz>
  </experimentalConditions>
  <encoding>
    <encodedSpace><matrixSize><x>{SIZE}</x><y>{SIZE}</y><z>1</z></matrixSize>
      <fieldOfView_mm><x>240</x><y>240</y><z>5</z></fieldOfView_mm></encodedSpace>
    <reconSpace><matrixSize><x>{SIZE}</x><y>{SIZE}</y><z>1</z></matrixSize>
      <fieldOfView_mm><x>240</x><y>240</y><z>5</z></fieldOfView_mm></reconSpace>
    <encodingLimits><slice><minimum>0</minimum><maximum>1</maximum><center>0</center></slice>
    </encodingLimits>
    <trajectory>cartesian</trajectory>
  </encoding>
</ismrmrdHeader>"""
    path = tmp_path / "scan.mrd"
    dataset = ismrmrd.Dataset(str(path), "dataset", create_if_needed=True)
    dataset.write_xml_header(header)
    for s in range(2):
        for line in np.flatnonzero(mask):
            acq = ismrmrd.Acquisition.from_array(np.ascontiguousarray(kspace[s, :, :, line]))
            acq.idx.kspace_encode_step_1 = int(line)
            acq.idx.slice = s
            dataset.append_acquisition(acq)
    dataset.close()

    raw = read_ismrmrd(path, max_voxels=10**9)
    assert raw.source == "ismrmrd"
    np.testing.assert_array_equal(raw.line_mask, np.tile(mask, (2, 1)))
    np.testing.assert_allclose(raw.kspace, kspace * mask, atol=1e-6)


def _arrays_in(path):
    """Every image-shaped array in an output file, as magnitudes (N, 48, 48)."""
    if path.suffix == ".h5":
        with h5py.File(path) as h5:
            for name in h5:
                data = h5[name][()]
                if data.ndim >= 2 and data.shape[-2:] == (SIZE, SIZE):
                    yield name, np.abs(data).reshape(-1, SIZE, SIZE)
                elif data.ndim >= 3 and data.shape[-3:-1] == (SIZE, SIZE):  # (..., 2)
                    mag = np.sqrt((data**2).sum(-1))
                    yield name, mag.reshape(-1, SIZE, SIZE)
    elif path.name.endswith(".nii.gz"):
        data = nib.load(path).get_fdata()
        yield "nifti", np.moveaxis(data, -1, 0).reshape(-1, SIZE, SIZE)
    elif path.suffix == ".pt":
        state = torch.load(path, weights_only=True)
        for name, tensor in state.get("state_dict", {}).items():
            if tensor.ndim >= 2 and tuple(tensor.shape[-2:]) == (SIZE, SIZE):
                yield name, tensor.abs().reshape(-1, SIZE, SIZE).numpy()


def test_undersampled_multicoil_goes_from_ingest_to_training_without_a_full_image(
    raw_cohort, truth, tmp_path, monkeypatch
):
    monkeypatch.setenv("AMBIENT_MED_SITE_SECRET", "test-site-secret")
    folder, masks = raw_cohort
    cfg = raw_config(folder)
    results = tmp_path / "results"
    ingest_dir = results / "ingest"
    ingest.run(
        stage_config(cfg, "demo", "ingest"),
        folder,
        ingest_dir / "slices.h5",
        ingest_dir / "manifest.csv",
        ingest_dir / "raw.h5",
    )
    assert len(read_slices(ingest_dir / "slices.h5").images) == 0  # nothing fully sampled
    raw = read_raw_store(ingest_dir / "raw.h5")
    assert raw.kspace.shape == (18, 4, SIZE, SIZE)
    assert sorted(set(raw.index.split)) == ["holdout", "train"]

    native = results / "corrupt" / "native.h5"
    corrupt.run(stage_config(cfg, "demo", "corrupt"), "native", None, native, ingest_dir / "raw.h5")
    meas = read_measurements(native)
    assert meas.maps is not None and meas.measurements.dtype == np.complex64
    written = {m.tobytes() for m in masks.values()}
    for row, line_mask in enumerate(meas.mask.astype(bool)):
        assert line_mask.tobytes() in written  # the scanner's own mask, unchanged
        assert not meas.measurements[row][..., ~line_mask].any()

    out = results / "train"
    train.run(
        stage_config(cfg, "demo", "train"), native, out / "model.pt", out / "loss.csv", out / "ck"
    )
    model = torch.load(out / "model.pt", weights_only=True)
    assert model["kind"] == "native" and model["image_channels"] == 2
    sample.run(
        stage_config(cfg, "demo", "sample"),
        out / "model.pt",
        results / "sample" / "s.nii.gz",
        results / "sample" / "grid.png",
        native,
    )
    evaluate.run(
        stage_config(cfg, "demo", "evaluate"),
        out / "model.pt",
        ingest_dir / "slices.h5",
        results / "eval" / "metrics.json",
        native,
    )
    metrics = json.loads((results / "eval" / "metrics.json").read_text())
    assert metrics["holdout_slices"] == 0 and metrics["holdout_measured"] == 6
    assert metrics["heldout_observed_mse_t10"] > 0
    assert Image.open(results / "sample" / "grid.png").format == "PNG"

    # No full image anywhere under results/: nothing written resembles a ground-truth slice.
    reference = truth - truth.mean(axis=(1, 2), keepdims=True)
    reference /= np.linalg.norm(reference, axis=(1, 2), keepdims=True)
    checked = 0
    for path in results.rglob("*"):
        if not path.is_file():
            continue
        for name, arrays in _arrays_in(path):
            if arrays.size == 0:
                continue
            centred = arrays - arrays.mean(axis=(1, 2), keepdims=True)
            norms = np.linalg.norm(centred, axis=(1, 2), keepdims=True)
            centred = centred / np.where(norms > 0, norms, 1)
            best = np.abs(np.einsum("ahw,bhw->ab", centred, reference)).max()
            assert best < 0.9, f"{path.name}:{name} resembles a full image (ncc {best:.3f})"
            checked += 1
    assert checked >= 4


def test_new_undersampled_files_are_reconstructed_as_acquired(raw_cohort, tmp_path, monkeypatch):
    monkeypatch.setenv("AMBIENT_MED_SITE_SECRET", "test-site-secret")
    folder, _ = raw_cohort
    cfg = raw_config(folder)
    # New files: the first two slices of each training file, written as it was (with its
    # mask dataset or none); reconstruction's per-scan choices cost time in proportion to the
    # slices.
    new_folder = tmp_path / "new"
    new_folder.mkdir()
    for path in sorted(folder.glob("*.h5")):
        with h5py.File(path) as source:
            kspace = source["kspace"][:NEW_SLICES]
            line_mask = source["mask"][()] if "mask" in source else None
        write_fastmri(new_folder / path.name, kspace, line_mask)
    cfg["reconstruct"]["input"] = str(new_folder)
    ingest.run(
        stage_config(cfg, "demo", "ingest"),
        folder,
        tmp_path / "slices.h5",
        tmp_path / "manifest.csv",
        tmp_path / "raw.h5",
    )
    native = tmp_path / "native.h5"
    corrupt.run(stage_config(cfg, "demo", "corrupt"), "native", None, native, tmp_path / "raw.h5")
    train.run(
        stage_config(cfg, "demo", "train"),
        native,
        tmp_path / "m.pt",
        tmp_path / "l.csv",
        tmp_path / "ck",
    )
    from ambient_med.stages import reconstruct

    files = tmp_path / "files"
    reconstruct.run(
        stage_config(cfg, "demo", "reconstruct"),
        tmp_path / "m.pt",
        tmp_path / "slices.h5",
        files,
        tmp_path / "recon.json",
    )
    metrics = json.loads((tmp_path / "recon.json").read_text())
    assert metrics["new_files"] == 3 and metrics["holdout_slices"] == 0
    volume = nib.load(files / "new000_diffusion_dc.nii.gz")
    assert volume.shape == (SIZE, SIZE, NEW_SLICES)
    assert np.isfinite(volume.get_fdata()).all()
    assert Image.open(files / "panel_new000.png").format == "PNG"
    # Zero-filled reconstruction of the file equals A^H y of what was acquired: the scan's
    # own data, scaled, with no line added.
    zero_filled = nib.load(files / "new000_zero_filled.nii.gz").get_fdata()
    assert zero_filled.max() > 0
