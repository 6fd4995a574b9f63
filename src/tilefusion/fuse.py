"""One fuse job: fuse the chunks of one range and write its stored objects.

The unit of computation is always one output chunk (split further only when
its tile crops would exceed the read block), never the range, so every chunk's
values are the same whatever the number of ranges. A range's completion
record (its *marker*) is written last, after the objects are synced to disk.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from numpy.typing import NDArray

from tilefusion import geometry
from tilefusion.blend import tile_blend_params
from tilefusion.devices import usable_cpus
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
from tilefusion.readers.arrays import ChunkCache, TileArray
from tilefusion.stats import block_stats, merge_stats
from tilefusion.writer import LevelWriter, cast_into

__all__ = ["FusionOptions", "fuse_range", "tile_crop_bounds"]

log = logging.getLogger("tilefusion")


class FusionOptions:
    """Kernel settings of a fuse job (from the config's ``fusion`` section).

    ``blend_range_zyx`` and ``blend_border_zyx`` are in **output** voxels (as
    in BigStitcher); each tile's are converted to its own voxels with
    :func:`tilefusion.blend.tile_blend_params`.
    """

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
    if tile.warp is not None:
        # Not affine: the box bounds the block through the tile's inverse map
        # (displacements included); the kernel gets exact per-voxel coordinates.
        bound_lo, bound_hi = tile.output_to_tile().bounds(
            np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64) - 1.0
        )
        pts = np.stack([bound_lo, bound_hi])
    else:
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


JOB_CHUNK_CACHE_BYTES = 0
"""Bound of a fuse job's kept decoded tile chunks, all tiles together.

Measured on the benchmark (2 cores, local disk): keeping 64 or 256 MiB
halved the read time but slowed the kernel and the writes more (page faults
of the churned chunk buffers), 2-5 % slower overall; each shard's prefetch
already decodes a tile region once for all its chunks. Not measured on slow
network storage, where reading a tile chunk again may cost more than that.
"""


class _TileCache:
    """Open each tile's array once per job; serve crops from a shard's prefetch.

    :meth:`prefetch` reads, per tile, the one crop a whole shard needs; a
    chunk's crop inside it is then a slice of it (the same voxels a direct
    read returns), so each tile region is decoded once per shard, not once
    per chunk. Anything outside is read directly. Decoded chunks of all the
    job's tiles share one cache bounded by :data:`JOB_CHUNK_CACHE_BYTES`, so
    the job's memory does not grow with the number of tiles it opens.
    """

    def __init__(self) -> None:
        self._arrays: dict[str, TileArray] = {}
        self._tiles: dict[str, PlannedTile] = {}
        self._lock = threading.Lock()
        self._chunks = ChunkCache(JOB_CHUNK_CACHE_BYTES)

    def get(self, tile: PlannedTile) -> TileArray:
        with self._lock:
            if tile.name not in self._arrays:
                self._arrays[tile.name] = open_array(tile.source, chunk_cache=self._chunks)
                self._tiles[tile.name] = tile
            return self._arrays[tile.name]

    def absent_chunks(self) -> dict[str, tuple[int, PlannedTile]]:
        """Per tile read so far whose reads found chunks absent: how many, and the tile."""
        with self._lock:
            arrays = sorted(self._arrays.items())
        counts = ((name, len(array.absent_chunks)) for name, array in arrays)
        return {name: (n, self._tiles[name]) for name, n in counts if n}

    def prefetch(
        self, plan: Plan, tile_ids: Sequence[int], lo: Shape3, hi: Shape3, limit: int
    ) -> dict[str, tuple[Shape3, NDArray[Any]]]:
        """Crops of the tiles for the box ``[lo, hi)``, each at most ``limit`` voxels."""
        out: dict[str, tuple[Shape3, NDArray[Any]]] = {}
        for i in tile_ids:
            tile = plan.tiles[i]
            found = tile_crop_bounds(tile, lo, hi)
            if found is None:
                continue
            _, c_lo, c_hi = found
            if math.prod(b - a for a, b in zip(c_lo, c_hi)) <= limit:
                out[tile.name] = (c_lo, self.get(tile).read(c_lo, c_hi))
        return out


def _read_crop(
    cache: _TileCache,
    prefetched: dict[str, tuple[Shape3, NDArray[Any]]],
    tile: PlannedTile,
    lo: Shape3,
    hi: Shape3,
) -> NDArray[Any]:
    held = prefetched.get(tile.name)
    if held is not None:
        origin, data = held
        end = [o + n for o, n in zip(origin, data.shape)]
        if all(o <= a and b <= e for o, a, b, e in zip(origin, lo, hi, end)):
            return data[tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, origin))]
    return cache.get(tile).read(lo, hi)


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
    prefetched: dict[str, tuple[Shape3, NDArray[Any]]],
) -> NDArray[np.float32]:
    shape = tuple(b - a for a, b in zip(lo, hi))
    bounds = []
    for i in tile_ids:
        tile = plan.tiles[i]
        found = tile_crop_bounds(tile, lo, hi)
        if found is not None:
            bounds.append((tile, *found))
    too_big = any(
        # The one voxel past the block that linear interpolation reads does not
        # count: a chunk fused at the tiles' own resolution is never split.
        np.any(np.subtract(c_hi, c_lo) > np.add(options.read_block_zyx, 1))
        for _, _, c_lo, c_hi in bounds
    )
    if too_big and max(shape) > 1:
        out = np.zeros(shape, dtype=np.float32)
        for sub_lo, sub_hi in _split(lo, hi):
            part = _fuse_box(plan, tile_ids, sub_lo, sub_hi, options, cache, used, prefetched)
            sl = tuple(slice(a - b, c - b) for a, b, c in zip(sub_lo, lo, sub_hi))
            out[sl] = part
        return out
    crops = []
    for tile, out_to_tile, c_lo, c_hi in bounds:
        data = _read_crop(cache, prefetched, tile, c_lo, c_hi)
        used.add(tile.name)
        # Output voxels (the config) to this tile's voxels, on each tile axis.
        blend_range, blend_border = tile_blend_params(
            tile.tile_to_output,
            blend_range_zyx=options.blend_range_zyx,
            blend_border_zyx=options.blend_border_zyx,
        )
        crops.append(
            TileCrop(
                data=data,
                out_to_tile=out_to_tile,
                crop_offset_zyx=c_lo,
                tile_shape_zyx=tile.shape_zyx,
                blend_range_zyx=blend_range,
                blend_border_zyx=blend_border,
            )
        )
    if not crops:
        return np.zeros(shape, dtype=np.float32)
    if any(tile.warp is not None for tile, *_ in bounds):
        return _fuse_warped(bounds, crops, lo, shape, options)  # type: ignore[arg-type]
    return fuse_block(
        crops,
        shape,  # type: ignore[arg-type]
        interpolation=options.interpolation,  # type: ignore[arg-type]
        blending=options.blending,  # type: ignore[arg-type]
        device=options.device,
        # One thread per call on the CPU: the job's threads work on different
        # shards. On a GPU the threads overlap tile reads and shard writes with
        # the kernel, and torch's CPU thread setting is left alone.
        threads=1 if _on_cpu(options.device) else None,
    )


def _fuse_warped(
    bounds: Sequence[tuple[PlannedTile, Any, Shape3, Shape3]],
    crops: Sequence[TileCrop],
    lo: Shape3,
    shape: Shape3,
    options: FusionOptions,
) -> NDArray[np.float32]:
    """The general path: tile coordinates computed per block (see kernel.mapped)."""
    from tilefusion.kernel import select_device
    from tilefusion.kernel.mapped import fuse_mapped
    from tilefusion.transforms import block_coordinates

    device = "cpu" if _on_cpu(options.device) else select_device(options.device)
    coordinates = [
        None
        if tile.warp is None
        else block_coordinates(tile.output_to_tile(), lo, shape, device=device)
        for tile, *_ in bounds
    ]
    return fuse_mapped(
        crops,
        coordinates,
        shape,
        interpolation=options.interpolation,
        blending=options.blending,
        backend="numba" if device == "cpu" else "torch",
        device=device,
    )


def _on_cpu(device: str | None) -> bool:
    return device is None or str(device).strip().lower() == "cpu"


def _workers(options: FusionOptions) -> int:
    """Shards fused at once: one per CPU this process may use (or ``threads``)."""
    if options.threads is not None:
        return max(1, int(options.threads))
    return usable_cpus()


def _fuse_shard(
    plan: Plan,
    shard: Shape3,
    writer: LevelWriter,
    options: FusionOptions,
    cache: _TileCache,
    candidates: Sequence[int],
) -> tuple[dict[str, str | None], dict[str, float | int] | None, set[str], dict[str, float]]:
    """Fuse, write and record one shard: the unit of work of the job's threads."""
    level = plan.grid
    used: set[str] = set()
    timing = {"read": 0.0, "fuse": 0.0, "write": 0.0}
    lo, hi = shard_box(level, shard)
    boxes = list(chunks_of_box(level, lo, hi))
    (near,) = tiles_for_chunks(plan, [(lo, hi)], candidates=candidates)
    tiles_per_chunk = tiles_for_chunks(plan, boxes, candidates=near)
    stats = None
    buffer = None
    if any(tiles_per_chunk):
        t0 = time.perf_counter()
        wanted = sorted({i for ids in tiles_per_chunk for i in ids})
        limit = 8 * math.prod(options.read_block_zyx)
        prefetched = cache.prefetch(plan, wanted, lo, hi, limit)
        t1 = time.perf_counter()
        timing["read"] += t1 - t0
        buffer = np.zeros(tuple(b - a for a, b in zip(lo, hi)), dtype=writer.dtype)
        for (c_lo, c_hi), tile_ids in zip(boxes, tiles_per_chunk):
            if not tile_ids:
                continue
            fused = _fuse_box(plan, tile_ids, c_lo, c_hi, options, cache, used, prefetched)
            sl = tuple(slice(a - b, c - b) for a, b, c in zip(c_lo, lo, c_hi))
            cast_into(fused, buffer[sl])
        del prefetched
        stats = block_stats(buffer)
        timing["fuse"] += time.perf_counter() - t1
    t3 = time.perf_counter()
    # A shard nothing touches is still written: that removes a stale object.
    objects = writer.write(shard, buffer)
    timing["write"] += time.perf_counter() - t3
    return objects, stats, used, timing


