"""The general sampling path: fuse tiles at precomputed tile coordinates.

Tiles whose transform to the output is not affine (a displacement field)
are sampled at coordinates computed per block by
:func:`tilefusion.transforms.block_coordinates`, one ``(3, Z, Y, X)`` array
of full-tile voxel coordinates per tile. The semantics are those of
:func:`tilefusion.kernel.fuse_block` (its Notes): a tile takes part where
its coordinate lies inside it less its border (within
:data:`~tilefusion.blend.EDGE_TOLERANCE`); the trilinear value is normalised
over the neighbours with data (not 0, not NaN) and ``support`` is their
summed weight; tiles are combined by ``cosine`` (weight ``support * cosine``,
the support-weighted mean where every cosine weight is 0), ``mean``
(weight ``support``) or ``max``. Crops without coordinates are sampled
through their ``out_to_tile`` affine, so affine and warped tiles blend in
one block.

Two backends compute the same result to float tolerance: numba on the CPU
and torch (CPU or CUDA), both in float64.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from numba import njit, prange
from numpy.typing import NDArray

from tilefusion.blend import EDGE_TOLERANCE
from tilefusion.kernel._types import (
    BLEND_CODES,
    INTERP_CODES,
    INTERPOLATIONS,
    TileCrop,
    check_block_shape,
    check_choice,
)

__all__ = ["affine_coordinates", "fuse_mapped"]

_LINEAR = INTERP_CODES["linear"]
_COSINE = BLEND_CODES["cosine"]
_MEAN = BLEND_CODES["mean"]
_MAX = BLEND_CODES["max"]


def affine_coordinates(
    out_to_tile: NDArray[np.float64], block: tuple[int, int, int]
) -> NDArray[np.float64]:
    """Tile coordinates ``out_to_tile @ [o, 1]`` of every block voxel, ``(3, Z, Y, X)``."""
    a = np.asarray(out_to_tile, dtype=np.float64)
    z, y, x = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in block], indexing="ij")
    return np.stack([((a[d, 3] + a[d, 0] * z) + a[d, 1] * y) + a[d, 2] * x for d in range(3)])


@njit(cache=True, inline="always", error_model="numpy")
def _ramp(c: float, last: float, border: float, rng: float) -> float:
    dist = min(c - border, last - border - c)
    if dist <= EDGE_TOLERANCE:
        return 0.0
    if rng <= 0.0 or dist >= rng:
        return 1.0
    return 0.5 * (math.cos((1.0 - dist / rng) * math.pi) + 1.0)


@njit(parallel=True, cache=True, error_model="numpy")
def _accumulate(
    data: NDArray[Any],
    coords: NDArray[np.float64],
    offset: NDArray[np.float64],
    last: NDArray[np.float64],
    lo: NDArray[np.float64],
    hi: NDArray[np.float64],
    border: NDArray[np.float64],
    rng: NDArray[np.float64],
    interp: int,
    blend: int,
    num: NDArray[np.float64],
    den: NDArray[np.float64],
    fnum: NDArray[np.float64],
    fden: NDArray[np.float64],
) -> None:
    nz, ny, nx = num.shape
    sz, sy, sx = data.shape
    for z in prange(nz):
        for y in range(ny):
            for x in range(nx):
                c0 = coords[0, z, y, x]
                c1 = coords[1, z, y, x]
                c2 = coords[2, z, y, x]
                if not (lo[0] <= c0 <= hi[0] and lo[1] <= c1 <= hi[1] and lo[2] <= c2 <= hi[2]):
                    continue
                p0 = min(max(c0, 0.0), last[0]) - offset[0]
                p1 = min(max(c1, 0.0), last[1]) - offset[1]
                p2 = min(max(c2, 0.0), last[2]) - offset[2]
                sw = 0.0
                swv = 0.0
                if interp == _LINEAR:
                    g0 = math.floor(p0)
                    g1 = math.floor(p1)
                    g2 = math.floor(p2)
                    t0 = p0 - g0
                    t1 = p1 - g1
                    t2 = p2 - g2
                    i0 = int(g0)
                    i1 = int(g1)
                    i2 = int(g2)
                    for d0 in range(2):
                        k0 = min(max(i0 + d0, 0), sz - 1)
                        w0 = t0 if d0 else 1.0 - t0
                        for d1 in range(2):
                            k1 = min(max(i1 + d1, 0), sy - 1)
                            w1 = t1 if d1 else 1.0 - t1
                            for d2 in range(2):
                                k2 = min(max(i2 + d2, 0), sx - 1)
                                w2 = t2 if d2 else 1.0 - t2
                                v = float(data[k0, k1, k2])
                                if v != 0.0 and v == v:
                                    w = w0 * w1 * w2
                                    sw += w
                                    swv += w * v
                else:
                    k0 = min(max(math.floor(p0 + 0.5), 0), sz - 1)
                    k1 = min(max(math.floor(p1 + 0.5), 0), sy - 1)
                    k2 = min(max(math.floor(p2 + 0.5), 0), sx - 1)
                    v = float(data[k0, k1, k2])
                    if v != 0.0 and v == v:
                        sw = 1.0
                        swv = v
                if sw <= 0.0:
                    continue
                value = swv / sw
                if blend == _MAX:
                    if den[z, y, x] == 0.0 or value > num[z, y, x]:
                        num[z, y, x] = value
                    den[z, y, x] = 1.0
                    continue
                weight = sw
                if blend == _COSINE:
                    fnum[z, y, x] += sw * value
                    fden[z, y, x] += sw
                    weight = (
                        sw
                        * _ramp(c0, last[0], border[0], rng[0])
                        * _ramp(c1, last[1], border[1], rng[1])
                        * _ramp(c2, last[2], border[2], rng[2])
                    )
                num[z, y, x] += weight * value
                den[z, y, x] += weight


def _tile_params(
    crop: TileCrop, rng_default: Sequence[float], border_default: Sequence[float]
) -> tuple[NDArray[np.float64], ...]:
    rng = np.asarray(
        crop.blend_range_zyx if crop.blend_range_zyx is not None else rng_default, dtype=float
    )
    border = np.asarray(
        crop.blend_border_zyx if crop.blend_border_zyx is not None else border_default,
        dtype=float,
    )
    rng = np.broadcast_to(rng, (3,)).astype(np.float64)
    border = np.broadcast_to(border, (3,)).astype(np.float64)
    last = np.asarray(crop.tile_shape_zyx, dtype=np.float64) - 1.0
    inset = np.maximum(border, 0.0)
    return (
        np.asarray(crop.crop_offset_zyx, dtype=np.float64),
        last,
        inset - EDGE_TOLERANCE,
        last - inset + EDGE_TOLERANCE,
        border,
        rng,
    )


def fuse_mapped(
    crops: Sequence[TileCrop],
    coordinates: Sequence[NDArray[np.float64] | None],
    block_shape_zyx: tuple[int, int, int],
    *,
    interpolation: str = "linear",
    blending: str = "cosine",
    blend_range_zyx: Sequence[float] = (40.0, 40.0, 40.0),
    blend_border_zyx: Sequence[float] = (0.0, 0.0, 0.0),
    backend: str = "numba",
    device: str | None = None,
) -> NDArray[np.float32]:
    """Resample and blend tile crops at given tile coordinates (see the module docstring).

    Parameters
    ----------
    crops : sequence of TileCrop
        As for :func:`tilefusion.kernel.fuse_block`, in a fixed order.
    coordinates : sequence of ndarray of shape (3, Z, Y, X), or None
        Per crop, the full-tile coordinates of every block voxel; None
        samples through the crop's ``out_to_tile``.
    block_shape_zyx : tuple of 3 ints
    interpolation : {"linear", "nearest"}
    blending : {"cosine", "mean", "max"}
    blend_range_zyx, blend_border_zyx : sequence of 3 floats
        For crops that carry none, in tile voxels.
    backend : {"numba", "torch"}
    device : str, optional
        torch device for ``backend="torch"`` (default: the CPU).

    Returns
    -------
    ndarray of float32, shape ``block_shape_zyx``
    """
    check_choice("interpolation", interpolation, INTERPOLATIONS)
    check_choice("blending", blending, tuple(BLEND_CODES))
    check_choice("backend", backend, ("numba", "torch"))
    block = check_block_shape(block_shape_zyx)
    if len(coordinates) != len(crops):
        raise ValueError(f"{len(crops)} crops but {len(coordinates)} coordinate arrays")
    grids = []
    for i, (crop, given) in enumerate(zip(crops, coordinates)):
        c = affine_coordinates(crop.out_to_tile, block) if given is None else given
        c = np.asarray(c, dtype=np.float64)
        if c.shape != (3, *block):
            raise ValueError(f"coordinates[{i}] must have shape {(3, *block)}, got {c.shape}")
        grids.append(c)
    if backend == "torch":
        return _fuse_torch(
            crops, grids, block, interpolation, blending, blend_range_zyx, blend_border_zyx, device
        )
    num = np.zeros(block)
    den = np.zeros(block)
    fnum = np.zeros(block)
    fden = np.zeros(block)
    for crop, c in zip(crops, grids):
        data = np.ascontiguousarray(crop.data)
        if data.size == 0:
            continue
        if not data.dtype.isnative:
            data = data.astype(data.dtype.newbyteorder("="))
        offset, last, lo, hi, border, rng = _tile_params(crop, blend_range_zyx, blend_border_zyx)
        _accumulate(
            data,
            np.ascontiguousarray(c),
            offset,
            last,
            lo,
            hi,
            border,
            rng,
            INTERP_CODES[interpolation],
            BLEND_CODES[blending],
            num,
            den,
            fnum,
            fden,
        )
    return _finish(num, den, fnum, fden, blending)


def _finish(
    num: NDArray[np.float64],
    den: NDArray[np.float64],
    fnum: NDArray[np.float64],
    fden: NDArray[np.float64],
    blending: str,
) -> NDArray[np.float32]:
    if blending == "max":
        return np.where(den > 0, num, 0.0).astype(np.float32)
    weighted = num / np.where(den > 0, den, 1.0)
    fallback = fnum / np.where(fden > 0, fden, 1.0)
    return np.where(den > 0, weighted, np.where(fden > 0, fallback, 0.0)).astype(np.float32)


def _fuse_torch(
    crops: Sequence[TileCrop],
    grids: Sequence[NDArray[np.float64]],
    block: tuple[int, int, int],
    interpolation: str,
    blending: str,
    blend_range_zyx: Sequence[float],
    blend_border_zyx: Sequence[float],
    device: str | None,
) -> NDArray[np.float32]:
    import torch

    dev = torch.device(device or "cpu")
    f64 = torch.float64
    num = torch.zeros(block, dtype=f64, device=dev)
    den = torch.zeros_like(num)
    fnum = torch.zeros_like(num)
    fden = torch.zeros_like(num)
    for crop, grid in zip(crops, grids):
        raw = np.asarray(crop.data)
        if raw.size == 0:
            continue
        data = torch.as_tensor(raw.astype(np.float64), device=dev)
        c = torch.as_tensor(grid, dtype=f64, device=dev)
        offset, last, lo, hi, border, rng = (
            torch.as_tensor(v, dtype=f64, device=dev)
            for v in _tile_params(crop, blend_range_zyx, blend_border_zyx)
        )
        inside = torch.ones(block, dtype=torch.bool, device=dev)
        for a in range(3):
            inside &= (c[a] >= lo[a]) & (c[a] <= hi[a])
        p = [torch.minimum(torch.clamp(c[a], min=0.0), last[a]) - offset[a] for a in range(3)]
        size = data.shape
        sw = torch.zeros(block, dtype=f64, device=dev)
        swv = torch.zeros_like(sw)
        if interpolation == "linear":
            g = [torch.floor(p[a]) for a in range(3)]
            t = [p[a] - g[a] for a in range(3)]
            base = [g[a].long() for a in range(3)]
            for d0 in (0, 1):
                k0 = torch.clamp(base[0] + d0, 0, size[0] - 1)
                w0 = t[0] if d0 else 1.0 - t[0]
                for d1 in (0, 1):
                    k1 = torch.clamp(base[1] + d1, 0, size[1] - 1)
                    w1 = t[1] if d1 else 1.0 - t[1]
                    for d2 in (0, 1):
                        k2 = torch.clamp(base[2] + d2, 0, size[2] - 1)
                        w2 = t[2] if d2 else 1.0 - t[2]
                        v = data[k0, k1, k2]
                        ok = (v != 0) & ~torch.isnan(v)
                        w = torch.where(ok, w0 * w1 * w2, 0.0)
                        sw += w
                        swv += torch.where(ok, w * v, 0.0)
        else:
            k = [torch.clamp(torch.floor(p[a] + 0.5).long(), 0, size[a] - 1) for a in range(3)]
            v = data[k[0], k[1], k[2]]
            ok = (v != 0) & ~torch.isnan(v)
            sw = ok.to(f64)
            swv = torch.where(ok, v, 0.0)
        has = inside & (sw > 0)
        value = torch.where(has, swv / torch.where(has, sw, 1.0), 0.0)
        if blending == "max":
            take = has & ((den == 0) | (value > num))
            num = torch.where(take, value, num)
            den = torch.where(has, 1.0, den)
            continue
        weight = torch.where(has, sw, 0.0)
        if blending == "cosine":
            fnum += weight * value
            fden += weight
            cos = torch.ones(block, dtype=f64, device=dev)
            for a in range(3):
                dist = torch.minimum(c[a] - border[a], last[a] - border[a] - c[a])
                if float(rng[a]) > 0:
                    r = torch.clamp(dist / rng[a], max=1.0)
                    ramp = 0.5 * (torch.cos((1.0 - r) * math.pi) + 1.0)
                else:
                    ramp = torch.ones_like(dist)
                cos *= torch.where(dist <= EDGE_TOLERANCE, 0.0, ramp)
            weight = weight * cos
        num += weight * value
        den += weight
    return _finish(
        num.cpu().numpy(), den.cpu().numpy(), fnum.cpu().numpy(), fden.cpu().numpy(), blending
    )
