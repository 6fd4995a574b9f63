"""The workflow on a real SLURM cluster, through the profiles as users run them.

``test_demo_on_slurm_*`` starts a one-node cluster on localhost with one fake
GPU (``tests/slurm/``: Debian's ``slurm-wlm`` and ``munge``, root), runs the
demo with ``--profile profiles/slurm`` plus CI-only flags, and reads the jobs
back from ``scontrol``. It skips where SLURM, root or the plugin is missing.
The profile checks need no cluster.
"""

import importlib.util
import itertools
import json
import os
import re
import shutil
import subprocess
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SLURM = ROOT / "tests" / "slurm"
PROFILES = ROOT / "profiles"

pytestmark = pytest.mark.skipif(shutil.which("snakemake") is None, reason="snakemake not installed")

HAVE_PLUGIN = importlib.util.find_spec("snakemake_executor_plugin_slurm") is not None
needs_plugin = pytest.mark.skipif(not HAVE_PLUGIN, reason="snakemake-executor-plugin-slurm missing")

# Only for this cluster: no slurmdbd, so no sacct (squeue sees finished jobs
# for MinJobAge = 600 s >= 3 x 5 s), no account, fast first status check.
CI_FLAGS = [
    "--slurm-status-command",
    "squeue",
    "--slurm-init-seconds-before-status-checks",
    "5",
    "--slurm-no-account",
    "--slurm-keep-successful-logs",
]
RUN_LIMIT_S = 420
SLURM_TOOLS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "sinfo")


def _small_config(workdir: Path) -> Path:
    """The bundled demo as 3 fuse jobs and no pyramid (few, short jobs)."""
    shutil.copytree(ROOT / "config", workdir / "config")
    config = yaml.safe_load((ROOT / "config/config.yaml").read_text())
    config["fusion"]["chunks_per_range"] = 16
    config["output"]["pyramid_levels"] = 1
    path = workdir / "small.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


# --- the profiles, without a cluster ----------------------------------------


@pytest.mark.parametrize("name", ["slurm", "local"])
def test_every_profile_key_is_commented(name):
    lines = (PROFILES / name / "config.yaml").read_text().splitlines()
    for number, line in enumerate(lines):
        if re.match(r"^\s*[\w-]+:", line):
            above = lines[number - 1].strip() if number else ""
            assert above.startswith("#"), f"{name}: line {number + 1} {line!r} has no comment"


def test_slurm_profile_leaves_fuse_memory_and_time_to_the_rule():
    profile = yaml.safe_load((PROFILES / "slurm/config.yaml").read_text())
    fuse = profile["set-resources"]["fuse"]
    assert fuse["gpu"] == 1 and fuse["cpus_per_gpu"] >= 1
    # the rule's functions grow with the attempt; a number here would win over them
    assert "mem_mb" not in fuse and "runtime" not in fuse
    assert "retries" in profile  # on the command line, not the rule's `retries:`
    defaults = profile["default-resources"]
    for key in ("mem_mb", "runtime"):
        first, second = (eval(defaults[key], {"attempt": a}) for a in (1, 2))
        assert second == 2 * first > 0


@needs_plugin
def test_profile_by_name_after_the_documented_install(tmp_path):
    readme = (ROOT / "README.md").read_text()
    install = [line for line in readme.splitlines() if "cp -r profiles/slurm" in line]
    assert len(install) == 1, "the README shows one install line"
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config")}
    workdir = tmp_path / "run"
    workdir.mkdir()
    configfile = _small_config(workdir)
    command = [
        "snakemake",
        "-s",
        str(ROOT / "Snakefile"),
        "--profile",
        "slurm",
        "--configfile",
        str(configfile),
        "-n",
    ]
    # before the install, `--profile slurm` is not found from another folder
    before = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True)
    assert before.returncode != 0
    assert "profile" in (before.stdout + before.stderr).lower()
    done = subprocess.run(["bash", "-c", install[0]], cwd=ROOT, env=env)
    assert done.returncode == 0
    assert (home / ".config/snakemake/slurm/config.yaml").is_file()
    after = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True)
    assert after.returncode == 0, after.stderr[-3000:]
    out = after.stdout + after.stderr
    fuse = [block for block in out.split("\nrule ") if block.startswith("fuse:")]
    assert len(fuse) == 3
    for block in fuse:
        assert re.search(r"resources: .*\bgpu=1\b", block), block
        assert "slurm_partition=gpu" in block and "cpus_per_gpu=4" in block


# --- a real cluster ----------------------------------------------------------


