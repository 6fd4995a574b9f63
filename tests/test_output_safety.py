"""Never destroy what is not ours; resume after a crash; say when output is empty or stale."""

from __future__ import annotations

import errno
import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr
from pipeline import run_pipeline, snakemake_run, stored_bytes

from tilefusion import atomic, steps
from tilefusion.config import load_config
from tilefusion.demo import write_demo
from tilefusion.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
SNAKEFILE = ROOT / "Snakefile"

needs_snakemake = pytest.mark.skipif(
    shutil.which("snakemake") is None, reason="snakemake not installed"
)


def _config(dataset: Path, output: str | Path, **output_keys) -> dict:
    return {
        "dataset": str(dataset),
        "output": {
            "path": str(output),
            "chunks": [16, 32, 32],
            "shards": [32, 64, 64],
            "pyramid_levels": 2,
            **output_keys,
        },
        "fusion": {"chunks_per_range": 64},
    }


def _error_line(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if "tilefusion: error:" in line]
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


@pytest.fixture
def demo_copy(tmp_path) -> Path:
    """A demo dataset of this test's own, in ``tmp_path/data``."""
    xml = tmp_path / "data" / "dataset.xml"
    write_demo(xml)
    return xml


@pytest.fixture(scope="module")
def clean_bytes(tmp_path_factory, demo_xml) -> dict[str, str]:
    """An uninterrupted workflow run's stored bytes (the session's demo dataset)."""
    workdir = tmp_path_factory.mktemp("clean")
    result = snakemake_run(workdir, _config(demo_xml, "fused.ome.zarr"))
    assert result.returncode == 0, result.stderr[-3000:]
    return stored_bytes(workdir / "fused.ome.zarr")


# --- overwrite removes only what tilefusion wrote -----------------------------


@needs_snakemake
@pytest.mark.parametrize("where", ["dataset folder", "working directory", "results", "above"])
def test_overwrite_never_removes_what_is_not_ours(tmp_path, demo_copy, where):
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "notes.txt").write_text("mine")
    (tmp_path / "raw.txt").write_text("raw data")
    output = {
        "dataset folder": demo_copy.parent,
        "working directory": ".",
        "results": "results",
        "above": tmp_path.parent,
    }[where]
    before = stored_bytes(tmp_path)
    result = snakemake_run(tmp_path, _config(demo_copy, output, overwrite=True))
    assert result.returncode != 0
    line = _error_line(result)
    assert "output.path" in line
    assert "holds" in line or "not written by tilefusion" in line

    def ours(key: str) -> bool:  # Snakemake's own log and our config file
        return key == "my.yaml" or key.startswith(".snakemake/")

    after = stored_bytes(tmp_path)
    assert {k: v for k, v in after.items() if not ours(k)} == {
        k: v for k, v in before.items() if not ours(k)
    }
    assert not (tmp_path / "results" / "tilefusion").exists()


def test_overwrite_refuses_a_folder_holding_the_config_file(tmp_path, demo_copy):
    config = load_config(_config(demo_copy, tmp_path / "out", overwrite=True))
    (tmp_path / "out").mkdir()
    configfile = tmp_path / "out" / "my.yaml"
    configfile.write_text("x")
    with pytest.raises(InputError, match=r"output\.path: holds .*my\.yaml"):
        steps.check_output_path(config, protected=[str(configfile)])
    assert configfile.read_text() == "x"


def test_overwrite_through_a_symlink_replaces_our_output_and_keeps_the_link(tmp_path, demo_copy):
    real = tmp_path / "scratch" / "fused.ome.zarr"
    link = tmp_path / "fused.ome.zarr"
    real.parent.mkdir()
    link.symlink_to(real, target_is_directory=True)
    run_pipeline(_config(demo_copy, real), tmp_path)
    config = _config(demo_copy, link, overwrite=True)
    config["fusion"]["blending"] = "max"
    run_pipeline(config, tmp_path / "second")
    assert link.is_symlink() and link.resolve() == real.resolve()
    assert json.loads((real / ".tilefusion-identity.json").read_text())["identity"] == (
        steps.store_identity(load_config(config))
    )


def test_a_dangling_symlink_output_is_refused_in_one_line(tmp_path, demo_copy):
    link = tmp_path / "fused.ome.zarr"
    link.symlink_to(tmp_path / "nowhere")
    with pytest.raises(InputError, match=r"fused\.ome\.zarr: output\.path: is a dangling symbolic"):
        steps.check_output_path(load_config(_config(demo_copy, link)))
    assert link.is_symlink() and not (tmp_path / "nowhere").exists()


