"""Claim a GPU that no other tilefusion job on this machine is using.

Snakemake counts GPUs (``--resources gpu=N``) but does not say which one a
local job should use, so each fuse job claims one itself: it takes an
exclusive, non-blocking :func:`fcntl.flock` on one lock file per device in a
lock folder shared by the jobs (``TILEFUSION_GPU_LOCK_DIR``, by default
``<tempdir>/tilefusion-gpu-locks-<uid>``). The kernel drops a process's locks
when it ends, however it ends, so a killed job never leaves a device taken.

Under SLURM the job sees only the GPUs it was allocated (``CUDA_VISIBLE_DEVICES``),
the first of which is ``cuda:0``. Lock files are named after the device's
UUID where torch reports it, so jobs that see different GPUs under the same
index do not block each other.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import socket
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

__all__ = ["DeviceClaim", "claim_device", "default_lock_dir", "gpus_assigned", "visible_gpus"]

log = logging.getLogger("tilefusion.devices")

LOCK_DIR_ENV = "TILEFUSION_GPU_LOCK_DIR"
WAIT_ENV = "TILEFUSION_GPU_WAIT_S"
DEFAULT_WAIT_S = 600.0

# Variables through which a scheduler hands a job its GPUs.
_GPU_ENV = ("CUDA_VISIBLE_DEVICES", "SLURM_JOB_GPUS", "SLURM_STEP_GPUS", "GPU_DEVICE_ORDINAL")


class DeviceClaim:
    """A device held until :meth:`release` (or the end of a ``with`` block).

    ``with claim_device(...) as device:`` binds the torch device name
    (``"cpu"`` or ``"cuda:N"``).
    """

    def __init__(self, device: str, *, identity: str | None = None, fd: int | None = None):
        self.device = device
        self.identity = identity
        self._fd = fd

    @property
    def held(self) -> bool:
        """Whether a GPU lock is still held."""
        return self._fd is not None

    def release(self) -> None:
        """Give the device back (idempotent)."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)

    def __enter__(self) -> str:
        return self.device

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"DeviceClaim({self.device!r}, identity={self.identity!r}, held={self.held})"


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, so a SLURM job's own share)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def default_lock_dir() -> Path:
    """The lock folder: ``$TILEFUSION_GPU_LOCK_DIR``, else one per user in the temp dir."""
    configured = os.environ.get(LOCK_DIR_ENV)
    if configured:
        return Path(configured)
    return Path(tempfile.gettempdir()) / f"tilefusion-gpu-locks-{os.getuid()}"


def gpus_assigned() -> str | None:
    """The GPUs a scheduler gave this job (``"CUDA_VISIBLE_DEVICES=0"``), or ``None``."""
    for name in _GPU_ENV:
        value = os.environ.get(name, "").strip()
        if value and value not in {"-1", "NoDevFiles"}:
            return f"{name}={value}"
    return None


def nvidia_driver_present() -> bool:
    """Whether an NVIDIA kernel driver is loaded (Linux); True where we cannot tell."""
    if not Path("/proc").is_dir():
        return True
    return Path("/proc/driver/nvidia").exists() or any(Path("/dev").glob("nvidia[0-9]*"))


