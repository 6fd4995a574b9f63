"""Intensity matching: per-tile gains and offsets from the overlaps."""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from tilefusion import intensity, steps
from tilefusion.config import load_config
from tilefusion.errors import InputError
from tilefusion.intensity import PairFit, PairSamples, fit_pair, solve_global

GAINS = (0.7, 1.3, 0.95, 1.12)
OFFSETS = (20.0, -10.0, 5.0, 0.0)


def write_scaled_demo(folder, demo_xml, gains=GAINS, offsets=OFFSETS):
    """A copy of the demo with tile k's values turned into ``gain_k * value + offset_k``."""
    shutil.copytree(demo_xml.parent, folder)
    for k, (gain, offset) in enumerate(zip(gains, offsets)):
        array = zarr.open_array(f"{folder}/tile{k}.zarr/0", mode="r+")
        values = array[:].astype(np.float64) * gain + offset
        array[...] = np.clip(np.rint(values), 1, 65535).astype(np.uint16)
    return folder / "dataset.xml"


def _plan(xml, tmp_path):
    config = load_config(
        {"dataset": str(xml), "output": {"path": str(tmp_path / "fused.ome.zarr")}}
    )
    return steps.plan_from_config(config)


def test_known_gains_are_recovered_within_2_percent(demo_xml, tmp_path):
    plan = _plan(write_scaled_demo(tmp_path / "data", demo_xml), tmp_path)
    document = intensity.match_intensities(plan, threads=1)
    assert len(document["pairs"]) == 6  # 2 x 2 tiles: rows, columns and diagonals
    found = np.array([document["tiles"][t.name]["gain"] for t in plan.tiles])
    offsets = np.array([document["tiles"][t.name]["offset"] for t in plan.tiles])
    # The correction undoes gain_k up to one common factor (mean gain 1).
    truth = 1.0 / np.array(GAINS)
    truth /= truth.mean()
    assert found.mean() == pytest.approx(1.0)
    assert offsets.mean() == pytest.approx(0.0, abs=1e-9)
    np.testing.assert_allclose(found, truth, rtol=0.02)
    # corrected = raw * gain + offset makes every tile the same affine image of the truth
    common = found * np.array(OFFSETS) + offsets
    np.testing.assert_allclose(common, common[0], atol=1.0)
    for pair in document["pairs"]:
        assert pair["residual_ratio"] == pytest.approx(1.0, abs=0.005)


def test_document_round_trips_and_bad_files_are_refused(demo_xml, tmp_path):
    plan = _plan(write_scaled_demo(tmp_path / "data", demo_xml), tmp_path)
    document = intensity.match_intensities(plan, model="gain", threads=1)
    path = tmp_path / "intensity.json"
    intensity.write_intensity(path, document)
    read = intensity.read_intensity(path)
    assert set(read) == {t.name for t in plan.tiles}
    assert all(v.offset == 0.0 for v in read.values())
    with pytest.raises(InputError, match="intensity file not found"):
        intensity.read_intensity(tmp_path / "missing.json")
    document["tiles"]["t0-s0"]["gain"] = -1
    path.write_text(json.dumps(document))
    with pytest.raises(InputError, match=r"tiles\.t0-s0: gain -1.0 must be positive"):
        intensity.read_intensity(path)
    path.write_text(json.dumps({"tilefusion_intensity": 99}))
    with pytest.raises(InputError, match="not an intensity file of this version"):
        intensity.read_intensity(path)


def test_pair_fit_ignores_outliers():
    rng = np.random.default_rng(0)
    a = rng.uniform(100, 1000, 2000)
    b = 0.8 * a + 15 + rng.normal(0, 1, a.size)
    b[:200] = rng.uniform(0, 5000, 200)  # 10 % from something only one tile shows
    fit = fit_pair(PairSamples((0, 1), np.zeros((a.size, 3)), a, b))
    assert fit.scale == pytest.approx(0.8, rel=0.005)
    assert fit.shift == pytest.approx(15, abs=2)
    assert fit.inliers < 1900
    # a flat overlap cannot tell gain from offset: the gain alone is fitted
    flat = fit_pair(PairSamples((0, 1), np.zeros((100, 3)), np.full(100, 50.0), np.full(100, 60.0)))
    assert (flat.scale, flat.shift) == (pytest.approx(1.2), 0.0)
    # noisy on both sides (signal-to-noise about 2): the slope is not pulled to 0
    t = rng.uniform(50, 150, 4000)
    noisy_a = t + rng.normal(0, 20, t.size)
    noisy_b = 1.3 * t + 10 + rng.normal(0, 26, t.size)
    noisy = fit_pair(PairSamples((0, 1), np.zeros((t.size, 3)), noisy_a, noisy_b))
    assert noisy.scale == pytest.approx(1.3, rel=0.02)
    assert noisy.shift == pytest.approx(10, abs=3)
    with pytest.raises(ValueError, match="model must be one of"):
        fit_pair(PairSamples((0, 1), np.zeros((1, 3)), a[:1], b[:1]), model="affine")


