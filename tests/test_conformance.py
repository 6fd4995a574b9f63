"""RFC-5 conformance: ``tilefusion transform-points`` against the public suite.

The suite (``ome-zarr-transformations-conformance`` 0.1.2, 24 cases) needs
Python >= 3.12, so it is installed into a venv of its own (cached under the
user's cache folder) and runs our CLI from this interpreter. The test skips
when no Python 3.12 is found (``TILEFUSION_PYTHON312`` names one) or the
package cannot be installed.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SUITE = "ome-zarr-transformations-conformance==0.1.2"
CASES = 24


def _python312() -> str | None:
    candidates = [os.environ.get("TILEFUSION_PYTHON312"), shutil.which("python3.12")]
    candidates += sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.1[2-9]*/bin/python3")))
    for candidate in candidates:
        if not candidate:
            continue
        try:
            ok = subprocess.run(
                [candidate, "-c", "import sys; assert sys.version_info >= (3, 12)"],
                capture_output=True,
                timeout=30,
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        if ok.returncode == 0:
            return candidate
    return None


def _suite_venv() -> Path:
    python = _python312()
    if python is None:
        pytest.skip("no Python >= 3.12 for the conformance suite (set TILEFUSION_PYTHON312)")
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    venv = cache / "tilefusion" / "oztc-0.1.2"
    oztc = venv / "bin" / "oztc"
    if not oztc.exists():
        try:
            subprocess.run([python, "-m", "venv", str(venv)], check=True, capture_output=True)
            subprocess.run(
                [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", SUITE],
                check=True,
                capture_output=True,
                timeout=300,
            )
        except (OSError, subprocess.SubprocessError) as error:
            shutil.rmtree(venv, ignore_errors=True)
            pytest.skip(f"could not install {SUITE}: {error}")
    return oztc


def test_rfc5_conformance_suite_passes_every_case() -> None:
    oztc = _suite_venv()
    dingus = [sys.executable, "-m", "tilefusion.cli", "transform-points"]
    result = subprocess.run([str(oztc), "--", *dingus], capture_output=True, text=True, timeout=600)
    rows = [line.split("\t") for line in result.stdout.splitlines() if "\t" in line]
    failed = [row for row in rows if row[1] != "pass"]
    assert not failed, f"{failed}\n{result.stderr[-2000:]}"
    assert len(rows) == CASES and result.returncode == 0


def test_transform_points_errors_are_one_line_and_a_json_error(tmp_path: Path) -> None:
    group = tmp_path / "scene.ome.zarr"
    group.mkdir()
    scene = {
        "coordinateSystems": [
            {"name": "a", "axes": [{"name": "x", "type": "space"}]},
            {"name": "b", "axes": [{"name": "x", "type": "space"}]},
        ],
        "coordinateTransformations": [
            {"input": "a", "output": "b", "type": "scale", "scale": [2.0]}
        ],
    }
    attrs = {"ome": {"version": "0.6", "scene": scene}}
    (group / "zarr.json").write_text(
        json.dumps({"zarr_format": 3, "node_type": "group", "attributes": attrs})
    )
    run = [sys.executable, "-m", "tilefusion.cli", "transform-points", str(group)]
    ok = subprocess.run([*run, "b", "a", "[[4]]"], capture_output=True, text=True)
    assert ok.returncode == 0 and json.loads(ok.stdout) == {"coordinates": [[2.0]]}
    bad = subprocess.run([*run, "a", "c", "[[4]]"], capture_output=True, text=True)
    assert bad.returncode == 2
    assert "no target system 'c'" in json.loads(bad.stdout)["message"]
    assert len(bad.stderr.strip().splitlines()) == 1