def visible_gpus() -> list[str] | None:
    """One identity per visible CUDA device, in index order; ``None`` without CUDA.

    The identity is the device's UUID when torch reports it, else the host
    and the entry of ``CUDA_VISIBLE_DEVICES`` (or the index).
    """
    if not nvidia_driver_present():
        # Importing torch costs a second per job; without the driver there is no CUDA.
        return None
    try:
        import torch
    except ImportError:
        return None
    try:
        if not torch.cuda.is_available():
            return None
        count = torch.cuda.device_count()
    except Exception as error:  # a broken driver is "no CUDA", not a failed job
        log.warning("CUDA is not usable (%s)", error)
        return None
    entries = [e.strip() for e in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")]
    host = socket.gethostname()
    identities = []
    for index in range(count):
        uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
        if uuid:
            identities.append(f"GPU-{uuid}")
        else:
            entry = entries[index] if index < len(entries) and entries[index] else str(index)
            identities.append(f"{host}-{entry}")
    return identities


def _parse(preferred: str | None) -> tuple[str, int | None]:
    """``(kind, index)``: kind in {"auto", "cpu", "cuda"}."""
    name = "auto" if preferred is None else str(preferred).strip().lower()
    if name in {"auto", "cpu", "cuda"}:
        return name, None
    kind, _, index = name.partition(":")
    if kind == "cuda" and index.isdigit():
        return "cuda", int(index)
    raise ValueError(f"unknown device {preferred!r}; expected 'auto', 'cpu', 'cuda' or 'cuda:N'")


def _lock_name(identity: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", identity) + ".lock"


def _try_lock(path: Path) -> int | None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    # who holds it, for a person looking at the folder (the lock is what counts)
    os.ftruncate(fd, 0)
    os.write(fd, f"{socket.gethostname()} {os.getpid()}\n".encode())
    return fd


def claim_device(
    preferred: str | None = None,
    *,
    gpus: Sequence[str] | None = None,
    lock_dir: str | Path | None = None,
    wait_s: float | None = None,
    poll_s: float = 0.5,
) -> DeviceClaim:
    """Claim a device for one job: a free GPU when CUDA is usable, else the CPU.

    Parameters
    ----------
    preferred : str, optional
        ``"auto"`` or ``None`` (any free GPU, else the CPU), ``"cpu"``,
        ``"cuda"`` (any free GPU) or ``"cuda:N"`` (that one).
    gpus : sequence of str, optional
        Identities of the visible CUDA devices in index order; ``None`` asks
        torch (:func:`visible_gpus`), an empty sequence means no CUDA.
    lock_dir : str or Path, optional
        Folder of the lock files; defaults to :func:`default_lock_dir`.
    wait_s : float, optional
        How long to wait for a GPU while every candidate is taken before
        falling back to the CPU; defaults to ``$TILEFUSION_GPU_WAIT_S`` or 600.
    poll_s : float, optional
        Seconds between attempts while waiting.

    Returns
    -------
    DeviceClaim
        Holds the GPU's lock until released; a context manager whose
        ``__enter__`` returns the torch device name.

    Raises
    ------
    ValueError
        If ``preferred`` is not a device name we know, or names a CUDA device
        index that this job cannot see.

    Notes
    -----
    The CPU is used, with a warning, when a GPU was asked for (``"cuda"``,
    ``"cuda:N"``, or GPUs handed to the job by a scheduler) but CUDA is not
    usable, and when no GPU became free within ``wait_s``.
    """
    kind, index = _parse(preferred)
    if kind == "cpu":
        return DeviceClaim("cpu")
    found = visible_gpus() if gpus is None else gpus
    identities = list(found or ())
    if not identities:
        assigned = gpus_assigned()
        if kind == "cuda":
            log.warning("device %r asked for but CUDA is not usable: using the CPU", preferred)
        elif assigned:
            log.warning(
                "this job was given GPU(s) (%s) but CUDA is not usable: using the CPU", assigned
            )
        return DeviceClaim("cpu")
    if index is not None and index >= len(identities):
        raise ValueError(
            f"device {preferred!r} does not exist: this job sees {len(identities)} GPU(s)"
        )
    candidates = [index] if index is not None else list(range(len(identities)))
    folder = Path(lock_dir) if lock_dir is not None else default_lock_dir()
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    if wait_s is None:
        wait_s = float(os.environ.get(WAIT_ENV, DEFAULT_WAIT_S))
    deadline = time.monotonic() + max(0.0, wait_s)
    waited = False
    while True:
        for i in candidates:
            path = folder / _lock_name(identities[i])
            fd = _try_lock(path)
            if fd is not None:
                if waited:
                    log.info("cuda:%d became free", i)
                log.info("claimed cuda:%d (%s, lock %s)", i, identities[i], path)
                return DeviceClaim(f"cuda:{i}", identity=identities[i], fd=fd)
        if time.monotonic() >= deadline:
            break
        if not waited:
            log.info(
                "every GPU (%d) is taken by other jobs; waiting up to %g s", len(candidates), wait_s
            )
            waited = True
        time.sleep(max(0.0, min(poll_s, deadline - time.monotonic())))
    log.warning("no GPU became free within %g s (locks in %s): using the CPU", wait_s, folder)
    return DeviceClaim("cpu")
