"""Affine transforms, transform chains, boxes and the world unit.

Conventions
-----------
Every affine here is a 4x4 homogeneous matrix acting on column vectors of
**zyx** coordinates, the axis order of the arrays. Readers convert at the edge:
BigStitcher stores a row-major 3x4 matrix in **xyz** order
(:func:`affine_from_bdv`).

Integer coordinates are voxel centres: voxel ``(k, j, i)`` of a tile covers the
centre point ``(k, j, i)``; a tile of shape ``s`` spans ``0 .. s - 1`` on each
axis (BigStitcher's convention for bounding boxes).

``compose(a, b, c)`` is the matrix product ``a @ b @ c``: ``c`` is applied first.
A BigStitcher view model ``T0 T1 ... Tn`` (XML order) is ``compose(T0, ..., Tn)``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from tilefusion.errors import InputError

__all__ = [
    "Box",
    "affine_from_bdv",
    "affine_to_bdv",
    "box_corners",
    "check_affine",
    "compose",
    "consensus_world_unit",
    "identity",
    "invert",
    "scale",
    "transform_points",
    "transformed_box",
    "translation",
    "world_unit_of_view",
]

Affine = NDArray[np.float64]

# xyz <-> zyx is the same permutation both ways; indexing (not a matrix
# product) keeps a NaN where it was, so error messages can name it.
_REVERSE_AXES = [2, 1, 0, 3]


def identity() -> Affine:
    """Return the 4x4 identity."""
    return np.eye(4)


def scale(factors_zyx: ArrayLike) -> Affine:
    """Return the affine that multiplies zyx coordinates by ``factors_zyx``."""
    out = np.eye(4)
    out[[0, 1, 2], [0, 1, 2]] = np.asarray(factors_zyx, dtype=np.float64)
    return out


def translation(offset_zyx: ArrayLike) -> Affine:
    """Return the affine that adds ``offset_zyx``."""
    out = np.eye(4)
    out[:3, 3] = np.asarray(offset_zyx, dtype=np.float64)
    return out


def affine_from_bdv(values: Sequence[float]) -> Affine:
    """Convert BigStitcher's 12 numbers (row-major 3x4, xyz) to a 4x4 zyx affine.

    Parameters
    ----------
    values : sequence of 12 floats
        ``m00 m01 m02 m03 m10 ... m23`` of the xyz matrix, as in ``<affine>``.

    Returns
    -------
    ndarray of shape (4, 4)
        The same map acting on zyx coordinates.
    """
    arr = np.asarray(values, dtype=np.float64)
    if arr.shape != (12,):
        raise ValueError(f"an affine has 12 numbers, got {arr.size}")
    xyz = np.eye(4)
    xyz[:3, :] = arr.reshape(3, 4)
    return xyz[np.ix_(_REVERSE_AXES, _REVERSE_AXES)]


def affine_to_bdv(affine: Affine) -> list[float]:
    """Inverse of :func:`affine_from_bdv`: 12 numbers, row-major 3x4, xyz."""
    xyz = np.asarray(affine, dtype=np.float64)[np.ix_(_REVERSE_AXES, _REVERSE_AXES)]
    return [float(v) for v in xyz[:3, :].ravel()]


def compose(*affines: Affine) -> Affine:
    """Matrix product of the affines; the last one is applied first."""
    out = np.eye(4)
    for a in affines:
        out = out @ a
    return out


def check_affine(affine: ArrayLike, *, source: str, field: str) -> Affine:
    """Return ``affine`` as a float 4x4 after checking it is usable.

    Raises
    ------
    InputError
        If it is not 4x4 with a last row ``0 0 0 1``, holds NaN or infinity,
        or is singular (no inverse, so voxels cannot be looked up).
    """
    a = np.asarray(affine, dtype=np.float64)
    if a.shape == (4, 4) and not np.all(np.isfinite(a)):
        raise InputError(source, field, "affine holds NaN or infinity")
    if a.shape != (4, 4) or not np.array_equal(a[3], [0.0, 0.0, 0.0, 1.0]):
        raise InputError(source, field, f"not a 3x4 affine: {a.tolist()}")
    linear = a[:3, :3]
    # Relative test: a voxel-to-world model with tiny voxels is still invertible.
    norm = np.linalg.norm(linear)
    if norm == 0.0 or abs(np.linalg.det(linear)) <= 1e-12 * norm**3:
        raise InputError(source, field, "affine is singular (determinant 0): it has no inverse")
    return a


def invert(affine: Affine) -> Affine:
    """Return the true inverse of an affine (linear part and translation)."""
    a = np.asarray(affine, dtype=np.float64)
    inv_linear = np.linalg.inv(a[:3, :3])
    out = np.eye(4)
    out[:3, :3] = inv_linear
    out[:3, 3] = -inv_linear @ a[:3, 3]
    return out


def transform_points(affine: Affine, points_zyx: ArrayLike) -> NDArray[np.float64]:
    """Apply ``affine`` to an (N, 3) array of zyx points."""
    pts = np.asarray(points_zyx, dtype=np.float64).reshape(-1, 3)
    return pts @ affine[:3, :3].T + affine[:3, 3]


def box_corners(shape_zyx: Sequence[int]) -> NDArray[np.float64]:
    """The 8 voxel-centre corners of an array: 0 and ``size - 1`` on each axis."""
    hi = np.asarray(shape_zyx, dtype=np.float64) - 1.0
    return np.array(
        [[z, y, x] for z in (0.0, hi[0]) for y in (0.0, hi[1]) for x in (0.0, hi[2])],
        dtype=np.float64,
    )


@dataclass(frozen=True)
class Box:
    """An axis-aligned box, bounds inclusive, zyx.

    Attributes
    ----------
    lo, hi : tuple of float
        The smallest and largest coordinate on each axis.
    """

    lo: tuple[float, float, float]
    hi: tuple[float, float, float]

    @classmethod
    def from_points(cls, points_zyx: ArrayLike) -> Box:
        pts = np.asarray(points_zyx, dtype=np.float64).reshape(-1, 3)
        lo = pts.min(axis=0)
        hi = pts.max(axis=0)
        return cls(
            (float(lo[0]), float(lo[1]), float(lo[2])),
            (float(hi[0]), float(hi[1]), float(hi[2])),
        )

    @classmethod
    def union(cls, boxes: Iterable[Box]) -> Box:
        boxes = list(boxes)
        if not boxes:
            raise ValueError("union of no boxes")
        lo = np.min([b.lo for b in boxes], axis=0)
        hi = np.max([b.hi for b in boxes], axis=0)
        return cls.from_points(np.stack([lo, hi]))

    def intersects(self, other: Box) -> bool:
        return all(
            a_lo <= b_hi and b_lo <= a_hi
            for a_lo, a_hi, b_lo, b_hi in zip(self.lo, self.hi, other.lo, other.hi, strict=True)
        )


def transformed_box(affine: Affine, shape_zyx: Sequence[int]) -> Box:
    """Bounding box of an array's voxel-centre corners after ``affine``."""
    return Box.from_points(transform_points(affine, box_corners(shape_zyx)))


