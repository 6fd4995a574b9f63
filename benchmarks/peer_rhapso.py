"""Fuse a BigStitcher XML with Rhapso's affine fusion, a peer for ``bench_fusion.py``.

Runs under Rhapso's own virtual environment, not tilefusion's (Rhapso pins Ray 2.9.1,
scipy 1.13.1 and dask 2024.12.1, and resolves to numpy 1.26)::

    python -m venv /tmp/rhapso-venv
    /tmp/rhapso-venv/bin/pip install Rhapso==0.4.5 pyarrow==17.0.0  # newer pyarrow: numpy 2
    /tmp/rhapso-venv/bin/python benchmarks/peer_rhapso.py --xml X --out OUT.zarr --cores 2

It calls ``Rhapso.pipelines.ray.affine_fusion.AffineFusion`` (linear interpolation,
``avg_blend``: linear ramps of 40 output voxels at tile faces) on a local Ray cluster
of ``--cores`` CPUs. Rhapso reads tiles as 5D (t, c, z, y, x) arrays at
``<prefix>/<zgroup path>/0``; 3D Zarr v2 tiles (``benchmarks/dataset.py``) are shown
to it as 5D arrays whose chunk files are symlinks to the originals (no copy).

Rhapso fuses in world coordinates, one voxel per world unit, over the bounding box
``floor(min)..ceil(max)`` of the tiles' transformed voxel centres: output voxel
(x, y, z) is world point ``bb_min + (x, y, z)``. The world unit is taken from the XML's
``calibration`` transform (voxel size / calibration scale); for another
``--resolution`` a scale is prepended to every view's registration in a copy of the XML.
The output is ``<out>/0``, uint16 (1, 1, z, y, x), Blosc-compressed Zarr.

Prints one JSON line: ``seconds`` (``AffineFusion.run`` alone), ``ray_start_seconds``
(``ray.init`` and importing Rhapso in the workers), ``total_seconds`` (from the first
line of this script), ``output``, ``grid`` (``shape``/``origin``/``scale``, zyx,
physical units, for the output's last three axes), CPU seconds and peak memory of the
process tree (Ray's processes included; the fusion phase for CPU).
"""

from __future__ import annotations

import time

_T0 = time.perf_counter()

import argparse  # noqa: E402
import contextlib  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import xml.etree.ElementTree as ET  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import ray  # noqa: E402
from Rhapso.affine_fusion.compute_bbox import ComputeBBox  # noqa: E402
from Rhapso.pipelines.ray.affine_fusion import AffineFusion  # noqa: E402

_CHUNK_KEY = re.compile(r"^\d+(\.\d+)*$")


def _zarr_dir(xml: Path, root: ET.Element) -> Path:
    """The folder the XML's ``zgroup`` paths are relative to."""
    loader = root.find("./SequenceDescription/ImageLoader")
    node = loader.find("./zarr") if loader is not None else None
    base = xml.parent
    if node is not None and node.text:
        rel = node.get("type", "relative") == "relative"
        base = base / node.text.strip() if rel else Path(node.text.strip())
    return base.resolve()


def _world_unit(root: ET.Element) -> float:
    """Physical size of one world unit: voxel size over the calibration scale (x)."""
    units = []
    for setup in root.findall("./SequenceDescription/ViewSetups/ViewSetup"):
        sid = setup.findtext("./id")
        voxel = [float(v) for v in setup.findtext("./voxelSize/size", "1 1 1").split()]
        unit = min(voxel)  # BigStitcher's default when there is no calibration transform
        for reg in root.findall(f"./ViewRegistrations/ViewRegistration[@setup='{sid}']"):
            for vt in reg.findall("./ViewTransform"):
                if (vt.findtext("./Name") or "").strip().lower() == "calibration":
                    unit = voxel[0] / float((vt.findtext("./affine") or "1").split()[0])
        units.append(unit)
    if not np.allclose(units, units[0]):
        raise ValueError(f"views disagree on the world unit: {sorted(set(units))}")
    return units[0]


