"""CPU fusion kernel, compiled with numba.

One call per tile accumulates that tile into two block-sized float32 arrays,
``num`` and ``den``; tiles are added in order and each output voxel is written
by one thread only, so the result does not depend on the thread count.

With cosine blending a sample of cosine weight 0 (on a tile's outer face,
:mod:`tilefusion.blend`) is kept for the fallback tier, the plain mean where
no tile has weight, in the same arrays: while a voxel has no weighted sample
its ``den`` holds minus the fallback's weight sum (``num`` its value sum);
the first weighted sample resets both to 0 and the fallback is dropped, so
the weighted sums are the same as without it. The output divides by
``|den|``. Only blocks that some tile's face band may reach
(``_TilePlan.face``) run these steps (``faces``). The
crop is read in its own dtype (numba compiles one kernel per dtype) and
coordinates are computed per row from the affine, never stored as a grid.

Linear sampling under an affine whose tile y and x do not depend on the
block's z (rotations about z, any z scaling: the usual light-sheet case)
interpolates each crop plane bilinearly once per block column and then only
linearly in z (:func:`_plane_row`); other affines sample the 8 neighbours per
voxel (:func:`_rows`). Both give the same samples up to float rounding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numba
import numpy as np
from numba import njit, prange
from numpy.typing import NDArray

from tilefusion import geometry
from tilefusion.kernel._types import BLEND_CODES, INSIDE_TOLERANCE, INTERP_CODES, _TilePlan

__all__ = ["fuse_numba", "warm_up"]

_LINEAR = INTERP_CODES["linear"]
_COSINE = BLEND_CODES["cosine"]
_MAX = BLEND_CODES["max"]
# Within this distance inside a face the cosine weight is 0 (blend.EDGE_TOLERANCE).
_FACE = INSIDE_TOLERANCE


# Taylor coefficients of sin(x) / x in x^2, up to x^12: for 0 <= x <= pi / 2
# the relative error is below 1e-9, finer than float32's sin.
_S1 = -1.0 / 6.0
_S2 = 1.0 / 120.0
_S3 = -1.0 / 5040.0
_S4 = 1.0 / 362880.0
_S5 = -1.0 / 39916800.0
_S6 = 1.0 / 6227020800.0


@njit(cache=True, inline="always", error_model="numpy")
def _axis_weight(c: float, last: float, border: float, rng: float) -> float:
    """BlendingRealRandomAccess.computeWeight, one axis."""
    return _ramp_weight(c, last, border, rng, (0.5 * math.pi) / rng if rng > 0.0 else 0.0)


@njit(cache=True, inline="always", error_model="numpy")
def _ramp_weight(c: float, last: float, border: float, rng: float, scale: float) -> float:
    # (cos((1 - r) pi) + 1) / 2 with r = dist / rng equals sin(r pi / 2)^2,
    # which keeps its relative precision near r = 0; sin is a polynomial here
    # (a call to sin costs more than the rest). ``scale`` is pi / 2 / rng.
    dist = min(c - border, last - border - c)
    if dist <= _FACE:
        return 0.0
    if rng <= 0.0 or dist >= rng:
        return 1.0
    x = dist * scale
    x2 = x * x
    h = x * (1.0 + x2 * (_S1 + x2 * (_S2 + x2 * (_S3 + x2 * (_S4 + x2 * (_S5 + x2 * _S6))))))
    return h * h


@njit(cache=True, inline="always", error_model="numpy")
def _x_range(base: float, step: float, lo: float, hi: float, x0: int, x1: int) -> tuple[int, int]:
    """Columns ``x`` in ``[x0, x1)`` where ``base + step * x`` may lie in ``[lo, hi]``.

    Conservative by one column; the exact test runs per voxel.
    """
    if abs(step) < 1e-12:
        # Nearly constant along the row: test its two ends instead of dividing.
        first = base + step * x0
        final = base + step * (x1 - 1)
        if max(first, final) < lo or min(first, final) > hi:
            return x0, x0
        return x0, x1
    a = (lo - base) / step
    b = (hi - base) / step
    if a > b:
        a, b = b, a
    start = max(x0, math.floor(a) - 1)
    stop = min(x1, math.ceil(b) + 2)
    if stop < start:
        stop = start
    return start, stop


# The helpers below take scalars only: an array argument costs an atomic
# reference count update per call, even when inlined, which in the voxel loop
# cost more than the interpolation itself.


@njit(cache=True, inline="always", error_model="numpy")
def _tap(v: float, w: float) -> tuple[float, float]:
    """Weight and weighted value of one neighbour; 0 and NaN hold no data."""
    ok = (v != 0.0) & (v == v)
    return (w if ok else 0.0), (w * v if ok else 0.0)


@njit(cache=True, inline="always", error_model="numpy")
def _trilinear_taps(
    r000: float,
    r001: float,
    r010: float,
    r011: float,
    r100: float,
    r101: float,
    r110: float,
    r111: float,
    t0: float,
    t1: float,
    t2: float,
) -> tuple[float, float]:
    """Sum of interpolation weights with data, and of weight times value.

    The ``r`` are the neighbours in the crop's dtype: integers are tested
    for 0 before they are converted.
    """
    v000 = float(r000)
    v001 = float(r001)
    v010 = float(r010)
    v011 = float(r011)
    v100 = float(r100)
    v101 = float(r101)
    v110 = float(r110)
    v111 = float(r111)
    if (
        (r000 != 0)
        & (r001 != 0)
        & (r010 != 0)
        & (r011 != 0)
        & (r100 != 0)
        & (r101 != 0)
        & (r110 != 0)
        & (r111 != 0)
    ):
        # Every neighbour has data (or is NaN: caught below): three nested
        # linear interpolations, weights summing to 1.
        c00 = v000 + t2 * (v001 - v000)
        c01 = v010 + t2 * (v011 - v010)
        c10 = v100 + t2 * (v101 - v100)
        c11 = v110 + t2 * (v111 - v110)
        c0 = c00 + t1 * (c01 - c00)
        c1 = c10 + t1 * (c11 - c10)
        v = c0 + t0 * (c1 - c0)
        if v == v:
            return 1.0, v
    u0 = 1.0 - t0
    u1 = 1.0 - t1
    u2 = 1.0 - t2
    sw = 0.0
    swv = 0.0
    w, wv = _tap(v000, u0 * u1 * u2)
    sw += w
    swv += wv
    w, wv = _tap(v001, u0 * u1 * t2)
    sw += w
    swv += wv
    w, wv = _tap(v010, u0 * t1 * u2)
    sw += w
    swv += wv
    w, wv = _tap(v011, u0 * t1 * t2)
    sw += w
    swv += wv
    w, wv = _tap(v100, t0 * u1 * u2)
    sw += w
    swv += wv
    w, wv = _tap(v101, t0 * u1 * t2)
    sw += w
    swv += wv
    w, wv = _tap(v110, t0 * t1 * u2)
    sw += w
    swv += wv
    w, wv = _tap(v111, t0 * t1 * t2)
    sw += w
    swv += wv
    return sw, swv


@njit(cache=True, inline="always", error_model="numpy")
def _in_box(
    c0: float,
    c1: float,
    c2: float,
    lo0: float,
    lo1: float,
    lo2: float,
    hi0: float,
    hi1: float,
    hi2: float,
) -> bool:
    """``lo <= c <= hi`` on every axis."""
    return (lo0 <= c0 <= hi0) and (lo1 <= c1 <= hi1) and (lo2 <= c2 <= hi2)


@njit(cache=True, inline="always", error_model="numpy")
def _rows(
    data: np.ndarray,
    aff: np.ndarray,
    offset: np.ndarray,
    last: np.ndarray,
    lo: np.ndarray,
    hi: np.ndarray,
    border: np.ndarray,
    rng: np.ndarray,
    z: int,
    y0: int,
    y1: int,
    x0: int,
    x1: int,
    interp: int,
    blend: int,
    faces: bool,
    num: np.ndarray,
    den: np.ndarray,
) -> None:
    """Accumulate one tile into the rows ``y0 .. y1 - 1`` of plane ``z``.

    Along a row each coordinate is monotonic in ``x`` (also after rounding),
    so the columns inside the tile form one interval, found from the affine
    and trimmed with the exact test; so do the columns whose 8 linear
    neighbours all lie in the crop (no clamping needed). Every voxel gets the
    same arithmetic whichever part of the row it is in.
    """
    flat = data.reshape(-1)
    nz, ny, nx = data.shape
    sxy = ny * nx
    o0, o1, o2 = offset[0], offset[1], offset[2]
    last0, last1, last2 = last[0], last[1], last[2]
    lo0, lo1, lo2 = lo[0], lo[1], lo[2]
    hi0, hi1, hi2 = hi[0], hi[1], hi[2]
    a02, a12, a22 = aff[0, 2], aff[1, 2], aff[2, 2]
    # Coordinates whose 8 neighbours need no clamping: c in [0, last] and
    # floor(c) - offset in [0, n - 2], i.e. slo <= c < shi (shi <= last).
    slo0 = max(0.0, float(o0))
    slo1 = max(0.0, float(o1))
    slo2 = max(0.0, float(o2))
    shi0 = min(last0, float(o0 + nz - 1))
    shi1 = min(last1, float(o1 + ny - 1))
    shi2 = min(last2, float(o2 + nx - 1))
    cosine = blend == _COSINE
    bd0, bd1, bd2 = border[0], border[1], border[2]
    r0, r1, r2 = rng[0], rng[1], rng[2]
    q0 = (0.5 * math.pi) / r0 if r0 > 0.0 else 0.0
    q1 = (0.5 * math.pi) / r1 if r1 > 0.0 else 0.0
    q2 = (0.5 * math.pi) / r2 if r2 > 0.0 else 0.0
    # Cosine weight 1 on an axis where border + range <= c <= last - border -
    # range (dist >= range; _axis_weight gives 1 there too): skip computing it.
    # Not for a range inside the face band, where _axis_weight gives 0.
    flat1 = r1 > _FACE
    flat2 = r2 > _FACE
    wlo1, whi1 = bd1 + r1, (last1 - bd1) - r1
    wlo2, whi2 = bd2 + r2, (last2 - bd2) - r2
    # An axis whose coordinate does not change along a row (a02 == 0, e.g. z
    # under a rotation about z) has the same bounds test and cosine weight for
    # the whole row: computed once, from the very same coordinate.
    const0 = a02 == 0.0
    const1 = a12 == 0.0
    linear = interp == _LINEAR
    for y in range(y0, y1):
        # Same evaluation order as the torch kernel, so coordinates match bit for bit.
        b0 = (aff[0, 3] + aff[0, 0] * z) + aff[0, 1] * y
        b1 = (aff[1, 3] + aff[1, 0] * z) + aff[1, 1] * y
        b2 = (aff[2, 3] + aff[2, 0] * z) + aff[2, 1] * y
        xs, xe = _x_range(b0, a02, lo0, hi0, x0, x1)
        xs, xe = _x_range(b1, a12, lo1, hi1, xs, xe)
        xs, xe = _x_range(b2, a22, lo2, hi2, xs, xe)
        # Exact bounds: trim the (slightly wider) analytic range.
        while xs < xe and not _in_box(
            b0 + a02 * xs, b1 + a12 * xs, b2 + a22 * xs, lo0, lo1, lo2, hi0, hi1, hi2
        ):
            xs += 1
        while xe > xs and not _in_box(
            b0 + a02 * (xe - 1),
            b1 + a12 * (xe - 1),
            b2 + a22 * (xe - 1),
            lo0,
            lo1,
            lo2,
            hi0,
            hi1,
            hi2,
        ):
            xe -= 1
        if xs >= xe:
            continue
        w_row = 1.0
        if cosine:
            if const0:
                w_row *= _axis_weight(b0 + a02 * xs, last0, bd0, r0)
            if const1:
                w_row *= _axis_weight(b1 + a12 * xs, last1, bd1, r1)
            if w_row <= 0.0 and not faces:
                continue
        # Columns needing no clamping: [us, ue), inside [xs, xe). Any subset
        # would do (the clamped path gives the same indices there).
        us, ue = xs, xs
        if linear:
            us, ue = _x_range(b0, a02, slo0, shi0, xs, xe)
            us, ue = _x_range(b1, a12, slo1, shi1, us, ue)
            us, ue = _x_range(b2, a22, slo2, shi2, us, ue)
            while us < ue and not (
                _in_box(
                    b0 + a02 * us, b1 + a12 * us, b2 + a22 * us, slo0, slo1, slo2, shi0, shi1, shi2
                )
                and b0 + a02 * us < shi0
                and b1 + a12 * us < shi1
                and b2 + a22 * us < shi2
            ):
                us += 1
            while ue > us and not (
                _in_box(
                    b0 + a02 * (ue - 1),
                    b1 + a12 * (ue - 1),
                    b2 + a22 * (ue - 1),
                    slo0,
                    slo1,
                    slo2,
                    shi0,
                    shi1,
                    shi2,
                )
                and b0 + a02 * (ue - 1) < shi0
                and b1 + a12 * (ue - 1) < shi1
                and b2 + a22 * (ue - 1) < shi2
            ):
                ue -= 1
        num_row = num[z, y]
        den_row = den[z, y]
        for x in range(xs, xe):
            c0 = b0 + a02 * x
            c1 = b1 + a12 * x
            c2 = b2 + a22 * x
            if linear:
                if us <= x < ue:
                    g0 = np.floor(c0)
                    g1 = np.floor(c1)
                    g2 = np.floor(c2)
                    t0 = c0 - g0
                    t1 = c1 - g1
                    t2 = c2 - g2
                    k = ((int(g0) - o0) * ny + (int(g1) - o1)) * nx + (int(g2) - o2)
                    dz = sxy
                    dy = nx
                    dx = 1
                else:
                    # Sample from coordinates clamped onto the tile (the
                    # tolerance must not reach a neighbour outside it), and
                    # clamp the neighbours onto the crop: a clamped neighbour
                    # outside has weight 0 or repeats the edge voxel.
                    s0 = min(max(c0, 0.0), last0)
                    s1 = min(max(c1, 0.0), last1)
                    s2 = min(max(c2, 0.0), last2)
                    g0 = np.floor(s0)
                    g1 = np.floor(s1)
                    g2 = np.floor(s2)
                    t0 = s0 - g0
                    t1 = s1 - g1
                    t2 = s2 - g2
                    i0 = int(g0) - o0
                    i1 = int(g1) - o1
                    i2 = int(g2) - o2
                    j0 = min(max(i0, 0), nz - 1)
                    j1 = min(max(i1, 0), ny - 1)
                    j2 = min(max(i2, 0), nx - 1)
                    k = (j0 * ny + j1) * nx + j2
                    dz = (min(max(i0 + 1, 0), nz - 1) - j0) * sxy
                    dy = (min(max(i1 + 1, 0), ny - 1) - j1) * nx
                    dx = min(max(i2 + 1, 0), nx - 1) - j2
                # Unsigned indices (all >= 0) spare numba's wraparound code.
                ku = np.uint64(k)
                kx = np.uint64(k + dx)
                ky = np.uint64(k + dy)
                kyx = np.uint64(k + dy + dx)
                kz = np.uint64(k + dz)
                kzx = np.uint64(k + dz + dx)
                kzy = np.uint64(k + dz + dy)
                kzyx = np.uint64(k + dz + dy + dx)
                sw, swv = _trilinear_taps(
                    flat[ku],
                    flat[kx],
                    flat[ky],
                    flat[kyx],
                    flat[kz],
                    flat[kzx],
                    flat[kzy],
                    flat[kzyx],
                    t0,
                    t1,
                    t2,
                )
            else:
                s0 = min(max(c0, 0.0), last0)
                s1 = min(max(c1, 0.0), last1)
                s2 = min(max(c2, 0.0), last2)
                i0 = min(max(math.floor(s0 + 0.5) - o0, 0), nz - 1)
                i1 = min(max(math.floor(s1 + 0.5) - o1, 0), ny - 1)
                i2 = min(max(math.floor(s2 + 0.5) - o2, 0), nx - 1)
                sw, swv = _tap(float(flat[np.uint64((i0 * ny + i1) * nx + i2)]), 1.0)
            if sw <= 0.0:
                continue
            xu = np.uint64(x)
            if blend == _MAX:
                val = np.float32(swv / sw)
                if den_row[xu] == 0.0 or val > num_row[xu]:
                    num_row[xu] = val
                den_row[xu] = 1.0
                continue
            wt = w_row
            if cosine:
                if not const0:
                    wt *= _ramp_weight(c0, last0, bd0, r0, q0)
                if not const1 and not (flat1 and wlo1 <= c1 <= whi1):
                    wt *= _ramp_weight(c1, last1, bd1, r1, q1)
                if not (flat2 and wlo2 <= c2 <= whi2):
                    wt *= _ramp_weight(c2, last2, bd2, r2, q2)
                if wt <= 0.0:
                    if faces:
                        # On the face: the fallback, while no sample has weight.
                        d = den_row[xu]
                        if d <= 0.0:
                            num_row[xu] += np.float32(swv)
                            den_row[xu] = d - np.float32(sw)
                    continue
                if faces and den_row[xu] < 0.0:
                    # The first weighted sample drops the fallback.
                    num_row[xu] = 0.0
                    den_row[xu] = 0.0
            num_row[xu] += np.float32(wt * swv)
            den_row[xu] += np.float32(wt * sw)


@njit(cache=True, inline="always", error_model="numpy")
def _bilinear(
    r00: float, r01: float, r10: float, r11: float, t1: float, t2: float
) -> tuple[float, float]:
    """:func:`_trilinear_taps` in one plane: sums of weights with data and of weight x value."""
    v00 = float(r00)
    v01 = float(r01)
    v10 = float(r10)
    v11 = float(r11)
    if (r00 != 0) & (r01 != 0) & (r10 != 0) & (r11 != 0):
        c0 = v00 + t2 * (v01 - v00)
        c1 = v10 + t2 * (v11 - v10)
        v = c0 + t1 * (c1 - c0)
        if v == v:
            return 1.0, v
    u1 = 1.0 - t1
    u2 = 1.0 - t2
    sw = 0.0
    swv = 0.0
    w, wv = _tap(v00, u1 * u2)
    sw += w
    swv += wv
    w, wv = _tap(v01, u1 * t2)
    sw += w
    swv += wv
    w, wv = _tap(v10, t1 * u2)
    sw += w
    swv += wv
    w, wv = _tap(v11, t1 * t2)
    sw += w
    swv += wv
    return sw, swv


@njit(cache=True, inline="always", error_model="numpy")
def _plane_row(
    data: np.ndarray,
    aff: np.ndarray,
    offset: np.ndarray,
    last: np.ndarray,
    lo: np.ndarray,
    hi: np.ndarray,
    border: np.ndarray,
    rng: np.ndarray,
    y: int,
    z0: int,
    z1: int,
    x0: int,
    x1: int,
    blend: int,
    faces: bool,
    num: np.ndarray,
    den: np.ndarray,
) -> None:
    """Linear sampling of row ``y`` in every plane ``z0 .. z1 - 1`` of the block.

    For affines whose tile y and x coordinates do not depend on the block's
    z (``aff[1, 0] == aff[2, 0] == 0``, e.g. rotations about z with any z
    scaling): the column's y/x neighbours, fractions and cosine weights are
    the same in every plane, so each crop plane is interpolated bilinearly
    once per column and every block voxel interpolates linearly in z between
    two of those. Same samples, bounds and weights as :func:`_rows`; only the
    summation order differs.
    """
    flat = data.reshape(-1)
    nz, ny, nx = data.shape
    sxy = ny * nx
    o0, o1, o2 = offset[0], offset[1], offset[2]
    last0, last1, last2 = last[0], last[1], last[2]
    lo0, lo1, lo2 = lo[0], lo[1], lo[2]
    hi0, hi1, hi2 = hi[0], hi[1], hi[2]
    a00, a01, a02, a03 = aff[0, 0], aff[0, 1], aff[0, 2], aff[0, 3]
    a12, a22 = aff[1, 2], aff[2, 2]
    cosine = blend == _COSINE
    faces = faces and cosine
    bd0, bd1, bd2 = border[0], border[1], border[2]
    r0, r1, r2 = rng[0], rng[1], rng[2]
    q0 = (0.5 * math.pi) / r0 if r0 > 0.0 else 0.0
    q1 = (0.5 * math.pi) / r1 if r1 > 0.0 else 0.0
    q2 = (0.5 * math.pi) / r2 if r2 > 0.0 else 0.0
    # Same evaluation order as _rows (there aff[d, 0] * z adds 0 for d = 1, 2).
    b1 = (aff[1, 3] + aff[1, 0] * z0) + aff[1, 1] * y
    b2 = (aff[2, 3] + aff[2, 0] * z0) + aff[2, 1] * y
    xs, xe = _x_range(b1, a12, lo1, hi1, x0, x1)
    xs, xe = _x_range(b2, a22, lo2, hi2, xs, xe)
    while xs < xe and not ((lo1 <= b1 + a12 * xs <= hi1) and (lo2 <= b2 + a22 * xs <= hi2)):
        xs += 1
    while xe > xs and not (
        (lo1 <= b1 + a12 * (xe - 1) <= hi1) and (lo2 <= b2 + a22 * (xe - 1) <= hi2)
    ):
        xe -= 1
    if xs >= xe:
        return
    n = xe - xs
    # Per column: lower y/x neighbour in a crop plane, steps to the upper
    # ones (0 where clamped), fractions, and the y/x cosine weight.
    kyx = np.empty(n, dtype=np.int64)
    dyx = np.empty((n, 2), dtype=np.int64)
    tyx = np.empty((n, 2))
    wyx = np.ones(n)
    for i in range(n):
        x = xs + i
        s1 = min(max(b1 + a12 * x, 0.0), last1)
        s2 = min(max(b2 + a22 * x, 0.0), last2)
        g1 = np.floor(s1)
        g2 = np.floor(s2)
        tyx[i, 0] = s1 - g1
        tyx[i, 1] = s2 - g2
        i1 = int(g1) - o1
        i2 = int(g2) - o2
        j1 = min(max(i1, 0), ny - 1)
        j2 = min(max(i2, 0), nx - 1)
        kyx[i] = j1 * nx + j2
        dyx[i, 0] = (min(max(i1 + 1, 0), ny - 1) - j1) * nx
        dyx[i, 1] = min(max(i2 + 1, 0), nx - 1) - j2
        if cosine:
            wyx[i] = _ramp_weight(b1 + a12 * x, last1, bd1, r1, q1) * _ramp_weight(
                b2 + a22 * x, last2, bd2, r2, q2
            )
    # Columns of y/x weight 0 (on a y or x face of the tile; at most a few
    # unless the whole row lies on one): their samples feed the fallback.
    nzero = 0
    if faces:
        for i in range(n):
            if wyx[i] <= 0.0:
                nzero += 1
    zcols = np.empty(nzero, dtype=np.int64)
    j = 0
    for i in range(n if nzero > 0 else 0):
        if wyx[i] <= 0.0:
            zcols[j] = i
            j += 1
    # Crop planes the column needs: the tile z coordinate is monotonic in z
    # and in x, so its extremes lie at the corners.
    cmin = math.inf
    cmax = -math.inf
    for zc in (z0, z1 - 1):
        for xc in (xs, xe - 1):
            c = ((a03 + a00 * zc) + a01 * y) + a02 * xc
            cmin = min(cmin, c)
            cmax = max(cmax, c)
    p0 = min(max(int(np.floor(min(max(cmin, 0.0), last0))) - o0, 0), nz - 1)
    p1 = min(max(int(np.floor(min(max(cmax, 0.0), last0))) - o0 + 1, 0), nz - 1)
    npl = p1 - p0 + 1
    psw = np.empty((npl, n))
    pswv = np.empty((npl, n))
    for p in range(npl):
        base = (p0 + p) * sxy
        for i in range(n):
            k = base + kyx[i]
            dy = dyx[i, 0]
            dx = dyx[i, 1]
            sw, swv = _bilinear(
                flat[np.uint64(k)],
                flat[np.uint64(k + dx)],
                flat[np.uint64(k + dy)],
                flat[np.uint64(k + dy + dx)],
                tyx[i, 0],
                tyx[i, 1],
            )
            psw[p, i] = sw
            pswv[p, i] = swv
    const0 = a02 == 0.0
    for z in range(z0, z1):
        b0 = (a03 + a00 * z) + a01 * y
        us, ue = _x_range(b0, a02, lo0, hi0, xs, xe)
        while us < ue and not (lo0 <= b0 + a02 * us <= hi0):
            us += 1
        while ue > us and not (lo0 <= b0 + a02 * (ue - 1) <= hi0):
            ue -= 1
        if us >= ue:
            continue
        w_row = 1.0
        if cosine and const0:
            w_row = _ramp_weight(b0 + a02 * us, last0, bd0, r0, q0)
            if w_row <= 0.0 and not faces:
                continue
        num_row = num[z, y]
        den_row = den[z, y]
        if const0:
            # The tile z coordinate is the same along the row: so are the two
            # planes and the fraction. Adding a voxel with no data or weight 0
            # adds 0 (sw >= 0; swv = 0 where sw = 0).
            s0 = min(max(b0, 0.0), last0)
            g0 = np.floor(s0)
            t0 = s0 - g0
            u0 = 1.0 - t0
            i0 = int(g0) - o0
            m0 = min(max(min(max(i0, 0), nz - 1) - p0, 0), npl - 1)
            m1 = min(max(min(max(i0 + 1, 0), nz - 1) - p0, 0), npl - 1)
            sw0 = psw[m0]
            sw1 = psw[m1]
            swv0 = pswv[m0]
            swv1 = pswv[m1]
            if blend == _MAX:
                for x in range(us, ue):
                    iu = np.uint64(x - xs)
                    xu = np.uint64(x)
                    sw = u0 * sw0[iu] + t0 * sw1[iu]
                    if sw > 0.0:
                        val = np.float32((u0 * swv0[iu] + t0 * swv1[iu]) / sw)
                        if den_row[xu] == 0.0 or val > num_row[xu]:
                            num_row[xu] = val
                        den_row[xu] = 1.0
                continue
            if not faces:
                for x in range(us, ue):
                    iu = np.uint64(x - xs)
                    xu = np.uint64(x)
                    sw = u0 * sw0[iu] + t0 * sw1[iu]
                    swv = u0 * swv0[iu] + t0 * swv1[iu]
                    wt = w_row * wyx[iu] if cosine else 1.0
                    use = (sw > 0.0) & (wt > 0.0)
                    num_row[xu] += np.float32(wt * swv) if use else np.float32(0.0)
                    den_row[xu] += np.float32(wt * sw) if use else np.float32(0.0)
                continue
            if w_row > 0.0:
                # As above, and the first weighted sample drops the fallback.
                for x in range(us, ue):
                    iu = np.uint64(x - xs)
                    xu = np.uint64(x)
                    sw = u0 * sw0[iu] + t0 * sw1[iu]
                    swv = u0 * swv0[iu] + t0 * swv1[iu]
                    wt = w_row * wyx[iu]
                    use = (sw > 0.0) & (wt > 0.0)
                    d = den_row[xu]
                    n0 = num_row[xu]
                    fresh = use & (d < 0.0)
                    num_row[xu] = (np.float32(0.0) if fresh else n0) + (
                        np.float32(wt * swv) if use else np.float32(0.0)
                    )
                    den_row[xu] = (np.float32(0.0) if fresh else d) + (
                        np.float32(wt * sw) if use else np.float32(0.0)
                    )
            # Samples of weight 0: the whole row (w_row = 0, a z face) or the
            # face columns; the loop above added nothing there.
            whole = w_row <= 0.0
            for f in range(us if whole else 0, ue if whole else nzero):
                x = f if whole else xs + zcols[f]
                if not (us <= x < ue):
                    continue
                iu = np.uint64(x - xs)
                xu = np.uint64(x)
                sw = u0 * sw0[iu] + t0 * sw1[iu]
                d = den_row[xu]
                if sw > 0.0 and d <= 0.0:
                    num_row[xu] += np.float32(u0 * swv0[iu] + t0 * swv1[iu])
                    den_row[xu] = d - np.float32(sw)
            continue
        for x in range(us, ue):
            i = x - xs
            c0 = b0 + a02 * x
            s0 = min(max(c0, 0.0), last0)
            g0 = np.floor(s0)
            t0 = s0 - g0
            i0 = int(g0) - o0
            j0 = min(max(i0, 0), nz - 1)
            j0n = min(max(i0 + 1, 0), nz - 1)
            # Within [p0, p1] by construction; clamped all the same.
            m0 = np.uint64(min(max(j0 - p0, 0), npl - 1))
            m1 = np.uint64(min(max(j0n - p0, 0), npl - 1))
            iu = np.uint64(i)
            u0 = 1.0 - t0
            sw = u0 * psw[m0, iu] + t0 * psw[m1, iu]
            swv = u0 * pswv[m0, iu] + t0 * pswv[m1, iu]
            if sw <= 0.0:
                continue
            xu = np.uint64(x)
            if blend == _MAX:
                val = np.float32(swv / sw)
                if den_row[xu] == 0.0 or val > num_row[xu]:
                    num_row[xu] = val
                den_row[xu] = 1.0
                continue
            wt = w_row
            if cosine:
                if not const0:
                    wt *= _ramp_weight(c0, last0, bd0, r0, q0)
                wt *= wyx[iu]
                if wt <= 0.0:
                    if faces:
                        d = den_row[xu]
                        if d <= 0.0:
                            num_row[xu] += np.float32(swv)
                            den_row[xu] = d - np.float32(sw)
                    continue
                if faces and den_row[xu] < 0.0:
                    num_row[xu] = 0.0
                    den_row[xu] = 0.0
            num_row[xu] += np.float32(wt * swv)
            den_row[xu] += np.float32(wt * sw)


@njit(parallel=True, cache=True, error_model="numpy")
def _accumulate(
    data: np.ndarray,
    aff: np.ndarray,
    offset: np.ndarray,
    last: np.ndarray,
    lo: np.ndarray,
    hi: np.ndarray,
    border: np.ndarray,
    rng: np.ndarray,
    box: np.ndarray,
    interp: int,
    blend: int,
    faces: bool,
    num: np.ndarray,
    den: np.ndarray,
) -> None:
    z0, z1, y0, y1, x0, x1 = box[0], box[1], box[2], box[3], box[4], box[5]
    if interp == _LINEAR and aff[1, 0] == 0.0 and aff[2, 0] == 0.0:
        for yi in prange(y1 - y0):
            _plane_row(
                data,
                aff,
                offset,
                last,
                lo,
                hi,
                border,
                rng,
                y0 + yi,
                z0,
                z1,
                x0,
                x1,
                blend,
                faces,
                num,
                den,
            )
        return
    for zi in prange(z1 - z0):
        _rows(
            data,
            aff,
            offset,
            last,
            lo,
            hi,
            border,
            rng,
            z0 + zi,
            y0,
            y1,
            x0,
            x1,
            interp,
            blend,
            faces,
            num,
            den,
        )


@njit(nogil=True, cache=True, error_model="numpy")
def _accumulate_serial(
    data: np.ndarray,
    aff: np.ndarray,
    offset: np.ndarray,
    last: np.ndarray,
    lo: np.ndarray,
    hi: np.ndarray,
    border: np.ndarray,
    rng: np.ndarray,
    box: np.ndarray,
    interp: int,
    blend: int,
    faces: bool,
    num: np.ndarray,
    den: np.ndarray,
) -> None:
    """:func:`_accumulate` on the calling thread, without the GIL (for thread pools)."""
    z0, z1, y0, y1, x0, x1 = box[0], box[1], box[2], box[3], box[4], box[5]
    if interp == _LINEAR and aff[1, 0] == 0.0 and aff[2, 0] == 0.0:
        for y in range(y0, y1):
            _plane_row(
                data,
                aff,
                offset,
                last,
                lo,
                hi,
                border,
                rng,
                y,
                z0,
                z1,
                x0,
                x1,
                blend,
                faces,
                num,
                den,
            )
        return
    for z in range(z0, z1):
        _rows(
            data,
            aff,
            offset,
            last,
            lo,
            hi,
            border,
            rng,
            z,
            y0,
            y1,
            x0,
            x1,
            interp,
            blend,
            faces,
            num,
            den,
        )


@njit(nogil=True, cache=True, error_model="numpy")
def _accumulate_shift(
    data: np.ndarray,
    shift: np.ndarray,
    ranges: np.ndarray,
    weights: np.ndarray,
    blend: int,
    faces: bool,
    num: np.ndarray,
    den: np.ndarray,
) -> None:
    """A tile whose block-to-crop map is an integer shift: no interpolation.

    Trilinear and nearest sampling at integer coordinates return the voxel
    itself with interpolation weight 1, so this equals :func:`_accumulate`
    bit for bit (integer data: no NaN or inf neighbours). ``ranges`` holds
    the block voxels inside the tile per axis, ``weights`` (3, n) the
    per-axis cosine weights of block index ``i`` (row ``a``, column ``i``).
    """
    for z in range(ranges[0, 0], ranges[0, 1]):
        wz = weights[0, z]
        for y in range(ranges[1, 0], ranges[1, 1]):
            wzy = wz * weights[1, y]
            for x in range(ranges[2, 0], ranges[2, 1]):
                v = float(data[z + shift[0], y + shift[1], x + shift[2]])
                if v == 0.0:
                    continue
                if blend == _MAX:
                    val = np.float32(v)
                    if den[z, y, x] == 0.0 or val > num[z, y, x]:
                        num[z, y, x] = val
                    den[z, y, x] = 1.0
                    continue
                wt = wzy * weights[2, x]
                if wt <= 0.0:
                    if faces:
                        d = den[z, y, x]
                        if d <= 0.0:
                            num[z, y, x] += np.float32(v)
                            den[z, y, x] = d - np.float32(1.0)
                    continue
                if faces and den[z, y, x] < 0.0:
                    num[z, y, x] = 0.0
                    den[z, y, x] = 0.0
                num[z, y, x] += np.float32(wt * v)
                den[z, y, x] += np.float32(wt)


@njit(cache=True, error_model="numpy")
def _axis_weights(
    start: float, n: int, last: float, border: float, rng: float, cosine: bool
) -> np.ndarray:
    out = np.ones(n)
    if cosine:
        for i in range(n):
            out[i] = _axis_weight(start + i, last, border, rng)
    return out


def _integer_shift(p: _TilePlan) -> NDArray[np.int64] | None:
    """Block-to-crop index shift when the tile needs no interpolation, else None.

    That is: the block-to-tile map is the identity plus an integer
    translation, and the data are integers (no NaN or inf to propagate).
    """
    if not np.issubdtype(p.data.dtype, np.integer):
        return None
    linear = p.affine[:, :3]
    shift = p.affine[:, 3]
    if not np.array_equal(linear, np.eye(3)) or not np.array_equal(shift, np.round(shift)):
        return None
    return shift.astype(np.int64) - p.offset


def _shift_tile(
    p: _TilePlan,
    shift: NDArray[np.int64],
    blend: int,
    faces: bool,
    num: np.ndarray,
    den: np.ndarray,
) -> None:
    start = p.affine[:, 3]
    block = num.shape
    ranges = np.zeros((3, 2), dtype=np.int64)
    weights = np.ones((3, max(block)))
    for a in range(3):
        # Block voxels i with lo <= start + i <= hi, inside the box.
        first = max(math.ceil(p.lo[a] - start[a]), p.box[2 * a])
        stop = min(math.floor(p.hi[a] - start[a]) + 1, p.box[2 * a + 1])
        ranges[a] = (first, max(first, stop))
        weights[a, : block[a]] = _axis_weights(
            float(start[a]),
            block[a],
            float(p.last[a]),
            float(p.border[a]),
            float(p.blend_range[a]),
            blend == _COSINE,
        )
    _accumulate_shift(p.data, shift, ranges, weights, blend, faces, num, den)


def fuse_numba(
    plans: Sequence[_TilePlan],
    block: tuple[int, int, int],
    *,
    interpolation: str,
    blending: str,
    threads: int | None,
) -> np.ndarray:
    """Fuse planned tiles into a float32 block (see :func:`tilefusion.kernel.fuse_block`).

    ``threads=1`` runs on the calling thread without the GIL (safe to call
    from several Python threads at once); otherwise rows are spread over
    numba's threads. Tiles that are an integer shift of the block are copied
    with their weights instead of interpolated (the same values).
    """
    num = np.zeros(block, dtype=np.float32)
    den = np.zeros(block, dtype=np.float32)
    interp = INTERP_CODES[interpolation]
    blend = BLEND_CODES[blending]
    # Whether a sample of cosine weight 0 (with data) may occur in the block.
    faces = blend == _COSINE and any(p.face for p in plans)
    serial = threads is not None and int(threads) == 1
    previous = numba.get_num_threads()
    if threads is not None and not serial:
        limit = numba.config.NUMBA_NUM_THREADS  # type: ignore[attr-defined]
        numba.set_num_threads(max(1, min(int(threads), limit)))
    try:
        for p in plans:
            shift = _integer_shift(p)
            if shift is not None:
                _shift_tile(p, shift, blend, faces, num, den)
                continue
            data = p.data
            if data.dtype == np.float16:
                # numba has no float16 arithmetic.
                data = data.astype(np.float32)
            kernel = _accumulate_serial if serial else _accumulate
            kernel(
                data,
                p.affine,
                p.offset,
                p.last,
                p.lo,
                p.hi,
                p.border,
                p.blend_range,
                np.asarray(p.box, dtype=np.int64),
                interp,
                blend,
                faces,
                num,
                den,
            )
    finally:
        if not serial:
            numba.set_num_threads(previous)
    return finish(num, den, blend=blend)


def finish(num: np.ndarray, den: np.ndarray, *, blend: int) -> np.ndarray:
    """Turn the accumulators into the output, in place: 0 wherever no tile contributed.

    A negative ``den`` holds the cosine fallback (minus its weight sum).
    """
    _finish_in_place(num.reshape(-1), den.reshape(-1), blend == _MAX)
    return num


@njit(nogil=True, cache=True, error_model="numpy")
def _finish_in_place(num: np.ndarray, den: np.ndarray, is_max: bool) -> None:
    for i in range(num.size):
        d = den[i] if is_max else abs(den[i])
        if d <= 0.0:
            num[i] = 0.0
        elif not is_max:
            num[i] = num[i] / d


def warm_up(dtype: str = "uint16") -> None:
    """Load (or compile, the first time) the kernels for tiles of ``dtype``.

    numba's first call in a process loads its type registries and compiled
    code (about 0.4 s); after an install it compiles (tens of seconds).
    """
    from tilefusion.kernel._types import TileCrop, plan_tiles

    crops = [
        TileCrop(
            data=np.ones((2, 2, 2), dtype=dtype),
            out_to_tile=geometry.translation(shift),
            crop_offset_zyx=(0, 0, 0),
            tile_shape_zyx=(2, 2, 2),
        )
        # A fractional shift takes the interpolating kernel, an integer one the copy.
        for shift in ([0.0, 0.0, 0.25], [0.0, 0.0, 1.0])
    ]
    for crop in crops:
        plans = plan_tiles(
            [crop], (2, 2, 2), blend_range_zyx=(1.0, 1.0, 1.0), blend_border_zyx=(0.0,) * 3
        )
        fuse_numba(plans, (2, 2, 2), interpolation="linear", blending="cosine", threads=1)
