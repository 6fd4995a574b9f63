import itertools
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tilefusion import geometry
from tilefusion.errors import InputError
from tilefusion.fuse import FusionOptions, fuse_range
from tilefusion.plan import (
    make_plan,
    range_chunks,
    range_shards,
    read_plan,
    shard_box,
    tiles_for_chunks,
)
from tilefusion.readers.arrays import register_memory_array
from tilefusion.readers.base import ArraySource, Dataset, View
from tilefusion.store import FormatV05, prepare_store

SHARED = Path(
    os.environ.get(
        "TILEFUSION_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"
    )
)
XMLS = SHARED / "bigstitcher-xml"


def _view(setup, model, shape=(10, 20, 30), voxel=(1.0, 0.5, 0.5), source=None):
    calibration = tuple(np.asarray(voxel) / min(voxel))
    return View(
        setup=setup,
        timepoint=0,
        shape_zyx=shape,
        voxel_size_zyx=voxel,
        model=model,
        source=source or ArraySource("memory", f"v{setup}"),
        calibration_zyx=calibration,
    )


def _calibrated(*registration):
    return geometry.compose(*registration, geometry.scale([2.0, 1.0, 1.0]))


def test_grid_is_bigstitchers_maximal_bounding_box():
    views = (
        _view(0, _calibrated()),
        _view(1, _calibrated(geometry.translation([-0.5, -3.2, 25.7]))),
    )
    plan = make_plan(Dataset("d.xml", "micrometer", views), chunks_zyx=(8, 8, 8))
    # view 0 spans z 0..18, y 0..19, x 0..29; view 1 z -0.5..17.5, y -3.2..15.8, x 25.7..54.7
    assert plan.world_unit_zyx == (0.5, 0.5, 0.5)
    assert plan.resolution_zyx == (0.5, 0.5, 0.5)
    assert plan.shape_zyx == (18 - (-1) + 1, 19 - (-4) + 1, 55 - 0 + 1)
    assert plan.origin_zyx == (-0.5, -2.0, 0.0)
    keys = set(plan.to_json())
    assert {
        "unit",
        "world_unit_zyx",
        "resolution_zyx",
        "origin_zyx",
        "shape_zyx",
        "chunks_zyx",
        "ranges",
    } <= keys


def test_output_resolution_keeps_the_physical_grid():
    views = (_view(0, _calibrated(geometry.translation([0.0, 0.0, 7.0]))),)
    plan = make_plan(Dataset("d.xml", "micrometer", views), resolution_zyx=(1.0, 1.5, 1.5))
    # x spans world 7..36 -> physical 3.5..18 -> index floor(3.5/1.5)=2 .. ceil(18/1.5)=12
    assert plan.origin_zyx[2] == pytest.approx(3.0)
    assert plan.shape_zyx[2] == 11
    corner = geometry.transform_points(plan.tiles[0].tile_to_output, [[0, 0, 0]])[0]
    # voxel (0,0,0) is at physical x 3.5 -> output index (3.5 - 3.0) / 1.5
    assert corner[2] == pytest.approx(0.5 / 1.5)


def test_ranges_own_whole_shards_exactly_once():
    views = (_view(0, _calibrated(), shape=(40, 70, 90)),)
    plan = make_plan(
        Dataset("d.xml", "micrometer", views),
        chunks_zyx=(8, 16, 16),
        shards_zyx=(16, 32, 32),
        chunks_per_range=10,
    )
    level = plan.grid
    assert level.n_ranges > 4
    seen = [s for r in range(level.n_ranges) for s in range_shards(level, r)]
    assert len(seen) == len(set(seen)) == level.n_shards
    covered = np.zeros(level.shape_zyx, dtype=int)
    for r in range(level.n_ranges):
        for lo, hi in range_chunks(level, r):
            covered[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] += 1
    assert np.all(covered == 1)


def test_ranges_hold_about_equal_voxels():
    # 4 shards and 1 voxel in z: the thin last layer of shards joins a range
    # instead of making a nearly empty job of its own.
    views = (_view(0, _calibrated(), shape=(33, 64, 64)),)
    plan = make_plan(
        Dataset("d.xml", "micrometer", views),
        chunks_zyx=(16, 32, 32),
        shards_zyx=(16, 32, 32),
        chunks_per_range=8,
    )
    level = plan.grid
    assert level.shape_zyx[0] == 65 and level.shard_grid[0] == 5
    sizes = [
        sum(math.prod(np.subtract(*shard_box(level, s)[::-1])) for s in range_shards(level, r))
        for r in range(level.n_ranges)
    ]
    shard = math.prod(level.shards_zyx)
    assert level.n_ranges == math.ceil(math.prod(level.shape_zyx) / (8 * shard))
    assert max(sizes) - min(sizes) <= shard
    assert level.max_range_voxels() == max(sizes)


