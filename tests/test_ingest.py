import csv
import logging
import shutil

import nibabel as nib
import numpy as np
import pydicom
import pytest
from conftest import DEMO_SEED, DEMO_SUBJECTS, DEMO_VOXEL_MM, tiny_config

from ambient_med.config import stage_config
from ambient_med.errors import AmbientMedError
from ambient_med.io.demo import load_template, pseudo_subject
from ambient_med.io.dicom import assemble_series, group_series, read_header
from ambient_med.io.nifti import read_nifti
from ambient_med.io.store import read_slices
from ambient_med.stages import ingest


@pytest.fixture(scope="module")
def sources():
    """The volumes the demo writer started from, recomputed independently of its files."""
    tissues, affine = load_template(DEMO_VOXEL_MM)
    volumes = [pseudo_subject(tissues, DEMO_SEED + s, DEMO_VOXEL_MM) for s in range(DEMO_SUBJECTS)]
    return volumes, affine


def test_demo_writes_nifti_and_a_dicom_series(demo_dir):
    names = sorted(p.name for p in demo_dir.iterdir())
    assert names == ["series_01", "series_03", "volume_00.nii.gz", "volume_02.nii.gz"]
    files = sorted((demo_dir / "series_01").iterdir())
    ds = pydicom.dcmread(files[0])
    assert ds.SOPClassUID == pydicom.uid.MRImageStorage
    assert ds.Modality == "MR" and ds.PatientPosition == "HFS"
    assert str(ds.PatientName).startswith("DEMOPATIENT")
    assert len(files) == nib.load(demo_dir / "volume_00.nii.gz").shape[2]


def test_nifti_reads_back_in_canonical_ras(demo_dir, sources):
    volumes, affine = sources
    data, got_affine = read_nifti(demo_dir / "volume_00.nii.gz", max_voxels=10**9)
    np.testing.assert_allclose(data, volumes[0], atol=1e-4)
    np.testing.assert_allclose(got_affine, affine, atol=1e-5)
    # volume_02 is stored left-right flipped (LAS): reorientation must undo it.
    assert nib.aff2axcodes(nib.load(demo_dir / "volume_02.nii.gz").affine)[0] == "L"
    data, got_affine = read_nifti(demo_dir / "volume_02.nii.gz", max_voxels=10**9)
    np.testing.assert_allclose(data, volumes[2], atol=1e-4)
    np.testing.assert_allclose(got_affine, affine, atol=1e-5)


def test_dicom_series_matches_its_source_geometry_and_intensities(demo_dir, sources):
    sources_, affine = sources
    headers = {p: read_header(p) for p in sorted((demo_dir / "series_01").iterdir())}
    series, skipped = group_series(headers)
    assert not skipped and len(series) == 1
    parts, dropped = assemble_series(next(iter(series.values())), max_voxels=10**9)
    assert not dropped and len(parts) == 1
    volume = parts[0]
    assert volume.data.shape == sources_[1].shape
    np.testing.assert_allclose(volume.affine, affine, atol=1e-3)
    # int16 storage with RescaleSlope 0.05: half a step of quantisation error, plus float noise.
    np.testing.assert_allclose(volume.data, sources_[1], atol=0.026)


def test_dicom_refuses_duplicate_positions(demo_dir):
    files = sorted((demo_dir / "series_01").iterdir())[:3]
    headers = {p: read_header(p) for p in files}
    headers[files[1]].ImagePositionPatient = headers[files[0]].ImagePositionPatient
    series, _ = group_series(headers)
    with pytest.raises(AmbientMedError, match="same position"):
        assemble_series(next(iter(series.values())), max_voxels=10**9)


