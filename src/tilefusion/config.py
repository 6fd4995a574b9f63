"""The run configuration: JSON-schema validation, defaults and semantic checks.

The schema (``schemas/config.schema.yaml``) is the one home of every key, its
type, description and default; the workflow validates with the same file.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from tilefusion import fs
from tilefusion.errors import InputError
from tilefusion.yaml_safe import load_yaml

__all__ = ["MIN_CHUNK_VOXELS", "config_digest", "load_config", "read_config_file", "schema"]


def schema() -> dict[str, Any]:
    """Return the configuration JSON schema."""
    text = resources.files("tilefusion").joinpath("schemas/config.schema.yaml").read_text()
    loaded: dict[str, Any] = yaml.safe_load(text)
    return loaded


def _fill_defaults(node: dict[str, Any], sub_schema: Mapping[str, Any]) -> None:
    for key, prop in sub_schema.get("properties", {}).items():
        if key not in node and "default" in prop:
            node[key] = copy.deepcopy(prop["default"])
        if isinstance(node.get(key), dict) and prop.get("type") == "object":
            _fill_defaults(node[key], prop)


def without_defaults(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` less every key whose value is the schema's default (recursively).

    What a setting's hash is made of: a key added to the schema later, at its
    default, then leaves the hashes of existing configurations unchanged.
    """
    return _strip_defaults(config, schema())


def _strip_defaults(node: Mapping[str, Any], sub_schema: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    properties = sub_schema.get("properties", {})
    for key, value in node.items():
        prop = properties.get(key, {})
        if isinstance(value, Mapping) and prop.get("type") == "object":
            value = _strip_defaults(value, prop)
            if not value:
                continue
        elif "default" in prop and value == prop["default"]:
            continue
        out[key] = value
    return out


def _key_path(error: jsonschema.ValidationError) -> str:
    return ".".join(str(p) for p in error.absolute_path) or "(top level)"


def _describe(error: jsonschema.ValidationError) -> tuple[str, str]:
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        extra = sorted(set(error.instance) - set(allowed))
        prefix = _key_path(error)
        key = extra[0] if prefix == "(top level)" else f"{prefix}.{extra[0]}"
        return key, f"unknown key; allowed here: {', '.join(allowed)}"
    if error.validator == "enum":
        return _key_path(error), (
            f"{error.instance!r} is not one of {', '.join(map(str, error.validator_value))}"
        )
    return _key_path(error), error.message


def load_config(raw: Mapping[str, Any] | None, *, source: str = "config") -> dict[str, Any]:
    """Validate a configuration and return it with every default filled in.

    Parameters
    ----------
    raw : mapping
        The configuration as read from YAML (or Snakemake's ``config``).
    source : str
        Name used in error messages (the config file's path).

    Returns
    -------
    dict
        A new dict; ``raw`` is not modified.

    Raises
    ------
    InputError
        For an unknown key, a wrong type or value, or values that contradict
        each other (shards that are not multiples of chunks, a non-positive
        resolution), naming the key.
    """
    config: dict[str, Any] = copy.deepcopy(dict(raw or {}))
    the_schema = schema()
    validator = jsonschema.Draft202012Validator(the_schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        key, problem = _describe(errors[0])
        raise InputError(source, key, problem)
    _fill_defaults(config, the_schema)

    _check_numbers(config, source)
    output = config["output"]
    url_problem = fs.url_problem(output["path"])
    if url_problem:
        raise InputError(source, "output.path", f"{output['path']!r}: {url_problem}")
    fs.set_storage_options(config["storage_options"])
    chunk_voxels = math.prod(output["chunks"])
    if chunk_voxels < MIN_CHUNK_VOXELS:
        raise InputError(
            source,
            "output.chunks",
            f"{output['chunks']} holds {chunk_voxels} voxels; a chunk needs at least "
            f"{MIN_CHUNK_VOXELS} (e.g. [16, 16, 16] or [1, 64, 64])",
        )
    shards = output["shards"]
    if shards is not None:
        if output["format"] == "ome-zarr-0.4":
            raise InputError(source, "output.shards", "sharding needs output.format ome-zarr-0.5")
        if any(s % c for s, c in zip(shards, output["chunks"], strict=True)):
            raise InputError(
                source,
                "output.shards",
                f"{shards} is not a multiple of output.chunks {output['chunks']}",
            )
    return config


MIN_CHUNK_VOXELS = 4096
"""Smallest chunk a run may ask for: below it, per-object costs swamp the work."""

DEMO_DATASET = "resources/demo/dataset.xml"
"""Where the bundled demo is generated (``demo: true``), relative to the working directory."""


def _check_numbers(config: Mapping[str, Any], source: str) -> None:
    """Lengths must be finite and positive, matrices well shaped and finite."""
    lengths = {
        "world_unit": config.get("world_unit"),
        "output.resolution": config["output"]["resolution"],
    }
    for key, values in lengths.items():
        if values is not None and not all(math.isfinite(v) and v > 0 for v in values):
            raise InputError(source, key, f"must be finite and positive, got {values}")
    for key in ("blend_range", "blend_border"):
        values = config["fusion"][key]
        if not all(math.isfinite(v) for v in values):
            raise InputError(source, f"fusion.{key}", f"must be finite, got {values}")
    for index, step in enumerate(config["fusion"]["post_transforms"]):
        ((kind, value),) = step.items()
        key = f"fusion.post_transforms.{index}.{kind}"
        rows = value if kind == "affine_zyx" else [value]
        if not all(math.isfinite(v) for row in rows for v in row):
            raise InputError(source, key, f"must be finite, got {value}")
        if kind == "scale" and not all(v != 0 for v in value):
            raise InputError(source, key, f"a zero scale is singular, got {value}")


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file and validate it (see :func:`load_config`)."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise InputError(str(path), "", "config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(
            str(path), "", f"cannot read: {getattr(exc, 'strerror', None) or exc}"
        ) from None
    raw = load_yaml(text, source=str(path))
    if raw is not None and not isinstance(raw, dict):
        raise InputError(str(path), "", "a config file holds a mapping of keys")
    return load_config(raw, source=str(path))


def config_digest(config: Mapping[str, Any], *keys: str) -> str:
    """Stable hash of the named top-level sections of a validated config."""
    chosen = {k: config.get(k) for k in keys} if keys else dict(config)
    text = json.dumps(chosen, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
