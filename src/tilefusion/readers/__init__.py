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
    try:
        info = os.stat(path)
    except OSError:
        return [path, None]
    return [path, info.st_size, info.st_mtime_ns]


def _container_state(source: ArraySource) -> list[object]:
    """Size and modification time of a container and of what its top folders hold.

    A file (TIFF, HDF5) changes its size or time with any edit. A folder
    (Zarr, N5) is summarised by its own entries and those of the array's
    folder, which change when metadata or a top-level object is rewritten; a
    chunk rewritten in place deeper down is not seen (see config/README.md).
    """
    state: list[object] = [_stat_entry(source.path)]
    folders = [source.path]
    if source.key and os.path.isdir(source.path):
        folders.append(os.path.join(source.path, source.key))
    for folder in folders:
        try:
            with os.scandir(folder) as entries:
                names = sorted(e.name for e in entries)
        except OSError:  # a file, or gone: its own stat says so
            continue
        state.extend(_stat_entry(os.path.join(folder, name)) for name in names)
    return state


def inputs_fingerprint(dataset_path: str, sources: Iterable[ArraySource]) -> str:
    """A short digest of the dataset file and every tile container's size and time.

    Changes when a tile is rewritten, so a run made before is not taken as
    current; reads no pixels.
    """
    state: list[object] = [_stat_entry(str(dataset_path))]
    seen: set[tuple[str, str]] = set()
    for source in sources:
        if "://" in source.path or (source.path, source.key) in seen:
            continue
        seen.add((source.path, source.key))
        state.append(_container_state(source))
    text = json.dumps(state, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
