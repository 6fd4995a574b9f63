"""GPU benchmark: the torch kernel's memory throughput, and where a GPU fuse job's time goes.

Run it on a machine with a CUDA GPU (it runs on the CPU too, as a check of the
script, but the figures then mean nothing)::

    python benchmarks/bench_gpu.py                      # kernel + fuse job, full scale
    python benchmarks/bench_gpu.py --skip-job --scale small

1. Kernel: one output block of the benchmark's affine case (a rotated uint16
   tile crop, linear interpolation, cosine blending) fused again and again by
   :func:`tilefusion.kernel.fuse_block` with the torch backend, the crop already
   on the device and the result left there, timed with CUDA events. "Bytes it
   must move" are the crop's bytes read once plus the float32 block written
   once; their rate is set against the device's peak memory bandwidth (from
   its memory clock and bus width, or ``--peak-gbs``). The issue's target is
   at least 50 %.
2. Fuse job: ``tilefusion fuse`` of the whole benchmark dataset on the device
   (one job, as the workflow runs it), with the job's thread-seconds for
   reading, fusing (kernel, transfers, rounding, statistics) and writing. The
   target is a job bound by decoding and encoding, not by the kernel.

Prints a Markdown section to paste into ``docs/benchmarks.md`` (or ``--doc``
to append it) and, with ``--json``, the raw figures.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from dataset import SCALES, BenchSpec, write_dataset  # noqa: E402

BLOCK = (64, 256, 256)


def _peak_gbs(device: Any) -> float | None:
    """Peak memory bandwidth in GB/s from the device's properties, if torch reports them."""
    import torch

    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    clock_khz = getattr(props, "memory_clock_rate", None)
    bus_bits = getattr(props, "memory_bus_width", None)
    if not clock_khz or not bus_bits:
        return None
    # Double data rate: two transfers per clock.
    return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9


def _block_crop() -> tuple[Any, int]:
    """The crop of a tile one BLOCK needs, and its bytes (2 degrees about z, z 4x coarser)."""
    from tilefusion.kernel import TileCrop

    angle = math.radians(2.0)
    cos, sin = math.cos(angle), math.sin(angle)
    # Output voxel (isotropic 0.5 um) -> tile voxel (2.0 x 0.5 x 0.5 um), rotated in y-x.
    out_to_tile = np.array(
        [
            [0.25, 0.0, 0.0, 3.3],
            [0.0, cos, -sin, 20.4],
            [0.0, sin, cos, 7.7],
            [0.0, 0.0, 0.0, 1.0],
        ]
    )
    corners = np.array(
        [
            [z, y, x, 1.0]
            for z in (0, BLOCK[0] - 1)
            for y in (0, BLOCK[1] - 1)
            for x in (0, BLOCK[2] - 1)
        ]
    )
    mapped = corners @ out_to_tile.T
    lo = np.floor(mapped[:, :3].min(axis=0)).astype(int)
    hi = np.ceil(mapped[:, :3].max(axis=0)).astype(int) + 2
    rng = np.random.default_rng(3)
    data = rng.integers(100, 4000, size=tuple(hi - lo), dtype=np.uint16)
    crop = TileCrop(
        data=data,
        out_to_tile=out_to_tile,
        crop_offset_zyx=tuple(int(v) for v in lo),
        # Inside a tile of the benchmark's shape, near its corner: the cosine ramp applies.
        tile_shape_zyx=(128, 512, 512),
    )
    return crop, data.nbytes


def kernel(device_name: str, repeats: int, peak_gbs: float | None) -> dict[str, Any]:
    import torch

    from tilefusion.kernel import fuse_block

    device = torch.device(device_name)
    crop, crop_bytes = _block_crop()
    out_bytes = 4 * math.prod(BLOCK)

    def once() -> None:
        fuse_block(
            [crop],
            BLOCK,
            interpolation="linear",
            blending="cosine",
            backend="torch",
            device=device_name,
        )

    def transfers() -> None:
        # What fuse_block moves over the bus: the crop there, the block back.
        torch.from_numpy(crop.data).to(device)
        torch.empty(BLOCK, dtype=torch.float32, device=device).cpu()

    def timed(step: Any) -> float:
        step()  # warm-up: allocations, CUDA context
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - start) / repeats

    with_transfers = timed(once)
    transfer = timed(transfers)
    seconds = max(with_transfers - transfer, 1e-9)
    moved = crop_bytes + out_bytes
    peak = peak_gbs if peak_gbs is not None else _peak_gbs(device)
    rate = moved / seconds / 1e9
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "block": list(BLOCK),
        "seconds_per_block": seconds,
        "seconds_with_transfers": with_transfers,
        "transfer_seconds": transfer,
        "output_mvoxel_per_s": math.prod(BLOCK) / seconds / 1e6,
        "bytes_moved": moved,
        "effective_gbs": rate,
        "peak_gbs": peak,
        "fraction_of_peak": rate / peak if peak else None,
        "note": "kernel time is fuse_block's minus the time of its transfers (the crop"
        " to the device, the block back) timed alone",
    }


