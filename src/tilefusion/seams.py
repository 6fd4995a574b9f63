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
    At points ``p`` on each face of each tile (where the tile's data end)
    that lie inside another tile, with ``n`` the face's outward normal and
    ``h`` the step (output voxels), the fused image ``f`` is read (linear
    interpolation) at ``p + u·h·n`` for ``u`` in -3, -1, 1, 3. The step across
    the face, beyond what the image's own slope on either side predicts, is

        e(p) = |f₁ - f₋₁| - (|f₋₁ - f₋₃| + |f₃ - f₁|) / 2

    (0 for content that is linear across the face, the size of the jump for
    a step). The seam contrast of a set of face points is ``max(0, Σ e) /
    Σ L``, with ``L = (|f₋₁| + |f₁|) / 2`` the local intensity: the mean
    relative step. A tile brighter by 20 % than its neighbour, blended by
    ``mean``, scores about 0.1 (half the jump, relative to the mean). Points
    where the fused image has no data (0) at any of the four are left out.
    Cosine blending spreads a mismatch over the blend range instead of a
    step at the face, so there the score is lower for the same mismatch,
    which ``ratio`` still shows.
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
    TileIntensity,
    overlapping_pairs,
    read_points,
    sample_pair,
)
from tilefusion.plan import Plan
from tilefusion.readers.base import ArraySource

__all__ = ["pair_agreement", "seam_contrast", "seam_metrics"]

_STENCIL = (-3.0, -1.0, 1.0, 3.0)


def pair_agreement(
    samples: PairSamples, *, corrections: Mapping[int, TileIntensity] | None = None
) -> dict[str, Any]:
    """``ncc`` and ``ratio`` (and ``ratio_corrected``) of one pair's samples."""
    a, b = samples.a, samples.b
    out: dict[str, Any] = {"samples": len(a), "ncc": None, "ratio": None}
    if len(a) >= 2:
        sa, sb = float(np.std(a)), float(np.std(b))
        if sa > 0 and sb > 0:
            out["ncc"] = float(np.mean((a - a.mean()) * (b - b.mean())) / (sa * sb))
        if float(np.mean(a)) != 0:
            out["ratio"] = float(np.mean(b) / np.mean(a))
        if corrections is not None:
            i, j = samples.tiles
            ci, cj = corrections.get(i, TileIntensity()), corrections.get(j, TileIntensity())
            mean_a = float(np.mean(a * ci.gain + ci.offset))
            mean_b = float(np.mean(b * cj.gain + cj.offset))
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
    step: float = 1.0,
    points_per_face: int = 256,
) -> dict[tuple[int, int], tuple[float, float, int]]:
    """Steps across tile faces in the fused image (defined in the module docstring).

    Parameters
    ----------
    plan : Plan
    fused : ArraySource
        Level 0 of the fused output.
    step : float
        ``h``, in output voxels.
    points_per_face : int
        Points sampled on each face of each tile (before those outside
        another tile or the grid are left out).

    Returns
    -------
    dict
        ``(i, j)`` (``i < j``) to the summed excess step, summed local
        intensity and number of points, over the faces of tile ``i`` inside
        tile ``j`` and of ``j`` inside ``i``. A face point inside several
        other tiles counts for the first of them.
    """
    from tilefusion.readers import open_array

    array = open_array(fused)
    grid = np.asarray(plan.shape_zyx, dtype=np.float64)
    offsets = np.asarray(_STENCIL) * step
    out: dict[tuple[int, int], tuple[float, float, int]] = {}
    lo = np.array([t.box_lo for t in plan.tiles])
    hi = np.array([t.box_hi for t in plan.tiles])
    margin = 3 * step
    for index, tile in enumerate(plan.tiles):
        meets = np.all((lo <= hi[index] + margin) & (lo[index] <= hi + margin), axis=1)
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
                probes = p[:, None, :] + offsets[None, :, None] * outward[None, None, :]
                ok = np.all((probes >= 0) & (probes <= grid - 1), axis=(1, 2))
                owner = np.full(len(p), -1)
                beyond = probes[:, -1, :]
                for k in near:
                    free = (owner < 0) & ok
                    if not free.any():
                        break
                    hit = np.zeros(len(p), dtype=bool)
                    hit[free] = _inside(plan, k, beyond[free]) & _inside(plan, k, p[free])
                    owner[hit] = k
                chosen = np.flatnonzero(owner >= 0)
                if not len(chosen):
                    continue
                flat_values, flat_valid = read_points(array, probes[chosen].reshape(-1, 3))
                values = flat_values.reshape(-1, len(offsets))
                valid = np.all(flat_valid.reshape(-1, len(offsets)), axis=1)
                f = values[valid]
                if not len(f):
                    continue
                excess = np.abs(f[:, 2] - f[:, 1]) - 0.5 * (
                    np.abs(f[:, 1] - f[:, 0]) + np.abs(f[:, 3] - f[:, 2])
                )
                local = 0.5 * (np.abs(f[:, 1]) + np.abs(f[:, 2]))
                owners = owner[chosen][valid]
                for k in np.unique(owners):
                    sel = owners == k
                    key = (min(index, int(k)), max(index, int(k)))
                    e, s, n = out.get(key, (0.0, 0.0, 0))
                    out[key] = (
                        e + float(excess[sel].sum()),
                        s + float(local[sel].sum()),
                        n + int(sel.sum()),
                    )
    return out


