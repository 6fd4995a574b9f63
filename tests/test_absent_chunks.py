"""Absent tile chunks are read as no data, and a fuse job says so (issue 21)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import zarr

from tilefusion.demo import write_demo
from tilefusion.fuse import FusionOptions, fuse_range
from tilefusion.plan import make_plan
from tilefusion.readers import read_dataset
from tilefusion.store import FormatV05, prepare_store


@pytest.fixture(scope="module")
def demo_copy_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A demo of our own: the tests below delete its chunks."""
    path = tmp_path_factory.mktemp("absent-demo") / "dataset.xml"
    write_demo(path)
    return path


def _demo(source_xml: Path, folder: Path) -> Path:
    shutil.copytree(source_xml.parent, folder)
    return folder / source_xml.name


def _fuse(xml: Path, out: Path, *, chunks_per_range: int = 4096) -> list[dict]:
    plan = make_plan(read_dataset(xml), chunks_zyx=(32, 64, 64), chunks_per_range=chunks_per_range)
    prepare_store(plan, out, ngff=FormatV05(), dtype="uint16", identity="t")
    options = FusionOptions(threads=2)
    return [
        fuse_range(plan, r, store_path=str(out), options=options) for r in range(plan.grid.n_ranges)
    ]


def test_nothing_absent_reports_no_tile(demo_copy_source: Path, tmp_path: Path, caplog) -> None:
    xml = _demo(demo_copy_source, tmp_path / "demo")
    with caplog.at_level(logging.WARNING, logger="tilefusion"):
        (marker,) = _fuse(xml, tmp_path / "out.zarr")
    assert marker["absent_input_chunks"] == {}
    assert not [r for r in caplog.records if "absent" in r.getMessage()]


def test_a_deleted_tile_chunk_is_counted_and_logged(
    demo_copy_source: Path, tmp_path: Path, caplog
) -> None:
    xml = _demo(demo_copy_source, tmp_path / "demo")
    chunk = tmp_path / "demo" / "tile1.zarr" / "0" / "1.0.1"
    assert chunk.is_file()  # the demo writes every chunk (its background is 100)
    chunk.unlink()
    with caplog.at_level(logging.WARNING, logger="tilefusion"):
        (marker,) = _fuse(xml, tmp_path / "out.zarr")
    assert marker["absent_input_chunks"] == {"t0-s1": 1}
    warnings = [r for r in caplog.records if "absent" in r.getMessage()]
    assert [(r.name, r.levelname, r.getMessage()) for r in warnings] == [
        ("tilefusion", "WARNING", "tile t0-s1: 1 absent chunk read as no data (tile1.zarr)")
    ]
    # read as no data: the tile's corner there is missing from the output
    full = tmp_path / "full"
    (intact,) = _fuse(_demo(demo_copy_source, full), tmp_path / "intact.zarr")
    assert intact["absent_input_chunks"] == {}
    damaged = zarr.open_array(str(tmp_path / "out.zarr" / "0"), mode="r")[:]
    reference = zarr.open_array(str(tmp_path / "intact.zarr" / "0"), mode="r")[:]
    assert (damaged > 0).sum() < (reference > 0).sum()


def test_each_range_counts_the_absent_chunks_it_read(
    demo_copy_source: Path, tmp_path: Path
) -> None:
    xml = _demo(demo_copy_source, tmp_path / "demo")
    for name in ("0.0.0", "0.0.1", "1.1.1"):
        (tmp_path / "demo" / "tile0.zarr" / "0" / name).unlink()
    markers = _fuse(xml, tmp_path / "out.zarr", chunks_per_range=8)
    assert len(markers) > 1
    per_range = [m["absent_input_chunks"].get("t0-s0", 0) for m in markers]
    assert all(set(m["absent_input_chunks"]) <= {"t0-s0"} for m in markers)
    # every deleted chunk is read by some range; a chunk two ranges read counts in both
    assert max(per_range) <= 3 <= sum(per_range)
