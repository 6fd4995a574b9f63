"""A synthetic BigStitcher dataset with an analytic ground truth.

The sample is a sum of smooth Gaussian blobs on a constant background,
defined in physical coordinates (micrometers). Each tile samples it at its
voxel centres through a known chain: a small rotation about z and a
translation to its place on a grid (the registration), after BigStitcher's
``calibration`` (anisotropic voxels). The result is a real BigStitcher XML
with ``bdv.multimg.zarr`` tiles, so the demo exercises the same reader,
planner and kernel as users' data, and fused values can be compared with
:func:`ground_truth`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
from numpy.typing import NDArray

from tilefusion import geometry
from tilefusion.config import DEMO_DATASET
from tilefusion.readers.base import ArraySource, Dataset, View

__all__ = ["DEMO_DATASET", "DemoSpec", "demo_dataset", "ground_truth", "write_demo"]

"""Where the workflow generates the demo (``demo: true``), relative to its working directory."""

_RNG_SEED = 7


@dataclass(frozen=True)
class DemoSpec:
    """Shape of the demo acquisition.

    Attributes
    ----------
    tiles_yx : tuple of int
        Tiles along y and x.
    tile_shape_zyx : tuple of int
        Voxels per tile.
    voxel_size_zyx : tuple of float
        Micrometers; anisotropic like a light-sheet stack.
    overlap : float
        Fraction of a tile shared with its neighbour.
    max_rotation_deg : float
        Largest rotation about z of a tile.
    """

    tiles_yx: tuple[int, int] = (2, 2)
    tile_shape_zyx: tuple[int, int, int] = (40, 96, 96)
    voxel_size_zyx: tuple[float, float, float] = (2.0, 0.5, 0.5)
    overlap: float = 0.2
    max_rotation_deg: float = 2.0


def _blobs(spec: DemoSpec) -> NDArray[np.float64]:
    rng = np.random.default_rng(_RNG_SEED)
    extent = np.array(spec.tile_shape_zyx) * np.array(spec.voxel_size_zyx)
    span = extent * np.array([1.0, spec.tiles_yx[0], spec.tiles_yx[1]])
    n = 24 * spec.tiles_yx[0] * spec.tiles_yx[1]
    centres = rng.uniform(-0.1, 1.1, size=(n, 3)) * span
    # Wide enough in z (sigma >= 2.5 voxels of 2 um) that linear interpolation is accurate.
    sigmas = rng.uniform(5.0, 9.0, size=n)
    amplitudes = rng.uniform(400.0, 1500.0, size=n)
    return np.column_stack([centres, sigmas, amplitudes])


def ground_truth(
    points_zyx: NDArray[np.float64], spec: DemoSpec = DemoSpec()
) -> NDArray[np.float64]:
    """The sample's intensity at physical points (N, 3), micrometers, zyx."""
    pts = np.asarray(points_zyx, dtype=np.float64).reshape(-1, 3)
    out = np.full(len(pts), 100.0)
    for cz, cy, cx, sigma, amp in _blobs(spec):
        d2 = (pts[:, 0] - cz) ** 2 + (pts[:, 1] - cy) ** 2 + (pts[:, 2] - cx) ** 2
        out += amp * np.exp(-d2 / (2.0 * sigma * sigma))
    return out


def _rotation_z(angle_deg: float, centre_zyx: NDArray[np.float64]) -> geometry.Affine:
    a = math.radians(angle_deg)
    rot = np.eye(4)
    # rotation in the yx plane (about the z axis)
    rot[1, 1], rot[1, 2] = math.cos(a), -math.sin(a)
    rot[2, 1], rot[2, 2] = math.sin(a), math.cos(a)
    return geometry.translation(centre_zyx) @ rot @ geometry.translation(-centre_zyx)


