"""Fusion kernel in torch: the same arithmetic on CPU or CUDA.

Each crop goes to the device once; the block is then processed in z-slabs of
at most :data:`SLAB_VOXELS` voxels, each a gather-based trilinear (or nearest)
lookup with the no-data normalisation of the numba kernel. Coordinates are
float64, evaluated in the same order as the numba kernel so both backends see
the same samples; weights and sums are float32. With cosine blending, samples
of cosine weight 0 (on a tile's outer face) are summed apart with weight 1:
the fallback where no tile has cosine weight (see :mod:`tilefusion.blend`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch

from tilefusion.kernel._types import INSIDE_TOLERANCE, _TilePlan

__all__ = ["SLAB_VOXELS", "fuse_torch", "select_device"]

SLAB_VOXELS = 1 << 21
"""Voxels per slab: about 100 bytes of temporaries each, so ~200 MB per slab."""


def select_device(preferred: str | None = None) -> str:
    """Pick the torch device to fuse on.

    Parameters
    ----------
    preferred : str, optional
        ``"cpu"``, ``"cuda"`` or ``"cuda:N"``. ``None`` means the current CUDA
        device when there is one, else the CPU.

    Returns
    -------
    str
        ``"cpu"`` or ``"cuda:N"``.

    Raises
    ------
    ValueError
        If ``preferred`` is not a device name we know, or names a CUDA device
        index that does not exist on a machine that has CUDA.

    Warns
    -----
    UserWarning
        When CUDA is asked for but not available; the CPU is used instead.
    """
    if preferred is None:
        if torch.cuda.is_available():
            return f"cuda:{torch.cuda.current_device()}"
        return "cpu"
    name = str(preferred).strip().lower()
    if name == "cpu":
        return "cpu"
    if name != "cuda" and not name.startswith("cuda:"):
        raise ValueError(f"unknown device {preferred!r}; expected 'cpu', 'cuda' or 'cuda:N'")
    index_text = name.partition(":")[2]
    if index_text and not index_text.isdigit():
        raise ValueError(f"unknown device {preferred!r}; expected 'cpu', 'cuda' or 'cuda:N'")
    if not torch.cuda.is_available():
        warnings.warn(
            f"device {preferred!r} requested but CUDA is not available; fusing on the CPU",
            stacklevel=2,
        )
        return "cpu"
    index = int(index_text) if index_text else torch.cuda.current_device()
    count = torch.cuda.device_count()
    if index >= count:
        raise ValueError(f"device {preferred!r} does not exist: this machine has {count} GPU(s)")
    return f"cuda:{index}"


@contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    # torch's thread count is process-wide: restore it for the caller.
    if threads is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, int(threads)))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _to_device(data: np.ndarray, device: torch.device) -> torch.Tensor:
    """The crop as flat float32 on ``device``, sent in its own (smaller) dtype."""
    try:
        with warnings.catch_warnings():
            # Read-only arrays are fine: the tensor is only read.
            warnings.simplefilter("ignore", UserWarning)
            src = torch.from_numpy(data)
    except (TypeError, ValueError):
        # A dtype torch lacks: send it as float32.
        src = torch.from_numpy(data.astype(np.float32))
    return src.to(device).to(torch.float32).reshape(-1)


def _axis_weight(c: torch.Tensor, last: float, border: float, rng: float) -> torch.Tensor:
    # BlendingRealRandomAccess.computeWeight, one axis, float32; the same steps
    # as numba_cpu._axis_weight (sin(r pi / 2)^2 == (cos((1 - r) pi) + 1) / 2).
    # Within INSIDE_TOLERANCE inside a face the weight is 0 (blend.EDGE_TOLERANCE).
    dist = torch.minimum(c - border, (last - border) - c)
    if rng <= 0.0:
        return (dist > INSIDE_TOLERANCE).to(torch.float32)
    r = dist / rng
    h = torch.sin((r * (0.5 * math.pi)).to(torch.float32))
    ramp = torch.where(r >= 1.0, 1.0, h * h)
    return torch.where(dist <= INSIDE_TOLERANCE, 0.0, ramp)


def _tap(
    flat: torch.Tensor, index: torch.Tensor, w: torch.Tensor, *, exact: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and weighted value of one neighbour; 0 and NaN hold no data."""
    v = flat[index]
    if exact:
        # Integer crops: no NaN, and a 0 value adds nothing to the weighted sum.
        w = w * (v != 0)
        return w, w * v
    valid = (v != 0) & (v == v)
    w = torch.where(valid, w, 0.0)
    return w, w * torch.where(valid, v, 0.0)


