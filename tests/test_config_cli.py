import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, tiny_config

from ambient_med.cli import STAGES, main
from ambient_med.config import load_config, load_schema, stage_config, validate_config
from ambient_med.errors import AmbientMedError


def test_packaged_schema_is_the_workflow_schema():
    assert load_schema() == yaml.safe_load((REPO / "config" / "schema.yaml").read_text())


@pytest.mark.parametrize("name", ["config.yaml", "tiny.yaml", "gpu.yaml"])
def test_shipped_configs_validate(name):
    base = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    overlay = yaml.safe_load((REPO / "config" / name).read_text())
    for key, value in overlay.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    validated = validate_config(base)
    assert validated["cohorts"]["demo"]["corruption"] == "kspace"
    assert validated["corrupt"]["kspace"]["acceleration"] == 4


def test_defaults_are_filled_per_cohort_without_sharing():
    cfg = validate_config({"cohorts": {"a": {"demo": True}, "b": {"demo": True}}})
    assert cfg["train"]["steps"] == 1000 and cfg["corrupt"]["pixel"]["p"] == 0.8
    assert cfg["cohorts"]["a"] == cfg["cohorts"]["b"]
    assert cfg["cohorts"]["a"] is not cfg["cohorts"]["b"]


@pytest.mark.parametrize(
    ("patch", "key"),
    [
        ({"cohorts": {"demo": {"corruption": "radial"}}}, "cohorts.demo.corruption"),
        ({"cohorts": {"demo": {"demo": True}}, "train": {"steps": 0}}, "train.steps"),
        (
            {"cohorts": {"demo": {"demo": True}}, "corrupt": {"pixel": {"p": 1.5}}},
            "corrupt.pixel.p",
        ),
        ({"cohorts": {"demo": {"demo": True}}, "trian": {}}, "trian"),
        ({"cohorts": {"demo": {"demo": True}}, "train": {"stpes": 3}}, "train.stpes"),
        (
            {"cohorts": {"demo": {"demo": True}}, "train": {"further_acceleration": [3, 1]}},
            "train.further_acceleration",
        ),
        (
            {"cohorts": {"demo": {"demo": True}}, "train": {"further_acceleration": [2]}},
            "train.further_acceleration",
        ),
    ],
)
def test_bad_config_is_one_line_naming_the_key(patch, key):
    with pytest.raises(AmbientMedError) as info:
        validate_config(patch)
    message = str(info.value)
    assert f"'{key}'" in message and "\n" not in message


def test_a_misspelt_key_is_named_with_the_closest_known_one():
    with pytest.raises(
        AmbientMedError, match=r"'train.stpes': not a known key; did you mean 'steps'\?"
    ):
        validate_config({"cohorts": {"demo": {"demo": True}}, "train": {"stpes": 3}})
    with pytest.raises(AmbientMedError, match=r"'cohorts.demo.holdout': not a known key; did"):
        validate_config({"cohorts": {"demo": {"demo": True, "holdout": 2}}})


def test_stage_config_holds_only_what_the_stage_needs():
    cfg = tiny_config()
    assert set(stage_config(cfg, "demo", "sample")) == {"cohort", "sample"}
    assert set(stage_config(cfg, "demo", "train")) == {
        "cohort",
        "corrupt",
        "model",
        "scheduler",
        "train",
    }
    assert stage_config(cfg, "demo", "ingest")["cohort"]["input"] == "data/demo"
    with pytest.raises(AmbientMedError, match="no such cohort"):
        stage_config(cfg, "other", "train")


def test_help_explains_every_stage():
    out = subprocess.run(
        [sys.executable, "-m", "ambient_med", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0
    for stage in STAGES:
        assert stage in out.stdout
    sub = subprocess.run(
        [sys.executable, "-m", "ambient_med", "train", "--help"], capture_output=True, text=True
    )
    assert "--checkpoints" in sub.stdout and "resumes" in sub.stdout


def _run_cli(argv, capsys):
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err[-1] if err else ""


def test_cli_errors_are_one_line(tmp_path, capsys):
    code, line = _run_cli(
        [
            "ingest",
            "--cohort",
            "demo",
            "--config",
            str(tmp_path / "missing.yaml"),
            "--input",
            "x",
            "--slices",
            "s.h5",
            "--manifest",
            "m.csv",
        ],
        capsys,
    )
    assert code == 2
    assert (
        line
        == f"ambient-med ingest: error: config file '{tmp_path / 'missing.yaml'}': does not exist"
    )

    cfg = json.dumps(stage_config(tiny_config(), "demo", "ingest"))
    code, line = _run_cli(
        [
            "ingest",
            "--cohort",
            "demo",
            "--config-json",
            cfg,
            "--input",
            str(tmp_path / "none"),
            "--slices",
            str(tmp_path / "s.h5"),
            "--manifest",
            str(tmp_path / "m.csv"),
        ],
        capsys,
    )
    assert code == 2 and "input folder" in line and "does not exist" in line

    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    cfg = json.dumps(stage_config(tiny_config(), "demo", "sample"))
    code, line = _run_cli(
        [
            "sample",
            "--cohort",
            "demo",
            "--config-json",
            cfg,
            "--model",
            str(tmp_path / "bad.pt"),
            "--nifti",
            str(tmp_path / "s.nii.gz"),
            "--grid",
            str(tmp_path / "g.png"),
        ],
        capsys,
    )
    assert code == 2 and "not a loadable weights-only checkpoint" in line
    assert not (tmp_path / "g.png").exists()


def test_cli_reads_a_yaml_config(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"cohorts": {"demo": {"demo": True}}}))
    assert load_config(config)["cohorts"]["demo"]["seed"] == 1234
    config.write_text("cohorts: [unclosed")
    code, line = _run_cli(
        [
            "evaluate",
            "--cohort",
            "demo",
            "--config",
            str(config),
            "--model",
            "m",
            "--slices",
            "s",
            "--metrics",
            "x",
        ],
        capsys,
    )
    assert code == 2 and "not valid YAML" in line and Path(line).name
