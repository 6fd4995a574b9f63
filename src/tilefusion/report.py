"""Figures and tables for Snakemake's HTML report (``snakemake --report``).

Everything is written without a plotting library: SVG by hand for the tile
layout and the timings, an 8-bit greyscale PNG (:func:`png_grey`) for the
maximum-intensity projections, TSV for tables. The figure functions are pure
(they return ``str`` or ``bytes``); :func:`write_report_figures` does the I/O.
"""

from __future__ import annotations

import json
import logging
import math
import struct
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal
from xml.sax.saxutils import escape

import numpy as np
import yaml
from numpy.typing import NDArray

from tilefusion.atomic import write_bytes_atomic
from tilefusion.errors import InputError
from tilefusion.plan import Plan, read_plan

__all__ = [
    "REPORT_FILES",
    "benchmark_path",
    "layout_svg",
    "mip_png",
    "png_grey",
    "projection_png",
    "timing_rows",
    "timings_svg",
    "timings_tsv",
    "validation_tsv",
    "write_report_figures",
]

log = logging.getLogger("tilefusion")

# What write_report_figures writes; workflow/rules/report.smk declares the same names.
REPORT_FILES = (
    "layout_xy.svg",
    "layout_xz.svg",
    "mip_xy.png",
    "mip_xz.png",
    "mip_yz.png",
    "timings.svg",
    "timings.tsv",
    "validation.tsv",
    "config.yaml",
)

# Raster of the overlap count: at most this many cells along an axis.
_RASTER_CELLS = 400
# Sample points per cell and axis of that raster.
_SUPERSAMPLE = 4
# Drawing size of a layout's longer side, in SVG pixels.
_DRAW_PX = 640.0
# A tile's id is written only where its footprint is at least this wide (px).
_ID_MIN_PX = 28.0
_ID_LINE_PX = 11.0
# Axes whose extents differ more than this are drawn stretched (noted on the figure).
_MAX_ASPECT = 8.0
# Smallest side of a MIP's pyramid level (the coarsest level at least this large is read).
_MIP_MIN_SIDE = 256
# A MIP is made square-pixelled by repeating rows or columns, up to this many pixels.
_MIP_MAX_PX = 2048
# Voxels read for the MIPs at most (a level larger is read at a stride).
_MIP_MAX_VOXELS = 1 << 27

# A sequential palette (light to dark), interpolated for any number of counts.
_PALETTE = ((0.93, 0.96, 0.99), (0.55, 0.78, 0.90), (0.20, 0.50, 0.75), (0.10, 0.20, 0.45))
_PLANE_AXES = {"xy": (2, 1), "xz": (2, 0)}  # (horizontal, vertical) axes of zyx
_AXIS_NAMES = "zyx"


def _colour(value: float) -> str:
    """Hex colour of ``value`` in [0, 1] on the palette."""
    value = min(max(value, 0.0), 1.0) * (len(_PALETTE) - 1)
    index = min(int(value), len(_PALETTE) - 2)
    frac = value - index
    rgb = [a + (b - a) * frac for a, b in zip(_PALETTE[index], _PALETTE[index + 1])]
    return "#" + "".join(f"{round(c * 255):02x}" for c in rgb)


def _count_colour(count: int, top: int) -> str:
    return _colour(0.0 if top <= 1 else (count - 1) / (top - 1))


def _fmt(value: float) -> str:
    """A coordinate or length, short (SVG attribute or label)."""
    text = f"{value:.1f}".rstrip("0").rstrip(".")
    return "0" if text == "-0" else text


def _fmt_scale(value: float) -> str:
    """A scale factor, precise enough that 400 cells land within a tenth of a pixel."""
    return f"{value:.6g}"


def _number(value: float) -> str:
    """A physical value for a label, 4 significant digits."""
    return f"{value:.4g}"


def _text(x: float, y: float, body: str, **attrs: str | float) -> str:
    # Python names for SVG attributes: class_ -> class, text_anchor -> text-anchor.
    extra = "".join(f' {k.rstrip("_").replace("_", "-")}="{v}"' for k, v in attrs.items())
    return f'<text x="{_fmt(x)}" y="{_fmt(y)}"{extra}>{escape(body)}</text>'


