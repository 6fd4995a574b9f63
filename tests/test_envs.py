"""The conda environments pin what CI tests, and hold every runtime dependency."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONDA_NAMES = {"pytorch": "torch"}


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "envs/pins.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.lower()] = version
    return pins


def _conda(path: Path) -> dict[str, str]:
    env = yaml.safe_load(path.read_text())
    assert env["channels"][0] == "conda-forge"
    out = {}
    for spec in env["dependencies"]:
        assert isinstance(spec, str), f"{path.name}: no pip section (the engine comes from src/)"
        name, version = spec.split()[:2]
        out[CONDA_NAMES.get(name, name).lower()] = version.lstrip("=")
    return out


@pytest.mark.parametrize("env", ["tilefusion.yaml", "tilefusion-gpu.yaml"])
def test_conda_pins_are_the_versions_ci_tests(env) -> None:
    pins = _pins()
    conda = _conda(ROOT / "envs" / env)
    assert conda.pop("python") == "3.11"
    assert conda, env
    for name, version in conda.items():
        assert pins.get(name) == version, f"{env}: {name} {version} != pins.txt {pins.get(name)}"


def test_every_runtime_dependency_is_in_the_conda_env() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    conda = _conda(ROOT / "envs/tilefusion.yaml")
    for requirement in project["dependencies"]:
        name = re.split(r"[<>=!~ \[]", requirement, maxsplit=1)[0].lower()
        assert name in conda, f"{name} (pyproject) missing from envs/tilefusion.yaml"


def test_ci_installs_with_the_pins() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci/run").read_text()
    command = next(line for line in ci.splitlines() if "python -m pytest" in line)
    assert "-c envs/pins.txt" in command
    assert command.strip() in readme
