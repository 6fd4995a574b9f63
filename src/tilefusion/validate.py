"""Validation of a finished output: objects, metadata and a QC report.

Every fuse and downsample job leaves a marker that promises what it stored
(object keys with SHA-256) and summarises its pixels. Validation re-reads
every promised object and compares its bytes (SHA-256), decodes one object
per job (all of them on request: bytes equal to what zarr wrote decode as
they did, so decoding everything mostly costs time), checks the OME-NGFF
metadata, and reports coverage and min/max/mean per level from the markers.
Problems name the ranges whose jobs must be rerun.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from tilefusion import fs
from tilefusion.devices import usable_cpus
from tilefusion.plan import Plan
from tilefusion.stats import merge_stats
from tilefusion.store import NgffFormat
from tilefusion.writer import object_digest

__all__ = ["validate_output"]


def _metadata_problems(store_path: str, ngff: NgffFormat, plan: Plan) -> list[str]:
    try:
        return _ngff_problems(store_path, ngff, plan)
    except Exception as exc:  # metadata of an unexpected shape is a finding, not a crash
        return [
            f"{store_path}: OME-NGFF metadata malformed ({exc.__class__.__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''})"
        ]


def _ngff_problems(store_path: str, ngff: NgffFormat, plan: Plan) -> list[str]:
    try:
        group = zarr.open_group(fs.zarr_store(store_path), mode="r")
    except Exception as exc:  # any failure to open is a finding, not a crash
        return [f"{store_path}: cannot open the output group ({exc.__class__.__name__})"]
    ome = ngff.unwrap(dict(group.attrs))
    multiscales = ome.get("multiscales")
    if not multiscales:
        return [f"{store_path}: no OME-NGFF multiscales metadata"]
    problems = []
    datasets = multiscales[0].get("datasets", [])
    if len(datasets) != len(plan.levels):
        problems.append(
            f"{store_path}: {len(datasets)} datasets in metadata, plan has {len(plan.levels)}"
        )
    for k, (entry, level) in enumerate(zip(datasets, plan.levels)):
        transforms = {t["type"]: t for t in entry.get("coordinateTransformations", [])}
        scale = transforms.get("scale", {}).get("scale")
        if scale is None or not np.allclose(scale, level.scale_zyx):
            problems.append(f"{store_path}: level {k} scale {scale} != {list(level.scale_zyx)}")
        try:
            array = group[entry["path"]]
        except KeyError:
            problems.append(f"{store_path}: level {k} array {entry.get('path')!r} missing")
            continue
        except Exception as exc:  # unreadable metadata is a finding
            problems.append(
                f"{store_path}: level {k} array {entry.get('path')!r} unreadable "
                f"({exc.__class__.__name__})"
            )
            continue
        if not isinstance(array, zarr.Array):
            problems.append(f"{store_path}: level {k} {entry['path']!r} is not an array")
        elif tuple(array.shape) != level.shape_zyx:
            problems.append(f"{store_path}: level {k} shape {array.shape} != {level.shape_zyx}")
    problems.extend(_schema_problems(store_path, ngff))
    return problems


def _schema_problems(store_path: str, ngff: NgffFormat) -> list[str]:
    """Validate with ome-zarr-models where it is installed."""
    try:
        if ngff.version == "0.4":
            from ome_zarr_models.v04.image import Image
        else:
            from ome_zarr_models.v05.image import Image  # type: ignore[assignment]
    except ImportError:
        return []
    try:
        Image.from_zarr(zarr.open_group(fs.zarr_store(store_path), mode="r"))
    except Exception as exc:  # report the model's complaint as a finding
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        return [f"{store_path}: OME-NGFF {ngff.version} metadata invalid: {first}"]
    return []


def _open_level_array(store_path: str, level_index: int) -> zarr.Array | str:
    """A level's array, or why its metadata cannot be used."""
    where = fs.join(store_path, str(level_index))
    try:
        return zarr.open_array(fs.zarr_store(where), mode="r")
    except Exception as exc:  # missing or damaged metadata is a finding, not a crash
        return (
            f"{where}: level {level_index} array metadata "
            f"missing or unreadable ({exc.__class__.__name__})"
        )


def _group_problem(store_path: str) -> str | None:
    try:
        zarr.open_group(fs.zarr_store(store_path), mode="r")
    except Exception as exc:  # as above
        return (
            f"{store_path}: output group metadata missing or unreadable ({exc.__class__.__name__})"
        )
    return None


def _read_marker(path: Path) -> dict[str, Any] | None:
    """A marker, or None when it is missing, unreadable or not a marker."""
    try:
        marker = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or not isinstance(marker.get("objects"), dict):
        return None
    if not all(
        isinstance(k, str) and "/" in k and (v is None or isinstance(v, str))
        for k, v in marker["objects"].items()
    ):
        return None
    stats = marker.get("stats", {})
    number = (int, float)
    if not isinstance(stats, dict) or (
        stats and not all(isinstance(stats.get(k), number) for k in _STATS_KEYS)
    ):
        return None
    absent = marker.get("absent_input_chunks", {})
    if not isinstance(absent, dict) or not all(isinstance(v, int) for v in absent.values()):
        return None
    return marker


_STATS_KEYS = ("voxels", "covered", "min", "max", "sum")


def _digest(path: str) -> str | None:
    """SHA-256 of a stored object; a marker-proof token when it is not a readable file."""
    try:
        return object_digest(path)
    except OSError as exc:  # a folder in the object's place, no permission, ...
        return f"unreadable ({exc.__class__.__name__})"


