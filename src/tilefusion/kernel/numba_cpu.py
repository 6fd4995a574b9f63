"""CPU fusion kernel, compiled with numba.

One call per tile accumulates that tile into two block-sized float32 arrays,
``num`` and ``den``; tiles are added in order and each output voxel is written
by one thread only, so the result does not depend on the thread count. The
crop is read in its own dtype (numba compiles one kernel per dtype) and
coordinates are computed per row from the affine, never stored as a grid.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numba
import numpy as np
from numba import njit, prange
from numpy.typing import NDArray

from tilefusion.kernel._types import BLEND_CODES, INTERP_CODES, _TilePlan

__all__ = ["fuse_numba"]

_LINEAR = INTERP_CODES["linear"]
_COSINE = BLEND_CODES["cosine"]
_MAX = BLEND_CODES["max"]


@njit(cache=True, inline="always", error_model="numpy")
def _axis_weight(c: float, last: float, border: float, rng: float) -> float:
    # BlendingRealRandomAccess.computeWeight, one axis. (cos((1 - r) pi) + 1) / 2
    # equals sin(r pi / 2)^2, which keeps its relative precision near r = 0,
    # even in float32 (twice as fast as float64 here).
    dist = min(c - border, last - border - c)
    if dist <= 0.0:
        return 0.0
    if rng <= 0.0:
        return 1.0
    r = dist / rng
    if r >= 1.0:
        return 1.0
    h = math.sin(np.float32(r * (0.5 * math.pi)))
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


@njit(cache=True, inline="always", error_model="numpy")
def _tap(flat: np.ndarray, k: int, w: float) -> tuple[float, float]:
    """Weight and weighted value of one neighbour; 0 and NaN hold no data."""
    v = float(flat[k])
    ok = v != 0.0 and v == v
    return (w if ok else 0.0), (w * v if ok else 0.0)


@njit(cache=True, inline="always", error_model="numpy")
def _trilinear(
    flat: np.ndarray,
    shape: tuple[int, int, int],
    offset: np.ndarray,
    s0: float,
    s1: float,
    s2: float,
) -> tuple[float, float]:
    """Sum of interpolation weights with data, and of weight times value."""
    nz, ny, nx = shape
    f0 = math.floor(s0)
    f1 = math.floor(s1)
    f2 = math.floor(s2)
    t0 = s0 - f0
    t1 = s1 - f1
    t2 = s2 - f2
    i0 = f0 - offset[0]
    i1 = f1 - offset[1]
    i2 = f2 - offset[2]
    sxy = ny * nx
    if 0 <= i0 < nz - 1 and 0 <= i1 < ny - 1 and 0 <= i2 < nx - 1:
        # Common case: all 8 neighbours inside the crop, no clamping needed.
        k00 = (i0 * ny + i1) * nx + i2
        dz, dy, dx = sxy, nx, 1
    else:
        # Clamp onto the crop; a clamped neighbour outside has weight 0 or
        # repeats the edge voxel (see fuse_block's Notes).
        j0 = min(max(i0, 0), nz - 1)
        j1 = min(max(i1, 0), ny - 1)
        j2 = min(max(i2, 0), nx - 1)
        k00 = (j0 * ny + j1) * nx + j2
        dz = (min(max(i0 + 1, 0), nz - 1) - j0) * sxy
        dy = (min(max(i1 + 1, 0), ny - 1) - j1) * nx
        dx = min(max(i2 + 1, 0), nx - 1) - j2
    return _trilinear_taps(flat, k00, dz, dy, dx, t0, t1, t2)


@njit(cache=True, inline="always", error_model="numpy")
def _trilinear_taps(
    flat: np.ndarray, k00: int, dz: int, dy: int, dx: int, t0: float, t1: float, t2: float
) -> tuple[float, float]:
    u0 = 1.0 - t0
    u1 = 1.0 - t1
    u2 = 1.0 - t2
    sw = 0.0
    swv = 0.0
    w, wv = _tap(flat, k00, u0 * u1 * u2)
    sw += w
    swv += wv
    w, wv = _tap(flat, k00 + dx, u0 * u1 * t2)
    sw += w
    swv += wv
    w, wv = _tap(flat, k00 + dy, u0 * t1 * u2)
    sw += w
    swv += wv
    w, wv = _tap(flat, k00 + dy + dx, u0 * t1 * t2)
    sw += w
    swv += wv
    w, wv = _tap(flat, k00 + dz, t0 * u1 * u2)
    sw += w
    swv += wv
    w, wv = _tap(flat, k00 + dz + dx, t0 * u1 * t2)
    sw += w
    swv += wv
    w, wv = _tap(flat, k00 + dz + dy, t0 * t1 * u2)
    sw += w
    swv += wv
    w, wv = _tap(flat, k00 + dz + dy + dx, t0 * t1 * t2)
    sw += w
    swv += wv
    return sw, swv


@njit(cache=True, inline="always", error_model="numpy")
def _nearest(
    flat: np.ndarray,
    shape: tuple[int, int, int],
    offset: np.ndarray,
    s0: float,
    s1: float,
    s2: float,
) -> tuple[float, float]:
    """Like :func:`_trilinear` for the nearest voxel (halves round up)."""
    nz, ny, nx = shape
    i0 = min(max(math.floor(s0 + 0.5) - offset[0], 0), nz - 1)
    i1 = min(max(math.floor(s1 + 0.5) - offset[1], 0), ny - 1)
    i2 = min(max(math.floor(s2 + 0.5) - offset[2], 0), nx - 1)
    return _tap(flat, (i0 * ny + i1) * nx + i2, 1.0)


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
    num: np.ndarray,
    den: np.ndarray,
) -> None:
    """Accumulate one tile into the rows ``y0 .. y1 - 1`` of plane ``z``."""
    flat = data.reshape(-1)
    shape = data.shape
    # An axis whose coordinate does not change along a row (a02 == 0, e.g. z
    # under a rotation about z) has the same bounds test and cosine weight for
    # the whole row: computed once, from the very same coordinate.
    const0 = aff[0, 2] == 0.0
    const1 = aff[1, 2] == 0.0
    for y in range(y0, y1):
        # Same evaluation order as the torch kernel, so coordinates match bit for bit.
        b0 = (aff[0, 3] + aff[0, 0] * z) + aff[0, 1] * y
        b1 = (aff[1, 3] + aff[1, 0] * z) + aff[1, 1] * y
        b2 = (aff[2, 3] + aff[2, 0] * z) + aff[2, 1] * y
        xs, xe = _x_range(b0, aff[0, 2], lo[0], hi[0], x0, x1)
        xs, xe = _x_range(b1, aff[1, 2], lo[1], hi[1], xs, xe)
        xs, xe = _x_range(b2, aff[2, 2], lo[2], hi[2], xs, xe)
        w0_row = 1.0
        if const0 and blend != _MAX:
            w0_row = _axis_weight(b0 + aff[0, 2] * xs, last[0], border[0], rng[0])
        w1_row = 1.0
        if const1 and blend != _MAX:
            w1_row = _axis_weight(b1 + aff[1, 2] * xs, last[1], border[1], rng[1])
        for x in range(xs, xe):
            c0 = b0 + aff[0, 2] * x
            c1 = b1 + aff[1, 2] * x
            c2 = b2 + aff[2, 2] * x
            if c0 < lo[0] or c0 > hi[0] or c1 < lo[1] or c1 > hi[1]:
                continue
            if c2 < lo[2] or c2 > hi[2]:
                continue
            # Sample from coordinates clamped onto the tile: the tolerance
            # must not reach a neighbour outside it.
            s0 = min(max(c0, 0.0), last[0])
            s1 = min(max(c1, 0.0), last[1])
            s2 = min(max(c2, 0.0), last[2])
            if interp == _LINEAR:
                sw, swv = _trilinear(flat, shape, offset, s0, s1, s2)
            else:
                sw, swv = _nearest(flat, shape, offset, s0, s1, s2)
            if sw <= 0.0:
                continue
            if blend == _MAX:
                val = np.float32(swv / sw)
                if den[z, y, x] == 0.0 or val > num[z, y, x]:
                    num[z, y, x] = val
                den[z, y, x] = 1.0
                continue
            wt = 1.0
            if blend == _COSINE:
                wt = w0_row if const0 else _axis_weight(c0, last[0], border[0], rng[0])
                wt *= w1_row if const1 else _axis_weight(c1, last[1], border[1], rng[1])
                wt *= _axis_weight(c2, last[2], border[2], rng[2])
                if wt <= 0.0:
                    continue
            num[z, y, x] += np.float32(wt * swv)
            den[z, y, x] += np.float32(wt * sw)


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
    num: np.ndarray,
    den: np.ndarray,
) -> None:
    z0, z1, y0, y1, x0, x1 = box[0], box[1], box[2], box[3], box[4], box[5]
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
    num: np.ndarray,
    den: np.ndarray,
) -> None:
    """:func:`_accumulate` on the calling thread, without the GIL (for thread pools)."""
    z0, z1, y0, y1, x0, x1 = box[0], box[1], box[2], box[3], box[4], box[5]
    for z in range(z0, z1):
        _rows(
            data, aff, offset, last, lo, hi, border, rng, z, y0, y1, x0, x1, interp, blend, num, den
        )


@njit(nogil=True, cache=True, error_model="numpy")
def _accumulate_shift(
    data: np.ndarray,
    shift: np.ndarray,
    ranges: np.ndarray,
    weights: np.ndarray,
    blend: int,
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
                    continue
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
    p: _TilePlan, shift: NDArray[np.int64], blend: int, num: np.ndarray, den: np.ndarray
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
    _accumulate_shift(p.data, shift, ranges, weights, blend, num, den)


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
    serial = threads is not None and int(threads) == 1
    previous = numba.get_num_threads()
    if threads is not None and not serial:
        limit = numba.config.NUMBA_NUM_THREADS  # type: ignore[attr-defined]
        numba.set_num_threads(max(1, min(int(threads), limit)))
    try:
        for p in plans:
            shift = _integer_shift(p)
            if shift is not None:
                _shift_tile(p, shift, blend, num, den)
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
                num,
                den,
            )
    finally:
        if not serial:
            numba.set_num_threads(previous)
    return finish(num, den, blend=blend)


def finish(num: np.ndarray, den: np.ndarray, *, blend: int) -> np.ndarray:
    """Turn the accumulators into the output: 0 wherever no tile contributed."""
    if blend == _MAX:
        return np.where(den > 0, num, np.float32(0.0)).astype(np.float32, copy=False)
    out = np.zeros_like(num)
    np.divide(num, den, out=out, where=den > 0)
    return out
