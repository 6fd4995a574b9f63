"""Report figures (tilefusion.report) and `snakemake --report` on the demo workflow."""

from __future__ import annotations

import base64
import re
import shutil
import struct
import xml.etree.ElementTree as ET
import zlib

import numpy as np
import pytest
from pipeline import snakemake_run

from tilefusion import report
from tilefusion.plan import Level, Plan, PlannedTile
from tilefusion.readers.base import ArraySource

SVG = "{http://www.w3.org/2000/svg}"

needs_snakemake = pytest.mark.skipif(
    shutil.which("snakemake") is None, reason="snakemake not installed"
)


def _plan(boxes: list[tuple[tuple[float, ...], tuple[float, ...]]], shape=None) -> Plan:
    """A plan of tiles with the given (lo, hi) boxes in output voxels (z, y, x)."""
    tiles = tuple(
        PlannedTile(
            name=f"t0-s{i}",
            setup=i,
            timepoint=0,
            source=ArraySource("memory", ""),
            shape_zyx=(1, 1, 1),
            dtype="uint16",
            tile_to_output=np.eye(4),
            box_lo=tuple(map(float, lo)),  # type: ignore[arg-type]
            box_hi=tuple(map(float, hi)),  # type: ignore[arg-type]
        )
        for i, (lo, hi) in enumerate(boxes)
    )
    if shape is None:
        shape = tuple(int(max(hi[a] for _, hi in boxes)) + 1 for a in range(3))
    level = Level(
        shape_zyx=shape,
        chunks_zyx=(16, 32, 32),
        shards_zyx=(16, 32, 32),
        factor_zyx=(1, 1, 1),
        scale_zyx=(2.0, 0.5, 0.5),
        translation_zyx=(0.0, 0.0, 0.0),
        range_voxels=1 << 20,
    )
    return Plan(
        dataset="x.xml",
        unit="micrometer",
        world_unit_zyx=(1.0, 1.0, 1.0),
        levels=(level,),
        tiles=tiles,
    )


def _tiles(root: ET.Element) -> list[ET.Element]:
    return [r for r in root.iter(f"{SVG}rect") if r.get("class") == "tile"]


def _counts(root: ET.Element) -> set[int]:
    return {int(p.get("data-count")) for p in root.iter(f"{SVG}path") if p.get("data-count")}


def test_layout_has_one_outline_and_id_per_tile_and_counts_the_overlap():
    # Two tiles side by side in x overlapping by 20 voxels, a third apart below them in y.
    plan = _plan(
        [
            ((0, 0, 0), (19, 99, 99)),
            ((0, 0, 80), (19, 99, 179)),
            ((0, 120, 0), (19, 219, 99)),
        ]
    )
    root = ET.fromstring(report.layout_svg(plan, plane="xy"))
    tiles = _tiles(root)
    assert len(tiles) == 3
    assert [t.find(f"{SVG}title").text for t in tiles] == ["t0-s0", "t0-s1", "t0-s2"]
    ids = [t.text for t in root.iter(f"{SVG}text") if t.get("class") == "tile-id"]
    assert ids == ["t0-s0", "t0-s1", "t0-s2"]
    assert _counts(root) == {1, 2}
    # Footprints in physical units: tile 1 starts 80 voxels (40 µm) right of tile 0
    # and is as wide as 100 voxels; x is drawn to the same scale as y.
    x0, x1 = (float(t.get("x")) for t in tiles[:2])
    w0, h0 = float(tiles[0].get("width")), float(tiles[0].get("height"))
    assert (x1 - x0) / w0 == pytest.approx(80 / 100, abs=0.01)
    assert h0 == pytest.approx(w0, abs=0.2)
    assert "x (micrometer)" in {t.text for t in root.iter(f"{SVG}text")}


