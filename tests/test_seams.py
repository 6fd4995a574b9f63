"""Seam metrics: pair agreement in the overlaps, steps across tile faces in the fused image."""

import shutil

import numpy as np
import pytest
import zarr
from pipeline import run_pipeline
from test_intensity import write_scaled_demo

from tilefusion import intensity, seams
from tilefusion.intensity import PairSamples
from tilefusion.plan import read_plan
from tilefusion.readers.arrays import forget_memory_array, register_memory_array


def _fuse(xml, workdir, blending="cosine"):
    config = {
        "dataset": str(xml),
        "output": {"path": str(workdir / "fused.ome.zarr"), "chunks": [16, 32, 32]},
        "fusion": {"chunks_per_range": 64, "blending": blending},
    }
    run_pipeline(config, workdir)
    return read_plan(workdir / "results" / "tilefusion" / "plan.json")


def _corrected_copy(xml, folder, document):
    """The dataset with every tile's values corrected (raw * gain + offset)."""
    shutil.copytree(xml.parent, folder)
    plan_tiles = document["tiles"]
    for tile_dir in sorted(folder.glob("tile*.zarr")):
        name = f"t0-s{tile_dir.name[4:-5]}"
        entry = plan_tiles[name]
        array = zarr.open_array(f"{tile_dir}/0", mode="r+")
        values = array[:].astype(np.float64) * entry["gain"] + entry["offset"]
        array[...] = np.clip(np.rint(values), 1, 65535).astype(np.uint16)
    return folder / "dataset.xml"


def test_matching_lowers_the_seam_contrast_at_least_5x(demo_xml, tmp_path):
    xml = write_scaled_demo(tmp_path / "raw", demo_xml)
    plan = _fuse(xml, tmp_path / "fused_raw")
    before = seams.seam_metrics(plan, store_path=tmp_path / "fused_raw" / "fused.ome.zarr")
    document = intensity.match_intensities(plan, threads=1)
    fixed = _corrected_copy(xml, tmp_path / "fixed", document)
    plan_fixed = _fuse(fixed, tmp_path / "fused_fixed")
    after = seams.seam_metrics(plan_fixed, store_path=tmp_path / "fused_fixed" / "fused.ome.zarr")
    s_before, s_after = before["summary"], after["summary"]
    assert s_before["pairs"] == s_after["pairs"] == 6
    assert s_before["seam_probes"] > 1000
    assert s_before["seam_contrast"] > 0.05
    assert s_after["seam_contrast"] * 5 <= s_before["seam_contrast"]
    # the tiles' ratio shows the gains; structure agrees either way
    assert s_before["ratio_worst"] > 1.5  # gains 0.7 and 1.3, offsets 20 and -10
    assert s_after["ratio_worst"] < 1.01
    assert s_before["ncc_min"] > 0.999


def test_the_score_sees_a_brighter_tile_and_not_the_content():
    # two tiles side by side along x, overlapping over x = 32..47, on a sloped sample
    from tilefusion import geometry
    from tilefusion.plan import Plan, PlannedTile, _levels

    shape = (4, 16, 48)
    x = np.arange(80, dtype=np.float64)
    content = 100.0 + 0.5 * x
    tiles = []
    for k, x0 in enumerate((0, 32)):
        values = np.broadcast_to(content[x0 : x0 + 48], shape).astype(np.float32).copy()
        tiles.append(
            PlannedTile(
                name=f"t0-s{k}",
                setup=k,
                timepoint=0,
                source=register_memory_array(f"seam-tile{k}", values),
                shape_zyx=shape,
                dtype="float32",
                tile_to_output=geometry.translation([0, 0, x0]),
                box_lo=(0.0, 0.0, float(x0)),
                box_hi=(3.0, 15.0, float(x0 + 47)),
            )
        )
    levels = _levels(
        (4, 16, 80),
        (1.0, 1.0, 1.0),
        (0.0, 0.0, 0.0),
        chunks=(4, 16, 80),
        shards=(4, 16, 80),
        chunks_per_range=1,
        n_levels=1,
    )
    plan = Plan("memory", "micrometer", (1.0, 1.0, 1.0), levels, tuple(tiles))
    # tile 0 fused 20 % too bright; mean blending: 1.1 times the content in the overlap
    bright = np.where(x < 32, 1.2, np.where(x <= 47, 1.1, 1.0)) * content
    try:
        for fused, expected in [(content, 0.0), (bright, 0.1 / 1.1)]:
            volume = np.broadcast_to(fused, (4, 16, 80)).astype(np.float32).copy()
            source = register_memory_array("seam-fused", volume)
            out = seams.seam_contrast(plan, source, depth=16.0, points_per_face=64)
            e, s, n = out[(0, 1)]
            assert n > 100
            assert e / s == pytest.approx(expected, abs=1e-4)
    finally:
        for name in ("seam-tile0", "seam-tile1", "seam-fused"):
            forget_memory_array(name)


def test_pair_agreement():
    rng = np.random.default_rng(1)
    a = rng.uniform(100, 200, 500)
    samples = PairSamples((0, 1), np.zeros((500, 3)), a, 1.25 * a)
    out = seams.pair_agreement(samples, corrected=(a, 0.8 * samples.b))
    assert out["ncc"] == pytest.approx(1.0)
    assert out["ratio"] == pytest.approx(1.25)
    assert out["ratio_corrected"] == pytest.approx(1.0)
