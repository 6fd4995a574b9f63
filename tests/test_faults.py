"""Faults of the environment and degenerate tiles: one line, nothing lost, resumable."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr
from pipeline import run_pipeline, snakemake_run, stored_bytes

from tilefusion.demo import write_demo

ROOT = Path(__file__).resolve().parents[1]
SNAKEFILE = ROOT / "Snakefile"

needs_snakemake = pytest.mark.skipif(
    shutil.which("snakemake") is None, reason="snakemake not installed"
)


def _config(dataset: Path, output: Path) -> dict:
    return {
        "dataset": str(dataset),
        "output": {
            "path": str(output),
            "chunks": [16, 32, 32],
            "shards": [32, 64, 64],
            "pyramid_levels": 2,
        },
        "fusion": {"chunks_per_range": 64},
    }


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs (root only), grown to 256 MiB by calling the returned function."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small file system needs root")
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)], capture_output=True
    )
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")

    def grow() -> None:
        subprocess.run(["mount", "-o", "remount,size=256m", str(mount_point)], check=True)

    try:
        yield mount_point, grow
    finally:
        subprocess.run(["umount", "-l", str(mount_point)])


@needs_snakemake
def test_a_full_disk_ends_in_one_line_and_the_rerun_gives_the_clean_bytes(
    tmp_path, demo_xml, small_disk
):
    mount_point, grow = small_disk
    output = mount_point / "fused.ome.zarr"
    clean = snakemake_run(
        tmp_path / "clean", _config(demo_xml, tmp_path / "clean" / "fused.ome.zarr")
    )
    assert clean.returncode == 0, clean.stderr[-3000:]
    clean_bytes = stored_bytes(tmp_path / "clean" / "fused.ome.zarr")

    workdir = tmp_path / "run"
    full = snakemake_run(workdir, _config(demo_xml, output))
    assert full.returncode != 0
    logs = "".join(p.read_text() for p in (workdir / "logs").rglob("*.log"))
    errors = [line for line in logs.splitlines() if "tilefusion: error:" in line]
    assert errors and all("No space left on device" in line for line in errors), logs[-3000:]
    assert "Traceback" not in logs
    assert not (workdir / "results/tilefusion/fused/qc_report.json").exists()

    grow()
    rerun = snakemake_run(workdir, _config(demo_xml, output), "--rerun-incomplete")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert stored_bytes(output) == clean_bytes


def _manifest(folder: Path, data: np.ndarray) -> Path:
    zarr.save_array(str(folder / "tile0.zarr"), data, zarr_format=2)
    tile = {"path": "tile0.zarr", "voxel_size": [1.0, 1.0, 1.0], "shape": list(data.shape)}
    manifest = folder / "tiles.yaml"
    manifest.write_text(yaml.safe_dump({"tiles": [tile]}))
    return manifest


@pytest.mark.parametrize("shape", [(1, 64, 64), (1, 1, 1)], ids=["2D tile", "one voxel"])
def test_a_flat_tile_is_fused_not_dropped(tmp_path, shape):
    rng = np.random.default_rng(3)
    data = rng.integers(1, 1000, size=shape, dtype=np.uint16)
    manifest = _manifest(tmp_path, data)
    config = _config(manifest, tmp_path / "fused.ome.zarr")
    config["output"]["chunks"] = [1, 64, 64]
    config["output"]["shards"] = None
    config["output"]["pyramid_levels"] = 1
    run_pipeline(config, tmp_path)
    fused = np.asarray(zarr.open_array(str(tmp_path / "fused.ome.zarr" / "0"), mode="r")[:])
    np.testing.assert_array_equal(fused, data)
    report = json.loads((tmp_path / "results/tilefusion/qc_report.json").read_text())
    assert report["ok"] and report["levels"][0]["coverage"] == 1.0


def test_absent_tile_chunks_are_reported_in_the_qc_report(tmp_path):
    xml = tmp_path / "data" / "dataset.xml"
    write_demo(xml)
    (xml.parent / "tile1.zarr" / "0" / "0.0.0").unlink()
    run_pipeline(_config(xml, tmp_path / "fused.ome.zarr"), tmp_path)
    report = json.loads((tmp_path / "results/tilefusion/qc_report.json").read_text())
    assert report["ok"]
    assert list(report["absent_input_chunks"]) == ["t0-s1"]
    assert report["absent_input_chunks"]["t0-s1"] >= 1
    (warning,) = report["warnings"]
    assert warning.startswith("tile t0-s1: absent chunks read as no data")


@needs_snakemake
@pytest.mark.parametrize("stage", ["plan", "downsample", "assemble", "validate"])
def test_a_run_killed_in_any_stage_resumes_to_the_clean_bytes(tmp_path, demo_xml, stage):
    clean_dir = tmp_path / "clean"
    clean = snakemake_run(clean_dir, _config(demo_xml, clean_dir / "fused.ome.zarr"))
    assert clean.returncode == 0, clean.stderr[-3000:]
    clean_bytes = stored_bytes(clean_dir / "fused.ome.zarr")

    workdir = tmp_path / "run"
    workdir.mkdir()
    config = _config(demo_xml, workdir / "fused.ome.zarr")
    (workdir / "my.yaml").write_text(yaml.safe_dump(config))
    logs = workdir / "logs" / "tilefusion" / "fused"
    pattern = {"plan": "plan.log", "downsample": "downsample/*.log"}.get(stage, f"{stage}.log")
    process = subprocess.Popen(
        [
            *("snakemake", "-s", str(SNAKEFILE), "-d", str(workdir)),
            *("--configfile", str(workdir / "my.yaml"), "--cores", "1"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    try:
        # SIGKILL the whole run (Snakemake and its job) once the stage's job has begun.
        while time.monotonic() < deadline and not list(logs.glob(pattern)):
            if process.poll() is not None:
                break
            time.sleep(0.005)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    report = workdir / "results/tilefusion/fused/qc_report.json"
    assert not report.exists() or stage == "validate"

    assert snakemake_run(workdir, config, "--unlock").returncode == 0
    rerun = snakemake_run(workdir, config, "--rerun-incomplete")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert json.loads(report.read_text())["ok"]
    assert stored_bytes(workdir / "fused.ome.zarr") == clean_bytes
