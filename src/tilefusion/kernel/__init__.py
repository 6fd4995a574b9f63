"""Fuse the tiles overlapping one output block.

:func:`fuse_block` resamples every tile crop onto the block through its affine
and blends them. Two backends compute the same result: numba on the CPU and
torch (CPU or CUDA). torch is imported only when it is used.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Literal

import numpy as np

from tilefusion.blend import BLENDING_MODES, DEFAULT_BLEND_BORDER, DEFAULT_BLEND_RANGE
from tilefusion.kernel._types import (
    BACKENDS,
    INTERPOLATIONS,
    TileCrop,
    check_block_shape,
    check_choice,
    plan_tiles,
)

__all__ = ["TileCrop", "fuse_block", "select_device", "warm_up_in_background"]

log = logging.getLogger(__name__)


def select_device(preferred: str | None = None) -> str:
    """Pick the torch device: ``"cuda:N"`` or ``"cpu"``.

    ``None`` takes the current CUDA device when there is one, else the CPU.
    Asking for CUDA where there is none warns and returns ``"cpu"``. See
    :func:`tilefusion.kernel.torch_kernel.select_device`.
    """
    if preferred is not None and str(preferred).strip().lower() == "cpu":
        # Importing torch costs about a second per fuse job; the CPU needs no torch.
        return "cpu"
    from tilefusion.kernel.torch_kernel import select_device as _select

    return _select(preferred)


def warm_up_in_background(dtype: str = "uint16") -> threading.Thread:
    """Load the numba kernel for ``dtype`` tiles on a daemon thread.

    numba's first call in a process loads its compiled code and type
    registries (about 0.4 s); a fuse job overlaps that with reading its plan
    and first tiles instead of stalling every thread on it.
    """

    def load() -> None:
        from tilefusion.kernel.numba_cpu import warm_up

        try:
            warm_up(dtype)
        except Exception:  # the real call reports any problem
            log.debug("kernel warm-up failed", exc_info=True)

    thread = threading.Thread(target=load, name="tilefusion-warm-up", daemon=True)
    thread.start()
    return thread


def fuse_block(
    crops: Sequence[TileCrop],
    block_shape_zyx: tuple[int, int, int],
    *,
    interpolation: Literal["linear", "nearest"] = "linear",
    blending: Literal["cosine", "mean", "max"] = "cosine",
    blend_range_zyx: tuple[float, float, float] = (DEFAULT_BLEND_RANGE,) * 3,
    blend_border_zyx: tuple[float, float, float] = (DEFAULT_BLEND_BORDER,) * 3,
    backend: Literal["auto", "numba", "torch"] = "auto",
    device: str | None = None,
    threads: int | None = None,
) -> np.ndarray:
    """Resample and blend tile crops into one output block.

    Parameters
    ----------
    crops : sequence of TileCrop
        The tiles that may overlap the block, in a fixed order (it fixes the
        summation order, so results are reproducible).
    block_shape_zyx : tuple of 3 ints
        Shape of the output block.
    interpolation : {"linear", "nearest"}, optional
        Trilinear over the 8 neighbours, or the nearest voxel (``floor(c + 0.5)``:
        halves round up).
    blending : {"cosine", "mean", "max"}, optional
        Cosine-weighted average (BigStitcher's blending), plain average, or
        maximum of the tiles with data at each voxel.
    blend_range_zyx : tuple of 3 floats, optional
        Width of the cosine ramp in **tile** voxels, for the crops that do not
        carry their own (:attr:`TileCrop.blend_range_zyx`). BigStitcher's
        default is 40 output voxels; convert with
        :func:`tilefusion.blend.tile_blend_params` (the fuse step does, per tile).
    blend_border_zyx : tuple of 3 floats, optional
        Tile voxels at each edge that are not used, in tile voxels, for the
        crops that do not carry their own.
    backend : {"auto", "numba", "torch"}, optional
        ``"auto"`` uses torch on CUDA when available, else numba on the CPU.
    device : str, optional
        torch device (``"cpu"``, ``"cuda"``, ``"cuda:1"``); ``None`` picks CUDA
        when available. The numba backend runs on the CPU only.
    threads : int, optional
        CPU threads for this call; ``None`` keeps the current setting. The
        result does not depend on it.

    Returns
    -------
    ndarray of float32, shape ``block_shape_zyx``
        Fused values; 0 where no tile has data.

    Raises
    ------
    ValueError
        For an unknown option value, a malformed crop, or the numba backend
        with a CUDA device.

    Notes
    -----
    For block voxel ``o`` a tile is sampled at ``c = out_to_tile @ [o, 1]``
    when ``border <= c <= size - 1 - border`` on every axis (within 1e-6).
    Crop voxels equal to 0 or NaN hold no data: the trilinear value is
    normalised over the neighbours with data, and the tile's weight is scaled
    by their summed interpolation weight, so tiles fade out towards missing
    data instead of pulling values towards 0. Tile weights are that fraction
    times the cosine weight (``"cosine"``, :func:`tilefusion.blend.cosine_weight`)
    or times 1 (``"mean"``); ``"max"`` takes the largest value among tiles with
    any data. The cosine weight is 0 on a tile's outer face (BigStitcher's
    formula); where the cosine weights of all tiles sum to 0 but some tile
    has data there (its face, inside the border), the voxel is the ``"mean"``
    of those tiles instead of BigStitcher's 0, so a tile's data reach the
    output wherever no other tile has weight. A voxel no tile has data for is 0.

    The crop must hold every tile voxel the block samples (plus one for the
    upper linear neighbour); indices beyond it are clamped to its edge.
    """
    check_choice("interpolation", interpolation, INTERPOLATIONS)
    check_choice("blending", blending, BLENDING_MODES)
    check_choice("backend", backend, BACKENDS)
    if threads is not None and int(threads) < 1:
        raise ValueError(f"threads must be >= 1, got {threads!r}")
    block = check_block_shape(block_shape_zyx)

    use_torch = backend == "torch"
    torch_device = "cpu"
    if backend == "auto":
        torch_device = select_device(device)
        use_torch = torch_device != "cpu"
    elif backend == "torch":
        torch_device = select_device(device)
    elif device is not None and str(device).strip().lower() != "cpu":
        raise ValueError(f"backend 'numba' runs on the CPU only, got device {device!r}")

    plans = plan_tiles(
        crops, block, blend_range_zyx=blend_range_zyx, blend_border_zyx=blend_border_zyx
    )
    if not plans:
        return np.zeros(block, dtype=np.float32)
    if use_torch:
        from tilefusion.kernel.torch_kernel import fuse_torch

        return fuse_torch(
            plans,
            block,
            interpolation=interpolation,
            blending=blending,
            device=torch_device,
            threads=threads,
        )
    from tilefusion.kernel.numba_cpu import fuse_numba

    return fuse_numba(plans, block, interpolation=interpolation, blending=blending, threads=threads)