def seam_metrics(
    plan: Plan,
    *,
    store_path: str | Path,
    corrections: Mapping[str, TileIntensity] | None = None,
    step: float = 1.0,
    max_samples: int = 1024,
    points_per_face: int = 256,
    max_points: int = 65536,
    threads: int | None = None,
) -> dict[str, Any]:
    """Every overlapping pair's agreement and seam contrast, and the totals.

    Parameters
    ----------
    plan : Plan
    store_path : path
        The fused output group (its level 0 is read).
    corrections : mapping of tile name to TileIntensity, optional
        The intensity correction the fusion applied (adds ``ratio_corrected``).
    step : float
        ``h`` of :func:`seam_contrast`, output voxels.
    max_samples, points_per_face : int
        Bounds of the tile samples per pair and of the fused-image points
        per tile face.
    max_points : int
        Bound of the fused-image points over all faces (fewer per face for
        many tiles, at least 16), so validating 10,000 tiles stays quick.
    threads : int, optional
        Pairs sampled at once (default: the CPUs this process may use).

    Returns
    -------
    dict
        ``pairs`` (tile names, ``samples``, ``ncc``, ``ratio``, maybe
        ``ratio_corrected``, ``seam_points``, ``seam_contrast``) and
        ``summary``: ``pairs``, ``seam_contrast`` over every face point,
        ``ncc_min``, ``ratio_worst`` (the ratio farthest from 1, as
        ``max(r, 1/r)``), and ``ratio_corrected_worst``.
    """
    names = [t.name for t in plan.tiles]
    by_index = (
        {i: corrections.get(n, TileIntensity()) for i, n in enumerate(names)}
        if corrections is not None
        else None
    )
    arrays = OpenArrays()
    fused = ArraySource("zarr", str(store_path), "0")
    per_face = max(16, min(points_per_face, max_points // max(6 * len(plan.tiles), 1)))
    contrast = seam_contrast(plan, fused, step=step, points_per_face=per_face)
    overlapping = overlapping_pairs(plan)
    workers = max(1, threads if threads is not None else usable_cpus())
    with ThreadPoolExecutor(max_workers=workers) as pool:
        sampled = list(
            pool.map(
                lambda pair: sample_pair(plan, pair, max_samples=max_samples, arrays=arrays),
                overlapping,
            )
        )
    pairs = []
    for pair, samples in zip(overlapping, sampled):
        entry: dict[str, Any] = {"tiles": [names[pair[0]], names[pair[1]]]}
        entry.update(pair_agreement(samples, corrections=by_index))
        e, s, n = contrast.get(pair, (0.0, 0.0, 0))
        entry["seam_points"] = n
        entry["seam_contrast"] = max(0.0, e) / s if s > 0 else None
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
            "seam_points": sum(v[2] for v in contrast.values()),
            "seam_contrast": max(0.0, total_e) / total_s if total_s > 0 else None,
            "ncc_min": min(nccs) if nccs else None,
            "ratio_worst": worst("ratio"),
            "ratio_corrected_worst": worst("ratio_corrected"),
        },
    }