def test_pyramid_levels_state_the_true_grid():
    views = (_view(0, _calibrated(), shape=(40, 70, 90)),)
    plan = make_plan(Dataset("d.xml", "micrometer", views), chunks_zyx=(16, 16, 16))
    first, second = plan.levels[0], plan.levels[1]
    assert second.scale_zyx == tuple(2 * s for s in first.scale_zyx)
    # a level-1 voxel averages level-0 voxels 0 and 1: its centre is half a voxel on
    assert second.translation_zyx == pytest.approx(
        [t + 0.5 * s for t, s in zip(first.translation_zyx, first.scale_zyx)]
    )
    assert second.shape_zyx == tuple(math.ceil(s / 2) for s in first.shape_zyx)
    last = plan.levels[-1]
    assert all(s <= 16 for s in last.shape_zyx)


def test_tiles_that_miss_a_chunk_are_not_listed():
    views = (
        _view(0, _calibrated()),
        _view(1, _calibrated(geometry.translation([0, 0, 100.0]))),
    )
    plan = make_plan(Dataset("d.xml", "micrometer", views), chunks_zyx=(32, 32, 32))
    boxes = [((0, 0, 0), (19, 20, 30)), ((0, 0, 100), (19, 20, 129))]
    assert tiles_for_chunks(plan, boxes) == [[0], [1]]


def test_no_view_is_refused():
    with pytest.raises(InputError, match="no view"):
        make_plan(Dataset("d.xml", "micrometer", ()))


def test_one_bright_voxel_lands_on_its_index(tmp_path):
    tile = np.full((8, 16, 16), 10, dtype=np.uint16)
    tile[3, 5, 7] = 1000
    source = register_memory_array("hot-voxel", tile)
    model = _calibrated(geometry.translation([2.0, -3.0, 4.0]))
    view = _view(0, model, shape=tile.shape, source=source)
    plan = make_plan(Dataset("d.xml", "micrometer", (view,)), chunks_zyx=(32, 32, 32))
    # world = model(voxel); grid starts at floor of the smallest corner (2, -3, 4)
    prepare_store(plan, tmp_path / "out.zarr", ngff=FormatV05(), dtype="uint16", identity="t")
    fuse_range(
        plan,
        0,
        store_path=str(tmp_path / "out.zarr"),
        options=FusionOptions(interpolation="linear", blending="mean"),
    )
    import zarr

    out = zarr.open_array(str(tmp_path / "out.zarr" / "0"), mode="r")[:]
    assert np.unravel_index(np.argmax(out), out.shape) == (6, 5, 7)
    assert out[6, 5, 7] == 1000
    # z voxels are 2 world units: the neighbours halfway between get the mean
    assert out[5, 5, 7] == 505 and out[7, 5, 7] == 505


needs_shared = pytest.mark.skipif(not XMLS.is_dir(), reason="../shared/data not present")


@needs_shared
def test_plan_real_xml_without_calibration():
    from tilefusion.readers import read_dataset

    dataset = read_dataset(
        XMLS / "Rhapso__pipelines_fusion_data__BL6-R12_stitching_all_channels.xml"
    )
    channel = sorted({v.attributes["channel"] for v in dataset.views})[0]
    selected = dataset.select(timepoint=0, channel=channel)
    plan = make_plan(selected)
    assert len(plan.tiles) == 38
    assert plan.world_unit_zyx == pytest.approx((1.0, 0.242, 0.242))


@needs_shared
def test_plan_real_xml_with_calibration_in_nm():
    from tilefusion.readers import read_dataset

    dataset = read_dataset(XMLS / "pydantic-bigstitcher__bigstitcher_5.xml")
    channel = sorted({v.attributes["channel"] for v in dataset.views})[0]
    plan = make_plan(dataset.select(channel=channel))
    assert plan.unit == "nanometer"
    assert plan.world_unit_zyx == pytest.approx((168.0, 168.0, 168.0), rel=1e-3)


@needs_shared
def test_cli_plans_from_metadata_alone(tmp_path):
    xml = XMLS / "pydantic-bigstitcher__bigstitcher_4.xml"
    out = tmp_path / "plan.json"
    start = time.perf_counter()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tilefusion.cli",
            "plan",
            str(xml),
            "--metadata-only",
            "--resolution",
            "800",
            "672",
            "672",
            "--output",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert time.perf_counter() - start < 60
    plan = json.loads(out.read_text())
    assert plan["resolution_zyx"] == [800.0, 672.0, 672.0]
    assert plan["ranges"] == read_plan(out).grid.n_ranges >= 1