def _decodes(array: zarr.Array, key: str) -> bool:
    """Whether the object at ``key`` (relative to the level) decodes."""
    parts = [int(p) for p in key.split("/") if p.isdigit()]
    step = array.shards or array.chunks
    lo = [i * s for i, s in zip(parts, step)]
    hi = [min(a + s, n) for a, s, n in zip(lo, step, array.shape)]
    try:
        array[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    except Exception:
        return False
    return True


def validate_output(
    plan: Plan,
    *,
    store_path: str | Path,
    ngff: NgffFormat,
    markers: Mapping[tuple[int, int], str | Path],
    decode_all: bool = False,
) -> dict[str, Any]:
    """Check every object the markers promise and the NGFF metadata.

    Parameters
    ----------
    plan : Plan
    store_path : path or URL
        The output group.
    ngff : NgffFormat
    markers : mapping of (level, range) to path
        The marker file of every job.
    decode_all : bool
        Decode every object, not one per job (bytes can match a marker and still be
        unreadable when the marker itself was written from a bad object).

    Returns
    -------
    dict
        The QC report: ``ok``, ``problems`` (one line each), ``bad_ranges``
        (``[level, range]`` pairs to rerun), ``structure_damaged`` (Zarr
        metadata missing or unreadable: the plan step repairs it),
        ``metadata_problems`` (OME-NGFF metadata: the assemble step rewrites
        it), ``absent_input_chunks`` (tile to the absent tile chunks its fuse
        jobs read as no data, summed over jobs: a chunk two jobs read counts
        twice), ``warnings`` (one line each) and per-level statistics.
    """
    store_path = str(store_path)
    problems: list[str] = []
    bad: set[tuple[int, int]] = set()
    level_stats: dict[int, list[Mapping[str, float | int]]] = {}
    loaded: dict[tuple[int, int], dict[str, Any]] = {}
    for (level_index, range_index), marker_path in sorted(markers.items()):
        marker = _read_marker(Path(marker_path))
        if marker is None:
            problems.append(f"{marker_path}: marker missing or unreadable")
            bad.add((level_index, range_index))
        else:
            loaded[level_index, range_index] = marker
    # Damaged Zarr metadata is repaired by the plan step, which every job follows.
    structure = [p for p in [_group_problem(store_path)] if p]
    arrays: dict[int, zarr.Array] = {}
    for k in range(len(plan.levels)):
        opened = _open_level_array(store_path, k)
        if isinstance(opened, str):
            structure.append(opened)
        else:
            arrays[k] = opened
    keys = [key for marker in loaded.values() for key in marker["objects"]]
    # Hashing dominates validation and releases the GIL: one thread per CPU,
    # while the metadata check (mostly importing its models) runs beside it.
    with ThreadPoolExecutor(max_workers=usable_cpus()) as pool:
        metadata = None if structure else pool.submit(_metadata_problems, store_path, ngff, plan)
        digests = dict(zip(keys, pool.map(lambda k: _digest(fs.join(store_path, k)), keys)))
        metadata_problems = metadata.result() if metadata else []
    for (level_index, range_index), marker in loaded.items():
        level_stats.setdefault(level_index, []).append(marker.get("stats", {}))
        decoded = False
        for key, promised in marker["objects"].items():
            found = digests[key]
            if found != promised:
                what = (
                    "missing" if found is None else "unexpected" if promised is None else "corrupt"
                )
                if found is not None and found.startswith("unreadable"):
                    what = f"not a readable file, {found}"
                problems.append(
                    f"{fs.join(store_path, key)}: {what} (level {level_index} range {range_index})"
                )
                bad.add((level_index, range_index))
            elif found is not None and level_index in arrays and (decode_all or not decoded):
                decoded = True
                relative = key.split("/", 1)[1]
                if not _decodes(arrays[level_index], relative):
                    where = f"level {level_index} range {range_index}"
                    problems.append(f"{fs.join(store_path, key)}: does not decode ({where})")
                    bad.add((level_index, range_index))
    problems.extend(structure)
    problems.extend(metadata_problems)
    level0 = [p for p in level_stats.get(0, []) if p]
    if plan.tiles and level0 and len(level0) == plan.grid.n_ranges:
        covered = merge_stats(level0)["covered"]
        if not covered:
            problems.append(
                f"{store_path}: no voxel of level 0 holds data although "
                f"{len(plan.tiles)} tile(s) lie in the grid (coverage 0)"
            )
    levels = []
    for k, level in enumerate(plan.levels):
        parts = [p for p in level_stats.get(k, []) if p]
        merged = merge_stats(parts) if parts else None
        levels.append(
            {
                "level": k,
                "shape_zyx": list(level.shape_zyx),
                "scale_zyx": list(level.scale_zyx),
                "coverage": (merged["covered"] / merged["voxels"])
                if merged and merged["voxels"]
                else None,
                "min": merged["min"] if merged else None,
                "max": merged["max"] if merged else None,
                "mean": (merged["sum"] / merged["covered"])
                if merged and merged["covered"]
                else None,
            }
        )
    absent: dict[str, int] = {}
    for _, marker in sorted(loaded.items()):
        for tile, count in (marker.get("absent_input_chunks") or {}).items():
            absent[tile] = absent.get(tile, 0) + int(count)
    warnings = [
        f"tile {tile}: absent chunks read as no data ({count} chunk reads over the fuse jobs)"
        for tile, count in absent.items()
    ]
    return {
        "ok": not problems,
        "problems": problems,
        "warnings": warnings,
        "absent_input_chunks": absent,
        "bad_ranges": sorted([list(b) for b in bad]),
        "structure_damaged": bool(structure),
        "metadata_problems": bool(metadata_problems),
        "levels": levels,
    }