def test_global_solve_anchors_each_group_and_leaves_lonely_tiles_alone():
    # tiles 0-1-2 in a chain, 3-4 a pair, 5 alone
    fits = [
        PairFit((0, 1), 2.0, 0.0, 100, 100.0, 1.0),  # b = 2a: tile 1 twice as bright
        PairFit((1, 2), 0.5, 10.0, 100, 100.0, 1.0),
        PairFit((3, 4), 1.5, 0.0, 100, 100.0, 1.0),
    ]
    out = solve_global(6, fits)
    gains = np.array([s.gain for s in out])
    np.testing.assert_allclose(gains[[0, 1, 2]].mean(), 1.0)
    np.testing.assert_allclose(gains[0] / gains[1], 2.0)
    np.testing.assert_allclose(gains[1] / gains[2], 0.5)
    np.testing.assert_allclose(gains[3:5].mean(), 1.0)
    np.testing.assert_allclose(gains[3] / gains[4], 1.5)
    assert (out[5].gain, out[5].offset) == (1.0, 0.0)
    offsets = np.array([s.offset for s in out])
    np.testing.assert_allclose(offsets[:3].mean(), 0.0, atol=1e-9)
    # offset_1 = 10 * gain_2 + offset_2
    assert offsets[1] == pytest.approx(10 * gains[2] + offsets[2])
    # a pair of unrelated tiles (negative scale) is left out
    alone = solve_global(2, [PairFit((0, 1), -1.0, 0.0, 10, 10.0, 1.0)])
    assert [(s.gain, s.offset) for s in alone] == [(1.0, 0.0), (1.0, 0.0)]


def test_gains_are_fitted_on_flatfield_corrected_values(demo_xml, tmp_path):
    xml = write_scaled_demo(tmp_path / "data", demo_xml)
    plan = _plan(xml, tmp_path)
    ny, nx = plan.tiles[0].shape_zyx[1:]
    yy, xx = np.meshgrid(np.linspace(-1, 1, ny), np.linspace(-1, 1, nx), indexing="ij")
    shading = 1.0 - 0.3 * (yy**2 + xx**2)
    for tile in plan.tiles:
        array = zarr.open_array(f"{tile.source.path}/0", mode="r+")
        array[...] = np.clip(np.rint(array[:] * shading), 1, 65535).astype(np.uint16)
    truth = 1.0 / np.array(GAINS)
    truth /= truth.mean()
    profiles = (shading / shading.mean(), np.zeros_like(shading))
    document = intensity.match_intensities(plan, threads=1, profiles=profiles)
    found = np.array([document["tiles"][t.name]["gain"] for t in plan.tiles])
    np.testing.assert_allclose(found, truth, rtol=0.02)
    # the shading left in, the fits are off (the overlaps sit at the dark edges)
    shaded = intensity.match_intensities(plan, threads=1)
    wrong = np.array([shaded["tiles"][t.name]["gain"] for t in plan.tiles])
    assert np.max(np.abs(wrong / truth - 1)) > 2 * np.max(np.abs(found / truth - 1))


