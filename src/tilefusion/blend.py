"""Blending weights, as BigStitcher defines them (numpy reference).

The fusion kernels (:mod:`tilefusion.kernel`) evaluate the same formulas per
voxel; the functions here are the readable reference the tests compare them to.

BigStitcher's cosine blending (multiview-reconstruction, classes
``BlendingRealRandomAccess`` and ``fusion.blk.Blending``, used by
``BlkAffineFusion`` with the defaults of ``FusionTools``) works like this:

* Weights live on the **input tile**, in tile voxel coordinates. On each axis
  ``d`` the distance to the nearer edge is measured between voxel centres,
  edges at ``0`` and ``size - 1``, minus the ``border``:
  ``dist = min(c - border, size - 1 - border - c)``.
* ``dist <= 0`` gives weight 0, so with the default border 0 the outermost
  voxel plane of a tile has weight 0.
* With ``r = dist / blending_range``, the axis weight is
  ``(cos((1 - r) * pi) + 1) / 2`` for ``r < 1`` and 1 beyond.
* The weight of the voxel is the product of the three axis weights.
* Defaults (``FusionTools.defaultBlendingRange`` and
  ``defaultBlendingBorder``): range 40, border 0. They are meant in **output**
  voxels: ``FusionTools.adjustBlending`` divides both by the scaling of the
  view's model on each axis (z anisotropy, downsampling, registration scale)
  before the weights are computed on the tile. :func:`tile_blend_params`
  performs that step; the fuse step applies it to every tile, so the config's
  ``fusion.blend_range`` and ``fusion.blend_border`` are in output voxels.

Where tilefusion departs from BigStitcher: **tile faces**. BigStitcher
outputs 0 wherever the weights sum to 0, which with border 0 includes a
tile's outermost voxel planes where no other tile has weight (a single tile
fused at its own resolution loses its first and last plane on every axis).
tilefusion keeps every tile's data there, in two tiers:

1. Where the cosine weights of the tiles sum to more than 0, the voxel is
   BigStitcher's cosine-weighted average, unchanged (overlaps included).
2. Where they sum to 0 but some tiles cover the voxel with data (inside the
   tile less its border, a sample that is not 0 or NaN: :func:`mask_weight`
   1), the voxel is the plain mean of those tiles, i.e. what the ``"mean"``
   mode gives there. These are the tiles on whose face (or border edge) the
   voxel lies, within :data:`EDGE_TOLERANCE` on either side.
3. Elsewhere it is 0.

The two tiers are accumulated apart, exactly; no weight floor is added (an
epsilon weight would change overlaps by rounding). ``"mean"`` and ``"max"``
use :func:`mask_weight`, which includes the faces, so they need no second
tier. Zero and NaN remain "no data" (weight 0) in every mode.

BigStitcher tabulates the cosine (a lookup table with linear interpolation);
we evaluate it, which differs by less than 1e-3. The kernels use the equal
form ``sin(r * pi / 2) ** 2`` (numba: a float64 polynomial, error below
1e-9), which keeps its relative precision for the tiny weights next to an
edge.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "BLENDING_MODES",
    "DEFAULT_BLEND_BORDER",
    "DEFAULT_BLEND_RANGE",
    "EDGE_TOLERANCE",
    "cosine_ramp",
    "cosine_weight",
    "mask_weight",
    "tile_blend_params",
]

BLENDING_MODES = ("cosine", "mean", "max")
"""Ways to combine overlapping tiles: cosine-weighted average, plain average, maximum."""

DEFAULT_BLEND_RANGE = 40.0
"""Width of the cosine ramp in output voxels (BigStitcher ``defaultBlendingRange``)."""

DEFAULT_BLEND_BORDER = 0.0
"""Voxels skipped at each tile edge, in output voxels (``defaultBlendingBorder``)."""

EDGE_TOLERANCE = 1e-6
"""Thickness, in tile voxels, of a tile's face on either side.

