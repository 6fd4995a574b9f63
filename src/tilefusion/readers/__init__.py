"""Readers: turn a BigStitcher XML or a tile manifest into a :class:`Dataset`.

:func:`read_dataset` picks the reader from the file extension;
:func:`open_array` opens one view's pixels; :func:`check_arrays` checks,
reading metadata only, that every view's array exists and matches.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

from tilefusion import fs
from tilefusion.errors import InputError
from tilefusion.readers.arrays import TileArray, open_array, register_memory_array
from tilefusion.readers.base import ArraySource, Dataset, View
from tilefusion.readers.bdv_xml import read_bdv_xml
from tilefusion.readers.manifest import read_tile_manifest

__all__ = [
    "ArraySource",
    "Dataset",
    "TileArray",
    "View",
    "check_arrays",
    "inputs_fingerprint",
    "open_array",
    "read_bdv_xml",
    "read_dataset",
    "read_tile_manifest",
    "register_memory_array",
]


def read_dataset(path: str | os.PathLike[str]) -> Dataset:
    """Read a dataset: ``.xml`` as BigStitcher XML, ``.yaml``/``.yml`` as a manifest.

    Raises
    ------
    InputError
        For another extension, or anything the reader rejects.
    """
    suffix = Path(path).suffix.lower()
    if suffix == ".xml":
        return read_bdv_xml(path)
    if suffix in (".yaml", ".yml"):
        return read_tile_manifest(path)
    raise InputError(
        str(path), "", "unknown dataset type: expected a BigStitcher .xml or a .yaml manifest"
    )


def check_arrays(dataset: Dataset) -> Dataset:
    """Open every view's array (metadata only) and compare it with the dataset.

    Returns
    -------
    Dataset
        The same views, each with the pixel type its array has.

    Raises
    ------
    InputError
        Naming the array's file and the field, when an array is missing or
        unreadable, or its shape or dtype disagrees with the metadata.
    """
    checked = []
    for view in dataset.views:
        array = open_array(view.source)
        field = f"view {view.name}"
        if view.source.key:
            field += f" array {view.source.key!r}"
        if tuple(array.shape) != tuple(view.shape_zyx):
            raise InputError(
                view.source.path,
                f"{field} shape",
                f"array is {tuple(array.shape)} (zyx) but {dataset.path} says "
                f"{tuple(view.shape_zyx)}",
            )
        if view.dtype is not None and array.dtype.name != view.dtype:
            raise InputError(
                view.source.path,
                f"{field} dtype",
                f"array is {array.dtype.name} but {dataset.path} says {view.dtype}",
            )
        checked.append(dataclasses.replace(view, dtype=array.dtype.name))
    return Dataset(dataset.path, dataset.unit, tuple(checked))


def _stat_entry(path: str) -> list[object]:
    if fs.is_url(path):
        return _object_entry(path)
    try:
        info = os.stat(path)
    except OSError:
        return [path, None]
    return [path, info.st_size, info.st_mtime_ns]


def _object_entry(url: str) -> list[object]:
    """Size and version tag (ETag, else modification time) of an object at a URL."""
    try:
        filesystem, inner = fs.filesystem(url)
        info = filesystem.info(inner)
    except Exception:  # absent, no access, no backend: the dataset's reader says why
        return [url, None]
    tag = info.get("ETag") or info.get("LastModified") or info.get("mtime")
    return [url, info.get("size"), str(tag)]


_METADATA_NAMES = {".zarray", ".zattrs", ".zgroup", "zarr.json", "attributes.json"}


def _is_chunk_folder(name: str) -> bool:
    # Zarr v2 "0", v3 "c", N5 block folders: below them only chunks.
    return name.isdigit() or name == "c"


def _container_state(source: ArraySource, exclude: frozenset[str]) -> list[object]:
    """Size and modification time of a container and of its metadata documents.

    A file (TIFF, HDF5) changes its size or time with any edit. A folder
    (Zarr, N5) is summarised by its own entries and the metadata documents
    of its groups and arrays (up to four folders deep, not inside chunk
    folders), which change when an array is rewritten or its metadata
    edited; a chunk rewritten in place is not seen (see README.md).
    """
    state: list[object] = [_stat_entry(source.path)]
    folders = [(source.path, 0)]
    while folders:
        folder, depth = folders.pop()
        try:
            with os.scandir(folder) as scan:
                entries = sorted((e.name, e.is_dir(follow_symlinks=False)) for e in scan)
        except OSError:  # a file, or gone: its own stat says so
            continue
        for name, is_dir in entries:
            path = os.path.join(folder, name)
            if os.path.abspath(path) in exclude:
                continue
            if depth == 0 or name in _METADATA_NAMES:
                state.append(_stat_entry(path))
            if is_dir and depth < 4 and not (depth > 0 and _is_chunk_folder(name)):
                folders.append((path, depth + 1))
    return state


def inputs_fingerprint(
    dataset_path: str, sources: Iterable[ArraySource], *, exclude: Iterable[str] = ()
) -> str:
    """A short digest of the dataset file and every tile container's size and time.

    Changes when a tile is rewritten, so a run made before is not taken as
    current; reads no pixels. A dataset file at a URL counts with its size
    and ETag; tile containers at URLs are not summarised (listing a
    bucket's prefixes for every run would cost more than it saves). Paths
    in ``exclude`` (the output, should it lie inside a container) are left
    out.
    """
    skip = frozenset(os.path.abspath(p) for p in exclude)
    state: list[object] = [_stat_entry(str(dataset_path))]
    seen: set[str] = set()
    for source in sources:
        if fs.is_url(source.path) or source.path in seen:
            continue
        seen.add(source.path)
        state.append(_container_state(source, skip))
    text = json.dumps(state, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
