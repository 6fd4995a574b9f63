"""The package as users get it: a wheel, installed outside the clone, runs the CLI and the demo."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict[str, str]:
    """The wheel built from this checkout, installed (without dependencies) in a folder of its own.

    Returns the environment that makes that folder's copy the one imported.
    """
    base = tmp_path_factory.mktemp("wheel")
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", str(ROOT), "-w", str(base)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if built.returncode != 0:
        pytest.skip(f"cannot build a wheel here: {built.stderr.strip()[-300:]}")
    (wheel,) = base.glob("tilefusion-*.whl")
    target = base / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), wheel],
        check=True,
        timeout=600,
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = str(target)
    env["PATH"] = f"{target / 'bin'}{os.pathsep}{env['PATH']}"
    return env


def test_the_installed_wheel_is_the_one_imported_and_ships_its_schema(installed, tmp_path):
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import tilefusion, tilefusion.config as c; "
            "print(tilefusion.__file__); print(len(c.schema()['properties']))",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=installed,
    )
    assert probe.returncode == 0, probe.stderr
    where, keys = probe.stdout.split()
    assert Path(where).is_relative_to(Path(installed["PYTHONPATH"]))
    assert not Path(where).is_relative_to(ROOT)
    assert int(keys) > 3


def test_the_installed_cli_plans_the_demo_outside_the_clone(installed, tmp_path):
    cli = shutil.which("tilefusion", path=installed["PATH"])
    assert cli and Path(cli).is_relative_to(Path(installed["PYTHONPATH"]))
    demo = subprocess.run(
        [cli, "demo", "data/dataset.xml"], cwd=tmp_path, env=installed, capture_output=True
    )
    assert demo.returncode == 0, demo.stderr
    plan = subprocess.run(
        [cli, "plan", "data/dataset.xml", "--output", "plan.json"],
        cwd=tmp_path,
        env=installed,
        capture_output=True,
        text=True,
    )
    assert plan.returncode == 0, plan.stderr
    assert json.loads((tmp_path / "plan.json").read_text())["ranges"] >= 1
    bad = subprocess.run(
        [cli, "plan", "missing.xml", "--output", "p.json"],
        cwd=tmp_path,
        env=installed,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1


@pytest.mark.skipif(shutil.which("snakemake") is None, reason="snakemake not installed")
def test_the_demo_workflow_runs_on_the_installed_engine(installed, tmp_path):
    # The workflow's files from the checkout, as a module user has them; the engine from the wheel.
    result = subprocess.run(
        [
            *("snakemake", "-s", str(ROOT / "Snakefile"), "-d", str(tmp_path), "--cores", "2"),
            *("--configfile", str(ROOT / "config" / "config.yaml")),
        ],
        cwd=tmp_path,
        env=installed,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "results/tilefusion/fused/qc_report.json").read_text())
    assert report["ok"]
    logs = (tmp_path / "logs/tilefusion/fused/plan.log").read_text()
    assert "planned" in logs


HOST_SNAKEFILE = """\
TILEFUSION = {snakefile!r}


module fuse_a:
    snakefile:
        TILEFUSION
    config:
        config["a"]
    prefix:
        "a"


use rule * from fuse_a as a_*


module fuse_b:
    snakefile:
        TILEFUSION
    config:
        config["b"]
    prefix:
        "b"


use rule * from fuse_b as b_*


rule all:
    default_target: True
    input:
        "shapes.txt",


# A facility's own downstream step: it reads the fused images once complete.
rule shapes:
    input:
        a="a/results/fused.ome.zarr/.tilefusion-complete.json",
        b="b/results/other.ome.zarr/.tilefusion-complete.json",
    output:
        "shapes.txt",
    run:
        import zarr

        with open(output[0], "w") as out:
            for flag in input:
                image = zarr.open_group(str(flag).rsplit("/", 1)[0], mode="r")
                print(flag, image["0"].shape, file=out)
"""


@pytest.mark.skipif(shutil.which("snakemake") is None, reason="snakemake not installed")
def test_a_host_workflow_uses_two_module_instances_with_prefixes(installed, tmp_path):
    # Instance a: the bundled demo under its prefix. Instance b: a dataset of the
    # host's, by a path relative to the host's working directory (not prefixed).
    cli = shutil.which("tilefusion", path=installed["PATH"])
    made = subprocess.run([cli, "demo", "data/b/dataset.xml"], cwd=tmp_path, env=installed)
    assert made.returncode == 0
    (tmp_path / "Snakefile").write_text(HOST_SNAKEFILE.format(snakefile=str(ROOT / "Snakefile")))
    small = {"output": {"pyramid_levels": 2}}
    host_config = {
        "a": {"demo": True, "dataset": "resources/demo/dataset.xml", **small},
        "b": {
            "dataset": "data/b/dataset.xml",
            "output": {"path": "results/other.ome.zarr", "pyramid_levels": 2},
        },
    }
    (tmp_path / "host.yaml").write_text(json.dumps(host_config))
    result = subprocess.run(
        ["snakemake", "--cores", "2", "--configfile", "host.yaml"],
        cwd=tmp_path,
        env=installed,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = (tmp_path / "shapes.txt").read_text().splitlines()
    assert len(lines) == 2
    # Everything each instance made is under its prefix; the host's data stay put.
    assert (tmp_path / "a/resources/demo/dataset.xml").is_file()
    assert not (tmp_path / "resources").exists()
    for prefix, name in (("a", "fused"), ("b", "other")):
        assert (tmp_path / prefix / f"results/tilefusion/{name}/qc_report.json").is_file()
        assert (tmp_path / prefix / f"logs/tilefusion/{name}/plan.log").is_file()
    assert not (tmp_path / "results").exists() and not (tmp_path / "b/data").exists()
    flag = json.loads((tmp_path / "b/results/other.ome.zarr/.tilefusion-complete.json").read_text())
    assert flag["ok"] and flag["levels"] == 2


def test_the_sdist_builds_a_wheel_that_ships_the_schema(tmp_path):
    # What a release on the package index is: an sdist, from which pip builds the wheel.
    built = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from setuptools import build_meta; "
            "print(build_meta.build_sdist(sys.argv[1]))",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr[-2000:]
    (sdist,) = tmp_path.glob("tilefusion-*.tar.gz")
    wheel = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", str(sdist), "-w", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if wheel.returncode != 0:
        pytest.skip(f"cannot build a wheel here: {wheel.stderr.strip()[-300:]}")
    import zipfile

    (built_wheel,) = tmp_path.glob("tilefusion-*.whl")
    names = zipfile.ZipFile(built_wheel).namelist()
    assert "tilefusion/schemas/config.schema.yaml" in names
    assert "tilefusion/py.typed" in names
    assert any(name.endswith("entry_points.txt") for name in names)