def _svg(width: float, height: float, body: Iterable[str], *, title: str) -> str:
    return "\n".join(
        [
            '<svg xmlns="http://www.w3.org/2000/svg" '
            f'width="{_fmt(width)}" height="{_fmt(height)}" '
            f'viewBox="0 0 {_fmt(width)} {_fmt(height)}" '
            'font-family="sans-serif" font-size="11">',
            f"<title>{escape(title)}</title>",
            *body,
            "</svg>",
            "",
        ]
    )


def _overlap_rects(count: NDArray[np.int64]) -> Iterator[tuple[int, int, int, int, int]]:
    """Rectangles ``(col, row, width, height, value)`` of equal non-zero count.

    Runs of equal value along each row, merged with the same run of the rows
    below, so a layout of axis-aligned tiles needs a few rectangles per tile.
    """
    open_runs: dict[tuple[int, int, int], int] = {}  # (start, stop, value) -> first row
    for row in range(count.shape[0] + 1):
        runs: set[tuple[int, int, int]] = set()
        if row < count.shape[0]:
            line = count[row]
            edges = np.flatnonzero(np.diff(line)) + 1
            starts = np.concatenate([[0], edges])
            stops = np.concatenate([edges, [line.size]])
            runs = {(int(a), int(b), int(line[a])) for a, b in zip(starts, stops) if line[a]}
        for run in sorted(set(open_runs) - runs):
            first = open_runs.pop(run)
            yield run[0], first, run[1] - run[0], row - first, run[2]
        for run in runs - set(open_runs):
            open_runs[run] = row


def _overlap_count(
    lo: NDArray[np.float64],
    hi: NDArray[np.float64],
    *,
    grid_lo: NDArray[np.float64],
    extent: NDArray[np.float64],
    cells: tuple[int, int],
) -> NDArray[np.int64]:
    """Most boxes covering any of a cell's sample points, on a ``cells`` raster.

    Each cell is sampled at 4 x 4 points, so an overlap a quarter of a cell
    wide still shows, while tiles that merely abut never count twice.
    """
    fine = (cells[0] * _SUPERSAMPLE, cells[1] * _SUPERSAMPLE)
    count = np.zeros((fine[0] + 1, fine[1] + 1), dtype=np.int32)

    def index(a: NDArray[np.float64], axis: int) -> NDArray[np.int64]:
        # The first sample point at or past each edge (points at sample centres).
        pos = (a[:, axis] - grid_lo[axis]) / extent[axis] * fine[axis] - 0.5
        return np.clip(np.ceil(pos), 0, fine[axis]).astype(np.int64)

    r0, r1, c0, c1 = index(lo, 0), index(hi, 0), index(lo, 1), index(hi, 1)
    # A difference array, summed twice: linear in tiles plus cells, even for 10,000 tiles.
    np.add.at(count, (r0, c0), 1)
    np.add.at(count, (r0, c1), -1)
    np.add.at(count, (r1, c0), -1)
    np.add.at(count, (r1, c1), 1)
    count = count.cumsum(axis=0).cumsum(axis=1)[: fine[0], : fine[1]]
    blocks = count.reshape(cells[0], _SUPERSAMPLE, cells[1], _SUPERSAMPLE)
    return blocks.max(axis=(1, 3)).astype(np.int64)


