"""The cost estimate printed before a run: sizes, reads, memory, time from the plan."""

from __future__ import annotations

import numpy as np

from tilefusion.demo import demo_dataset
from tilefusion.plan import make_plan
from tilefusion.summary import estimate_run, format_estimate


def _plan(tmp_path, **options):
    dataset = demo_dataset(tmp_path / "dataset.xml")
    return make_plan(dataset, chunks_zyx=(32, 64, 64), chunks_per_range=2, **options)


def test_the_estimate_counts_what_the_plan_holds(tmp_path) -> None:
    plan = _plan(tmp_path, pyramid_levels=2)
    estimate = estimate_run(plan, dtype="uint16", threads=2)
    assert estimate.tiles == len(plan.tiles) == 4
    assert estimate.shape_zyx == plan.shape_zyx
    level_voxels = sum(int(np.prod(level.shape_zyx)) for level in plan.levels)
    assert estimate.output_gb == level_voxels * 2 / 1e9
    assert estimate.fuse_ranges == plan.grid.n_ranges
    assert estimate.ranges == sum(level.n_ranges for level in plan.levels)
    # Every tile byte is read by at least one job, and the overlaps by several.
    tile_bytes = sum(int(np.prod(t.shape_zyx)) * 2 for t in plan.tiles)
    assert estimate.read_gb_total * 1e9 >= 0.99 * tile_bytes
    assert estimate.read_gb_max >= estimate.read_gb_mean > 0
    assert estimate.fuse_memory_mb > 0 and estimate.gpu_memory_mb > 0
    assert estimate.cpu_hours > 0


def test_the_printed_lines_name_the_numbers(tmp_path) -> None:
    text = format_estimate(estimate_run(_plan(tmp_path)))
    assert text.startswith("tilefusion: 4 tiles")
    for word in ("fuse jobs", "tile reads per fuse job", "memory per fuse job", "CPU time"):
        assert word in text
    assert len(text.splitlines()) == 5