A position up to this far outside a tile's edge counts as inside it
(:func:`mask_weight`: corners computed through a rotation land a few ulps
off), and up to this far inside counts as on the face (:func:`cosine_weight`
0), so every position inside a tile has either a cosine weight that float32
sums hold or mask weight 1 on its face. BigStitcher's weight in that inner
band is below ``2.5e-12 / range**2``.
"""


def cosine_ramp(r: ArrayLike) -> NDArray[np.float64]:
    """The ramp from 0 to 1: ``(cos((1 - r) * pi) + 1) / 2``, clipped to ``[0, 1]``.

    Parameters
    ----------
    r : array_like
        Relative distance into the ramp; ``r <= 0`` gives 0 and ``r >= 1`` gives 1.

    Returns
    -------
    ndarray of float64
    """
    rr = np.clip(np.asarray(r, dtype=np.float64), 0.0, 1.0)
    return 0.5 * (np.cos((1.0 - rr) * np.pi) + 1.0)


def _axis_distance(
    coords_zyx: ArrayLike, tile_shape_zyx: Sequence[int], border_zyx: ArrayLike
) -> NDArray[np.float64]:
    c = np.asarray(coords_zyx, dtype=np.float64)
    if c.shape[-1:] != (3,):
        raise ValueError(f"coords_zyx must have a last axis of length 3, got shape {c.shape}")
    last = np.asarray(tile_shape_zyx, dtype=np.float64) - 1.0
    border = np.broadcast_to(np.asarray(border_zyx, dtype=np.float64), (3,))
    return np.minimum(c - border, last - border - c)


def cosine_weight(
    coords_zyx: ArrayLike,
    tile_shape_zyx: Sequence[int],
    *,
    blend_range_zyx: ArrayLike = DEFAULT_BLEND_RANGE,
    blend_border_zyx: ArrayLike = DEFAULT_BLEND_BORDER,
    tolerance: float = EDGE_TOLERANCE,
) -> NDArray[np.float64]:
    """BigStitcher's cosine blending weight at tile coordinates.

    Parameters
    ----------
    coords_zyx : array_like of shape (..., 3)
        Positions in full-tile voxel coordinates (voxel centres are integers).
    tile_shape_zyx : sequence of 3 ints
        Shape of the full tile.
    blend_range_zyx : float or sequence of 3 floats, optional
        Width of the ramp in tile voxels. A range of 0 makes the weight 1
        everywhere inside the border.
    blend_border_zyx : float or sequence of 3 floats, optional
        Tile voxels with weight 0 at each edge, before the ramp starts.
    tolerance : float, optional
        Positions less than this far past ``border`` count as on it (weight 0);
        see :data:`EDGE_TOLERANCE`. 0 is BigStitcher's rule exactly.

    Returns
    -------
    ndarray of float64, shape ``coords_zyx.shape[:-1]``
        Weights in ``[0, 1]``: 0 on and beyond ``border`` from an edge, 1 deeper
        than ``border + range`` on every axis.

    Notes
    -----
    Follows ``BlendingRealRandomAccess.computeWeight`` of multiview-reconstruction
    (see the module docstring), with the cosine evaluated exactly.
    """
    dist = _axis_distance(coords_zyx, tile_shape_zyx, blend_border_zyx)
    rng = np.broadcast_to(np.asarray(blend_range_zyx, dtype=np.float64), (3,))
    if np.any(rng < 0) or not np.all(np.isfinite(rng)):
        raise ValueError(f"blend_range_zyx must be finite and >= 0, got {rng.tolist()}")
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(rng > 0, dist / np.where(rng > 0, rng, 1.0), np.inf)
    per_axis = np.where(dist <= max(float(tolerance), 0.0), 0.0, cosine_ramp(r))
    return np.prod(per_axis, axis=-1)


def mask_weight(
    coords_zyx: ArrayLike,
    tile_shape_zyx: Sequence[int],
    *,
    blend_border_zyx: ArrayLike = DEFAULT_BLEND_BORDER,
    tolerance: float = EDGE_TOLERANCE,
) -> NDArray[np.float64]:
    """1 where a position lies inside the tile less its border, else 0.

    This is the weight of the ``"mean"`` and ``"max"`` modes (BigStitcher's
    ``Masking``). Edges are inclusive, widened by ``tolerance`` so that exact
    corners computed in floating point count as inside.

    Parameters
    ----------
    coords_zyx : array_like of shape (..., 3)
        Positions in full-tile voxel coordinates.
    tile_shape_zyx : sequence of 3 ints
        Shape of the full tile.
    blend_border_zyx : float or sequence of 3 floats, optional
        Tile voxels excluded at each edge; negative values count as 0.
    tolerance : float, optional
        Slack on the inclusive edges (:data:`EDGE_TOLERANCE`).

    Returns
    -------
    ndarray of float64, shape ``coords_zyx.shape[:-1]``
    """
    border = np.maximum(np.asarray(blend_border_zyx, dtype=np.float64), 0.0)
    dist = _axis_distance(coords_zyx, tile_shape_zyx, border)
    return np.all(dist >= -tolerance, axis=-1).astype(np.float64)


def tile_blend_params(
    tile_to_out: ArrayLike,
    *,
    blend_range_zyx: ArrayLike = DEFAULT_BLEND_RANGE,
    blend_border_zyx: ArrayLike = DEFAULT_BLEND_BORDER,
) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Convert a blending range and border from output voxels to tile voxels.

    BigStitcher states both in output voxels and divides them by the scaling of
    each view's model (``FusionTools.adjustBlending``), so that a tile with
    voxels twice as long in z ramps over half as many z planes.

    Parameters
    ----------
    tile_to_out : array_like of shape (4, 4)
        Tile voxel (zyx) to output voxel (zyx) affine.
    blend_range_zyx, blend_border_zyx : float or sequence of 3 floats, optional
        Range and border in output voxels, per tile axis.

    Returns
    -------
    range_zyx, border_zyx : tuple of 3 floats
        The same in tile voxels, for :func:`cosine_weight` and
        :func:`tilefusion.kernel.fuse_block`.

    Notes
    -----
    BigStitcher removes the rotation with a fitted rigid model and reads the
    diagonal; for a model ``rotation @ diag(s)`` that equals the length of
    each column of the linear part, which is what we use.
    """
    a = np.asarray(tile_to_out, dtype=np.float64)
    if a.shape != (4, 4):
        raise ValueError(f"tile_to_out must be 4x4, got shape {a.shape}")
    scale = np.linalg.norm(a[:3, :3], axis=0)
    if np.any(scale <= 0) or not np.all(np.isfinite(scale)):
        raise ValueError("tile_to_out is singular: an axis has zero length")
    rng = np.broadcast_to(np.asarray(blend_range_zyx, dtype=np.float64), (3,)) / scale
    border = np.broadcast_to(np.asarray(blend_border_zyx, dtype=np.float64), (3,)) / scale
    return (
        (float(rng[0]), float(rng[1]), float(rng[2])),
        (float(border[0]), float(border[1]), float(border[2])),
    )
