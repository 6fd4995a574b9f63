"""tilefusion.corrections: the per-tile correction structure and its grids."""

from __future__ import annotations

import numpy as np
import pytest

from tilefusion.corrections import IDENTITY, TileCorrection, sample_grid


def test_identity_changes_nothing() -> None:
    assert IDENTITY.is_identity
    assert not IDENTITY.changes_values
    assert TileCorrection(gain=2.0).changes_values
    assert not TileCorrection(mask_border_zyx=(1, 0, 0)).is_identity


def test_grid_nodes_sit_on_corner_voxels() -> None:
    grid = np.arange(8, dtype=float).reshape(2, 2, 2)
    coords = np.array([[0, 9, 9, 4.5], [0, 0, 19, 9.5], [0, 0, 29, 14.5]], dtype=float)
    got = sample_grid(grid, coords, (10, 20, 30))
    np.testing.assert_allclose(got, [0.0, 4.0, 7.0, 3.5])


def test_grid_is_clamped_and_scalar_broadcasts() -> None:
    grid = np.array([[[1.0, 3.0]]])
    coords = np.array([[5.0, 5.0], [0.0, 0.0], [-4.0, 40.0]])
    np.testing.assert_allclose(sample_grid(grid, coords, (10, 10, 11)), [1.0, 3.0])
    np.testing.assert_allclose(sample_grid(2.5, coords, (10, 10, 11)), [2.5, 2.5])


def test_bad_corrections_are_named() -> None:
    with pytest.raises(ValueError, match="flatfield must not be 0"):
        TileCorrection(flatfield=np.zeros((2, 2)))
    with pytest.raises(ValueError, match="gain must be a scalar or a 3D"):
        TileCorrection(gain=np.ones((2, 2)))
    with pytest.raises(ValueError, match="mask must be a 3D bool"):
        TileCorrection(mask=np.ones((2, 2, 2), dtype=np.uint8))
    with pytest.raises(ValueError, match="darkfield has shape"):
        TileCorrection(darkfield=np.zeros((3, 3))).check((4, 4, 4))
