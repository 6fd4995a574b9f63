"""YAML tile manifests: format, transform order, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import yaml
import zarr

from tilefusion import geometry
from tilefusion.errors import InputError
from tilefusion.readers import ArraySource, check_arrays, read_dataset
from tilefusion.readers.arrays import register_memory_array, write_n5_array
from tilefusion.readers.manifest import read_tile_manifest


def _write(tmp_path: Path, doc: object, name: str = "tiles.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc) if not isinstance(doc, str) else doc)
    return path


def _tile(**extra: object) -> dict[str, object]:
    tile: dict[str, object] = {"path": "t.zarr", "voxel_size": [2.0, 0.5, 0.5], "shape": [4, 5, 6]}
    tile.update(extra)
    return tile


def test_last_listed_transform_is_applied_first(tmp_path: Path) -> None:
    tile = _tile(transforms=[{"translation": [30, 20, 10]}, {"scale": [2, 1, 1]}])
    view = read_tile_manifest(_write(tmp_path, {"tiles": [tile]})).views[0]
    world = geometry.transform_points(view.model, [[1.0, 0.0, 0.0]])[0]
    np.testing.assert_allclose(world, [32.0, 20.0, 10.0])


def test_bigstitcher_affine_is_xyz(tmp_path: Path) -> None:
    # Same map as translation [z=30, y=20, x=10] written BigStitcher's way.
    tile = _tile(transforms=[{"affine": [1, 0, 0, 10, 0, 1, 0, 20, 0, 0, 1, 30]}])
    view = read_tile_manifest(_write(tmp_path, {"tiles": [tile]})).views[0]
    np.testing.assert_allclose(view.model, geometry.translation([30, 20, 10]))


@pytest.mark.parametrize(
    "matrix",
    [
        [[1, 0, 0, 3], [0, 1, 0, 2], [0, 0, 1, 1]],
        [[1, 0, 0, 3], [0, 1, 0, 2], [0, 0, 1, 1], [0, 0, 0, 1]],
    ],
)
def test_affine_zyx(tmp_path: Path, matrix: list[list[int]]) -> None:
    tile = _tile(transforms=[{"affine_zyx": matrix}])
    view = read_tile_manifest(_write(tmp_path, {"tiles": [tile]})).views[0]
    np.testing.assert_allclose(view.model, geometry.translation([3, 2, 1]))


def test_defaults_and_fields(tmp_path: Path) -> None:
    doc = {
        "tiles": [
            _tile(channel=1, tile=5, timepoint=2, dtype="uint16"),
            _tile(path="/abs/u.zarr", key="0", setup=7, angle=90),
        ]
    }
    ds = read_dataset(_write(tmp_path, doc, "m.yml"))
    assert ds.unit == "micrometer"
    assert [v.name for v in ds.views] == ["t0-s7", "t2-s0"]
    second, first = ds.views
    assert first.shape_zyx == (4, 5, 6)
    assert first.voxel_size_zyx == (2.0, 0.5, 0.5)
    assert first.attributes == {"channel": 1, "tile": 5}
    assert first.dtype == "uint16"
    assert first.source == ArraySource("zarr", str(tmp_path / "t.zarr"))
    np.testing.assert_array_equal(first.model, np.eye(4))
    assert second.source == ArraySource("zarr", "/abs/u.zarr", "0")
    assert second.attributes == {"angle": 90}


def test_unit_and_calibration(tmp_path: Path) -> None:
    tile = _tile(
        transforms=[{"translation": [0, 0, 9]}, {"scale": [4, 1, 1], "name": "calibration"}]
    )
    ds = read_tile_manifest(_write(tmp_path, {"unit": "nm", "tiles": [tile]}))
    assert ds.unit == "nanometer"
    assert ds.views[0].calibration_zyx == (4.0, 1.0, 1.0)


def test_shape_and_dtype_from_arrays(tmp_path: Path) -> None:
    data = np.arange(2 * 3 * 4, dtype=np.uint16).reshape(2, 3, 4)
    zarr.create_array(str(tmp_path / "a.zarr"), data=data)
    write_n5_array(tmp_path / "b.n5", "setup0/timepoint0/s0", data, block_size_zyx=(2, 2, 2))
    tifffile.imwrite(tmp_path / "c.tif", data)
    register_memory_array("manifest-d", data)
    doc = {
        "tiles": [
            {"path": "a.zarr", "voxel_size": [1, 1, 1]},
            {"path": "b.n5", "key": "setup0/timepoint0/s0", "voxel_size": [1, 1, 1]},
            {"path": "c.tif", "voxel_size": [1, 1, 1], "dtype": "uint16"},
            {"path": "manifest-d", "format": "memory", "voxel_size": [1, 1, 1]},
        ]
    }
    ds = read_tile_manifest(_write(tmp_path, doc))
    assert [v.source.format for v in ds.views] == ["zarr", "n5", "tiff", "memory"]
    assert all(v.shape_zyx == (2, 3, 4) for v in ds.views)
    check_arrays(ds)


def test_check_arrays_names_dtype_mismatch(tmp_path: Path) -> None:
    zarr.create_array(str(tmp_path / "a.zarr"), shape=(2, 3, 4), dtype="uint8")
    doc = {"tiles": [{"path": "a.zarr", "voxel_size": [1, 1, 1], "dtype": "uint16"}]}
    with pytest.raises(
        InputError, match=r"a\.zarr: view t0-s0 dtype: array is uint8 but .*says uint16"
    ):
        check_arrays(read_tile_manifest(_write(tmp_path, doc)))


@pytest.mark.parametrize(
    ("doc", "match"),
    [
        ("tiles: [", r"YAML: malformed YAML"),
        ("- 1\n- 2\n", r"a manifest is a mapping"),
        ({"tile": []}, r"tile: unknown key"),
        ({"tiles": []}, r"tiles: must be a non-empty list"),
        ({"tiles": [{"voxel_size": [1, 1, 1]}]}, r"tiles\[0\]\.path: missing"),
        ({"tiles": [_tile(voxel_size=[1, 1])]}, r"tiles\[0\]\.voxel_size: needs 3 finite"),
        ({"tiles": [_tile(voxel_size=[0, 1, 1])]}, r"tiles\[0\]\.voxel_size: must be positive"),
        ({"tiles": [_tile(colour=1)]}, r"tiles\[0\]\.colour: unknown key"),
        ({"tiles": [_tile(setup="a")]}, r"tiles\[0\]\.setup: must be an integer"),
        ({"tiles": [_tile(), _tile(setup=0)]}, r"tiles\[1\]: same timepoint=0 setup=0"),
        ({"tiles": [_tile(path="x.bin")]}, r"tiles\[0\]\.path: cannot tell the format"),
        ({"tiles": [_tile(format="png")]}, r"tiles\[0\]\.format: unknown format 'png'"),
        (
            {"tiles": [_tile(transforms=[{"affine": [1, 2, 3]}])]},
            r"tiles\[0\]\.transforms\[0\]\.affine: needs 12 numbers",
        ),
        (
            {"tiles": [_tile(transforms=[{"scale": [1, 1, 1], "translation": [0, 0, 0]}])]},
            r"tiles\[0\]\.transforms\[0\]: needs exactly one of",
        ),
        (
            {"tiles": [_tile(transforms=[{"scale": [0, 1, 1]}])]},
            r"tiles\[0\]\.transforms: affine is singular",
        ),
        (
            {"tiles": [_tile(transforms={"scale": [1, 1, 1]})]},
            r"tiles\[0\]\.transforms: must be a list",
        ),
        ({"tiles": [{"path": "gone.zarr", "voxel_size": [1, 1, 1]}]}, r"gone\.zarr: array: "),
    ],
)
def test_errors_name_field(tmp_path: Path, doc: object, match: str) -> None:
    path = _write(tmp_path, doc)
    with pytest.raises(InputError, match=match) as info:
        read_tile_manifest(path)
    assert "\n" not in str(info.value)


def test_missing_manifest(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"none\.yaml: file not found"):
        read_dataset(tmp_path / "none.yaml")


def test_unknown_dataset_extension(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"d\.json: unknown dataset type"):
        read_dataset(tmp_path / "d.json")
