"""Seam metrics: how well overlapping tiles agree, and how visible their borders are.

Two kinds of measure, written by the validate step into the QC report and
``seams.json``:

Per overlapping pair, from the tiles (:func:`pair_agreement`)
    ``ncc``, the normalised cross-correlation (Pearson) of the two tiles'
    values at the same points of their overlap (1: same structure; it does
    not see gain or offset), and ``ratio``, the mean of tile ``j``'s values
    over the mean of tile ``i``'s there (1: same brightness); ``ratio_corrected``
    the same after the intensity correction, when one was applied.

In the fused image (:func:`seam_contrast`)
    A seam is where the fused image stops following the tiles. At points
    ``p`` on each face of each tile ``i`` (where its data end) that lie
    inside another tile ``k``, with ``n`` the face's outward normal, the fused
    image ``f`` and tile ``k``'s own values are read (linear interpolation)
    at probes ``p + u·n`` beyond the face and ``p - u·n`` inside it, for ``u``
    in ``depth · (1/8, 1/4, 1/2, 1)`` (output voxels; probes outside tile
    ``k`` left out). Beyond the face only ``k`` (and tiles other than ``i``)
    make ``f``, so a least-squares fit ``f ≈ α·k + β`` there, over the face's
    probes, is ``k``'s correction as fused. Inside the face tile ``i`` is
    blended in; where it agrees with ``k`` the fit still holds. The seam
    contrast of a set of faces is

        Σ |f - (α·k + β)| / Σ f      (over the probes inside the faces)

    the mean relative departure of the fused image from its neighbour's
    picture of the same content: 0 for a seamless fusion whatever the
    content, and about ``w · |r - 1|`` for a tile ``r`` times as bright as its
    neighbour, with ``w`` its share of the blend (1/2 for ``mean`` blending
    well inside the overlap; less near the face for ``cosine``, which ramps
    the tile in over ``blend_range``). Probes where the fused image or the
    tile have no data are left out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from tilefusion import geometry
from tilefusion.devices import usable_cpus
from tilefusion.intensity import (
    OpenArrays,
    PairSamples,
    Profiles,
    TileIntensity,
    overlapping_pairs,
    read_points,
    sample_pair,
)
from tilefusion.plan import Plan
from tilefusion.readers.base import ArraySource

__all__ = ["pair_agreement", "seam_contrast", "seam_metrics"]

_PROBES = (0.125, 0.25, 0.5, 1.0)


def pair_agreement(
    samples: PairSamples,
    *,
    corrected: tuple[NDArray[np.float64], NDArray[np.float64]] | None = None,
) -> dict[str, Any]:
    """``ncc`` and ``ratio`` of one pair's samples (``ratio_corrected`` of ``corrected``)."""
    a, b = samples.a, samples.b
    out: dict[str, Any] = {"samples": len(a), "ncc": None, "ratio": None}
    if len(a) >= 2:
        sa, sb = float(np.std(a)), float(np.std(b))
        if sa > 0 and sb > 0:
            out["ncc"] = float(np.mean((a - a.mean()) * (b - b.mean())) / (sa * sb))
        if float(np.mean(a)) != 0:
            out["ratio"] = float(np.mean(b) / np.mean(a))
        if corrected is not None:
            mean_a, mean_b = float(np.mean(corrected[0])), float(np.mean(corrected[1]))
            out["ratio_corrected"] = mean_b / mean_a if mean_a else None
    return out


def _face_points(shape: Sequence[int], axis: int, side: int, count: int) -> NDArray[np.float64]:
    """About ``count`` tile voxel coordinates on one face (a grid of cell centres)."""
    others = [k for k in range(3) if k != axis]
    extent = np.array([max(shape[k] - 1, 0) for k in others], dtype=np.float64)
    open_axes = extent > 0
    per = np.ones(2, dtype=int)
    if open_axes.any():
        side_len = (np.prod(extent[open_axes]) / max(count, 1)) ** (1.0 / open_axes.sum())
        per[open_axes] = np.maximum(1, np.floor(extent[open_axes] / side_len)).astype(int)
    grids = [(np.arange(n) + 0.5) * e / n for n, e in zip(per, extent)]
    u, v = np.meshgrid(*grids, indexing="ij")
    pts = np.zeros((u.size, 3))
    pts[:, others[0]] = u.ravel()
    pts[:, others[1]] = v.ravel()
    pts[:, axis] = 0.0 if side == 0 else shape[axis] - 1
    return pts


