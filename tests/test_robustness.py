"""Failed ranges rerun alone and bit-identically; bad input is refused; nothing is lost."""

import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from tilefusion import steps
from tilefusion.config import load_config
from tilefusion.plan import read_plan

ROOT = Path(__file__).resolve().parents[1]
SNAKEFILE = ROOT / "Snakefile"

pytestmark = pytest.mark.skipif(shutil.which("snakemake") is None, reason="snakemake not installed")


def _config(demo_xml: Path, workdir: Path, **fusion) -> Path:
    config = {
        "dataset": str(demo_xml),
        "output": {
            "path": "fused.ome.zarr",
            "chunks": [16, 32, 32],
            "shards": [32, 64, 64],
            "pyramid_levels": 2,
        },
        "fusion": {"chunks_per_range": 64, **fusion},
    }
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "my.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _snakemake_args(workdir: Path, configfile: Path) -> list[str]:
    return ["-s", str(SNAKEFILE), "-d", str(workdir), "--configfile", str(configfile)]


def _run(workdir: Path, configfile: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["snakemake", *_snakemake_args(workdir, configfile), "--cores", "1", *args],
        capture_output=True,
        text=True,
        timeout=900,
    )


def _stored_bytes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def clean_run(demo_xml, tmp_path_factory):
    """An uninterrupted run: the bytes every other run must reproduce."""
    workdir = tmp_path_factory.mktemp("clean")
    configfile = _config(demo_xml, workdir)
    result = _run(workdir, configfile)
    assert result.returncode == 0, result.stderr[-3000:]
    return _stored_bytes(workdir / "fused.ome.zarr")


