"""Planning: the output grid, its chunks and shards, and the fuse jobs' ranges.

Planning reads metadata only. Each tile's voxel-to-output map is

    output index = (P · W · M · voxel - origin) / resolution

with ``M`` the registration model (voxel to world), ``W = diag(world unit)``
(world to physical), ``P`` the post-registration transforms (physical to
physical) and ``origin`` the physical position of output voxel (0, 0, 0).

The output grid is aligned to multiples of the resolution, like BigStitcher's
world grid: at a resolution equal to the world unit it is BigStitcher's
maximal bounding box (floor of the smallest and ceil of the largest
transformed voxel-centre corner, both inclusive).

Ranges are runs of whole shards in C order of the shard grid, so exactly one
fuse job writes any stored object.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import math
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from tilefusion import geometry
from tilefusion.atomic import write_text_atomic
from tilefusion.errors import InputError
from tilefusion.readers.arrays import StoredLevel, open_array, stored_levels
from tilefusion.readers.base import ArraySource, Dataset, View
from tilefusion.transforms import (
    Affine,
    ParseContext,
    Transform,
    parse_transform,
    transform_from_json,
    unit_affine,
)
from tilefusion.transforms import Sequence as Chain

__all__ = [
    "Level",
    "Plan",
    "PlannedTile",
    "RangeCuts",
    "Shape3",
    "chunk_tile_pairs",
    "grid_path",
    "level_allowance",
    "level_factor",
    "make_plan",
    "post_transform_affine",
    "range_chunks",
    "range_shards",
    "read_plan",
    "read_plan_grid",
    "source_ranges",
    "tiles_for_chunks",
    "write_manifest",
]

# 2: levels state range_voxels instead of listing every range's first shard.
# (A tile's "level" came later without a new version: it defaults to 0, and a
# tile's source, shape and tile_to_output already describe the level read.)
PLAN_VERSION = 2
Shape3 = tuple[int, int, int]
Float3 = tuple[float, float, float]


def _shape3(values: Sequence[Any] | NDArray[Any]) -> Shape3:
    return (int(values[0]), int(values[1]), int(values[2]))


def _float3(values: Sequence[Any] | NDArray[Any]) -> Float3:
    return (float(values[0]), float(values[1]), float(values[2]))


@dataclass(frozen=True)
class PlannedTile:
    """One tile as the fuse jobs see it: the stored resolution level they read.

    Attributes
    ----------
    name : str
        View name (``t{timepoint}-s{setup}``).
    source : ArraySource
        Where the pixels of the level read are (the view's own source for
        level 0).
    shape_zyx : tuple of int
        Shape of that level.
    dtype : str or None
        Pixel type the metadata declares.
    tile_to_output : ndarray of shape (4, 4)
        Voxel index of that level to output voxel index (output level 0).
    box_lo, box_hi : tuple of float
        Bounding box of the level's voxel centres in output voxel indices.
    level : int
        The tile's stored resolution level read (0: full resolution; see
        :func:`make_plan`). Plans without it are of level 0.
    warp : dict or None
        Where the tile's transform is not affine (a displacement field): the
        whole map from the level's voxel indices to output voxel indices, as
        a transform spec (:meth:`tilefusion.transforms.Transform.to_spec`);
        ``tile_to_output`` is then its affine part (for scales: blending
        ramps, stored levels) and the box bounds the map itself. None (and
        absent from the JSON) for affine tiles.
    """

    name: str
    setup: int
    timepoint: int
    source: ArraySource
    shape_zyx: Shape3
    dtype: str | None
    tile_to_output: NDArray[np.float64]
    box_lo: Float3
    box_hi: Float3
    level: int = 0
    warp: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        out = {
            "name": self.name,
            "setup": self.setup,
            "timepoint": self.timepoint,
            "source": asdict(self.source),
            "shape_zyx": list(self.shape_zyx),
            "dtype": self.dtype,
            "tile_to_output": self.tile_to_output.tolist(),
            "box_lo": list(self.box_lo),
            "box_hi": list(self.box_hi),
            "level": self.level,
        }
        if self.warp is not None:
            out["warp"] = self.warp
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PlannedTile:
        return cls(
            name=data["name"],
            setup=int(data["setup"]),
            timepoint=int(data["timepoint"]),
            source=ArraySource(**data["source"]),
            shape_zyx=_shape3(data["shape_zyx"]),
            dtype=data["dtype"],
            tile_to_output=np.asarray(data["tile_to_output"], dtype=np.float64),
            box_lo=_float3(data["box_lo"]),
            box_hi=_float3(data["box_hi"]),
            level=int(data.get("level", 0)),
            warp=data.get("warp"),
        )

    def output_to_tile(self) -> Transform:
        """The map from output voxel indices to this tile's voxels (inverse of its warp).

        Built once per process and tile (displacement fields are read then).
        """
        if self.warp is None:
            return Affine(geometry.invert(self.tile_to_output))
        return _warp_inverse(self.name, json.dumps(self.warp, sort_keys=True))


@functools.lru_cache(maxsize=256)
def _warp_inverse(name: str, spec: str) -> Transform:
    del name  # part of the key only
    return transform_from_json(json.loads(spec)).inverse()


@dataclass(frozen=True)
class Level:
    """One resolution level of the output pyramid.

    Attributes
    ----------
    shape_zyx, chunks_zyx, shards_zyx : tuple of int
        Array, chunk and shard (write unit) shapes; shards equal chunks
        when the format has no sharding.
    factor_zyx : tuple of int
        Downsampling factor from the previous level, per axis (1 for level 0,
        and for an axis a level keeps; see :func:`level_factor`).
    scale_zyx, translation_zyx : tuple of float
        Physical voxel size and position of voxel (0, 0, 0)'s centre.
    range_voxels : int
        Voxels one range should hold (``chunks_per_range`` chunks). The
        C-ordered shards are cut into ranges of about equal voxels, so clipped
        shards at the grid's far faces do not make jobs of their own; the cut
        is computed from the per-axis shard counts (see :class:`RangeCuts`),
        never from a list of every shard or range.
    """

    shape_zyx: Shape3
    chunks_zyx: Shape3
    shards_zyx: Shape3
    factor_zyx: Shape3
    scale_zyx: Float3
    translation_zyx: Float3
    range_voxels: int

    @property
    def shard_grid(self) -> Shape3:
        return _shape3([-(-s // c) for s, c in zip(self.shape_zyx, self.shards_zyx)])

    @property
    def n_shards(self) -> int:
        return math.prod(self.shard_grid)

    @functools.cached_property
    def cuts(self) -> RangeCuts:
        """How the shards are cut into ranges (computed once per level)."""
        return RangeCuts(self.shape_zyx, self.shards_zyx, self.range_voxels)

    @property
    def n_ranges(self) -> int:
        return self.cuts.n_ranges

    def range_bounds(self, range_index: int) -> tuple[int, int]:
        """Flat shard indices ``[start, stop)`` of one range."""
        if not 0 <= range_index < self.n_ranges:
            raise IndexError(f"range {range_index} not in 0..{self.n_ranges - 1}")
        return self.cuts.bounds(range_index)

    def range_of_shards(self, flat_shards: NDArray[np.int64]) -> NDArray[np.int64]:
        """The range of each flat shard index."""
        return self.cuts.range_of(flat_shards)

    def max_range_voxels(self) -> int:
        """Voxels of the largest range (what one job computes at most).

        Exact up to 65,536 ranges; beyond, a bound less than one range's
        share of the voxels plus one shard above the exact value.
        """
        return self.cuts.max_range_voxels

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["ranges"] = self.n_ranges
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Level:
        return cls(
            shape_zyx=_shape3(data["shape_zyx"]),
            chunks_zyx=_shape3(data["chunks_zyx"]),
            shards_zyx=_shape3(data["shards_zyx"]),
            factor_zyx=_shape3(data["factor_zyx"]),
            scale_zyx=_float3(data["scale_zyx"]),
            translation_zyx=_float3(data["translation_zyx"]),
            range_voxels=int(data["range_voxels"]),
        )


@dataclass(frozen=True)
class Plan:
    """Everything the fuse, assemble and validate steps need.

    Attributes
    ----------
    dataset : str
        The dataset file planned from.
    unit : str
        Physical unit of every length here.
    world_unit_zyx : tuple of float
        Physical size of one world unit of the registration.
    levels : tuple of Level
        Level 0 is the fused grid; each further level halves it along the
        axes :func:`level_factor` picks.
    tiles : tuple of PlannedTile
    settings : dict
        The fusion and output settings the plan was made for (its identity).
    """

    dataset: str
    unit: str
    world_unit_zyx: Float3
    levels: tuple[Level, ...]
    tiles: tuple[PlannedTile, ...]
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def grid(self) -> Level:
        return self.levels[0]

    @property
    def resolution_zyx(self) -> Float3:
        return self.grid.scale_zyx

    @property
    def origin_zyx(self) -> Float3:
        return self.grid.translation_zyx

    @property
    def shape_zyx(self) -> Shape3:
        return self.grid.shape_zyx

    def to_json(self) -> dict[str, Any]:
        grid = self.grid
        return {
            "tilefusion_plan": PLAN_VERSION,
            "dataset": self.dataset,
            "unit": self.unit,
            "world_unit_zyx": list(self.world_unit_zyx),
            "resolution_zyx": list(grid.scale_zyx),
            "origin_zyx": list(grid.translation_zyx),
            "shape_zyx": list(grid.shape_zyx),
            "chunks_zyx": list(grid.chunks_zyx),
            "shards_zyx": list(grid.shards_zyx),
            "ranges": grid.n_ranges,
            "tiles_count": len(self.tiles),
            "levels": [level.to_json() for level in self.levels],
            "settings": self.settings,
            "tiles": [t.to_json() for t in self.tiles],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Plan:
        return cls(
            dataset=data["dataset"],
            unit=data["unit"],
            world_unit_zyx=_float3(data["world_unit_zyx"]),
            levels=tuple(Level.from_json(lv) for lv in data["levels"]),
            tiles=tuple(PlannedTile.from_json(t) for t in data["tiles"]),
            settings=data.get("settings", {}),
        )

    def write(self, path: str | Path) -> None:
        """Write the plan as JSON (atomically), then its grid (see :func:`read_plan_grid`)."""
        data = self.to_json()
        write_text_atomic(path, json.dumps(data, indent=1))
        grid = {key: value for key, value in data.items() if key != "tiles"}
        write_text_atomic(grid_path(path), json.dumps(grid, indent=1))


def grid_path(plan_path: str | Path) -> Path:
    """The plan's grid file: the plan less its tiles, beside it."""
    return Path(plan_path).with_name("grid.json")


