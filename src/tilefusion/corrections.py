"""Per-tile intensity corrections and masks, applied by the fusion kernel.

One :class:`TileCorrection` per tile carries everything that changes a tile's
values or which of its voxels take part in blending. Estimating them (gains,
offsets, flatfields) is :mod:`tilefusion.intensity` and
:mod:`tilefusion.flatfield`; applying them is the kernel's
(:func:`tilefusion.kernel.fuse_block`, through :attr:`TileCrop.correction`).

The corrected value of a tile voxel ``(z, y, x)`` with stored value ``raw`` is::

    ((raw - darkfield[y, x]) / flatfield[y, x]) * gain(z, y, x) + offset(z, y, x)

applied to crop values as they are sampled: the flat and dark fields to each
stored neighbour before interpolation, gain and offset at the sample position
after it (they are smooth, and interpolation is linear, so that is the same
as applying them per neighbour). No corrected copy of a tile is ever made.
Whether a voxel holds data is decided on ``raw`` (and the mask), before any
correction: a voxel with no data stays without data whatever its correction.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = ["IDENTITY", "TileCorrection", "sample_grid"]


def _as_grid(name: str, value: float | ArrayLike) -> float | NDArray[np.float64]:
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim == 0:
        if not np.isfinite(arr):
            raise ValueError(f"{name} must be finite, got {value!r}")
        return float(arr)
    if arr.ndim != 3 or arr.size == 0:
        raise ValueError(f"{name} must be a scalar or a 3D (z, y, x) grid, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite")
    return np.ascontiguousarray(arr)


def _as_field(name: str, value: ArrayLike | None) -> NDArray[np.float32] | None:
    if value is None:
        return None
    arr = np.asarray(value, dtype=np.float32)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2D (y, x) array, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite")
    return np.ascontiguousarray(arr)


@dataclass(frozen=True, eq=False)
class TileCorrection:
    """Intensity corrections and blending mask of one tile, in its own voxels.

    Applied value: ``((raw - darkfield) / flatfield) * gain + offset`` (see the
    module docstring); voxels outside the mask or within ``mask_border_zyx`` of
    an edge hold no data (weight 0 in every blending mode, like a stored 0).

    Attributes
    ----------
    gain, offset : float or ndarray of shape (gz, gy, gx)
        A scalar, or a coarse grid over the whole tile interpolated
        trilinearly: node ``i`` of an axis with ``g`` nodes sits at tile
        coordinate ``i * (size - 1) / (g - 1)`` (``g = 1``: constant along
        that axis), so the corner nodes sit on the corner voxels' centres and
        the grid is clamped beyond them. See :func:`sample_grid`. Defaults 1
        and 0.
    flatfield, darkfield : ndarray of shape (tile y, tile x), optional
        Per-pixel flat and dark fields over the tile's **full** yx extent
        (index ``[y, x]`` in tile voxels), the same for every z plane. ``None``
        is a flatfield of 1 and a darkfield of 0. The flatfield must not be 0.
    mask : ndarray of bool, shape of the tile, optional
        True where the tile's voxels take part in blending (tile voxels, full
        tile). ``None``: every voxel. A neighbour outside the mask counts as
        no data in interpolation, so the tile fades out towards it.
    mask_border_zyx : tuple of 3 floats, optional
        Tile voxels at each edge, per axis, that hold no data for blending (a
        mask given as a border). Unlike ``fusion.blend_border`` it does not
        move the cosine ramp. Default 0.

    Notes
    -----
    The arrays are not copied into the kernel: a fuse step shares one
    :class:`TileCorrection` per tile between all its blocks. Arrays are
    converted on construction (grids to float64, fields to float32), so
    build one per tile, not per block.
    """

    gain: float | NDArray[np.float64] = 1.0
    offset: float | NDArray[np.float64] = 0.0
    flatfield: NDArray[np.float32] | None = None
    darkfield: NDArray[np.float32] | None = None
    mask: NDArray[np.bool_] | None = None
    mask_border_zyx: tuple[float, float, float] = field(default=(0.0, 0.0, 0.0))

    def __post_init__(self) -> None:
        object.__setattr__(self, "gain", _as_grid("gain", self.gain))
        object.__setattr__(self, "offset", _as_grid("offset", self.offset))
        flat = _as_field("flatfield", self.flatfield)
        if flat is not None and np.any(flat == 0):
            raise ValueError("flatfield must not be 0 anywhere")
        object.__setattr__(self, "flatfield", flat)
        object.__setattr__(self, "darkfield", _as_field("darkfield", self.darkfield))
        if self.mask is not None:
            mask = np.asarray(self.mask)
            if mask.ndim != 3 or mask.dtype != np.bool_:
                raise ValueError(f"mask must be a 3D bool array, got {mask.dtype} {mask.shape}")
            object.__setattr__(self, "mask", mask)
        border = np.broadcast_to(np.asarray(self.mask_border_zyx, dtype=np.float64), (3,))
        if np.any(border < 0) or not np.all(np.isfinite(border)):
            raise ValueError(f"mask_border_zyx must be 3 finite numbers >= 0, got {border}")
        object.__setattr__(self, "mask_border_zyx", tuple(float(b) for b in border))

    @property
    def changes_values(self) -> bool:
        """Whether any value is changed (gain, offset, flat or dark field)."""
        return not (
            isinstance(self.gain, float)
            and self.gain == 1.0
            and isinstance(self.offset, float)
            and self.offset == 0.0
            and self.flatfield is None
            and self.darkfield is None
        )

    @property
    def is_identity(self) -> bool:
        """Whether this correction changes nothing at all."""
        return (
            not self.changes_values
            and self.mask is None
            and all(b == 0.0 for b in self.mask_border_zyx)
        )

    def check(self, tile_shape_zyx: tuple[int, int, int], *, name: str = "correction") -> None:
        """Raise ValueError if an array does not fit a tile of ``tile_shape_zyx``."""
        yx = tuple(tile_shape_zyx[1:])
        for label in ("flatfield", "darkfield"):
            arr = getattr(self, label)
            if arr is not None and arr.shape != yx:
                raise ValueError(
                    f"{name}.{label} has shape {arr.shape}, the tile's yx extent is {yx}"
                )
        if self.mask is not None and self.mask.shape != tuple(tile_shape_zyx):
            raise ValueError(
                f"{name}.mask has shape {self.mask.shape}, the tile is {tuple(tile_shape_zyx)}"
            )


IDENTITY = TileCorrection()
"""The correction that changes nothing."""


def sample_grid(
    grid: float | ArrayLike, coords_zyx: ArrayLike, tile_shape_zyx: tuple[int, int, int]
) -> NDArray[np.float64]:
    """Trilinear value of a coarse grid (or a scalar) at tile coordinates.

    Parameters
    ----------
    grid : float or array_like of shape (gz, gy, gx)
        Gain or offset grid of :class:`TileCorrection`.
    coords_zyx : array_like of shape (3, ...)
        Tile voxel coordinates (voxel centres are integers).
    tile_shape_zyx : tuple of 3 ints

    Returns
    -------
    ndarray of float64, shape ``coords_zyx.shape[1:]``
    """
    c = np.asarray(coords_zyx, dtype=np.float64)
    g = np.asarray(grid, dtype=np.float64)
    if g.ndim == 0:
        return np.full(c.shape[1:], float(g))
    idx = []
    frac = []
    for a in range(3):
        n = g.shape[a]
        span = max(int(tile_shape_zyx[a]) - 1, 1)
        u = np.clip(c[a] * ((n - 1) / span), 0.0, n - 1.0) if n > 1 else np.zeros(c.shape[1:])
        i0 = np.minimum(np.floor(u).astype(np.int64), max(n - 2, 0))
        idx.append(i0)
        frac.append(u - i0 if n > 1 else np.zeros(c.shape[1:]))
    out = np.zeros(c.shape[1:])
    for dz in (0, 1):
        wz = frac[0] if dz else 1.0 - frac[0]
        iz = np.minimum(idx[0] + dz, g.shape[0] - 1)
        for dy in (0, 1):
            wy = frac[1] if dy else 1.0 - frac[1]
            iy = np.minimum(idx[1] + dy, g.shape[1] - 1)
            for dx in (0, 1):
                wx = frac[2] if dx else 1.0 - frac[2]
                ix = np.minimum(idx[2] + dx, g.shape[2] - 1)
                out += wz * wy * wx * g[iz, iy, ix]
    return out
