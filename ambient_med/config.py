"""Configuration: loading, validation against ``config/schema.yaml``, and per-stage slices.

The Snakefile validates with ``snakemake.utils.validate(set_default=True)``; the CLI validates
the same schema here, so a stage run by hand sees exactly the defaults a rule would.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml
from jsonschema import validators

from ambient_med.errors import AmbientMedError

SCHEMA_NAME = "config.schema.yaml"

# Which config sections each stage depends on. Snakemake passes only these to a rule (as a
# param), so editing, say, the sampler settings does not retrain the model.
STAGE_SECTIONS: dict[str, tuple[str, ...]] = {
    "demo_data": ("demo", "corrupt"),
    "ingest": ("ingest",),
    "corrupt": ("corrupt",),
    "train": ("corrupt", "model", "scheduler", "train"),
    "sample": ("sample",),
    "reconstruct": ("reconstruct", "ingest"),
    "audit": ("audit",),
    "evaluate": ("evaluate",),
    "bundle": ("reconstruct", "ingest"),
}


# What every member of a pool must share: one model learns one kind of measurement.
POOLED_ALIKE = ("source", "corruption", "train_mode")


def load_schema() -> dict[str, Any]:
    text = resources.files("ambient_med").joinpath(SCHEMA_NAME).read_text()
    return yaml.safe_load(text)


def _default_filling_validator() -> type:
    """A Draft 2020-12 validator that fills ``default`` values (jsonschema FAQ recipe)."""
    base = jsonschema.Draft202012Validator
    validate_properties = base.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):  # noqa: ANN001
        if isinstance(instance, dict):
            for name, subschema in properties.items():
                if "default" in subschema:
                    # deepcopy: never share one mutable default between two cohorts.
                    instance.setdefault(name, copy.deepcopy(subschema["default"]))
        yield from validate_properties(validator, properties, instance, schema)

    return validators.extend(base, {"properties": set_defaults})


def _key(path: Any) -> str:
    return ".".join(str(part) for part in path) or "<top level>"


def _message(error: jsonschema.ValidationError) -> str:
    """One line naming the offending key; an unknown key (often a typo) is named itself, with
    the closest known key, rather than as an error of the section that holds it."""
    if error.validator == "additionalProperties" and error.validator_value is False:
        known = sorted(error.schema.get("properties", {}))
        unknown = sorted(set(error.instance) - set(known))
        if unknown:
            key = _key([*error.absolute_path, unknown[0]])
            close = difflib.get_close_matches(unknown[0], known, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"known keys: {', '.join(known)}"
            return f"config key '{key}': not a known key; {hint}"
    return f"config key '{_key(error.absolute_path)}': {error.message}"


def validate_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Returns a validated copy of ``config`` with every default filled in.

    Raises:
        AmbientMedError: one line naming the first offending config key and the reason.
    """
    filled = copy.deepcopy(dict(config))
    validator = _default_filling_validator()(load_schema())
    errors = sorted(validator.iter_errors(filled), key=lambda e: list(e.absolute_path))
    if errors:
        raise AmbientMedError(_message(errors[0]))
    for name, cohort in filled["cohorts"].items():
        raw = cohort["source"] == "kspace"
        if raw != (cohort["corruption"] == "native"):
            raise AmbientMedError(
                f"config key 'cohorts.{name}.corruption': {cohort['corruption']!r} does not fit "
                f"source {cohort['source']!r} (raw k-space trains on 'native', images on "
                "'pixel' or 'kspace')"
            )
    for name, pool in filled["pools"].items():
        key = f"config key 'pools.{name}"
        if name in filled["cohorts"]:
            raise AmbientMedError(f"{key}': a cohort has this name (outputs share results/)")
        for member in pool["cohorts"]:
            if member not in filled["cohorts"]:
                raise AmbientMedError(f"{key}.cohorts': no cohort named {member!r}")
        for field in POOLED_ALIKE:
            values = {filled["cohorts"][m][field] for m in pool["cohorts"]}
            if len(values) > 1:
                raise AmbientMedError(
                    f"{key}.cohorts': members differ in {field} ({', '.join(sorted(values))}); "
                    "one model trains on one kind of measurement"
                )
    train = filled["train"]
    processes = train["distributed"]["nproc_per_node"] * train["distributed"]["nnodes"]
    if train["batch_size"] % processes:
        raise AmbientMedError(
            f"config key 'train.batch_size': {train['batch_size']} examples do not split evenly "
            f"over the {processes} processes of train.distributed"
        )
    low, high = train["further_acceleration"]
    if low > high:
        raise AmbientMedError(
            f"config key 'train.further_acceleration': [{low:g}, {high:g}] is not a range "
            "(low must not exceed high)"
        )
    if train["distributed"]["nnodes"] > 1 and not train["distributed"]["rdzv_endpoint"]:
        raise AmbientMedError(
            "config key 'train.distributed.rdzv_endpoint': nnodes > 1 needs the host:port of "
            "the first node"
        )
    return filled


def load_config(path: str | Path) -> dict[str, Any]:
    """Reads a YAML config file and validates it."""
    path = Path(path)
    if not path.is_file():
        raise AmbientMedError(f"config file '{path}': does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise AmbientMedError(f"config file '{path}': not valid YAML ({exc.problem})") from None
    if not isinstance(data, dict):
        raise AmbientMedError(f"config file '{path}': expected a mapping at the top level")
    return validate_config(data)


def pool_settings(config: Mapping[str, Any], pool: str) -> dict[str, Any]:
    """A pool as a cohort-shaped entry: its name and seed, the members' shared
    :data:`POOLED_ALIKE` settings, and ``members``: each member cohort's own settings."""
    entry = config["pools"][pool]
    members = [cohort_settings(config, name) for name in entry["cohorts"]]
    shared = {field: members[0][field] for field in POOLED_ALIKE}
    return shared | {"name": pool, "seed": entry["seed"], "members": members}


def cohort_settings(config: Mapping[str, Any], cohort: str) -> dict[str, Any]:
    """The cohort's own entry, with its name and resolved input folder (for a pool,
    :func:`pool_settings`)."""
    cohorts = config["cohorts"]
    if cohort in config.get("pools", {}):
        return pool_settings(config, cohort)
    if cohort not in cohorts:
        raise AmbientMedError(f"config key 'cohorts.{cohort}': no such cohort")
    settings = dict(cohorts[cohort])
    settings["name"] = cohort
    if settings.get("input") is None:
        if not settings["demo"]:
            raise AmbientMedError(
                f"config key 'cohorts.{cohort}.input': required unless the cohort is a demo"
            )
        settings["input"] = f"data/{cohort}"
    return settings


def stage_config(config: Mapping[str, Any], cohort: str, stage: str) -> dict[str, Any]:
    """The part of the config that one stage of one cohort depends on (JSON-serialisable)."""
    if stage not in STAGE_SECTIONS:
        raise AmbientMedError(f"unknown stage {stage!r}")
    sliced: dict[str, Any] = {"cohort": cohort_settings(config, cohort)}
    for section in STAGE_SECTIONS[stage]:
        sliced[section] = copy.deepcopy(config[section])
    return sliced


def stage_json(config: Mapping[str, Any], cohort: str, stage: str) -> str:
    """:func:`stage_config` as canonical JSON (sorted keys), for a Snakemake param."""
    return json.dumps(stage_config(config, cohort, stage), sort_keys=True, separators=(",", ":"))


def config_hash(stage_cfg: Mapping[str, Any]) -> str:
    """SHA-256 of the canonical JSON of a stage config: checkpoints resume only on a match."""
    canonical = json.dumps(stage_cfg, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()