def read_plan_grid(plan_path: str | Path) -> Plan | None:
    """The plan at ``plan_path`` without its tiles, from its grid file; None if out of date.

    What a workflow job needs when Snakemake parses the workflow inside it
    (levels and ranges), read in milliseconds where the whole plan of 10,000
    tiles takes a second. The grid file is written after the plan, so one
    older than the plan (or missing) is not used.
    """
    grid = grid_path(plan_path)
    try:
        if grid.stat().st_mtime_ns < Path(plan_path).stat().st_mtime_ns:
            return None
        data = json.loads(grid.read_text())
    except (OSError, ValueError):
        return None
    if data.get("tilefusion_plan") != PLAN_VERSION:
        return None
    return Plan.from_json({**data, "tiles": []})


def read_plan(path: str | Path) -> Plan:
    """Read a plan written by :meth:`Plan.write`."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise InputError(str(path), "", "plan not found; run the plan step first") from None
    except json.JSONDecodeError as exc:
        raise InputError(str(path), "", f"not a plan (invalid JSON: {exc.msg})") from None
    if data.get("tilefusion_plan") != PLAN_VERSION:
        raise InputError(str(path), "tilefusion_plan", "not a tilefusion plan of this version")
    return Plan.from_json(data)


def post_transform_affine(steps: Sequence[dict[str, Any]], *, source: str) -> geometry.Affine:
    """Compose the config's ``fusion.post_transforms`` (applied in listed order).

    Each step is a transform item of :mod:`tilefusion.transforms` that is
    affine: ``affine_zyx``, ``scale``, ``translation``, ``deskew``,
    ``anisotropy`` (or a plugin kind that is affine).
    """
    total = geometry.identity()
    for index, step in enumerate(steps):
        field_name = f"fusion.post_transforms[{index}]"
        item = parse_transform(step, ParseContext(source, field_name))
        matrix = item.as_affine()
        if matrix is None:
            raise InputError(source, field_name, "a post-registration transform must be affine")
        step_affine = geometry.check_affine(matrix, source=source, field=field_name)
        total = step_affine @ total
    return total


def level_factor(shape: Shape3, scale: Float3) -> Shape3:
    """Per-axis factors of the level after one of this shape and voxel size.

    An axis longer than one voxel is halved (``2``) when its voxel is at most
    ``sqrt(2)`` times the finest voxel among such axes, else kept (``1``).
    The finest axis is always halved, so the finest voxel doubles at every
    level, and each other axis takes whichever of halving or keeping leaves
    its voxel nearer (by ratio) to the finest axis's new one: the voxels
    become as near isotropic as whole halvings allow, and stay within
    ``sqrt(2)`` of each other once they are. 2 x 0.5 x 0.5 um voxels (z, y, x) give factors
    (1, 2, 2), (1, 2, 2), then (2, 2, 2) from 2 x 2 x 2 um; 1 x 0.256 x 0.256
    um give (1, 2, 2), (1, 2, 2), then (2, 2, 2) from 1 x 1.024 x 1.024 um.
    ``(1, 1, 1)`` when every axis is one voxel long.
    """
    open_axes = [s for n, s in zip(shape, scale) if n > 1]
    if not open_axes:
        return (1, 1, 1)
    limit = math.sqrt(2) * min(open_axes)
    return _shape3([2 if n > 1 and s <= limit else 1 for n, s in zip(shape, scale)])


def _levels(
    shape: Shape3,
    resolution: Float3,
    origin: Float3,
    *,
    chunks: Shape3,
    shards: Shape3,
    chunks_per_range: int,
    n_levels: int | None,
) -> tuple[Level, ...]:
    range_voxels = chunks_per_range * math.prod(chunks)
    levels = [Level(shape, chunks, shards, (1, 1, 1), resolution, origin, range_voxels)]
    limit = n_levels if n_levels is not None else 16
    while len(levels) < limit:
        prev = levels[-1]
        if n_levels is None and all(s <= c for s, c in zip(prev.shape_zyx, chunks)):
            break
        factor = level_factor(prev.shape_zyx, prev.scale_zyx)
        if factor == (1, 1, 1):
            break
        new_shape = _shape3([-(-s // f) for s, f in zip(prev.shape_zyx, factor)])
        # A level-k voxel averages f voxels of level k-1 along each axis, so its
        # centre sits (f - 1) / 2 voxels of level k-1 past theirs (0 where f = 1).
        translation = _float3(
            [t + (f - 1) / 2 * r for t, f, r in zip(prev.translation_zyx, factor, prev.scale_zyx)]
        )
        new_scale = _float3([r * f for r, f in zip(prev.scale_zyx, factor)])
        levels.append(
            Level(new_shape, chunks, shards, factor, new_scale, translation, range_voxels)
        )
    return tuple(levels)


# Grids of more shard rows than this in RangeCuts' third case use its fallback.
_EXACT_ROWS = 1 << 20
# Ranges listed to find the largest one exactly.
_LISTED_RANGES = 1 << 16


class RangeCuts:
    """The cut of a level's C-ordered shards into ranges of about equal voxels.

    With ``T`` the level's voxels, ``c = ceil(T / range_voxels)`` and ``B_i``
    the voxels of the shards before flat shard ``i``: cut ``k`` (``k = 0 ..
    c - 1``) is at the first shard ``i`` with ``B_i >= k * T / c``, and cuts
    at the same shard make one range. So a range is at least one shard, and
    holds less than ``T / c`` voxels plus one shard. The targets ``k * T / c``
    are rounded as ``float64(k) * (T / c)`` while ``T < 2**53``, as planning
    always computed them, so the ranges are those of earlier plans; beyond,
    they are exact.

    Nothing here lists shards or ranges: all follows from the per-axis shard
    counts (a shard's size is the shard shape, clipped on the last shard of
    an axis). Which shards start a range is counted in one of three ways:

    - ``"cuts"``, when no shard holds more than ``T / c`` voxels: each cut is
      a range of its own, ``c`` ranges; a shard's range is the number of
      targets in ``1 .. c - 1`` at most ``B_i``; cut ``k``'s shard is found by
      dividing ``k * T / c`` down the slab, row and shard sizes.
    - ``"shards"``, when every shard holds more: each shard is a range.
    - ``"rows"`` otherwise (ranges of about one shard, and thinner clipped
      shards at the faces): a shard starts a range when the shard before it
      holds a target; that is counted per row of shards along x (a run of
      equal shards, then the clipped one), with one prefix sum per row. For
      a grid of more than 2**20 rows of that kind, ``c`` becomes
      ``floor(T / largest shard)``, which makes it a ``"cuts"`` grid.
    """

    def __init__(
        self,
        shape: Shape3,
        shards: Shape3,
        range_voxels: int,
        *,
        mode: str | None = None,
        max_rows: int = _EXACT_ROWS,
    ) -> None:
        self.shape = shape
        self.full = shards
        self.grid = _shape3([-(-n // s) for n, s in zip(shape, shards)])
        self.last = _shape3([n - (g - 1) * s for n, s, g in zip(shape, shards, self.grid)])
        self.total = math.prod(shape)
        self.n_shards = math.prod(self.grid)
        count = max(1, -(-self.total // max(range_voxels, 1)))
        self.largest = math.prod(min(s, n) for s, n in zip(shards, shape))
        smallest = math.prod(self.last)
        if mode is None:
            if self.largest * count <= self.total:
                mode = "cuts"
            elif smallest * count > self.total:
                mode = "shards"
            elif self.grid[0] * self.grid[1] <= max_rows:
                mode = "rows"
            else:
                mode, count = "cuts", max(1, self.total // self.largest)
        self.mode = mode
        self.count = count
        # A shard holds more than T / c voxels exactly when it holds more than this.
        self._spacing = self.total // count
        self._step = self.total / count
        self._wide = self.total >= 2**53
        self._dtype: Any = object if self._wide else np.int64
        self._row_prefix = self._rows_prefix() if mode == "rows" else None
        last = self._range_of(self._array([self.n_shards - 1]))
        self.n_ranges = 1 + int(last[0])

    def _array(self, values: Any) -> NDArray[Any]:
        return np.asarray(values).astype(self._dtype)

    def _threshold(self, k: NDArray[Any]) -> NDArray[Any]:
        """The fewest voxels before a shard at or past target ``k``."""
        if self._wide:
            return -((-k * self.total) // self.count)
        return np.ceil(k.astype(np.float64) * self._step).astype(np.int64)

    def _targets_upto(self, voxels: NDArray[Any]) -> NDArray[Any]:
        """How many targets ``1 .. c - 1`` are at most ``voxels``."""
        top = self.count - 1
        if self._wide:
            exact = voxels * self.count // self.total
            return np.where(exact > top, top, exact)
        # float estimate, then exact against the rounded targets
        m = np.clip(np.floor(voxels.astype(np.float64) / self._step).astype(np.int64), 0, top)
        while (up := (m < top) & (self._threshold(m + 1) <= voxels)).any():
            m = m + up
        while (down := (m > 0) & (self._threshold(m) > voxels)).any():
            m = m - down
        return m

    def _size(self, index: NDArray[Any], axis: int) -> NDArray[Any]:
        full, last, count = self.full[axis], self.last[axis], self.grid[axis]
        return self._array(last + (full - last) * (index < count - 1))

    def _split(self, flat: NDArray[Any]) -> tuple[NDArray[Any], NDArray[Any], NDArray[Any]]:
        _, ny, nx = self.grid
        z = flat // (ny * nx)
        rest = flat - z * (ny * nx)
        y = rest // nx
        return z, y, rest - y * nx

    def _before(self, z: NDArray[Any], y: NDArray[Any], x: NDArray[Any]) -> NDArray[Any]:
        """Voxels of the shards before shard ``(z, y, x)`` in C order."""
        fz, fy, fx = self.full
        _, ty, tx = self.shape
        return z * (fz * ty * tx) + self._size(z, 0) * (y * (fy * tx) + self._size(y, 1) * (x * fx))

    def _run_hits(self, start: NDArray[Any], length: Any, volume: NDArray[Any]) -> NDArray[Any]:
        """Shards, of ``length`` shards of ``volume`` voxels from ``start``, holding a target.

        A shard of more than ``T / c`` voxels holds one at least; of fewer, one
        at most, so the count over the run is the count of targets in it.
        """
        inside = self._targets_upto(start + length * volume) - self._targets_upto(start)
        return np.where(volume > self._spacing, length, inside)

    def _rows_prefix(self) -> NDArray[np.int64]:
        """Range starts before each row's first shard (and after the last row)."""
        _, ny, nx = self.grid
        rows = self.grid[0] * ny
        hits = np.zeros(rows + 1, dtype=np.int64)
        block = 1 << 16
        for lo in range(0, rows, block):
            r = self._array(np.arange(lo, min(lo + block, rows)))
            z = r // ny
            y = r - z * ny
            start = self._before(z, y, r * 0)
            area = self._size(z, 0) * self._size(y, 1)
            run = area * self.full[2]
            row_hits = self._run_hits(start, nx - 1, run) + self._run_hits(
                start + (nx - 1) * run, 1, area * self.last[2]
            )
            hits[lo + 1 : lo + 1 + len(r)] = row_hits.astype(np.int64)
        return np.cumsum(hits)

    def _range_of(self, flat: NDArray[Any]) -> NDArray[Any]:
        if self.mode == "shards":
            return flat
        z, y, x = self._split(flat)
        if self.mode == "cuts":
            return self._targets_upto(self._before(z, y, x))
        assert self._row_prefix is not None
        row = (z * self.grid[1] + y).astype(np.int64)
        run = self._size(z, 0) * self._size(y, 1) * self.full[2]
        return self._row_prefix[row] + self._run_hits(self._before(z, y, x * 0), x, run)

    def range_of(self, flat_shards: NDArray[np.int64]) -> NDArray[np.int64]:
        """The range of each flat shard index."""
        return np.asarray(self._range_of(self._array(flat_shards))).astype(np.int64)

    def starts(self, ranges: Any) -> NDArray[Any]:
        """The first flat shard of each range (``ranges`` in ``0 .. n_ranges - 1``)."""
        k = self._array(ranges)
        if self.mode == "shards":
            return k
        nz, ny, nx = self.grid
        fz, fy, fx = self.full
        _, ty, tx = self.shape
        if self.mode == "cuts":
            # the shard holding the last voxel before the target, then the next
            rest = self._threshold(k) - 1
            z = np.minimum(rest // (fz * ty * tx), nz - 1)
            rest = rest - z * (fz * ty * tx)
            row = self._size(z, 0) * (fy * tx)
            y = np.minimum(rest // row, ny - 1)
            rest = rest - y * row
            x = np.minimum(rest // (self._size(z, 0) * self._size(y, 1) * fx), nx - 1)
            return np.where(k == 0, 0, (z * ny + y) * nx + x + 1)
        assert self._row_prefix is not None
        prefix = self._row_prefix[: nz * ny]
        first = np.searchsorted(prefix, k.astype(np.int64), side="left")  # row starting at k
        row = self._array(np.maximum(first - 1, 0))  # or k starts inside the row before
        z = row // ny
        y = row - z * ny
        start = self._before(z, y, row * 0)
        run = self._size(z, 0) * self._size(y, 1) * fx
        need = k - self._array(prefix[row.astype(np.int64)])
        target = np.minimum(self._targets_upto(start) + need, self.count - 1)
        past = self._threshold(target) - start
        x = np.where(run > self._spacing, need, -(-past // run))
        inside = (self._array(first) > 0) & (need >= 1) & (x <= nx - 1)
        return np.where(inside, row * nx + x, self._array(first) * nx)

    def bounds(self, range_index: int) -> tuple[int, int]:
        """Flat shard indices ``[start, stop)`` of one range."""
        if range_index + 1 < self.n_ranges:
            start, stop = (int(v) for v in self.starts([range_index, range_index + 1]))
            return start, stop
        return int(self.starts([range_index])[0]), self.n_shards

    @functools.cached_property
    def max_range_voxels(self) -> int:
        if self.mode == "shards":
            return self.largest
        if self.n_ranges > _LISTED_RANGES:
            return -(-self.total // self.count) + self.largest
        first = self.starts(np.arange(self.n_ranges))
        edges = np.append(self._before(*self._split(first)), self._array([self.total]))
        return int(np.max(np.diff(edges)))


log = logging.getLogger("tilefusion")

# Resolutions this close (relative) to the world unit are taken as equal to it.
_SAME_UNIT_RTOL = 1e-5

# Relative slack when comparing a level's factor with the one allowed.
_FACTOR_SLACK = 1e-6


def level_allowance(tile_to_output: NDArray[np.float64]) -> NDArray[np.float64]:
    """Per tile axis (zyx), the largest factor a stored level may have there.

    A level of factor ``f`` along tile axis ``a`` has voxels ``f`` tile voxels
    long; mapped to the output they are ``f * |column a|`` output voxels long
    (the column of the tile-to-output map's linear part, its Euclidean length).
    The level is not coarser than the output where that is at most 1, i.e.
    ``f <= 1 / |column a|``. Without rotation this is output voxel size over
    tile voxel size on each axis, as BigStitcher measures a model's scaling
    per axis to pick the level it fuses from.
    """
    linear = np.asarray(tile_to_output, dtype=np.float64)[:3, :3]
    return np.asarray(1.0 / np.linalg.norm(linear, axis=0), dtype=np.float64)


def _level_fits(level: StoredLevel, allowed: NDArray[np.float64]) -> bool:
    return bool(np.all(np.asarray(level.factors_zyx) <= allowed * (1.0 + _FACTOR_SLACK)))


def _tile_level(view: View, tile_to_output: NDArray[np.float64]) -> tuple[StoredLevel, Shape3]:
    """The stored level a view is read from, and its shape.

    The coarsest level (most level-0 voxels per level voxel) whose voxel is not
    larger than the output voxel on any tile axis (:func:`level_allowance`);
    level 0 when the output voxel is no larger than the tile's, or no further
    level fits or opens. A level is opened (metadata only) to learn its
    shape; one that does not open, or whose shape or type does not match
    the factors and the view, is passed over with a warning.
    """
    level0 = (StoredLevel(0, view.source, (1.0, 1.0, 1.0), np.eye(4)), _shape3(view.shape_zyx))
    allowed = level_allowance(tile_to_output)
    if not np.any(allowed > 1.0 + _FACTOR_SLACK):
        return level0
    fitting = [lv for lv in stored_levels(view.source)[1:] if _level_fits(lv, allowed)]
    fitting.sort(key=lambda lv: (-math.prod(lv.factors_zyx), lv.index))
    for level in fitting:
        try:
            array = open_array(level.source)
        except InputError as error:
            log.warning("tile %s: stored level %d not used: %s", view.name, level.index, error)
            continue
        shape = _shape3(array.shape)
        expected = np.asarray(view.shape_zyx) / np.asarray(level.factors_zyx)
        if np.any(np.abs(np.asarray(shape) - expected) > 1.0 + _FACTOR_SLACK):
            log.warning(
                "tile %s: stored level %d not used: shape %s does not match factors %s of %s",
                view.name,
                level.index,
                list(shape),
                list(level.factors_zyx),
                list(view.shape_zyx),
            )
            continue
        if view.dtype is not None and array.dtype.name != view.dtype:
            log.warning(
                "tile %s: stored level %d not used: type %s, not %s",
                view.name,
                level.index,
                array.dtype.name,
                view.dtype,
            )
            continue
        return level, shape
    return level0


def make_plan(
    dataset: Dataset,
    *,
    resolution_zyx: Sequence[float] | None = None,
    world_unit_zyx: Sequence[float] | None = None,
    post_transform: geometry.Affine | None = None,
    chunks_zyx: Sequence[int] = (64, 128, 128),
    shards_zyx: Sequence[int] | None = None,
    chunks_per_range: int = 1024,
    pyramid_levels: int | None = None,
    settings: dict[str, Any] | None = None,
    use_stored_levels: bool = True,
) -> Plan:
    """Plan the fusion of a dataset's views.

    The output grid follows from the views' full-resolution (level-0) voxels.
    Each tile is read from the coarsest resolution level stored with it
    (:func:`~tilefusion.readers.arrays.stored_levels`) whose voxel is not
    larger than the output voxel on any axis (:func:`level_allowance`), so an
    output much coarser than the tiles is fused from their stored averages
    instead of point samples of full resolution. The tile's map is then the
    level's voxel-to-level-0 map (BigDataViewer's ``x0 = f*x + (f - 1)/2``
    for HDF5 and N5) composed with the view's; its box and shape are the
    level's, whose voxel centres may stop up to about one output voxel short
    of level 0's at each face. Where no stored level fits (or at the tiles'
    own resolution), level 0 is read and each output voxel samples it at one
    point (linear interpolation), with no anti-aliasing: box averaging is
    not done here.

    Parameters
    ----------
    dataset : Dataset
        The views to fuse (one selection).
    resolution_zyx : sequence of 3 floats, optional
        Output voxel size in the dataset's unit; default: the world unit. An axis
        within 1e-5 (relative) of the world unit is fused at exactly the world
        unit's grid (BigStitcher's box, in world coordinates).
    world_unit_zyx : sequence of 3 floats, optional
        Override of the world unit derived from the views.
    post_transform : ndarray of shape (4, 4), optional
        Physical-to-physical affine applied after registration.
    chunks_zyx, shards_zyx : sequence of 3 ints
        Chunk and shard shapes; ``shards_zyx`` defaults to the chunks.
    chunks_per_range : int
        Chunks per fuse job, rounded up to whole shards.
    pyramid_levels : int, optional
        Number of levels; default until a level fits in one chunk. Each
        level halves the axes :func:`level_factor` picks.
    settings : dict, optional
        Settings recorded in the plan (they make its identity).
    use_stored_levels : bool
        Read stored levels where they fit (opens containers' metadata when the
        output voxel is larger than a tile's); ``False`` reads level 0 only.

    Returns
    -------
    Plan

    Raises
    ------
    InputError
        No views, a non-positive resolution, inconsistent world units.
    """
    source = dataset.path
    if not dataset.views:
        raise InputError(source, "views", "no view matches the selection")
    chunks = _shape3(chunks_zyx)
    shards = _shape3(shards_zyx) if shards_zyx is not None else chunks
    if any(s % c for s, c in zip(shards, chunks)):
        raise InputError(
            source, "output.shards", f"{list(shards)} not a multiple of {list(chunks)}"
        )

    if world_unit_zyx is None:
        per_view = [
            geometry.world_unit_of_view(
                v.model,
                v.voxel_size_zyx,
                calibration_zyx=v.calibration_zyx,
                unit_affine=unit_affine(v.transform) if isinstance(v.transform, Chain) else None,
            )
            for v in dataset.views
        ]
        world = geometry.consensus_world_unit(per_view, source=source)
    else:
        world = np.asarray(world_unit_zyx, dtype=np.float64)
    resolution = world.copy() if resolution_zyx is None else np.asarray(resolution_zyx, float)
    if (
        resolution.shape != (3,)
        or not np.all(resolution > 0)
        or not np.all(np.isfinite(resolution))
    ):
        raise InputError(source, "output.resolution", f"must be 3 positive numbers: {resolution}")

    grid_factor = world / resolution
    # A resolution equal to the world unit up to its rounding (6 significant
    # digits) is the world unit: 65.6039 for 65.603883749918 must not add a
    # voxel to a 172-voxel axis.
    grid_factor[np.abs(grid_factor - 1.0) <= _SAME_UNIT_RTOL] = 1.0
    post = geometry.identity() if post_transform is None else np.asarray(post_transform, float)
    post_is_identity = bool(np.array_equal(post, geometry.identity()))

    to_grid_units = []
    corners = []
    warps: list[Chain | None] = []
    for view in dataset.views:
        model = geometry.check_affine(
            view.model, source=source, field=f"ViewRegistration of {view.name}"
        )
        if post_is_identity:
            # World -> grid units in one factor; at a resolution equal to the
            # world unit the factor is exactly 1 and the box is BigStitcher's,
            # computed in world coordinates.
            to_grid = geometry.scale(grid_factor)
        else:
            to_grid = geometry.scale(1.0 / resolution) @ post @ geometry.scale(world)
        affine = to_grid @ model
        to_grid_units.append(affine)
        chain = view.transform
        if isinstance(chain, Chain) and chain.as_affine() is None:
            # Not affine: the box bounds the chain itself (displacements included).
            view_warp = Chain([Affine(to_grid), chain])
            warps.append(view_warp)
            lo, hi = view_warp.bounds(np.zeros(3), np.asarray(view.shape_zyx, dtype=float) - 1.0)
            corners.append(np.stack([lo, hi]))
        else:
            warps.append(None)
            corners.append(geometry.transform_points(affine, geometry.box_corners(view.shape_zyx)))
    all_corners = np.concatenate(corners)
    index_lo = np.floor(all_corners.min(axis=0))
    index_hi = np.ceil(all_corners.max(axis=0))
    shape = _shape3(index_hi - index_lo + 1)
    origin = _float3(index_lo * resolution)

    shift = geometry.translation(-index_lo)
    tiles = []
    for view, affine, pts, warp in zip(dataset.views, to_grid_units, corners, warps):
        tile_shape = _shape3(view.shape_zyx)
        level = 0
        tile_source = view.source
        if use_stored_levels:
            stored, tile_shape = _tile_level(view, affine)
            if stored.index:
                level, tile_source = stored.index, stored.source
                affine = affine @ stored.to_level0
                if warp is None:
                    pts = geometry.transform_points(affine, geometry.box_corners(tile_shape))
                else:
                    warp = Chain([*warp.items, Affine(stored.to_level0)])
                    pts = np.stack(warp.bounds(np.zeros(3), np.asarray(tile_shape, float) - 1.0))
        warp_spec = None
        if warp is not None:
            warp_spec = Chain([Affine(shift), *warp.items]).to_spec()
        lo = pts.min(axis=0) - index_lo
        hi = pts.max(axis=0) - index_lo
        tiles.append(
            PlannedTile(
                name=view.name,
                setup=view.setup,
                timepoint=view.timepoint,
                source=tile_source,
                shape_zyx=tile_shape,
                dtype=view.dtype,
                tile_to_output=shift @ affine,
                box_lo=_float3(lo),
                box_hi=_float3(hi),
                level=level,
                warp=warp_spec,
            )
        )
    coarse = [t for t in tiles if t.level]
    if coarse:
        log.info(
            "%d of %d tiles are read from stored levels (%s)",
            len(coarse),
            len(tiles),
            ", ".join(
                f"level {k}: {n}" for k, n in sorted(Counter(t.level for t in coarse).items())
            ),
        )
    if use_stored_levels:
        # Output voxels at least twice the voxels read: point samples skip data.
        skipped = [float(np.max(level_allowance(t.tile_to_output))) for t in tiles]
        sparse = [v for v in skipped if v >= 2.0 * (1.0 - _FACTOR_SLACK)]
        if sparse:
            log.info(
                "%d of %d tiles have no stored level as coarse as the output (up to %.3gx "
                "their voxel on an axis): sampled by linear interpolation, no anti-aliasing",
                len(sparse),
                len(tiles),
                max(sparse),
            )
    levels = _levels(
        shape,
        _float3(resolution),
        origin,
        chunks=chunks,
        shards=shards,
        chunks_per_range=chunks_per_range,
        n_levels=pyramid_levels,
    )
    return Plan(
        dataset=source,
        unit=dataset.unit,
        world_unit_zyx=_float3(world),
        levels=levels,
        tiles=tuple(tiles),
        settings=dict(settings or {}),
    )


def range_shards(level: Level, range_index: int) -> list[Shape3]:
    """Shard grid indices written by one range, in C order."""
    start, stop = level.range_bounds(range_index)
    _, ny, nx = level.shard_grid
    # Python integers: a flat index of a huge grid need not fit in int64
    return [(f // (ny * nx), f // nx % ny, f % nx) for f in range(start, stop)]


def source_ranges(plan: Plan, level_index: int, range_index: int) -> list[int]:
    """The ranges of level ``level_index - 1`` that one range of a pyramid level reads.

    A downsample job waits for these jobs only, so the workflow's graph grows
    with the number of jobs, not with its square.
    """
    if not 1 <= level_index < len(plan.levels):
        raise IndexError(f"level {level_index} not in 1..{len(plan.levels) - 1}")
    level, below = plan.levels[level_index], plan.levels[level_index - 1]
    start, stop = level.range_bounds(range_index)
    _, ny, nx = level.shard_grid
    flat = np.arange(start, stop, dtype=np.int64)
    shards = np.stack([flat // (ny * nx), flat // nx % ny, flat % nx], axis=1)
    size = np.asarray(level.shards_zyx, dtype=np.int64)
    factor = np.asarray(level.factor_zyx, dtype=np.int64)
    shape_below = np.asarray(below.shape_zyx, dtype=np.int64)
    step_below = np.asarray(below.shards_zyx, dtype=np.int64)
    lo = shards * size * factor
    hi = np.minimum((shards + 1) * size * factor, shape_below)
    first, last = lo // step_below, (hi - 1) // step_below
    _, by, bx = below.shard_grid
    found: set[int] = set()
    # Consecutive shards of one row read overlapping boxes: one block per row of shards.
    for row_first, row_last in _row_spans(first, last):
        z, y, x = (np.arange(a, b + 1) for a, b in zip(row_first, row_last))
        grid = (z[:, None, None] * by + y[None, :, None]) * bx + x[None, None, :]
        found.update(np.unique(below.range_of_shards(grid.ravel())).tolist())
    return sorted(found)


def _row_spans(
    first: NDArray[np.int64], last: NDArray[np.int64]
) -> Iterator[tuple[NDArray[np.int64], NDArray[np.int64]]]:
    """Merge the per-shard source boxes of shards that share a z and y index."""
    keys = first[:, :2]
    breaks = np.flatnonzero(np.any(np.diff(keys, axis=0) != 0, axis=1)) + 1
    for block in np.split(np.arange(len(first)), breaks):
        yield first[block].min(axis=0), last[block].max(axis=0)


def shard_box(level: Level, shard: Shape3) -> tuple[Shape3, Shape3]:
    """Voxel bounds ``[lo, hi)`` of a shard, clipped to the array."""
    lo = _shape3([i * s for i, s in zip(shard, level.shards_zyx)])
    hi = _shape3([min(a + s, n) for a, s, n in zip(lo, level.shards_zyx, level.shape_zyx)])
    return lo, hi


def chunks_of_box(level: Level, lo: Shape3, hi: Shape3) -> Iterator[tuple[Shape3, Shape3]]:
    """Chunk-aligned sub-boxes ``[lo, hi)`` covering a box, in C order."""
    c = level.chunks_zyx
    for z in range(lo[0], hi[0], c[0]):
        for y in range(lo[1], hi[1], c[1]):
            for x in range(lo[2], hi[2], c[2]):
                yield (z, y, x), _shape3([min(a + s, b) for a, s, b in zip((z, y, x), c, hi)])


def range_chunks(level: Level, range_index: int) -> list[tuple[Shape3, Shape3]]:
    """Chunk boxes ``[lo, hi)`` of every chunk a range writes."""
    out: list[tuple[Shape3, Shape3]] = []
    for shard in range_shards(level, range_index):
        out.extend(chunks_of_box(level, *shard_box(level, shard)))
    return out


def tiles_for_chunks(
    plan: Plan,
    chunk_boxes: Sequence[tuple[Shape3, Shape3]],
    *,
    candidates: Sequence[int] | None = None,
) -> list[list[int]]:
    """Indices (into ``plan.tiles``) of the tiles whose box meets each chunk.

    ``candidates`` restricts the search to some tiles (those that meet a
    shard, say), so a job of a 10,000-tile plan does not test them all.
    """
    ids = np.arange(len(plan.tiles)) if candidates is None else np.asarray(candidates, dtype=int)
    if not chunk_boxes or not len(ids):
        return [[] for _ in chunk_boxes]
    tile_lo = np.array([plan.tiles[i].box_lo for i in ids])
    tile_hi = np.array([plan.tiles[i].box_hi for i in ids])
    chunk_lo = np.array([b[0] for b in chunk_boxes], dtype=np.float64)
    # voxel centres of a chunk run from lo to hi - 1
    chunk_hi = np.array([b[1] for b in chunk_boxes], dtype=np.float64) - 1.0
    hits = np.all(
        (tile_lo[None, :, :] <= chunk_hi[:, None, :]) & (chunk_lo[:, None, :] <= tile_hi[None]),
        axis=2,
    )
    return [ids[np.flatnonzero(row)].tolist() for row in hits]


def chunk_tile_pairs(plan: Plan) -> NDArray[np.int64]:
    """Every (range, chunk z, chunk y, chunk x, tile) of level 0 where a tile's box meets a chunk.

    The same test as :func:`tiles_for_chunks`, computed per tile so that
    planning costs grow with the pairs, not with chunks times tiles.
    Rows are sorted by range, chunk (C order) and tile.
    """
    level = plan.grid
    chunks = np.asarray(level.chunks_zyx)
    grid = np.asarray([math.ceil(s / c) for s, c in zip(level.shape_zyx, level.chunks_zyx)])
    parts = []
    for index, tile in enumerate(plan.tiles):
        # chunk c holds voxel centres c*C .. c*C + C - 1
        first = np.maximum(np.ceil((np.asarray(tile.box_lo) - chunks + 1) / chunks), 0)
        last = np.minimum(np.floor(np.asarray(tile.box_hi) / chunks), grid - 1)
        if np.any(last < first):
            continue
        axes = [np.arange(a, b + 1, dtype=np.int64) for a, b in zip(first, last)]
        zz, yy, xx = np.meshgrid(*axes, indexing="ij")
        block = np.empty((zz.size, 4), dtype=np.int64)
        block[:, 0], block[:, 1], block[:, 2] = zz.ravel(), yy.ravel(), xx.ravel()
        block[:, 3] = index
        parts.append(block)
    if not parts:
        return np.empty((0, 5), dtype=np.int64)
    pairs = np.concatenate(parts)
    per_shard = np.asarray(level.shards_zyx) // chunks
    shard = pairs[:, :3] // per_shard
    flat_shard = np.ravel_multi_index(tuple(shard.T), level.shard_grid)
    ranges = level.range_of_shards(flat_shard)
    flat_chunk = np.ravel_multi_index(tuple(pairs[:, :3].T), tuple(grid))
    order = np.lexsort((pairs[:, 3], flat_chunk, ranges))
    return np.column_stack([ranges, pairs[:, :3], pairs[:, 3]])[order]


def write_manifest(plan: Plan, path: str | Path) -> None:
    """Write the range → chunk → tiles table (TSV, one row per chunk with tiles).

    Columns: ``range``, ``chunk_z``, ``chunk_y``, ``chunk_x`` (chunk grid
    indices) and ``tiles`` (comma-separated view names); ``pandas.read_csv(path,
    sep="\\t")`` reads it.
    """
    rows = chunk_tile_pairs(plan)
    names = np.array([t.name for t in plan.tiles], dtype=object)
    lines = ["range\tchunk_z\tchunk_y\tchunk_x\ttiles\n"]
    if len(rows):
        keys = rows[:, :4]
        starts = np.flatnonzero(np.any(np.diff(keys, axis=0) != 0, axis=1)) + 1
        bounds = np.concatenate([[0], starts, [len(rows)]])
        for a, b in itertools.pairwise(bounds):
            r, z, y, x = keys[a]
            lines.append(f"{r}\t{z}\t{y}\t{x}\t{','.join(names[rows[a:b, 4]])}\n")
    write_text_atomic(path, "".join(lines))