def _skip_reason() -> str | None:
    missing = [tool for tool in SLURM_TOOLS if shutil.which(tool) is None]
    if missing:
        return (
            f"SLURM not installed ({', '.join(missing)} missing; apt-get install slurm-wlm munge)"
        )
    if os.geteuid() != 0:
        return "starting a SLURM cluster needs root"
    if not HAVE_PLUGIN:
        return "snakemake-executor-plugin-slurm missing"
    if shutil.which("timeout") is None:
        return "timeout (coreutils) missing"
    return None


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    """A one-node cluster on localhost with one fake GPU, stopped whatever happens."""
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    state = tmp_path_factory.mktemp("slurm-state")
    try:
        started = subprocess.run(
            ["timeout", "-k", "5", "90", str(SLURM / "start-cluster.sh"), str(state)],
            capture_output=True,
            text=True,
        )
        if started.returncode == 3:  # not ours to start (see the script)
            pytest.skip(f"cannot start a test cluster: {started.stderr.strip()}")
        assert started.returncode == 0, started.stdout + started.stderr
        yield state
    finally:
        subprocess.run(
            ["timeout", "-k", "5", "60", str(SLURM / "stop-cluster.sh"), str(state)],
            capture_output=True,
        )


def _jobs() -> list[dict[str, str]]:
    """Every job slurmctld remembers (MinJobAge), one dict of fields each."""
    out = subprocess.run(
        ["scontrol", "-d", "-o", "show", "job"], capture_output=True, text=True, timeout=30
    ).stdout
    return [
        dict(re.findall(r"(\S+?)=(\S*)", line)) for line in out.splitlines() if "JobId=" in line
    ]


class _Watcher(threading.Thread):
    """Polls the running jobs once a second while the workflow runs."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.stop = threading.Event()
        self.most_fuse_running = 0
        self.running_gres: set[str] = set()

    def run(self) -> None:
        while not self.stop.is_set():
            running = [
                j
                for j in _jobs()
                if j.get("JobState") == "RUNNING" and j.get("Comment", "").startswith("rule_fuse_")
            ]
            self.most_fuse_running = max(self.most_fuse_running, len(running))
            self.running_gres.update(j.get("GRES", "") for j in running)
            self.stop.wait(1.0)


def _time(text: str) -> datetime:
    return datetime.fromisoformat(text)


@pytest.mark.slurm
def test_demo_on_slurm_one_gpu_job_at_a_time(slurm_cluster, tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    configfile = _small_config(workdir)
    known = {j["JobId"] for j in _jobs()}
    command = [
        # SIGINT makes Snakemake scancel its jobs; KILL if it does not stop
        *("timeout", "-s", "INT", "-k", "30", str(RUN_LIMIT_S)),
        *("snakemake", "--profile", "profiles/slurm", "-d", str(workdir)),
        *("--configfile", str(configfile), *CI_FLAGS),
    ]
    watcher = _Watcher()
    watcher.start()
    started = time.monotonic()
    try:
        result = subprocess.run(
            command, cwd=ROOT, capture_output=True, text=True, timeout=RUN_LIMIT_S + 60
        )
    finally:
        watcher.stop.set()
        watcher.join(timeout=30)
    seconds = time.monotonic() - started
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    report = json.loads((workdir / "results/tilefusion/fused/qc_report.json").read_text())
    assert report["ok"]

    jobs = [j for j in _jobs() if j["JobId"] not in known]
    fuse = sorted(
        (j for j in jobs if j.get("Comment", "").startswith("rule_fuse_")),
        key=lambda j: _time(j["StartTime"]),
    )
    other = [j for j in jobs if j not in fuse]
    assert len(fuse) == 3 and other, [j.get("Comment") for j in jobs]
    for job in fuse:
        # submitted with one GPU, in the profile's GPU partition, with its CPUs,
        # and with the memory and time the rule computed, not the profile's default
        assert job["JobState"] == "COMPLETED"
        assert job["TresPerJob"] == "gres:gpu:1"
        assert job["Partition"] == "gpu" and job["NumCPUs"] == "4"
        assert job["MinMemoryNode"] != "2000M" and job["TimeLimit"] == "00:10:00"
    for job in other:
        assert "gpu" not in job.get("TresPerJob", "") and job["Partition"] == "cpu"
    # queued together, run one after the other on the one GPU
    assert max(_time(j["SubmitTime"]) for j in fuse) < min(_time(j["EndTime"]) for j in fuse)
    for before, after in itertools.pairwise(fuse):
        assert _time(before["EndTime"]) <= _time(after["StartTime"])
    assert watcher.most_fuse_running == 1
    assert any("gpu:1(IDX:0)" in gres for gres in watcher.running_gres), watcher.running_gres

    # each job logged its device, and why it is not the GPU
    for job in fuse:
        index = job["Comment"].rpartition("_")[2]
        text = (workdir / f"logs/tilefusion/fused/fuse/range{index}.log").read_text()
        assert f"range {index}: device cpu" in text
        assert "given GPU(s) (CUDA_VISIBLE_DEVICES=0) but CUDA is not usable" in text
    print(
        f"SLURM demo: {seconds:.0f} s, {len(jobs)} jobs; fuse "
        + ", ".join(f"{j['JobId']} {j['StartTime']}..{j['EndTime']}" for j in fuse)
    )
