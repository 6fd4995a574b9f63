"""The Snakemake workflow as users run it: dry run, DAG, a real run, bad input."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SNAKEFILE = ROOT / "Snakefile"

pytestmark = pytest.mark.skipif(shutil.which("snakemake") is None, reason="snakemake not installed")


def snakemake(workdir: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["snakemake", "-s", str(SNAKEFILE), "-d", str(workdir), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _write_config(workdir: Path, demo_xml: Path, **extra) -> Path:
    config = yaml.safe_load((ROOT / "config/config.yaml").read_text())
    config.update({"dataset": str(demo_xml), "demo": False, **extra})
    path = workdir / "my.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_dry_run_lists_every_fuse_job(demo_xml, tmp_path):
    configfile = _write_config(tmp_path, demo_xml)
    result = snakemake(tmp_path, "--configfile", str(configfile), "-n", "--quiet", "rules")
    assert result.returncode == 0, result.stderr
    plan = subprocess.run(
        [
            sys.executable,
            "-m",
            "tilefusion.cli",
            "plan",
            "--config",
            str(configfile),
            "--metadata-only",
            "--output",
            str(tmp_path / "p.json"),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert plan.returncode == 0, plan.stderr
    ranges = json.loads((tmp_path / "p.json").read_text())["ranges"]
    counts = dict(re.findall(r"^(\w+)\s+(\d+)$", result.stdout, flags=re.M))
    assert int(counts["fuse"]) == ranges > 1
    assert int(counts["plan"]) == 1 and int(counts["validate"]) == 1
    assert not (tmp_path / "results").exists()


def test_rulegraph_is_complete(demo_xml, tmp_path):
    configfile = _write_config(tmp_path, demo_xml)
    result = snakemake(tmp_path, "--configfile", str(configfile), "--rulegraph")
    assert result.returncode == 0, result.stderr
    for rule in ("plan", "fuse", "downsample", "assemble", "validate", "all"):
        assert f'label = "{rule}"' in result.stdout


def test_demo_runs_end_to_end_from_another_folder(tmp_path):
    # the bundled config with the demo, run as `snakemake -s .../Snakefile -d workdir`
    shutil.copytree(ROOT / "config", tmp_path / "config")
    result = snakemake(tmp_path, "--cores", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "results/tilefusion/fused/qc_report.json").read_text())
    assert report["ok"]
    assert (tmp_path / "resources/demo/dataset.xml").exists()
    # nothing to do on a second run
    again = snakemake(tmp_path, "--cores", "2", "-n")
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ({"fusion": {"blendng": "max"}}, "config: fusion.blendng: unknown key"),
        ({"fusion": {"blending": "median"}}, "config: fusion.blending: 'median' is not one of"),
        ({"dataset": "missing.xml"}, "missing.xml"),
        ({"output": {"resolution": [0, 1, 1]}}, "output.resolution"),
    ],
)
def test_bad_input_stops_before_any_job(demo_xml, tmp_path, override, expected):
    configfile = _write_config(tmp_path, demo_xml, **override)
    result = snakemake(tmp_path, "--configfile", str(configfile), "--cores", "1")
    assert result.returncode != 0
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "results").exists()


def test_lint_and_format_are_clean(tmp_path):
    shutil.copytree(ROOT / "config", tmp_path / "config")
    lint = snakemake(tmp_path, "--lint")
    assert lint.returncode == 0, lint.stdout + lint.stderr
    if shutil.which("snakefmt"):
        fmt = subprocess.run(
            ["snakefmt", "--check", str(SNAKEFILE), str(ROOT / "workflow/rules")],
            capture_output=True,
            text=True,
        )
        assert fmt.returncode == 0, fmt.stderr
