"""Multiscale pyramid, built range by range like the fused level.

Level ``k`` voxel ``j`` is the mean of the level ``k - 1`` voxels
``f * j .. f * j + f - 1`` along each axis (``f`` the level's factor on that
axis: 2, or 1 on an axis the level keeps) that hold data; 0 is
"no data" in the fused volume, so uncovered voxels do not darken the edges of
the sample. Each job reads only the part of level ``k - 1`` under its shards.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from numpy.typing import NDArray

from tilefusion import fs
from tilefusion.devices import usable_cpus
from tilefusion.plan import Plan, range_shards, shard_box
from tilefusion.progress import Progress
from tilefusion.readers import ArraySource, open_array
from tilefusion.stats import block_stats, merge_stats
from tilefusion.store import open_level
from tilefusion.writer import LevelWriter, cast_to_dtype

__all__ = ["downsample_mean", "downsample_range"]


def downsample_mean(block: NDArray[Any], factor: tuple[int, int, int]) -> NDArray[np.float32]:
    """Mean of each ``factor`` block over its non-zero voxels (0 where none).

    Trailing partial blocks average the voxels they have.
    """
    if np.issubdtype(block.dtype, np.integer) and block.dtype.itemsize <= 2:
        total, count = _integer_sums(block, factor)
    else:
        padded_shape = [math.ceil(s / f) * f for s, f in zip(block.shape, factor)]
        data = np.zeros(padded_shape, dtype=np.float32)
        data[: block.shape[0], : block.shape[1], : block.shape[2]] = block
        out_shape = [p // f for p, f in zip(padded_shape, factor)]
        blocks = data.reshape(
            out_shape[0], factor[0], out_shape[1], factor[1], out_shape[2], factor[2]
        )
        total = blocks.sum(axis=(1, 3, 5), dtype=np.float64)
        count = np.count_nonzero(blocks, axis=(1, 3, 5))
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(count > 0, total / np.maximum(count, 1), 0.0)
    return mean.astype(np.float32)


def _integer_sums(
    block: NDArray[Any], factor: tuple[int, int, int]
) -> tuple[NDArray[np.uint32], NDArray[np.uint8]]:
    """Sums and non-zero counts of each ``factor`` block of a small-integer block.

    Exact (a uint32 sum of at most 8 values of 16 bits), so the mean equals the
    float64 one; axes are halved one at a time on contiguous slices instead of
    reducing a six-axis view, and the division runs on the reduced block only.
    """
    padded = [math.ceil(s / f) * f for s, f in zip(block.shape, factor)]
    if list(block.shape) != padded:
        # Zero padding adds nothing to a sum or a count of voxels with data.
        grown = np.zeros(padded, dtype=block.dtype)
        grown[: block.shape[0], : block.shape[1], : block.shape[2]] = block
        block = grown
    total: NDArray[Any] = block.astype(np.uint32)
    count: NDArray[Any] = (block != 0).view(np.uint8)
    for axis, f in enumerate(factor):
        if f == 1:
            continue
        total = _fold(total, axis, f)
        count = _fold(count, axis, f)
    return total, count


def _fold(data: NDArray[Any], axis: int, factor: int) -> NDArray[Any]:
    """Sum every ``factor`` consecutive planes of ``data`` along ``axis``."""
    index: list[slice] = [slice(None)] * 3
    index[axis] = slice(0, None, factor)
    out = data[tuple(index)].copy()
    for k in range(1, factor):
        index[axis] = slice(k, None, factor)
        out += data[tuple(index)]
    return out


def downsample_range(
    plan: Plan,
    level_index: int,
    range_index: int,
    *,
    store_path: str,
    threads: int | None = None,
) -> dict[str, Any]:
    """Compute one range of pyramid level ``level_index`` from the level below.

    Shards are computed on ``threads`` threads at once (default: one per CPU
    this process may use), each reading its block of the level below with
    the direct Zarr reader the fuse jobs use; the bytes do not depend on
    the number of threads.

    Returns
    -------
    dict
        The range's marker (stored objects and their SHA-256).
    """
    if not 1 <= level_index < len(plan.levels):
        raise IndexError(f"level {level_index} not in 1..{len(plan.levels) - 1}")
    level = plan.levels[level_index]
    open_level(store_path, level_index - 1, mode="r")  # one line if its metadata is damaged
    source = open_array(ArraySource("zarr", fs.join(store_path, str(level_index - 1))))
    writer = LevelWriter(store_path, level_index, level)
    factor = level.factor_zyx

    def one(shard: tuple[int, int, int]) -> tuple[dict[str, str | None], Any]:
        lo, hi = shard_box(level, shard)
        src_lo = [a * f for a, f in zip(lo, factor)]
        src_hi = [min(b * f, n) for b, f, n in zip(hi, factor, source.shape)]
        reduced = downsample_mean(source.read(src_lo, src_hi), factor)
        reduced = reduced[: hi[0] - lo[0], : hi[1] - lo[1], : hi[2] - lo[2]]
        # Written even when empty: the writer then drops a stale object of an earlier run.
        stored = cast_to_dtype(reduced, writer.dtype)
        result = writer.write(shard, stored), block_stats(stored)
        progress.advance(stored.size)
        return result

    shards = range_shards(level, range_index)
    workers = max(1, min(len(shards), threads or usable_cpus()))
    total = sum(math.prod(b - a for a, b in zip(*shard_box(level, s))) for s in shards)
    progress = Progress(total, what=f"downsample level {level_index} range {range_index}")
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(one, shards))
    progress.finish()
    objects: dict[str, str | None] = {}
    for written, _ in results:
        objects.update(written)
    return {
        "level": level_index,
        "range": range_index,
        "objects": objects,
        "stats": merge_stats([stats for _, stats in results]),
        "threads": workers,
    }
