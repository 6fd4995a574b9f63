"""Pixel statistics the fuse and downsample jobs record in their markers.

0 is "no data" in the output, so every statistic is over the voxels that
hold data. Validation and the NGFF ``omero`` window merge them per level.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

__all__ = ["block_stats", "merge_stats"]


def block_stats(block: NDArray[Any]) -> dict[str, float | int]:
    """Summary of a written block: voxels, voxels with data, min/max/sum over them."""
    data = np.asarray(block)
    if np.issubdtype(data.dtype, np.unsignedinteger):
        # Zeros add nothing to the sum or the max, and wrap to the top of the
        # range when 1 is subtracted, so no masked copy of the block is needed.
        covered = int(np.count_nonzero(data))
        if not covered:
            return {"voxels": int(data.size), "covered": 0, "min": 0.0, "max": 0.0, "sum": 0.0}
        return {
            "voxels": int(data.size),
            "covered": covered,
            "min": float(int(np.min(data - data.dtype.type(1))) + 1),
            "max": float(data.max()),
            "sum": float(data.sum(dtype=np.uint64)),
        }
    values = data[data != 0]
    return {
        "voxels": int(data.size),
        "covered": int(values.size),
        "min": float(values.min()) if values.size else 0.0,
        "max": float(values.max()) if values.size else 0.0,
        "sum": float(values.sum(dtype=np.float64)),
    }


def merge_stats(parts: Sequence[Mapping[str, float | int]]) -> dict[str, float | int]:
    """Combine :func:`block_stats` of disjoint blocks."""
    covered = [p for p in parts if p["covered"]]
    voxels = int(sum(p["voxels"] for p in parts))
    n_covered = int(sum(p["covered"] for p in parts))
    total = float(sum(p["sum"] for p in parts))
    return {
        "voxels": voxels,
        "covered": n_covered,
        "min": min((float(p["min"]) for p in covered), default=0.0),
        "max": max((float(p["max"]) for p in covered), default=0.0),
        "sum": total,
    }
