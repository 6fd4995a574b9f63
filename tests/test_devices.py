"""Each concurrent fuse job gets its own GPU, and a dead job's GPU is free again.

No GPU is needed: the visible devices are injected (``gpus=``), the locks
are real files in a temporary folder, the claimers real processes.
"""

import itertools
import logging
import multiprocessing
import os
import signal
import time
from pathlib import Path

import pytest

from tilefusion import devices
from tilefusion.devices import claim_device

FAKE = ["GPU-aaaa", "GPU-bbbb", "GPU-cccc"]

# "fork" keeps the test module importable in the children without a package.
CTX = multiprocessing.get_context("fork")


def _claim_and_hold(lock_dir, gpus, hold_s, queue):
    with claim_device("auto", gpus=gpus, lock_dir=lock_dir, wait_s=60, poll_s=0.02) as device:
        start = time.monotonic()
        time.sleep(hold_s)
        end = time.monotonic()
    queue.put((os.getpid(), device, start, end))


def _claim_and_sleep(lock_dir, gpus, ready):
    claim = claim_device("cuda", gpus=gpus, lock_dir=lock_dir, wait_s=0)
    Path(ready).write_text(claim.device)
    time.sleep(600)


def _run_claimers(lock_dir, gpus, n, hold_s):
    queue = CTX.Queue()
    procs = [
        CTX.Process(target=_claim_and_hold, args=(lock_dir, gpus, hold_s, queue)) for _ in range(n)
    ]
    for p in procs:
        p.start()
    results = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=10)
        assert p.exitcode == 0
    return results


def test_concurrent_claimers_get_different_gpus(tmp_path):
    results = _run_claimers(tmp_path, FAKE, n=len(FAKE), hold_s=1.0)
    assert sorted(device for _, device, _, _ in results) == ["cuda:0", "cuda:1", "cuda:2"]
    # they really held them at the same time
    assert max(s for *_, s, _ in results) < min(e for *_, e in results)


def test_more_claimers_than_gpus_never_share_one(tmp_path):
    results = _run_claimers(tmp_path, FAKE[:2], n=6, hold_s=0.3)
    by_device: dict[str, list[tuple[float, float]]] = {}
    for _, device, start, end in results:
        by_device.setdefault(device, []).append((start, end))
    # all waited for a GPU instead of falling back to the CPU
    assert sorted(by_device) == ["cuda:0", "cuda:1"]
    for intervals in by_device.values():
        intervals.sort()
        for (_, end), (start, _) in itertools.pairwise(intervals):
            assert end <= start


def test_claim_is_released_when_its_process_is_killed(tmp_path, caplog):
    ready = tmp_path / "ready"
    holder = CTX.Process(target=_claim_and_sleep, args=(tmp_path / "locks", FAKE[:1], ready))
    holder.start()
    try:
        deadline = time.monotonic() + 30
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert ready.read_text() == "cuda:0"
        # taken: a short wait ends on the CPU, with a warning
        with caplog.at_level(logging.WARNING, logger="tilefusion"):
            claim = claim_device("cuda", gpus=FAKE[:1], lock_dir=tmp_path / "locks", wait_s=0.3)
        assert claim.device == "cpu" and not claim.held
        assert "no GPU became free within 0.3 s" in caplog.text
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.join(timeout=10)
    assert holder.exitcode == -signal.SIGKILL
    with claim_device("cuda", gpus=FAKE[:1], lock_dir=tmp_path / "locks", wait_s=0) as device:
        assert device == "cuda:0"


def test_release_frees_the_gpu_for_the_next_job(tmp_path):
    first = claim_device("auto", gpus=FAKE[:1], lock_dir=tmp_path, wait_s=0)
    assert first.device == "cuda:0" and first.held
    assert claim_device("auto", gpus=FAKE[:1], lock_dir=tmp_path, wait_s=0).device == "cpu"
    first.release()
    first.release()  # idempotent
    with claim_device("auto", gpus=FAKE[:1], lock_dir=tmp_path, wait_s=0) as device:
        assert device == "cuda:0"


def test_explicit_index_claims_that_gpu(tmp_path):
    with claim_device("cuda:1", gpus=FAKE, lock_dir=tmp_path, wait_s=0) as device:
        assert device == "cuda:1"
        with claim_device("cuda", gpus=FAKE, lock_dir=tmp_path, wait_s=0) as other:
            assert other == "cuda:0"
    with pytest.raises(ValueError, match=r"'cuda:3' does not exist: this job sees 3 GPU"):
        claim_device("cuda:3", gpus=FAKE, lock_dir=tmp_path)


def test_lock_dir_comes_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("TILEFUSION_GPU_LOCK_DIR", str(tmp_path / "shared"))
    with claim_device("cuda", gpus=FAKE[:1], wait_s=0) as device:
        assert device == "cuda:0"
        assert (tmp_path / "shared" / "GPU-aaaa.lock").exists()
    monkeypatch.delenv("TILEFUSION_GPU_LOCK_DIR")
    assert devices.default_lock_dir().name == f"tilefusion-gpu-locks-{os.getuid()}"


@pytest.mark.parametrize(
    ("preferred", "env", "warning"),
    [
        ("cuda", {}, "device 'cuda' asked for but CUDA is not usable: using the CPU"),
        ("auto", {"CUDA_VISIBLE_DEVICES": "0"}, "given GPU(s) (CUDA_VISIBLE_DEVICES=0) but CUDA"),
        ("auto", {}, None),
        ("cpu", {"CUDA_VISIBLE_DEVICES": "0"}, None),
    ],
)
def test_without_cuda_the_cpu_is_used(tmp_path, monkeypatch, caplog, preferred, env, warning):
    for name in ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_GPUS", "SLURM_STEP_GPUS", "GPU_DEVICE_ORDINAL"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(devices, "visible_gpus", lambda: None)
    with caplog.at_level(logging.WARNING, logger="tilefusion"):
        with claim_device(preferred, lock_dir=tmp_path) as device:
            assert device == "cpu"
    if warning:
        assert warning in caplog.text
    else:
        assert caplog.text == ""
    assert not list(tmp_path.iterdir())


def test_unknown_device_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown device 'gpu0'"):
        claim_device("gpu0", gpus=FAKE, lock_dir=tmp_path)


def test_this_machine_needs_no_gpu_to_claim(tmp_path, monkeypatch):
    # the real probe (torch CPU build on CI): no CUDA, so the CPU, no lock
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    found = devices.visible_gpus()
    with claim_device("auto", lock_dir=tmp_path, wait_s=0) as device:
        assert device == ("cpu" if not found else "cuda:0")
