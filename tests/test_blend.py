"""BigStitcher's cosine blending weights (numpy reference in tilefusion.blend)."""

from __future__ import annotations

import numpy as np
import pytest

from tilefusion.blend import (
    DEFAULT_BLEND_BORDER,
    DEFAULT_BLEND_RANGE,
    cosine_ramp,
    cosine_weight,
    mask_weight,
    tile_blend_params,
)
from tilefusion.geometry import compose, scale, translation


def _rot_z(theta: float) -> np.ndarray:
    c, s = np.cos(theta), np.sin(theta)
    out = np.eye(4)
    out[1:3, 1:3] = [[c, -s], [s, c]]
    return out


def test_defaults_are_bigstitchers() -> None:
    # FusionTools.defaultBlendingRange / defaultBlendingBorder
    assert DEFAULT_BLEND_RANGE == 40.0
    assert DEFAULT_BLEND_BORDER == 0.0


def test_ramp_shape() -> None:
    r = np.linspace(0.0, 1.0, 101)
    w = cosine_ramp(r)
    assert w[0] == 0.0
    assert w[-1] == pytest.approx(1.0, abs=1e-15)
    assert cosine_ramp(0.5) == pytest.approx(0.5)
    # (cos((1 - r) pi) + 1) / 2 is point-symmetric about r = 0.5 and monotone.
    np.testing.assert_allclose(w + w[::-1], 1.0, atol=1e-12)
    assert np.all(np.diff(w) > 0)
    np.testing.assert_array_equal(cosine_ramp([-1.0, 2.0]), [0.0, 1.0])


def test_weight_is_zero_on_the_outer_voxel_planes() -> None:
    shape = (30, 40, 50)
    interior = [15.0, 20.0, 25.0]
    for axis in range(3):
        for edge in (0.0, shape[axis] - 1.0):
            p = list(interior)
            p[axis] = edge
            assert cosine_weight(p, shape, blend_range_zyx=10) == 0.0
        # just inside the edge the weight is small but positive
        p = list(interior)
        p[axis] = 0.5
        assert 0.0 < cosine_weight(p, shape, blend_range_zyx=10) < 0.01


def test_weight_is_one_deeper_than_the_range() -> None:
    shape = (100, 120, 140)
    zz, yy, xx = np.meshgrid(
        np.arange(40, 60), np.arange(40, 80), np.arange(40, 100), indexing="ij"
    )
    coords = np.stack([zz, yy, xx], axis=-1)
    np.testing.assert_array_equal(cosine_weight(coords, shape, blend_range_zyx=40), 1.0)


def test_weight_value_and_product_over_axes() -> None:
    shape = (100, 100, 100)
    # 10 voxels from the z edge with a range of 40: r = 0.25 on z only.
    expected = (np.cos(0.75 * np.pi) + 1) / 2
    assert cosine_weight([10.0, 50.0, 50.0], shape, blend_range_zyx=40) == pytest.approx(expected)
    # the far edge counts from size - 1: 89 is 10 voxels from 99
    assert cosine_weight([89.0, 50.0, 50.0], shape, blend_range_zyx=40) == pytest.approx(expected)
    # on two axes the weights multiply
    assert cosine_weight([10.0, 89.0, 50.0], shape, blend_range_zyx=40) == pytest.approx(
        expected**2
    )


def test_border_shifts_the_ramp() -> None:
    shape = (100, 100, 100)
    border = (5.0, 0.0, 0.0)
    assert cosine_weight([5.0, 50.0, 50.0], shape, blend_range_zyx=40, blend_border_zyx=border) == 0
    assert cosine_weight([3.0, 50.0, 50.0], shape, blend_range_zyx=40, blend_border_zyx=border) == 0
    shifted = cosine_weight([15.0, 50.0, 50.0], shape, blend_range_zyx=40, blend_border_zyx=border)
    assert shifted == pytest.approx(cosine_weight([10.0, 50.0, 50.0], shape, blend_range_zyx=40))
    # per-axis ranges
    w = cosine_weight([50.0, 50.0, 4.0], shape, blend_range_zyx=(40, 40, 8))
    assert w == pytest.approx(0.5)


def test_zero_range_is_a_hard_edge() -> None:
    shape = (10, 10, 10)
    assert cosine_weight([0.5, 5, 5], shape, blend_range_zyx=0) == 1.0
    assert cosine_weight([0.0, 5, 5], shape, blend_range_zyx=0) == 0.0


def test_negative_range_is_rejected() -> None:
    with pytest.raises(ValueError, match="blend_range_zyx"):
        cosine_weight([1, 1, 1], (5, 5, 5), blend_range_zyx=-1)


def test_mask_weight_inclusive_edges_with_tolerance() -> None:
    shape = (10, 10, 10)
    pts = [[0, 0, 0], [9, 9, 9], [-1e-9, 5, 5], [9 + 1e-9, 5, 5], [-0.01, 5, 5], [9.01, 5, 5]]
    np.testing.assert_array_equal(mask_weight(pts, shape), [1, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(
        mask_weight([[1, 5, 5], [2, 5, 5]], shape, blend_border_zyx=2), [0, 1]
    )


def test_tile_blend_params_divides_by_model_scale() -> None:
    # z voxels twice as long as x/y: 40 output voxels are 20 z planes.
    model = compose(translation([3, -7, 11]), _rot_z(0.3), scale([2.0, 1.0, 0.5]))
    rng, border = tile_blend_params(model, blend_range_zyx=40, blend_border_zyx=(4, 4, 4))
    np.testing.assert_allclose(rng, (20.0, 40.0, 80.0))
    np.testing.assert_allclose(border, (2.0, 4.0, 8.0))


def test_tile_blend_params_rejects_singular() -> None:
    with pytest.raises(ValueError, match="singular"):
        tile_blend_params(np.diag([1.0, 0.0, 1.0, 1.0]))
