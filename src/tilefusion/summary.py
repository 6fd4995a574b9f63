"""What a run will cost, from its plan alone: sizes, reads, memory and time.

The workflow prints :func:`format_estimate` before any job starts (also with
``snakemake -n``), and the plan step writes it to its log, so that a user
sees the bill of a terabyte run before submitting 500 jobs.

Times are estimates at throughputs measured on a 2-core machine (see
``docs/benchmarks.md``); the file names them, so a user can scale them to
their own cores.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from tilefusion.plan import Plan

__all__ = [
    "DOWNSAMPLE_MVOXELS_PER_CORE",
    "FUSE_MVOXELS_PER_CORE",
    "RunEstimate",
    "estimate_run",
    "format_estimate",
]

FUSE_MVOXELS_PER_CORE = 40.0
"""Output Mvoxel/s one CPU core fuses (affine case of docs/benchmarks.md: 98 Mvoxel/s on 2 cores
whose two threads give 1.25x one)."""

DOWNSAMPLE_MVOXELS_PER_CORE = 50.0
"""Input Mvoxel/s one CPU core downsamples (one level-1 range, docs/benchmarks.md)."""

_GB = 1e9


@dataclass(frozen=True)
class RunEstimate:
    """The numbers :func:`format_estimate` prints (all from the plan).

    Attributes
    ----------
    tiles : int
        Tiles fused.
    shape_zyx : tuple of int
        Level 0's shape.
    output_gb : float
        Uncompressed size of every level, in GB (1e9 bytes).
    chunks, shards : int
        Stored chunks and shards (write units) of level 0.
    ranges : int
        Jobs of every level (fuse jobs plus downsample jobs).
    fuse_ranges : int
        Fuse jobs (level 0 ranges).
    read_gb_max, read_gb_mean : float
        Tile bytes one fuse job reads, at most and on average: for each range,
        every overlapping tile's crop under the range's bounding box. An upper
        bound: crops are read per shard and may be smaller.
    read_gb_total : float
        Tile bytes all fuse jobs read together (overlaps and tiles read by
        several jobs counted each time).
    fuse_memory_mb, gpu_memory_mb : int
        What one fuse job needs in host memory (its request), and on a GPU.
    fuse_minutes_per_job : float
        Wall minutes of the largest fuse job at :data:`FUSE_MVOXELS_PER_CORE`
        on ``threads`` cores.
    cpu_hours : float
        CPU hours of every job together (fuse and downsample).
    threads : int
        Cores per job the times assume.
    """

    tiles: int
    shape_zyx: tuple[int, int, int]
    output_gb: float
    chunks: int
    shards: int
    ranges: int
    fuse_ranges: int
    read_gb_max: float
    read_gb_mean: float
    read_gb_total: float
    fuse_memory_mb: int
    gpu_memory_mb: int
    fuse_minutes_per_job: float
    cpu_hours: float
    threads: int

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["shape_zyx"] = list(self.shape_zyx)
        return out


def _range_boxes(plan: Plan) -> tuple[np.ndarray, np.ndarray]:
    """Bounding box (voxel lo, hi exclusive) of each level-0 range, shape (ranges, 3)."""
    grid = plan.grid
    shard_grid = np.array(grid.shard_grid, dtype=np.int64)
    shards = np.array(grid.shards_zyx, dtype=np.int64)
    shape = np.array(grid.shape_zyx, dtype=np.int64)
    n = grid.n_ranges
    starts = np.array([grid.range_bounds(r)[0] for r in range(n)], dtype=np.int64)
    stops = np.array([grid.range_bounds(r)[1] for r in range(n)], dtype=np.int64) - 1
    first = np.stack(np.unravel_index(starts, tuple(shard_grid)), axis=1)
    last = np.stack(np.unravel_index(stops, tuple(shard_grid)), axis=1)
    lo = first.copy()
    hi = last.copy()
    # A run of C-ordered shards that wraps a row covers the whole row (or slab).
    wraps_y = first[:, 0] != last[:, 0]
    wraps_x = (first[:, 1] != last[:, 1]) | wraps_y
    lo[wraps_y, 1] = 0
    hi[wraps_y, 1] = shard_grid[1] - 1
    lo[wraps_x, 2] = 0
    hi[wraps_x, 2] = shard_grid[2] - 1
    return lo * shards, np.minimum((hi + 1) * shards, shape)


def _read_bytes_per_range(plan: Plan) -> np.ndarray:
    """Upper bound of the tile bytes each level-0 range reads."""
    n = plan.grid.n_ranges
    if not plan.tiles:
        return np.zeros(n)
    if n > 100_000:
        # Beyond this the per-range bound costs more than it tells: share alike.
        total = sum(_tile_bytes(t) for t in plan.tiles)
        return np.full(n, total / n)
    lo_r, hi_r = _range_boxes(plan)
    box_lo = np.array([t.box_lo for t in plan.tiles], dtype=np.float64)
    box_hi = np.array([t.box_hi for t in plan.tiles], dtype=np.float64) + 1.0
    # Tile voxels per output voxel: the inverse of the tile-to-output volume scale.
    density = np.array(
        [1.0 / max(abs(np.linalg.det(t.tile_to_output[:3, :3])), 1e-12) for t in plan.tiles]
    )
    itemsize = np.array([np.dtype(t.dtype or "uint16").itemsize for t in plan.tiles])
    tile_voxels = np.array([math.prod(t.shape_zyx) for t in plan.tiles], dtype=np.float64)
    out = np.empty(n)
    for r in range(n):
        overlap = np.clip(
            np.minimum(box_hi, hi_r[r]) - np.maximum(box_lo, lo_r[r]), 0.0, None
        ).prod(axis=1)
        voxels = np.minimum(overlap * density, tile_voxels)
        out[r] = float((voxels * itemsize).sum())
    return out


def _tile_bytes(tile: Any) -> float:
    return float(math.prod(tile.shape_zyx) * np.dtype(tile.dtype or "uint16").itemsize)


def estimate_run(plan: Plan, *, dtype: str | None = None, threads: int = 4) -> RunEstimate:
    """Estimate what the run of ``plan`` costs (no tile is opened).

    Parameters
    ----------
    plan : Plan
        The run's plan.
    dtype : str, optional
        The output's data type; by default the tiles' (uint16 if unknown).
    threads : int, optional
        Cores of each job (the rules' ``threads``).
    """
    from tilefusion.steps import fuse_memory_mb

    if dtype is None:
        dtype = next((t.dtype for t in plan.tiles if t.dtype), "uint16")
    itemsize = np.dtype(dtype).itemsize
    grid = plan.grid
    output_bytes = sum(math.prod(level.shape_zyx) for level in plan.levels) * itemsize
    chunks = math.prod(-(-s // c) for s, c in zip(grid.shape_zyx, grid.chunks_zyx))
    reads = _read_bytes_per_range(plan)
    shard_voxels = math.prod(grid.shards_zyx)
    crops = 2 * reads.max() / max(grid.n_shards / max(grid.n_ranges, 1), 1.0) if len(reads) else 0
    # On a GPU: a shard's float32 sum and weight, and the crops of one shard.
    gpu_bytes = 2 * 4 * shard_voxels + crops
    level0 = math.prod(grid.shape_zyx)
    below = sum(math.prod(level.shape_zyx) for level in plan.levels[:-1])
    core_seconds = level0 / (FUSE_MVOXELS_PER_CORE * 1e6) + below / (
        DOWNSAMPLE_MVOXELS_PER_CORE * 1e6
    )
    return RunEstimate(
        tiles=len(plan.tiles),
        shape_zyx=grid.shape_zyx,
        output_gb=output_bytes / _GB,
        chunks=chunks,
        shards=grid.n_shards,
        ranges=sum(level.n_ranges for level in plan.levels),
        fuse_ranges=grid.n_ranges,
        read_gb_max=float(reads.max()) / _GB if len(reads) else 0.0,
        read_gb_mean=float(reads.mean()) / _GB if len(reads) else 0.0,
        read_gb_total=float(reads.sum()) / _GB,
        fuse_memory_mb=fuse_memory_mb(plan),
        gpu_memory_mb=math.ceil(gpu_bytes / 2**20),
        fuse_minutes_per_job=grid.max_range_voxels()
        / (FUSE_MVOXELS_PER_CORE * 1e6 * max(threads, 1))
        / 60,
        cpu_hours=core_seconds / 3600,
        threads=threads,
    )


def _size(gb: float) -> str:
    if gb >= 1000:
        return f"{gb / 1000:.2f} TB"
    if gb >= 1:
        return f"{gb:.2f} GB"
    return f"{gb * 1000:.1f} MB"


def _duration(minutes: float) -> str:
    if minutes >= 120:
        return f"{minutes / 60:.1f} h"
    if minutes >= 1:
        return f"{minutes:.1f} min"
    return f"{minutes * 60:.1f} s"


def format_estimate(estimate: RunEstimate) -> str:
    """The estimate as a few human lines (what the workflow prints)."""
    e = estimate
    shape = " x ".join(str(s) for s in e.shape_zyx)
    return "\n".join(
        [
            f"tilefusion: {e.tiles} tiles -> {shape} voxels (zyx), "
            f"{_size(e.output_gb)} uncompressed with its pyramid",
            f"  {e.chunks} chunks in {e.shards} shards; {e.fuse_ranges} fuse jobs, "
            f"{e.ranges - e.fuse_ranges} downsample jobs",
            f"  tile reads per fuse job: at most {_size(e.read_gb_max)}, "
            f"mean {_size(e.read_gb_mean)} ({_size(e.read_gb_total)} in all)",
            f"  memory per fuse job: {e.fuse_memory_mb} MB on the CPU, "
            f"{e.gpu_memory_mb} MB on a GPU",
            f"  time: largest fuse job about {_duration(e.fuse_minutes_per_job)} on "
            f"{e.threads} cores; {_duration(e.cpu_hours * 60)} of CPU time in all "
            f"(at {FUSE_MVOXELS_PER_CORE:.0f} Mvoxel/s per core, measured on a 2-core machine)",
        ]
    )
