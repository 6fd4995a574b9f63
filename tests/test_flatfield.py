"""Flatfield and darkfield profiles: estimated from tile planes, or read from files."""

import numpy as np
import pytest
import zarr

from tilefusion import flatfield, steps
from tilefusion.config import load_config
from tilefusion.demo import DemoSpec, write_demo
from tilefusion.errors import InputError

SHAPE_YX = (96, 128)


def _shading(shape_yx=SHAPE_YX):
    yy, xx = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape_yx), indexing="ij")
    return 1.0 - 0.35 * (yy**2 + 0.8 * xx**2) + 0.05 * xx  # 0.37 .. 1 vignetting


def _sparse_planes(count, shape_yx=SHAPE_YX, seed=0):
    """Background 100 with a few bright spots per plane, brightness varying per plane."""
    rng = np.random.default_rng(seed)
    y, x = (np.arange(n, dtype=np.float64) for n in shape_yx)
    planes = np.full((count, *shape_yx), 100.0)
    for plane in planes:
        for _ in range(8):
            cy, cx = rng.uniform(0, shape_yx[0]), rng.uniform(0, shape_yx[1])
            sigma, amp = rng.uniform(2, 5), rng.uniform(200, 1000)
            plane += amp * np.exp(-((y[:, None] - cy) ** 2 + (x[None] - cx) ** 2) / (2 * sigma**2))
        plane *= rng.uniform(0.8, 1.2)
    return planes


def _relative_error(corrected, truth):
    ratio = corrected / truth
    return np.abs(ratio / np.median(ratio) - 1.0)  # the profile's mean 1 leaves one scale


def test_shaded_planes_are_corrected_to_within_2_percent():
    truth = _sparse_planes(120)
    shading = _shading()
    flat, dark = flatfield.estimate_profiles(truth * shading)
    assert flat.shape == SHAPE_YX and flat.mean() == pytest.approx(1.0)
    assert not dark.any()
    error = _relative_error(flatfield.apply_profiles(truth * shading, flat, dark), truth)
    assert error.mean() < 0.005 and np.percentile(error, 99) < 0.02
    before = _relative_error(truth * shading, truth)
    assert before.mean() > 0.1
    # estimated on 2 x 2 block means (as for large tiles), returned at full size
    shaded = truth * shading
    halves = shaded.reshape(len(shaded), 48, 2, 64, 2).mean(axis=(2, 4))
    coarse, _ = flatfield.estimate_profiles(halves, shape_yx=SHAPE_YX)
    assert coarse.shape == SHAPE_YX
    np.testing.assert_allclose(coarse, shading / shading.mean(), rtol=0.02)


def test_darkfield_is_estimated_from_planes_of_different_brightness():
    truth = _sparse_planes(120, seed=3)
    raw = truth * _shading() + 30.0
    flat, dark = flatfield.estimate_profiles(raw, darkfield=True)
    assert np.median(dark) == pytest.approx(30.0, abs=3.0)
    error = _relative_error(flatfield.apply_profiles(raw, flat, dark), truth)
    assert error.mean() < 0.01 and np.percentile(error, 99) < 0.05
    with pytest.raises(ValueError, match="planes of different brightness"):
        flatfield.estimate_profiles(np.full((4, 8, 8), 100.0), darkfield=True)


def test_a_shaded_dataset_is_corrected_to_within_2_percent(tmp_path):
    spec = DemoSpec(tiles_yx=(2, 2), tile_shape_zyx=(30, *SHAPE_YX))
    dataset = write_demo(tmp_path / "dataset.xml", spec)
    shading = _shading()
    truths = []
    for k, view in enumerate(dataset.views):
        truth = _sparse_planes(30, seed=10 + k)
        truths.append(truth)
        array = zarr.open_array(f"{view.source.path}/0", mode="r+")
        array[...] = np.rint(truth * shading).astype(np.uint16)
    config = load_config(
        {"dataset": str(tmp_path / "dataset.xml"), "output": {"path": str(tmp_path / "o.zarr")}}
    )
    plan = steps.plan_from_config(config)
    planes, shape_yx = flatfield.sample_planes(plan, max_planes=120)
    assert planes.shape == (120, *SHAPE_YX) and shape_yx == SHAPE_YX
    flat, dark = flatfield.estimate_profiles(planes, shape_yx=shape_yx)
    errors = []
    for view, truth in zip(dataset.views, truths):
        raw = zarr.open_array(f"{view.source.path}/0", mode="r")[:]
        errors.append(_relative_error(flatfield.apply_profiles(raw, flat, dark), truth))
    error = np.concatenate([e.ravel() for e in errors])
    assert error.mean() < 0.005 and np.percentile(error, 99) < 0.02
    # written and read back as the fuse jobs would
    flatfield.write_profiles(tmp_path / "flat.npy", tmp_path / "dark.npy", flat, dark)
    back = flatfield.read_profile(tmp_path / "flat.npy", shape_yx=SHAPE_YX, field="flatfield")
    np.testing.assert_array_equal(back, flat)