def _rescaled_xml(xml: Path, root: ET.Element, factor: float, target: Path) -> Path:
    """A copy of the XML with ``scale(factor)`` prepended to every registration."""
    affine = f"{factor!r} 0.0 0.0 0.0 0.0 {factor!r} 0.0 0.0 0.0 0.0 {factor!r} 0.0"
    for reg in root.findall("./ViewRegistrations/ViewRegistration"):
        vt = ET.Element("ViewTransform", {"type": "affine"})
        ET.SubElement(vt, "Name").text = "rescale to output resolution"
        ET.SubElement(vt, "affine").text = affine
        reg.insert(0, vt)
    ET.ElementTree(root).write(target, encoding="utf-8", xml_declaration=True)
    return target


def _five_d_inputs(zarr_dir: Path, paths: list[str], target: Path) -> Path:
    """Show 3D Zarr v2 tiles as 5D (1, 1, z, y, x) arrays by symlinking their chunks."""
    for rel in paths:
        src = zarr_dir / rel / "0"
        meta = json.loads((src / ".zarray").read_text())
        if meta.get("zarr_format") != 2 or len(meta["shape"]) not in (3, 5):
            raise ValueError(f"{src}: expected a 3D or 5D Zarr v2 array")
        dst = target / rel / "0"
        dst.mkdir(parents=True)
        (target / rel / ".zgroup").write_text(json.dumps({"zarr_format": 2}))
        if len(meta["shape"]) == 5:
            dst.rmdir()
            dst.symlink_to(src)
            continue
        sep = meta.get("dimension_separator", ".")
        if sep != ".":
            raise ValueError(f"{src}: only '.'-separated chunk keys are supported")
        meta["shape"] = [1, 1, *meta["shape"]]
        meta["chunks"] = [1, 1, *meta["chunks"]]
        (dst / ".zarray").write_text(json.dumps(meta))
        for entry in os.scandir(src):
            if _CHUNK_KEY.match(entry.name):
                (dst / f"0.0.{entry.name}").symlink_to(entry.path)
    return target


