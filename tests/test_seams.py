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


def _fuse(xml, workdir, blending="mean"):
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


def test_matching_lowers_the_seam_contrast_at_least_5x(tmp_path):
    xml = write_scaled_demo(tmp_path / "raw")
    plan = _fuse(xml, tmp_path / "fused_raw")
    before = seams.seam_metrics(plan, store_path=tmp_path / "fused_raw" / "fused.ome.zarr")
    document = intensity.match_intensities(plan, threads=1)
    fixed = _corrected_copy(xml, tmp_path / "fixed", document)
    plan_fixed = _fuse(fixed, tmp_path / "fused_fixed")
    after = seams.seam_metrics(plan_fixed, store_path=tmp_path / "fused_fixed" / "fused.ome.zarr")
    s_before, s_after = before["summary"], after["summary"]
    assert s_before["pairs"] == s_after["pairs"] == 6
    assert s_before["seam_points"] > 1000
    assert s_before["seam_contrast"] > 0.05
    assert s_after["seam_contrast"] * 5 <= s_before["seam_contrast"]
    # the tiles' ratio shows the gains; structure agrees either way
    assert s_before["ratio_worst"] > 1.5  # gains 0.7 and 1.3, offsets 20 and -10
    assert s_after["ratio_worst"] < 1.01
    assert s_before["ncc_min"] > 0.999


def test_a_step_scores_its_relative_jump_and_a_slope_scores_nothing():
    # two tiles side by side along x, overlapping 16 voxels, fused by hand
    from tilefusion import geometry
    from tilefusion.plan import Plan, PlannedTile, _levels

    shape = (4, 16, 48)
    tiles = []
    for k, x0 in enumerate((0, 32)):
        t2o = geometry.translation([0, 0, x0])
        tiles.append(
            PlannedTile(
                name=f"t0-s{k}",
                setup=k,
                timepoint=0,
                source=register_memory_array(f"seam-tile{k}", np.ones(shape, np.float32)),
                shape_zyx=shape,
                dtype="float32",
                tile_to_output=t2o,
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
    x = np.arange(80, dtype=np.float64)
    try:
        for fused, expected in [
            # a step of 20 at tile 0's face (local mean 110); tile 1's face (at 100) sees none
            (np.where(x <= 47, 100.0, 120.0), 20 / (110 + 100)),
            (100.0 + 0.5 * x, 0.0),  # a linear slope: no seam
        ]:
            volume = np.broadcast_to(fused, (4, 16, 80)).astype(np.float32).copy()
            source = register_memory_array("seam-fused", volume)
            out = seams.seam_contrast(plan, source, step=1.0, points_per_face=64)
            e, s, n = out[(0, 1)]
            assert n > 0
            assert max(0.0, e) / s == pytest.approx(expected, abs=0.01)
    finally:
        for name in ("seam-tile0", "seam-tile1", "seam-fused"):
            forget_memory_array(name)


def test_pair_agreement():
    rng = np.random.default_rng(1)
    a = rng.uniform(100, 200, 500)
    samples = PairSamples((0, 1), np.zeros((500, 3)), a, 1.25 * a)
    out = seams.pair_agreement(
        samples,
        corrections={0: intensity.TileIntensity(1.0, 0.0), 1: intensity.TileIntensity(0.8, 0.0)},
    )
    assert out["ncc"] == pytest.approx(1.0)
    assert out["ratio"] == pytest.approx(1.25)
    assert out["ratio_corrected"] == pytest.approx(1.0)
