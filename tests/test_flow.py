"""Flow fields: an affine chain plus a smooth displacement field, fused against the truth."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr

from tilefusion import geometry
from tilefusion.errors import InputError
from tilefusion.fuse import FusionOptions, fuse_range, tile_crop_bounds
from tilefusion.kernel import TileCrop
from tilefusion.kernel.mapped import fuse_mapped
from tilefusion.plan import make_plan, read_plan
from tilefusion.readers.arrays import forget_memory_array, register_memory_array
from tilefusion.readers.manifest import read_tile_manifest
from tilefusion.store import FormatV05, prepare_store
from tilefusion.transforms import ParseContext, _apply_torch, block_coordinates, parse_chain

TILE = (24, 40, 56)
OFFSET_X = 40.0  # world units (= voxels): tiles overlap by 16 voxels in x
AMPLITUDE = 3.0  # the field's largest displacement, voxels
WAVELENGTH = 64.0
SPACING = 2.0
BLOBS = [((12.0, 20.0, 24.0), 2000.0), ((11.0, 18.0, 48.0), 2500.0), ((13.0, 22.0, 76.0), 1500.0)]
SIGMA = 4.0


def _truth(world: np.ndarray) -> np.ndarray:
    value = np.full(len(world), 100.0)
    for centre, height in BLOBS:
        value += height * np.exp(
            -np.sum((world - np.asarray(centre)) ** 2, axis=1) / (2 * SIGMA**2)
        )
    return value


def _displacement(p: np.ndarray) -> np.ndarray:
    """A smooth field of up to AMPLITUDE voxels (gradient 0.29: invertible)."""
    k = 2 * math.pi / WAVELENGTH
    return (
        AMPLITUDE
        * np.stack(
            [
                np.sin(k * p[:, 2] + 0.3),
                np.cos(k * p[:, 0] + k * p[:, 2]),
                np.sin(k * p[:, 1] + 1.0),
            ],
            axis=1,
        )
        / np.sqrt(2.0)
    )


def _write_field(path: Path, values: np.ndarray, origin: np.ndarray, spacing: float) -> None:
    """An OME-Zarr 0.6 displacement field: axes (displacement, z, y, x), values (3, Z, Y, X)."""
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    group.create_array("0", data=values.astype(np.float64), chunks=values.shape)
    axes: list[dict[str, Any]] = [{"name": "d", "type": "displacement"}]
    axes += [{"name": n, "type": "space", "unit": "micrometer"} for n in "zyx"]
    group.attrs["ome"] = {
        "version": "0.6",
        "multiscales": [
            {
                "axes": axes,
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


def _grid(origin: np.ndarray, shape: tuple[int, ...], spacing: float) -> np.ndarray:
    axes = [origin[d] + spacing * np.arange(shape[d]) for d in range(3)]
    return np.stack([g.ravel() for g in np.meshgrid(*axes, indexing="ij")], axis=1)


def _fields(folder: Path) -> tuple[str, str]:
    """The forward field and its inverse (as a field too, for the bijection), in tile space."""
    origin = np.array([-8.0, -8.0, -8.0])
    shape = (20, 28, 36)  # covers the tile (24 x 40 x 56) with a margin, at spacing 2
    nodes = _grid(origin, shape, SPACING)
    forward = _displacement(nodes)
    # The inverse at each node: q with q + D(q) = node, by many fixed-point steps.
    q = nodes.copy()
    for _ in range(200):
        q = nodes - _displacement(q)
    inverse = q - nodes
    for name, values in (("forward", forward), ("inverse", inverse)):
        grid = np.moveaxis(values.reshape((*shape, 3)), -1, 0)
        _write_field(folder / f"{name}.ome.zarr", grid, origin, SPACING)
    return "forward.ome.zarr", "inverse.ome.zarr"


def _chain(offset_x: float, flow: dict[str, Any] | None) -> list[dict[str, Any]]:
    angle = math.radians(2.0)
    rotation = [
        [1, 0, 0, 0],
        [0, math.cos(angle), -math.sin(angle), 0],
        [0, math.sin(angle), math.cos(angle), 0],
    ]
    items: list[dict[str, Any]] = [
        {"translation": [0.5, -0.25, offset_x]},
        {"affine_zyx": rotation},
    ]
    if flow is not None:
        items.append(flow)
    return items


def _dataset(tmp_path: Path, flow: str, tag: str) -> Path:
    forward, inverse = _fields(tmp_path)
    if flow == "numeric":
        item: dict[str, Any] | None = {
            "displacements": {"path": forward, "interpolation": "linear"}
        }
    elif flow == "bijection":
        item = {
            "bijection": {
                "forward": {"displacements": {"path": forward}},
                "inverse": {"displacements": {"path": inverse}},
            }
        }
    else:
        item = None
    tiles = []
    for t, offset in enumerate((0.0, OFFSET_X)):
        chain = parse_chain(_chain(offset, item), ParseContext("t", "t", tmp_path))
        k, j, i = np.meshgrid(*[np.arange(n) for n in TILE], indexing="ij")
        voxels = np.stack([k.ravel(), j.ravel(), i.ravel()], axis=1).astype(float)
        raw = _truth(chain.apply(voxels)).reshape(TILE).astype(np.float32)
        name = f"flow-{tag}-{t}"
        register_memory_array(name, raw)
        tiles.append(
            {
                "path": name,
                "format": "memory",
                "voxel_size": [1.0, 1.0, 1.0],
                "transforms": _chain(offset, item),
            }
        )
    manifest = tmp_path / "tiles.yaml"
    manifest.write_text(json.dumps({"tiles": tiles}))  # JSON is YAML, with no aliases
    return manifest


def _fuse(tmp_path: Path, manifest: Path, blending: str = "cosine") -> tuple[Any, np.ndarray]:
    dataset = read_tile_manifest(manifest)
    plan = make_plan(dataset, chunks_zyx=(16, 32, 32), use_stored_levels=False)
    plan.write(tmp_path / "plan.json")
    plan = read_plan(tmp_path / "plan.json")  # the fuse jobs read it from JSON
    store = tmp_path / "out.zarr"
    prepare_store(plan, store, ngff=FormatV05(), dtype="float32", identity="t")
    options = FusionOptions(blending=blending, device="cpu")
    for r in range(plan.grid.n_ranges):
        fuse_range(plan, r, store_path=str(store), options=options)
    return plan, zarr.open_array(str(store / "0"), mode="r")[:]


@pytest.mark.parametrize("flow", ["numeric", "bijection"])
def test_affine_chain_with_flow_field_matches_the_truth(tmp_path: Path, flow: str) -> None:
    manifest = _dataset(tmp_path, flow, flow)
    try:
        plan, out = _fuse(tmp_path, manifest)
        assert all(t.warp is not None for t in plan.tiles)
        # Boxes include the displacements: the grid holds every displaced corner.
        grid = np.stack(np.meshgrid(*[np.arange(n) for n in out.shape], indexing="ij"), -1)
        world = grid.reshape(-1, 3) * np.asarray(plan.resolution_zyx) + plan.origin_zyx
        truth = _truth(world)
        # Inside the union of the tiles, away from the faces (2 voxels).
        inside = np.zeros(len(world), dtype=bool)
        for t in plan.tiles:
            c = t.output_to_tile().apply(grid.reshape(-1, 3).astype(float))
            inside |= np.all((c >= 2) & (c <= np.asarray(t.shape_zyx) - 3), axis=1)
        got = out.reshape(-1)
        rmse = float(
            np.sqrt(np.mean((got[inside] - truth[inside]) ** 2) / np.mean(truth[inside] ** 2))
        )
        print(f"flow ({flow}): relative RMSE {rmse:.4f} over {inside.sum()} voxels")
        assert rmse <= 0.02, rmse
        for centre, _ in BLOBS:
            near = inside & (np.sum((world - np.asarray(centre)) ** 2, axis=1) < (2 * SIGMA) ** 2)
            w_got = np.clip(got[near] - 100.0, 0, None)
            w_true = np.clip(truth[near] - 100.0, 0, None)
            shift = (world[near] * w_got[:, None]).sum(0) / w_got.sum() - (
                world[near] * w_true[:, None]
            ).sum(0) / w_true.sum()
            print(f"flow ({flow}): blob {centre} shift {np.round(shift, 4).tolist()} voxels")
            assert np.all(np.abs(shift) < 0.1), shift
    finally:
        for t in range(2):
            forget_memory_array(f"flow-{flow}-{t}")


def test_numeric_inverse_reaches_its_tolerance(tmp_path: Path) -> None:
    forward, _ = _fields(tmp_path)
    chain = parse_chain(
        [{"displacements": {"path": forward}}, {"scale": [2.0, 1.0, 1.0]}],
        ParseContext("m.yaml", "tiles[0].transforms", tmp_path),
    )
    flow = chain.items[0]
    # 0.01 of the smallest tile voxel in the field's space (1 world unit here)
    assert flow.tolerance == pytest.approx(0.01)  # type: ignore[attr-defined]
    pts = np.random.default_rng(1).uniform([0, 0, 0], [40, 40, 50], size=(500, 3))
    back = flow.inverse().apply(flow.apply(pts))
    assert np.max(np.abs(back - pts)) <= 0.01


def test_a_field_that_folds_space_is_refused_naming_it(tmp_path: Path) -> None:
    origin = np.zeros(3)
    shape = (8, 8, 8)
    nodes = _grid(origin, shape, 1.0)
    folding = 3.0 * np.sin(2.0 * nodes[:, ::-1])  # gradient up to 6: no fixed point iteration
    _write_field(
        tmp_path / "fold.ome.zarr", np.moveaxis(folding.reshape((*shape, 3)), -1, 0), origin, 1.0
    )
    with pytest.raises(InputError, match=r"fold\.ome\.zarr cannot be inverted numerically"):
        parse_chain(
            [{"displacements": {"path": "fold.ome.zarr"}}], ParseContext("m.yaml", "t", tmp_path)
        )


def test_bad_fields_are_refused(tmp_path: Path) -> None:
    group = zarr.open_group(str(tmp_path / "bad.ome.zarr"), mode="w", zarr_format=3)
    group.create_array("0", data=np.zeros((3, 2, 2, 2)))
    group.attrs["ome"] = {
        "multiscales": [
            {"axes": [{"name": n, "type": "space"} for n in "czyx"], "datasets": [{"path": "0"}]}
        ]
    }
    with pytest.raises(InputError, match=r"t\[0\]\.displacements\.path: .*type 'displacement'"):
        parse_chain(
            [{"displacements": {"path": "bad.ome.zarr"}}], ParseContext("m.yaml", "t", tmp_path)
        )
    with pytest.raises(InputError, match=r"cannot open the displacement field"):
        parse_chain(
            [{"displacements": {"path": "none.ome.zarr"}}], ParseContext("m.yaml", "t", tmp_path)
        )


def test_crop_holds_the_displaced_block_and_torch_equals_numba(tmp_path: Path) -> None:
    manifest = _dataset(tmp_path, "numeric", "crop")
    try:
        dataset = read_tile_manifest(manifest)
        plan = make_plan(dataset, chunks_zyx=(16, 32, 32), use_stored_levels=False)
        tile = plan.tiles[1]
        lo, hi = (4, 8, 40), (20, 32, 72)
        shape = (16, 24, 32)
        found = tile_crop_bounds(tile, lo, hi)
        assert found is not None
        _, c_lo, c_hi = found
        coords = block_coordinates(tile.output_to_tile(), lo, shape)
        inside = np.all(
            (coords >= -1e-6) & (coords <= np.asarray(tile.shape_zyx)[:, None, None, None] - 1),
            axis=0,
        )
        c = coords[:, inside]
        assert np.all(c.min(axis=1) >= np.asarray(c_lo) - 1e-9)
        assert np.all(np.floor(c.max(axis=1)) + 1 <= np.asarray(c_hi))
        # A displaced block needs a crop a few voxels wider than without the flow, not the tile.
        assert np.prod(np.subtract(c_hi, c_lo)) < 0.6 * np.prod(tile.shape_zyx)

        torch = pytest.importorskip("torch")
        pts = torch.as_tensor(
            np.moveaxis(coords, 0, -1).reshape(-1, 3) * 0 + 0, dtype=torch.float64
        )
        grid = np.stack(
            np.meshgrid(*[np.arange(n) + a for a, n in zip(lo, shape)], indexing="ij"), -1
        )
        pts = torch.as_tensor(grid.reshape(-1, 3), dtype=torch.float64)
        on_torch = _apply_torch(tile.output_to_tile(), pts).numpy()
        np.testing.assert_allclose(on_torch.T.reshape(coords.shape), coords, atol=1e-9)

        data = np.asarray(
            __import__("tilefusion.readers", fromlist=["open_array"])
            .open_array(tile.source)
            .read(c_lo, c_hi)
        )
        crop = TileCrop(
            data=data,
            out_to_tile=np.eye(4),
            crop_offset_zyx=c_lo,
            tile_shape_zyx=tile.shape_zyx,
            blend_range_zyx=(8.0, 8.0, 8.0),
        )
        for blending in ("cosine", "mean", "max"):
            cpu = fuse_mapped([crop], [coords], shape, blending=blending, backend="numba")
            on = fuse_mapped([crop], [coords], shape, blending=blending, backend="torch")
            np.testing.assert_allclose(on, cpu, rtol=1e-6, atol=1e-3)
            assert np.count_nonzero(cpu) > 0.5 * cpu.size
    finally:
        for t in range(2):
            forget_memory_array(f"flow-crop-{t}")


def test_plan_json_keeps_affine_tiles_unchanged(tmp_path: Path) -> None:
    manifest = _dataset(tmp_path, "none", "affine")
    try:
        plan = make_plan(read_tile_manifest(manifest), use_stored_levels=False)
        assert all(t.warp is None for t in plan.tiles)
        assert all("warp" not in json.loads(json.dumps(t.to_json())) for t in plan.tiles)
    finally:
        for t in range(2):
            forget_memory_array(f"flow-affine-{t}")


def test_warp_spec_round_trips(tmp_path: Path) -> None:
    manifest = _dataset(tmp_path, "numeric", "spec")
    try:
        plan = make_plan(read_tile_manifest(manifest), use_stored_levels=False)
        tile = plan.tiles[0]
        grid = np.array([[5.0, 10.0, 20.0], [12.0, 30.0, 40.0]])
        to_tile = tile.output_to_tile().apply(grid)
        from tilefusion.transforms import transform_from_json

        np.testing.assert_allclose(
            transform_from_json(tile.warp or {}).apply(to_tile), grid, atol=0.02
        )
        assert geometry.invert(tile.tile_to_output).shape == (4, 4)
    finally:
        for t in range(2):
            forget_memory_array(f"flow-spec-{t}")
