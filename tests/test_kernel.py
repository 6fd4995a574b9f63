"""Behaviour of tilefusion.kernel.fuse_block on both backends."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from tilefusion.blend import cosine_weight, mask_weight
from tilefusion.geometry import compose, translation
from tilefusion.kernel import TileCrop, fuse_block, select_device

BACKENDS = ["numba", "torch"]
DTYPES = [np.uint16, np.float32]
BLENDINGS = ["cosine", "mean", "max"]
INTERPOLATIONS = ["linear", "nearest"]


def _rot(theta: float, axes: tuple[int, int] = (1, 2)) -> np.ndarray:
    """Rotation by ``theta`` in the plane of two zyx axes."""
    c, s = np.cos(theta), np.sin(theta)
    out = np.eye(4)
    i, j = axes
    out[i, i], out[i, j], out[j, i], out[j, j] = c, -s, s, c
    return out


def _about_centre(rotation: np.ndarray, centre: np.ndarray) -> np.ndarray:
    return compose(translation(centre), rotation, translation(-np.asarray(centre)))


def _crop(data: np.ndarray, out_to_tile: np.ndarray) -> TileCrop:
    shape = (int(data.shape[0]), int(data.shape[1]), int(data.shape[2]))
    return TileCrop(data, np.asarray(out_to_tile, dtype=np.float64), (0, 0, 0), shape)


def _fuse(
    crops: list[TileCrop], shape: tuple[int, int, int], backend: str, **kw: object
) -> np.ndarray:
    return fuse_block(crops, shape, backend=backend, device="cpu", **kw)  # type: ignore[arg-type]


def _reference(
    crops: list[TileCrop],
    block: tuple[int, int, int],
    *,
    interpolation: str,
    blending: str,
    blend_range_zyx: tuple[float, float, float] = (40.0, 40.0, 40.0),
    blend_border_zyx: tuple[float, float, float] = (0.0, 0.0, 0.0),
) -> np.ndarray:
    """Slow float64 restatement of fuse_block's documented semantics.

    Cosine: the weighted average where some tile has cosine weight, else the
    plain mean of the tiles with data there (their faces), else 0.
    """
    o = np.indices(block, dtype=np.float64).reshape(3, -1).T
    num = np.zeros(len(o))
    den = np.zeros(len(o))
    num2 = np.zeros(len(o))
    den2 = np.zeros(len(o))
    best = np.full(len(o), -np.inf)
    for crop in crops:
        a = crop.out_to_tile
        c = o @ a[:3, :3].T + a[:3, 3]
        last = np.asarray(crop.tile_shape_zyx, dtype=np.float64) - 1
        inside = mask_weight(c, crop.tile_shape_zyx, blend_border_zyx=blend_border_zyx) > 0
        s = np.clip(c, 0, last)
        data = crop.data.astype(np.float64)
        off = np.asarray(crop.crop_offset_zyx)
        hi = np.asarray(data.shape) - 1
        if interpolation == "linear":
            f = np.floor(s)
            t = s - f
            i = f.astype(np.int64) - off
            sw = np.zeros(len(o))
            swv = np.zeros(len(o))
            for corner in np.ndindex(2, 2, 2):
                k = np.clip(i + np.asarray(corner), 0, hi)
                w = np.prod(np.where(np.asarray(corner) == 1, t, 1 - t), axis=1)
                v = data[k[:, 0], k[:, 1], k[:, 2]]
                ok = (v != 0) & ~np.isnan(v)
                sw += np.where(ok, w, 0)
                swv += np.where(ok, w * np.nan_to_num(v), 0)
        else:
            k = np.clip(np.floor(s + 0.5).astype(np.int64) - off, 0, hi)
            v = data[k[:, 0], k[:, 1], k[:, 2]]
            ok = (v != 0) & ~np.isnan(v)
            sw = ok.astype(np.float64)
            swv = np.where(ok, np.nan_to_num(v), 0)
        has = inside & (sw > 0)
        if blending == "max":
            best = np.where(has, np.maximum(best, swv / np.where(has, sw, 1)), best)
            continue
        wt = np.ones(len(o))
        if blending == "cosine":
            wt = cosine_weight(
                c,
                crop.tile_shape_zyx,
                blend_range_zyx=blend_range_zyx,
                blend_border_zyx=blend_border_zyx,
            )
            face = has & (wt <= 0)
            num2 += np.where(face, swv, 0)
            den2 += np.where(face, sw, 0)
        num += np.where(has, wt * swv, 0)
        den += np.where(has, wt * sw, 0)
    if blending == "max":
        out = np.where(np.isfinite(best), best, 0)
    else:
        out = np.divide(num2, den2, out=np.zeros_like(num2), where=den2 > 0)
        out = np.divide(num, den, out=out, where=den > 0)
    return out.reshape(block)


def _random_tile(rng: np.random.Generator, shape: tuple[int, int, int], dtype: type) -> np.ndarray:
    return rng.uniform(1, 1000, shape).astype(dtype)


# --- geometry -------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
def test_identity_reproduces_the_tile(backend: str, dtype: type, interpolation: str) -> None:
    data = _random_tile(np.random.default_rng(1), (6, 7, 8), dtype)
    crop = _crop(data, np.eye(4))
    for blending in ("mean", "max"):
        out = _fuse([crop], data.shape, backend, interpolation=interpolation, blending=blending)
        assert out.dtype == np.float32
        np.testing.assert_array_equal(out, data.astype(np.float32))
    # Cosine: BigStitcher's weight is 0 on the outermost voxel planes; there
    # no other tile has weight, so the tile's own values fill them.
    out = _fuse([crop], data.shape, backend, interpolation=interpolation, blend_range_zyx=(3,) * 3)
    np.testing.assert_allclose(out, data, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
def test_integer_translation(backend: str, dtype: type, interpolation: str) -> None:
    data = _random_tile(np.random.default_rng(2), (5, 6, 7), dtype)
    shift = np.array([2, -1, 3])  # block index + shift = tile index
    out = _fuse(
        [_crop(data, translation(shift))],
        (8, 8, 12),
        backend,
        interpolation=interpolation,
        blending="mean",
    )
    expected = np.zeros((8, 8, 12), np.float32)
    expected[0:3, 1:7, 0:4] = data[2:5, 0:6, 3:7]
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_half_voxel_shift_averages_neighbours(backend: str, dtype: type) -> None:
    data = _random_tile(np.random.default_rng(3), (4, 5, 6), dtype)
    out = _fuse(
        [_crop(data, translation([0, 0, 0.5]))],
        data.shape,
        backend,
        interpolation="linear",
        blending="mean",
    )
    d = data.astype(np.float64)
    np.testing.assert_allclose(out[:, :, :5], (d[:, :, :-1] + d[:, :, 1:]) / 2, rtol=1e-6)
    assert np.all(out[:, :, 5] == 0)  # x = 5.5 lies beyond the last voxel centre
    # nearest: halves round up
    out = _fuse(
        [_crop(data, translation([0, 0, 0.5]))],
        data.shape,
        backend,
        interpolation="nearest",
        blending="mean",
    )
    np.testing.assert_array_equal(out[:, :, :5], data[:, :, 1:])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
def test_bright_voxel_through_rot90(backend: str, interpolation: str) -> None:
    tile = np.ones((3, 5, 7), np.float32)
    tile[1, 1, 5] = 100.0
    # Block (z, y, x) samples the tile at (z, x, 6 - y): np.rot90 in the yx plane,
    # written as a numeric rotation so that cos(pi/2) is not exactly 0.
    out_to_tile = compose(translation([0, 0, 6]), _rot(-np.pi / 2))
    out = _fuse(
        [_crop(tile, out_to_tile)], (3, 7, 5), backend, interpolation=interpolation, blending="mean"
    )
    expected = np.rot90(tile, k=1, axes=(1, 2))
    assert expected.shape == (3, 7, 5)
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    assert np.unravel_index(np.argmax(out), out.shape) == (1, 1, 1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_crop_offset_matches_full_tile(backend: str) -> None:
    data = _random_tile(np.random.default_rng(4), (20, 22, 24), np.uint16)
    out_to_tile = _about_centre(_rot(0.2), np.array([10.0, 11.0, 12.0]))
    out_to_tile = compose(translation([4, 5, 6]), out_to_tile)
    block = (8, 9, 10)
    full = _fuse([_crop(data, out_to_tile)], block, backend)
    # The crop holds every voxel the block samples, plus the upper neighbours.
    corners = np.array([[z, y, x, 1] for z in (0, 7) for y in (0, 8) for x in (0, 9)])
    pts = corners @ out_to_tile.T
    lo = np.maximum(np.floor(pts[:, :3].min(0)).astype(int), 0)
    hi = np.minimum(np.floor(pts[:, :3].max(0)).astype(int) + 2, data.shape)
    sub = data[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    assert sub.size < data.size / 4
    crop = TileCrop(sub, out_to_tile, (int(lo[0]), int(lo[1]), int(lo[2])), (20, 22, 24))
    np.testing.assert_array_equal(_fuse([crop], block, backend), full)


# --- blending -------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
@pytest.mark.parametrize("blending", BLENDINGS)
def test_constant_tiles_blend_to_the_constant(
    backend: str, dtype: type, interpolation: str, blending: str
) -> None:
    shape = (14, 18, 22)
    a = _about_centre(_rot(0.25) @ _rot(0.1, (0, 1)), np.array([7.0, 9.0, 11.0]))
    b = compose(translation([-3, 6, -8]), _about_centre(_rot(-0.3), np.array([7.0, 9.0, 11.0])))
    crops = [_crop(np.full(shape, 7, dtype), m) for m in (a, b)]
    block = (20, 24, 30)
    out = _fuse(
        crops,
        block,
        backend,
        interpolation=interpolation,
        blending=blending,
        blend_range_zyx=(4.0, 5.0, 6.0),
    )
    ref = _reference(
        crops,
        block,
        interpolation=interpolation,
        blending=blending,
        blend_range_zyx=(4.0, 5.0, 6.0),
    )
    covered = ref > 0  # where some tile has weight (cosine: > 0 off the outer faces)
    assert 0.2 < covered.mean() < 0.95
    np.testing.assert_allclose(out[covered], 7.0, rtol=1e-6)
    assert np.all(out[~covered] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
@pytest.mark.parametrize("blending", BLENDINGS)
@pytest.mark.parametrize("nodata", [0.0, np.nan])
def test_zero_and_nan_are_no_data(
    backend: str, interpolation: str, blending: str, nodata: float
) -> None:
    shape = (16, 12, 12)
    a = np.full(shape, 10.0, np.float32)
    a[6:11] = nodata  # a slab without data in tile A
    b = np.full(shape, 20.0, np.float32)
    shift = translation([0.5, 0.3, 0.5])  # sub-voxel: linear mixes neighbours
    out = _fuse(
        [_crop(a, shift), _crop(b, shift)],
        (15, 11, 11),
        backend,
        interpolation=interpolation,
        blending=blending,
        blend_range_zyx=(3.0,) * 3,
    )
    assert not np.any(np.isnan(out))
    inner = out[6:10, 2:-2, 2:-2]  # samples z + 0.5 in 6.5 .. 9.5: only tile B
    np.testing.assert_allclose(inner, 20.0, rtol=1e-6)
    outer = out[1:5, 2:-2, 2:-2]  # both tiles have data
    if blending == "max":
        np.testing.assert_allclose(out[1:-1, 1:-1, 1:-1], 20.0, rtol=1e-6)
        return
    np.testing.assert_allclose(outer, 15.0, rtol=1e-6)
    # z = 5.5 lies between A's last plane with data and the slab: A keeps its
    # value 10 with half its weight (equal blend weights): (0.5 * 10 + 20) / 1.5.
    edge = out[5, 2:-2, 2:-2]
    expected = 20.0 if interpolation == "nearest" else 50.0 / 3.0
    np.testing.assert_allclose(edge, expected, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_data_edge_keeps_its_value(backend: str) -> None:
    # One tile: values next to a hole keep their value under linear
    # interpolation (normalised over the neighbours with data).
    data = np.full((6, 6, 6), 10, np.uint16)
    data[:, :, 3:] = 0
    out = _fuse(
        [_crop(data, translation([0, 0, 0.5]))],
        (6, 6, 6),
        backend,
        interpolation="linear",
        blending="mean",
    )
    np.testing.assert_array_equal(out[:, :, :3], 10.0)  # x = 2.5 mixes 10 and "no data"
    np.testing.assert_array_equal(out[:, :, 3:], 0.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_max_and_mean(backend: str, dtype: type) -> None:
    rng = np.random.default_rng(5)
    a = _random_tile(rng, (5, 6, 7), dtype)
    b = _random_tile(rng, (5, 6, 7), dtype)
    crops = [_crop(a, np.eye(4)), _crop(b, np.eye(4))]
    fa, fb = a.astype(np.float64), b.astype(np.float64)
    out = _fuse(crops, a.shape, backend, blending="max")
    np.testing.assert_array_equal(out, np.maximum(fa, fb).astype(np.float32))
    out = _fuse(crops, a.shape, backend, blending="mean")
    np.testing.assert_allclose(out, (fa + fb) / 2, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cosine_weights_match_reference(backend: str) -> None:
    # Two constant tiles 1 and 2 offset along x: the fused value is
    # (w1 + 2 w2) / (w1 + w2) with the weights of tilefusion.blend.
    shape = (12, 14, 41)
    crops = [
        _crop(np.full(shape, 1, np.uint16), np.eye(4)),
        _crop(np.full(shape, 2, np.uint16), translation([0, 0, -20])),
    ]
    block = (12, 14, 61)
    rng = (4.0, 5.0, 15.0)
    out = _fuse(crops, block, backend, blend_range_zyx=rng)
    o = np.indices(block, dtype=np.float64).reshape(3, -1).T
    w1 = cosine_weight(o, shape, blend_range_zyx=rng)
    w2 = cosine_weight(o - [0, 0, 20], shape, blend_range_zyx=rng)
    total = w1 + w2
    # Where both weights are 0 (the tiles' outer faces) the tiles that cover
    # the voxel give their plain mean.
    m1 = mask_weight(o, shape)
    m2 = mask_weight(o - [0, 0, 20], shape)
    covered = m1 + m2
    expected = np.divide(m1 + 2 * m2, covered, out=np.zeros_like(covered), where=covered > 0)
    expected = np.divide(w1 + 2 * w2, total, out=expected, where=total > 0)
    assert np.all(covered > 0)  # the two tiles span the block
    np.testing.assert_allclose(out.ravel(), expected, rtol=1e-5, atol=1e-6)
    # in the overlap centre, deep inside both tiles on y and z, weights are equal
    assert out[6, 7, 30] == pytest.approx(1.5, rel=1e-5)
    # interior of tile 1 only, beyond the ramps: weight 1, value 1
    assert out[6, 7, 17] == pytest.approx(1.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cosine_border_and_range(backend: str) -> None:
    shape = (10, 10, 30)
    crop = _crop(np.full(shape, 5, np.float32), np.eye(4))
    other = _crop(np.full(shape, 1, np.float32), np.eye(4))
    border = (0.0, 0.0, 3.0)
    out = _fuse(
        [crop, other], shape, backend, blend_range_zyx=(2.0, 2.0, 4.0), blend_border_zyx=border
    )
    ref = _reference(
        [crop, other],
        shape,
        interpolation="linear",
        blending="cosine",
        blend_range_zyx=(2.0, 2.0, 4.0),
        blend_border_zyx=border,
    )
    np.testing.assert_allclose(out, ref, rtol=1e-6)
    assert np.all(out[:, :, :3] == 0) and np.all(out[:, :, -3:] == 0)
    # On the border plane (x = 3, x = 26) both tiles have weight 0 but data:
    # their plain mean, as everywhere else with these two constant tiles.
    np.testing.assert_allclose(out[:, :, 3:-3], 3.0, rtol=1e-6)


# --- backends -------------------------------------------------------------------


def _three_rotated_tiles(dtype: type) -> tuple[list[TileCrop], tuple[int, int, int]]:
    rng = np.random.default_rng(6)
    shape = (18, 20, 24)
    centre = np.array([9.0, 10.0, 12.0])
    crops = []
    for k in range(3):
        data = _random_tile(rng, shape, dtype)
        data[rng.random(shape) < 0.05] = 0  # scattered voxels without data
        if np.issubdtype(dtype, np.floating):
            data[rng.random(shape) < 0.03] = np.nan
        m = compose(
            translation([k * 1.7 - 2, 5.3 - 4 * k, 7.1 * k - 6]),
            _about_centre(_rot(0.2 * k - 0.15) @ _rot(0.07 * k, (0, 2)), centre),
        )
        crops.append(_crop(data, m))
    return crops, (20, 22, 26)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
@pytest.mark.parametrize("blending", BLENDINGS)
def test_backends_agree_with_reference(dtype: type, interpolation: str, blending: str) -> None:
    crops, block = _three_rotated_tiles(dtype)
    kw = {"interpolation": interpolation, "blending": blending, "blend_range_zyx": (5.0, 6.0, 7.0)}
    a = _fuse(crops, block, "numba", **kw)
    b = _fuse(crops, block, "torch", **kw)
    ref = _reference(crops, block, **kw)  # type: ignore[arg-type]
    assert (ref > 0).mean() > 0.3
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(a, ref, rtol=1e-5, atol=1e-3)
    np.testing.assert_array_equal(a > 0, b > 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_result_does_not_depend_on_threads(backend: str) -> None:
    crops, block = _three_rotated_tiles(np.uint16)
    one = _fuse(crops, block, backend, threads=1)
    two = _fuse(crops, block, backend, threads=2)
    np.testing.assert_array_equal(one, two)


def test_no_tiles_and_far_tiles_give_zeros() -> None:
    assert np.all(fuse_block([], (3, 4, 5), backend="numba") == 0)
    far = _crop(np.ones((4, 4, 4), np.uint16), translation([100, 0, 0]))
    for backend in BACKENDS:
        out = _fuse([far], (3, 4, 5), backend)
        assert out.shape == (3, 4, 5) and np.all(out == 0)


# --- options --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "value", "allowed"),
    [
        ("blending", "median", "'cosine', 'mean', 'max'"),
        ("interpolation", "cubic", "'linear', 'nearest'"),
        ("backend", "cupy", "'auto', 'numba', 'torch'"),
    ],
)
def test_unknown_option_is_named(option: str, value: str, allowed: str) -> None:
    crop = _crop(np.ones((2, 2, 2), np.uint16), np.eye(4))
    with pytest.raises(ValueError, match=f"unknown {option} '{value}'.*{allowed}"):
        fuse_block([crop], (2, 2, 2), **{option: value})  # type: ignore[arg-type]


def test_bad_inputs() -> None:
    crop = _crop(np.ones((2, 2, 2), np.uint16), np.eye(4))
    with pytest.raises(ValueError, match="block_shape_zyx"):
        fuse_block([crop], (2, 0, 2))
    flat = TileCrop(np.ones((2, 2), np.uint16), np.eye(4), (0, 0, 0), (2, 2, 2))
    with pytest.raises(ValueError, match="3D"):
        fuse_block([flat], (2, 2, 2))
    skew = TileCrop(np.ones((2, 2, 2), np.uint16), np.eye(3), (0, 0, 0), (2, 2, 2))
    with pytest.raises(ValueError, match="out_to_tile"):
        fuse_block([skew], (2, 2, 2))
    with pytest.raises(ValueError, match="blend_range_zyx"):
        fuse_block([crop], (2, 2, 2), blend_range_zyx=(1.0, -1.0, 1.0))
    with pytest.raises(ValueError, match="threads"):
        fuse_block([crop], (2, 2, 2), threads=0)


def test_numba_refuses_cuda() -> None:
    with pytest.raises(ValueError, match="CPU only"):
        fuse_block([], (1, 1, 1), backend="numba", device="cuda")


def test_select_device() -> None:
    import torch

    assert select_device("cpu") == "cpu"
    with pytest.raises(ValueError, match="unknown device"):
        select_device("tpu")
    if torch.cuda.is_available():
        assert select_device(None).startswith("cuda:")
        assert select_device("cuda:0") == "cuda:0"
    else:
        assert select_device(None) == "cpu"
        with pytest.warns(UserWarning, match="CUDA is not available"):
            assert select_device("cuda:1") == "cpu"
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert fuse_block([], (1, 1, 1)).shape == (1, 1, 1)


def test_warm_up_loads_the_kernel_in_the_background():
    from tilefusion.kernel import warm_up_in_background

    thread = warm_up_in_background("uint16")
    thread.join(timeout=600)
    assert not thread.is_alive()