def test_ingest_stage_writes_store_and_manifest(demo_dir, tmp_path, caplog):
    cfg = stage_config(tiny_config(), "demo", "ingest")
    (extra := tmp_path / "inputs").mkdir()
    shutil.copytree(demo_dir, extra, dirs_exist_ok=True)
    (extra / "notes.txt").write_text("not an image")
    slices, manifest = tmp_path / "out" / "slices.h5", tmp_path / "out" / "manifest.csv"
    with caplog.at_level(logging.INFO):
        ingest.run(cfg, extra, slices, manifest)

    rows = list(csv.DictReader(manifest.open()))
    all_files = [p for p in extra.rglob("*") if p.is_file()]
    assert len(rows) == len(all_files)
    by_file = {r["file"]: r for r in rows}
    assert by_file["notes.txt"]["status"] == "skipped"
    assert by_file["notes.txt"]["reason"] == "neither DICOM, NIfTI nor raw k-space"
    assert all(r["status"] == "ingested" for f, r in by_file.items() if f != "notes.txt")
    subjects = {r["subject"] for r in rows if r["subject"]}
    assert len(subjects) == DEMO_SUBJECTS and all(s.startswith("sub-") for s in subjects)
    assert sorted(r["split"] for r in rows if r["file"].endswith(".nii.gz")).count("") == 0

    store = read_slices(slices)
    assert store.images.shape[1:] == (32, 32)
    assert store.images.dtype == np.float32
    assert sorted(set(store.index.split)) == ["holdout", "train"]
    assert store.index.split.count("holdout") == 2  # config.yaml: holdout_subjects: 2
    # Per-volume normalisation: the 99.5th foreground percentile maps to about 1.
    assert 0.9 < float(np.percentile(store.images, 99.9)) < 1.3
    # The manifest's per-volume slice counts add up to the store.
    per_volume = {r["volume"]: int(r["slices"]) for r in rows if r["volume"]}
    assert len(per_volume) == DEMO_SUBJECTS
    assert sum(per_volume.values()) == len(store.images)
    # Resampled grid affine: 3 mm voxels padded to a 78-voxel square, resized to 32.
    spacing = np.linalg.norm(store.index.affines[0][:3, :3], axis=0)
    np.testing.assert_allclose(spacing[:2], 3.0 * 78 / 32, rtol=1e-3)

    # No identifying tag written by the demo reaches an output or the log.
    identifiers = [b"DEMOPATIENT", b"DEMO-PID", b"AMBIENT DEMO HOSPITAL"]
    for ds_path in (extra / "series_01").iterdir():
        identifiers.append(str(pydicom.dcmread(ds_path).PatientBirthDate).encode())
        break
    for output in (slices, manifest):
        blob = output.read_bytes()
        assert not any(token in blob for token in identifiers)
    assert not any(token.decode() in caplog.text for token in identifiers)


def test_real_cohort_without_site_secret_is_refused(demo_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("AMBIENT_MED_SITE_SECRET", raising=False)
    monkeypatch.delenv("AMBIENT_MED_SITE_SECRET_FILE", raising=False)
    cfg = stage_config(tiny_config(demo=False, input=str(demo_dir)), "demo", "ingest")
    with pytest.raises(AmbientMedError, match="site secret"):
        ingest.run(cfg, demo_dir, tmp_path / "s.h5", tmp_path / "m.csv")
    assert not (tmp_path / "s.h5").exists()


def test_missing_or_empty_input_folder_is_one_clear_error(tmp_path):
    cfg = stage_config(tiny_config(), "demo", "ingest")
    with pytest.raises(AmbientMedError, match="does not exist"):
        ingest.run(cfg, tmp_path / "nope", tmp_path / "s.h5", tmp_path / "m.csv")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AmbientMedError, match="contains no files"):
        ingest.run(cfg, tmp_path / "empty", tmp_path / "s.h5", tmp_path / "m.csv")


def _manifest(path):
    return {r["file"]: r for r in csv.DictReader(path.open())}


def test_links_and_special_files_each_get_a_manifest_row(demo_dir, tmp_path):
    """Hospital shares hold links: none may vanish from the manifest or hang the walk."""
    import os

    cohort = tmp_path / "share"
    (cohort / "scans").mkdir(parents=True)
    for name in ("volume_00.nii.gz", "volume_02.nii.gz"):
        shutil.copy(demo_dir / name, cohort / "scans" / name)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copy(demo_dir / "volume_00.nii.gz", outside / "linked_in.nii.gz")
    (cohort / "dangling.dcm").symlink_to(tmp_path / "gone.dcm")
    (cohort / "loop_a").symlink_to(cohort / "loop_b")
    (cohort / "loop_b").symlink_to(cohort / "loop_a")
    (cohort / "scans" / "back_up").symlink_to(cohort)  # a folder loop
    (cohort / "again.nii.gz").symlink_to(cohort / "scans" / "volume_02.nii.gz")
    (cohort / "external").symlink_to(outside)  # a folder link out of the cohort is followed
    os.mkfifo(cohort / "pipe")  # reading it would block forever
    (cohort / "empty.dcm").write_bytes(b"")
    cfg = stage_config(tiny_config(), "demo", "ingest")
    out = tmp_path / "out"
    ingest.run(cfg, cohort, out / "slices.h5", out / "manifest.csv", out / "raw.h5")

    rows = _manifest(out / "manifest.csv")
    expected = {
        "dangling.dcm": "dangling symbolic link (its target is missing)",
        "loop_a": "symbolic link loop (the link never resolves)",
        "loop_b": "symbolic link loop (the link never resolves)",
        "scans/back_up": "symbolic link to a folder already searched (a loop or a second path)",
        "again.nii.gz": "same file as 'scans/volume_02.nii.gz' (a link to it, or a copy by "
        "hard link)",
        "pipe": "not a regular file (a FIFO, socket or device)",
        "empty.dcm": "empty file (0 bytes)",
    }
    for name, reason in expected.items():
        assert rows[name]["status"] == "skipped" and rows[name]["reason"] == reason, name
    ingested = sorted(f for f, r in rows.items() if r["status"] == "ingested")
    assert ingested == [
        "external/linked_in.nii.gz",
        "scans/volume_00.nii.gz",
        "scans/volume_02.nii.gz",
    ]
    assert len(rows) == len(expected) + len(ingested)