def _accumulate_slab(
    flat: torch.Tensor,
    p: _TilePlan,
    zz: torch.Tensor,
    yy: torch.Tensor,
    xx: torch.Tensor,
    *,
    linear: bool,
    blending: str,
    num: torch.Tensor,
    den: torch.Tensor,
    num2: torch.Tensor | None = None,
    den2: torch.Tensor | None = None,
) -> None:
    """Add one tile to ``num``/``den`` (views of the slab) at block indices zz, yy, xx.

    With cosine blending, samples of weight 0 go to ``num2``/``den2`` with weight 1.
    """
    a = p.affine
    # Same evaluation order as the numba kernel, so both sample the same points.
    c = [
        ((float(a[d, 3]) + float(a[d, 0]) * zz) + float(a[d, 1]) * yy) + float(a[d, 2]) * xx
        for d in range(3)
    ]
    inside = (c[0] >= p.lo[0]) & (c[0] <= p.hi[0])
    for d in (1, 2):
        inside &= (c[d] >= p.lo[d]) & (c[d] <= p.hi[d])
    if not bool(inside.any()):
        return
    shape = p.data.shape
    strides = (shape[1] * shape[2], shape[2], 1)
    exact = p.data.dtype.kind in "iub"
    # Clamp onto the tile: the tolerance must not reach a neighbour outside it.
    s = [c[d].clamp(0.0, float(p.last[d])) for d in range(3)]
    if linear:
        f = [torch.floor(s[d]) for d in range(3)]
        t = [(s[d] - f[d]).to(torch.float32) for d in range(3)]
        i = [f[d].to(torch.int64) - int(p.offset[d]) for d in range(3)]
        lower = [i[d].clamp(0, shape[d] - 1) for d in range(3)]
        # Step to the upper neighbour: 0 where it is clamped onto the lower one.
        step = [((i[d] + 1).clamp_(0, shape[d] - 1) - lower[d]).mul_(strides[d]) for d in range(3)]
        k00 = (lower[0] * strides[0]).add_(lower[1] * strides[1]).add_(lower[2])
        u = [1.0 - t[d] for d in range(3)]
        sw = torch.zeros_like(t[0])
        swv = torch.zeros_like(t[0])
        for wz, kz in ((u[0], k00), (t[0], k00 + step[0])):
            for wy, ky in ((u[1], kz), (t[1], kz + step[1])):
                wzy = wz * wy
                for wx, kx in ((u[2], ky), (t[2], ky + step[2])):
                    w, wv = _tap(flat, kx, wzy * wx, exact=exact)
                    sw += w
                    swv += wv
    else:
        near = [
            (torch.floor(s[d] + 0.5).to(torch.int64) - int(p.offset[d]))
            .clamp_(0, shape[d] - 1)
            .mul_(strides[d])
            for d in range(3)
        ]
        ones = torch.ones(near[0].shape, dtype=torch.float32, device=flat.device)
        sw, swv = _tap(flat, near[0] + near[1] + near[2], ones, exact=exact)
    has = inside & (sw > 0)
    if blending == "max":
        val = swv / torch.where(has, sw, 1.0)
        take = has & ((den == 0) | (val > num))
        num.copy_(torch.where(take, val, num))
        den.masked_fill_(has, 1.0)
        return
    if blending == "cosine":
        wt = _axis_weight(c[0], float(p.last[0]), float(p.border[0]), float(p.blend_range[0]))
        for d in (1, 2):
            wt = wt * _axis_weight(
                c[d], float(p.last[d]), float(p.border[d]), float(p.blend_range[d])
            )
        positive = wt > 0
        if num2 is not None and den2 is not None:
            face = has & ~positive
            num2 += torch.where(face, swv, 0.0)
            den2 += torch.where(face, sw, 0.0)
        has &= positive
        sw = sw * wt
        swv = swv * wt
    num += torch.where(has, swv, 0.0)
    den += torch.where(has, sw, 0.0)


def fuse_torch(
    plans: Sequence[_TilePlan],
    block: tuple[int, int, int],
    *,
    interpolation: str,
    blending: str,
    device: str,
    threads: int | None,
) -> np.ndarray:
    """Fuse planned tiles into a float32 block (see :func:`tilefusion.kernel.fuse_block`)."""
    dev = torch.device(device)
    with _torch_threads(threads), torch.no_grad():
        num = torch.zeros(block, dtype=torch.float32, device=dev)
        den = torch.zeros(block, dtype=torch.float32, device=dev)
        # The fallback where no tile has cosine weight, if a tile's face band meets the block.
        fallback = blending == "cosine" and any(p.face for p in plans)
        num2 = torch.zeros(block, dtype=torch.float32, device=dev) if fallback else None
        den2 = torch.zeros(block, dtype=torch.float32, device=dev) if fallback else None
        for p in plans:
            flat = _to_device(p.data, dev)
            z0, z1, y0, y1, x0, x1 = p.box
            yy = torch.arange(y0, y1, dtype=torch.float64, device=dev).view(1, -1, 1)
            xx = torch.arange(x0, x1, dtype=torch.float64, device=dev).view(1, 1, -1)
            step = max(1, SLAB_VOXELS // ((y1 - y0) * (x1 - x0)))
            for zs in range(z0, z1, step):
                ze = min(z1, zs + step)
                zz = torch.arange(zs, ze, dtype=torch.float64, device=dev).view(-1, 1, 1)
                _accumulate_slab(
                    flat,
                    p,
                    zz,
                    yy,
                    xx,
                    linear=interpolation == "linear",
                    blending=blending,
                    num=num[zs:ze, y0:y1, x0:x1],
                    den=den[zs:ze, y0:y1, x0:x1],
                    num2=None if num2 is None else num2[zs:ze, y0:y1, x0:x1],
                    den2=None if den2 is None else den2[zs:ze, y0:y1, x0:x1],
                )
            del flat
        if blending == "max":
            out = torch.where(den > 0, num, 0.0)
        else:
            out = torch.where(den > 0, num / torch.where(den > 0, den, 1.0), 0.0)
        if num2 is not None and den2 is not None:
            # Where no tile has cosine weight: the plain mean of the tiles on whose face it lies.
            face = (den <= 0) & (den2 > 0)
            out = torch.where(face, num2 / torch.where(face, den2, 1.0), out)
        return out.cpu().numpy().astype(np.float32, copy=False)