def world_unit_of_view(
    model: Affine,
    voxel_size_zyx: Sequence[float],
    *,
    calibration_zyx: Sequence[float] | None = None,
    unit_affine: Affine | None = None,
) -> NDArray[np.float64]:
    """Physical size of one world unit on each axis, as one view implies it.

    A view's model maps voxels to world coordinates, and one voxel step along
    axis ``i`` has physical length ``voxel_size[i]``. The unit is set by the
    calibration, not by the whole model: where the chain holds a BigStitcher
    ``calibration`` transform (a diagonal ``voxel / min(voxel)``), one world
    unit is ``voxel_size / calibration``. Otherwise the chain's last listed
    transform (applied first: the translation to the nominal grid, or a
    manifest's one scale) is its calibration, ``unit_affine``: one world unit
    is ``voxel_size[i] / |column i|`` of it, so a registration affine that
    rescales a tile by 1e-4 stays registration, not a new unit. Without
    ``unit_affine`` the model's columns are used (1 physical unit for MoBIE
    XMLs whose model holds the voxel size, one voxel per axis for XMLs with no
    calibration at all).

    Parameters
    ----------
    model : ndarray of shape (4, 4)
        Voxel (zyx) to world (zyx) map of the view.
    voxel_size_zyx : sequence of 3 floats
        Physical voxel size.
    calibration_zyx : sequence of 3 floats, optional
        Diagonal of the chain's ``calibration`` transform, when it has one.
    unit_affine : ndarray of shape (4, 4), optional
        The chain's last listed affine (see
        :func:`tilefusion.transforms.unit_affine`).

    Returns
    -------
    ndarray of shape (3,)
    """
    voxel = np.asarray(voxel_size_zyx, dtype=np.float64)
    if calibration_zyx is not None:
        steps = np.abs(np.asarray(calibration_zyx, dtype=np.float64))
    elif unit_affine is not None:
        steps = np.linalg.norm(np.asarray(unit_affine)[:3, :3], axis=0)
    else:
        steps = np.linalg.norm(np.asarray(model)[:3, :3], axis=0)
    return voxel / steps


def consensus_world_unit(
    units_zyx: ArrayLike, *, source: str, rtol: float = 0.02
) -> NDArray[np.float64]:
    """Combine per-view world units into one, checking the views agree.

    Registration models scale by a fraction of a percent, so views agree
    within ``rtol``; the median is returned, rounded to 6 significant digits
    so that calibrated datasets give exactly the smallest voxel size.

    Raises
    ------
    InputError
        If views disagree by more than ``rtol`` on some axis.
    """
    units = np.asarray(units_zyx, dtype=np.float64).reshape(-1, 3)
    if not np.all(np.isfinite(units)) or np.any(units <= 0):
        raise InputError(source, "voxelSize", "voxel sizes must be positive and finite")
    median = np.median(units, axis=0)
    spread = np.max(np.abs(units - median) / median, axis=0)
    if np.any(spread > rtol):
        axis = "zyx"[int(np.argmax(spread))]
        raise InputError(
            source,
            "voxelSize",
            f"views imply different world units on axis {axis} "
            f"(spread {spread.max():.1%}); set 'world_unit' in the config",
        )
    return np.array([float(f"{v:.6g}") for v in median])