def _fastmri(path, seed, slices=2, size=24):
    import h5py

    rng = np.random.default_rng(seed)
    kspace = rng.standard_normal((slices, size, size)) + 1j * rng.standard_normal(
        (slices, size, size)
    )
    with h5py.File(path, "w") as handle:
        handle.create_dataset("kspace", data=kspace.astype(np.complex64))


def test_raw_kspace_file_in_an_images_cohort_is_skipped_with_its_reason(demo_dir, tmp_path):
    cohort = tmp_path / "site"
    shutil.copytree(demo_dir, cohort)
    _fastmri(cohort / "scanner_export.h5", seed=0)
    cfg = stage_config(tiny_config(), "demo", "ingest")
    out = tmp_path / "out"
    ingest.run(cfg, cohort, out / "slices.h5", out / "manifest.csv", out / "raw.h5")
    row = _manifest(out / "manifest.csv")["scanner_export.h5"]
    assert row["status"] == "skipped" and row["format"] == "raw"
    assert "cohorts.demo.source is 'images'" in row["reason"]
    assert "source: kspace" in row["reason"]
    from ambient_med.io.store import read_raw_store

    assert len(read_raw_store(out / "raw.h5").kspace) == 0


def _raw_config(folder):
    cfg = tiny_config(
        demo=False, source="kspace", corruption="native", input=str(folder), holdout_subjects=1
    )
    cfg["ingest"]["image_size"] = 16
    return stage_config(cfg, "demo", "ingest")


def test_images_in_a_raw_kspace_cohort_are_skipped_with_their_reason(
    demo_dir, tmp_path, monkeypatch
):
    monkeypatch.setenv("AMBIENT_MED_SITE_SECRET", "test-site-secret")
    cohort = tmp_path / "raw"
    cohort.mkdir()
    for s in range(2):
        _fastmri(cohort / f"file_{s}.h5", seed=s)
    shutil.copy(demo_dir / "volume_00.nii.gz", cohort)
    shutil.copytree(demo_dir / "series_01", cohort / "series_01")
    out = tmp_path / "out"
    ingest.run(_raw_config(cohort), cohort, out / "s.h5", out / "m.csv", out / "raw.h5")
    rows = _manifest(out / "m.csv")
    assert rows["volume_00.nii.gz"]["reason"].startswith("NIfTI image, but cohorts.demo.source")
    dicom = [r for f, r in rows.items() if f.startswith("series_01/")]
    assert dicom and all(r["reason"].startswith("DICOM image, but") for r in dicom)
    assert {rows[f"file_{s}.h5"]["status"] for s in range(2)} == {"ingested"}


def test_one_file_raw_cohort_says_which_key_and_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("AMBIENT_MED_SITE_SECRET", "test-site-secret")
    cohort = tmp_path / "one"
    cohort.mkdir()
    _fastmri(cohort / "only_scan.h5", seed=0)
    out = tmp_path / "out"
    with pytest.raises(AmbientMedError) as caught:
        ingest.run(_raw_config(cohort), cohort, out / "s.h5", out / "m.csv", out / "raw.h5")
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("config key 'cohorts.demo.holdout_subjects': 1 hold-out subject")
    assert "add scans of at least 1 more subject" in message
    assert "reconstruct.input" in message
    assert not out.exists() or not any(out.iterdir())