def test_a_file_in_the_way_is_refused_in_one_line(tmp_path, demo_copy):
    (tmp_path / "afile").write_text("keep")
    with pytest.raises(InputError, match=r"output\.path: .*afile is a file"):
        steps.check_output_path(load_config(_config(demo_copy, tmp_path / "afile" / "o.zarr")))
    assert (tmp_path / "afile").read_text() == "keep"


def _make_immutable(path: Path) -> bool:
    if os.geteuid() != 0:
        path.chmod(0o555)
        return True
    chattr = shutil.which("chattr")
    return bool(chattr) and subprocess.run([chattr, "+i", str(path)]).returncode == 0


def _undo_immutable(path: Path) -> None:
    if os.geteuid() != 0:
        path.chmod(0o755)
    else:
        subprocess.run(["chattr", "-i", str(path)])


def test_a_read_only_location_ends_in_one_line(tmp_path, demo_copy):
    locked = tmp_path / "locked"
    locked.mkdir()
    if not _make_immutable(locked):
        pytest.skip("cannot make a read-only folder here (root without chattr)")
    try:
        config = load_config(_config(demo_copy, locked / "fused.ome.zarr"))
        with pytest.raises(InputError, match=r"locked.*output\.path: .*writ"):
            steps.check_output_path(config)
            run_pipeline(config, tmp_path)
    finally:
        _undo_immutable(locked)
    assert list(locked.iterdir()) == []


# --- a store cut short resumes ---------------------------------------------------


class _Interrupted(BaseException):
    """Stands for SIGKILL: nothing after it runs, no handler cleans up."""


@needs_snakemake
@pytest.mark.parametrize("fault", ["killed", "disk full"])
def test_a_plan_step_cut_short_resumes_to_the_clean_bytes(
    tmp_path, monkeypatch, demo_xml, clean_bytes, fault
):
    config = _config(demo_xml, "fused.ome.zarr")
    monkeypatch.chdir(tmp_path)
    results = tmp_path / "results" / "tilefusion" / "fused"
    steps.write_plan(
        load_config(config),
        plan_path=str(results / "plan.json"),
        manifest_path=str(results / "manifest.tsv"),
    )
    real_write = atomic.write_bytes_atomic
    writes = []

    def failing_write(path, data, **kwargs):
        # The identity record and the root's metadata go in; then the crash.
        if len(writes) == 1:
            if fault == "killed":
                raise _Interrupted
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        writes.append(path)
        real_write(path, data, **kwargs)

    monkeypatch.setattr("tilefusion.store.write_bytes_atomic", failing_write)
    if fault == "killed":
        with pytest.raises(_Interrupted):
            steps.prepare(config, plan_path=str(results / "plan.json"), record_path="x.json")
    else:
        with pytest.raises(InputError, match=r"fused\.ome\.zarr: output\.path: .*No space left"):
            steps.prepare(config, plan_path=str(results / "plan.json"), record_path="x.json")
    monkeypatch.undo()
    assert (tmp_path / "fused.ome.zarr" / ".tilefusion-identity.json").exists()
    assert not (tmp_path / "fused.ome.zarr" / "0" / "zarr.json").exists()

    result = snakemake_run(tmp_path, config)
    assert result.returncode == 0, result.stderr[-3000:]
    assert stored_bytes(tmp_path / "fused.ome.zarr") == clean_bytes


# --- damaged metadata is named, and the printed command restores it --------------