def test_layout_xz_shows_the_stack_of_tiles_that_share_a_footprint():
    plan = _plan([((0, 0, 0), (19, 99, 99)), ((0, 120, 0), (19, 219, 99))])
    root = ET.fromstring(report.layout_svg(plan, plane="xz"))
    assert len(_tiles(root)) == 2
    assert _counts(root) == {2}  # both tiles cover the same x-z footprint
    ids = [t for t in root.iter(f"{SVG}text") if t.get("class") == "tile-id"]
    assert [t.text for t in ids] == ["t0-s0", "t0-s1"]
    assert len({t.get("y") for t in ids}) == 2  # stacked ids on separate lines


def test_abutting_tiles_do_not_count_as_overlapping():
    plan = _plan([((0, 0, 0), (9, 9, 36)), ((0, 0, 37), (9, 9, 72))])
    assert _counts(ET.fromstring(report.layout_svg(plan, plane="xy"))) == {1}


def test_layout_of_10000_tiles_stays_small_and_skips_ids():
    n, step, size = 100, 90, 100
    boxes = [
        ((0, i * step, j * step), (49, i * step + size - 1, j * step + size - 1))
        for i in range(n)
        for j in range(n)
    ]
    svg = report.layout_svg(_plan(boxes), plane="xy")
    root = ET.fromstring(svg)
    assert len(_tiles(root)) == n * n
    assert not [t for t in root.iter(f"{SVG}text") if t.get("class") == "tile-id"]
    assert _counts(root) == {1, 2, 4}  # overlaps of 10 voxels in 9010 still show
    assert len(svg) < 2_500_000


def test_layout_refuses_an_unknown_plane():
    with pytest.raises(ValueError, match="plane must be one of"):
        report.layout_svg(_plan([((0, 0, 0), (1, 1, 1))]), plane="yz")  # type: ignore[arg-type]


def _decode_png(data: bytes) -> np.ndarray:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, pos = {}, 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + body)
        chunks.setdefault(kind, b"")
        chunks[kind] += body
        pos += 12 + length
    assert b"IEND" in chunks
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", chunks[b"IHDR"])
    assert (depth, colour, interlace) == (8, 0, 0)
    rows = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), np.uint8).reshape(height, width + 1)
    assert not rows[:, 0].any()  # filter type 0 on every row
    return rows[:, 1:]


def test_png_round_trips_the_pixels():
    image = np.arange(7 * 5, dtype=np.uint8).reshape(7, 5) * 7
    np.testing.assert_array_equal(_decode_png(report.png_grey(image)), image)


@pytest.mark.parametrize(
    ("axis", "shape", "spot"),
    [(0, (32, 40), (10, 20)), (1, (16, 40), (5, 20)), (2, (32, 16), (10, 5))],
)
def test_mip_puts_the_brightest_pixel_on_the_bright_spot(axis, shape, spot):
    rng = np.random.default_rng(0)
    volume = rng.integers(100, 200, size=(16, 32, 40)).astype(np.float64)
    z, y, x = np.indices(volume.shape)
    volume += 4000 * np.exp(-((z - 5) ** 2 + (y - 10) ** 2 + (x - 20) ** 2) / 8)
    volume = volume.astype(np.uint16)
    volume[:, :3, :] = 0  # no data: stays black
    image = _decode_png(report.mip_png(volume, axis=axis))
    assert image.shape == shape
    # The window's top clips a few pixels to white: all of them at the spot.
    assert image[spot] == 255
    brightest = np.argwhere(image == 255)
    assert np.abs(brightest - np.array(spot)).max() <= 1
    if axis != 1:  # rows are y: the rows without data are black
        assert not image[:3, :].any()
        assert image[3:, :].min() >= 1  # data at the window's floor stays visible


def test_mip_makes_anisotropic_pixels_square():
    volume = np.zeros((8, 16, 16), np.uint16)
    volume[3, 4, 5] = 10
    image = _decode_png(report.mip_png(volume, axis=1, spacing_zyx=(2.0, 0.5, 0.5)))
    assert image.shape == (32, 16)  # each z row repeated 4 times
    assert np.flatnonzero(image[:, 5]).tolist() == [12, 13, 14, 15]