def test_manifest_lists_the_tiles_of_every_chunk(tmp_path):
    import pandas as pd

    from tilefusion.plan import write_manifest

    views = tuple(
        _view(i, _calibrated(geometry.translation([0.0, 13.0 * (i // 3), 21.0 * (i % 3)])))
        for i in range(6)
    )
    plan = make_plan(
        Dataset("d.xml", "micrometer", views),
        chunks_zyx=(8, 8, 8),
        shards_zyx=(8, 16, 16),
        chunks_per_range=8,
    )
    write_manifest(plan, tmp_path / "manifest.tsv")
    table = pd.read_csv(tmp_path / "manifest.tsv", sep="\t")
    expected = []
    for r in range(plan.grid.n_ranges):
        boxes = range_chunks(plan.grid, r)
        for (lo, _hi), ids in zip(boxes, tiles_for_chunks(plan, boxes)):
            if ids:
                index = [a // 8 for a in lo]
                expected.append((r, *index, ",".join(plan.tiles[i].name for i in ids)))
    got = [tuple(row) for row in table.itertuples(index=False)]
    assert sorted(got) == sorted(expected) and len(got) > 10


def test_post_transforms_apply_after_registration_in_physical_units():
    from tilefusion.plan import post_transform_affine

    views = (_view(0, _calibrated(), shape=(10, 20, 30)),)
    dataset = Dataset("d.xml", "micrometer", views)
    plain = make_plan(dataset)
    # listed order is application order: stretch x by 2, then shift x by 100 um
    post = post_transform_affine(
        [{"scale": [1.0, 1.0, 2.0]}, {"translation": [0.0, 0.0, 100.0]}], source="config"
    )
    stretched = make_plan(dataset, post_transform=post)
    assert stretched.shape_zyx[2] == 2 * (plain.shape_zyx[2] - 1) + 1
    assert stretched.origin_zyx[2] == pytest.approx(100.0)
    with pytest.raises(InputError, match=r"post_transforms\[0\]"):
        post_transform_affine([{"scale": [1.0, 0.0, 1.0]}], source="config")


def _reference_starts(shape, shards, range_voxels):
    """The range starts as planning computed them from every shard's voxels."""
    sizes = [
        np.minimum(s, n - np.arange(math.ceil(n / s), dtype=np.int64) * s)
        for n, s in zip(shape, shards)
    ]
    voxels = np.multiply.outer(np.multiply.outer(sizes[0], sizes[1]), sizes[2]).ravel()
    total = int(voxels.sum())
    count = max(1, math.ceil(total / max(range_voxels, 1)))
    before = np.cumsum(voxels) - voxels
    targets = np.arange(1, count) * (total / count)
    cuts = np.searchsorted(before, targets, side="left")
    starts = np.unique(np.concatenate([[0], cuts]))
    return [int(v) for v in starts[starts < len(voxels)]], voxels


def _check_cuts(cuts, starts, voxels):
    n = len(voxels)
    assert cuts.n_ranges == len(starts)
    assert cuts.starts(np.arange(cuts.n_ranges)).tolist() == starts
    flat = np.arange(n)
    expected = np.searchsorted(np.asarray(starts), flat, side="right") - 1
    assert np.array_equal(cuts.range_of(flat), expected)
    stops = [*starts[1:], n]
    for r in {0, cuts.n_ranges // 3, cuts.n_ranges - 1}:
        assert cuts.bounds(r) == (starts[r], stops[r])
    edges = np.concatenate([[0], np.cumsum(voxels)])
    assert cuts.max_range_voxels == max(edges[b] - edges[a] for a, b in zip(starts, stops))


def test_range_cuts_from_axis_counts_equal_the_per_shard_ones():
    import random

    from tilefusion.plan import RangeCuts

    rng = random.Random(1)
    modes = set()
    for _ in range(400):
        shape = tuple(rng.randint(1, rng.choice([5, 40, 200])) for _ in range(3))
        chunks = tuple(rng.choice([1, 2, 3, 4, 8, 16]) for _ in range(3))
        shards = tuple(c * rng.choice([1, 1, 2, 3]) for c in chunks)
        range_voxels = rng.choice([1, 2, 3, 4, 8, 16, 64, 1000]) * math.prod(chunks)
        starts, voxels = _reference_starts(shape, shards, range_voxels)
        cuts = RangeCuts(shape, shards, range_voxels)
        modes.add(cuts.mode)
        _check_cuts(cuts, starts, voxels)
        # the row-by-row count holds for every grid, not only those it is used for
        _check_cuts(RangeCuts(shape, shards, range_voxels, mode="rows"), starts, voxels)
    assert modes == {"cuts", "shards", "rows"}


def test_range_cuts_keep_the_float_rounding_of_the_targets():
    # 3600 voxels in 27 ranges: target 15 is 15 * 3600 / 27 = 2000 voxels,
    # the start of shard 25, but float64(15) * (3600 / 27) rounds above 2000,
    # so planning always cut at shard 26, not 25 as exact arithmetic would.
    from tilefusion.plan import RangeCuts

    shape, shards, range_voxels = (18, 10, 20), (8, 5, 2), 134
    assert 15.0 * (3600 / 27) > 2000
    starts, voxels = _reference_starts(shape, shards, range_voxels)
    assert int(np.sum(voxels[:25])) == 2000
    assert starts[15] == 26 and 25 not in starts
    _check_cuts(RangeCuts(shape, shards, range_voxels), starts, voxels)
    _check_cuts(RangeCuts(shape, shards, range_voxels, mode="rows"), starts, voxels)


def test_range_cuts_of_a_grid_too_big_to_count_by_rows_are_valid():
    from tilefusion.plan import RangeCuts

    shape, shards = (37, 45, 50), (4, 4, 8)
    exact = RangeCuts(shape, shards, math.prod(shards))
    assert exact.mode == "rows"
    cuts = RangeCuts(shape, shards, math.prod(shards), max_rows=10)
    assert cuts.mode == "cuts" and cuts.count == math.prod(shape) // math.prod(shards)
    starts = cuts.starts(np.arange(cuts.n_ranges)).tolist()
    assert starts[0] == 0 and all(a < b for a, b in itertools.pairwise(starts))
    assert starts[-1] < cuts.n_shards == exact.n_shards
    flat = np.arange(cuts.n_shards)
    assert np.array_equal(
        cuts.range_of(flat), np.searchsorted(np.asarray(starts), flat, side="right") - 1
    )
    # no range is less than one full shard, nor more than twice its share
    assert cuts.max_range_voxels < 2 * math.prod(shards) + math.prod(shape) / cuts.count


def test_a_huge_grid_is_planned_in_small_memory():
    import tracemalloc

    # a 1 mm x 10 mm x 10 mm tile fused at 1 nm: 1e20 voxels, 1e14 shards of 1 Mvoxel
    view = View(
        setup=0,
        timepoint=0,
        shape_zyx=(100, 1000, 1000),
        voxel_size_zyx=(10.0, 10.0, 10.0),
        model=geometry.identity(),
        source=ArraySource("memory", "big"),
        calibration_zyx=(1.0, 1.0, 1.0),
    )
    dataset = Dataset("d.xml", "micrometer", (view,))
    tracemalloc.start()
    try:
        plans = [
            make_plan(dataset, resolution_zyx=(0.001,) * 3, chunks_zyx=chunks, **kwargs)
            for chunks, kwargs in [
                ((64, 128, 128), {}),
                ((32, 64, 64), {"shards_zyx": (64, 128, 128), "chunks_per_range": 8}),
                ((1, 1, 1), {"chunks_per_range": 8}),
            ]
        ]
        for plan in plans:
            level = plan.grid
            last = level.range_bounds(level.n_ranges - 1)
            middle = range_shards(level, level.n_ranges // 2)
            assert plan.to_json()["ranges"] == level.n_ranges
            assert level.max_range_voxels() >= 1
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 50 * 2**20
    level = plans[0].grid
    assert math.prod(level.shape_zyx) > 9e19
    assert level.n_ranges == math.ceil(math.prod(level.shape_zyx) / (1024 * 64 * 128 * 128))
    assert last[1] == plans[-1].grid.n_shards and middle
    assert len(plans[0].levels) == 16


def _bigstitcher_maximal_box(xml: Path) -> tuple[list[int], list[int]]:
    """BoundingBoxMaximal, computed from the XML text alone (xyz, as BigStitcher does).

    Per view the model is T0 T1 ... Tn in XML order; the corners 0 and size-1
    go through it; the box is floor of the smallest and ceil of the largest.
    Returned as zyx lo and hi (inclusive).
    """
    import xml.etree.ElementTree as ET

    root = ET.parse(xml).getroot()
    sizes = {
        int(s.findtext("id") or 0): [int(v) for v in (s.findtext("size") or "").split()]
        for s in root.iterfind("SequenceDescription/ViewSetups/ViewSetup")
    }
    lo = np.full(3, np.inf)
    hi = np.full(3, -np.inf)
    for reg in root.iterfind("ViewRegistrations/ViewRegistration"):
        model = np.eye(4)
        for vt in reg.findall("ViewTransform"):
            m = np.eye(4)
            m[:3] = np.array((vt.findtext("affine") or "").split(), float).reshape(3, 4)
            model = model @ m
        size = sizes[int(reg.get("setup") or 0)]
        for corner in itertools.product(*[(0.0, n - 1.0) for n in size]):
            p = (model @ np.array([*corner, 1.0]))[:3]
            lo, hi = np.minimum(lo, p), np.maximum(hi, p)
    return np.floor(lo)[::-1].astype(int).tolist(), np.ceil(hi)[::-1].astype(int).tolist()


@pytest.mark.skipif(not XMLS.is_dir(), reason="shared bigstitcher-xml not present")
@pytest.mark.parametrize(
    ("name", "world_unit", "shape"),
    [
        ("npy2bdv__kidney.xml", (65.6039, 65.6039, 65.6039), (77, 172, 112)),
        ("npy2bdv__kidney_v1.xml", (65.6039, 65.6039, 65.6039), (77, 172, 112)),
        ("pydantic-bigstitcher__bigstitcher_1.xml", (1.0, 0.748, 0.748), (29098, 28924, 62639)),
        ("pydantic-bigstitcher__bigstitcher_2.xml", (1.0, 0.748, 0.748), (28672, 28729, 62445)),
    ],
)
def test_real_xml_box_is_bigstitchers_to_the_voxel(name, world_unit, shape):
    from tilefusion.readers.bdv_xml import read_bdv_xml

    dataset = read_bdv_xml(XMLS / name)
    lo, hi = _bigstitcher_maximal_box(XMLS / name)
    assert tuple(h - low + 1 for low, h in zip(lo, hi)) == shape
    view = dataset.views[0]
    # The unit from the calibration, or the nominal-grid translation: never
    # from the registration (bigstitcher_1's affines would give 1.00003 in z).
    unrounded = np.asarray(view.voxel_size_zyx) / np.asarray(view.calibration_zyx or (1, 1, 1))
    for resolution in (None, world_unit, unrounded.tolist()):
        plan = make_plan(dataset, resolution_zyx=resolution, use_stored_levels=False)
        assert plan.world_unit_zyx == world_unit
        assert plan.shape_zyx == shape, resolution
        origin_index = np.asarray(plan.origin_zyx) / np.asarray(plan.resolution_zyx)
        np.testing.assert_allclose(origin_index, lo, atol=1e-6)


def test_registration_that_rescales_is_not_a_new_world_unit():
    # A nominal-grid translation listed last (applied first), a registration
    # affine that rescales by 1e-4 before it: the unit stays the voxel size.
    from tilefusion.transforms import Affine, Sequence

    rescale = geometry.scale([1.0001, 1.0001, 1.0001])
    nominal = geometry.translation([0.0, 0.0, 100.0])
    chain = Sequence([Affine(rescale), Affine(nominal)])
    view = View(
        setup=0,
        timepoint=0,
        shape_zyx=(10, 20, 30),
        voxel_size_zyx=(2.0, 0.5, 0.5),
        model=geometry.compose(rescale, nominal),
        source=ArraySource("memory", "v0"),
        transform=chain,
    )
    plan = make_plan(Dataset("d.xml", "micrometer", (view,)), use_stored_levels=False)
    assert plan.world_unit_zyx == (2.0, 0.5, 0.5)


def test_the_grid_file_holds_the_plan_less_its_tiles(tmp_path):
    import os

    from tilefusion.demo import demo_dataset
    from tilefusion.plan import grid_path, make_plan, read_plan, read_plan_grid

    plan = make_plan(demo_dataset(tmp_path / "d.xml"), chunks_zyx=(32, 64, 64), pyramid_levels=2)
    path = tmp_path / "plan.json"
    plan.write(path)
    grid = read_plan_grid(path)
    assert grid is not None and grid.tiles == ()
    assert grid.levels == read_plan(path).levels
    # A grid older than its plan (a plan step cut short between the two) is not used.
    stamp = path.stat().st_mtime_ns
    os.utime(grid_path(path), ns=(stamp - 10**9, stamp - 10**9))
    assert read_plan_grid(path) is None
    grid_path(path).unlink()
    assert read_plan_grid(path) is None