def _inside(plan: Plan, index: int, points: NDArray[np.float64]) -> NDArray[np.bool_]:
    tile = plan.tiles[index]
    c = geometry.transform_points(geometry.invert(tile.tile_to_output), points)
    size = np.asarray(tile.shape_zyx, dtype=np.float64)
    return np.all((c >= 0) & (c <= size - 1), axis=1)


def seam_contrast(
    plan: Plan,
    fused: ArraySource,
    *,
    depth: float = 16.0,
    points_per_face: int = 256,
    arrays: OpenArrays | None = None,
) -> dict[tuple[int, int], tuple[float, float, int]]:
    """How far the fused image departs from a neighbour tile inside each tile face.

    Defined in the module docstring: for tile ``i``'s face points inside
    tile ``k``, probes at ``u · n`` for ``u`` in ``depth · (1/8, 1/4, 1/2,
    1)`` beyond the face (where ``i`` has no data) fit ``f ≈ α·k + β``;
    the probes at ``-u · n``, inside the face, give the residuals.

    Parameters
    ----------
    plan : Plan
    fused : ArraySource
        Level 0 of the fused output.
    depth : float
        How far from the face the probes go, in output voxels (the farthest
        probe; probes outside tile ``k`` or the grid are left out).
    points_per_face : int
        Points sampled on each face of each tile (before those outside
        another tile are left out).
    arrays : OpenArrays, optional
        The tiles' arrays, shared with other samplers.

    Returns
    -------
    dict
        ``(i, j)`` (``i < j``) to the summed absolute residual, the summed
        fused intensity at the same probes and the number of probes, over the
        faces of tile ``i`` inside tile ``j`` and of ``j`` inside ``i``. A
        face point inside several other tiles counts for the first of them.
    """
    from tilefusion.readers import open_array

    image = open_array(fused)
    arrays = arrays or OpenArrays()
    grid = np.asarray(plan.shape_zyx, dtype=np.float64)
    offsets = depth * np.asarray(_PROBES)
    out: dict[tuple[int, int], tuple[float, float, int]] = {}
    lo = np.array([t.box_lo for t in plan.tiles])
    hi = np.array([t.box_hi for t in plan.tiles])
    for index, tile in enumerate(plan.tiles):
        meets = np.all((lo <= hi[index] + depth) & (lo[index] <= hi + depth), axis=1)
        meets[index] = False
        near = np.flatnonzero(meets).tolist()
        if not near:
            continue
        linear = tile.tile_to_output[:3, :3]
        for axis in range(3):
            if tile.shape_zyx[axis] < 2:
                continue
            normal = linear[:, axis] / np.linalg.norm(linear[:, axis])
            for side in (0, 1):
                outward = normal if side else -normal
                face = _face_points(tile.shape_zyx, axis, side, points_per_face)
                p = geometry.transform_points(tile.tile_to_output, face)
                owner = np.full(len(p), -1)
                for k in near:
                    free = owner < 0
                    if not free.any():
                        break
                    hit = np.zeros(len(p), dtype=bool)
                    hit[free] = _inside(plan, k, p[free] + offsets[0] * outward)
                    owner[hit] = k
                for k in np.unique(owner[owner >= 0]).tolist():
                    found = _face_residuals(
                        plan, image, arrays, index, k, p[owner == k], outward, offsets, grid
                    )
                    if found is None:
                        continue
                    key = (min(index, k), max(index, k))
                    e, s, n = out.get(key, (0.0, 0.0, 0))
                    out[key] = (e + found[0], s + found[1], n + found[2])
    return out


def _face_residuals(
    plan: Plan,
    image: Any,
    arrays: OpenArrays,
    index: int,
    other: int,
    points: NDArray[np.float64],
    outward: NDArray[np.float64],
    offsets: NDArray[np.float64],
    grid: NDArray[np.float64],
) -> tuple[float, float, int] | None:
    """Summed |f - (α·k + β)| and summed f at the probes inside one face, and their count."""
    beyond = (points[:, None, :] + offsets[None, :, None] * outward).reshape(-1, 3)
    within = (points[:, None, :] - offsets[None, :, None] * outward).reshape(-1, 3)
    values = {}
    for name, probes, in_tile in (("beyond", beyond, False), ("within", within, True)):
        usable = np.all((probes >= 0) & (probes <= grid - 1), axis=1)
        usable &= _inside(plan, other, probes)
        if in_tile:
            usable &= _inside(plan, index, probes)
        probes = probes[usable]
        f, f_ok = read_points(image, probes)
        tile = plan.tiles[other]
        coords = geometry.transform_points(geometry.invert(tile.tile_to_output), probes)
        coords = np.clip(coords, 0.0, np.asarray(tile.shape_zyx, dtype=np.float64) - 1)
        t, t_ok = read_points(arrays.get(tile.source), coords)
        ok = f_ok & t_ok
        values[name] = (f[ok], t[ok])
    f_out, t_out = values["beyond"]
    f_in, t_in = values["within"]
    if len(f_out) < 8 or not len(f_in):
        return None
    design = np.column_stack([t_out, np.ones(len(t_out))])
    (alpha, beta), *_ = np.linalg.lstsq(design, f_out, rcond=None)
    residual = np.abs(f_in - (alpha * t_in + beta))
    return float(residual.sum()), float(np.abs(f_in).sum()), len(f_in)


