"""One fuse job: fuse the chunks of one range and write its stored objects.

The unit of computation is always one output chunk (split further only when
its tile crops would exceed the read block), never the range, so every chunk's
values are the same whatever the number of ranges. A range's completion
record (its *marker*) is written last, after the objects are synced to disk.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from tilefusion import geometry
from tilefusion.kernel import TileCrop, fuse_block
from tilefusion.plan import (
    Plan,
    PlannedTile,
    Shape3,
    chunks_of_box,
    range_shards,
    shard_box,
    tiles_for_chunks,
)
from tilefusion.readers import open_array
from tilefusion.readers.arrays import TileArray
from tilefusion.store import NgffFormat, cast_to_dtype, open_level, record_objects, write_block
from tilefusion.validate import block_stats, merge_stats

__all__ = ["FusionOptions", "fuse_range", "tile_crop_bounds"]

log = logging.getLogger(__name__)


class FusionOptions:
    """Kernel settings of a fuse job (from the config's ``fusion`` section)."""

    def __init__(
        self,
        *,
        interpolation: str = "linear",
        blending: str = "cosine",
        blend_range_zyx: Sequence[float] = (40.0, 40.0, 40.0),
        blend_border_zyx: Sequence[float] = (0.0, 0.0, 0.0),
        read_block_zyx: Sequence[int] = (64, 256, 256),
        device: str | None = None,
        threads: int | None = None,
    ) -> None:
        self.interpolation = interpolation
        self.blending = blending
        self.blend_range_zyx = tuple(float(v) for v in blend_range_zyx)
        self.blend_border_zyx = tuple(float(v) for v in blend_border_zyx)
        self.read_block_zyx = tuple(int(v) for v in read_block_zyx)
        self.device = device
        self.threads = threads


def tile_crop_bounds(
    tile: PlannedTile, lo: Shape3, hi: Shape3
) -> tuple[NDArray[np.float64], Shape3, Shape3] | None:
    """The tile voxels an output box ``[lo, hi)`` needs.

    Returns
    -------
    (out_to_tile, crop_lo, crop_hi) or None
        ``out_to_tile`` maps box-local output indices to tile voxel indices;
        the crop ``[crop_lo, crop_hi)`` holds every voxel linear interpolation
        touches. None when the box misses the tile.
    """
    out_to_tile = geometry.invert(tile.tile_to_output) @ geometry.translation(lo)
    extent = np.asarray(hi, dtype=np.float64) - np.asarray(lo) - 1.0
    corners = geometry.box_corners(extent + 1.0)
    pts = geometry.transform_points(out_to_tile, corners)
    size = np.asarray(tile.shape_zyx)
    crop_lo = np.maximum(np.floor(pts.min(axis=0)), 0).astype(int)
    crop_hi = np.minimum(np.floor(pts.max(axis=0)) + 2, size).astype(int)
    if (
        np.any(crop_hi <= crop_lo)
        or np.any(pts.max(axis=0) < 0)
        or np.any(pts.min(axis=0) > size - 1)
    ):
        return None
    return out_to_tile, tuple(crop_lo.tolist()), tuple(crop_hi.tolist())


class _TileCache:
    """Open each tile's array once per job."""

    def __init__(self) -> None:
        self._arrays: dict[str, TileArray] = {}

    def get(self, tile: PlannedTile) -> TileArray:
        if tile.name not in self._arrays:
            self._arrays[tile.name] = open_array(tile.source)
        return self._arrays[tile.name]


def _split(lo: Shape3, hi: Shape3) -> list[tuple[Shape3, Shape3]]:
    axis = int(np.argmax(np.subtract(hi, lo)))
    mid = (lo[axis] + hi[axis]) // 2
    first_hi = list(hi)
    first_hi[axis] = mid
    second_lo = list(lo)
    second_lo[axis] = mid
    return [(lo, tuple(first_hi)), (tuple(second_lo), hi)]  # type: ignore[list-item]


def _fuse_box(
    plan: Plan,
    tile_ids: Sequence[int],
    lo: Shape3,
    hi: Shape3,
    options: FusionOptions,
    cache: _TileCache,
    used: set[str],
) -> NDArray[np.float32]:
    shape = tuple(b - a for a, b in zip(lo, hi))
    bounds = []
    for i in tile_ids:
        tile = plan.tiles[i]
        found = tile_crop_bounds(tile, lo, hi)
        if found is not None:
            bounds.append((tile, *found))
    too_big = any(
        np.any(np.subtract(c_hi, c_lo) > options.read_block_zyx) for _, _, c_lo, c_hi in bounds
    )
    if too_big and max(shape) > 1:
        out = np.zeros(shape, dtype=np.float32)
        for sub_lo, sub_hi in _split(lo, hi):
            part = _fuse_box(plan, tile_ids, sub_lo, sub_hi, options, cache, used)
            sl = tuple(slice(a - b, c - b) for a, b, c in zip(sub_lo, lo, sub_hi))
            out[sl] = part
        return out
    crops = []
    for tile, out_to_tile, c_lo, c_hi in bounds:
        data = cache.get(tile).read(c_lo, c_hi)
        used.add(tile.name)
        crops.append(
            TileCrop(
                data=data,
                out_to_tile=out_to_tile,
                crop_offset_zyx=c_lo,
                tile_shape_zyx=tile.shape_zyx,
            )
        )
    if not crops:
        return np.zeros(shape, dtype=np.float32)
    return fuse_block(
        crops,
        shape,  # type: ignore[arg-type]
        interpolation=options.interpolation,  # type: ignore[arg-type]
        blending=options.blending,  # type: ignore[arg-type]
        blend_range_zyx=options.blend_range_zyx,  # type: ignore[arg-type]
        blend_border_zyx=options.blend_border_zyx,  # type: ignore[arg-type]
        device=options.device,
        threads=options.threads,
    )


def fuse_range(
    plan: Plan,
    range_index: int,
    *,
    store_path: str,
    ngff: NgffFormat,
    options: FusionOptions,
) -> dict[str, Any]:
    """Fuse one range of level 0 and write its stored objects.

    Parameters
    ----------
    plan : Plan
    range_index : int
        Which range (0 .. ``plan.grid.n_ranges - 1``).
    store_path : str
        The output group, prepared by :func:`tilefusion.store.prepare_store`.
    ngff : NgffFormat
    options : FusionOptions

    Returns
    -------
    dict
        The range's marker: every stored object it owns with the SHA-256 of
        its bytes (None where the object is empty and so not stored), the
        tiles it read, and timings.
    """
    start = time.perf_counter()
    level = plan.grid
    array = open_level(store_path, 0)
    dtype = array.dtype
    cache = _TileCache()
    used: set[str] = set()
    objects: dict[str, str | None] = {}
    stats: list[dict[str, float | int]] = []
    for shard in range_shards(level, range_index):
        lo, hi = shard_box(level, shard)
        boxes = list(chunks_of_box(level, lo, hi))
        tiles_per_chunk = tiles_for_chunks(plan, boxes)
        if any(tiles_per_chunk):
            buffer = np.zeros(tuple(b - a for a, b in zip(lo, hi)), dtype=dtype)
            for (c_lo, c_hi), tile_ids in zip(boxes, tiles_per_chunk):
                if not tile_ids:
                    continue
                fused = _fuse_box(plan, tile_ids, c_lo, c_hi, options, cache, used)
                sl = tuple(slice(a - b, c - b) for a, b, c in zip(c_lo, lo, c_hi))
                buffer[sl] = cast_to_dtype(fused, dtype)
            write_block(array, lo, buffer)
            stats.append(block_stats(buffer))
        objects.update(record_objects(store_path, 0, level, shard, ngff))
    seconds = time.perf_counter() - start
    n_voxels = sum(
        math.prod(b - a for a, b in zip(*shard_box(level, s)))
        for s in range_shards(level, range_index)
    )
    return {
        "level": 0,
        "range": range_index,
        "objects": objects,
        "tiles": sorted(used),
        "stats": dict(merge_stats(stats), voxels=n_voxels),
        "seconds": round(seconds, 3),
    }
