"""Inputs of the fusion kernels, option checks and per-tile geometry.

Both backends receive the same :class:`_TilePlan` list, so what is sampled and
how (bounds, tolerance, border, ramp) is decided once, here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from tilefusion.blend import EDGE_TOLERANCE

__all__ = [
    "BACKENDS",
    "BLEND_CODES",
    "INSIDE_TOLERANCE",
    "INTERPOLATIONS",
    "INTERP_CODES",
    "TileCrop",
    "check_block_shape",
    "check_choice",
    "plan_tiles",
]

INTERPOLATIONS = ("linear", "nearest")
BACKENDS = ("auto", "numba", "torch")

# Integer flags handed to the compiled kernels.
INTERP_CODES = {"linear": 0, "nearest": 1}
BLEND_CODES = {"cosine": 0, "mean": 1, "max": 2}

# Slack on the inclusive tile bounds: corners computed through a rotation land
# a few ulps outside and must still count as inside. The kernels also count
# positions this close inside a face as on it (cosine weight 0).
INSIDE_TOLERANCE = EDGE_TOLERANCE


@dataclass(frozen=True)
class TileCrop:
    """The part of one tile that an output block needs.

    Attributes
    ----------
    data : ndarray
        3D crop of the tile, zyx, any numeric dtype (uint8, uint16, int16,
        float32, ...). Voxels equal to 0 or NaN hold no data.
    out_to_tile : ndarray of shape (4, 4)
        Output-block voxel index (zyx, block-local) to full-tile voxel index.
    crop_offset_zyx : tuple of 3 ints
        Index in the full tile of ``data[0, 0, 0]``.
    tile_shape_zyx : tuple of 3 ints
        Shape of the full tile; sets the tile bounds and the blending ramp.
    blend_range_zyx, blend_border_zyx : tuple of 3 floats, optional
        This tile's cosine ramp width and border in **tile** voxels (see
        :func:`tilefusion.blend.tile_blend_params`); ``None`` takes the values
        given to :func:`tilefusion.kernel.fuse_block`.
    """

    data: np.ndarray
    out_to_tile: np.ndarray
    crop_offset_zyx: tuple[int, int, int]
    tile_shape_zyx: tuple[int, int, int]
    blend_range_zyx: tuple[float, float, float] | None = None
    blend_border_zyx: tuple[float, float, float] | None = None


@dataclass(frozen=True)
class _TilePlan:
    """One tile, checked and reduced to what a kernel needs."""

    data: np.ndarray  # 3D, C-contiguous, native dtype
    affine: NDArray[np.float64]  # 3x4: block index -> full-tile coordinate
    offset: NDArray[np.int64]  # crop offset in the tile
    last: NDArray[np.float64]  # tile size - 1
    lo: NDArray[np.float64]  # inclusive sampling bounds, tolerance included
    hi: NDArray[np.float64]
    border: NDArray[np.float64]
    blend_range: NDArray[np.float64]
    box: tuple[int, int, int, int, int, int]  # z0, z1, y0, y1, x0, x1 in the block
    # The box may reach the tile's face band (cosine weight 0 where the tile
    # has data): only then can the tile feed the cosine fallback. Conservative.
    face: bool = True


def check_choice(name: str, value: object, allowed: Sequence[str]) -> None:
    """Raise ValueError naming the option, the value and the allowed values."""
    if value not in allowed:
        choices = ", ".join(repr(a) for a in allowed)
        raise ValueError(f"unknown {name} {value!r}; expected one of {{{choices}}}")


def _triple(name: str, value: object) -> NDArray[np.float64]:
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim == 0:
        arr = np.full(3, float(arr))
    if arr.shape != (3,) or not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be 3 finite numbers (z, y, x), got {value!r}")
    return arr


def _blend_range(name: str, value: object) -> NDArray[np.float64]:
    rng = _triple(name, value)
    if np.any(rng < 0):
        raise ValueError(f"{name} must be >= 0, got {rng.tolist()}")
    return rng


def check_block_shape(block_shape_zyx: Sequence[int]) -> tuple[int, int, int]:
    """Return the block shape as 3 ints, each >= 1."""
    shape = tuple(int(s) for s in block_shape_zyx)
    if len(shape) != 3 or any(s < 1 for s in shape):
        raise ValueError(f"block_shape_zyx must be 3 positive ints, got {block_shape_zyx!r}")
    return shape[0], shape[1], shape[2]


def _block_box(
    affine4: NDArray[np.float64],
    lo: NDArray[np.float64],
    hi: NDArray[np.float64],
    block: tuple[int, int, int],
) -> tuple[int, int, int, int, int, int]:
    """Block voxels that can map inside ``[lo, hi]``: a conservative box."""
    try:
        tile_to_out = np.linalg.inv(affine4)
    except np.linalg.LinAlgError:
        return 0, block[0], 0, block[1], 0, block[2]
    corners = np.array(
        [[z, y, x, 1.0] for z in (lo[0], hi[0]) for y in (lo[1], hi[1]) for x in (lo[2], hi[2])]
    )
    pts = corners @ tile_to_out.T
    if not np.all(np.isfinite(pts)):
        return 0, block[0], 0, block[1], 0, block[2]
    # One voxel of margin: rounding in the inverse must never drop a voxel that
    # the exact per-voxel test accepts.
    start = np.floor(pts[:, :3].min(axis=0)) - 1
    stop = np.ceil(pts[:, :3].max(axis=0)) + 2
    b = np.asarray(block, dtype=np.float64)
    start = np.clip(start, 0, b).astype(np.int64)
    stop = np.clip(stop, 0, b).astype(np.int64)
    return (
        int(start[0]),
        int(stop[0]),
        int(start[1]),
        int(stop[1]),
        int(start[2]),
        int(stop[2]),
    )


def _reaches_face(
    affine4: NDArray[np.float64],
    box: tuple[int, int, int, int, int, int],
    last: NDArray[np.float64],
    border: NDArray[np.float64],
) -> bool:
    """Whether a voxel of ``box`` may lie within the face band of the tile.

    The band is where the cosine weight is 0: ``dist <= INSIDE_TOLERANCE``
    with ``dist = min(c - border, last - border - c)``. The tile coordinates of
    the box lie within those of its corners (the map is affine); a margin of
    one more tolerance covers rounding.
    """
    corners = np.array(
        [
            [z, y, x, 1.0]
            for z in (box[0], box[1] - 1)
            for y in (box[2], box[3] - 1)
            for x in (box[4], box[5] - 1)
        ]
    )
    pts = corners @ affine4[:3].T
    reach = border + 2 * INSIDE_TOLERANCE
    return bool(
        not np.all(np.isfinite(pts))
        or np.any(pts.min(axis=0) <= reach)
        or np.any(pts.max(axis=0) >= last - reach)
    )


def plan_tiles(
    crops: Sequence[TileCrop],
    block: tuple[int, int, int],
    *,
    blend_range_zyx: object,
    blend_border_zyx: object,
) -> list[_TilePlan]:
    """Check every crop and precompute what the kernels need.

    ``blend_range_zyx`` and ``blend_border_zyx`` (tile voxels) apply to the
    crops that do not carry their own. Tiles that cannot touch the block (or
    have an empty crop) are left out; the order of the others is kept, since
    it fixes the summation order.
    """
    default_rng = _blend_range("blend_range_zyx", blend_range_zyx)
    default_border = _triple("blend_border_zyx", blend_border_zyx)
    plans = []
    for i, crop in enumerate(crops):
        if not isinstance(crop, TileCrop):
            raise TypeError(f"crops[{i}] must be a TileCrop, got {type(crop).__name__}")
        rng = default_rng
        if crop.blend_range_zyx is not None:
            rng = _blend_range(f"crops[{i}].blend_range_zyx", crop.blend_range_zyx)
        border = default_border
        if crop.blend_border_zyx is not None:
            border = _triple(f"crops[{i}].blend_border_zyx", crop.blend_border_zyx)
        data = np.asarray(crop.data)
        if data.ndim != 3:
            raise ValueError(f"crops[{i}].data must be 3D (zyx), got shape {data.shape}")
        if not (np.issubdtype(data.dtype, np.integer) or np.issubdtype(data.dtype, np.floating)):
            raise ValueError(f"crops[{i}].data must be numeric, got dtype {data.dtype}")
        affine4 = np.asarray(crop.out_to_tile, dtype=np.float64)
        if affine4.shape != (4, 4) or not np.all(np.isfinite(affine4)):
            raise ValueError(f"crops[{i}].out_to_tile must be a finite 4x4 affine")
        tile = np.asarray(crop.tile_shape_zyx, dtype=np.int64)
        offset = np.asarray(crop.crop_offset_zyx, dtype=np.int64)
        if tile.shape != (3,) or np.any(tile < 1):
            raise ValueError(f"crops[{i}].tile_shape_zyx must be 3 positive ints")
        if offset.shape != (3,):
            raise ValueError(f"crops[{i}].crop_offset_zyx must be 3 ints")
        if data.size == 0:
            continue
        if not data.dtype.isnative:
            # Neither numba nor torch reads byte-swapped data.
            data = data.astype(data.dtype.newbyteorder("="))
        last = tile.astype(np.float64) - 1.0
        # A negative border (allowed by BigStitcher) cannot extend the tile.
        inset = np.maximum(border, 0.0)
        lo = inset - INSIDE_TOLERANCE
        hi = last - inset + INSIDE_TOLERANCE
        if np.any(lo > hi):
            continue
        box = _block_box(affine4, lo, hi, block)
        if box[0] >= box[1] or box[2] >= box[3] or box[4] >= box[5]:
            continue
        plans.append(
            _TilePlan(
                data=np.ascontiguousarray(data),
                affine=np.ascontiguousarray(affine4[:3, :]),
                offset=offset,
                last=last,
                lo=lo,
                hi=hi,
                border=border,
                blend_range=rng,
                box=box,
                face=_reaches_face(affine4, box, last, border),
            )
        )
    return plans
