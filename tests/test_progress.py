"""Progress lines: at most one per interval, with share, throughput and time left."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from tilefusion.progress import Progress


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_line_every_interval_not_every_step() -> None:
    clock, lines = _Clock(), []
    progress = Progress(1000, what="fuse range 3", interval=5, clock=clock, emit=lines.append)
    for _ in range(9):
        clock.now += 1.0
        progress.advance(100)
    # Seconds 5 (500 voxels) and... only where 5 s passed since the last line.
    assert len(lines) == 1
    assert lines[0].startswith("fuse range 3: 50 % (0.0 of 0.0 Mvoxel)")
    assert "Mvoxel/s" in lines[0] and "5 s left" in lines[0]
    clock.now += 1.0
    progress.advance(100)
    progress.finish()
    assert lines[-1].startswith("fuse range 3: done, 0.0 Mvoxel in 10.0 s")


def test_counts_from_many_threads() -> None:
    progress = Progress(10_000, what="x", interval=1e9, emit=lambda line: None)
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda _: progress.advance(1), range(10_000)))
    assert progress.done == 10_000