@needs_snakemake
@pytest.mark.parametrize("damage", ["arrays, an object and a marker", "root and level 1"])
def test_damaged_metadata_is_named_and_repaired(tmp_path, demo_xml, clean_bytes, damage):
    config = _config(demo_xml, "fused.ome.zarr")
    assert snakemake_run(tmp_path, config).returncode == 0
    store = tmp_path / "fused.ome.zarr"
    markers = tmp_path / "results/tilefusion/fused/markers"
    if damage == "arrays, an object and a marker":
        (store / "0" / "zarr.json").unlink()
        victim = next(
            p for p in sorted((store / "1").rglob("*")) if p.is_file() and p.name != "zarr.json"
        )
        victim.unlink()
        victim.mkdir()
        marker = markers / "level0" / "range0.json"
        times = (marker.stat().st_atime_ns, marker.stat().st_mtime_ns)
        marker.write_text("")
        os.utime(marker, ns=times)  # else Snakemake reruns the jobs after it at once
        expected = ["level 0 array metadata", "not a readable file", "marker missing or unreadable"]
    else:
        for path in (store / "zarr.json", store / "1" / "zarr.json"):
            path.write_bytes(path.read_bytes()[:20])
        expected = ["output group metadata", "level 1 array metadata"]

    result = snakemake_run(tmp_path, config, "--forcerun", "validate")
    assert result.returncode != 0
    log = (tmp_path / "logs/tilefusion/fused/validate.log").read_text()
    assert "Traceback" not in log
    for text in expected:
        assert text in log, log
    command = re.search(r"rerun with: (snakemake .*)", log).group(1)
    args = shlex.split(command)
    rerun = subprocess.run(
        [
            args[0],
            "-s",
            str(SNAKEFILE),
            "-d",
            str(tmp_path),
            "--configfile",
            str(tmp_path / "my.yaml"),
            *args[1:],
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert stored_bytes(store) == clean_bytes


# --- empty, stale, silently converted ----------------------------------------------


def _manifest(tmp_path: Path, arrays: list[np.ndarray], offsets_x: list[float]) -> Path:
    tiles = []
    for index, (data, x) in enumerate(zip(arrays, offsets_x)):
        path = tmp_path / f"tile{index}.zarr"
        zarr.save_array(str(path), data, zarr_format=2)
        tiles.append(
            {
                "path": path.name,
                "voxel_size": [1.0, 1.0, 1.0],
                "shape": list(data.shape),
                "transforms": [{"translation": [0, 0, x]}],
            }
        )
    manifest = tmp_path / "tiles.yaml"
    manifest.write_text(yaml.safe_dump({"tiles": tiles}))
    return manifest


def test_an_output_without_data_fails_validation(tmp_path):
    manifest = _manifest(tmp_path, [np.zeros((8, 32, 32), np.uint16)], [0.0])
    config = _config(manifest, tmp_path / "fused.ome.zarr")
    with pytest.raises(InputError, match="no voxel of level 0 holds data"):
        run_pipeline(config, tmp_path)
    report = json.loads((tmp_path / "results/tilefusion/qc_report.json").read_text())
    assert report["ok"] is False and report["levels"][0]["coverage"] == 0


def test_tiles_of_different_types_are_refused(tmp_path):
    manifest = _manifest(
        tmp_path,
        [np.full((8, 32, 32), 100, np.uint16), np.full((8, 32, 32), 0.5, np.float32)],
        [0.0, 24.0],
    )
    config = _config(manifest, tmp_path / "fused.ome.zarr")
    with pytest.raises(InputError, match=r"tiles differ in type \['float32', 'uint16'\]"):
        run_pipeline(config, tmp_path)
    assert not (tmp_path / "fused.ome.zarr").exists()
    config["output"]["dtype"] = "float32"
    run_pipeline(config, tmp_path)


@needs_snakemake
def test_a_changed_tile_is_fused_again(tmp_path, demo_copy):
    config = _config(demo_copy, "fused.ome.zarr")
    assert snakemake_run(tmp_path, config).returncode == 0
    again = snakemake_run(tmp_path, config, "-n")
    assert "Nothing to be done" in again.stdout + again.stderr
    tile = zarr.open_array(str(demo_copy.parent / "tile0.zarr" / "0"), mode="r+")
    tile[:] = np.asarray(tile[:]) // 2
    # A dry run says so and writes nothing; the real run fuses again.
    stale = snakemake_run(tmp_path, config, "-n")
    assert "tiles changed since they were planned" in stale.stderr
    before = stored_bytes(tmp_path / "fused.ome.zarr")
    result = snakemake_run(tmp_path, config)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rule fuse" in result.stderr or "localrule fuse" in result.stderr
    assert stored_bytes(tmp_path / "fused.ome.zarr") != before
    done = snakemake_run(tmp_path, config, "-n")
    assert "Nothing to be done" in done.stdout + done.stderr


# --- the config refuses what jobs cannot do ----------------------------------------


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"output": {"compression": {"codec": "gzip", "level": 12}}}, "output.compression.level"),
        ({"output": {"compression": {"codec": "blosc-lz4", "level": 10}}}, "output.compression"),
        ({"world_unit": [float("inf"), 1.0, 1.0]}, "world_unit"),
        ({"output": {"resolution": [float("nan"), 1.0, 1.0]}}, "output.resolution"),
        ({"output": {"path": "nosuch://bucket/out.ome.zarr"}}, "output.path"),
        ({"output": {"chunks": [1, 1, 1]}}, "output.chunks"),
        (
            {"fusion": {"post_transforms": [{"affine_zyx": [[1, 0, 0, 0], [0, 1, 0]]}]}},
            "fusion.post_transforms.0.affine_zyx",
        ),
    ],
)
def test_config_values_jobs_cannot_use_are_refused(change, field):
    raw = {"dataset": "d.xml", **change}
    with pytest.raises(InputError, match=re.escape(f"config: {field}")) as info:
        load_config(raw)
    assert "\n" not in str(info.value)


