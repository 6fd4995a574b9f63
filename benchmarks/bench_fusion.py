"""Fusion benchmark: tilefusion against multiview-stitcher, the seed's method and the floors.

One run, one machine, the same dataset (``benchmarks/dataset.py``) and the
same output grid for every method; each method runs in its own process so
its peak RSS is its own. Writes ``docs/benchmarks.md``.

    python benchmarks/bench_fusion.py                 # the issue's full size
    python benchmarks/bench_fusion.py --scale small   # a ~1-2 minute smoke run

Methods (output: uint16, zstd level 1, chunks 64 x 128 x 128):

- ``tilefusion fuse``: the fuse step's jobs, one process per range as the
  workflow runs them; throughput from the jobs' own time (marker ``seconds``).
- ``tilefusion workflow``: ``snakemake --cores N`` from start to finish.
- ``multiview-stitcher``: ``fusion.fuse`` (default weighted blending, linear
  interpolation) of dask-backed tiles onto the same grid, stored to Zarr with
  dask threads.
- ``seed method``: per output chunk, a full meshgrid of voxel centres, a
  matrix product, ``torch.nn.functional.grid_sample``, max blend.
- ``Rhapso`` (optional, ``--rhapso-python``): Rhapso's affine fusion (Ray,
  scipy ``map_coordinates`` per block) through ``benchmarks/peer_rhapso.py`` in
  Rhapso's own virtual environment; affine case only (it fuses isotropically).
- floors: reading and decoding the tiles alone; encoding and writing the
  output alone (zarr-python, and bare numcodecs encoding).

Every output is checked against the analytic sample at random voxels, so a
method that misplaces data shows it. On a machine with a CUDA GPU the report
also has a GPU section (``bench_gpu.py``: the kernel against the device's
memory bandwidth, and a fuse job on the GPU, with the GPU model).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from dataset import SCALES, VOXEL_ZYX, BenchSpec, sample, write_dataset  # noqa: E402

CHUNKS = (64, 128, 128)
SHARDS = (128, 256, 256)


# ---------------------------------------------------------------------------
# helpers


def _config(xml: Path, out: Path, kind: str, chunks_per_range: int | None = None) -> dict[str, Any]:
    resolution = [0.5, 0.5, 0.5] if kind == "affine" else list(VOXEL_ZYX)
    fusion = {} if chunks_per_range is None else {"fusion": {"chunks_per_range": chunks_per_range}}
    return {
        "dataset": str(xml),
        "output": {
            "path": str(out),
            "resolution": resolution,
            "format": "ome-zarr-0.5",
            "chunks": list(CHUNKS),
            "shards": list(SHARDS),
            "pyramid_levels": 1,
            "compression": {"codec": "zstd", "level": 1},
            "overwrite": True,
        },
        # fusion.chunks_per_range: the default (1024 chunks per job)
        **fusion,
    }


def _run_child(args: list[str], *, cwd: Path | None = None) -> tuple[float, float, str]:
    """Run a child process; return (wall seconds, peak RSS MB, stdout)."""
    start = time.perf_counter()
    proc = subprocess.Popen(args, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out_text = proc.stdout.read().decode() if proc.stdout else ""
    err_text = proc.stderr.read().decode() if proc.stderr else ""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{args[:4]} failed ({proc.returncode}):\n{err_text[-3000:]}")
    return wall, usage.ru_maxrss / 1024.0, out_text


def _worker(name: str, **kwargs: Any) -> tuple[float, float, dict[str, Any]]:
    args = [sys.executable, str(Path(__file__).resolve()), "worker", name, json.dumps(kwargs)]
    wall, rss, out = _run_child(args)
    return wall, rss, json.loads(out.strip().splitlines()[-1])


def _grid(plan_path: Path) -> dict[str, Any]:
    from tilefusion.plan import read_plan

    plan = read_plan(plan_path)
    return {
        "shape": list(plan.grid.shape_zyx),
        "origin": list(plan.grid.translation_zyx),
        "scale": list(plan.grid.scale_zyx),
    }


def _truth_error(array: Any, grid: dict[str, Any], n: int = 20000) -> dict[str, float]:
    """Compare stored voxels with the analytic sample where the output has data.

    ``array`` may carry leading axes of length 1 (a 5D t, c, z, y, x output).
    """
    rng = np.random.default_rng(5)
    shape = np.array(grid["shape"])
    idx = (rng.random((n, 3)) * shape).astype(int)
    leading = tuple(np.zeros(n, dtype=int) for _ in range(array.ndim - 3))
    values = np.array(array.get_coordinate_selection(leading + tuple(idx.T)), dtype=np.float64)
    keep = values > 0
    phys = np.array(grid["origin"]) + idx[keep] * np.array(grid["scale"])
    truth = sample(phys)
    err = values[keep] - truth
    corr = float(np.corrcoef(values[keep], truth)[0, 1]) if keep.sum() > 2 else float("nan")
    return {
        "rmse": float(np.sqrt(np.mean(err**2))),
        "p99_abs": float(np.percentile(np.abs(err), 99)),
        "corr": corr,
        "covered": float(keep.mean()),
    }


# ---------------------------------------------------------------------------
# workers (each runs in its own process)


def worker_tilefusion_range(cfg: dict[str, Any], plan: str, r: int, marker: str) -> dict[str, Any]:
    from tilefusion import steps

    result = steps.fuse(cfg, plan_path=plan, range_index=r, marker=marker)
    return {"seconds": result["seconds"], "thread_seconds": result.get("thread_seconds", {})}


def worker_read_floor(xml: str, threads: int) -> dict[str, Any]:
    from concurrent.futures import ThreadPoolExecutor

    from tilefusion.readers import open_array, read_dataset

    dataset = read_dataset(xml)
    arrays = [open_array(v.source) for v in dataset.views]
    jobs = []
    for a in arrays:
        nz = a.shape[0]
        for z in range(0, nz, 32):
            jobs.append((a, (z, 0, 0), (min(z + 32, nz), a.shape[1], a.shape[2])))
    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        total = sum(pool.map(lambda j: j[0].read(j[1], j[2]).size, jobs))
    return {"seconds": time.perf_counter() - start, "voxels": int(total)}


def worker_write_floor(source: str, target: str, threads: int) -> dict[str, Any]:
    """Encode and write the fused output again (same bytes to compress), zarr-python
    and bare numcodecs."""
    from concurrent.futures import ThreadPoolExecutor

    import numcodecs
    import zarr
    from zarr.codecs import ZstdCodec

    src = zarr.open_array(source, mode="r")
    blocks = []
    for z in range(0, src.shape[0], SHARDS[0]):
        for y in range(0, src.shape[1], SHARDS[1]):
            for x in range(0, src.shape[2], SHARDS[2]):
                sl = (
                    slice(z, min(z + SHARDS[0], src.shape[0])),
                    slice(y, min(y + SHARDS[1], src.shape[1])),
                    slice(x, min(x + SHARDS[2], src.shape[2])),
                )
                blocks.append((sl, src[sl]))
    dst = zarr.create_array(
        target,
        shape=src.shape,
        chunks=CHUNKS,
        shards=SHARDS,
        dtype=src.dtype,
        fill_value=0,
        compressors=ZstdCodec(level=1),
        config={"write_empty_chunks": False},
    )

    def write(item: tuple[Any, np.ndarray]) -> None:
        dst[item[0]] = item[1]

    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(write, blocks))
    zarr_seconds = time.perf_counter() - start
    codec = numcodecs.Zstd(level=1)

    def encode(item: tuple[Any, np.ndarray]) -> int:
        data = item[1]
        n = 0
        for z in range(0, data.shape[0], CHUNKS[0]):
            for y in range(0, data.shape[1], CHUNKS[1]):
                for x in range(0, data.shape[2], CHUNKS[2]):
                    block = np.ascontiguousarray(
                        data[z : z + CHUNKS[0], y : y + CHUNKS[1], x : x + CHUNKS[2]]
                    )
                    n += len(codec.encode(block))
        return n

    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        nbytes = sum(pool.map(encode, blocks))
    return {
        "zarr_seconds": zarr_seconds,
        "numcodecs_seconds": time.perf_counter() - start,
        "compressed_bytes": nbytes,
    }


def worker_seed(cfg: dict[str, Any], plan: str, target: str, threads: int) -> dict[str, Any]:
    """The seed's method: meshgrid + matrix product + grid_sample + max blend per chunk."""
    import torch
    import zarr
    from zarr.codecs import ZstdCodec

    from tilefusion import geometry
    from tilefusion.plan import chunks_of_box, read_plan, tiles_for_chunks
    from tilefusion.readers import open_array

    torch.set_num_threads(threads)
    start = time.perf_counter()
    p = read_plan(plan)
    level = p.grid
    tiles = []
    for t in p.tiles:
        a = open_array(t.source)
        data = torch.from_numpy(a.read((0, 0, 0), a.shape).astype(np.float32))[None, None]
        tiles.append((data, geometry.invert(t.tile_to_output), np.array(t.shape_zyx)))
    out = zarr.create_array(
        target,
        shape=level.shape_zyx,
        chunks=CHUNKS,
        dtype="uint16",
        fill_value=0,
        compressors=ZstdCodec(level=1),
    )
    boxes = list(chunks_of_box(level, (0, 0, 0), level.shape_zyx))
    for (lo, hi), ids in zip(boxes, tiles_for_chunks(p, boxes)):
        if not ids:
            continue
        axes = [torch.arange(a, b, dtype=torch.float32) for a, b in zip(lo, hi)]
        grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)  # (z, y, x, 3)
        best = torch.zeros(grid.shape[:3])
        for i in ids:
            data, inv, size = tiles[i]
            m = torch.from_numpy(inv[:3, :3].astype(np.float32))
            tr = torch.from_numpy(inv[:3, 3].astype(np.float32))
            coords = grid @ m.T + tr  # tile voxel indices, zyx
            norm = 2.0 * coords / torch.from_numpy((size - 1).astype(np.float32)) - 1.0
            sampled = torch.nn.functional.grid_sample(
                data,
                norm.flip(-1)[None],
                mode="bilinear",
                padding_mode="zeros",
                align_corners=True,
            )[0, 0]
            best = torch.maximum(best, sampled)
        out[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = (
            best.round().clamp(0, 65535).numpy().astype(np.uint16)
        )
    return {"seconds": time.perf_counter() - start}


def worker_mvs(grid: dict[str, Any], xml: str, target: str, threads: int) -> dict[str, Any]:
    """multiview-stitcher: fuse dask-backed tiles onto our grid, store to Zarr."""
    import dask
    import dask.array as da
    import zarr
    from multiview_stitcher import fusion, param_utils
    from multiview_stitcher import spatial_image_utils as si_utils
    from zarr.codecs import ZstdCodec

    from tilefusion.readers import read_dataset

    start = time.perf_counter()
    dataset = read_dataset(xml)
    world = min(VOXEL_ZYX)
    sims = []
    for view in dataset.views:
        arr = zarr.open_array(str(Path(view.source.path) / "0"), mode="r")
        data = da.from_zarr(arr)
        # physical in -> voxel index -> world (model) -> physical out
        affine = (
            np.diag([world, world, world, 1.0])
            @ view.model
            @ np.diag([1 / v for v in view.voxel_size_zyx] + [1.0])
        )
        sims.append(
            si_utils.get_sim_from_array(
                data,
                dims=["z", "y", "x"],
                scale=dict(zip("zyx", view.voxel_size_zyx)),
                translation=dict.fromkeys("zyx", 0.0),
                affine=param_utils.affine_to_xaffine(affine),
                transform_key="registered",
            )
        )
    fused = fusion.fuse(
        sims,
        transform_key="registered",
        output_stack_properties={
            "spacing": dict(zip("zyx", grid["scale"])),
            "origin": dict(zip("zyx", grid["origin"])),
            "shape": dict(zip("zyx", grid["shape"])),
        },
        output_chunksize=dict(zip("zyx", CHUNKS)),
    )
    data = fused.data
    while data.ndim > 3:
        data = data[0]
    if data.dtype != np.uint16:
        data = da.clip(da.round(data), 0, 65535).astype(np.uint16)
    out = zarr.create_array(
        target,
        shape=data.shape,
        chunks=CHUNKS,
        dtype="uint16",
        fill_value=0,
        compressors=ZstdCodec(level=1),
    )
    with dask.config.set(scheduler="threads", num_workers=threads):
        da.store(data.rechunk(CHUNKS), out, lock=False)
    return {"seconds": time.perf_counter() - start}


def worker_gpu(scale: str, workdir: str) -> dict[str, Any]:
    """The GPU section (``bench_gpu.py``): the torch kernel alone, and a fuse job on the GPU."""
    import bench_gpu

    return {
        "kernel": bench_gpu.kernel("cuda", 20, None),
        "job": bench_gpu.job(scale, "cuda", Path(workdir)),
    }


def _cuda_available() -> bool:
    from tilefusion.devices import nvidia_driver_present

    if not nvidia_driver_present():
        return False
    import torch

    return bool(torch.cuda.is_available())


def worker_warm_kernel() -> dict[str, Any]:
    """Compile numba's kernels into its cache, as the first job after an install does."""
    from tilefusion.kernel.numba_cpu import warm_up

    start = time.perf_counter()
    warm_up()
    return {"seconds": time.perf_counter() - start}


def worker_plan_scale(tiles_per_axis: int) -> dict[str, Any]:
    """Plan 10,000 tiles (100 x 100) into about a million chunks."""
    from tilefusion import geometry
    from tilefusion.plan import chunk_tile_pairs, make_plan
    from tilefusion.readers.base import ArraySource, Dataset, View

    shape = (64, 512, 512)
    step = 461
    views = []
    for i in range(tiles_per_axis):
        for j in range(tiles_per_axis):
            views.append(
                View(
                    setup=i * tiles_per_axis + j,
                    timepoint=0,
                    shape_zyx=shape,
                    voxel_size_zyx=(1.0, 1.0, 1.0),
                    model=geometry.translation((0, i * step, j * step)),
                    source=ArraySource("memory", f"t{i}-{j}"),
                    calibration_zyx=(1.0, 1.0, 1.0),
                    dtype="uint16",
                )
            )
    start = time.perf_counter()
    plan = make_plan(
        Dataset("synthetic.xml", "micrometer", tuple(views)),
        chunks_zyx=(32, 64, 64),
        chunks_per_range=4096,
        pyramid_levels=1,
    )
    planned = time.perf_counter() - start
    level = plan.grid
    n_chunks = math.prod(math.ceil(s / c) for s, c in zip(level.shape_zyx, level.chunks_zyx))
    start = time.perf_counter()
    pairs = chunk_tile_pairs(plan)
    hits = len(np.unique(pairs[:, 1:4], axis=0))
    return {
        "tiles": len(views),
        "chunks": n_chunks,
        "ranges": level.n_ranges,
        "plan_seconds": planned,
        "chunk_tiles_seconds": time.perf_counter() - start,
        "chunks_with_tiles": hits,
    }


WORKERS = {
    "tilefusion_range": worker_tilefusion_range,
    "read_floor": worker_read_floor,
    "write_floor": worker_write_floor,
    "seed": worker_seed,
    "mvs": worker_mvs,
    "plan_scale": worker_plan_scale,
    "warm_kernel": worker_warm_kernel,
    "gpu": worker_gpu,
}


# ---------------------------------------------------------------------------
# the run


def _tilefusion(
    xml: Path, work: Path, kind: str, cores: int, chunks_per_range: int | None = None
) -> dict[str, Any]:
    from tilefusion import steps
    from tilefusion.config import load_config
    from tilefusion.plan import read_plan

    out = work / "fused.ome.zarr"
    cfg = load_config(_config(xml, out, kind, chunks_per_range))
    plan_path = work / "plan.json"
    steps.write_plan(cfg, plan_path=str(plan_path), manifest_path=str(work / "manifest.tsv"))
    steps.prepare(cfg, plan_path=str(plan_path), record_path=str(work / "store.json"))
    plan = read_plan(plan_path)
    seconds, walls, rss = 0.0, 0.0, 0.0
    peaks: list[float] = []
    threads: dict[str, float] = {}
    for r in range(plan.grid.n_ranges):
        wall, peak, res = _worker(
            "tilefusion_range",
            cfg=cfg,
            plan=str(plan_path),
            r=r,
            marker=str(work / "markers" / f"range{r}.json"),
        )
        seconds += res["seconds"]
        walls += wall
        rss = max(rss, peak)
        peaks.append(peak)
        for k, v in res["thread_seconds"].items():
            threads[k] = threads.get(k, 0.0) + v
    return {
        "seconds": seconds,
        "process_seconds": walls,
        "rss_mb": rss,
        "rss_mb_per_job": peaks,
        "chunks_per_range": cfg["fusion"]["chunks_per_range"],
        "ranges": plan.grid.n_ranges,
        "thread_seconds": threads,
        "grid": _grid(plan_path),
        "output": str(out / "0"),
    }


def _workflow(xml: Path, work: Path, kind: str, cores: int) -> dict[str, Any]:
    import yaml

    work.mkdir(parents=True, exist_ok=True)
    cfg = _config(xml, work / "results" / "fused.ome.zarr", kind)
    cfg_path = work / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    args = ["snakemake", "-s", str(REPO / "Snakefile"), "-d", str(work)]
    args += ["--configfile", str(cfg_path), "--cores", str(cores), "--quiet", "all"]
    wall, rss, _ = _run_child(args)
    return {"seconds": wall, "rss_mb": rss}


def _rhapso(python: str, xml: Path, out: Path, cores: int) -> dict[str, Any]:
    """Rhapso's affine fusion in its own interpreter; its grid is its own."""
    import zarr

    script = HERE / "peer_rhapso.py"
    args = [python, str(script), "--xml", str(xml), "--out", str(out), "--cores", str(cores)]
    try:
        _, _, text = _run_child(args)
    except (RuntimeError, OSError) as exc:
        return {"error": str(exc)[-500:]}
    res = json.loads(text.strip().splitlines()[-1])
    return {
        "seconds": res["seconds"],
        # Ray's processes together; the child's own ru_maxrss misses them.
        "rss_mb": res["peak_rss_mb_tree"],
        "out_voxels": res["out_voxels"],
        "grid": res["grid"],
        "ray_start_seconds": res["ray_start_seconds"],
        "truth": _truth_error(zarr.open_array(res["output"], mode="r"), res["grid"]),
    }


def _machine() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = ""
    try:
        import torch

        if torch.cuda.is_available():
            gpu = f"; GPU {torch.cuda.get_device_name(0)}"
    except ImportError:
        pass
    return f"{model}, {os.cpu_count()} logical cores{gpu}"


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ["tilefusion", "numpy", "numba", "zarr", "numcodecs", "torch", "snakemake"]:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "-"
    for name in ["multiview-stitcher", "dask"]:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    tile_shape = SCALES[args.scale]
    root = Path(args.workdir) / args.scale
    results: dict[str, Any] = {
        "scale": args.scale,
        "tile_shape": list(tile_shape),
        "cores": args.cores,
        "cases": {},
    }
    # Timed jobs find numba's cache warm, as every job but the first after an install does.
    _, _, warm = _worker("warm_kernel")
    results["kernel_compile_seconds"] = warm["seconds"]
    for kind in args.cases:
        print(f"== {kind}: dataset", flush=True)
        data_dir = root / f"data-{kind}"
        xml = write_dataset(data_dir, BenchSpec(tile_shape, kind=kind))
        case: dict[str, Any] = {}
        in_voxels = 4 * math.prod(tile_shape)
        work = root / f"run-{kind}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)

        print(f"== {kind}: tilefusion fuse step", flush=True)
        tf = _tilefusion(xml, work / "tilefusion", kind, args.cores)
        grid = tf["grid"]
        out_voxels = math.prod(grid["shape"])
        case["grid"] = grid
        case["out_voxels"] = out_voxels
        case["in_voxels"] = in_voxels
        import zarr

        tf_array = zarr.open_array(tf["output"], mode="r")
        case["tilefusion fuse step"] = {
            "seconds": tf["seconds"],
            "rss_mb": tf["rss_mb"],
            "ranges": tf["ranges"],
            "process_seconds": tf["process_seconds"],
            "thread_seconds": tf["thread_seconds"],
            "truth": _truth_error(tf_array, grid),
        }

        case["tilefusion fuse step, with process start-up"] = {
            "seconds": tf["process_seconds"],
            "rss_mb": tf["rss_mb"],
        }

        if kind == "affine":
            print(f"== {kind}: fuse jobs' memory against the range size", flush=True)
            small = _tilefusion(xml, work / "small-ranges", kind, args.cores, chunks_per_range=16)
            case["rss by range size"] = [
                {
                    "chunks_per_range": run_["chunks_per_range"],
                    "ranges": run_["ranges"],
                    "rss_mb": run_["rss_mb_per_job"],
                }
                for run_ in (tf, small)
            ]
            shutil.rmtree(work / "small-ranges", ignore_errors=True)

        print(f"== {kind}: tilefusion workflow (snakemake)", flush=True)
        wf = _workflow(xml, work / "workflow", kind, args.cores)
        case["tilefusion workflow"] = wf

        print(f"== {kind}: floors", flush=True)
        _, rss, res = _worker("read_floor", xml=str(xml), threads=args.cores)
        case["floor: read + decode tiles"] = {
            "seconds": res["seconds"],
            "rss_mb": rss,
            "note": f"{in_voxels / res['seconds'] / 1e6:.0f} input Mvoxel/s",
        }
        _, rss, res = _worker(
            "write_floor", source=tf["output"], target=str(work / "floor.zarr"), threads=args.cores
        )
        case["floor: encode + write (zarr-python)"] = {
            "seconds": res["zarr_seconds"],
            "rss_mb": rss,
        }
        case["floor: encode only (numcodecs)"] = {"seconds": res["numcodecs_seconds"]}
        case["compressed_bytes"] = res["compressed_bytes"]

        if not args.skip_seed:
            print(f"== {kind}: seed method", flush=True)
            target = work / "seed.zarr"
            _, rss, res = _worker(
                "seed",
                cfg=_config(xml, work / "unused", kind),
                plan=str(work / "tilefusion" / "plan.json"),
                target=str(target),
                threads=args.cores,
            )
            case["seed method (torch grid_sample, max)"] = {
                "seconds": res["seconds"],
                "rss_mb": rss,
                "truth": _truth_error(zarr.open_array(str(target), mode="r"), grid),
            }
        if not args.skip_peer:
            print(f"== {kind}: multiview-stitcher", flush=True)
            target = work / "mvs.zarr"
            try:
                _, rss, res = _worker(
                    "mvs", grid=grid, xml=str(xml), target=str(target), threads=args.cores
                )
                mvs_array = zarr.open_array(str(target), mode="r")
                case["multiview-stitcher"] = {
                    "seconds": res["seconds"],
                    "rss_mb": rss,
                    "truth": _truth_error(mvs_array, grid),
                }
            except (RuntimeError, ImportError) as exc:
                case["multiview-stitcher"] = {"error": str(exc)[-500:]}
        if args.rhapso_python and kind == "affine":
            print(f"== {kind}: Rhapso", flush=True)
            case["Rhapso"] = _rhapso(args.rhapso_python, xml, work / "rhapso.zarr", args.cores)
        results["cases"][kind] = case
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    if _cuda_available():
        print("== GPU: kernel and fuse job", flush=True)
        gpu_dir = root / "gpu"
        _, rss, res = _worker("gpu", scale=args.scale, workdir=str(gpu_dir))
        res["job"]["rss_mb"] = rss
        results["gpu"] = res
        shutil.rmtree(gpu_dir, ignore_errors=True)
    if not args.skip_plan:
        print("== planning 10,000 tiles", flush=True)
        _, rss, res = _worker("plan_scale", tiles_per_axis=100)
        res["rss_mb"] = rss
        results["planning"] = res
    return results


# ---------------------------------------------------------------------------
# report

TARGETS = [
    ("tilefusion fuse step", "multiview-stitcher", 8.0),
    ("tilefusion workflow", "multiview-stitcher", 6.0),
    ("tilefusion fuse step", "floor: encode + write (zarr-python)", 0.5),
]


NOTES = [
    "## How a fuse job spends its time, and its memory",
    "",
    "A fuse job fuses the shards of its range on a pool of threads, one per CPU it may"
    " use (`os.sched_getaffinity`). Each thread takes one shard: it reads the tile"
    " crops the shard needs (one read per tile per shard; Zarr chunks are read and"
    " decoded with numcodecs directly, zarr-python only for layouts it does not know),"
    " runs the numba kernel chunk by chunk without the GIL (single-threaded per call,"
    " so the result does not depend on the thread count), rounds into the shard"
    " buffer, then encodes the shard's objects with numcodecs and writes each"
    " atomically (temporary file, fsync, rename), hashing the bytes in memory."
    " Shards are independent, so reading, computing and writing of different shards"
    " overlap and both cores stay busy. numba's kernel is loaded on a background"
    " thread while the job reads its plan. Tiles whose block-to-tile map is an"
    " integer shift (the translation case at native resolution) skip interpolation:"
    " the voxel is copied with its cosine weight, bit-identical to the trilinear path.",
    "",
    "Peak RSS of a fuse job: `R0 + K + T x (S x (b_out + 1) + P x b_in + 2 x 4 x C)`,"
    " with `R0` the interpreter with numpy, numba and numcodecs (about 250 MB here;"
    " torch is imported only on a GPU), `K` the job's cache of decoded tile chunks"
    " (`JOB_CHUNK_CACHE_BYTES`, shared by all its tiles, 0 by default), `T` threads,"
    " `S` voxels per shard, `b_out`/`b_in` bytes per output/input voxel, `P` the"
    " prefetched tile crops of one shard (at most tiles x 8 x `read_block` voxels)"
    " and `C` voxels per chunk (two float32 accumulators). It depends on the shard"
    " and chunk shapes and the tile overlap, never on the dataset's or the range's"
    " size.",
    "",
    "Geometry: every output is compared with the analytic sample at 20,000 random"
    " voxels with data (the tiles carry noise of 8 grey values RMS, so an RMSE near 8"
    " means correctly placed). multiview-stitcher with dask-backed tiles places data"
    " correctly here. The seed method's larger error comes from its semantics (max"
    " blend, zero padding at tile faces), not from misplacement.",
    "",
    "Levers, measured while developing (2 cores, affine case, fuse step output"
    " Mvoxel/s; the machine was busy for some): a thread per core over shards, one"
    " crop read per tile per shard and the GIL-free kernel: 7.7 -> 17.5 (190 Mvoxel"
    " output); the numba kernel rewrite (analytic in-tile ranges, plane interpolation"
    " for rotations about z; 9x per core on one block): 13.5 -> 21.7; not importing"
    " torch in CPU jobs (1.1 s per job): 21.7 -> 40; encoding and writing objects"
    " with numcodecs instead of zarr-python writes (zarr-python's write was 6.7"
    " thread-seconds, ours 3.6 including hashing), reading Zarr crops directly"
    " (1.3-1.45x per CPU-second over zarr-python), ranges of 256 chunks instead of 64"
    " and balanced by voxels (3 jobs instead of 10: fixed costs paid fewer times):"
    " 40 -> 79. The kernel's first load in a process (about 0.4 s) is overlapped"
    " with reading the plan. Then: default ranges of 1024 chunks instead of 256 (one"
    " job here instead of two), fuse step 4.8 -> 4.3 s; cancelling Snakemake's"
    " rate-limiter timer when the run is over (the interpreter waited up to 1 s for"
    " it before exiting): workflow 9.8 -> 7.2 s with the former. Tried and left"
    " off: keeping decoded tile chunks between shards (64-256 MiB per job) halved the"
    " read thread-time but made the job 2-5 % slower (page faults of the churned"
    " buffers slow the kernel and the writes); this machine's two logical cores give"
    " about 1.25x one core's throughput, so thread-seconds per stage double when"
    " both run.",
    "",
    "GPU targets (kernel at 50 % of the device's memory bandwidth, the GPU fuse job"
    " bound by decoding and encoding): not measured. No GPU machine was lent to the"
    " sessions that built this, so the torch kernel has run only on the CPU (its"
    " tests compare it with the numba kernel); `device: auto` picks a free CUDA"
    " device when there is one. `python benchmarks/bench_gpu.py --doc"
    " docs/benchmarks.md` on a GPU machine measures both (the kernel's rate for the"
    " bytes it must move against the device's peak, and a GPU fuse job's"
    " thread-seconds for reading, fusing and writing) and appends them here. The"
    " torch kernel is element-wise tensor code with full-slab temporaries, so"
    " expect it below 50 % of the bandwidth until it is fused into one kernel.",
    "",
    "Where the workflow's time goes (affine case, one run, seconds from the start of"
    " `snakemake`): Snakemake start-up and DAG 1.0, plan (with creating the store,"
    " one process since it was two: -0.25) 0.35, fuse 4.3, assemble 0.3, validate"
    " (reading and hashing every object) 0.75, exit 0.2.",
    "",
]


def report(results: dict[str, Any], command: str) -> str:
    v = _versions()
    lines = [
        "# Benchmarks",
        "",
        "Written by `benchmarks/bench_fusion.py`; rerun it to refresh this page.",
        "",
        f"- Command: `{command}`",
        f"- Date: {datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- Machine: {_machine()}; `--cores {results['cores']}`; "
        f"load average at the end {os.getloadavg()[0]:.1f}",
        "- Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
        f"- Dataset (`--scale {results['scale']}`): 2 x 2 tiles of "
        f"{' x '.join(map(str, results['tile_shape']))} uint16 (zyx, zstd-1 Zarr, chunks "
        "32 x 128 x 128), 20 % overlap, voxels 2.0 x 0.5 x 0.5 um (zyx). `affine`: small "
        "rotations about z and fractional offsets, fused to an isotropic 0.5 um grid. "
        "`translation`: integer offsets, fused at the tiles' own voxel size. "
        f"Output uint16, zstd-1, chunks {' x '.join(map(str, CHUNKS))}"
        f" (tilefusion: shards {' x '.join(map(str, SHARDS))}), one pyramid level.",
        "- numba's cache is filled before anything is timed (compiling took "
        f"{results.get('kernel_compile_seconds', float('nan')):.1f} s; a cold job pays that"
        " once after an install, later jobs load the cache).",
        "",
    ]
    for kind, case in results["cases"].items():
        out_mv = case["out_voxels"] / 1e6
        lines += [
            f"## {kind} case: {' x '.join(map(str, case['grid']['shape']))} output "
            f"({out_mv:.0f} Mvoxel) from {case['in_voxels'] / 1e6:.0f} Mvoxel of tiles",
            "",
            "| method | seconds | output Mvoxel/s | output MB/s | peak RSS MB | "
            "tilefusion fuse step is x faster | error vs truth (RMSE, p99, corr) |",
            "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        ours_rate = out_mv / case["tilefusion fuse step"]["seconds"]
        for name, row in case.items():
            if not isinstance(row, dict) or "seconds" not in row or name == "grid":
                if isinstance(row, dict) and "error" in row:
                    lines.append(f"| {name} | failed: {row['error'][:120]} | | | | | |")
                continue
            sec = row["seconds"]
            rate = row.get("out_voxels", case["out_voxels"]) / 1e6 / sec
            truth = row.get("truth")
            err = (
                f"{truth['rmse']:.1f}, {truth['p99_abs']:.0f}, {truth['corr']:.4f}"
                if truth
                else (row.get("note") or "")
            )
            rss = f"{row['rss_mb']:.0f}" if "rss_mb" in row else ""
            lines.append(
                f"| {name} | {sec:.2f} | {rate:.1f} | {2 * rate:.0f} | {rss} | "
                f"{ours_rate / rate:.2f} | {err} |"
            )
        lines.append("")
        if kind == "affine":
            lines.append("Targets (ratios of throughput in this run):")
        else:
            lines.append(
                "The same ratios, for information (the targets are set for the affine case,"
                " the issue's dataset; here fixed costs weigh more: a quarter of the output"
                " voxels, and reading the tiles is a third of the work):"
            )
        lines.append("")
        for a, b, want in TARGETS:
            if a in case and b in case and "seconds" in case.get(b, {}):
                got = case[b]["seconds"] / case[a]["seconds"]
                ok = "met" if got >= want else "**missed**" if kind == "affine" else "below"
                lines.append(f"- {a} / {b}: {got:.2f} (target >= {want:g}) {ok}")
        rhapso = case.get("Rhapso")
        if rhapso and "seconds" in rhapso:
            same = rhapso["grid"]["shape"] == case["grid"]["shape"] and np.allclose(
                rhapso["grid"]["origin"], case["grid"]["origin"]
            )
            lines += [
                "",
                f"Rhapso: `AffineFusion.run` alone on a Ray cluster of {results['cores']} CPUs"
                f" started beforehand ({rhapso['ray_start_seconds']:.1f} s not counted); its"
                " grid is "
                + ("the same as ours" if same else f"its own ({rhapso['grid']})")
                + "; peak RSS summed over Ray's processes; Blosc zstd-1 output.",
            ]
        for row in case.get("rss by range size", []):
            jobs = row["rss_mb"]
            lines.append(
                f"- Fuse jobs of {row['chunks_per_range']} chunks per range ({row['ranges']}"
                f" jobs): peak RSS {min(jobs):.0f}-{max(jobs):.0f} MB per job."
            )
        fuse = case["tilefusion fuse step"]
        ts = fuse["thread_seconds"]
        total = sum(ts.values()) or 1.0
        lines += [
            "",
            f"Where the fuse step's time goes ({fuse['ranges']} jobs, "
            f"{fuse['seconds']:.1f} s of job time, {fuse['process_seconds']:.1f} s with "
            "process start-up; thread-seconds summed over the job's threads): "
            + ", ".join(f"{k} {v:.1f} s ({100 * v / total:.0f} %)" for k, v in ts.items())
            + ". `read` is reading and decoding tile crops, `fuse` the kernel, rounding and"
            " pixel statistics, `write` encoding, writing, hashing and syncing the shards.",
            "",
        ]
    lines += NOTES
    if results.get("gpu"):
        import bench_gpu

        lines += bench_gpu.report(results["gpu"], command=None).splitlines()
    plan = results.get("planning")
    if plan:
        lines += [
            "## Planning at scale",
            "",
            f"{plan['tiles']} tiles, {plan['chunks']:,} chunks, {plan['ranges']} ranges: "
            f"`make_plan` {plan['plan_seconds']:.1f} s; finding the tiles of every chunk "
            f"(what the manifest and the fuse jobs do) {plan['chunk_tiles_seconds']:.1f} s; "
            f"peak RSS {plan['rss_mb']:.0f} MB.",
            "",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "worker":
        result = WORKERS[argv[1]](**json.loads(argv[2]))
        print(json.dumps(result))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=sorted(SCALES), default="full")
    parser.add_argument("--cases", nargs="+", default=["affine", "translation"])
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "tilefusion-bench"))
    parser.add_argument("--doc", default=str(REPO / "docs" / "benchmarks.md"))
    parser.add_argument("--json", default=None, help="also write the raw results here")
    parser.add_argument("--skip-peer", action="store_true")
    parser.add_argument("--skip-seed", action="store_true")
    parser.add_argument("--skip-plan", action="store_true")
    parser.add_argument(
        "--rhapso-python",
        default=None,
        help="interpreter of a virtual environment with Rhapso (see peer_rhapso.py); "
        "Rhapso is skipped without it",
    )
    parser.add_argument("--keep", action="store_true", help="keep the outputs")
    parser.add_argument(
        "--from-json",
        nargs="+",
        default=None,
        help="only rewrite the report from earlier --json results (later files add sections)",
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("NUMBA_NUM_THREADS", str(args.cores))
    if args.from_json:
        results = json.loads(Path(args.from_json[0]).read_text())
        for extra in args.from_json[1:]:
            more = json.loads(Path(extra).read_text())
            results.setdefault("planning", more.get("planning"))
        argv = results.get("argv", argv)
    else:
        results = run(args)
        results["argv"] = argv
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    command = "python benchmarks/bench_fusion.py " + " ".join(argv)
    text = report(results, command.strip())
    Path(args.doc).parent.mkdir(parents=True, exist_ok=True)
    Path(args.doc).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
