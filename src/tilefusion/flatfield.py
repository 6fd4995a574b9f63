"""Flatfield and darkfield profiles: the uneven illumination of every tile.

A light-sheet or widefield camera image is ``raw = dark + flat · true``:
the illumination falls off towards the field's edges (``flat``, mean 1) over
a camera offset (``dark``). Every tile of one channel shares the profile, so
fused tiles show it as a repeating pattern and seams. The fusion applies
``(raw - dark) / flat`` to the tile values it samples (never to a second copy
of the data); this module makes the profiles.

:func:`estimate_profiles` is a robust estimator of our own (not BaSiC's
low-rank and sparse decomposition, whose dependencies, about 1 GB of JAX, a
fuse environment should not carry): planes sampled from every tile
(:func:`sample_planes`), each divided by its median, give the flatfield as
their per-pixel median (structures in the sample, which move from plane to
plane, drop out), smoothed by a fit of low-degree polynomials and scaled to
mean 1. The
darkfield, on request, comes from a per-pixel robust line of the raw values
against the planes' medians (``raw ≈ dark + flat·m``), which needs planes of
different brightness; the darkfield's own level, which the medians hide, is
taken as the one that leaves it least varied across the field. Profiles given as files
(:func:`read_profile`: ``.npy`` or ``.tif``) are checked and used as they are.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from tilefusion.errors import InputError
from tilefusion.plan import Plan

__all__ = [
    "apply_profiles",
    "estimate_profiles",
    "read_profile",
    "sample_planes",
    "write_profiles",
]

# Planes are averaged down to at most this many pixels a side for the estimate.
_ESTIMATE_SIDE = 512


def _block_mean(plane: NDArray[Any], factor: tuple[int, int]) -> NDArray[np.float32]:
    """Mean of ``factor`` blocks, over the pixels with data (0 or NaN: none; NaN if none)."""
    fy, fx = factor
    ny, nx = plane.shape[0] // fy * fy, plane.shape[1] // fx * fx
    if (fy, fx) == (1, 1):
        data = plane.astype(np.float32)
        return np.where((data != 0) & np.isfinite(data), data, np.nan)
    cut = plane[:ny, :nx].astype(np.float32)
    cut = np.where((cut != 0) & np.isfinite(cut), cut, np.nan)
    blocks = cut.reshape(ny // fy, fy, nx // fx, fx)
    with np.errstate(invalid="ignore"):
        count = np.sum(np.isfinite(blocks), axis=(1, 3))
        total = np.nansum(blocks, axis=(1, 3))
        return np.where(count > 0, total / np.maximum(count, 1), np.nan).astype(np.float32)


def _factor(shape_yx: Sequence[int]) -> tuple[int, int]:
    return (
        max(1, math.ceil(shape_yx[0] / _ESTIMATE_SIDE)),
        max(1, math.ceil(shape_yx[1] / _ESTIMATE_SIDE)),
    )


def sample_planes(
    plan: Plan, *, max_planes: int = 64
) -> tuple[NDArray[np.float32], tuple[int, int]]:
    """Planes (z slices) sampled evenly from every tile, averaged down for the estimate.

    Returns
    -------
    planes : ndarray of shape (N, y, x), float32
        Block means of the sampled planes (NaN where a block has no data),
        at most ``max_planes`` of them, spread over the tiles and their z.
    shape_yx : tuple of int
        The tiles' yx shape (the profiles' shape), as the plan reads them.

    Raises
    ------
    InputError
        When the tiles differ in yx shape (one profile fits one tile shape).
    """
    from tilefusion.readers import open_array

    shapes = {t.shape_zyx[1:] for t in plan.tiles}
    if len(shapes) != 1:
        raise InputError(
            plan.dataset,
            "fusion.flatfield",
            f"tiles differ in yx shape {sorted(shapes)}; one flatfield fits tiles of one shape",
        )
    shape_yx = (int(plan.tiles[0].shape_zyx[1]), int(plan.tiles[0].shape_zyx[2]))
    factor = _factor(shape_yx)
    per_tile = max(1, max_planes // len(plan.tiles))
    planes: list[NDArray[np.float32]] = []
    for tile in plan.tiles:
        if len(planes) >= max_planes:
            break
        depth = tile.shape_zyx[0]
        chosen = np.unique(np.linspace(0, depth - 1, min(per_tile, depth)).round().astype(int))
        array = open_array(tile.source)
        for z in chosen[: max_planes - len(planes)]:
            plane = array.read((int(z), 0, 0), (int(z) + 1, *shape_yx))[0]
            planes.append(_block_mean(plane, factor))
    return np.stack(planes), shape_yx


def _smooth(
    image: NDArray[np.float64], degree: int, shape_yx: Sequence[int]
) -> NDArray[np.float64]:
    """Least-squares fit of 2D Legendre polynomials up to ``degree`` per axis, ignoring NaN.

    Illumination profiles are smooth to the field's edges, where a smoothing
    filter would bend them (it sees only one side). The fit is evaluated at
    the pixels of a tile of ``shape_yx`` (``image`` holds block means of
    such a tile; see :func:`_resize` for where they lie), beyond the last
    block centre too. ``degree < 0``: no fit, bilinear resampling.
    """
    from numpy.polynomial import legendre

    if degree < 0:
        return _resize(image, shape_yx)
    ny, nx = image.shape
    yy, xx = np.meshgrid(np.linspace(-1, 1, ny), np.linspace(-1, 1, nx), indexing="ij")
    basis = legendre.legvander2d(yy.ravel(), xx.ravel(), [degree, degree])
    known = np.isfinite(image.ravel())
    coef, *_ = np.linalg.lstsq(basis[known], image.ravel()[known], rcond=None)
    factor = np.asarray(shape_yx, dtype=np.float64) / np.asarray(image.shape)
    # pixel p at block coordinate (p + 0.5) / f - 0.5, blocks at -1 .. 1
    u_y, u_x = (
        -1.0 + 2.0 * ((np.arange(n) + 0.5) / f - 0.5) / max(m - 1, 1)
        for n, f, m in zip(shape_yx, factor, image.shape)
    )
    out = legendre.leggrid2d(u_y, u_x, coef.reshape(degree + 1, degree + 1))
    return np.asarray(out, dtype=np.float64)


def _resize(profile: NDArray[np.float64], shape_yx: Sequence[int]) -> NDArray[np.float64]:
    """Bilinear resampling of a block-mean profile back to the tiles' pixels (edges clamped)."""
    if tuple(profile.shape) == tuple(shape_yx):
        return profile
    factor = np.asarray(shape_yx, dtype=np.float64) / np.asarray(profile.shape)
    # pixel p of the tile lies at block coordinate (p + 0.5) / f - 0.5
    u_y, u_x = ((np.arange(n) + 0.5) / f - 0.5 for n, f in zip(shape_yx, factor))
    blocks_y, blocks_x = (np.arange(n, dtype=np.float64) for n in profile.shape)
    rows = np.stack([np.interp(u_x, blocks_x, row) for row in profile])
    return np.stack([np.interp(u_y, blocks_y, column) for column in rows.T], axis=1)