def test_zstd_keeps_its_high_levels():
    config = load_config({"dataset": "d.xml", "output": {"compression": {"level": 19}}})
    assert config["output"]["compression"]["level"] == 19


@needs_snakemake
def test_damaged_zarr_v2_root_is_mended_without_fusing_again(tmp_path, demo_xml):
    config = _config(demo_xml, "fused.ome.zarr", format="ome-zarr-0.4", shards=None)
    assert snakemake_run(tmp_path, config).returncode == 0
    store = tmp_path / "fused.ome.zarr"
    clean = stored_bytes(store)
    (store / ".zgroup").unlink()
    (store / ".zattrs").write_text("{bad")
    result = snakemake_run(tmp_path, config, "--forcerun", "validate")
    assert result.returncode != 0
    log = (tmp_path / "logs/tilefusion/fused/validate.log").read_text()
    assert "output group metadata missing or unreadable" in log and "Traceback" not in log
    args = shlex.split(re.search(r"rerun with: (snakemake .*)", log).group(1))
    assert any(a.endswith("assemble.json") for a in args)
    rerun = snakemake_run(tmp_path, config, *args[1:], "-n", "--quiet", "rules")
    # Only metadata work: no fuse or downsample job runs again.
    assert not re.search(r"^(fuse|downsample)\s", rerun.stdout, flags=re.M), rerun.stdout
    assert snakemake_run(tmp_path, config, *args[1:]).returncode == 0
    assert stored_bytes(store) == clean


def test_an_interrupted_replace_is_still_ours(tmp_path, demo_copy, monkeypatch):
    first = _config(demo_copy, tmp_path / "fused.ome.zarr")
    run_pipeline(first, tmp_path)
    second = _config(demo_copy, tmp_path / "fused.ome.zarr", overwrite=True)
    second["fusion"]["blending"] = "max"
    calls = []
    real_rmtree = shutil.rmtree

    def dying_rmtree(path, *args, **kwargs):
        calls.append(path)
        real_rmtree(path, *args, **kwargs)
        raise _Interrupted

    monkeypatch.setattr("tilefusion.store.shutil.rmtree", dying_rmtree)
    with pytest.raises(_Interrupted):
        steps.prepare(
            second, plan_path=str(tmp_path / "results/tilefusion/plan.json"), record_path="r"
        )
    monkeypatch.undo()
    assert (tmp_path / "fused.ome.zarr" / ".tilefusion-identity.json").exists()
    run_pipeline(second, tmp_path)


def test_the_same_output_written_another_way_shares_its_state(tmp_path, demo_copy, monkeypatch):
    monkeypatch.chdir(tmp_path)
    record = tmp_path / "inputs.json"
    relative = load_config(_config(demo_copy, "results/fused.ome.zarr"))
    steps.refresh_inputs_record(record, relative)
    for same in ("./results/fused.ome.zarr", str(tmp_path / "results" / "fused.ome.zarr")):
        steps.check_state_owner(record, load_config(_config(demo_copy, same)))
    with pytest.raises(InputError, match="holds the workflow state of the output"):
        steps.check_state_owner(record, load_config(_config(demo_copy, "other/fused.ome.zarr")))


def test_the_default_timepoint_is_the_first_of_the_selected_setups(tmp_path):
    data = np.full((8, 32, 32), 7, np.uint16)
    zarr.save_array(str(tmp_path / "a.zarr"), data, zarr_format=2)
    tiles = [
        {
            "path": "a.zarr",
            "voxel_size": [1, 1, 1],
            "shape": [8, 32, 32],
            "setup": 0,
            "timepoint": 0,
        },
        {
            "path": "a.zarr",
            "voxel_size": [1, 1, 1],
            "shape": [8, 32, 32],
            "setup": 1,
            "timepoint": 1,
        },
    ]
    manifest = tmp_path / "tiles.yaml"
    manifest.write_text(yaml.safe_dump({"tiles": tiles}))
    config = load_config({"dataset": str(manifest), "selection": {"setups": [1]}})
    plan = steps.plan_from_config(config)
    assert [(t.timepoint, t.setup) for t in plan.tiles] == [(1, 1)]
