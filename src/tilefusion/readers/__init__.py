"""Readers: turn a BigStitcher XML or a tile manifest into a :class:`Dataset`.

:func:`read_dataset` picks the reader from the file extension;
:func:`open_array` opens one view's pixels; :func:`check_arrays` checks,
reading metadata only, that every view's array exists and matches.
"""

from __future__ import annotations

import os
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


def check_arrays(dataset: Dataset) -> None:
    """Open every view's array (metadata only) and compare it with the dataset.

    Raises
    ------
    InputError
        Naming the array's file and the field, when an array is missing or
        unreadable, or its shape or dtype disagrees with the metadata.
    """
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
