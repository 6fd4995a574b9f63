"""Compiled displacement-field evaluation for :mod:`tilefusion.transforms`.

The same trilinear sampling (clamped at the grid's faces) and fixed-point
inverse as the numpy code there, one point per iteration of a parallel
loop, so a block's coordinates cost a few field samples per voxel instead of
a few passes of array temporaries. Imported only for large point sets.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numba import njit, prange
from numpy.typing import NDArray

__all__ = ["displace", "invert_displacement"]


@njit(cache=True, inline="always", error_model="numpy")
def _sample(
    values: NDArray[np.float64],
    o0: float,
    o1: float,
    o2: float,
    s0: float,
    s1: float,
    s2: float,
    p0: float,
    p1: float,
    p2: float,
) -> tuple[float, float, float]:
    n0, n1, n2 = values.shape[0], values.shape[1], values.shape[2]
    g0 = min(max((p0 - o0) / s0, 0.0), n0 - 1.0)
    g1 = min(max((p1 - o1) / s1, 0.0), n1 - 1.0)
    g2 = min(max((p2 - o2) / s2, 0.0), n2 - 1.0)
    b0 = min(math.floor(g0), max(n0 - 2, 0))
    b1 = min(math.floor(g1), max(n1 - 2, 0))
    b2 = min(math.floor(g2), max(n2 - 2, 0))
    t0 = g0 - b0
    t1 = g1 - b1
    t2 = g2 - b2
    d0 = 0.0
    d1 = 0.0
    d2 = 0.0
    for a in range(2):
        i0 = min(b0 + a, n0 - 1)
        w0 = t0 if a else 1.0 - t0
        for b in range(2):
            i1 = min(b1 + b, n1 - 1)
            w1 = t1 if b else 1.0 - t1
            for c in range(2):
                i2 = min(b2 + c, n2 - 1)
                w = w0 * w1 * (t2 if c else 1.0 - t2)
                d0 += w * values[i0, i1, i2, 0]
                d1 += w * values[i0, i1, i2, 1]
                d2 += w * values[i0, i1, i2, 2]
    return d0, d1, d2


@njit(parallel=True, cache=True, error_model="numpy")
def _displace(
    pts: NDArray[np.float64],
    values: NDArray[np.float64],
    origin: NDArray[np.float64],
    spacing: NDArray[np.float64],
    out: NDArray[np.float64],
) -> None:
    o0, o1, o2 = origin[0], origin[1], origin[2]
    s0, s1, s2 = spacing[0], spacing[1], spacing[2]
    for k in prange(pts.shape[0]):
        d = _sample(values, o0, o1, o2, s0, s1, s2, pts[k, 0], pts[k, 1], pts[k, 2])
        out[k, 0] = pts[k, 0] + d[0]
        out[k, 1] = pts[k, 1] + d[1]
        out[k, 2] = pts[k, 2] + d[2]


@njit(parallel=True, cache=True, error_model="numpy")
def _invert(
    pts: NDArray[np.float64],
    values: NDArray[np.float64],
    origin: NDArray[np.float64],
    spacing: NDArray[np.float64],
    tolerance: float,
    iterations: int,
    out: NDArray[np.float64],
    residual: NDArray[np.float64],
) -> None:
    o0, o1, o2 = origin[0], origin[1], origin[2]
    s0, s1, s2 = spacing[0], spacing[1], spacing[2]
    for k in prange(pts.shape[0]):
        p0, p1, p2 = pts[k, 0], pts[k, 1], pts[k, 2]
        d = _sample(values, o0, o1, o2, s0, s1, s2, p0, p1, p2)
        q0, q1, q2 = p0 - d[0], p1 - d[1], p2 - d[2]
        worst = math.inf
        for _ in range(iterations):
            d = _sample(values, o0, o1, o2, s0, s1, s2, q0, q1, q2)
            r0 = q0 + d[0] - p0
            r1 = q1 + d[1] - p1
            r2 = q2 + d[2] - p2
            worst = max(abs(r0), abs(r1), abs(r2))
            if worst <= tolerance:
                break
            q0 -= r0
            q1 -= r1
            q2 -= r2
        out[k, 0] = q0
        out[k, 1] = q1
        out[k, 2] = q2
        residual[k] = worst


def displace(pts: NDArray[np.float64], field: Any) -> NDArray[np.float64]:
    """``p + D(p)`` for an (N, 3) array."""
    out = np.empty_like(pts)
    _displace(np.ascontiguousarray(pts), field.values, field.origin, field.spacing, out)
    return out


def invert_displacement(
    pts: NDArray[np.float64], field: Any, tolerance: float, iterations: int
) -> tuple[NDArray[np.float64], float]:
    """``q`` with ``q + D(q) = p``, and the largest residual left."""
    out = np.empty_like(pts)
    residual = np.empty(len(pts))
    _invert(
        np.ascontiguousarray(pts),
        field.values,
        field.origin,
        field.spacing,
        float(tolerance),
        int(iterations),
        out,
        residual,
    )
    return out, float(residual.max()) if len(residual) else 0.0


@njit(parallel=True, cache=True, error_model="numpy")
def _interpolate(
    values: NDArray[np.float64],
    cz: NDArray[np.int64],
    tz: NDArray[np.float64],
    cy: NDArray[np.int64],
    ty: NDArray[np.float64],
    cx: NDArray[np.int64],
    tx: NDArray[np.float64],
    out: NDArray[np.float64],
) -> None:
    for z in prange(out.shape[1]):
        a = cz[z]
        wz = tz[z]
        for y in range(out.shape[2]):
            b = cy[y]
            wy = ty[y]
            for x in range(out.shape[3]):
                c = cx[x]
                wx = tx[x]
                for d in range(3):
                    v00 = values[d, a, b, c] + wx * (values[d, a, b, c + 1] - values[d, a, b, c])
                    v01 = values[d, a, b + 1, c] + wx * (
                        values[d, a, b + 1, c + 1] - values[d, a, b + 1, c]
                    )
                    v10 = values[d, a + 1, b, c] + wx * (
                        values[d, a + 1, b, c + 1] - values[d, a + 1, b, c]
                    )
                    v11 = values[d, a + 1, b + 1, c] + wx * (
                        values[d, a + 1, b + 1, c + 1] - values[d, a + 1, b + 1, c]
                    )
                    v0 = v00 + wy * (v01 - v00)
                    v1 = v10 + wy * (v11 - v10)
                    out[d, z, y, x] = v0 + wz * (v1 - v0)


def interpolate_lattice(
    values: NDArray[np.float64],
    cells: list[NDArray[np.int64]],
    fractions: list[NDArray[np.float64]],
) -> NDArray[np.float64]:
    """Trilinear interpolation of a ``(3, nz, ny, nx)`` lattice at separable targets.

    ``cells[a]`` and ``fractions[a]`` give, per target index along axis
    ``a``, the lattice cell and the position in it (every axis has at least
    two lattice points).
    """
    out = np.empty((3, len(cells[0]), len(cells[1]), len(cells[2])))
    _interpolate(
        np.ascontiguousarray(values),
        cells[0],
        fractions[0],
        cells[1],
        fractions[1],
        cells[2],
        fractions[2],
        out,
    )
    return out