def test_pairs_are_sampled_from_a_stored_coarse_level_both_tiles_keep(
    demo_xml, tmp_path, monkeypatch
):
    xml = write_scaled_demo(tmp_path / "data", demo_xml)
    plan = _plan(xml, tmp_path)
    voxel = (2.0, 0.5, 0.5)
    for tile in plan.tiles:
        group = zarr.open_group(tile.source.path, mode="r+")
        full = group["0"][:].astype(np.float64)
        ny, nx = full.shape[1] // 2 * 2, full.shape[2] // 2 * 2
        half = full[:, :ny, :nx].reshape(full.shape[0], ny // 2, 2, nx // 2, 2).mean(axis=(2, 4))
        group.create_array("1", shape=half.shape, chunks=(16, 32, 32), dtype="uint16")[...] = (
            np.rint(half).astype(np.uint16)
        )
        group.attrs["multiscales"] = [
            {
                "version": "0.4",
                "axes": [{"name": n, "type": "space", "unit": "micrometer"} for n in "zyx"],
                "datasets": [
                    {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": voxel}]},
                    {
                        "path": "1",
                        "coordinateTransformations": [
                            {"type": "scale", "scale": [2.0, 1.0, 1.0]},
                            {"type": "translation", "translation": [0.0, 0.25, 0.25]},
                        ],
                    },
                ],
            }
        ]
    opened = []
    real_open = intensity.open_array

    def spy(source, **kwargs):
        opened.append(source.key)
        return real_open(source, **kwargs)

    monkeypatch.setattr(intensity, "open_array", spy)
    document = intensity.match_intensities(plan, threads=1)
    # level 1 (1, 2, 2) for the wide overlaps; the small diagonal ones read level 0
    assert opened.count("1") >= 8 and "" in opened
    found = np.array([document["tiles"][t.name]["gain"] for t in plan.tiles])
    truth = 1.0 / np.array(GAINS)
    np.testing.assert_allclose(found, truth / truth.mean(), rtol=0.02)


def test_command_line_writes_the_intensity_file(demo_xml, tmp_path, capsys):
    import yaml

    from tilefusion.cli import main

    xml = write_scaled_demo(tmp_path / "data", demo_xml)
    config = tmp_path / "my.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "dataset": str(xml),
                "output": {"path": str(tmp_path / "fused.ome.zarr")},
                "fusion": {"intensity_matching": True, "intensity_model": "gain"},
            }
        )
    )
    plan = tmp_path / "plan.json"
    assert main(["plan", "--config", str(config), "--output", str(plan)]) == 0
    out = tmp_path / "intensity.json"
    assert (
        main(["intensity", "--config", str(config), "--plan", str(plan), "--output", str(out)]) == 0
    )
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["pairs"] == 6
    read = intensity.read_intensity(out)
    assert all(v.offset == 0.0 for v in read.values())  # the model asked for
    assert steps.corrections_paths(load_config(yaml.safe_load(config.read_text())), "r") == {
        "intensity": "r/intensity.json"
    }


def test_workflow_runs_the_correction_steps_when_asked(demo_xml, tmp_path):
    from pipeline import snakemake_run

    if shutil.which("snakemake") is None:
        pytest.skip("snakemake not installed")
    base = {"dataset": str(demo_xml), "demo": False}
    on = dict(base, fusion={"intensity_matching": True, "flatfield": {"mode": "estimate"}})
    listed = snakemake_run(tmp_path / "on", on, "-n")
    assert listed.returncode == 0, listed.stderr
    for rule in ("flatfield", "intensity", "fuse", "validate"):
        assert re.search(rf"^{rule}\s+1?\d*$", listed.stdout, re.M), (rule, listed.stdout)


def test_tile_corrections_are_built_from_the_correction_files(demo_xml, tmp_path):
    from tilefusion import flatfield

    plan = _plan(demo_xml, tmp_path)
    assert steps.tile_corrections(plan) == {}
    names = [t.name for t in plan.tiles]
    document = {
        "tilefusion_intensity": 1,
        "model": "gain_offset",
        "tiles": {names[0]: {"gain": 1.25, "offset": -3.0}},
        "pairs": [],
    }
    intensity.write_intensity(tmp_path / "intensity.json", document)
    shape_yx = plan.tiles[0].shape_zyx[1:]
    flat = np.full(shape_yx, 0.5, dtype=np.float32)
    flatfield.write_profiles(tmp_path / "f.npy", tmp_path / "d.npy", flat, np.zeros_like(flat))
    found = steps.tile_corrections(
        plan,
        intensity_path=str(tmp_path / "intensity.json"),
        flatfield_path=str(tmp_path / "f.npy"),
        darkfield_path=str(tmp_path / "d.npy"),
    )
    assert (found[names[0]].gain, found[names[0]].offset) == (1.25, -3.0)
    assert (found[names[1]].gain, found[names[1]].offset) == (1.0, 0.0)  # not named: unchanged
    assert found[names[0]].flatfield is found[names[1]].flatfield  # one profile, shared
    assert found[names[0]].darkfield is None  # a zero darkfield changes nothing
    np.save(tmp_path / "f.npy", np.ones((3, 3)))
    with pytest.raises(InputError, match=r"f.npy: fusion.flatfield: shape \[3, 3\]"):
        steps.tile_corrections(plan, flatfield_path=str(tmp_path / "f.npy"))


