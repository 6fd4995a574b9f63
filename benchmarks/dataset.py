"""The benchmark dataset: overlapping uint16 tiles in a BigStitcher XML.

Tiles are 2 x 2 (y, x) with 20 % overlap, anisotropic voxels (z 4x coarser),
stored as Zarr v2 arrays with zstd-1 chunks, and described by a real
BigStitcher XML (``bdv.multimg.zarr``) with a calibration and a registration.
The ``affine`` kind gives each tile a small rotation about z and fractional
offsets; the ``translation`` kind uses integer offsets and no rotation, so
fusing at the tiles' own voxel size needs no interpolation.

The sample is a sum of plane waves of 4-40 um wavelength plus a little noise,
defined in physical coordinates, so overlapping tiles agree and a misplaced
output shows up as a drop in correlation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numcodecs
import numpy as np
import zarr

from tilefusion import geometry
from tilefusion.readers.bdv_xml import BdvViewSpec, write_bdv_xml

SCALES = {
    # tile shape (z, y, x); output is about 4 x 1.8 x 1.8 times one tile.
    "small": (48, 192, 192),
    "medium": (96, 384, 384),
    "full": (128, 512, 512),
}
VOXEL_ZYX = (2.0, 0.5, 0.5)
TILE_CHUNKS = (32, 128, 128)
_SEED = 11


@dataclass(frozen=True)
class BenchSpec:
    tile_shape_zyx: tuple[int, int, int]
    kind: str = "affine"  # or "translation"
    tiles_yx: tuple[int, int] = (2, 2)
    overlap: float = 0.2
    max_rotation_deg: float = 2.0


def _waves() -> np.ndarray:
    rng = np.random.default_rng(_SEED)
    n = 8
    directions = rng.normal(size=(n, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    wavelengths = rng.uniform(4.0, 40.0, size=n)
    k = directions * (2 * math.pi / wavelengths)[:, None]
    phases = rng.uniform(0, 2 * math.pi, size=n)
    amps = rng.uniform(100.0, 400.0, size=n)
    return np.column_stack([k, phases, amps])


def sample(points_zyx: np.ndarray) -> np.ndarray:
    """The noiseless sample at physical points (..., 3), micrometers."""
    out = np.full(points_zyx.shape[:-1], 300.0)
    for kz, ky, kx, phase, amp in _waves():
        arg = points_zyx[..., 0] * kz + points_zyx[..., 1] * ky + points_zyx[..., 2] * kx
        out += amp * (1.0 + np.cos(arg + phase)) / 2
    return out


def chains(spec: BenchSpec) -> list[list[tuple[str, np.ndarray]]]:
    """Per tile, its chain in XML order (world unit = the smallest voxel size)."""
    voxel = np.array(VOXEL_ZYX)
    calibration = voxel / voxel.min()
    shape = np.array(spec.tile_shape_zyx, dtype=np.float64)
    extent = (shape - 1) * calibration
    step = extent * (1.0 - spec.overlap)
    rng = np.random.default_rng(_SEED + 1)
    out = []
    for row in range(spec.tiles_yx[0]):
        for col in range(spec.tiles_yx[1]):
            offset = np.array([0.0, row * step[1], col * step[2]])
            if spec.kind == "translation":
                registration = geometry.translation(np.round(offset))
            else:
                angle = math.radians(rng.uniform(-spec.max_rotation_deg, spec.max_rotation_deg))
                jitter = rng.uniform(-3, 3, size=3) * np.array([1, 1, 1])
                rot = np.eye(4)
                rot[1, 1], rot[1, 2] = math.cos(angle), -math.sin(angle)
                rot[2, 1], rot[2, 2] = math.sin(angle), math.cos(angle)
                centre = extent / 2
                rotation = geometry.translation(centre) @ rot @ geometry.translation(-centre)
                registration = geometry.translation(offset + jitter) @ rotation
            out.append(
                [
                    ("Registration", registration),
                    ("calibration", geometry.scale(calibration)),
                ]
            )
    return out


def write_dataset(folder: Path, spec: BenchSpec) -> Path:
    """Write tiles and XML under ``folder``; return the XML path (reused if present)."""
    folder.mkdir(parents=True, exist_ok=True)
    xml = folder / "dataset.xml"
    if xml.exists():
        return xml
    world_unit = min(VOXEL_ZYX)
    rng = np.random.default_rng(_SEED + 2)
    specs = []
    for setup, chain in enumerate(chains(spec)):
        model = geometry.compose(*(a for _, a in chain))
        nz, ny, nx = spec.tile_shape_zyx
        path = folder / f"tile{setup}.zarr"
        group = zarr.open_group(str(path), mode="w", zarr_format=2)
        array = group.create_array(
            "0",
            shape=spec.tile_shape_zyx,
            chunks=TILE_CHUNKS,
            dtype="uint16",
            fill_value=0,
            compressors=numcodecs.Zstd(level=1),
        )
        yy, xx = np.meshgrid(np.arange(ny, dtype=np.float64), np.arange(nx), indexing="ij")
        for z0 in range(0, nz, TILE_CHUNKS[0]):
            z1 = min(z0 + TILE_CHUNKS[0], nz)
            block = np.empty((z1 - z0, ny, nx), dtype=np.uint16)
            for z in range(z0, z1):
                pts = np.stack([np.full_like(yy, z), yy, xx], axis=-1)
                phys = (pts @ model[:3, :3].T + model[:3, 3]) * world_unit
                values = sample(phys) + rng.normal(0.0, 8.0, size=yy.shape)
                block[z - z0] = np.clip(np.rint(values), 1, 65535)
            array[z0:z1] = block
        specs.append(
            BdvViewSpec(
                setup=setup,
                timepoint=0,
                shape_zyx=spec.tile_shape_zyx,
                voxel_size_zyx=VOXEL_ZYX,
                chain=chain,
                location=path.name,
                attributes={"channel": 0, "illumination": 0, "tile": setup, "angle": 0},
            )
        )
    write_bdv_xml(xml, specs, unit="micrometer")
    return xml
