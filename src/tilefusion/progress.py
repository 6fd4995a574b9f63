"""Progress lines for long jobs: a user following ``tail -f`` on a log sees it move.

A job counts its finished work (voxels) from any thread; a line is logged at
most every few seconds, not per chunk, with the share done, the throughput
so far and the time left at that rate.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

__all__ = ["Progress"]

log = logging.getLogger("tilefusion")


class Progress:
    """Thread-safe progress of one job's work, logged every ``interval`` seconds.

    Parameters
    ----------
    total : int
        Voxels the job computes.
    what : str
        What the job is, at the start of each line (``"fuse range 3"``).
    interval : float, optional
        Seconds between two lines at least.
    clock : callable, optional
        Monotonic seconds (tests pass their own).
    emit : callable, optional
        Takes each line; by default logged at INFO on the ``tilefusion`` logger.
    """

    def __init__(
        self,
        total: int,
        *,
        what: str,
        interval: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        emit: Callable[[str], None] | None = None,
    ) -> None:
        self.total = max(int(total), 1)
        self.what = what
        self.interval = float(interval)
        self._clock = clock
        self._emit = emit or (lambda line: log.info("%s", line))
        self._lock = threading.Lock()
        self._start = clock()
        self._last = self._start
        self.done = 0

    def advance(self, voxels: int) -> None:
        """Count ``voxels`` more as done; log a line when ``interval`` has passed."""
        with self._lock:
            self.done += int(voxels)
            now = self._clock()
            if now - self._last < self.interval or self.done >= self.total:
                return
            self._last = now
            line = self._line(now)
        self._emit(line)

    def finish(self) -> None:
        """Log the closing line (share, throughput, elapsed time)."""
        with self._lock:
            now = self._clock()
            elapsed = now - self._start
            rate = self.done / elapsed / 1e6 if elapsed > 0 else 0.0
            line = (
                f"{self.what}: done, {self.done / 1e6:.1f} Mvoxel in {elapsed:.1f} s "
                f"({rate:.1f} Mvoxel/s)"
            )
        self._emit(line)

    def _line(self, now: float) -> str:
        elapsed = now - self._start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        left = (self.total - self.done) / rate if rate > 0 else float("inf")
        share = 100.0 * self.done / self.total
        eta = f"{left:.0f} s left" if left != float("inf") else "time left unknown"
        return (
            f"{self.what}: {share:.0f} % ({self.done / 1e6:.1f} of {self.total / 1e6:.1f} Mvoxel), "
            f"{rate / 1e6:.1f} Mvoxel/s, {eta}"
        )
