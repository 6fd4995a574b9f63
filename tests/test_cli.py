"""The `tilefusion` command line runs every step the workflow's rules run."""

import json
import subprocess
import sys
from pathlib import Path

import yaml

from tilefusion import steps
from tilefusion.config import load_config
from tilefusion.demo import demo_dataset


def tilefusion(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tilefusion.cli", *args], capture_output=True, text=True, cwd=cwd
    )


def test_every_step_from_the_command_line(tmp_path):
    assert tilefusion("demo", "data/dataset.xml", cwd=tmp_path).returncode == 0
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "dataset": "data/dataset.xml",
                "output": {"path": "out.ome.zarr", "pyramid_levels": 2},
                "fusion": {"chunks_per_range": 1000},
            }
        )
    )
    common = ["--config", str(config), "--plan", "plan.json"]
    result = tilefusion("plan", "--config", str(config), "--output", "plan.json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["ranges"] == 1 and summary["unit"] == "micrometer"
    assert (tmp_path / "plan.manifest.tsv").exists()
    for args in (
        ["prepare", *common, "--record", "store.json"],
        ["fuse", *common, "--range", "0", "--marker", "m/level0/range0.json"],
        ["downsample", *common, "--level", "1", "--range", "0", "--marker", "m/level1/range0.json"],
        ["assemble", *common, "--record", "a.json", "m/level0/range0.json", "m/level1/range0.json"],
        ["validate", *common, "--markers-dir", "m", "--report", "qc.json"],
    ):
        result = tilefusion(*args, cwd=tmp_path)
        assert result.returncode == 0, (args, result.stderr)
    assert json.loads((tmp_path / "qc.json").read_text())["ok"]


def test_user_mistakes_exit_2_with_one_line(tmp_path):
    result = tilefusion("plan", "missing.xml", "--output", "p.json", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "missing.xml" in result.stderr
    assert not (tmp_path / "p.json").exists()


def test_demo_plan_at_parse_time_matches_the_written_demo(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    xml = tmp_path / "resources" / "demo" / "dataset.xml"
    config = load_config({"dataset": str(xml), "demo": True})
    before = steps.plan_from_config(config)
    assert not xml.exists()
    from tilefusion.demo import write_demo

    write_demo(xml)
    after = steps.plan_from_config(config, metadata_only=False)
    assert before.to_json() == after.to_json()
    assert len(demo_dataset(xml).views) == len(after.tiles)
