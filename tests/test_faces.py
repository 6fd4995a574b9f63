"""Tile faces reach the output; blend range and border are in output voxels (issue 19).

BigStitcher's cosine weight is 0 on a tile's outermost voxel planes. Where no
other tile has weight there, the fused voxel is the plain mean of the tiles
covering it (tilefusion.blend), so a single tile fused at its own resolution
comes out whole. The fuse step converts ``fusion.blend_range``/``blend_border``
from output voxels to each tile's voxels (tilefusion.blend.tile_blend_params).
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from test_kernel import _reference

from tilefusion.blend import cosine_ramp, cosine_weight
from tilefusion.fuse import FusionOptions, _fuse_box, _TileCache
from tilefusion.geometry import compose, scale, translation
from tilefusion.kernel import TileCrop, fuse_block
from tilefusion.plan import PlannedTile
from tilefusion.readers.arrays import forget_memory_array, register_memory_array

BACKENDS = ["numba", "torch"]


def _shared_data() -> Path:
    env = os.environ.get("TILEFUSION_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


MRI = _shared_data() / "real-tiles" / "biop_mri_stack"


def _crop(data: np.ndarray, out_to_tile: np.ndarray) -> TileCrop:
    shape = (int(data.shape[0]), int(data.shape[1]), int(data.shape[2]))
    return TileCrop(data, np.asarray(out_to_tile, dtype=np.float64), (0, 0, 0), shape)


def _fuse(crops: list[TileCrop], block: tuple[int, int, int], backend: str, **kw: object):
    return fuse_block(crops, block, backend=backend, device="cpu", **kw)  # type: ignore[arg-type]


def _tile_with_holes(dtype: type, shape: tuple[int, int, int] = (7, 9, 11)) -> np.ndarray:
    rng = np.random.default_rng(19)
    data = rng.uniform(1, 1000, shape).astype(dtype)
    data[rng.random(shape) < 0.1] = 0  # voxels without data, faces included
    return data


def _rot90(axes: tuple[int, int], n: int) -> np.ndarray:
    """Block index -> tile index for ``np.rot90(tile, 1, axes)`` (a tile axis of length n).

    Written with a numeric rotation, so cos(pi/2) is not exactly 0: the face
    coordinates land a few ulps off the integers, inside the tolerance.
    """
    i, j = axes
    r = np.eye(4)
    c, s = np.cos(np.pi / 2), np.sin(np.pi / 2)
    # tile[i] = block[j], tile[j] = n - 1 - block[i]
    r[i, i], r[i, j], r[j, i], r[j, j] = c, s, -s, c
    return compose(translation([n - 1 if a == j else 0 for a in range(3)]), r)


# --- one tile at its own resolution ---------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.uint16, np.float32])
@pytest.mark.parametrize("interpolation", ["linear", "nearest"])
def test_single_tile_keeps_every_voxel(backend: str, dtype: type, interpolation: str) -> None:
    # uint16 under the identity takes the integer-shift copy, float32 linear the
    # plane kernel, nearest the row kernel: all keep faces, edges and corners.
    data = _tile_with_holes(dtype)
    out = _fuse([_crop(data, np.eye(4))], data.shape, backend, interpolation=interpolation)
    np.testing.assert_allclose(out, data, rtol=1e-6)
    np.testing.assert_array_equal(out == 0, data == 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("interpolation", ["linear", "nearest"])
@pytest.mark.parametrize("axes", [(1, 2), (0, 2), (0, 1)])
def test_single_rotated_tile_keeps_every_voxel(
    backend: str, interpolation: str, axes: tuple[int, int]
) -> None:
    # A quarter turn (about z: the plane kernel; about y or x: the row kernel).
    data = _tile_with_holes(np.float32)
    expected = np.rot90(data, 1, axes)
    out_to_tile = _rot90(axes, data.shape[axes[1]])
    out = _fuse([_crop(data, out_to_tile)], expected.shape, backend, interpolation=interpolation)
    has = expected != 0
    np.testing.assert_allclose(out[has], expected[has], rtol=1e-5)
    if interpolation == "nearest":
        assert np.all(out[~has] == 0)
    # (linear: a voxel without data sampled a few ulps off its centre takes
    # the value of the neighbour with data, the no-data normalisation)


@pytest.mark.parametrize("backend", BACKENDS)
def test_faces_with_a_border_keep_the_border_plane(backend: str) -> None:
    # With a border the weight is 0 on the plane ``border`` from the edge: that
    # plane keeps its values, the planes outside it stay 0 (no data there).
    data = _tile_with_holes(np.float32, (9, 10, 11))
    out = _fuse([_crop(data, np.eye(4))], data.shape, backend, blend_border_zyx=(2.0, 0.0, 1.0))
    keep = np.zeros(data.shape, bool)
    keep[2:-2, :, 1:-1] = True
    np.testing.assert_allclose(out[keep], data[keep], rtol=1e-6)
    assert np.all(out[~keep] == 0)


# --- two tiles ------------------------------------------------------------------


def _two_tiles() -> tuple[list[TileCrop], tuple[int, int, int], np.ndarray, np.ndarray]:
    # A (10, 12, 20) at the block origin; B (14, 16, 20) starts 12 voxels
    # further in x and 2 voxels earlier in z and y, so A's z and y faces in
    # the overlap lie inside B, while A's x = 0 face and its z/y faces at
    # x < 12 are covered by no other tile.
    rng = np.random.default_rng(7)
    a = rng.uniform(1, 1000, (10, 12, 20)).astype(np.float32)
    b = rng.uniform(1, 1000, (14, 16, 20)).astype(np.float32)
    crops = [_crop(a, np.eye(4)), _crop(b, translation([2, 2, -12]))]
    return crops, (10, 12, 32), a, b


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("order", ["A first", "B first"])
def test_two_tiles_overlap_unchanged_and_uncovered_faces_kept(backend: str, order: str) -> None:
    # In either order: a face sample that comes first is dropped by a
    # weighted one that comes later, and ignored when it comes after one.
    crops, block, a, b = _two_tiles()
    if order == "B first":
        crops = crops[::-1]
    rng = (3.0, 4.0, 5.0)
    out = _fuse(crops, block, backend, blend_range_zyx=rng)

    # BigStitcher's cosine average wherever some tile has weight: as before.
    o = np.indices(block, dtype=np.float64).reshape(3, -1).T
    wa = cosine_weight(o, a.shape, blend_range_zyx=rng).reshape(block)
    wb = cosine_weight(o + np.array([2, 2, -12]), b.shape, blend_range_zyx=rng).reshape(block)
    va = np.zeros(block)
    va[:, :, :20] = a
    vb = np.zeros(block)
    vb[:, :, 12:] = b[2:12, 2:14]
    total = wa + wb
    weighted = total > 0
    cosine = np.divide(wa * va + wb * vb, total, out=np.zeros(block), where=weighted)
    np.testing.assert_allclose(out[weighted], cosine[weighted], rtol=1e-5)
    # A's faces inside B: B's value (A has weight 0 there, B has weight).
    # (x = 12 is also B's face: both weights 0 there, the mean of A and B)
    np.testing.assert_allclose(out[0, 5, 13:20], b[2, 7, 1:8], rtol=1e-5)
    np.testing.assert_allclose(out[5, -1, 13:20], b[7, 13, 1:8], rtol=1e-5)
    np.testing.assert_allclose(out[0, 5, 12], (a[0, 5, 12] + b[2, 7, 0]) / 2, rtol=1e-5)

    # Where no tile has weight, the tiles' own values.
    assert not weighted.all()
    np.testing.assert_allclose(out[:, :, 0], a[:, :, 0], rtol=1e-6)  # A's x = 0 face
    np.testing.assert_allclose(out[0, :, :12], a[0, :, :12], rtol=1e-6)  # A's z faces
    np.testing.assert_allclose(out[-1, :, :12], a[-1, :, :12], rtol=1e-6)
    np.testing.assert_allclose(out[:, 0, :12], a[:, 0, :12], rtol=1e-6)  # A's y faces
    np.testing.assert_allclose(out[:, :, -1], b[2:12, 2:14, -1], rtol=1e-6)  # B's last x
    # A's x = 19 face inside B's interior: cosine, B's value only.
    np.testing.assert_allclose(out[5, 6, 19], b[7, 8, 7], rtol=1e-5)
    assert np.all(out > 0)


def test_face_flag_is_set_only_where_a_face_band_meets_the_block() -> None:
    from tilefusion.kernel._types import plan_tiles

    data = np.ones((20, 20, 20), np.uint16)
    kw = {"blend_range_zyx": 4.0, "blend_border_zyx": 0.0}

    def face(out_to_tile: np.ndarray, block: tuple[int, int, int], **extra: float) -> bool:
        (plan,) = plan_tiles([_crop(data, out_to_tile)], block, **{**kw, **extra})  # type: ignore[arg-type]
        return plan.face

    assert not face(translation([5, 5, 5]), (10, 10, 10))  # tile voxels 5..14: inside
    assert face(translation([5, 5, 10]), (10, 10, 10))  # reaches x = 19
    assert face(translation([0, 5, 5]), (10, 10, 10))  # starts on z = 0
    assert face(translation([5, 5, 5]), (10, 10, 10), blend_border_zyx=5.0)  # border plane
    assert not face(translation([5.5, 5, 5]), (10, 10, 10))


@pytest.mark.parametrize("backend", BACKENDS)
def test_inner_block_is_unchanged(backend: str) -> None:
    # A block inside two tiles, in one's ramp: no face band reaches it, the
    # cosine average exactly as BigStitcher's.
    from tilefusion.kernel._types import plan_tiles

    rng = np.random.default_rng(3)
    a = rng.uniform(1, 1000, (30, 30, 30)).astype(np.float32)
    b = rng.uniform(1, 1000, (30, 30, 30)).astype(np.float32)
    crops = [_crop(a, translation([8, 8, 8])), _crop(b, translation([8, 8, 2]))]
    block = (12, 12, 12)
    plans = plan_tiles(crops, block, blend_range_zyx=6.0, blend_border_zyx=0.0)
    assert not any(p.face for p in plans)
    out = _fuse(crops, block, backend, blend_range_zyx=(6.0, 6.0, 6.0))
    o = np.indices(block, dtype=np.float64).reshape(3, -1).T
    wa = cosine_weight(o + 8, a.shape, blend_range_zyx=6.0).reshape(block)
    wb = cosine_weight(o + np.array([8, 8, 2]), b.shape, blend_range_zyx=6.0).reshape(block)
    assert wb.min() < 0.3 and wa.min() == 1.0
    va = a[8:20, 8:20, 8:20]
    vb = b[8:20, 8:20, 2:14]
    np.testing.assert_allclose(out, (wa * va + wb * vb) / (wa + wb), rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_shared_face_is_the_mean_of_the_tiles(backend: str) -> None:
    # Two tiles with the same extent: every face has weight 0 in both, and the
    # result there is their plain mean, as in the "mean" mode.
    rng = np.random.default_rng(8)
    a = rng.uniform(1, 1000, (6, 7, 8)).astype(np.float32)
    b = rng.uniform(1, 1000, (6, 7, 8)).astype(np.float32)
    crops = [_crop(a, np.eye(4)), _crop(b, np.eye(4))]
    out = _fuse(crops, a.shape, backend, blend_range_zyx=(2.0, 2.0, 2.0))
    mean = _fuse(crops, a.shape, backend, blending="mean")
    face = np.ones(a.shape, bool)
    face[1:-1, 1:-1, 1:-1] = False
    np.testing.assert_allclose(out[face], mean[face], rtol=1e-6)
    np.testing.assert_allclose(out[~face], mean[~face], rtol=1e-5)  # equal weights inside


def _face_cases() -> list[tuple[str, list[TileCrop], tuple[int, int, int]]]:
    crops, block, _, _ = _two_tiles()
    holes = _tile_with_holes(np.float32)
    # Without holes where coordinates are a few ulps (or 1e-7) off the voxel
    # centres: there the no-data normalisation divides tiny interpolation
    # weights, which float32 (torch) holds less precisely than float64.
    full = np.abs(holes) + 1
    shear = np.eye(4)
    shear[0, 2] = 0.25  # tile z depends on block x: the plane kernel's general path
    sub_voxel = translation([2.3, 1.6, -9.5])
    return [
        ("two tiles", crops, block),
        ("identity uint16", [_crop(_tile_with_holes(np.uint16), np.eye(4))], holes.shape),
        ("identity float32", [_crop(holes, np.eye(4))], holes.shape),
        ("shear", [_crop(holes, shear)], (7, 9, 11)),
        ("quarter turn", [_crop(full, _rot90((0, 2), full.shape[2]))], (11, 9, 7)),
        ("tiny shift", [_crop(full, translation([1e-7, -1e-7, 1e-7]))], full.shape),
        ("tile and sub-voxel tile", [crops[0], _crop(crops[1].data, sub_voxel)], block),
    ]


@pytest.mark.parametrize("case", range(7))
@pytest.mark.parametrize("interpolation", ["linear", "nearest"])
def test_backends_and_reference_agree_on_faces(case: int, interpolation: str) -> None:
    name, crops, block = _face_cases()[case]
    kw = {"interpolation": interpolation, "blending": "cosine", "blend_range_zyx": (3.0, 4.0, 5.0)}
    a = _fuse(crops, block, "numba", **kw)
    b = _fuse(crops, block, "torch", **kw)
    ref = _reference(crops, block, **kw)  # type: ignore[arg-type]
    np.testing.assert_allclose(a, ref, rtol=1e-5, atol=1e-3, err_msg=name)
    np.testing.assert_allclose(b, ref, rtol=1e-5, atol=1e-3, err_msg=name)
    np.testing.assert_array_equal(a > 0, ref > 0, err_msg=name)
    np.testing.assert_array_equal(b > 0, ref > 0, err_msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("blending", ["mean", "max"])
def test_mean_and_max_keep_faces(backend: str, blending: str) -> None:
    data = _tile_with_holes(np.float32)
    for out_to_tile, expected in (
        (np.eye(4), data),
        (_rot90((0, 2), data.shape[2]), np.rot90(data, 1, (0, 2))),
    ):
        out = _fuse([_crop(data, out_to_tile)], expected.shape, backend, blending=blending)
        has = expected != 0
        np.testing.assert_allclose(out[has], expected[has], rtol=1e-5)


# --- the fuse step: range and border in output voxels ---------------------------


def _planned(name: str, data: np.ndarray, tile_to_output: np.ndarray) -> PlannedTile:
    return PlannedTile(
        name=name,
        setup=0,
        timepoint=0,
        source=register_memory_array(name, data),
        shape_zyx=(int(data.shape[0]), int(data.shape[1]), int(data.shape[2])),
        dtype=str(data.dtype),
        tile_to_output=np.asarray(tile_to_output, dtype=np.float64),
        box_lo=(0.0, 0.0, 0.0),
        box_hi=(0.0, 0.0, 0.0),
    )


def _fuse_step(tiles: list[PlannedTile], hi: tuple[int, int, int], options: FusionOptions):
    plan = SimpleNamespace(tiles=tiles)
    ids = list(range(len(tiles)))
    return _fuse_box(plan, ids, (0, 0, 0), hi, options, _TileCache(), set(), {})  # type: ignore[arg-type]


@pytest.mark.parametrize("z_voxel", [1.0, 2.0])
def test_fuse_step_blend_range_and_border_are_output_voxels(z_voxel: float) -> None:
    # Tile A (value 1) has z voxels ``z_voxel`` output voxels long; tile B
    # (value 2) covers the whole box with weight 1. The fused value
    # (w + 2) / (w + 1) gives A's weight w on each of its planes.
    a = np.ones((40, 8, 8), np.uint16)
    b = np.full((200, 8, 8), 2, np.uint16)
    tiles = [
        _planned(f"faces-a-{z_voxel}", a, scale([z_voxel, 1.0, 1.0])),
        _planned(f"faces-b-{z_voxel}", b, translation([-100, 0, 0])),
    ]
    try:
        planes = np.arange(0, 40 * z_voxel, z_voxel).astype(int)  # A's planes in the output
        # y/x: no ramp (range 0) and no border, so only z shapes A's weight.
        options = FusionOptions(blend_range_zyx=(20.0, 0.0, 0.0), blend_border_zyx=(4, 0, 0))
        out = _fuse_step(tiles, (int(planes[-1]) + 1, 8, 8), options)
        v = out[planes, 4, 4].astype(np.float64)
        w = (2.0 - v) / (v - 1.0)
        # 20 and 4 output voxels are 20 / z_voxel and 4 / z_voxel tile planes.
        k = np.arange(40, dtype=np.float64)
        dist = np.minimum(k, 39 - k) - 4.0 / z_voxel
        expected = np.where(dist <= 0, 0.0, cosine_ramp(dist / (20.0 / z_voxel)))
        np.testing.assert_allclose(w, expected, atol=1e-5)
        if z_voxel == 2.0:
            # half as many tile planes ramp: weight 1 from plane 12 (2 + 10) on
            assert w[11] < 1 - 1e-3 and w[12] == pytest.approx(1.0, abs=1e-6)
            assert w[2] == 0.0 and w[3] > 0.0
    finally:
        for tile in tiles:
            forget_memory_array(tile.name)


def test_fuse_step_single_tile_faces() -> None:
    # A tile at half the output's resolution in z, as the fuse step builds it:
    # its planes land on output planes 0, 2, ..., all faces included.
    data = _tile_with_holes(np.uint16, (6, 9, 10))
    tiles = [_planned("faces-single", data, scale([2.0, 1.0, 1.0]))]
    try:
        out = _fuse_step(tiles, (11, 9, 10), FusionOptions())
        np.testing.assert_allclose(out[::2], data, rtol=1e-6)
        np.testing.assert_array_equal(out[::2] == 0, data == 0)
    finally:
        forget_memory_array("faces-single")


# --- real data: the BIOP MRI stack (27 planes), as BigDataViewer HDF5 ----------


@pytest.mark.skipif(not (MRI / "mri-stack.xml").is_file(), reason="shared real-tiles not present")
@pytest.mark.parametrize("resolution", [[10.0, 1.0, 1.0], None])
def test_mri_stack_single_tile_keeps_its_faces(tmp_path: Path, resolution: list | None) -> None:
    import h5py
    import zarr
    from pipeline import run_pipeline

    with h5py.File(MRI / "mri-stack.h5", "r") as f:
        # legacy BDV int16 holds uint16
        source = f["t00000/s00/0/cells"][:].view(np.uint16)
    assert source.shape == (27, 226, 186)
    output = {"path": str(tmp_path / "fused.ome.zarr"), "dtype": "uint16"}
    if resolution is not None:
        output["resolution"] = resolution
    run_pipeline({"dataset": str(MRI / "mri-stack.xml"), "output": output}, tmp_path)
    fused = zarr.open_array(str(tmp_path / "fused.ome.zarr" / "0"), mode="r")[:]
    if resolution is not None:
        # The tile's own grid: the output is the tile, every voxel of it.
        np.testing.assert_array_equal(fused, source)
        return
    # Default resolution: 1 cm, so tile plane k is output plane 10 k. Every
    # voxel with data is there (one without data may take a neighbour's value:
    # its output plane samples the tile a few ulps off the plane).
    assert fused.shape == (261, 226, 186)
    has = source != 0
    np.testing.assert_array_equal(fused[::10][has], source[has])
    assert fused[0].any() and fused[-1].any() and fused[:, :, 0].any()