def _tree_cpu_seconds() -> float:
    """User + system CPU seconds of this process and its live descendants."""
    me = psutil.Process()
    total = 0.0
    for p in [me, *me.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            times = p.cpu_times()
            total += times.user + times.system
    return total


class _TreeMemory:
    """Peak summed RSS of this process and its descendants (Ray's too), sampled."""

    def __init__(self, interval: float = 0.1) -> None:
        self.interval = interval
        self.peak = 0
        self.peak_single = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> int:
        me = psutil.Process()
        total = 0
        for p in [me, *me.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                rss = p.memory_info().rss
                total += rss
                self.peak_single = max(self.peak_single, rss)
        self.peak = max(self.peak, total)
        return total

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> _TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


@ray.remote
def _warm_worker() -> int:
    """Import what the fusion tasks import, so worker start-up is not timed."""
    import Rhapso.affine_fusion.fuse_cell
    import Rhapso.affine_fusion.generate_fusion_instructions  # noqa: F401
    import scipy.ndimage  # noqa: F401
    import zarr  # noqa: F401

    time.sleep(0.5)  # keep this worker busy so the next task lands on another
    return os.getpid()


def fuse(args: argparse.Namespace) -> dict[str, Any]:
    xml = Path(args.xml).resolve()
    out = Path(args.out).resolve()
    root = ET.parse(xml).getroot()
    zarr_dir = _zarr_dir(xml, root)
    paths = [
        (zg.get("path") or zg.findtext("./path") or "").strip()
        for zg in root.findall("./SequenceDescription/ImageLoader/zgroups/zgroup")
    ]
    world_unit = _world_unit(root)
    resolution = args.resolution or world_unit
    if out.exists():
        shutil.rmtree(out)
    work = Path(tempfile.mkdtemp(prefix="rhapso-input-"))
    try:
        prefix = _five_d_inputs(zarr_dir, paths, work / "tiles")
        factor = world_unit / resolution
        fuse_xml = xml
        if not np.isclose(factor, 1.0):
            fuse_xml = _rescaled_xml(xml, root, factor, work / "dataset.xml")
        bb_min, bb_max, _ = ComputeBBox(str(fuse_xml), str(prefix)).run()
        dims_xyz = bb_max - bb_min + 1
        fusion = AffineFusion(
            aligned_xml_path=str(fuse_xml),
            zarr_input_prefix=str(prefix),
            output_path=str(out),
            block_size=list(args.block_size),
            output_block_size=list(args.chunks[::-1]),  # Rhapso takes xyz
            intensity_range=[0, 65535],  # unused by Rhapso 0.4.5
            overlap_strategy=args.strategy,
            output_zarr_version=args.zarr_version,
            compressor_cname=args.cname,
            compressor_clevel=args.clevel,
            compressor_shuffle=args.shuffle,
        )
        with _TreeMemory() as memory:
            start = time.perf_counter()
            ray.init(
                num_cpus=args.cores,
                include_dashboard=False,
                log_to_driver=False,
                configure_logging=False,
            )
            pids = ray.get([_warm_worker.remote() for _ in range(args.cores)])
            ray_start = time.perf_counter() - start
            idle_rss = memory.sample()
            # AffineFusion calls a bare ray.init(); let it find the cluster started above.
            original_init = ray.init
            ray.init = functools.partial(original_init, ignore_reinit_error=True)
            try:
                cpu = _tree_cpu_seconds()
                start = time.perf_counter()
                with contextlib.redirect_stdout(sys.stderr):
                    fusion.run()
                seconds = time.perf_counter() - start
                cpu = _tree_cpu_seconds() - cpu
            finally:
                ray.init = original_init
                ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    shape_zyx = [int(d) for d in dims_xyz[::-1]]
    return {
        "seconds": seconds,
        "ray_start_seconds": ray_start,
        "total_seconds": time.perf_counter() - _T0,
        "output": str(out / "0"),
        "output_ndim": 5,
        "grid": {
            "shape": shape_zyx,
            "origin": [float(resolution * b) for b in bb_min[::-1]],
            "scale": [float(resolution)] * 3,
        },
        "out_voxels": int(np.prod(shape_zyx)),
        "mvoxel_per_s": float(np.prod(shape_zyx)) / seconds / 1e6,
        "cpu_seconds": cpu,
        "load_average": os.getloadavg()[0],
        "world_unit": world_unit,
        "cores": args.cores,
        "ray_workers": len(set(pids)),
        "block_size_xyz": list(args.block_size),
        "chunks_zyx": list(args.chunks),
        "compressor": f"blosc {args.cname}-{args.clevel} {args.shuffle}",
        "zarr_format": args.zarr_version,
        "strategy": args.strategy,
        "peak_rss_mb_tree": memory.peak / 2**20,
        "peak_rss_mb_one_process": memory.peak_single / 2**20,
        "idle_rss_mb_tree": idle_rss / 2**20,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--xml", required=True, help="BigStitcher XML (bdv.multimg.zarr)")
    parser.add_argument("--out", required=True, help="output Zarr group (replaced)")
    parser.add_argument(
        "--resolution", type=float, default=None, help="isotropic output voxel (default: world)"
    )
    parser.add_argument("--cores", type=int, default=2, help="Ray CPUs (concurrent tasks)")
    parser.add_argument(
        "--block-size",
        type=int,
        nargs=3,
        default=(256, 256, 128),
        help="voxels per Ray task, xyz (a multiple of --chunks)",
    )
    parser.add_argument("--chunks", type=int, nargs=3, default=(64, 128, 128), help="zyx")
    parser.add_argument(
        "--strategy", default="avg_blend", choices=["avg_blend", "lowest_view_wins", "max_blend"]
    )
    parser.add_argument("--zarr-version", type=int, default=2, choices=[2, 3])
    parser.add_argument("--cname", default="zstd", help="Blosc codec")
    parser.add_argument("--clevel", type=int, default=1)
    parser.add_argument(
        "--shuffle", default="shuffle", choices=["noshuffle", "shuffle", "bitshuffle"]
    )
    args = parser.parse_args(argv)
    for block, chunk in zip(args.block_size, args.chunks[::-1]):
        if block % chunk:
            parser.error("--block-size must be a multiple of --chunks (xyz vs zyx)")
    print(json.dumps(fuse(args)))


if __name__ == "__main__":
    main()
