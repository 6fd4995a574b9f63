"""Run every workflow step in-process, in the order the Snakefile does."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path
from typing import Any

import yaml

from tilefusion import steps
from tilefusion.config import load_config
from tilefusion.plan import Plan, read_plan


def run_pipeline(raw_config: dict[str, Any], workdir: Path, *, order: str = "forward") -> Plan:
    """Plan, prepare, fuse every range, build the pyramid, assemble and validate."""
    config = load_config(raw_config)
    results = workdir / "results" / "tilefusion"
    markers_dir = results / "markers"
    plan_path = str(results / "plan.json")
    steps.write_plan(config, plan_path=plan_path, manifest_path=str(results / "manifest.tsv"))
    plan = read_plan(plan_path)
    steps.prepare(config, plan_path=plan_path, record_path=str(results / "store.json"))
    ranges = list(range(plan.grid.n_ranges))
    if order == "reverse":
        ranges.reverse()
    for r in ranges:
        steps.fuse(
            config,
            plan_path=plan_path,
            range_index=r,
            marker=str(steps.marker_path(markers_dir, 0, r)),
        )
    for k in range(1, len(plan.levels)):
        for r in range(plan.levels[k].n_ranges):
            steps.downsample(
                config,
                plan_path=plan_path,
                level=k,
                range_index=r,
                marker=str(steps.marker_path(markers_dir, k, r)),
            )
    markers = [
        str(steps.marker_path(markers_dir, k, r))
        for k, level in enumerate(plan.levels)
        for r in range(level.n_ranges)
    ]
    steps.assemble(
        config, plan_path=plan_path, markers=markers, record_path=str(results / "assemble.json")
    )
    steps.validate(
        config,
        plan_path=plan_path,
        markers_dir=str(markers_dir),
        report_path=str(results / "qc_report.json"),
    )
    return plan


SNAKEFILE = Path(__file__).resolve().parents[1] / "Snakefile"


def stored_bytes(root: Path) -> dict[str, str]:
    """Every file under ``root`` (links not followed) with its SHA-256."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def snakemake_run(workdir: Path, config: dict[str, Any], *args: str) -> subprocess.CompletedProcess:
    """The workflow on one core in ``workdir``, with ``config`` as ``workdir/my.yaml``."""
    workdir.mkdir(parents=True, exist_ok=True)
    configfile = workdir / "my.yaml"
    configfile.write_text(yaml.safe_dump(config))
    return subprocess.run(
        [
            *("snakemake", "-s", str(SNAKEFILE), "-d", str(workdir)),
            *("--configfile", str(configfile), "--cores", "1", *args),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