def job(scale: str, device_name: str, workdir: Path) -> dict[str, Any]:
    from bench_fusion import _config

    from tilefusion import steps
    from tilefusion.config import load_config
    from tilefusion.plan import read_plan

    xml = write_dataset(workdir / f"data-{scale}", BenchSpec(SCALES[scale], kind="affine"))
    # The CPU benchmark's affine case, in one job on the device.
    settings = _config(xml, workdir / "gpu.ome.zarr", "affine", chunks_per_range=1_000_000)
    settings["fusion"]["device"] = device_name
    cfg = load_config(settings)
    plan_path = workdir / "plan.json"
    steps.plan_and_prepare(
        cfg,
        plan_path=str(plan_path),
        manifest_path=str(workdir / "manifest.tsv"),
        record_path=str(workdir / "store.json"),
    )
    voxels = math.prod(read_plan(plan_path).grid.shape_zyx)
    result = steps.fuse(
        cfg, plan_path=str(plan_path), range_index=0, marker=str(workdir / "m.json")
    )
    return {
        "device": result.get("device"),
        "output_voxels": voxels,
        "seconds": result["seconds"],
        "output_mvoxel_per_s": voxels / result["seconds"] / 1e6,
        "thread_seconds": result.get("thread_seconds", {}),
    }


def report(results: dict[str, Any], command: str | None) -> str:
    """The GPU section in Markdown; ``command=None`` leaves out command and date."""
    lines = ["## GPU", ""]
    if command is not None:
        lines += [f"- Command: `{command}`", f"- Date: {results['date']}", ""]
    k = results.get("kernel")
    if k:
        frac = k["fraction_of_peak"]
        lines.append(
            f"Kernel on {k['device']}: one {' x '.join(map(str, k['block']))} block in"
            f" {1e3 * k['seconds_per_block']:.2f} ms ({k['output_mvoxel_per_s']:.0f} output"
            f" Mvoxel/s; {1e3 * k['seconds_with_transfers']:.2f} ms with the transfers,"
            f" {1e3 * k['transfer_seconds']:.2f} ms of them); {k['bytes_moved'] / 1e6:.0f} MB"
            f" it must move at {k['effective_gbs']:.1f} GB/s"
            + (f", {100 * frac:.0f} % of the peak {k['peak_gbs']:.0f} GB/s." if frac else ".")
            + " "
            + k["note"]
            + "."
        )
        lines.append("")
    j = results.get("job")
    if j:
        ts = j["thread_seconds"]
        total = sum(ts.values()) or 1.0
        lines.append(
            f"Fuse job on {j['device']}: {j['output_voxels'] / 1e6:.0f} Mvoxel in"
            f" {j['seconds']:.2f} s ({j['output_mvoxel_per_s']:.0f} Mvoxel/s); thread-seconds "
            + ", ".join(f"{name} {v:.1f} s ({100 * v / total:.0f} %)" for name, v in ts.items())
            + "."
        )
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--scale", choices=sorted(SCALES), default="full")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--peak-gbs", type=float, default=None)
    parser.add_argument("--skip-job", action="store_true")
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "tilefusion-gpu"))
    parser.add_argument("--json", default=None)
    parser.add_argument("--doc", default=None, help="append the section to this Markdown file")
    args = parser.parse_args(argv)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    results: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "kernel": kernel(device, args.repeats, args.peak_gbs),
    }
    if not args.skip_job:
        workdir = Path(args.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        results["job"] = job(args.scale, device, workdir)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    text = report(results, "python benchmarks/bench_gpu.py " + " ".join(argv))
    if args.doc:
        with Path(args.doc).open("a") as handle:
            handle.write("\n" + text)
    print(text)


if __name__ == "__main__":
    main()