def seam_metrics(
    plan: Plan,
    *,
    store_path: str | Path,
    corrections: Mapping[str, TileIntensity] | None = None,
    depth: float = 16.0,
    max_samples: int = 1024,
    points_per_face: int = 256,
    max_points: int = 65536,
    threads: int | None = None,
    profiles: Profiles | None = None,
) -> dict[str, Any]:
    """Every overlapping pair's agreement and seam contrast, and the totals.

    Parameters
    ----------
    plan : Plan
    store_path : path
        The fused output group (its level 0 is read).
    corrections : mapping of tile name to TileIntensity, optional
        The intensity correction the fusion applied (adds ``ratio_corrected``).
    depth : float
        How far from each face :func:`seam_contrast` probes, output voxels.
    max_samples, points_per_face : int
        Bounds of the tile samples per pair and of the fused-image points
        per tile face.
    max_points : int
        Bound of the fused-image points over all faces (fewer per face for
        many tiles, at least 16), so validating 10,000 tiles stays quick.
    threads : int, optional
        Pairs sampled at once (default: the CPUs this process may use).
    profiles : (flatfield, darkfield), optional
        The illumination profiles the fusion applied: the pairs' samples are
        corrected by them first (see :func:`tilefusion.intensity.sample_pair`).

    Returns
    -------
    dict
        ``pairs`` (tile names, ``samples``, ``ncc``, ``ratio``, maybe
        ``ratio_corrected``, ``seam_probes``, ``seam_contrast``) and
        ``summary``: ``pairs``, ``seam_contrast`` over every face point,
        ``ncc_min``, ``ratio_worst`` (the ratio farthest from 1, as
        ``max(r, 1/r)``), and ``ratio_corrected_worst``.
    """
    names = [t.name for t in plan.tiles]
    arrays = OpenArrays()
    fused = ArraySource("zarr", str(store_path), "0")
    per_face = max(16, min(points_per_face, max_points // max(6 * len(plan.tiles), 1)))
    contrast = seam_contrast(plan, fused, depth=depth, points_per_face=per_face, arrays=arrays)
    overlapping = overlapping_pairs(plan)
    workers = max(1, threads if threads is not None else usable_cpus())
    with ThreadPoolExecutor(max_workers=workers) as pool:
        sampled = list(
            pool.map(
                lambda pair: sample_pair(
                    plan, pair, max_samples=max_samples, arrays=arrays, profiles=profiles
                ),
                overlapping,
            )
        )
    pairs = []
    for pair, samples in zip(overlapping, sampled):
        entry: dict[str, Any] = {"tiles": [names[pair[0]], names[pair[1]]]}
        corrected = None
        if corrections is not None:
            i, j = pair
            corrected = (
                corrections.get(names[i], TileIntensity()).apply(
                    plan.tiles[i], samples.points, samples.a
                ),
                corrections.get(names[j], TileIntensity()).apply(
                    plan.tiles[j], samples.points, samples.b
                ),
            )
        entry.update(pair_agreement(samples, corrected=corrected))
        e, s, n = contrast.get(pair, (0.0, 0.0, 0))
        entry["seam_probes"] = n
        entry["seam_contrast"] = e / s if s > 0 else None
        pairs.append(entry)
    total_e = sum(v[0] for v in contrast.values())
    total_s = sum(v[1] for v in contrast.values())

    def worst(key: str) -> float | None:
        values = [p[key] for p in pairs if p.get(key)]
        return max((max(r, 1.0 / r) for r in values if r > 0), default=None)

    nccs = [p["ncc"] for p in pairs if p["ncc"] is not None]
    return {
        "pairs": pairs,
        "summary": {
            "pairs": len(pairs),
            "seam_probes": sum(v[2] for v in contrast.values()),
            "seam_contrast": total_e / total_s if total_s > 0 else None,
            "ncc_min": min(nccs) if nccs else None,
            "ratio_worst": worst("ratio"),
            "ratio_corrected_worst": worst("ratio_corrected"),
        },
    }