REAL = Path("/work/shared/data/real-tiles/aind-cloud-fusion_real_data/tests/real_data/fused.zarr")


@pytest.mark.skipif(not REAL.exists(), reason="shared real data not present")
def test_gains_recovered_on_real_content_with_independent_noise(tmp_path):
    # 2 x 2 overlapping crops of a real exaSPIM volume, each with its own
    # Poisson noise, gain and offset, as four acquisitions of one sample
    import yaml

    source = zarr.open_array(str(REAL / "0"), mode="r")
    content = source[0, 0, 30:62, 100:400, 100:700].astype(np.float64)
    tiles = []
    for k, (y0, x0) in enumerate([(0, 0), (0, 240), (120, 0), (120, 240)]):
        crop = np.random.default_rng(k).poisson(content[:, y0 : y0 + 180, x0 : x0 + 360])
        values = np.where(crop > 0, np.clip(np.rint(crop * GAINS[k] + OFFSETS[k]), 1, 65535), 0)
        array = zarr.open_array(
            str(tmp_path / f"t{k}.zarr"), mode="w", shape=values.shape, dtype="uint16"
        )
        array[...] = values.astype(np.uint16)
        tiles.append(
            {
                "path": f"t{k}.zarr",
                "voxel_size": [1.0, 1.0, 1.0],
                "transforms": [{"translation": [0, y0, x0]}],
            }
        )
    (tmp_path / "tiles.yaml").write_text(yaml.safe_dump({"tiles": tiles}))
    plan = _plan(tmp_path / "tiles.yaml", tmp_path)
    document = intensity.match_intensities(plan, threads=1)
    found = np.array([document["tiles"][t.name]["gain"] for t in plan.tiles])
    truth = 1.0 / np.array(GAINS)
    np.testing.assert_allclose(found, truth / truth.mean(), rtol=0.02)


def test_a_gain_grid_follows_gains_that_change_with_depth(demo_xml, tmp_path):
    # each tile dims or brightens along z at its own rate: no scalar gain fits
    xml = write_scaled_demo(tmp_path / "data", demo_xml)
    plan = _plan(xml, tmp_path)
    slopes = (0.3, -0.2, 0.1, 0.0)
    for tile, slope in zip(plan.tiles, slopes):
        array = zarr.open_array(f"{tile.source.path}/0", mode="r+")
        depth = np.linspace(-0.5, 0.5, tile.shape_zyx[0])[:, None, None]
        array[...] = np.clip(np.rint(array[:] * (1.0 + slope * depth)), 1, 65535).astype("uint16")

    def spread(document):
        # how much the corrected tiles still disagree inside each overlap
        found = intensity.read_intensity_document(document)
        worst = 0.0
        for pair in intensity.overlapping_pairs(plan):
            samples = intensity.sample_pair(plan, pair)
            i, j = pair
            ca = found[plan.tiles[i].name].apply(plan.tiles[i], samples.points, samples.a)
            cb = found[plan.tiles[j].name].apply(plan.tiles[j], samples.points, samples.b)
            worst = max(worst, float(np.std(cb / ca)))
        return worst

    scalar = intensity.match_intensities(plan, threads=1)
    grid = intensity.match_intensities(plan, threads=1, grid_zyx=(3, 1, 1))
    assert np.asarray(grid["tiles"]["t0-s0"]["gain"]).shape == (3, 1, 1)
    assert spread(grid) < 0.01 < spread(scalar) / 3
    means = [np.mean(grid["tiles"][t.name]["gain"]) for t in plan.tiles]
    assert np.mean(means) == pytest.approx(1.0)
    path = tmp_path / "grid.json"
    intensity.write_intensity(path, grid)
    assert intensity.read_intensity(path)["t0-s0"].gain.shape == (3, 1, 1)


def test_a_gain_grid_with_the_offset_model_is_refused_before_any_job(demo_xml, tmp_path):
    config = load_config(
        {
            "dataset": str(demo_xml),
            "output": {"path": str(tmp_path / "fused.ome.zarr")},
            "fusion": {"intensity_model": "offset", "intensity_grid": [2, 1, 1]},
        }
    )
    with pytest.raises(InputError, match=r"fusion\.intensity_grid: a gain grid needs"):
        steps.plan_for_run(config)
