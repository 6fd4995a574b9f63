"""Read a YAML tile manifest: tiles, voxel sizes and transforms without BigStitcher.

Format
------
.. code-block:: yaml

    unit: micrometer            # optional, default micrometer
    tiles:
      - path: tiles/t0.zarr     # relative to this file's folder, or absolute
        key: "0"                # optional: array inside the container
        format: zarr            # optional: zarr | n5 | hdf5 | tiff | memory
        voxel_size: [2.0, 0.5, 0.5]      # z, y, x
        shape: [64, 256, 256]            # optional, z y x; read from the array if absent
        dtype: uint16                    # optional: checked by check_arrays
        setup: 0                # optional, default: position in the list
        timepoint: 0            # optional, default 0
        channel: 0              # optional: channel, illumination, tile, angle
        transforms:             # BigStitcher order: the LAST entry is applied FIRST
          - translation: [0, 0, 480]                   # z, y, x
          - scale: [4, 1, 1]                           # z, y, x
            name: calibration

Each ``tiles`` entry gives one view. Its model maps voxel indices (zyx,
voxel centres) to world coordinates and is the product of ``transforms`` in
listed order, as BigStitcher composes ``<ViewTransform>`` chains: above, a
voxel is first scaled, then translated. No transform means the identity
(world coordinates in voxels). Each entry holds exactly one transform kind
of :mod:`tilefusion.transforms` (the one parser of manifests, XML chains and
OME-Zarr 0.6 metadata; plugins add kinds), and optionally ``name``:

``affine``
    12 numbers, a row-major 3x4 matrix in **xyz** order, copied from a
    BigStitcher ``<affine>``.
``affine_zyx``
    A 3x4 or 4x4 nested list acting on zyx coordinates.
``translation``
    Offset ``[z, y, x]``.
``scale``
    Factors ``[z, y, x]``.
``deskew``
    ``{angle: A, scan_axis: x, sign: 1, rotate: false}``: a stage-scanning
    light sheet's deskew in physical coordinates, where the tile's z voxel
    size is the stage step; ``A`` is the angle (degrees) between the sheet
    and the scan axis. On (z, y, x), scan axis x::

        [ sin A      0  0 ]
        [ 0          1  0 ]
        [ s cos A    0  1 ]      (s = sign; scan axis y: the term in row y)

    ``rotate: true`` then rotates by ``A`` about y into the coverslip frame
    (PetaKit5D's "deskew/rotate")::

        [  cos A  0  sin A ]
        [  0      1  0     ]
        [ -sin A  0  cos A ]

    List it before the calibration (so it is applied after it, to
    physical lengths).
``anisotropy``
    ``F`` or ``{factor: F, axis: z}``: ``diag(F, 1, 1)`` (the axis named
    scaled by ``F``), BigStitcher's anisotropy factor as a named transform.
``displacements``
    ``{path: fields/tile0.ome.zarr, interpolation: linear}``: a flow field
    in the OME-Zarr 0.6 (RFC-5) vocabulary, mapping p to p + D(p). The
    field is an OME-Zarr image with one axis of type ``displacement``
    (length 3: z, y, x components) and three ``space`` axes; its level-0
    ``scale``/``translation`` place its grid in the item's input space, in
    world units, its values are world units, interpolated trilinearly
    (constant past the grid). Fusion needs the inverse: it is computed by
    fixed-point iteration to 0.01 of the tile's smallest voxel (a field for
    which it does not converge is refused, naming it), unless given by
``bijection``
    ``{forward: ITEM, inverse: ITEM}``: a transform with its inverse given.

A diagonal entry named ``calibration`` sets the view's calibration, and
with it the world unit (see :func:`tilefusion.geometry.world_unit_of_view`);
without one, the last listed entry does.
The format is chosen from ``format`` or else the path's extension
(``.zarr``, ``.n5``, ``.h5``/``.hdf5``, ``.tif``/``.tiff``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast, get_args

import numpy as np

from tilefusion import fs
from tilefusion.errors import InputError
from tilefusion.geometry import check_affine
from tilefusion.readers.base import ArrayFormat, ArraySource, Dataset, View
from tilefusion.readers.bdv_xml import normalize_unit
from tilefusion.transforms import ParseContext, chain_calibration, parse_chain
from tilefusion.yaml_safe import load_yaml

__all__ = ["read_tile_manifest"]

_TILE_KEYS = {
    "path",
    "key",
    "format",
    "voxel_size",
    "shape",
    "dtype",
    "setup",
    "timepoint",
    "channel",
    "illumination",
    "tile",
    "angle",
    "transforms",
}
_ATTRIBUTES = ("channel", "illumination", "tile", "angle")
_SUFFIX_FORMATS: dict[str, ArrayFormat] = {
    ".zarr": "zarr",
    ".n5": "n5",
    ".h5": "hdf5",
    ".hdf5": "hdf5",
    ".hdf": "hdf5",
    ".tif": "tiff",
    ".tiff": "tiff",
}


def read_tile_manifest(path: str | os.PathLike[str]) -> Dataset:
    """Read a YAML tile manifest (format in the module docstring).

    Parameters
    ----------
    path : str or path-like
        The manifest.

    Returns
    -------
    Dataset
        One view per tile, in (timepoint, setup) order.

    Raises
    ------
    InputError
        For a missing or malformed file, an unknown or missing key, a bad
        transform, duplicate (timepoint, setup) pairs, or (when ``shape`` is
        not given) a tile array that cannot be opened.
    """
    src = str(path)
    manifest = Path(path)
    try:
        text = manifest.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(src, "", "file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(src, "", f"cannot read: {getattr(exc, 'strerror', None) or exc}") from None
    doc = load_yaml(text, source=src)
    if not isinstance(doc, dict):
        raise InputError(src, "", "a manifest is a mapping with 'tiles' (and optional 'unit')")
    unknown = set(doc) - {"unit", "tiles"}
    if unknown:
        raise InputError(src, sorted(unknown)[0], "unknown key (expected 'unit' and 'tiles')")
    unit = normalize_unit(str(doc.get("unit", "micrometer")))
    tiles = doc.get("tiles")
    if not isinstance(tiles, list) or not tiles:
        raise InputError(src, "tiles", "must be a non-empty list of tiles")
    folder = manifest.resolve().parent
    views = [_view(tile, k, folder, src) for k, tile in enumerate(tiles)]
    seen: dict[tuple[int, int], int] = {}
    for k, v in enumerate(views):
        other = seen.setdefault((v.timepoint, v.setup), k)
        if other != k:
            raise InputError(
                src,
                f"tiles[{k}]",
                f"same timepoint={v.timepoint} setup={v.setup} as tiles[{other}]",
            )
    views.sort(key=lambda v: (v.timepoint, v.setup))
    return Dataset(src, unit, tuple(views))


def _view(tile: Any, k: int, folder: Path, src: str) -> View:
    where = f"tiles[{k}]"
    if not isinstance(tile, dict):
        raise InputError(src, where, "a tile is a mapping with 'path' and 'voxel_size'")
    unknown = set(tile) - _TILE_KEYS
    if unknown:
        raise InputError(src, f"{where}.{sorted(unknown)[0]}", "unknown key")
    if "path" not in tile:
        raise InputError(src, f"{where}.path", "missing")
    source = _source(tile, folder, src=src, where=where)
    voxel = _triple(tile.get("voxel_size"), src=src, field=f"{where}.voxel_size", positive=True)
    transforms = tile.get("transforms", [])
    chain = parse_chain(transforms, ParseContext(src, f"{where}.transforms", folder))
    calibration = chain_calibration(chain)
    matrix = chain.as_affine()
    model = check_affine(
        chain.affine_part() if matrix is None else matrix, source=src, field=f"{where}.transforms"
    )
    dtype = tile.get("dtype")
    if dtype is not None:
        try:
            dtype = np.dtype(str(dtype)).name
        except TypeError:
            raise InputError(src, f"{where}.dtype", f"unknown dtype {dtype!r}") from None
    if "shape" in tile:
        s = _triple(tile["shape"], src=src, field=f"{where}.shape", positive=True)
        if any(v != int(v) for v in s):
            raise InputError(src, f"{where}.shape", f"must be integers: {list(s)}")
        shape = (int(s[0]), int(s[1]), int(s[2]))
    else:
        from tilefusion.readers.arrays import open_array

        shape = open_array(source).shape
    attributes = {a: _int(tile[a], src=src, field=f"{where}.{a}") for a in _ATTRIBUTES if a in tile}
    return View(
        setup=_int(tile.get("setup", k), src=src, field=f"{where}.setup"),
        timepoint=_int(tile.get("timepoint", 0), src=src, field=f"{where}.timepoint"),
        shape_zyx=shape,
        voxel_size_zyx=voxel,
        model=model,
        source=source,
        attributes=attributes,
        calibration_zyx=calibration,
        dtype=dtype,
        transform=chain,
    )


def _source(tile: Mapping[str, Any], folder: Path, *, src: str, where: str) -> ArraySource:
    raw = str(tile["path"])
    key = str(tile.get("key", "") or "")
    fmt = tile.get("format")
    if fmt is not None:
        if fmt not in get_args(ArrayFormat) or fmt == "unsupported":
            raise InputError(
                src, f"{where}.format", f"unknown format {fmt!r} (zarr, n5, hdf5, tiff, memory)"
            )
        if fmt == "memory":
            return ArraySource("memory", raw, key)
    location = raw if "://" in raw else str((folder / os.path.expanduser(raw)).resolve())
    if fmt is None:
        fmt = _guess_format(location)
        if fmt is None:
            raise InputError(
                src, f"{where}.path", f"cannot tell the format of {raw!r}; set 'format'"
            )
    return ArraySource(cast(ArrayFormat, fmt), location, key)


def _guess_format(location: str) -> ArrayFormat | None:
    path = Path(location.rstrip("/"))
    fmt = _SUFFIX_FORMATS.get(path.suffix.lower())
    if fmt is not None:
        return fmt
    folder = location.rstrip("/")
    if any(fs.exists(fs.join(folder, name)) for name in ("zarr.json", ".zarray", ".zgroup")):
        return "zarr"
    if fs.exists(fs.join(folder, "attributes.json")):
        return "n5"
    return None


def _triple(value: Any, *, src: str, field: str, positive: bool) -> tuple[float, float, float]:
    if value is None:
        raise InputError(src, field, "missing")
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError(src, field, f"not 3 numbers: {value!r}") from None
    if arr.shape != (3,) or not np.all(np.isfinite(arr)):
        raise InputError(src, field, f"needs 3 finite numbers (z, y, x), got {value!r}")
    if positive and np.any(arr <= 0):
        raise InputError(src, field, f"must be positive: {value!r}")
    return (float(arr[0]), float(arr[1]), float(arr[2]))


def _int(value: Any, *, src: str, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(src, field, f"must be an integer, got {value!r}")
    return value