def estimate_profiles(
    planes: NDArray[Any],
    *,
    shape_yx: Sequence[int] | None = None,
    degree: int = 6,
    darkfield: bool = False,
) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """Flatfield (mean 1) and darkfield from sampled planes.

    Parameters
    ----------
    planes : ndarray of shape (N, y, x)
        Raw planes (NaN, or 0, where there is no data), as
        :func:`sample_planes` gives them.
    shape_yx : sequence of 2 ints, optional
        Shape of the profiles returned (default: the planes'); the estimate
        is resampled bilinearly to it.
    degree : int
        Degree (per axis) of the 2D Legendre polynomials fitted to the
        estimate: the illumination is smooth, the sample's structure is not
        (-1: no smoothing).
    darkfield : bool
        Estimate the darkfield too (else it is 0).

    Returns
    -------
    flatfield, darkfield : ndarray of shape ``shape_yx``, float32

    Raises
    ------
    ValueError
        With fewer than 2 planes holding data, or a darkfield asked of
        planes whose brightness hardly differs (their medians within 5 %).
    """
    data = np.asarray(planes, dtype=np.float64)
    data = np.where((data != 0) & np.isfinite(data), data, np.nan)
    if data.ndim != 3:
        raise ValueError(f"planes must be (N, y, x), got shape {data.shape}")
    with np.errstate(invalid="ignore"):
        medians = np.nanmedian(data.reshape(len(data), -1), axis=1)
    usable = np.isfinite(medians) & (medians > 0)
    data, medians = data[usable], medians[usable]
    if len(data) < 2:
        raise ValueError("a flatfield estimate needs at least 2 planes with data")
    out_shape = tuple(shape_yx) if shape_yx is not None else data.shape[1:]
    dark = np.zeros(out_shape)
    if darkfield:
        spread = (np.max(medians) - np.min(medians)) / np.median(medians)
        if spread < 0.05:
            raise ValueError(
                "a darkfield needs planes of different brightness (their medians differ by "
                f"{100 * spread:.1f} %); give it as a file instead"
            )
        slope, intercept = _robust_lines(medians, data)
        # The planes' medians hold the darkfield's own median c, so the
        # intercept is dark - slope·c: c is taken as the value that leaves the
        # darkfield least varied (a camera offset is nearly uniform).
        known = np.isfinite(slope) & np.isfinite(intercept)
        s_k, i_k = slope[known], intercept[known]
        var = float(np.var(s_k))
        c = -float(np.mean((s_k - s_k.mean()) * (i_k - i_k.mean()))) / var if var > 0 else 0.0
        dark = _smooth(intercept + slope * c, degree, out_shape)
        flat = _smooth(slope, degree, out_shape)
    else:
        with np.errstate(invalid="ignore"):
            median = np.nanmedian(data / medians[:, None, None], axis=0)
        flat = _smooth(median, degree, out_shape)
    flat = flat / np.mean(flat)
    return flat.astype(np.float32), dark.astype(np.float32)