def test_profiles_given_as_files_are_checked(tmp_path):
    import tifffile

    good = tmp_path / "flat.tif"
    tifffile.imwrite(good, _shading().astype(np.float32))
    read = flatfield.read_profile(
        good, shape_yx=SHAPE_YX, field="fusion.flatfield.flatfield", positive=True
    )
    np.testing.assert_allclose(read, _shading(), rtol=1e-6)
    np.save(tmp_path / "small.npy", np.ones((8, 8)))
    with pytest.raises(InputError, match=r"small.npy: fusion.flatfield.flatfield: shape \[8, 8\]"):
        flatfield.read_profile(
            tmp_path / "small.npy", shape_yx=SHAPE_YX, field="fusion.flatfield.flatfield"
        )
    np.save(tmp_path / "zero.npy", np.zeros(SHAPE_YX))
    with pytest.raises(InputError, match="must be positive everywhere"):
        flatfield.read_profile(
            tmp_path / "zero.npy",
            shape_yx=SHAPE_YX,
            field="fusion.flatfield.flatfield",
            positive=True,
        )
    with pytest.raises(InputError, match="file not found"):
        flatfield.read_profile(tmp_path / "nope.npy", shape_yx=SHAPE_YX, field="f")
    with pytest.raises(InputError, match=r"a profile is a \.npy or \.tif file"):
        flatfield.read_profile(tmp_path / "flat.png", shape_yx=SHAPE_YX, field="f")


def test_flatfield_step_estimates_or_checks_files(tmp_path, capsys):
    import json

    import yaml

    from tilefusion.cli import main

    spec = DemoSpec(tiles_yx=(1, 2), tile_shape_zyx=(20, *SHAPE_YX))
    dataset = write_demo(tmp_path / "dataset.xml", spec)
    for k, view in enumerate(dataset.views):
        array = zarr.open_array(f"{view.source.path}/0", mode="r+")
        array[...] = np.rint(_sparse_planes(20, seed=k) * _shading()).astype(np.uint16)
    raw = {"dataset": str(tmp_path / "dataset.xml"), "output": {"path": str(tmp_path / "o.zarr")}}
    config = tmp_path / "my.yaml"
    plan = tmp_path / "plan.json"
    flat, dark = tmp_path / "flat.npy", tmp_path / "dark.npy"
    raw["fusion"] = {"flatfield": {"mode": "estimate", "planes": 40}}
    config.write_text(yaml.safe_dump(raw))
    assert main(["plan", "--config", str(config), "--output", str(plan)]) == 0
    args = ["--config", str(config), "--plan", str(plan), "--flatfield", str(flat)]
    assert main(["flatfield", *args, "--darkfield", str(dark)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["shape_yx"] == list(SHAPE_YX)
    estimated = np.load(flat)
    np.testing.assert_allclose(estimated, _shading() / _shading().mean(), rtol=0.02)
    assert not np.load(dark).any()
    # given as files: checked against the tiles, copied as the run's profiles
    given = tmp_path / "given.npy"
    np.save(given, _shading()[:-1])
    raw["fusion"] = {"flatfield": {"mode": "files", "flatfield": str(given)}}
    config.write_text(yaml.safe_dump(raw))
    assert main(["flatfield", *args, "--darkfield", str(dark)]) == 2
    assert "given.npy: fusion.flatfield.flatfield: shape [95, 128]" in capsys.readouterr().err
    np.save(given, _shading())
    assert main(["flatfield", *args, "--darkfield", str(dark)]) == 0
    np.testing.assert_allclose(np.load(flat), _shading(), rtol=1e-6)
    # a darkfield cannot be estimated from planes of one brightness: one line
    raw["fusion"] = {"flatfield": {"mode": "estimate", "estimate_darkfield": True, "planes": 4}}
    config.write_text(yaml.safe_dump(raw))
    for view in dataset.views:
        zarr.open_array(f"{view.source.path}/0", mode="r+")[...] = 100
    assert main(["flatfield", *args, "--darkfield", str(dark)]) == 2
    assert "fusion.flatfield: a darkfield needs planes of different brightness" in (
        capsys.readouterr().err
    )


def test_a_missing_or_misfit_profile_stops_the_run_before_any_job(demo_xml, tmp_path):
    config = load_config(
        {
            "dataset": str(demo_xml),
            "output": {"path": str(tmp_path / "o.zarr")},
            "fusion": {"flatfield": {"mode": "files", "flatfield": str(tmp_path / "f.npy")}},
        }
    )
    with pytest.raises(InputError, match=r"f.npy: fusion.flatfield.flatfield: file not found"):
        steps.plan_for_run(config)
    np.save(tmp_path / "f.npy", np.ones((5, 5)))
    with pytest.raises(InputError, match=r"shape \[5, 5\] is not the tiles' yx shape \[96, 96\]"):
        steps.plan_for_run(config)
    np.save(tmp_path / "f.npy", np.ones((96, 96)))
    steps.plan_for_run(config)
