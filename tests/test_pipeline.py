"""The whole engine, step by step as the workflow runs it, on the demo dataset."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import zarr
from pipeline import run_pipeline

from tilefusion import steps
from tilefusion.config import load_config
from tilefusion.demo import ground_truth
from tilefusion.errors import InputError
from tilefusion.writer import cast_to_dtype


def _config(demo_xml, workdir, **output):
    return {
        "dataset": str(demo_xml),
        "output": {"path": str(workdir / "fused.ome.zarr"), "chunks": [16, 32, 32], **output},
        "fusion": {"chunks_per_range": 16},
    }


def _stored_bytes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name not in ("zarr.json", ".zattrs", ".zarray", ".zgroup")
    }


def test_accuracy_against_the_analytic_truth(demo_xml, tmp_path):
    # rotated tiles, voxels 2 x 0.5 x 0.5 um, fused to a grid unlike the input's
    config = _config(demo_xml, tmp_path, resolution=[1.0, 0.75, 0.75], dtype="float32")
    plan = run_pipeline(config, tmp_path)
    fused = zarr.open_array(str(tmp_path / "fused.ome.zarr" / "0"), mode="r")[:]
    grids = np.meshgrid(*(np.arange(n) for n in fused.shape), indexing="ij")
    index = np.column_stack([g.ravel() for g in grids])
    physical = index * np.array(plan.resolution_zyx) + np.array(plan.origin_zyx)
    truth = ground_truth(physical).reshape(fused.shape)
    inside = fused > 0
    assert inside.mean() > 0.8
    error = fused[inside] - truth[inside]
    relative_rmse = np.sqrt(np.mean(error**2)) / truth[inside].std()
    assert relative_rmse < 0.02
    # least-squares sub-voxel shift of the fused volume against the truth
    gradients = np.column_stack([g[inside] for g in np.gradient(truth)])
    shift, *_ = np.linalg.lstsq(gradients, -error, rcond=None)
    assert np.all(np.abs(shift) < 0.1), shift


@pytest.mark.parametrize("fmt", ["ome-zarr-0.4", "ome-zarr-0.5"])
def test_identical_bytes_whatever_the_ranges(demo_xml, tmp_path, fmt):
    shards = {"shards": [32, 64, 64]} if fmt == "ome-zarr-0.5" else {}
    many = _config(demo_xml, tmp_path / "many", format=fmt, **shards)
    many["fusion"]["chunks_per_range"] = 1
    few = _config(demo_xml, tmp_path / "few", format=fmt, **shards)
    few["fusion"]["chunks_per_range"] = 1000
    plan_many = run_pipeline(many, tmp_path / "many", order="reverse")
    plan_few = run_pipeline(few, tmp_path / "few")
    assert plan_many.grid.n_ranges > 4 and plan_few.grid.n_ranges == 1
    bytes_many = _stored_bytes(tmp_path / "many" / "fused.ome.zarr")
    bytes_few = _stored_bytes(tmp_path / "few" / "fused.ome.zarr")
    assert bytes_many and bytes_many == bytes_few


def test_chunks_fused_in_parts_equal_chunks_fused_whole(demo_xml, tmp_path):
    # A read block smaller than a chunk's tile crops splits every chunk; every
    # voxel is computed on its own, so the values are the same.
    whole = _config(demo_xml, tmp_path / "whole", dtype="float32")
    parts = _config(demo_xml, tmp_path / "parts", dtype="float32")
    parts["fusion"]["read_block"] = [4, 8, 8]
    run_pipeline(whole, tmp_path / "whole")
    run_pipeline(parts, tmp_path / "parts")
    a = zarr.open_array(str(tmp_path / "whole" / "fused.ome.zarr" / "0"), mode="r")[:]
    b = zarr.open_array(str(tmp_path / "parts" / "fused.ome.zarr" / "0"), mode="r")[:]
    assert a.any()
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("fmt", ["ome-zarr-0.4", "ome-zarr-0.5"])
def test_output_opens_with_ome_zarr_and_validates(demo_xml, tmp_path, fmt):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    plan = run_pipeline(_config(demo_xml, tmp_path, format=fmt), tmp_path)
    node = next(iter(Reader(parse_url(str(tmp_path / "fused.ome.zarr")))()))
    assert [tuple(d.shape) for d in node.data] == [lv.shape_zyx for lv in plan.levels]
    transforms = node.metadata["coordinateTransformations"][0]
    assert transforms[0]["scale"] == list(plan.resolution_zyx)
    assert transforms[1]["translation"] == list(plan.origin_zyx)
    assert [a["unit"] for a in node.metadata["axes"]] == ["micrometer"] * 3
    group = zarr.open_group(str(tmp_path / "fused.ome.zarr"), mode="r")
    if fmt == "ome-zarr-0.4":
        from ome_zarr_models.v04.image import Image
    else:
        from ome_zarr_models.v05.image import Image
    Image.from_zarr(group)
    report = json.loads((tmp_path / "results/tilefusion/qc_report.json").read_text())
    assert report["ok"] and report["levels"][0]["coverage"] > 0.8


def test_validate_names_missing_and_corrupt_objects(demo_xml, tmp_path):
    config = _config(demo_xml, tmp_path)
    run_pipeline(config, tmp_path)
    markers = tmp_path / "results/tilefusion/markers"
    marker = json.loads((markers / "level0/range1.json").read_text())
    key = next(k for k, v in marker["objects"].items() if v)
    (tmp_path / "fused.ome.zarr" / key).unlink()
    other = json.loads((markers / "level1/range0.json").read_text())
    corrupt = next(k for k, v in other["objects"].items() if v)
    path = tmp_path / "fused.ome.zarr" / corrupt
    path.write_bytes(path.read_bytes()[:-7] + b"garbage")
    with pytest.raises(InputError, match="rerun with: snakemake") as info:
        steps.validate(
            config,
            plan_path=str(tmp_path / "results/tilefusion/plan.json"),
            markers_dir=str(markers),
            report_path=str(tmp_path / "report.json"),
            target="results/tilefusion/qc_report.json",
        )
    assert "level0/range1.json" in str(info.value) and "level1/range0.json" in str(info.value)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["bad_ranges"] == [[0, 1], [1, 0]]
    assert any(key in p and "missing" in p for p in report["problems"])
    assert any(corrupt in p and "corrupt" in p for p in report["problems"])


def test_existing_output_is_never_overwritten_silently(demo_xml, tmp_path):
    foreign = tmp_path / "fused.ome.zarr"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    config = _config(demo_xml, tmp_path)
    with pytest.raises(InputError, match="not written by tilefusion"):
        steps.check_output_path(load_config(config))
    # overwrite replaces only what tilefusion wrote
    config["output"]["overwrite"] = True
    with pytest.raises(InputError, match=r"output\.overwrite only replaces outputs tilefusion"):
        run_pipeline(config, tmp_path)
    assert (foreign / "precious.txt").read_text() == "keep me"
    (foreign / "precious.txt").unlink()
    config["output"]["overwrite"] = False
    run_pipeline(config, tmp_path)
    # the same configuration resumes; another one is refused, or replaced on request
    steps.check_output_path(load_config(config))
    config["fusion"]["blending"] = "max"
    with pytest.raises(InputError, match="another configuration"):
        steps.check_output_path(load_config(config))
    config["output"]["overwrite"] = True
    steps.check_output_path(load_config(config))


def test_integer_output_is_rounded_and_clipped():
    block = np.array([-3.0, 0.4, 0.5, 1.5, 2.5, 65535.4, 70000.0], dtype=np.float32)
    assert cast_to_dtype(block, np.dtype("uint16")).tolist() == [0, 0, 0, 2, 2, 65535, 65535]


def test_an_object_that_does_not_decode_is_found(demo_xml, tmp_path):
    config = _config(demo_xml, tmp_path)
    run_pipeline(config, tmp_path)
    markers = tmp_path / "results/tilefusion/markers"
    marker_file = markers / "level0/range0.json"
    marker = json.loads(marker_file.read_text())
    key = next(k for k, v in marker["objects"].items() if v)
    path = tmp_path / "fused.ome.zarr" / key
    path.write_bytes(b"not zstd at all")
    # a marker that agrees with the broken bytes: only decoding finds it
    marker["objects"][key] = hashlib.sha256(path.read_bytes()).hexdigest()
    marker_file.write_text(json.dumps(marker))
    with pytest.raises(InputError, match="problem"):
        steps.validate(
            config,
            plan_path=str(tmp_path / "results/tilefusion/plan.json"),
            markers_dir=str(markers),
            report_path=str(tmp_path / "report.json"),
            decode_all=True,
        )
    report = json.loads((tmp_path / "report.json").read_text())
    assert any("does not decode" in p and key in p for p in report["problems"])
