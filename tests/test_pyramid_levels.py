"""Pyramid levels: per-axis factors for anisotropic voxels, the true physical grid."""

import math

import numpy as np
import pytest
import zarr

from tilefusion import geometry
from tilefusion.plan import level_factor, make_plan
from tilefusion.pyramid import downsample_range
from tilefusion.readers.base import ArraySource, Dataset, View
from tilefusion.store import FormatV05, open_level, prepare_store


def _dataset(shape, voxel):
    # one tile whose world unit is its voxel (BigStitcher's calibration)
    view = View(
        setup=0,
        timepoint=0,
        shape_zyx=shape,
        voxel_size_zyx=voxel,
        model=geometry.identity(),
        source=ArraySource("memory", "v0"),
        calibration_zyx=(1.0, 1.0, 1.0),
    )
    return Dataset("d.xml", "micrometer", (view,))


def _plan(shape, voxel, **kwargs):
    kwargs.setdefault("chunks_zyx", (4, 8, 8))
    return make_plan(_dataset(shape, voxel), world_unit_zyx=voxel, **kwargs)


def test_factors_halve_the_fine_axes_until_the_voxels_are_about_isotropic():
    scale, shape = (2.0, 0.5, 0.5), (100, 1000, 1000)
    seen = []
    for _ in range(4):
        factor = level_factor(shape, scale)
        scale = tuple(s * f for s, f in zip(scale, factor))
        shape = tuple(-(-n // f) for n, f in zip(shape, factor))
        seen.append((factor, scale))
    assert seen == [
        ((1, 2, 2), (2.0, 1.0, 1.0)),
        ((1, 2, 2), (2.0, 2.0, 2.0)),
        ((2, 2, 2), (4.0, 4.0, 4.0)),
        ((2, 2, 2), (8.0, 8.0, 8.0)),
    ]
    assert level_factor((50, 50, 50), (0.3, 0.3, 0.3)) == (2, 2, 2)
    # slightly coarser z: halved (2.6 is nearer the new finest, 2.0, than 1.3 is)
    assert level_factor((50, 50, 50), (1.3, 1.0, 1.0)) == (2, 2, 2)
    # 1.5 times coarser: kept (1.5 is nearer the new finest, 2.0, than 3.0 is)
    assert level_factor((50, 50, 50), (1.5, 1.0, 1.0)) == (1, 2, 2)


def test_exaspim_voxels_reach_isotropy_by_level_three():
    # the output: level 3 was 8 um in z against 2.048 um in y and x
    scale, shape = (1.0, 0.256, 0.256), (1000, 10000, 10000)
    for _ in range(3):
        factor = level_factor(shape, scale)
        scale = tuple(s * f for s, f in zip(scale, factor))
        shape = tuple(-(-n // f) for n, f in zip(shape, factor))
    assert scale == (2.0, 2.048, 2.048)


def test_an_axis_one_voxel_long_is_never_halved_nor_holds_the_others_back():
    assert level_factor((1, 40, 40), (0.1, 0.5, 0.5)) == (1, 2, 2)
    assert level_factor((1, 1, 40), (0.1, 0.1, 5.0)) == (1, 1, 2)
    assert level_factor((1, 1, 1), (1.0, 1.0, 1.0)) == (1, 1, 1)


def test_anisotropic_plan_levels():
    plan = _plan((40, 160, 160), (2.0, 0.5, 0.5), chunks_zyx=(8, 8, 8))
    got = [(lv.factor_zyx, lv.shape_zyx, lv.scale_zyx) for lv in plan.levels]
    assert got[:5] == [
        ((1, 1, 1), (40, 160, 160), (2.0, 0.5, 0.5)),
        ((1, 2, 2), (40, 80, 80), (2.0, 1.0, 1.0)),
        ((1, 2, 2), (40, 40, 40), (2.0, 2.0, 2.0)),
        ((2, 2, 2), (20, 20, 20), (4.0, 4.0, 4.0)),
        ((2, 2, 2), (10, 10, 10), (8.0, 8.0, 8.0)),
    ]
    # pyramid_levels: null still stops at the first level that fits one chunk
    assert plan.levels[-1].shape_zyx == (5, 5, 5) and len(plan.levels) == 6
    assert len(_plan((40, 160, 160), (2.0, 0.5, 0.5), pyramid_levels=3).levels) == 3


def test_isotropic_plan_halves_every_axis():
    plan = _plan((33, 70, 90), (0.5, 0.5, 0.5), chunks_zyx=(4, 4, 4))
    for prev, level in zip(plan.levels, plan.levels[1:]):
        assert level.factor_zyx == (2, 2, 2)
        assert level.scale_zyx == tuple(2 * s for s in prev.scale_zyx)
        assert level.shape_zyx == tuple(math.ceil(n / 2) for n in prev.shape_zyx)
    assert plan.levels[-1].shape_zyx == (2, 3, 3)


@pytest.mark.parametrize("voxel", [(2.0, 0.5, 0.5), (0.5, 0.5, 0.5), (1.0, 0.242, 0.242)])
def test_ngff_translation_is_the_centre_of_voxel_zero(voxel):
    plan = _plan((30, 120, 120), voxel, chunks_zyx=(2, 4, 4))
    datasets = FormatV05().multiscales(plan, name="fused")["datasets"]
    origin = np.asarray(plan.origin_zyx)
    resolution = np.asarray(plan.resolution_zyx)
    total = np.ones(3, dtype=int)
    for level, entry in zip(plan.levels, datasets):
        total *= np.asarray(level.factor_zyx)
        scale, translation = (t[t["type"]] for t in entry["coordinateTransformations"])
        # voxel 0 of the level is the mean of level-0 voxels 0 .. total - 1 per axis
        centre = origin + (total - 1) / 2 * resolution
        assert translation == pytest.approx(centre.tolist(), rel=1e-12, abs=1e-12)
        assert scale == pytest.approx((total * resolution).tolist(), rel=1e-12)


def _box_mean(data, factor):
    """Mean over the non-zero voxels of each factor box (0 where none)."""
    out_shape = [-(-n // f) for n, f in zip(data.shape, factor)]
    out = np.zeros(out_shape, dtype=np.float64)
    for index in np.ndindex(*out_shape):
        box = data[tuple(slice(i * f, (i + 1) * f) for i, f in zip(index, factor))]
        nonzero = box[box != 0]
        out[index] = nonzero.mean() if nonzero.size else 0.0
    return out


def test_downsampled_levels_are_box_means_with_the_per_axis_factor(tmp_path):
    plan = _plan(
        (9, 22, 21),
        (2.0, 0.5, 0.5),
        chunks_zyx=(2, 4, 4),
        shards_zyx=(2, 8, 4),
        chunks_per_range=3,
        pyramid_levels=4,
    )
    assert [lv.factor_zyx for lv in plan.levels[1:]] == [(1, 2, 2), (1, 2, 2), (2, 2, 2)]
    assert plan.levels[1].n_ranges > 1
    store = tmp_path / "out.zarr"
    prepare_store(plan, store, ngff=FormatV05(), dtype="float32", identity="t")
    rng = np.random.default_rng(0)
    data = rng.uniform(1, 100, plan.shape_zyx).astype(np.float32)
    data[rng.random(data.shape) < 0.3] = 0  # no data: left out of the means
    data[:, :6, :6] = 0
    open_level(str(store), 0)[...] = data
    below = data
    for k in range(1, len(plan.levels)):
        level = plan.levels[k]
        for r in range(level.n_ranges):
            downsample_range(plan, k, r, store_path=str(store))
        got = zarr.open_array(str(store / str(k)), mode="r")[:]
        assert got.shape == level.shape_zyx
        np.testing.assert_allclose(got, _box_mean(below, level.factor_zyx), rtol=1e-6)
        below = got


@pytest.mark.parametrize("seed", range(6))
def test_a_downsample_range_waits_for_exactly_the_ranges_it_reads(seed):
    from tilefusion.plan import range_shards, shard_box, source_ranges

    rng = np.random.default_rng(seed)
    shape = tuple(int(v) for v in rng.integers(20, 90, size=3))
    voxel = (float(rng.choice([0.5, 1.0, 2.0])), 0.5, 0.5)
    chunks = tuple(int(v) for v in rng.choice([4, 8], size=3))
    plan = _plan(shape, voxel, chunks_zyx=chunks, chunks_per_range=int(rng.integers(1, 5)))
    for k in range(1, len(plan.levels)):
        level, below = plan.levels[k], plan.levels[k - 1]
        owner = {}
        for r in range(below.n_ranges):
            for shard in range_shards(below, r):
                owner[shard] = r
        for r in range(level.n_ranges):
            needed = set()
            for shard in range_shards(level, r):
                lo, hi = shard_box(level, shard)
                src_lo = [a * f for a, f in zip(lo, level.factor_zyx)]
                src_hi = [min(b * f, n) for b, f, n in zip(hi, level.factor_zyx, below.shape_zyx)]
                for s, o in owner.items():
                    box_lo, box_hi = shard_box(below, s)
                    if all(a < d and c < b for a, b, c, d in zip(src_lo, src_hi, box_lo, box_hi)):
                        needed.add(o)
            assert source_ranges(plan, k, r) == sorted(needed)
