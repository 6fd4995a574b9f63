"""Fusion throughput with a flow field against the affine path (issue 14).

Two overlapping uint16 tiles under the same affine chain (a translation and
a 2-degree rotation about z), once as is and once with a smooth displacement
field of up to 3 voxels before it (numerically inverted, or given as a
bijection). Each case plans the same grid, fuses every range with the fuse
step's code (``fuse_range``, CPU, the job's threads) and reports output
Mvoxel/s; the flow cases also as a fraction of the affine one.

    python benchmarks/bench_flow.py [--shape Z Y X] [--repeat N] [--threads T]
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from tilefusion.fuse import FusionOptions, fuse_range
from tilefusion.plan import make_plan
from tilefusion.readers.arrays import register_memory_array
from tilefusion.readers.manifest import read_tile_manifest
from tilefusion.store import FormatV05, prepare_store


def _field(folder: Path, shape: tuple[int, int, int], name: str, inverse: bool) -> str:
    spacing = 4.0
    origin = np.array([-8.0, -8.0, -8.0])
    n = tuple(math.ceil((s + 16) / spacing) + 1 for s in shape)
    axes = [origin[d] + spacing * np.arange(n[d]) for d in range(3)]
    nodes = np.stack([g.ravel() for g in np.meshgrid(*axes, indexing="ij")], axis=1)
    k = 2 * math.pi / 96.0

    def disp(p: np.ndarray) -> np.ndarray:
        return (3.0 / math.sqrt(2.0)) * np.stack(
            [np.sin(k * p[:, 2]), np.cos(k * p[:, 0] + k * p[:, 2]), np.sin(k * p[:, 1])], axis=1
        )

    values = disp(nodes)
    if inverse:
        q = nodes.copy()
        for _ in range(100):
            q = nodes - disp(q)
        values = q - nodes
    group = zarr.open_group(str(folder / name), mode="w", zarr_format=3)
    group.create_array("0", data=np.moveaxis(values.reshape((*n, 3)), -1, 0), chunks=(3, *n))
    axes_meta: list[dict[str, Any]] = [{"name": "d", "type": "displacement"}]
    axes_meta += [{"name": a, "type": "space"} for a in "zyx"]
    group.attrs["ome"] = {
        "version": "0.6",
        "multiscales": [
            {
                "axes": axes_meta,
                "datasets": [
                    {
                        "path": "0",
                        "coordinateTransformations": [
                            {"type": "scale", "scale": [1.0, spacing, spacing, spacing]},
                            {"type": "translation", "translation": [0.0, *origin.tolist()]},
                        ],
                    }
                ],
            }
        ],
    }
    return name


def _manifest(folder: Path, shape: tuple[int, int, int], flow: str) -> Path:
    rng = np.random.default_rng(0)
    angle = math.radians(2.0)
    rotation = [
        [1, 0, 0, 0],
        [0, math.cos(angle), -math.sin(angle), 0],
        [0, math.sin(angle), math.cos(angle), 0],
    ]
    item: dict[str, Any] | None = None
    if flow == "numeric":
        item = {"displacements": {"path": _field(folder, shape, "f.ome.zarr", False)}}
    elif flow == "bijection":
        item = {
            "bijection": {
                "forward": {"displacements": {"path": _field(folder, shape, "f.ome.zarr", False)}},
                "inverse": {"displacements": {"path": _field(folder, shape, "i.ome.zarr", True)}},
            }
        }
    tiles = []
    for t in range(2):
        name = f"bench-flow-{flow}-{t}"
        register_memory_array(name, rng.integers(100, 4000, size=shape, dtype=np.uint16))
        chain: list[dict[str, Any]] = [
            {"translation": [0.0, 0.0, t * 0.8 * shape[2]]},
            {"affine_zyx": rotation},
        ]
        if item is not None:
            chain.append(item)
        tiles.append(
            {"path": name, "format": "memory", "voxel_size": [1, 1, 1], "transforms": chain}
        )
    path = folder / f"{flow}.yaml"
    path.write_text(json.dumps({"tiles": tiles}))
    return path


def run(shape: tuple[int, int, int], repeat: int, threads: int | None) -> dict[str, float]:
    rates: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for flow in ("affine", "numeric", "bijection"):
            dataset = read_tile_manifest(_manifest(folder, shape, flow))
            plan = make_plan(dataset, chunks_zyx=(64, 128, 128), use_stored_levels=False)
            options = FusionOptions(device="cpu", threads=threads)
            best = math.inf
            for k in range(repeat + 1):  # the first run compiles and reads the fields
                store = folder / f"{flow}-{k}.zarr"
                prepare_store(plan, store, ngff=FormatV05(), dtype="uint16", identity=flow)
                start = time.perf_counter()
                for r in range(plan.grid.n_ranges):
                    fuse_range(plan, r, store_path=str(store), options=options)
                if k:
                    best = min(best, time.perf_counter() - start)
            rates[flow] = math.prod(plan.shape_zyx) / best / 1e6
            print(f"{flow:10s} {plan.shape_zyx} {rates[flow]:8.2f} Mvoxel/s", flush=True)
    for flow in ("numeric", "bijection"):
        print(f"{flow}: {rates[flow] / rates['affine']:.2f} of the affine path's throughput")
    return rates


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", nargs=3, type=int, default=(64, 256, 256))
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    run(tuple(args.shape), args.repeat, args.threads)  # type: ignore[arg-type]