def _markers():
    return [
        {"level": 0, "range": 1, "seconds": 2.0, "stats": {"voxels": 4_000_000}},
        {"level": 0, "range": 0, "seconds": 1.0, "stats": {"voxels": 3_000_000}},
        {"level": 1, "range": 0, "stats": {"voxels": 1_000_000}},  # downsample: no seconds
    ]


def test_timing_rows_combine_markers_and_benchmarks():
    benchmarks = {
        (0, 0): {"s": "1.70", "max_rss": "176.5", "cpu_time": "1.49"},
        (1, 0): {"s": "0.50", "max_rss": "66.3", "cpu_time": "NA"},
    }
    rows = report.timing_rows(_markers(), benchmarks)
    assert [(r["level"], r["range"]) for r in rows] == [(0, 0), (0, 1), (1, 0)]
    assert rows[0]["mvoxel_per_s"] == pytest.approx(3.0)
    assert rows[0]["job_seconds"] == pytest.approx(1.7)
    assert rows[0]["max_rss_mb"] == pytest.approx(176.5)
    assert rows[1]["max_rss_mb"] is None  # no benchmark file for that job
    assert rows[2]["seconds"] == pytest.approx(0.5)  # the job's time where the marker has none
    assert rows[2]["mvoxel_per_s"] == pytest.approx(2.0)
    assert rows[2]["cpu_seconds"] is None
    table = report.timings_tsv(_markers(), benchmarks).splitlines()
    assert table[0].split("\t") == [
        "level",
        "range",
        "seconds",
        "job_seconds",
        "voxels",
        "mvoxel_per_s",
        "max_rss_mb",
        "cpu_seconds",
    ]
    assert table[2].split("\t") == ["0", "1", "2", "", "4000000", "2", "", ""]


def test_timings_chart_has_a_bar_per_range_and_bins_many():
    root = ET.fromstring(report.timings_svg(_markers(), {}))
    bars = [r for r in root.iter(f"{SVG}rect") if r.get("class") == "bar"]
    assert len(bars) == 2 * 3  # two panels
    texts = " ".join(t.text or "" for t in root.iter(f"{SVG}text"))
    assert "level 0: 2 ranges, 3 s, 2.33 Mvoxel/s" in texts
    many = [{"level": 0, "range": r, "seconds": 1.0, "stats": {"voxels": 10}} for r in range(1000)]
    root = ET.fromstring(report.timings_svg(many))
    bars = [r for r in root.iter(f"{SVG}rect") if r.get("class") == "bar"]
    assert len(bars) <= 2 * 400
    # A bar is the mean of neighbouring ranges of one level.
    bars = report._bars([1.0] * 5 + [2.0, 4.0, None], [0] * 5 + [1] * 3, n_bars=4)
    assert bars == [(1.0, 0), (1.0, 0), (1.0, 0), (3.0, 1), (0.0, 1)]