def test_killed_fuse_job_reruns_alone_and_identically(demo_xml, tmp_path, clean_run):
    configfile = _config(demo_xml, tmp_path)
    plan_args = _snakemake_args(tmp_path, configfile)
    process = subprocess.Popen(
        ["snakemake", *plan_args, "--cores", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    markers = tmp_path / "results/tilefusion/fused/markers/level0"
    killed_range = None
    deadline = time.monotonic() + 300
    try:
        # Wait until a range's job is inside its fusion: it has logged its
        # device but not yet its summary line, and has no marker.
        while time.monotonic() < deadline and killed_range is None:
            for log in sorted((tmp_path / "logs/tilefusion/fused/fuse").glob("range*.log")):
                r = int(re.search(r"range(\d+)", log.name).group(1))
                text = log.read_text()
                busy = "device" in text and "objects" not in text
                if r > 0 and busy and not (markers / f"range{r}.json").exists():
                    killed_range = r
                    break
            time.sleep(0.01)
        assert killed_range is not None, "no fuse job seen running"
    finally:
        # SIGKILL the whole run (snakemake and its job), like a lost node.
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert not (markers / f"range{killed_range}.json").exists()
    finished = {p.name: p.stat().st_mtime_ns for p in markers.glob("range*.json")}

    assert _run(tmp_path, configfile, "--unlock").returncode == 0
    result = _run(tmp_path, configfile, "--rerun-incomplete")
    assert result.returncode == 0, result.stderr[-3000:]
    # ranges finished before the kill were not redone
    for name, mtime in finished.items():
        assert (markers / name).stat().st_mtime_ns == mtime
    assert _stored_bytes(tmp_path / "fused.ome.zarr") == clean_run


def test_validate_names_damage_and_its_command_restores_it(demo_xml, tmp_path, clean_run):
    configfile = _config(demo_xml, tmp_path)
    assert _run(tmp_path, configfile).returncode == 0
    store = tmp_path / "fused.ome.zarr"
    objects = sorted(p for p in (store / "0").rglob("*") if p.is_file() and p.name != "zarr.json")
    lost, damaged = objects[0], objects[-1]
    lost.unlink()
    damaged.write_bytes(b"\0" * 16 + damaged.read_bytes()[16:])

    result = _run(tmp_path, configfile, "--forcerun", "validate")
    assert result.returncode != 0
    log = (tmp_path / "logs/tilefusion/fused/validate.log").read_text()
    assert str(lost.relative_to(store)) in log and "missing" in log
    assert str(damaged.relative_to(store)) in log and "corrupt" in log
    command = re.search(r"rerun with: (snakemake .*)", log).group(1)
    args = shlex.split(command)
    forced = [a for a in args if a.endswith(".json") and "markers" in a]
    assert forced and all("level0" in a for a in forced)
    plan = read_plan(tmp_path / "results/tilefusion/fused/plan.json")
    assert len(forced) < plan.grid.n_ranges

    rerun = subprocess.run(
        [args[0], *_snakemake_args(tmp_path, configfile), *args[1:]],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert _stored_bytes(store) == clean_run


def _xml_variant(demo_xml: Path, tmp_path: Path, edit) -> Path:
    folder = tmp_path / "data"
    shutil.copytree(demo_xml.parent, folder)
    xml = folder / demo_xml.name
    xml.write_text(edit(xml.read_text()))
    return xml


def _remove_first(tag):
    def edit(text):
        return re.sub(rf"<{tag}[ >].*?</{tag}>", "", text, count=1, flags=re.S)

    return edit


BAD_XML = {
    "truncated": (lambda t: t[: len(t) // 2], "dataset.xml"),
    "no registration": (_remove_first("ViewRegistration"), "ViewRegistration"),
    "no file": (lambda t: re.sub(r"<zgroup [^>]*/>", "", t, count=1), "setup=0"),
    "singular affine": (
        lambda t: re.sub(
            r"<affine>[^<]*</affine>", "<affine>0 0 0 0 0 0 0 0 0 0 0 0</affine>", t, count=1
        ),
        "singular",
    ),
    "nan affine": (
        lambda t: re.sub(
            r"<affine>[^<]*</affine>", "<affine>NaN 0 0 0 0 1 0 0 0 0 1 0</affine>", t, count=1
        ),
        "NaN",
    ),
    "wrong size": (
        lambda t: re.sub(r"<size>96 96 40</size>", "<size>96 96 41</size>", t, count=1),
        "shape",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_XML))
def test_bad_dataset_is_refused_before_any_job(demo_xml, tmp_path, case):
    edit, expected = BAD_XML[case]
    xml = _xml_variant(demo_xml, tmp_path, edit)
    configfile = _config(xml, tmp_path / "run")
    result = _run(tmp_path / "run", configfile)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("tilefusion: error:")]
    assert len(lines) == 1, result.stderr[-2000:]
    assert expected in lines[0] and str(xml) in lines[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run/results").exists()
    assert not (tmp_path / "run/fused.ome.zarr").exists()


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ({"output": {"resolution": [1.0, -0.5, 0.5]}}, "output.resolution"),
        ({"output": {"chunks": [16, 32, 32], "shards": [32, 48, 64]}}, "output.shards"),
        ({"fusion": {"blending": "average"}}, "fusion.blending"),
        ({"fusion": {"interpolaton": "linear"}}, "fusion.interpolaton: unknown key"),
        ({"dataset": "nowhere/dataset.xml"}, "nowhere/dataset.xml"),
    ],
)
def test_bad_config_is_refused_before_any_job(demo_xml, tmp_path, override, expected):
    configfile = _config(demo_xml, tmp_path)
    config = yaml.safe_load(configfile.read_text())
    for key, value in override.items():
        if isinstance(value, dict):
            config[key].update(value)
        else:
            config[key] = value
    configfile.write_text(yaml.safe_dump(config))
    result = _run(tmp_path, configfile)
    assert result.returncode != 0
    assert "tilefusion: error: " in result.stderr and expected in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "results").exists() and not (tmp_path / "fused.ome.zarr").exists()


def test_resources_grow_with_attempt(demo_xml):
    plan = steps.plan_from_config(load_config({"dataset": str(demo_xml)}))
    first = steps.fuse_memory_mb(plan, attempt=1)
    assert steps.fuse_memory_mb(plan, attempt=2) == 2 * first
    assert steps.fuse_runtime_min(plan, attempt=3) == 4 * steps.fuse_runtime_min(plan, attempt=1)
    assert first > 600
    assert np.isfinite(first)


def test_changed_settings_rerun_everything_only_with_overwrite(demo_xml, tmp_path):
    configfile = _config(demo_xml, tmp_path)
    assert _run(tmp_path, configfile).returncode == 0
    config = yaml.safe_load(configfile.read_text())
    config["fusion"]["blending"] = "max"
    configfile.write_text(yaml.safe_dump(config))
    refused = _run(tmp_path, configfile)
    assert refused.returncode != 0 and "another configuration" in refused.stderr
    config["output"]["overwrite"] = True
    configfile.write_text(yaml.safe_dump(config))
    dry = _run(tmp_path, configfile, "-n", "--quiet", "rules")
    assert re.search(r"^fuse\s+\d+$", dry.stdout, flags=re.M), dry.stdout
    assert _run(tmp_path, configfile).returncode == 0
    report = json.loads((tmp_path / "results/tilefusion/fused/qc_report.json").read_text())
    assert report["ok"]