def fuse_range(
    plan: Plan,
    range_index: int,
    *,
    store_path: str,
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
    options : FusionOptions

    Returns
    -------
    dict
        The range's marker: every stored object it owns with the SHA-256 of
        its bytes (None where the object is empty and so not stored), the
        tiles it read, ``absent_input_chunks`` (tile name to the number of
        distinct tile chunks its reads found absent and so read as no data;
        only tiles with some), and timings.

    Notes
    -----
    A tile chunk that is absent is not an error (Zarr and N5 writers may omit
    chunks that hold only the fill value), but it may equally be a chunk
    lost in a copy: each tile with absent chunks is logged as one warning.
    Only readers that can tell count them (Zarr read directly, N5).
    """
    start = time.perf_counter()
    level = plan.grid
    writer = LevelWriter(store_path, 0, level)
    cache = _TileCache()
    used: set[str] = set()
    objects: dict[str, str | None] = {}
    stats: list[dict[str, float | int]] = []
    timing = {"read": 0.0, "fuse": 0.0, "write": 0.0}
    shards = range_shards(level, range_index)
    boxes = [shard_box(level, s) for s in shards]
    range_lo = tuple(int(v) for v in np.min([b[0] for b in boxes], axis=0))
    range_hi = tuple(int(v) for v in np.max([b[1] for b in boxes], axis=0))
    (candidates,) = tiles_for_chunks(plan, [(range_lo, range_hi)])  # type: ignore[list-item]
    workers = min(_workers(options), len(shards))

    def one(shard: Shape3) -> Any:
        return _fuse_shard(plan, shard, writer, options, cache, candidates)

    # Shards are independent and each is computed the same way on any thread;
    # results are merged in shard order, so the marker does not depend on
    # the number of threads either.
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for shard_objects, shard_stats, shard_used, shard_timing in pool.map(one, shards):
            objects.update(shard_objects)
            if shard_stats is not None:
                stats.append(shard_stats)
            used |= shard_used
            for key, value in shard_timing.items():
                timing[key] += value
    absent = cache.absent_chunks()
    for name, (count, tile) in absent.items():
        source = tile.source
        where = os.path.basename(source.path.rstrip("/")) or source.path
        if source.key:
            where = f"{where} {source.key}"
        log.warning(
            "tile %s: %d absent chunk%s read as no data (%s)",
            name,
            count,
            "" if count == 1 else "s",
            where,
        )
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
        "absent_input_chunks": {name: count for name, (count, _) in absent.items()},
        "stats": dict(merge_stats(stats), voxels=n_voxels),
        "seconds": round(seconds, 3),
        "threads": workers,
        # Summed over threads: where the job's CPU time went.
        "thread_seconds": {k: round(v, 3) for k, v in timing.items()},
    }
