"""The conda env of the rules pins versions that pyproject.toml admits, and vice versa."""

import tomllib

import yaml
from conftest import REPO
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name


def _env_pins() -> dict[str, str]:
    env = yaml.safe_load((REPO / "envs" / "ambient-med.yaml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    pins = {}
    for line in pip:
        if line.startswith("-e"):
            continue
        name, version = line.split("==")
        pins[canonicalize_name(name)] = version
    return pins


def _requirements() -> dict[str, Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    return {canonicalize_name(r.name): r for r in reqs}


def test_every_pin_satisfies_pyproject():
    reqs, pins = _requirements(), _env_pins()
    for name, version in pins.items():
        assert name in reqs, f"{name} is pinned in envs/ but not a dependency in pyproject.toml"
        assert reqs[name].specifier.contains(version), f"{name}=={version} vs {reqs[name]}"


def test_every_dependency_is_pinned():
    missing = set(_requirements()) - set(_env_pins())
    assert not missing, f"pyproject dependencies not pinned in envs/ambient-med.yaml: {missing}"


def test_env_python_matches_requires_python():
    env = yaml.safe_load((REPO / "envs" / "ambient-med.yaml").read_text())
    python = next(d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python"))
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    from packaging.specifiers import SpecifierSet

    assert SpecifierSet(project["requires-python"]).contains(python.split("=")[1])