def _robust_lines(
    x: NDArray[np.float64], values: NDArray[np.float64], *, iterations: int = 10
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Per pixel, ``values[:, p] ≈ intercept[p] + slope[p] · x`` (Huber reweighting)."""
    known = np.isfinite(values)
    y = np.where(known, values, 0.0)
    w = known.astype(np.float64)
    slope = np.ones(values.shape[1:])
    intercept = np.zeros(values.shape[1:])
    xs = x[:, None, None]
    for _ in range(iterations):
        sw = w.sum(axis=0)
        mx = (w * xs).sum(axis=0) / np.maximum(sw, 1e-12)
        my = (w * y).sum(axis=0) / np.maximum(sw, 1e-12)
        sxx = (w * (xs - mx) ** 2).sum(axis=0)
        sxy = (w * (xs - mx) * (y - my)).sum(axis=0)
        slope = np.where(sxx > 0, sxy / np.maximum(sxx, 1e-12), np.nan)
        intercept = my - slope * mx
        residual = np.where(known, y - (intercept + slope * xs), 0.0)
        scale = 1.4826 * np.median(np.abs(residual[known])) if known.any() else 0.0
        if scale <= 0:
            break
        u = np.abs(residual) / (1.345 * scale)
        w = np.where(known, np.where(u <= 1.0, 1.0, 1.0 / np.maximum(u, 1e-300)), 0.0)
    # per plane medians are of flat·true over the field: the slope is flat / mean(flat)
    return slope, intercept


def apply_profiles(
    values: NDArray[Any], flatfield: NDArray[Any], darkfield: NDArray[Any] | None = None
) -> NDArray[np.float32]:
    """``(values - darkfield) / flatfield`` for planes or stacks (last two axes yx).

    The reference of what the fusion applies; 0 (no data) stays 0.
    """
    raw = np.asarray(values, dtype=np.float32)
    dark = 0.0 if darkfield is None else np.asarray(darkfield, dtype=np.float32)
    out = (raw - dark) / np.asarray(flatfield, dtype=np.float32)
    return np.where(raw != 0, out, 0.0).astype(np.float32)


def read_profile(
    path: str | Path, *, shape_yx: Sequence[int], field: str, positive: bool = False
) -> NDArray[np.float32]:
    """Read a profile (``.npy``, ``.tif``/``.tiff``) and check it against the tiles.

    Raises
    ------
    InputError
        Naming the file and the config key ``field``: missing, another format,
        not 2D (singleton axes are dropped), not of the tiles' yx shape, not
        finite, or (``positive``, a flatfield) not positive everywhere.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            profile = np.load(path, allow_pickle=False)
        elif suffix in (".tif", ".tiff"):
            import tifffile

            profile = tifffile.imread(path)
        else:
            raise InputError(str(path), field, "a profile is a .npy or .tif file")
    except FileNotFoundError:
        raise InputError(str(path), field, "file not found") from None
    except (OSError, ValueError) as exc:
        raise InputError(str(path), field, f"cannot read ({exc})") from None
    profile = np.squeeze(np.asarray(profile))
    if profile.ndim != 2 or tuple(profile.shape) != tuple(shape_yx):
        raise InputError(
            str(path),
            field,
            f"shape {list(profile.shape)} is not the tiles' yx shape {list(shape_yx)}",
        )
    profile = profile.astype(np.float32)
    if not np.all(np.isfinite(profile)):
        raise InputError(str(path), field, "holds values that are not finite")
    if positive and not np.all(profile > 0):
        raise InputError(str(path), field, "a flatfield must be positive everywhere")
    return profile


def write_profiles(
    flatfield_path: str | Path,
    darkfield_path: str | Path,
    flatfield: NDArray[Any],
    darkfield: NDArray[Any],
) -> None:
    """Write both profiles as ``.npy`` (atomically: a killed job leaves none)."""
    import io

    from tilefusion.atomic import write_bytes_atomic

    for path, profile in ((flatfield_path, flatfield), (darkfield_path, darkfield)):
        buffer = io.BytesIO()
        np.save(buffer, np.asarray(profile, dtype=np.float32), allow_pickle=False)
        write_bytes_atomic(path, buffer.getvalue())