def _chains(spec: DemoSpec) -> list[tuple[int, int, list[tuple[str, geometry.Affine]]]]:
    """Per tile: (row, column, chain in XML order) in world units."""
    voxel = np.array(spec.voxel_size_zyx)
    calibration = voxel / voxel.min()
    shape = np.array(spec.tile_shape_zyx, dtype=np.float64)
    extent_world = (shape - 1) * calibration
    step = extent_world * (1.0 - spec.overlap)
    rng = np.random.default_rng(_RNG_SEED + 1)
    out = []
    for row in range(spec.tiles_yx[0]):
        for col in range(spec.tiles_yx[1]):
            angle = float(rng.uniform(-spec.max_rotation_deg, spec.max_rotation_deg))
            offset = np.array([0.0, row * step[1], col * step[2]])
            registration = geometry.translation(offset) @ _rotation_z(angle, extent_world / 2)
            chain = [
                ("Rotation and translation", registration),
                ("calibration", geometry.scale(calibration)),
            ]
            out.append((row, col, chain))
    return out


def demo_dataset(xml_path: str | Path, spec: DemoSpec = DemoSpec()) -> Dataset:
    """The demo's views as :func:`write_demo` writes them, without writing anything."""
    xml_path = Path(xml_path).resolve()
    voxel = tuple(float(v) for v in spec.voxel_size_zyx)
    calibration = np.array(voxel) / min(voxel)
    views = []
    for setup, (_row, _col, chain) in enumerate(_chains(spec)):
        views.append(
            View(
                setup=setup,
                timepoint=0,
                shape_zyx=spec.tile_shape_zyx,
                voxel_size_zyx=voxel,  # type: ignore[arg-type]
                model=geometry.compose(*(a for _, a in chain)),
                source=ArraySource("zarr", str(xml_path.parent / f"tile{setup}.zarr")),
                attributes={"channel": 0, "illumination": 0, "tile": setup, "angle": 0},
                calibration_zyx=tuple(calibration.tolist()),
                dtype="uint16",
            )
        )
    return Dataset(str(xml_path), "micrometer", tuple(views))


def tile_values(view: View, spec: DemoSpec = DemoSpec()) -> NDArray[np.uint16]:
    """A tile's pixels: the ground truth at its voxel centres, rounded."""
    world_unit = min(spec.voxel_size_zyx)
    zz, yy, xx = np.meshgrid(
        *(np.arange(n, dtype=np.float64) for n in view.shape_zyx), indexing="ij"
    )
    voxels = np.column_stack([zz.ravel(), yy.ravel(), xx.ravel()])
    physical = geometry.transform_points(view.model, voxels) * world_unit
    values = ground_truth(physical, spec).reshape(view.shape_zyx)
    return np.clip(np.rint(values), 0, 65535).astype(np.uint16)


def write_demo(xml_path: str | Path, spec: DemoSpec = DemoSpec()) -> Dataset:
    """Write the demo's tiles (Zarr) and BigStitcher XML; return its dataset."""
    from tilefusion.readers.bdv_xml import BdvViewSpec, write_bdv_xml

    xml_path = Path(xml_path).resolve()
    xml_path.parent.mkdir(parents=True, exist_ok=True)
    dataset = demo_dataset(xml_path, spec)
    chains = _chains(spec)
    for view in dataset.views:
        group = zarr.open_group(view.source.path, mode="w", zarr_format=2)
        array = group.create_array(
            "0", shape=view.shape_zyx, chunks=(32, 64, 64), dtype="uint16", fill_value=0
        )
        array[...] = tile_values(view, spec)
    specs = [
        BdvViewSpec(
            setup=view.setup,
            timepoint=view.timepoint,
            shape_zyx=view.shape_zyx,
            voxel_size_zyx=view.voxel_size_zyx,
            chain=chain,
            location=Path(view.source.path).name,
            attributes=dict(view.attributes),
        )
        for view, (_row, _col, chain) in zip(dataset.views, chains)
    ]
    write_bdv_xml(xml_path, specs, unit="micrometer")
    return dataset
