"""Coarse outputs are fused from the tiles' stored resolution levels (issue 19)."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import zarr

from tilefusion import geometry
from tilefusion.fuse import FusionOptions, fuse_range
from tilefusion.plan import Plan, PlannedTile, level_allowance, make_plan
from tilefusion.readers import ArraySource, Dataset, read_dataset
from tilefusion.readers.arrays import open_array, stored_levels, write_n5_array
from tilefusion.readers.bdv_xml import BdvViewSpec, write_bdv_xml
from tilefusion.store import FormatV05, prepare_store

SHARED = Path(
    os.environ.get(
        "TILEFUSION_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"
    )
)
MRI = SHARED / "real-tiles" / "biop_mri_stack" / "mri-stack-multilevel.xml"

VOXEL = (2.0, 0.5, 0.5)  # zyx, micrometer
SHAPE = (16, 64, 60)
# zyx factors of levels 1 and 2 (BDV writes them xyz)
FACTORS = [(1, 1, 1), (1, 2, 2), (2, 4, 4)]


def _block_means(data: np.ndarray, factors: tuple[int, ...]) -> np.ndarray:
    """Means of whole blocks of ``factors`` voxels (a partial block at the end is dropped)."""
    n = [s // f for s, f in zip(data.shape, factors)]
    cut = data[: n[0] * factors[0], : n[1] * factors[1], : n[2] * factors[2]].astype(np.float64)
    return cut.reshape(n[0], factors[0], n[1], factors[1], n[2], factors[2]).mean(axis=(1, 3, 5))


@pytest.fixture(scope="module")
def pyramid() -> list[np.ndarray]:
    """A smooth tile without zeros (no-data voxels) and its levels, as BDV builds them."""
    zz, yy, xx = np.meshgrid(*(np.arange(n, dtype=np.float64) for n in SHAPE), indexing="ij")
    rng = np.random.default_rng(19)
    data = 500 + 300 * np.sin(yy / 3.1 + zz / 2.3) * np.cos(xx / 2.7) + rng.uniform(0, 50, SHAPE)
    level0 = np.rint(data).astype(np.uint16)
    return [level0] + [np.rint(_block_means(level0, f)).astype(np.uint16) for f in FACTORS[1:]]


def _spec(location: str) -> BdvViewSpec:
    calibration = np.array(VOXEL) / min(VOXEL)
    return BdvViewSpec(
        setup=0,
        timepoint=0,
        shape_zyx=SHAPE,
        voxel_size_zyx=VOXEL,
        chain=[("calibration", geometry.scale(calibration))],
        location=location,
    )


def _write_n5(folder: Path, levels: list[np.ndarray]) -> Path:
    container = folder / "tiles.n5"
    for k, data in enumerate(levels):
        write_n5_array(container, f"setup0/timepoint0/s{k}", data, block_size_zyx=(4, 16, 16))
    attrs = {"dataType": "uint16", "downsamplingFactors": [list(f[::-1]) for f in FACTORS]}
    (container / "setup0" / "attributes.json").write_text(json.dumps(attrs))
    xml = folder / "dataset.xml"
    write_bdv_xml(xml, [_spec(str(container))], loader="bdv.n5")
    return xml


def _write_hdf5(folder: Path, levels: list[np.ndarray]) -> Path:
    path = folder / "tiles.h5"
    with h5py.File(path, "w") as fh:
        fh["s00/resolutions"] = np.array([f[::-1] for f in FACTORS], dtype=np.float64)
        fh["s00/subdivisions"] = np.array([[16, 16, 4]] * len(FACTORS), dtype=np.int32)
        for k, data in enumerate(levels):
            # legacy BDV: uint16 pixels in int16 datasets
            fh.create_dataset(f"t00000/s00/{k}/cells", data=data.view(np.int16), chunks=True)
    xml = folder / "dataset.xml"
    write_bdv_xml(xml, [_spec(str(path))], loader="bdv.hdf5")
    return xml


def _write_ome_zarr(folder: Path, levels: list[np.ndarray], *, offsets: bool = True) -> Path:
    path = folder / "tile0.ome.zarr"
    group = zarr.open_group(str(path), mode="w", zarr_format=2)
    datasets = []
    for k, (data, f) in enumerate(zip(levels, FACTORS)):
        group.create_array(str(k), shape=data.shape, chunks=(4, 16, 16), dtype=data.dtype)[...] = (
            data
        )
        steps = [{"type": "scale", "scale": [v * s for v, s in zip(VOXEL, f)]}]
        if offsets:
            steps.append(
                {"type": "translation", "translation": [(s - 1) / 2 * v for v, s in zip(VOXEL, f)]}
            )
        datasets.append({"path": str(k), "coordinateTransformations": steps})
    group.attrs["multiscales"] = [
        {
            "version": "0.4",
            "axes": [{"name": n, "type": "space", "unit": "micrometer"} for n in "zyx"],
            "datasets": datasets,
        }
    ]
    xml = folder / "dataset.xml"
    write_bdv_xml(xml, [_spec(str(path))], loader="bdv.multimg.zarr")
    return xml


WRITERS = {"n5": _write_n5, "hdf5": _write_hdf5, "ome-zarr": _write_ome_zarr}


def _fuse(plan: Plan, out: Path) -> np.ndarray:
    prepare_store(plan, out, ngff=FormatV05(), dtype="float32", identity="t")
    for r in range(plan.grid.n_ranges):
        fuse_range(plan, r, store_path=str(out), options=FusionOptions(threads=1))
    return zarr.open_array(str(out / "0"), mode="r")[:]


def _trilinear(data: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """Linear interpolation of ``data`` at voxel coordinates (N, 3); NaN outside its centres."""
    n = np.array(data.shape)
    inside = np.all((coords >= -1e-9) & (coords <= n - 1 + 1e-9), axis=1)
    c = np.clip(coords, 0, n - 1)
    lo = np.clip(np.floor(c).astype(int), 0, np.maximum(n - 2, 0))
    t = c - lo
    out = np.zeros(len(coords))
    for corner in np.ndindex(2, 2, 2):
        w = np.prod(np.where(np.array(corner), t, 1 - t), axis=1)
        i = np.minimum(lo + corner, n - 1)
        out += w * data[i[:, 0], i[:, 1], i[:, 2]]
    return np.where(inside, out, np.nan)


def _level0_coords(plan: Plan, voxel_zyx: tuple[float, ...]) -> np.ndarray:
    """Level-0 voxel coordinates of every output voxel centre (model: calibration only)."""
    index = np.indices(plan.shape_zyx).reshape(3, -1).T.astype(np.float64)
    physical = index * np.array(plan.resolution_zyx) + np.array(plan.origin_zyx)
    return physical / np.array(voxel_zyx)


@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_stored_levels_are_listed_with_the_bdv_convention(tmp_path, pyramid, fmt) -> None:
    (view,) = read_dataset(WRITERS[fmt](tmp_path, pyramid)).views
    levels = stored_levels(view.source)
    assert [lv.index for lv in levels] == [0, 1, 2]
    assert levels[0].source == view.source
    for level, f in zip(levels, FACTORS):
        assert level.factors_zyx == f
        # level voxel i holds the mean of level-0 voxels f*i .. f*i + f - 1
        expected = geometry.translation([(s - 1) / 2 for s in f]) @ geometry.scale(f)
        np.testing.assert_allclose(level.to_level0, expected, atol=1e-12)
        np.testing.assert_array_equal(
            open_array(level.source).read((0, 0, 0), pyramid[level.index].shape),
            pyramid[level.index],
        )


@pytest.mark.parametrize(
    ("resolution", "level"),
    [
        ((2.0, 0.5, 0.5), 0),  # the tiles' own voxels
        ((1.0, 0.25, 0.25), 0),  # finer
        ((2.0, 1.0, 1.0), 1),  # (1, 2, 2)
        ((3.0, 1.5, 1.5), 1),  # allowed (1.5, 3, 3): level 2 is too coarse in z
        ((2.0, 2.0, 2.0), 1),  # allowed (1, 4, 4): z keeps level 2 out
        ((4.0, 2.0, 2.0), 2),  # (2, 4, 4) exactly
        ((16.0, 8.0, 8.0), 2),  # the coarsest stored
    ],
)
def test_each_tile_reads_the_coarsest_level_not_coarser_than_the_output(
    tmp_path, pyramid, resolution, level
) -> None:
    dataset = read_dataset(_write_n5(tmp_path, pyramid))
    (tile,) = make_plan(dataset, resolution_zyx=resolution).tiles
    assert tile.level == level
    assert tile.source.key == f"setup0/timepoint0/s{level}"
    assert tile.shape_zyx == pyramid[level].shape
    if level:
        # the level's voxels are no larger than the output's on any axis
        assert np.all(level_allowance(tile.tile_to_output) >= 1 - 1e-9)


@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_coarse_fusion_interpolates_the_stored_level(tmp_path, pyramid, fmt) -> None:
    dataset = read_dataset(WRITERS[fmt](tmp_path, pyramid))
    plan = make_plan(dataset, resolution_zyx=(4.0, 2.0, 2.0), chunks_zyx=(4, 8, 8))
    (tile,) = plan.tiles
    assert tile.level == 2
    fused = _fuse(plan, tmp_path / "out.zarr")
    # independent of the plan's maps: level-0 coordinates, then the level's
    f = np.array(FACTORS[2])
    coords = (_level0_coords(plan, VOXEL) - (f - 1) / 2) / f
    expected = _trilinear(pyramid[2].astype(np.float64), coords).reshape(plan.shape_zyx)
    inside = np.isfinite(expected)
    assert inside.mean() > 0.5
    np.testing.assert_allclose(fused[inside], expected[inside], rtol=1e-5)
    assert np.all(fused[~inside] == 0)
    # without levels: today's point samples of level 0
    flat = make_plan(
        dataset, resolution_zyx=(4.0, 2.0, 2.0), chunks_zyx=(4, 8, 8), use_stored_levels=False
    )
    assert flat.tiles[0].level == 0 and flat.shape_zyx == plan.shape_zyx
    sampled = _fuse(flat, tmp_path / "flat.zarr")
    points = _trilinear(pyramid[0].astype(np.float64), _level0_coords(plan, VOXEL))
    points = points.reshape(plan.shape_zyx)
    np.testing.assert_allclose(sampled[inside], points[inside], rtol=1e-5)


def test_formats_give_the_same_fusion(tmp_path, pyramid) -> None:
    fused = {}
    for fmt, write in WRITERS.items():
        folder = tmp_path / fmt
        folder.mkdir()
        plan = make_plan(read_dataset(write(folder, pyramid)), resolution_zyx=(4.0, 2.0, 2.0))
        fused[fmt] = _fuse(plan, folder / "out.zarr")
    np.testing.assert_array_equal(fused["n5"], fused["hdf5"])
    np.testing.assert_array_equal(fused["n5"], fused["ome-zarr"])


def test_ome_zarr_levels_follow_their_metadata(tmp_path, pyramid) -> None:
    """A pyramid stating no translations places level voxel i at level-0 voxel f*i."""
    (view,) = read_dataset(_write_ome_zarr(tmp_path, pyramid, offsets=False)).views
    level = stored_levels(view.source)[2]
    np.testing.assert_allclose(level.to_level0, geometry.scale(FACTORS[2]), atol=1e-12)
    assert level.source == ArraySource("zarr", view.source.path, "2")


def test_no_stored_levels_reads_level_0(tmp_path, pyramid) -> None:
    path = tmp_path / "plain.zarr"
    zarr.create_array(str(path), shape=SHAPE, dtype="uint16", zarr_format=3)[...] = pyramid[0]
    assert len(stored_levels(ArraySource("zarr", str(path)))) == 1
    for source in [
        ArraySource("memory", "nothing"),
        ArraySource("tiff", str(tmp_path / "none.tif")),
        ArraySource("hdf5", str(tmp_path / "none.h5"), "t00000/s00/0/cells"),
        ArraySource("n5", str(tmp_path / "none.n5"), "setup0/timepoint0/s0"),
        ArraySource("zarr", "s3://bucket/tile.zarr"),
    ]:
        (level,) = stored_levels(source)
        assert level.source == source and level.index == 0


def test_a_level_that_does_not_match_is_passed_over(tmp_path, pyramid, caplog) -> None:
    xml = _write_n5(tmp_path, pyramid)
    level2 = tmp_path / "tiles.n5" / "setup0" / "timepoint0" / "s2"
    shutil.rmtree(level2)
    write_n5_array(
        tmp_path / "tiles.n5", "setup0/timepoint0/s2", pyramid[1], block_size_zyx=(4, 8, 8)
    )
    with caplog.at_level(logging.WARNING, logger="tilefusion"):
        (tile,) = make_plan(read_dataset(xml), resolution_zyx=(4.0, 2.0, 2.0)).tiles
    assert tile.level == 1
    assert f"stored level 2 not used: shape {list(pyramid[1].shape)} does not match" in caplog.text


def test_plan_json_records_the_level_and_reads_old_plans(tmp_path, pyramid) -> None:
    plan = make_plan(read_dataset(_write_n5(tmp_path, pyramid)), resolution_zyx=(4.0, 2.0, 2.0))
    plan.write(tmp_path / "plan.json")
    data = json.loads((tmp_path / "plan.json").read_text())
    assert data["tiles"][0]["level"] == 2
    assert data["tiles"][0]["source"]["key"] == "setup0/timepoint0/s2"
    back = Plan.from_json(data)
    assert back.tiles[0].level == 2
    np.testing.assert_array_equal(back.tiles[0].tile_to_output, plan.tiles[0].tile_to_output)
    del data["tiles"][0]["level"]  # a plan written before levels were read
    assert PlannedTile.from_json(data["tiles"][0]).level == 0


# --- real data: BigDataViewer's multilevel MRI stack ------------------------------


@pytest.mark.skipif(not MRI.is_file(), reason="shared real-tiles data not present")
def test_real_multilevel_hdf5_fused_coarse_equals_its_stored_level(tmp_path) -> None:
    """Output voxels 8x the tile's (80 x 8 x 8 cm): level 3 (factors 8, 8, 8) is read."""
    dataset = read_dataset(MRI)
    (view,) = dataset.views
    plan = make_plan(dataset, resolution_zyx=(80.0, 8.0, 8.0), chunks_zyx=(8, 32, 32))
    (tile,) = plan.tiles
    assert (tile.level, tile.source.key, tile.shape_zyx) == (3, "t00000/s00/3/cells", (3, 28, 23))
    fused = _fuse(plan, tmp_path / "auto.zarr")

    # The same fusion of a dataset whose view is the stored level itself.
    level = stored_levels(view.source)[3]
    own = Dataset(
        dataset.path,
        dataset.unit,
        (
            type(view)(
                setup=view.setup,
                timepoint=view.timepoint,
                shape_zyx=(3, 28, 23),
                voxel_size_zyx=(80.0, 8.0, 8.0),
                model=view.model @ level.to_level0,
                source=level.source,
            ),
        ),
    )
    direct = make_plan(
        own, resolution_zyx=(80.0, 8.0, 8.0), chunks_zyx=(8, 32, 32), use_stored_levels=False
    )
    assert direct.origin_zyx == plan.origin_zyx
    by_level = _fuse(direct, tmp_path / "level.zarr")
    common = tuple(slice(0, n) for n in by_level.shape)
    np.testing.assert_allclose(fused[common], by_level, rtol=1e-6, atol=1e-4)
    rest = fused.copy()
    rest[common] = 0
    assert not rest.any()  # the level's voxel centres end inside the smaller grid

    # The convention, from the data: level 3 holds (rounded) means of level-0 blocks
    # 8i .. 8i + 7, so voxel i's centre is level-0 8i + 3.5, as to_level0 says.
    level0 = open_array(view.source).read((0, 0, 0), view.shape_zyx)
    stored = open_array(level.source).read((0, 0, 0), (3, 28, 23)).astype(np.float64)
    assert np.abs(stored - _block_means(level0, (8, 8, 8))).max() <= 1.0
    np.testing.assert_allclose(level.to_level0[:3, 3], [3.5, 3.5, 3.5])

    # Where all 8 level neighbours hold data (0 is no data), the fused voxel is the
    # linear interpolation of those block means, placed by that convention.
    coords = (_level0_coords(plan, (10.0, 1.0, 1.0)) - 3.5) / 8
    means = _block_means(level0, (8, 8, 8))
    expected = _trilinear(means, coords).reshape(plan.shape_zyx)
    full = np.isfinite(expected) & _all_neighbours_hold_data(stored, coords, plan.shape_zyx)
    assert full.sum() > 500
    assert np.abs(fused - expected)[full].max() < 1.0


def _all_neighbours_hold_data(data: np.ndarray, coords: np.ndarray, shape) -> np.ndarray:
    n = np.array(data.shape)
    c = np.clip(coords, 0, n - 1)
    lo = np.clip(np.floor(c).astype(int), 0, n - 2)
    ok = np.ones(len(coords), dtype=bool)
    for corner in np.ndindex(2, 2, 2):
        i = lo + corner
        ok &= data[i[:, 0], i[:, 1], i[:, 2]] != 0
    return ok.reshape(shape)