def layout_svg(plan: Plan, *, plane: Literal["xy", "xz"] = "xy") -> str:
    """The tiles' footprints in one plane, over a raster of their overlap count.

    Parameters
    ----------
    plan : Plan
        The fused grid and its tiles (boxes in output voxels of level 0).
    plane : {"xy", "xz"}
        The plane drawn; the other axis is projected away. The vertical axis
        points down, as in an image viewer.

    Returns
    -------
    str
        An SVG document: the overlap count (how many tile boxes cover each
        cell of a raster of at most 400 cells per axis) as filled rectangles,
        each tile's outline (``class="tile"``, with its name as ``<title>``)
        and its name as text where the footprint is wide enough to hold it,
        axis labels in physical units and a legend of the counts.
    """
    if plane not in _PLANE_AXES:
        raise ValueError(f"plane must be one of {sorted(_PLANE_AXES)}, not {plane!r}")
    h_axis, v_axis = _PLANE_AXES[plane]
    res = np.asarray(plan.resolution_zyx, dtype=np.float64)
    origin = np.asarray(plan.origin_zyx, dtype=np.float64)
    # Physical extents of voxels (centre +- half a voxel), grid and tiles.
    grid_lo = origin - 0.5 * res
    grid_hi = origin + (np.asarray(plan.shape_zyx) - 0.5) * res
    if plan.tiles:
        lo = origin + (np.array([t.box_lo for t in plan.tiles]) - 0.5) * res
        hi = origin + (np.array([t.box_hi for t in plan.tiles]) + 0.5) * res
        grid_lo = np.minimum(grid_lo, lo.min(axis=0))
        grid_hi = np.maximum(grid_hi, hi.max(axis=0))
    else:
        lo = hi = np.zeros((0, 3))
    extent = np.maximum(grid_hi - grid_lo, 1e-12)
    ext_h, ext_v = float(extent[h_axis]), float(extent[v_axis])
    # Drawing scale (px per unit) per axis; stretched where the plane is very flat.
    scale = _DRAW_PX / max(ext_h, ext_v)
    scale_h = scale_v = scale
    stretched = ""
    if ext_h / ext_v > _MAX_ASPECT:
        scale_v = _DRAW_PX / _MAX_ASPECT / ext_v
        stretched = f"{plane[1]} stretched x{_number(scale_v / scale_h)}"
    elif ext_v / ext_h > _MAX_ASPECT:
        scale_h = _DRAW_PX / _MAX_ASPECT / ext_h
        stretched = f"{plane[0]} stretched x{_number(scale_h / scale_v)}"
    width, height = ext_h * scale_h, ext_v * scale_v
    # Raster: cells of about equal drawn size, at most _RASTER_CELLS along the longer side.
    n_h = max(1, min(_RASTER_CELLS, round(_RASTER_CELLS * width / max(width, height))))
    n_v = max(1, min(_RASTER_CELLS, round(_RASTER_CELLS * height / max(width, height))))
    count = _overlap_count(
        lo[:, [v_axis, h_axis]],
        hi[:, [v_axis, h_axis]],
        grid_lo=grid_lo[[v_axis, h_axis]],
        extent=extent[[v_axis, h_axis]],
        cells=(n_v, n_h),
    )
    top = int(count.max()) if count.size else 0

    margin_l, margin_t, margin_r, margin_b = 60.0, 30.0, 130.0, 40.0
    body = [f'<g transform="translate({_fmt(margin_l)},{_fmt(margin_t)})">']
    # One path per count, in raster cells (integers): about 15 bytes a rectangle.
    pieces: dict[int, list[str]] = {}
    for col, row, w, h, value in _overlap_rects(count):
        pieces.setdefault(value, []).append(f"M{col} {row}h{w}v{h}h{-w}z")
    body.append(
        f'<g class="overlap" stroke="none" shape-rendering="crispEdges" '
        f'transform="scale({_fmt_scale(width / n_h)} {_fmt_scale(height / n_v)})">'
    )
    for value in sorted(pieces):
        body.append(
            f'<path data-count="{value}" fill="{_count_colour(value, top)}" '
            f'd="{"".join(pieces[value])}"/>'
        )
    body.append("</g>")
    body.append(
        f'<rect class="grid" x="0" y="0" width="{_fmt(width)}" height="{_fmt(height)}" '
        'fill="none" stroke="#888" stroke-dasharray="4 3"/>'
    )
    body.append('<g class="tiles" fill="none" stroke="#222" stroke-width="0.8">')
    ids = []
    taken: dict[tuple[int, int], int] = {}  # ids written at each tile corner
    for tile, a, b in zip(plan.tiles, lo, hi):
        x, y = (a[h_axis] - grid_lo[h_axis]) * scale_h, (a[v_axis] - grid_lo[v_axis]) * scale_v
        w, h = (b[h_axis] - a[h_axis]) * scale_h, (b[v_axis] - a[v_axis]) * scale_v
        body.append(
            f'<rect class="tile" x="{_fmt(x)}" y="{_fmt(y)}" width="{_fmt(w)}" '
            f'height="{_fmt(h)}"><title>{escape(tile.name)}</title></rect>'
        )
        if w >= _ID_MIN_PX and h >= _ID_LINE_PX:
            # At the tile's top-left corner; tiles stacked along the projected axis
            # share a corner, so each further id goes one line lower while room lasts.
            corner = (round(x / _ID_LINE_PX), round(y / _ID_LINE_PX))
            line = taken.get(corner, 0)
            taken[corner] = line + 1
            if (line + 1) * _ID_LINE_PX <= h:
                ids.append(_text(x + 3, y + (line + 1) * _ID_LINE_PX, tile.name, class_="tile-id"))
    body.append("</g>")
    # A white halo keeps the ids legible over the darkest overlap colours.
    body.append('<g fill="#000" stroke="#fff" stroke-width="2" paint-order="stroke" font-size="9">')
    body.extend(ids)
    body.append("</g>")
    # Axis labels: the physical extent of each axis at its ends.
    unit = plan.unit
    h_name, v_name = _AXIS_NAMES[h_axis], _AXIS_NAMES[v_axis]
    body.append(_text(0, height + 14, _number(grid_lo[h_axis])))
    body.append(_text(width, height + 14, _number(grid_hi[h_axis]), text_anchor="end"))
    body.append(_text(width / 2, height + 30, f"{h_name} ({unit})", text_anchor="middle"))
    body.append(_text(-4, 9, _number(grid_lo[v_axis]), text_anchor="end"))
    body.append(_text(-4, height, _number(grid_hi[v_axis]), text_anchor="end"))
    body.append(
        _text(
            -44,
            height / 2,
            f"{v_name} ({unit})",
            text_anchor="middle",
            transform=f"rotate(-90 -44 {_fmt(height / 2)})",
        )
    )
    head = f"{len(plan.tiles)} tiles, {plane} plane"
    body.append(_text(0, -12, f"{head}{'; ' + stretched if stretched else ''}"))
    # Legend: one swatch per count (or a ramp's ends when there are many).
    legend_x = width + 16
    body.append(_text(legend_x, 10, "tiles covering"))
    shown = (
        list(range(1, top + 1)) if top <= 12 else sorted({1, *range(2, top, -(-top // 10)), top})
    )
    for i, value in enumerate(shown):
        y = 18 + 16 * i
        body.append(
            f'<rect class="legend" x="{_fmt(legend_x)}" y="{_fmt(y)}" width="14" height="12" '
            f'fill="{_count_colour(value, top)}" stroke="#888" stroke-width="0.5"/>'
        )
        body.append(_text(legend_x + 20, y + 10, str(value)))
    body.append("</g>")
    return _svg(
        width + margin_l + margin_r,
        max(height, 18 + 16 * len(shown)) + margin_t + margin_b,
        body,
        title=f"Tile layout ({plane})",
    )


def png_grey(image: NDArray[np.uint8]) -> bytes:
    """Encode a 2D ``uint8`` array as an 8-bit greyscale PNG (rows top to bottom)."""
    pixels = np.ascontiguousarray(image, dtype=np.uint8)
    if pixels.ndim != 2 or not pixels.size:
        raise ValueError(f"image must be a non-empty 2D array, not of shape {pixels.shape}")
    height, width = pixels.shape

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    # Filter type 0 (none) before every row.
    raw = np.concatenate([np.zeros((height, 1), np.uint8), pixels], axis=1).tobytes()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw, 6))
        + chunk(b"IEND", b"")
    )


def mip_png(
    volume: NDArray[Any],
    *,
    axis: int,
    spacing_zyx: Sequence[float] | None = None,
    percentiles: tuple[float, float] = (0.5, 99.8),
) -> bytes:
    """A maximum-intensity projection of a ``zyx`` volume as a greyscale PNG.

    Parameters
    ----------
    volume : ndarray of shape (z, y, x)
        Voxels; 0 is "no data" and stays black.
    axis : {0, 1, 2}
        The axis projected away: 0 gives the xy plane, 1 the xz plane (z down),
        2 the yz plane (z across).
    spacing_zyx : sequence of float, optional
        Physical voxel size; when given, rows or columns are repeated so that
        pixels are about square (up to 2048 pixels a side).
    percentiles : tuple of float
        The grey window, percentiles of the projected pixels that hold data.

    Returns
    -------
    bytes
        The PNG file.
    """
    data = np.asarray(volume)
    if data.ndim != 3:
        raise ValueError(f"volume must be 3D (z, y, x), not of shape {data.shape}")
    if not data.size:
        raise ValueError("volume is empty")
    if axis not in (0, 1, 2):
        raise ValueError(f"axis must be 0, 1 or 2, not {axis!r}")
    return projection_png(
        data.max(axis=axis), axis=axis, spacing_zyx=spacing_zyx, percentiles=percentiles
    )


def projection_png(
    projection: NDArray[Any],
    *,
    axis: int,
    spacing_zyx: Sequence[float] | None = None,
    percentiles: tuple[float, float] = (0.5, 99.8),
) -> bytes:
    """:func:`mip_png` of a projection already made (``volume.max(axis=axis)``)."""
    if axis not in (0, 1, 2):
        raise ValueError(f"axis must be 0, 1 or 2, not {axis!r}")
    mip = np.asarray(projection, dtype=np.float64)
    if axis == 2:
        mip = mip.T  # (y, z): z across, y down, as the yz view beside the xy one
    values = mip[mip != 0]
    out: NDArray[np.uint8] = np.zeros(mip.shape, dtype=np.uint8)
    if values.size:
        lo, hi = np.percentile(values, percentiles)
        if hi <= lo:
            lo, hi = float(values.min()) - 1.0, float(values.max())
        scaled = np.clip((mip - lo) / (hi - lo), 0.0, 1.0)
        # Data at the window's floor stays visible: 1..255; no data is 0.
        out = np.where(mip != 0, 1 + np.rint(scaled * 254), 0).astype(np.uint8)
    if spacing_zyx is not None:
        kept = [a for a in range(3) if a != axis]
        if axis == 2:
            kept.reverse()
        rows, cols = (float(spacing_zyx[a]) for a in kept)
        if rows > cols:
            factor = min(round(rows / cols), max(1, _MIP_MAX_PX // out.shape[0]))
            out = np.repeat(out, max(1, factor), axis=0)
        elif cols > rows:
            factor = min(round(cols / rows), max(1, _MIP_MAX_PX // out.shape[1]))
            out = np.repeat(out, max(1, factor), axis=1)
    return png_grey(out)


def _projections(array: Any, *, max_voxels: int) -> tuple[dict[int, NDArray[Any]], int]:
    """The three maximum-intensity projections of a 3D array, read slab by slab in z.

    An array of more than ``max_voxels`` voxels is read at every ``stride``-th
    voxel along each axis (returned with the projections), so the time taken
    is bounded even where a pyramid stops at a large level.
    """
    shape = tuple(int(n) for n in array.shape)
    stride = max(1, math.ceil((math.prod(shape) / max_voxels) ** (1 / 3)))
    while math.prod(-(-n // stride) for n in shape) > max_voxels:
        stride += 1
    chunk_z = int(getattr(array, "chunks", shape)[0]) or 1
    # Whole chunks along z where the stride allows, each slab's planes a multiple of it.
    step = stride * max(1, chunk_z // stride)
    along_z: NDArray[Any] | None = None
    along_y, along_x = [], []
    for z0 in range(0, shape[0], step):
        slab = np.asarray(array[z0 : min(z0 + step, shape[0]) : stride, ::stride, ::stride])
        top = slab.max(axis=0)
        along_z = top if along_z is None else np.maximum(along_z, top)
        along_y.append(slab.max(axis=1))
        along_x.append(slab.max(axis=2))
    assert along_z is not None  # shape[0] >= 1
    return {0: along_z, 1: np.concatenate(along_y), 2: np.concatenate(along_x)}, stride


def benchmark_path(benchmarks_dir: str | Path, level: int, range_index: int) -> Path:
    """Where a job's ``benchmark:`` file is (the patterns of the fuse and downsample rules)."""
    if level == 0:
        return Path(benchmarks_dir) / "fuse" / f"range{range_index}.tsv"
    return Path(benchmarks_dir) / "downsample" / f"level{level}-range{range_index}.tsv"


def _read_benchmark(path: Path) -> dict[str, str] | None:
    """The last row of a Snakemake benchmark TSV, or None when absent or unreadable."""
    try:
        lines = [line for line in path.read_text().splitlines() if line.strip()]
    except OSError:
        return None
    if len(lines) < 2:
        return None
    return dict(zip(lines[0].split("\t"), lines[-1].split("\t")))


def _float_or_none(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


_TIMING_COLUMNS = (
    "level",
    "range",
    "seconds",
    "job_seconds",
    "voxels",
    "mvoxel_per_s",
    "max_rss_mb",
    "cpu_seconds",
)


def timing_rows(
    markers: Iterable[Mapping[str, Any]],
    benchmarks: Mapping[tuple[int, int], Mapping[str, str]] | None = None,
) -> list[dict[str, float | int | None]]:
    """One row per range: its time, voxels, throughput and the job's peak memory.

    Parameters
    ----------
    markers : iterable of mapping
        The ranges' markers (``level``, ``range``, ``stats.voxels`` and, for
        fuse jobs, ``seconds``: the engine's own time).
    benchmarks : mapping, optional
        ``(level, range)`` to the job's benchmark row (columns ``s``,
        ``max_rss`` in MB, ``cpu_time``), where a benchmark file exists.

    Returns
    -------
    list of dict
        Sorted by level and range; ``seconds`` is the marker's time, else the
        job's wall time, and ``mvoxel_per_s`` is computed from it. Unknown
        values are None.
    """
    benchmarks = benchmarks or {}
    rows = []
    for marker in markers:
        key = (int(marker["level"]), int(marker["range"]))
        bench = benchmarks.get(key, {})
        voxels = (marker.get("stats") or {}).get("voxels")
        job_seconds = _float_or_none(bench.get("s"))
        seconds = _float_or_none(marker.get("seconds"))
        if seconds is None:
            seconds = job_seconds
        rows.append(
            {
                "level": key[0],
                "range": key[1],
                "seconds": seconds,
                "job_seconds": job_seconds,
                "voxels": int(voxels) if voxels is not None else None,
                "mvoxel_per_s": voxels / seconds / 1e6 if voxels is not None and seconds else None,
                "max_rss_mb": _float_or_none(bench.get("max_rss")),
                "cpu_seconds": _float_or_none(bench.get("cpu_time")),
            }
        )
    return sorted(rows, key=lambda row: (row["level"], row["range"]))


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("\t", " ").replace("\n", " ")


def _tsv(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["\t".join(header), *("\t".join(_cell(v) for v in row) for row in rows)]
    return "\n".join(lines) + "\n"


def timings_tsv(
    markers: Iterable[Mapping[str, Any]],
    benchmarks: Mapping[tuple[int, int], Mapping[str, str]] | None = None,
) -> str:
    """:func:`timing_rows` as a TSV table (empty cells where unknown)."""
    rows = timing_rows(markers, benchmarks)
    return _tsv(_TIMING_COLUMNS, ([row[c] for c in _TIMING_COLUMNS] for row in rows))


def _bars(
    values: Sequence[float | None], levels: Sequence[int], *, n_bars: int
) -> list[tuple[float, int]]:
    """About ``n_bars`` bars: the mean of each run of ranges, never across levels."""
    size = max(1, -(-len(values) // n_bars))
    bars = []
    start = 0
    while start < len(values):
        stop = start + 1
        while stop < len(values) and stop - start < size and levels[stop] == levels[start]:
            stop += 1
        known = [v for v in values[start:stop] if v is not None]
        bars.append((sum(known) / len(known) if known else 0.0, levels[start]))
        start = stop
    return bars


def timings_svg(
    markers: Iterable[Mapping[str, Any]],
    benchmarks: Mapping[tuple[int, int], Mapping[str, str]] | None = None,
) -> str:
    """Bar charts of each range's seconds and throughput (Mvoxel/s), coloured by level.

    Ranges are in level and range order; beyond 400 ranges each bar is the
    mean of consecutive ranges. The heading sums the time and voxels per level
    and names the largest peak memory of any job.
    """
    rows = timing_rows(markers, benchmarks)
    levels = [int(row["level"] or 0) for row in rows]
    n_levels = max(levels, default=0) + 1
    width, panel_h, left = 640.0, 140.0, 60.0
    body: list[str] = []
    summary = []
    for k in sorted(set(levels)):
        of_level = [row for row in rows if row["level"] == k]
        secs = sum(float(row["seconds"] or 0.0) for row in of_level)
        voxels = sum(int(row["voxels"] or 0) for row in of_level)
        rate = f", {voxels / secs / 1e6:.3g} Mvoxel/s" if secs else ""
        summary.append(f"level {k}: {len(of_level)} ranges, {secs:.3g} s{rate}")
    rss = [float(row["max_rss_mb"]) for row in rows if row["max_rss_mb"] is not None]
    if rss:
        summary.append(f"peak RSS {max(rss):.4g} MB")
    for i, line in enumerate(summary or ["no ranges"]):
        body.append(_text(left, 16 + 14 * i, line))
    top_y = 24 + 14 * max(1, len(summary))
    for p, (key, label) in enumerate([("seconds", "seconds"), ("mvoxel_per_s", "Mvoxel/s")]):
        y0 = top_y + p * (panel_h + 30)
        bars = _bars([row[key] for row in rows], levels, n_bars=400)
        peak = max((v for v, _ in bars), default=0.0) or 1.0
        bar_w = width / max(1, len(bars))
        body.append(f'<g class="panel" data-quantity="{key}">')
        body.append(
            f'<line x1="{_fmt(left)}" y1="{_fmt(y0 + panel_h)}" x2="{_fmt(left + width)}" '
            f'y2="{_fmt(y0 + panel_h)}" stroke="#444"/>'
        )
        body.append(_text(left - 4, y0 + 9, _number(peak), text_anchor="end"))
        body.append(_text(left - 4, y0 + panel_h, "0", text_anchor="end"))
        body.append(_text(left - 4, y0 + panel_h / 2, label, text_anchor="end"))
        for i, (value, level) in enumerate(bars):
            h = panel_h * value / peak
            body.append(
                f'<rect class="bar" x="{_fmt(left + i * bar_w)}" y="{_fmt(y0 + panel_h - h)}" '
                f'width="{_fmt(max(bar_w * 0.9, 0.5))}" height="{_fmt(h)}" '
                f'fill="{_colour(0.35 + 0.65 * level / max(1, n_levels - 1))}"/>'
            )
        body.append("</g>")
    axis_y = top_y + 2 * (panel_h + 30) - 14
    body.append(_text(left + width / 2, axis_y, "range (level 0 first)", text_anchor="middle"))
    legend_y = axis_y + 8
    for k in range(n_levels):
        x = left + 80 * k
        body.append(
            f'<rect class="legend" x="{_fmt(x)}" y="{_fmt(legend_y)}" width="12" height="10" '
            f'fill="{_colour(0.35 + 0.65 * k / max(1, n_levels - 1))}"/>'
        )
        body.append(_text(x + 16, legend_y + 9, f"level {k}"))
    return _svg(left + width + 20, legend_y + 24, body, title="Per-range timings")


# QC report keys validation_tsv shows in rows of their own (or that problems restate).
_QC_SHOWN = frozenset(
    {
        "ok",
        "problems",
        "warnings",
        "levels",
        "rerun",
        "absent_input_chunks",
        "bad_ranges",
        "structure_damaged",
        "metadata_problems",
    }
)


def validation_tsv(qc_report: Mapping[str, Any]) -> str:
    """The QC report (written by the validate step) as a two-column table.

    Rows: the result, counts of problems and warnings, each level's shape,
    voxel size, coverage and intensities, tiles with absent chunks, the
    scalar values of any further summary (``seams``, say), then every problem
    and warning line, and the rerun command when there is one.
    """
    ok = bool(qc_report.get("ok"))
    problems = list(qc_report.get("problems") or [])
    warnings = list(qc_report.get("warnings") or [])
    rows: list[tuple[str, Any]] = [
        ("result", "passed" if ok else "FAILED"),
        ("problems", len(problems)),
        ("warnings", len(warnings)),
    ]
    for level in qc_report.get("levels") or []:
        k = level.get("level")

        def joined(values: Any) -> str:
            return " x ".join(_cell(_float_or_none(v)) for v in values or [])

        rows.append((f"level {k} shape (z y x)", joined(level.get("shape_zyx"))))
        rows.append((f"level {k} voxel size (z y x)", joined(level.get("scale_zyx"))))
        coverage = _float_or_none(level.get("coverage"))
        rows.append(
            (f"level {k} coverage", f"{100 * coverage:.2f} %" if coverage is not None else "")
        )
        stats = [_float_or_none(level.get(s)) for s in ("min", "mean", "max")]
        rows.append((f"level {k} min / mean / max", " / ".join(_cell(v) for v in stats)))
    absent = qc_report.get("absent_input_chunks") or {}
    rows.extend((f"absent input chunks, tile {tile}", count) for tile, count in absent.items())
    # Further summaries later steps add (seam metrics, say): their scalar values.
    for key, value in qc_report.items():
        if key not in _QC_SHOWN and isinstance(value, Mapping):
            rows.extend(
                (f"{key} {name}", _float_or_none(item) if isinstance(item, float) else item)
                for name, item in value.items()
                if item is None or isinstance(item, (str, int, float))
            )
    rows.extend(("problem", line) for line in problems)
    rows.extend(("warning", line) for line in warnings)
    if qc_report.get("rerun"):
        rows.append(("rerun", qc_report["rerun"]))
    return _tsv(("check", "result"), rows)


def _mip_level(plan: Plan) -> int:
    """The coarsest level whose largest side is at least 256 voxels (else level 0)."""
    fitting = [k for k, lv in enumerate(plan.levels) if max(lv.shape_zyx) >= _MIP_MIN_SIDE]
    return fitting[-1] if fitting else 0


def _read_json(path: str | Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise InputError(str(path), "", f"{what} not found") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(str(path), "", f"{what} unreadable ({exc.__class__.__name__})") from None
    if not isinstance(data, dict):
        raise InputError(str(path), "", f"{what} is not a JSON object")
    return data


def write_report_figures(
    out_dir: str | Path,
    *,
    plan_path: str | Path,
    store_path: str,
    qc_report_path: str | Path,
    marker_paths: Sequence[str | Path],
    benchmarks_dir: str | Path | None,
    config: Mapping[str, Any],
) -> list[Path]:
    """Write every file of :data:`REPORT_FILES` into ``out_dir``.

    Parameters
    ----------
    out_dir : path
        The folder written (created if needed).
    plan_path, qc_report_path : path
        The plan and the validate step's QC report.
    store_path : str
        The fused OME-Zarr; the MIPs are read from its coarsest level whose
        largest side is at least 256 voxels (level 0 when every level is smaller).
    marker_paths : sequence of path
        The ranges' markers (their times and voxels).
    benchmarks_dir : path or None
        The jobs' ``benchmark:`` folder; files that do not exist are skipped.
    config : mapping
        The run's configuration, written as ``config.yaml``.

    Returns
    -------
    list of Path
        The files written, in :data:`REPORT_FILES` order.
    """
    from tilefusion.store import open_level  # zarr: only this step needs it

    out = Path(out_dir)
    plan = read_plan(plan_path)
    qc_report = _read_json(qc_report_path, "QC report")
    markers = [_read_json(p, "marker") for p in marker_paths]
    benchmarks: dict[tuple[int, int], dict[str, str]] = {}
    if benchmarks_dir is not None:
        for marker in markers:
            key = (int(marker["level"]), int(marker["range"]))
            row = _read_benchmark(benchmark_path(benchmarks_dir, *key))
            if row is not None:
                benchmarks[key] = row
    k = _mip_level(plan)
    projections, stride = _projections(
        open_level(store_path, k, mode="r"), max_voxels=_MIP_MAX_VOXELS
    )
    if stride > 1:
        log.info("MIPs from level %d at every %d-th voxel (a level this large)", k, stride)
    spacing = plan.levels[k].scale_zyx
    contents: dict[str, str | bytes] = {
        "layout_xy.svg": layout_svg(plan, plane="xy"),
        "layout_xz.svg": layout_svg(plan, plane="xz"),
        "mip_xy.png": projection_png(projections[0], axis=0, spacing_zyx=spacing),
        "mip_xz.png": projection_png(projections[1], axis=1, spacing_zyx=spacing),
        "mip_yz.png": projection_png(projections[2], axis=2, spacing_zyx=spacing),
        "timings.svg": timings_svg(markers, benchmarks),
        "timings.tsv": timings_tsv(markers, benchmarks),
        "validation.tsv": validation_tsv(qc_report),
        "config.yaml": yaml.safe_dump(_plain(config), sort_keys=False),
    }
    written = []
    for name in REPORT_FILES:
        data = contents[name]
        write_bytes_atomic(out / name, data.encode() if isinstance(data, str) else data)
        written.append(out / name)
    return written


def _plain(value: Any) -> Any:
    """Snakemake's config as plain dicts, lists and scalars (for ``yaml.safe_dump``)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)
