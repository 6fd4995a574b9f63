"""Deskew and anisotropy: a stage-scan tile fused to an isotropic grid matches the truth."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr

from tilefusion import geometry
from tilefusion.fuse import FusionOptions, fuse_range, tile_crop_bounds
from tilefusion.kernel import TileCrop, fuse_block
from tilefusion.plan import make_plan, post_transform_affine
from tilefusion.readers.arrays import forget_memory_array, register_memory_array
from tilefusion.readers.manifest import read_tile_manifest
from tilefusion.store import FormatV05, prepare_store
from tilefusion.transforms import ParseContext, deskew_matrix, parse_transform

ANGLE = 30.0
STAGE_STEP = 1.0  # um: the tile's z voxel size
PIXEL = 0.5  # um
RAW_SHAPE = (40, 24, 48)
BLOBS = [((10.0, 6.0, 14.0), 2500.0), ((8.0, 5.0, 30.0), 1800.0), ((11.0, 7.0, 44.0), 2000.0)]
SIGMA = 3.0  # um


def _truth(points_zyx: np.ndarray) -> np.ndarray:
    """The sample: a dim background and smooth blobs, in the final (deskewed) frame, um."""
    value = np.full(len(points_zyx), 100.0)
    for centre, height in BLOBS:
        d2 = np.sum((points_zyx - np.asarray(centre)) ** 2, axis=1)
        value += height * np.exp(-d2 / (2 * SIGMA**2))
    return value


def test_deskew_matrix_is_the_documented_shear() -> None:
    a = math.radians(ANGLE)
    m = deskew_matrix(ANGLE, scan_axis="x")
    # plane k at stage position z = k * step: height sin(a) z, x shifted by cos(a) z
    np.testing.assert_allclose(
        geometry.transform_points(m, [[2.0, 3.0, 5.0]]),
        [[2 * math.sin(a), 3.0, 5 + 2 * math.cos(a)]],
    )
    m_y = deskew_matrix(ANGLE, scan_axis="y", sign=-1)
    np.testing.assert_allclose(
        geometry.transform_points(m_y, [[2.0, 3.0, 5.0]]),
        [[2 * math.sin(a), 3 - 2 * math.cos(a), 5.0]],
    )
    rotated = deskew_matrix(ANGLE, rotate=True)
    # the rotation keeps lengths: the sheet's in-plane x axis stays a unit vector
    assert np.linalg.norm(rotated[:3, 2]) == pytest.approx(1.0)
    anis = parse_transform({"anisotropy": 2.5}, ParseContext("m.yaml", "t"))
    np.testing.assert_allclose(anis.as_affine(), np.diag([2.5, 1.0, 1.0, 1.0]))


@pytest.mark.parametrize("rotate", [False, True])
def test_stage_scan_fused_to_an_isotropic_grid(tmp_path: Path, rotate: bool) -> None:
    deskew = deskew_matrix(ANGLE, scan_axis="x", rotate=rotate)
    k, j, i = np.meshgrid(*[np.arange(n) for n in RAW_SHAPE], indexing="ij")
    physical = np.stack([k * STAGE_STEP, j * PIXEL, i * PIXEL], axis=-1).reshape(-1, 3)
    raw = _truth(geometry.transform_points(deskew, physical)).reshape(RAW_SHAPE)
    name = f"stage-scan-{rotate}"
    register_memory_array(name, raw.astype(np.float32))
    try:
        manifest = tmp_path / "tiles.yaml"
        tile = {
            "path": name,
            "format": "memory",
            "voxel_size": [STAGE_STEP, PIXEL, PIXEL],
            "transforms": [
                {"deskew": {"angle": ANGLE, "scan_axis": "x", "rotate": rotate}},
                {"scale": [STAGE_STEP / PIXEL, 1.0, 1.0], "name": "calibration"},
            ],
        }
        manifest.write_text(yaml.safe_dump({"unit": "micrometer", "tiles": [tile]}))
        dataset = read_tile_manifest(manifest)
        plan = make_plan(dataset, chunks_zyx=(16, 32, 32), use_stored_levels=False)
        assert plan.world_unit_zyx == (PIXEL, PIXEL, PIXEL)
        store = tmp_path / "out.zarr"
        prepare_store(plan, store, ngff=FormatV05(), dtype="float32", identity="t")
        options = FusionOptions(blending="cosine", device="cpu")
        for r in range(plan.grid.n_ranges):
            fuse_range(plan, r, store_path=str(store), options=options)
        out = zarr.open_array(str(store / "0"), mode="r")[:]

        # Compare where the tile holds data, away from its faces.
        grid = np.stack(np.meshgrid(*[np.arange(n) for n in out.shape], indexing="ij"), -1)
        grid = grid.reshape(-1, 3).astype(float)
        world = grid * np.asarray(plan.resolution_zyx) + np.asarray(plan.origin_zyx)
        raw_index = geometry.transform_points(geometry.invert(deskew), world) / np.asarray(
            [STAGE_STEP, PIXEL, PIXEL]
        )
        inside = np.all((raw_index >= 2) & (raw_index <= np.asarray(RAW_SHAPE) - 3), axis=1)
        assert inside.sum() > 10_000
        truth = _truth(world[inside])
        got = out.reshape(-1)[inside]
        rmse = float(np.sqrt(np.mean((got - truth) ** 2)) / np.sqrt(np.mean(truth**2)))
        print(f"deskew rotate={rotate}: relative RMSE {rmse:.4f}")
        assert rmse <= 0.02, rmse

        # The brightest blob lands where it should, to a tenth of an output voxel.
        weights_got = np.clip(got - 100.0, 0, None)
        weights_true = np.clip(truth - 100.0, 0, None)
        near = np.sum((world[inside] - BLOBS[0][0]) ** 2, axis=1) < (2 * SIGMA) ** 2
        com_got = (world[inside][near] * weights_got[near, None]).sum(0) / weights_got[near].sum()
        com_true = (world[inside][near] * weights_true[near, None]).sum(0) / weights_true[
            near
        ].sum()
        shift = np.abs(com_got - com_true) / np.asarray(plan.resolution_zyx)
        print(f"deskew rotate={rotate}: blob shift {shift.round(4).tolist()} voxels")
        assert np.all(shift < 0.1), shift

        # The torch kernel gives the same block as numba.
        tile0 = plan.tiles[0]
        mid = [n // 2 for n in out.shape]
        lo = (mid[0] - 8, mid[1] - 8, mid[2] - 16)
        hi = (mid[0] + 8, mid[1] + 8, mid[2] + 16)
        out_to_tile, c_lo, c_hi = tile_crop_bounds(tile0, lo, hi) or pytest.fail("misses")
        crop = TileCrop(
            data=raw.astype(np.float32)[tuple(slice(a, b) for a, b in zip(c_lo, c_hi))],
            out_to_tile=out_to_tile,
            crop_offset_zyx=c_lo,
            tile_shape_zyx=tile0.shape_zyx,
        )
        shape = tuple(b - a for a, b in zip(lo, hi))
        cpu = fuse_block([crop], shape, backend="numba")
        pytest.importorskip("torch")
        torch_out = fuse_block([crop], shape, backend="torch", device="cpu")
        np.testing.assert_allclose(torch_out, cpu, rtol=1e-5, atol=1e-3)
    finally:
        forget_memory_array(name)


def test_post_transforms_take_named_deskew_and_anisotropy() -> None:
    steps = [{"deskew": {"angle": ANGLE}}, {"anisotropy": 2.0}]
    total = post_transform_affine(steps, source="config.yaml")
    np.testing.assert_allclose(total, np.diag([2.0, 1, 1, 1]) @ deskew_matrix(ANGLE))
