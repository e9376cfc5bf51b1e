"""NIfTI variants, bad input, strict mode."""

import csv

import nibabel as nib
import numpy as np
import pytest
from conftest import tiny_config

from ambient_med.config import stage_config
from ambient_med.errors import AmbientMedError
from ambient_med.io.nifti import read_nifti
from ambient_med.stages import ingest


def _volume(shape=(20, 24, 18), seed=0):
    rng = np.random.default_rng(seed)
    data = np.zeros(shape, np.float32)
    data[3:-3, 3:-3, 2:-2] = 100 + 20 * rng.random((shape[0] - 6, shape[1] - 6, shape[2] - 4))
    return data


def test_4d_nifti_picks_the_configured_volume(tmp_path):
    data = np.stack([_volume(seed=s) for s in range(3)], axis=-1)
    nib.save(nib.Nifti1Image(data, np.diag([2, 2, 3, 1])), tmp_path / "fmri.nii.gz")
    second, _ = read_nifti(tmp_path / "fmri.nii.gz", 10**9, volume=1)
    np.testing.assert_allclose(second, data[..., 1])
    with pytest.raises(AmbientMedError, match="has 3 volumes, asked for 5"):
        read_nifti(tmp_path / "fmri.nii.gz", 10**9, volume=5)


def test_oblique_nifti_is_reoriented_to_canonical_ras(tmp_path):
    data = _volume()
    angle = np.deg2rad(20)
    rotation = np.array(
        [[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]]
    )
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([-1.5, 1.5, 2.0])  # LAS-ish, oblique
    affine[:3, 3] = [10, -20, 5]
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "oblique.nii")
    out, out_affine = read_nifti(tmp_path / "oblique.nii", 10**9)
    assert nib.aff2axcodes(out_affine) == ("R", "A", "S")
    np.testing.assert_allclose(out, data[::-1], atol=1e-5)
    # Same world position of every voxel: the RAS affine maps the flipped index back.
    np.testing.assert_allclose(out_affine @ [0, 0, 0, 1], affine @ [19, 0, 0, 1], atol=1e-4)


def test_integer_nifti_with_scaling(tmp_path):
    data = _volume().astype(np.int16)
    image = nib.Nifti1Image(data, np.eye(4))
    image.header.set_slope_inter(0.5, 10.0)
    nib.save(image, tmp_path / "scaled.nii.gz")
    out, _ = read_nifti(tmp_path / "scaled.nii.gz", 10**9)
    np.testing.assert_allclose(out, data * 0.5 + 10.0)


def test_oversized_nifti_is_refused_from_its_header(tmp_path):
    nib.save(nib.Nifti1Image(_volume(), np.eye(4)), tmp_path / "big.nii.gz")
    with pytest.raises(AmbientMedError, match="exceed ingest.max_voxels=100"):
        read_nifti(tmp_path / "big.nii.gz", 100)


def _cohort(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for s in range(3):
        data = _volume(seed=s)
        if s == 1:
            data[5, 5, 5] = np.nan
            data[6, 6, 6] = np.inf
        nib.save(nib.Nifti1Image(data, np.diag([2, 2, 2, 1])), folder / f"sub{s}.nii.gz")
    (folder / "broken.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    (folder / "empty.dcm").write_bytes(b"")
    return folder


def test_bad_files_are_listed_and_the_rest_ingested(tmp_path):
    folder = _cohort(tmp_path)
    cfg = stage_config(tiny_config(), "demo", "ingest")
    out = tmp_path / "out"
    ingest.run(cfg, folder, out / "s.h5", out / "m.csv", out / "raw.h5")
    rows = {r["file"]: r for r in csv.DictReader((out / "m.csv").open())}
    assert rows["broken.nii.gz"]["status"] == "skipped"
    assert "not a readable NIfTI file" in rows["broken.nii.gz"]["reason"]
    assert rows["empty.dcm"]["reason"] == "empty file (0 bytes)"
    assert rows["sub1.nii.gz"]["status"] == "ingested"
    assert rows["sub1.nii.gz"]["nonfinite"] == "2"
    assert rows["sub0.nii.gz"]["nonfinite"] == "0"
    # The inputs are untouched and no temporary file is left beside the outputs.
    assert sorted(p.name for p in out.iterdir()) == ["m.csv", "raw.h5", "s.h5"]


def test_strict_fails_on_any_skip_and_writes_nothing(tmp_path):
    folder = _cohort(tmp_path)
    config = tiny_config()
    config["ingest"]["strict"] = True
    cfg = stage_config(config, "demo", "ingest")
    out = tmp_path / "out"
    with pytest.raises(AmbientMedError, match=r"ingest.strict: 2 file\(s\) skipped"):
        ingest.run(cfg, folder, out / "s.h5", out / "m.csv", out / "raw.h5")
    assert not out.exists() or not any(out.iterdir())


def test_inputs_are_never_written(tmp_path):
    folder = _cohort(tmp_path)
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.iterdir()}
    for p in folder.iterdir():
        p.chmod(0o444)
    folder.chmod(0o555)
    try:
        cfg = stage_config(tiny_config(), "demo", "ingest")
        ingest.run(cfg, folder, tmp_path / "o" / "s.h5", tmp_path / "o" / "m.csv")
    finally:
        folder.chmod(0o755)
    after = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.iterdir()}
    assert before == after


def test_atomic_outputs_get_ordinary_permissions(tmp_path):
    import os

    from ambient_med.io.store import atomic_path

    with atomic_path(tmp_path / "out.txt") as tmp:
        tmp.write_text("x")
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "out.txt").stat().st_mode & 0o777 == 0o666 & ~mask
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_interrupted_writer_leaves_nothing(tmp_path):
    from ambient_med.io.store import atomic_path

    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "out.txt") as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
