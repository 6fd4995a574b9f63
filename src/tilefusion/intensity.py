"""Intensity matching: one gain and offset per tile from the tiles' overlaps.

Tiles of one acquisition often differ in brightness (bleaching, laser power,
depth); fused, they show seams. For each pair of tiles whose boxes overlap,
:func:`sample_pair` reads both tiles at the same output points (a coarse
grid over the overlap, linear interpolation through each tile's map, only
points where both tiles have data), :func:`fit_pair` fits ``b ≈ s·a + t``
robustly (Huber weights, iteratively reweighted, symmetric in the two noisy
tiles), and :func:`solve_global`
finds per-tile ``gain`` and ``offset`` such that

    gain_i · a + offset_i ≈ gain_j · b + offset_j

on every pair, in the least-squares sense, with the mean gain anchored at 1
and the mean offset at 0 in every connected group of tiles (without the
anchor, all gains 0 would solve it). Corrected values are ``raw · gain +
offset``. The gain is one scalar per tile, or on request a coarse grid of
gains over each tile (:func:`solve_grid`, from every pair's samples at once).

:func:`match_intensities` runs all of it on a plan and :func:`write_intensity`
/ :func:`read_intensity` keep the result as JSON.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from tilefusion import geometry
from tilefusion.atomic import write_json_atomic
from tilefusion.errors import InputError
from tilefusion.plan import Plan, PlannedTile, level_allowance
from tilefusion.readers.arrays import TileArray, open_array, stored_levels

__all__ = [
    "INTENSITY_VERSION",
    "OpenArrays",
    "PairFit",
    "PairSamples",
    "TileIntensity",
    "fit_pair",
    "interpolate",
    "match_intensities",
    "overlapping_pairs",
    "read_intensity",
    "read_intensity_document",
    "read_points",
    "sample_pair",
    "solve_global",
    "solve_grid",
    "write_intensity",
]

log = logging.getLogger("tilefusion")

INTENSITY_VERSION = 1
Model = Literal["gain_offset", "gain", "offset"]
_MODELS = ("gain_offset", "gain", "offset")
# (flatfield, darkfield), yx arrays over a tile's yx extent
Profiles = tuple[NDArray[Any], NDArray[Any]]

# Largest tile crop (voxels) read at once while sampling; points needing more are split.
_CROP_VOXELS = 1 << 23


@dataclass(frozen=True)
class TileIntensity:
    """A tile's correction: ``corrected = raw * gain + offset``.

    ``gain`` is a scalar, or a coarse (gz, gy, gx) grid over the tile
    interpolated trilinearly (nodes on the corner voxels' centres, see
    :func:`tilefusion.corrections.sample_grid`).
    """

    gain: float | NDArray[np.float64] = 1.0
    offset: float = 0.0

    def at(self, tile: PlannedTile, points: NDArray[np.float64]) -> NDArray[np.float64]:
        """The gain at output points (N, 3) of ``tile``."""
        if np.ndim(self.gain) == 0:
            return np.full(len(points), float(self.gain))
        from tilefusion.corrections import sample_grid

        coords = geometry.transform_points(geometry.invert(tile.tile_to_output), points)
        return sample_grid(self.gain, coords.T, tile.shape_zyx)

    def apply(
        self, tile: PlannedTile, points: NDArray[np.float64], values: NDArray[np.float64]
    ) -> NDArray[np.float64]:
        """Corrected ``values`` of ``tile`` at output points (N, 3)."""
        return self.at(tile, points) * values + self.offset


@dataclass(frozen=True)
class PairSamples:
    """Values of two tiles at the same output points, where both have data.

    Attributes
    ----------
    tiles : tuple of int
        Indices into ``plan.tiles`` (``i < j``).
    points : ndarray of shape (N, 3)
        Output voxel indices (level 0) of the samples.
    a, b : ndarray of shape (N,)
        Tile ``i``'s and tile ``j``'s values there (float64).
    """

    tiles: tuple[int, int]
    points: NDArray[np.float64]
    a: NDArray[np.float64]
    b: NDArray[np.float64]


@dataclass(frozen=True)
class PairFit:
    """A robust fit ``b ≈ scale * a + shift`` over one pair's samples.

    ``inliers`` is the summed Huber weight (an effective number of samples);
    ``residual`` the robust residual scale (1.4826 · MAD).
    """

    tiles: tuple[int, int]
    scale: float
    shift: float
    samples: int
    inliers: float
    residual: float


def overlapping_pairs(plan: Plan) -> list[tuple[int, int]]:
    """Pairs ``(i, j)``, ``i < j``, of tiles whose output boxes overlap.

    On an axis where both tiles have some extent the overlap must have some
    too (tiles that only touch are not a pair); a flat axis (2D tiles) only
    needs the boxes to meet.
    """
    if len(plan.tiles) < 2:
        return []
    lo = np.array([t.box_lo for t in plan.tiles])
    hi = np.array([t.box_hi for t in plan.tiles])
    flat = (hi - lo) <= 0
    pairs: list[tuple[int, int]] = []
    for i in range(len(plan.tiles) - 1):
        o_lo = np.maximum(lo[i], lo[i + 1 :])
        o_hi = np.minimum(hi[i], hi[i + 1 :])
        both_flat = flat[i] | flat[i + 1 :]
        ok = np.where(both_flat, o_hi >= o_lo, o_hi > o_lo).all(axis=1)
        pairs.extend((i, i + 1 + int(k)) for k in np.flatnonzero(ok))
    return pairs


def _grid_points(lo: NDArray[np.float64], hi: NDArray[np.float64], count: int) -> NDArray[Any]:
    """About ``count`` points on a regular grid of cell centres over ``[lo, hi]``."""
    extent = np.maximum(hi - lo, 0.0)
    open_axes = extent > 0
    n_open = int(open_axes.sum())
    per_axis = np.ones(3, dtype=int)
    if n_open:
        volume = float(np.prod(extent[open_axes]))
        side = (volume / max(count, 1)) ** (1.0 / n_open)
        per_axis[open_axes] = np.maximum(1, np.floor(extent[open_axes] / side)).astype(int)
        while int(np.prod(per_axis)) > count and per_axis.max() > 1:
            per_axis[int(np.argmax(per_axis))] -= 1
    axes = [lo[k] + (np.arange(per_axis[k]) + 0.5) * extent[k] / per_axis[k] for k in range(3)]
    zz, yy, xx = np.meshgrid(*axes, indexing="ij")
    return np.column_stack([zz.ravel(), yy.ravel(), xx.ravel()])


def interpolate(
    data: NDArray[Any], coords: NDArray[np.float64], *, offset: Sequence[int] = (0, 0, 0)
) -> tuple[NDArray[np.float64], NDArray[np.bool_]]:
    """Trilinear values of ``data`` at voxel coordinates (N, 3), and where they hold data.

    ``coords`` are relative to ``offset`` (the crop's first voxel in the
    tile). A value holds data where every neighbour with a non-zero weight is
    neither 0 nor NaN (the fusion's no-data values), so an edge of missing
    data does not pull values towards 0. Coordinates must lie inside the
    crop (up to its last voxel).
    """
    local = np.asarray(coords, dtype=np.float64) - np.asarray(offset, dtype=np.float64)
    shape = np.asarray(data.shape)
    base = np.clip(np.floor(local).astype(np.int64), 0, np.maximum(shape - 2, 0))
    frac = np.clip(local - base, 0.0, 1.0)
    frac[:, shape < 2] = 0.0
    upper = np.minimum(base + 1, shape - 1)
    values = np.zeros(len(local))
    valid = np.ones(len(local), dtype=bool)
    for dz in (0, 1):
        wz = frac[:, 0] if dz else 1.0 - frac[:, 0]
        iz = upper[:, 0] if dz else base[:, 0]
        for dy in (0, 1):
            wy = frac[:, 1] if dy else 1.0 - frac[:, 1]
            iy = upper[:, 1] if dy else base[:, 1]
            for dx in (0, 1):
                wx = frac[:, 2] if dx else 1.0 - frac[:, 2]
                ix = upper[:, 2] if dx else base[:, 2]
                weight = wz * wy * wx
                v = data[iz, iy, ix].astype(np.float64)
                used = weight > 0
                valid &= ~used | ((v != 0) & np.isfinite(v))
                values += weight * np.where(used, np.nan_to_num(v), 0.0)
    return values, valid


def read_points(
    array: TileArray, coords: NDArray[np.float64]
) -> tuple[NDArray[np.float64], NDArray[np.bool_]]:
    """Interpolate an array at voxel coordinates (N, 3), reading crops of bounded size.

    Returns the values and where they hold data (see :func:`interpolate`).
    Points are grouped into crops of at most 8 Mvoxel, split along their
    longest axis, so scattered points do not read everything between them.
    """
    values = np.zeros(len(coords))
    valid = np.zeros(len(coords), dtype=bool)
    if not len(coords):
        return values, valid
    size = np.asarray(array.shape)
    pending = [np.arange(len(coords))]
    while pending:
        idx = pending.pop()
        pts = coords[idx]
        lo = np.clip(np.floor(pts.min(axis=0)).astype(int), 0, size - 1)
        hi = np.clip(np.floor(pts.max(axis=0)).astype(int) + 2, 1, size)
        if math.prod((hi - lo).tolist()) > _CROP_VOXELS and len(idx) > 1:
            axis = int(np.argmax(hi - lo))
            order = np.argsort(pts[:, axis], kind="stable")
            half = len(idx) // 2
            pending.extend([idx[order[:half]], idx[order[half:]]])
            continue
        crop = array.read(lo.tolist(), hi.tolist())
        values[idx], valid[idx] = interpolate(crop, pts, offset=lo.tolist())
    return values, valid


@dataclass(frozen=True)
class _Level:
    array_source: Any
    to_output: NDArray[np.float64]
    shape: tuple[int, ...]


def _pair_levels(tile_a: PlannedTile, tile_b: PlannedTile, spacing: float) -> tuple[_Level, _Level]:
    """The stored level each tile of a pair is sampled at: the same factors for both.

    Both tiles must average over the same extent, or the fit of one against
    the other is biased. The coarsest level stored with both (same factors)
    whose voxel is at most half the sample spacing on every axis is used;
    otherwise the level the plan fuses from.
    """
    planned = (
        _Level(tile_a.source, tile_a.tile_to_output, tile_a.shape_zyx),
        _Level(tile_b.source, tile_b.tile_to_output, tile_b.shape_zyx),
    )
    if tile_a.level or tile_b.level or spacing < 4.0:
        return planned
    levels_a = {tuple(lv.factors_zyx): lv for lv in stored_levels(tile_a.source)[1:]}
    levels_b = {tuple(lv.factors_zyx): lv for lv in stored_levels(tile_b.source)[1:]}
    # A factor of 1 (an axis the level keeps) always fits.
    allowed_a = np.maximum(level_allowance(tile_a.tile_to_output) * spacing / 2.0, 1.0)
    allowed_b = np.maximum(level_allowance(tile_b.tile_to_output) * spacing / 2.0, 1.0)
    common = [
        f
        for f in levels_a.keys() & levels_b.keys()
        if np.all(np.asarray(f) <= allowed_a) and np.all(np.asarray(f) <= allowed_b)
    ]
    if not common:
        return planned
    best = max(common, key=lambda f: (math.prod(f), f))
    chosen = []
    for tile, lv in ((tile_a, levels_a[best]), (tile_b, levels_b[best])):
        try:
            shape = tuple(open_array(lv.source).shape)
        except InputError:
            return planned
        chosen.append(_Level(lv.source, tile.tile_to_output @ lv.to_level0, shape))
    return chosen[0], chosen[1]


class OpenArrays:
    """Arrays opened once per source, shared by the threads that sample them."""

    def __init__(self) -> None:
        self._open: dict[Any, TileArray] = {}
        self._lock = threading.Lock()

    def get(self, source: Any) -> TileArray:
        with self._lock:
            if source not in self._open:
                self._open[source] = open_array(source)
            return self._open[source]


def sample_pair(
    plan: Plan,
    pair: tuple[int, int],
    *,
    max_samples: int = 4096,
    arrays: OpenArrays | None = None,
    profiles: Profiles | None = None,
) -> PairSamples:
    """Read both tiles of a pair at a coarse grid of output points in their overlap.

    The points are cell centres of a regular grid over the intersection of
    the two tiles' output boxes, at most ``max_samples``; each tile is read
    by linear interpolation through its map (from a coarser stored level
    where both tiles store one fine enough for the grid's spacing, see
    :func:`_pair_levels`), reading crops of bounded size. Points outside
    either tile, or where either has no data (0 or NaN), are dropped.

    ``profiles`` (flatfield, darkfield: yx arrays of the tiles' yx shape as
    planned) correct the values as ``(value - dark) / flat`` at each
    point's yx, as the fusion will; the tiles are then read at the level
    planned.
    """
    i, j = pair
    tile_a, tile_b = plan.tiles[i], plan.tiles[j]
    lo = np.maximum(tile_a.box_lo, tile_b.box_lo)
    hi = np.minimum(tile_a.box_hi, tile_b.box_hi)
    points = _grid_points(lo, hi, max_samples)
    extent = np.maximum(hi - lo, 0.0)
    open_axes = extent > 0
    spacing = (
        float((np.prod(extent[open_axes]) / max(len(points), 1)) ** (1.0 / open_axes.sum()))
        if open_axes.any()
        else 1.0
    )
    arrays = arrays or OpenArrays()
    if profiles is None:
        level_a, level_b = _pair_levels(tile_a, tile_b, spacing)
    else:
        level_a = _Level(tile_a.source, tile_a.tile_to_output, tile_a.shape_zyx)
        level_b = _Level(tile_b.source, tile_b.tile_to_output, tile_b.shape_zyx)
    keep = np.ones(len(points), dtype=bool)
    coords = []
    for level in (level_a, level_b):
        c = geometry.transform_points(geometry.invert(level.to_output), points)
        size = np.asarray(level.shape, dtype=np.float64)
        keep &= np.all((c >= -1e-6) & (c <= size - 1 + 1e-6), axis=1)
        coords.append(np.clip(c, 0.0, size - 1))
    a, ok_a = read_points(arrays.get(level_a.array_source), coords[0][keep])
    b, ok_b = read_points(arrays.get(level_b.array_source), coords[1][keep])
    both = ok_a & ok_b
    if profiles is not None:
        a = _flat_corrected(a, coords[0][keep], profiles)
        b = _flat_corrected(b, coords[1][keep], profiles)
    return PairSamples(tiles=(i, j), points=points[keep][both], a=a[both], b=b[both])


def _flat_corrected(
    values: NDArray[np.float64], coords: NDArray[np.float64], profiles: Profiles
) -> NDArray[np.float64]:
    """``(value - dark) / flat`` with both profiles interpolated at the points' yx."""
    flat, dark = (np.asarray(p, dtype=np.float64)[None] for p in profiles)
    yx = np.column_stack([np.zeros(len(coords)), coords[:, 1], coords[:, 2]])
    f, _ = interpolate(flat, yx)
    d, _ = interpolate(dark, yx)
    return (values - d) / f


_HUBER_K = 1.345


def _robust_lstsq(
    design: NDArray[np.float64],
    target: NDArray[np.float64],
    *,
    iterations: int = 30,
    prior: NDArray[np.float64] | None = None,
) -> tuple[NDArray[np.float64], NDArray[np.float64], float]:
    """Huber-weighted least squares by iterative reweighting: coefficients, weights, scale.

    ``prior`` multiplies the Huber weights (0 leaves a sample out).
    """
    prior = np.ones(len(target)) if prior is None else prior
    weights = prior.copy()
    coef: NDArray[np.float64] = np.zeros(design.shape[1])
    scale = 0.0
    for _ in range(iterations):
        root = np.sqrt(weights)
        coef_new, *_ = np.linalg.lstsq(design * root[:, None], target * root, rcond=None)
        residual = target - design @ coef_new
        kept = residual[prior > 0]
        scale = 1.4826 * float(np.median(np.abs(kept - np.median(kept)))) if len(kept) else 0.0
        done = np.allclose(coef_new, coef, rtol=1e-9, atol=1e-12)
        coef = np.asarray(coef_new, dtype=np.float64)
        if scale <= 0.0 or done:
            break
        u = np.abs(residual) / (_HUBER_K * scale)
        weights = prior * np.where(u <= 1.0, 1.0, 1.0 / np.maximum(u, 1e-300))
    return coef, weights, scale


def fit_pair(samples: PairSamples, *, model: Model = "gain_offset") -> PairFit:
    """Fit ``b ≈ scale * a + shift`` robustly over one pair's samples.

    Parameters
    ----------
    samples : PairSamples
    model : {"gain_offset", "gain", "offset"}
        Fit both, ``scale`` only (``shift = 0``), or ``shift`` only
        (``scale = 1``). Where the samples of ``a`` hardly vary (a flat
        overlap: relative spread under 1e-3), gain and offset cannot be told
        apart and ``"gain_offset"`` fits the gain only.

    Returns
    -------
    PairFit
        Huber weights (k = 1.345 robust standard deviations) down-weight
        samples that disagree: a structure in one tile only, a saturated or
        bleached spot. Both tiles' values are noisy, so ``scale`` is the
        geometric mean of the robust slopes of ``b`` on ``a`` and of ``a`` on
        ``b`` inverted (the first is biased low, the second high, by the
        noise; a reduced-major-axis fit), ``shift`` follows from the weighted
        means, with each sample's weight the smaller of its two.
    """
    if model not in _MODELS:
        raise ValueError(f"model must be one of {', '.join(_MODELS)}, got {model!r}")
    a, b = samples.a, samples.b
    n = len(a)
    if n == 0:
        return PairFit(samples.tiles, 1.0, 0.0, 0, 0.0, 0.0)
    if model == "gain_offset" and np.std(a) <= 1e-3 * max(abs(float(np.mean(a))), 1e-12):
        model = "gain"
    if model in ("gain_offset", "gain"):
        with_offset = model == "gain_offset"

        def design(x: NDArray[np.float64]) -> NDArray[np.float64]:
            return np.column_stack([x, np.ones(n)]) if with_offset else x[:, None]

        # Both tiles are noisy: b on a underestimates the slope by the
        # noise's share of a's variance (errors in variables), a on b
        # overestimates it as much; their geometric mean does not.
        forward, w_ab, spread = _robust_lstsq(design(a), b)
        # Samples the forward fit rejects stay out of the backward one, where
        # they would be leverage points (outliers in the regressor).
        inlier = np.abs(b - design(a) @ forward) <= 3.0 * _HUBER_K * max(spread, 1e-300)
        backward, w_ba, _ = _robust_lstsq(design(b), a, prior=inlier.astype(np.float64))
        scale = float(forward[0])
        if scale > 0 and backward[0] > 0:
            scale = math.sqrt(scale / float(backward[0]))
        weights = np.minimum(w_ab, w_ba)
        shift = 0.0
        if with_offset:
            total = max(float(weights.sum()), 1e-300)
            shift = float((weights * b).sum() / total - scale * (weights * a).sum() / total)
        residual = b - (scale * a + shift)
        resid = 1.4826 * float(np.median(np.abs(residual - np.median(residual))))
    else:
        coef, weights, resid = _robust_lstsq(np.ones((n, 1)), b - a)
        scale, shift = 1.0, float(coef[0])
    return PairFit(samples.tiles, scale, shift, n, float(weights.sum()), resid)


def _components(n_tiles: int, fits: Sequence[PairFit]) -> list[list[int]]:
    parent = list(range(n_tiles))

    def root(k: int) -> int:
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    for fit in fits:
        a, b = root(fit.tiles[0]), root(fit.tiles[1])
        if a != b:
            parent[max(a, b)] = min(a, b)
    groups: dict[int, list[int]] = {}
    for k in range(n_tiles):
        groups.setdefault(root(k), []).append(k)
    return list(groups.values())


def _anchored_solve(
    n_tiles: int,
    rows: Sequence[tuple[int, int, float, float, float]],
    groups: Sequence[Sequence[int]],
    mean: float,
) -> NDArray[np.float64]:
    """Least squares of ``x_i - c * x_j = rhs`` (weight ``w``), each group's mean at ``mean``."""
    n_rows = len(rows) + len(groups)
    matrix = np.zeros((n_rows, n_tiles))
    rhs = np.zeros(n_rows)
    for r, (i, j, c, value, w) in enumerate(rows):
        root = math.sqrt(w)
        matrix[r, i] += root
        matrix[r, j] -= root * c
        rhs[r] = root * value
    # The anchor is meant as a constraint: it outweighs every pair.
    heavy = 1e3 * math.sqrt(max([w for *_, w in rows], default=1.0))
    for g, members in enumerate(groups):
        matrix[len(rows) + g, members] = heavy / len(members)
        rhs[len(rows) + g] = heavy * mean
    solution, *_ = np.linalg.lstsq(matrix, rhs, rcond=None)
    return np.asarray(solution, dtype=np.float64)


def solve_global(
    n_tiles: int, fits: Sequence[PairFit], *, model: Model = "gain_offset"
) -> list[TileIntensity]:
    """Per-tile gains and offsets that make every fitted pair agree.

    Pair ``(i, j)`` with ``b ≈ s·a + t`` asks for ``gain_i·a + offset_i =
    gain_j·b + offset_j`` at every ``a``: ``gain_i = s·gain_j`` and
    ``offset_i = t·gain_j + offset_j``. The gains are solved first (weighted
    least squares, weight = the fit's effective samples), the offsets with
    them. In each connected group of tiles the mean gain is held at 1 and
    the mean offset at 0; a tile in no pair keeps gain 1 and offset 0. Pairs
    whose fitted scale is not positive (no relation between the tiles) are
    left out.

    Raises
    ------
    ValueError
        When a solved gain is not positive (pairs that contradict each
        other, such as a negative fitted scale).
    """
    usable = [f for f in fits if f.inliers > 0 and f.scale > 0]
    if len(usable) < len([f for f in fits if f.inliers > 0]):
        log.warning("intensity: pairs with a fitted scale <= 0 left out (unrelated overlaps?)")
    groups = _components(n_tiles, usable)
    gains = np.ones(n_tiles)
    if model != "offset" and usable:
        rows = [(f.tiles[0], f.tiles[1], f.scale, 0.0, f.inliers) for f in usable]
        gains = _anchored_solve(n_tiles, rows, groups, 1.0)
        if np.any(gains <= 0):
            raise ValueError(f"intensity matching found non-positive gains: {gains.tolist()}")
    offsets = np.zeros(n_tiles)
    if model != "gain" and usable:
        rows = [
            (f.tiles[0], f.tiles[1], 1.0, f.shift * gains[f.tiles[1]], f.inliers) for f in usable
        ]
        offsets = _anchored_solve(n_tiles, rows, groups, 0.0)
    return [TileIntensity(float(g), float(o)) for g, o in zip(gains, offsets)]


def _grid_weights(
    coords: NDArray[np.float64], shape: Sequence[int], grid: Sequence[int]
) -> tuple[NDArray[np.int64], NDArray[np.float64]]:
    """Flat node indices (N, 8) and trilinear weights (N, 8) of tile coordinates on a grid.

    Node ``i`` of an axis with ``g`` nodes sits at ``i * (size - 1) / (g - 1)``,
    as :func:`tilefusion.corrections.sample_grid` interpolates.
    """
    base, frac = [], []
    for axis in range(3):
        g = int(grid[axis])
        span = max(int(shape[axis]) - 1, 1)
        u = np.clip(coords[:, axis] * ((g - 1) / span), 0.0, g - 1.0) if g > 1 else 0 * coords[:, 0]
        i0 = np.minimum(np.floor(u).astype(np.int64), max(g - 2, 0))
        base.append(i0)
        frac.append(u - i0 if g > 1 else 0.0 * u)
    index, weight = [], []
    for dz in (0, 1):
        for dy in (0, 1):
            for dx in (0, 1):
                iz = np.minimum(base[0] + dz, grid[0] - 1)
                iy = np.minimum(base[1] + dy, grid[1] - 1)
                ix = np.minimum(base[2] + dx, grid[2] - 1)
                w = (
                    (frac[0] if dz else 1 - frac[0])
                    * (frac[1] if dy else 1 - frac[1])
                    * (frac[2] if dx else 1 - frac[2])
                )
                index.append((iz * grid[1] + iy) * grid[2] + ix)
                weight.append(np.asarray(w, dtype=np.float64))
    return np.stack(index, axis=1), np.stack(weight, axis=1)


def _sparse_lstsq(
    rows: NDArray[np.int64],
    cols: NDArray[np.int64],
    vals: NDArray[np.float64],
    rhs: NDArray[np.float64],
    n_cols: int,
    x0: NDArray[np.float64],
    *,
    iterations: int = 500,
) -> NDArray[np.float64]:
    """Least squares of a sparse (COO) system by conjugate gradients on the normal equations."""
    n_rows = len(rhs)

    def forward(x: NDArray[np.float64]) -> NDArray[np.float64]:
        return np.asarray(np.bincount(rows, weights=vals * x[cols], minlength=n_rows), float)

    def backward(y: NDArray[np.float64]) -> NDArray[np.float64]:
        return np.asarray(np.bincount(cols, weights=vals * y[rows], minlength=n_cols), float)

    x = x0.copy()
    r = backward(rhs - forward(x))
    p = r.copy()
    rr = float(r @ r)
    start = rr
    for _ in range(iterations):
        if rr <= 1e-24 * max(start, 1e-300):
            break
        ap = forward(p)
        alpha = rr / max(float(ap @ ap), 1e-300)
        x += alpha * p
        r -= alpha * backward(ap)
        rr_new = float(r @ r)
        p = r + (rr_new / rr) * p
        rr = rr_new
    return x


def solve_grid(
    plan: Plan,
    samples: Sequence[PairSamples],
    fits: Sequence[PairFit],
    scalar: Sequence[TileIntensity],
    *,
    grid_zyx: Sequence[int],
    model: Model = "gain_offset",
    smoothness: float = 0.03,
    rows_per_pair: int = 2048,
) -> list[TileIntensity]:
    """Per-tile gain grids (and scalar offsets) from every pair's samples at once.

    Each sample of pair ``(i, j)`` asks for ``G_i(p)·a + o_i = G_j(p)·b + o_j``,
    ``G`` a tile's gain grid interpolated trilinearly at the sample's place
    in that tile; rows are divided by the pair's mean intensity and weighted
    by the pair fit's Huber weight of the sample (samples the scalar fit
    rejects stay rejected). Neighbouring nodes of a grid are tied by
    ``smoothness`` (relative to the rows a tile has), every node weakly to
    the tile's scalar gain (so a node no sample reaches keeps it). Solved
    by conjugate gradients, started from the scalar solution; then each
    connected group is scaled to mean gain 1 and shifted to mean offset 0.
    """
    grid = tuple(int(g) for g in grid_zyx)
    if len(grid) != 3 or min(grid) < 1:
        raise ValueError(f"grid_zyx must be 3 positive integers, got {grid_zyx}")
    nodes = math.prod(grid)
    n_tiles = len(plan.tiles)
    with_offset = model == "gain_offset"
    n_cols = n_tiles * nodes + (n_tiles if with_offset else 0)
    row_parts: list[NDArray[np.int64]] = []
    col_parts: list[NDArray[np.int64]] = []
    val_parts: list[NDArray[np.float64]] = []
    rhs_parts: list[NDArray[np.float64]] = []
    count = 0
    per_tile = np.zeros(n_tiles)
    for smp, fit in zip(samples, fits):
        step = max(1, len(smp.a) // rows_per_pair)
        a, b, pts = smp.a[::step], smp.b[::step], smp.points[::step]
        if not len(a):
            continue
        residual = b - (fit.scale * a + fit.shift)
        u = np.abs(residual) / (_HUBER_K * max(fit.residual, 1e-12))
        weight = np.sqrt(np.where(u <= 1.0, 1.0, 1.0 / np.maximum(u, 1e-300)))
        weight /= max(float(np.mean(np.abs(a) + np.abs(b))) / 2.0, 1e-12)
        n = len(a)
        rows = count + np.arange(n)
        i, j = smp.tiles
        for tile_index, values, sign in ((i, a, 1.0), (j, b, -1.0)):
            tile = plan.tiles[tile_index]
            coords = geometry.transform_points(geometry.invert(tile.tile_to_output), pts)
            idx, w = _grid_weights(coords, tile.shape_zyx, grid)
            row_parts.append(np.repeat(rows, 8))
            col_parts.append((tile_index * nodes + idx).ravel())
            val_parts.append((sign * weight[:, None] * w * values[:, None]).ravel())
            if with_offset:
                row_parts.append(rows)
                col_parts.append(np.full(n, n_tiles * nodes + tile_index))
                val_parts.append(sign * weight)
            per_tile[tile_index] += n
        rhs_parts.append(np.zeros(n))
        count += n
    # ties between neighbouring nodes, and of each node to the scalar gain
    strides = (grid[1] * grid[2], grid[2], 1)
    flat_nodes = np.arange(nodes)
    node_zyx = np.stack(np.unravel_index(flat_nodes, grid), axis=1)
    x0 = np.zeros(n_cols)
    for t in range(n_tiles):
        scalar_gain = float(np.mean(scalar[t].gain))
        x0[t * nodes : (t + 1) * nodes] = scalar_gain
        if with_offset:
            x0[n_tiles * nodes + t] = scalar[t].offset
        tie = smoothness * math.sqrt(max(per_tile[t], 1.0) / nodes)
        for axis in range(3):
            near = flat_nodes[node_zyx[:, axis] < grid[axis] - 1]
            if not len(near):
                continue
            rows = count + np.arange(len(near))
            row_parts += [rows, rows]
            col_parts += [t * nodes + near, t * nodes + near + strides[axis]]
            val_parts += [np.full(len(near), tie), np.full(len(near), -tie)]
            rhs_parts.append(np.zeros(len(near)))
            count += len(near)
        prior = 1e-3 * tie
        rows = count + flat_nodes
        row_parts.append(rows)
        col_parts.append(t * nodes + flat_nodes)
        val_parts.append(np.full(nodes, prior))
        rhs_parts.append(np.full(nodes, prior * scalar_gain))
        count += nodes
    solution = _sparse_lstsq(
        np.concatenate(row_parts),
        np.concatenate(col_parts),
        np.concatenate(val_parts),
        np.concatenate(rhs_parts),
        n_cols,
        x0,
    )
    gains = solution[: n_tiles * nodes].reshape(n_tiles, nodes)
    offsets = solution[n_tiles * nodes :] if with_offset else np.zeros(n_tiles)
    for members in _components(n_tiles, [f for f in fits if f.inliers > 0 and f.scale > 0]):
        scale = float(np.mean(gains[members]))
        gains[members] /= scale
        offsets[members] = offsets[members] / scale
        offsets[members] -= float(np.mean(offsets[members]))
    if np.any(gains <= 0):
        raise ValueError("intensity matching found non-positive gains in a grid")
    return [TileIntensity(gains[t].reshape(grid).copy(), float(offsets[t])) for t in range(n_tiles)]


def match_intensities(
    plan: Plan,
    *,
    model: Model = "gain_offset",
    max_samples: int = 4096,
    min_samples: int = 64,
    threads: int | None = None,
    profiles: Profiles | None = None,
    grid_zyx: Sequence[int] = (1, 1, 1),
) -> dict[str, Any]:
    """Estimate every tile's gain and offset from the plan's overlaps.

    Parameters
    ----------
    plan : Plan
    model : {"gain_offset", "gain", "offset"}
        What is corrected (see :func:`fit_pair`).
    max_samples : int
        Sample points per pair (a coarse grid over the overlap); bounds the
        reads and the time per pair.
    min_samples : int
        Pairs with fewer points where both tiles have data are left out.
    threads : int, optional
        Pairs sampled at once (default: the CPUs this process may use).
    profiles : (flatfield, darkfield), optional
        Illumination profiles the fusion applies before the gains: the pairs
        are fitted on corrected values (see :func:`sample_pair`).
    grid_zyx : sequence of 3 ints
        Nodes of each tile's gain grid (default one: a scalar gain); more
        nodes follow gains that vary inside a tile (attenuation with depth,
        uneven illumination left by the flatfield), see :func:`solve_grid`.

    Returns
    -------
    dict
        The JSON document :func:`write_intensity` writes: ``tiles`` (name to
        ``gain`` and ``offset``) and ``pairs`` (each fitted pair: tile names,
        ``samples``, ``inliers``, ``scale``, ``shift``, ``residual``, and the
        relative mismatch left after correction, ``residual_ratio``).
    """
    from concurrent.futures import ThreadPoolExecutor

    from tilefusion.devices import usable_cpus

    if model not in _MODELS:
        raise ValueError(f"model must be one of {', '.join(_MODELS)}, got {model!r}")
    pairs = overlapping_pairs(plan)
    arrays = OpenArrays()
    workers = max(1, threads if threads is not None else usable_cpus())

    def one(pair: tuple[int, int]) -> tuple[PairSamples, PairFit]:
        samples = sample_pair(plan, pair, max_samples=max_samples, arrays=arrays, profiles=profiles)
        return samples, fit_pair(samples, model=model)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(one, pairs))
    fits = [fit for samples, fit in results if fit.samples >= min_samples]
    skipped = len(results) - len(fits)
    if skipped:
        log.info(
            "intensity: %d of %d pairs have under %d samples", skipped, len(pairs), min_samples
        )
    solution = solve_global(len(plan.tiles), fits, model=model)
    if tuple(grid_zyx) != (1, 1, 1):
        if model == "offset":
            raise ValueError("a gain grid needs a model with a gain (gain_offset or gain)")
        kept_samples = [smp for smp, fit in results if fit.samples >= min_samples]
        solution = solve_grid(plan, kept_samples, fits, solution, grid_zyx=grid_zyx, model=model)
    names = [t.name for t in plan.tiles]
    kept = {fit.tiles for fit in fits}
    pair_docs = []
    for samples, fit in results:
        if fit.tiles not in kept:
            continue
        i, j = fit.tiles
        ca = solution[i].apply(plan.tiles[i], samples.points, samples.a)
        cb = solution[j].apply(plan.tiles[j], samples.points, samples.b)
        pair_docs.append(
            {
                "tiles": [names[i], names[j]],
                "samples": fit.samples,
                "inliers": round(fit.inliers, 3),
                "scale": fit.scale,
                "shift": fit.shift,
                "residual": fit.residual,
                "residual_ratio": float(np.median(cb / np.where(ca != 0, ca, np.nan))),
            }
        )
    log.info(
        "intensity: %d tiles, %d pairs fitted, gains %.4g..%.4g",
        len(names),
        len(fits),
        min(float(np.min(s.gain)) for s in solution),
        max(float(np.max(s.gain)) for s in solution),
    )
    return {
        "tilefusion_intensity": INTENSITY_VERSION,
        "model": model,
        "grid_zyx": list(grid_zyx),
        "tiles": {
            n: {"gain": np.asarray(s.gain).tolist(), "offset": s.offset}
            for n, s in zip(names, solution)
        },
        "pairs": pair_docs,
    }


def write_intensity(path: str | Path, document: Mapping[str, Any]) -> None:
    """Write :func:`match_intensities`' document (atomically)."""
    write_json_atomic(path, document)


def read_intensity(path: str | Path) -> dict[str, TileIntensity]:
    """Read an intensity file: tile name to its :class:`TileIntensity`.

    Raises
    ------
    InputError
        When the file is missing, not JSON, of another version, or holds a
        gain that is not a positive finite number or an offset that is not
        finite.
    """
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise InputError(str(path), "", "intensity file not found") from None
    except (OSError, ValueError) as exc:
        raise InputError(str(path), "", f"not an intensity file ({exc})") from None
    return read_intensity_document(data, source=str(path))


def read_intensity_document(
    data: Any, *, source: str = "intensity document"
) -> dict[str, TileIntensity]:
    """:func:`read_intensity` of a document already loaded (``source`` names it in errors)."""
    path = source
    if not isinstance(data, dict) or data.get("tilefusion_intensity") != INTENSITY_VERSION:
        raise InputError(str(path), "tilefusion_intensity", "not an intensity file of this version")
    tiles = data.get("tiles")
    if not isinstance(tiles, dict):
        raise InputError(str(path), "tiles", "must map tile names to gain and offset")
    out = {}
    for name, entry in tiles.items():
        try:
            gain = np.asarray(entry["gain"], dtype=np.float64)
            offset = float(entry["offset"])
        except (TypeError, KeyError, ValueError):
            raise InputError(str(path), f"tiles.{name}", "needs numbers gain and offset") from None
        if gain.ndim not in (0, 3) or not gain.size:
            raise InputError(str(path), f"tiles.{name}.gain", "a number or a (z, y, x) grid")
        if not (np.all(np.isfinite(gain)) and np.all(gain > 0) and math.isfinite(offset)):
            shown = float(gain) if gain.ndim == 0 else "grid"
            raise InputError(
                str(path),
                f"tiles.{name}",
                f"gain {shown} must be positive, offset {offset} finite",
            )
        out[str(name)] = TileIntensity(float(gain) if gain.ndim == 0 else gain, offset)
    return out