def test_validation_table_lists_levels_problems_and_the_rerun():
    qc = {
        "ok": False,
        "problems": ["out.zarr/0/c/0/0/0: corrupt (level 0 range 3)"],
        "warnings": ["tile t0-s1: absent chunks read as no data (2 chunk reads)"],
        "levels": [
            {
                "level": 0,
                "shape_zyx": [10, 20, 30],
                "scale_zyx": [2.0, 0.5, 0.5],
                "coverage": 0.9512,
                "min": 1.0,
                "max": 900.0,
                "mean": 123.456,
            }
        ],
        "rerun": "snakemake --forcerun results/tilefusion/fused/markers/level0/range3.json",
        "absent_input_chunks": {"t0-s1": 2},
        "seams": {"pairs": 4, "seam_contrast": 0.0123456, "ncc_min": None, "list": [1]},
    }
    rows = dict(line.split("\t", 1) for line in report.validation_tsv(qc).splitlines()[1:])
    assert rows["result"] == "FAILED"
    assert rows["problems"] == "1"
    assert rows["level 0 shape (z y x)"] == "10 x 20 x 30"
    assert rows["level 0 coverage"] == "95.12 %"
    assert rows["level 0 min / mean / max"] == "1 / 123.5 / 900"
    assert rows["problem"] == qc["problems"][0]
    assert rows["warning"] == qc["warnings"][0]
    assert rows["rerun"].startswith("snakemake --forcerun")
    assert rows["absent input chunks, tile t0-s1"] == "2"
    assert (rows["seams pairs"], rows["seams seam_contrast"]) == ("4", "0.01235")
    assert rows["seams ncc_min"] == ""
    assert "seams list" not in rows
    assert report.validation_tsv({"ok": True}).splitlines()[1] == "result\tpassed"


def test_projections_read_slab_by_slab_match_the_volume_and_bound_the_read():
    import zarr

    rng = np.random.default_rng(1)
    volume = rng.integers(0, 1000, size=(21, 18, 30)).astype(np.uint16)
    array = zarr.create_array(store={}, shape=volume.shape, chunks=(4, 8, 8), dtype="uint16")
    array[...] = volume
    projections, stride = report._projections(array, max_voxels=volume.size)
    assert stride == 1
    for axis in range(3):
        np.testing.assert_array_equal(projections[axis], volume.max(axis=axis))
    projections, stride = report._projections(array, max_voxels=volume.size // 20)
    assert stride == 3  # 7 x 6 x 10 voxels read
    sampled = volume[::3, ::3, ::3]
    for axis in range(3):
        np.testing.assert_array_equal(projections[axis], sampled.max(axis=axis))


def _embedded(html: str) -> dict[str, bytes]:
    """Files Snakemake embedded in its report, by file name."""
    found = re.findall(
        r"data:[^;\"]+;charset=[^;\"]+;filename=([^;\"]+);base64,([A-Za-z0-9+/=]+)", html
    )
    return {name: base64.b64decode(data) for name, data in found}


@needs_snakemake
def test_snakemake_report_holds_every_figure(tmp_path, demo_xml):
    config = {
        "dataset": str(demo_xml),
        "output": {
            "path": "fused.ome.zarr",
            "chunks": [16, 32, 32],
            "shards": [32, 64, 64],
            "pyramid_levels": 2,
        },
        "fusion": {"chunks_per_range": 64},
    }
    run = snakemake_run(tmp_path, config)
    assert run.returncode == 0, run.stderr[-3000:]
    figures = tmp_path / "results" / "tilefusion" / "fused" / "report"
    assert sorted(p.name for p in figures.iterdir()) == sorted(report.REPORT_FILES)
    html_path = tmp_path / "report.html"
    built = snakemake_run(tmp_path, config, "--report", str(html_path))
    assert built.returncode == 0, built.stderr[-3000:]
    html = html_path.read_text()
    embedded = _embedded(html)
    for name in report.REPORT_FILES:
        assert embedded.get(name) == (figures / name).read_bytes(), name
    # Captions (report/*.rst) and the workflow description, rendered.
    assert "Maximum-intensity projection of the fused volume" in html
    assert "Tile layout: every tile" in html
    assert "format ome-zarr-0.5, with a multiscale pyramid" in html  # workflow.rst, rendered
    layout = ET.fromstring(embedded["layout_xy.svg"])
    assert len(_tiles(layout)) == 4  # the demo's four tiles
    timings = (figures / "timings.tsv").read_text().splitlines()
    assert len(timings) == 1 + 5 + 1  # header, 5 fuse ranges, 1 downsample range
    assert all(line.split("\t")[6] for line in timings[1:])  # peak RSS of every job
