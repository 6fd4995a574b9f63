"""What cannot work, or would silently do the wrong thing, is refused before any job."""

from __future__ import annotations

import os
import shutil
import subprocess
import tracemalloc
from pathlib import Path

import pytest
import yaml

from tilefusion import steps
from tilefusion.config import load_config, read_config_file
from tilefusion.errors import InputError
from tilefusion.readers import read_dataset

ROOT = Path(__file__).resolve().parents[1]
SNAKEFILE = ROOT / "Snakefile"
SHARED = Path(os.environ.get("TILEFUSION_SHARED_DATA") or ROOT.parent / "shared" / "data")
KIDNEY = SHARED / "real-tiles" / "npy2bdv_kidney" / "kidney.xml"

needs_snakemake = pytest.mark.skipif(
    shutil.which("snakemake") is None, reason="snakemake not installed"
)

BOMB = """\
a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]
h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g]
tiles: [*h, *h, *h, *h, *h, *h, *h, *h, *h]
"""


def _snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["snakemake", "-s", str(SNAKEFILE), "-d", str(workdir), "--cores", "1", *args],
        capture_output=True,
        text=True,
        timeout=900,
    )


def _error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if "tilefusion: error:" in line]


def test_a_yaml_alias_bomb_manifest_is_refused_in_one_line(tmp_path):
    manifest = tmp_path / "tiles.yaml"
    manifest.write_text(BOMB)
    tracemalloc.start()
    with pytest.raises(InputError, match=r"tiles\.yaml: YAML: uses an alias \(\*name\) at line 2"):
        read_dataset(manifest)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 20 * 2**20


def test_a_config_file_with_aliases_is_refused(tmp_path):
    path = tmp_path / "my.yaml"
    path.write_text("dataset: &d x.xml\noutput: {path: *d}\n")
    with pytest.raises(InputError, match=r"my\.yaml: YAML: uses an alias"):
        read_config_file(path)


def test_an_output_beyond_the_size_limit_is_refused_with_its_size(demo_xml):
    config = load_config({"dataset": str(demo_xml), "output": {"resolution": [1e-6, 1e-6, 1e-6]}})
    tracemalloc.start()
    with pytest.raises(InputError, match=r"output\.max_size_tb: the output would be [0-9.e+]+ TB"):
        steps.plan_from_config(config)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 50 * 2**20
    # the limit is the user's to set
    small = load_config({"dataset": str(demo_xml), "output": {"max_size_tb": 1e-6}})
    with pytest.raises(InputError, match="above the limit of 1e-06 TB"):
        steps.plan_from_config(small)


def test_a_missing_dataset_names_the_folder_it_was_resolved_against(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config({"dataset": "data/typo.xml"})
    with pytest.raises(InputError, match=f"resolved against the working directory {tmp_path}"):
        steps.plan_from_config(config)


@needs_snakemake
def test_a_typo_in_the_dataset_with_the_bundled_config_is_refused(tmp_path):
    # The bundled config (demo: true), found in the working directory as in a
    # clone, is merged with the user's file.
    (tmp_path / "config").mkdir()
    shutil.copy(ROOT / "config" / "config.yaml", tmp_path / "config" / "config.yaml")
    user = tmp_path / "my.yaml"
    user.write_text(yaml.safe_dump({"dataset": "data/my_dataset.xmll"}))
    result = _snakemake(tmp_path, "--configfile", str(user))
    assert result.returncode != 0
    (line,) = _error_lines(result)
    assert "data/my_dataset.xmll: dataset: file not found" in line
    assert "demo: true generates the bundled demo only at resources/demo/dataset.xml" in line
    assert not (tmp_path / "data").exists() and not (tmp_path / "results").exists()


@needs_snakemake
def test_a_url_output_of_an_unknown_protocol_is_refused_before_any_job(tmp_path, demo_xml):
    user = tmp_path / "my.yaml"
    output = {"path": "nosuch://bucket/o.zarr"}
    user.write_text(yaml.safe_dump({"dataset": str(demo_xml), "demo": False, "output": output}))
    result = _snakemake(tmp_path, "--configfile", str(user))
    assert result.returncode != 0
    (line,) = _error_lines(result)
    assert "output.path: 'nosuch://bucket/o.zarr': nosuch:// is not a protocol" in line
    assert sorted(p.name for p in tmp_path.iterdir()) in (["my.yaml"], [".snakemake", "my.yaml"])


@needs_snakemake
def test_two_configurations_in_one_working_directory_keep_apart(tmp_path, demo_xml):
    base = {
        "dataset": str(demo_xml),
        "demo": False,
        "output": {"chunks": [16, 32, 32], "shards": [32, 64, 64], "pyramid_levels": 2},
        "fusion": {"chunks_per_range": 64},
    }
    runs = {}
    for name, blending in (("cosine", "cosine"), ("maximum", "max")):
        config = yaml.safe_load(yaml.safe_dump(base))
        config["output"]["path"] = f"results/{name}.ome.zarr"
        config["fusion"]["blending"] = blending
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        result = _snakemake(tmp_path, "--configfile", str(path))
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = path
    for name, path in runs.items():
        state = tmp_path / "results" / "tilefusion" / name
        assert (state / "qc_report.json").exists() and (state / "plan.json").exists()
        again = _snakemake(tmp_path, "--configfile", str(path), "-n")
        assert "Nothing to be done" in again.stdout + again.stderr, again.stderr[-2000:]
    # Same name in another folder: refused, not mixed into the first's state.
    clash = yaml.safe_load(runs["cosine"].read_text())
    clash["output"]["path"] = "elsewhere/cosine.ome.zarr"
    path = tmp_path / "clash.yaml"
    path.write_text(yaml.safe_dump(clash))
    result = _snakemake(tmp_path, "--configfile", str(path))
    (line,) = _error_lines(result)
    assert "holds the workflow state of the output results/cosine.ome.zarr" in line
    assert not (tmp_path / "elsewhere").exists()


@pytest.mark.skipif(not KIDNEY.exists(), reason="shared kidney dataset not present")
def test_kidney_setups_of_three_channels_are_refused_not_blended():
    config = load_config({"dataset": str(KIDNEY), "selection": {"setups": [0, 1, 2]}})
    with pytest.raises(InputError, match=r"span channels \[0, 1, 2\].*never blended"):
        steps.plan_from_config(config)
    # one channel at a time plans
    for channel in (0, 1, 2):
        config = load_config({"dataset": str(KIDNEY), "selection": {"channel": channel}})
        assert len(steps.plan_from_config(config).tiles) >= 1


@needs_snakemake
def test_a_second_run_on_one_output_is_refused_while_the_first_holds_it(tmp_path, demo_xml):
    from tilefusion.store import lock_output

    output = tmp_path / "shared" / "fused.ome.zarr"
    user = tmp_path / "my.yaml"
    user.write_text(
        yaml.safe_dump({"dataset": str(demo_xml), "demo": False, "output": {"path": str(output)}})
    )
    held = lock_output(output)
    try:
        result = _snakemake(tmp_path / "second", "--configfile", str(user))
        # What executes no job is not refused: a dry run, the lint.
        dry = _snakemake(tmp_path / "third", "--configfile", str(user), "-n")
    finally:
        held.release()
    assert dry.returncode == 0, dry.stderr[-2000:]
    assert result.returncode != 0
    (line,) = _error_lines(result)
    assert f"pid {os.getpid()}" in line and "another run is writing this output" in line
    assert not output.exists()
