"""Transform objects: chains, inverses, boxes, parsing, and a plugin kind."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from numpy.typing import ArrayLike, NDArray

from tilefusion import geometry
from tilefusion.errors import InputError
from tilefusion.readers.manifest import read_tile_manifest
from tilefusion.transforms import (
    TRANSFORM_KINDS,
    Affine,
    ParseContext,
    Sequence,
    Transform,
    parse_chain,
    parse_transform,
    transform_from_json,
)

CTX = ParseContext("test.yaml", "t")


def test_affine_chain_is_bitwise_the_composed_model() -> None:
    rng = np.random.default_rng(0)
    mats = []
    for _ in range(4):
        m = np.eye(4)
        m[:3, :] = rng.normal(size=(3, 4))
        mats.append(m)
    chain = Sequence([Affine(m) for m in mats])
    matrix = chain.as_affine()
    assert matrix is not None
    assert np.array_equal(matrix, geometry.compose(*mats))
    pts = rng.normal(size=(5, 3))
    np.testing.assert_allclose(chain.apply(pts), geometry.transform_points(matrix, pts))
    np.testing.assert_allclose(chain.inverse().apply(chain.apply(pts)), pts, atol=1e-9)


def test_last_listed_item_is_applied_first() -> None:
    chain = parse_chain([{"translation": [30, 20, 10]}, {"scale": [2, 1, 1]}], CTX)
    np.testing.assert_allclose(chain.apply([[1.0, 0.0, 0.0]]), [[32.0, 20.0, 10.0]])


def test_bounds_of_an_affine_box_are_its_corners() -> None:
    t = parse_transform({"affine_zyx": [[0, 1, 0, 5], [1, 0, 0, 0], [0, 0, 2, 0]]}, CTX)
    lo, hi = t.bounds([0, 0, 0], [3, 4, 5])
    np.testing.assert_allclose(lo, [5, 0, 0])
    np.testing.assert_allclose(hi, [9, 3, 10])


@pytest.mark.parametrize(
    ("spec", "point", "expected"),
    [
        ({"type": "scale", "scale": [10, 20]}, [1, 2], [10, 40]),
        ({"type": "translation", "translation": [10, 20]}, [1, 2], [11, 22]),
        ({"type": "mapAxis", "mapAxis": [1, 0]}, [1, 2], [2, 1]),
        ({"type": "affine", "affine": [[1, 0, 1], [0, 2, 0]]}, [1, 2], [2, 4]),
        ({"type": "rotation", "rotation": [[0, -1], [1, 0]]}, [1, 2], [-2, 1]),
        (
            {
                "type": "sequence",
                "transformations": [
                    {"type": "scale", "scale": [2, 2]},
                    {"type": "translation", "translation": [1, 0]},
                ],
            },
            [1, 2],
            [3, 4],  # RFC-5 order: scaled first, then translated
        ),
        (
            {
                "type": "byDimension",
                "transformations": [
                    {"type": "identity", "input_axes": [0], "output_axes": [0]},
                    {"type": "scale", "scale": [10], "input_axes": [1], "output_axes": [1]},
                ],
            },
            [1, 2],
            [1, 20],
        ),
    ],
)
def test_rfc5_kinds_in_two_dimensions(
    spec: dict[str, Any], point: list[float], expected: list[float]
) -> None:
    t = parse_transform(spec, ParseContext("scene", "t", ndim=2))
    np.testing.assert_allclose(t.apply([point]), [expected])
    np.testing.assert_allclose(t.inverse().apply([expected]), [point], atol=1e-12)
    again = parse_transform(t.to_spec(), ParseContext("scene", "t", ndim=2))
    np.testing.assert_allclose(again.apply([point]), [expected])


def test_bijection_uses_the_given_inverse() -> None:
    t = parse_transform(
        {"bijection": {"forward": {"translation": [1, 1, 1]}, "inverse": {"scale": [2, 2, 2]}}},
        CTX,
    )
    np.testing.assert_allclose(t.apply([[1, 2, 3]]), [[2, 3, 4]])
    np.testing.assert_allclose(t.inverse().apply([[1, 2, 3]]), [[2, 4, 6]])


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({"warp": [1, 2, 3]}, r"t: unknown transform kind 'warp'"),
        ({"scale": [1, 1]}, r"t\.scale: needs 3 finite numbers"),
        ({"scale": [1, 1, 1], "translation": [0, 0, 0]}, r"t: needs exactly one of"),
        ({"deskew": {"angle": 0}}, r"t\.deskew\.angle: must be strictly between"),
        ({"deskew": {"angle": 30, "scan_axis": "z"}}, r"t\.deskew\.scan_axis"),
        ({"anisotropy": -1}, r"t\.anisotropy: must be one positive number"),
        ({"bijection": {"forward": {"scale": [1, 1, 1]}}}, r"exactly 'forward' and 'inverse'"),
    ],
)
def test_bad_items_name_the_field(spec: dict[str, Any], match: str) -> None:
    with pytest.raises(InputError, match=match):
        parse_transform(spec, CTX)


def test_json_round_trip_of_a_chain() -> None:
    chain = parse_chain(
        [
            {"deskew": {"angle": 32.0, "scan_axis": "y", "sign": -1}},
            {"anisotropy": {"factor": 2.0, "axis": "z"}},
            {"translation": [1, 2, 3]},
        ],
        CTX,
    )
    again = transform_from_json(chain.to_spec())
    pts = np.array([[1.0, 2.0, 3.0], [-4.0, 5.0, 0.5]])
    np.testing.assert_allclose(again.apply(pts), chain.apply(pts))


# ---------------------------------------------------------------------------
# A third-party kind, as a plugin package would ship it.


class Shear(Transform):
    """``shear: k`` moves x by k * z: a plugin's own transform kind (the worked example).

    A package ships it with, in its ``pyproject.toml``::

        [project.entry-points."tilefusion.transforms"]
        shear = "my_package.transforms:Shear"
    """

    kind = "shear"

    def __init__(self, k: float) -> None:
        self.k = k
        self.ndim = 3

    @classmethod
    def from_spec(cls, value: Any, spec: Mapping[str, Any], ctx: ParseContext) -> Transform:
        if not isinstance(value, (int, float)):
            raise ctx.error(f"shear is one number, got {value!r}", ".shear")
        return cls(float(value))

    def apply(self, points: ArrayLike) -> NDArray[np.float64]:
        p = np.array(points, dtype=np.float64).reshape(-1, 3)
        p[:, 2] += self.k * p[:, 0]
        return p

    def inverse(self) -> Transform:
        return Shear(-self.k)

    def to_spec(self) -> dict[str, Any]:
        return {"type": "shear", "shear": self.k}


class _EntryPoint:
    name = "shear"
    value = "my_package.transforms:Shear"

    def load(self) -> object:
        return Shear


def test_plugin_kind_through_an_entry_point(tmp_path: Path, monkeypatch) -> None:
    def entry_points(*, group: str) -> list[_EntryPoint]:
        return [_EntryPoint()] if group == "tilefusion.transforms" else []

    monkeypatch.setattr("tilefusion.registry.entry_points", entry_points)
    monkeypatch.setattr(TRANSFORM_KINDS, "_entries", dict(TRANSFORM_KINDS._entries))
    monkeypatch.setattr(TRANSFORM_KINDS, "_plugins_loaded", False)
    manifest = tmp_path / "tiles.yaml"
    tile = {
        "path": "t0.zarr",
        "format": "zarr",
        "shape": [4, 4, 4],
        "voxel_size": [1, 1, 1],
        "transforms": [{"translation": [0, 0, 10]}, {"shear": 0.5}],
    }
    manifest.write_text(yaml.safe_dump({"tiles": [tile]}))
    view = read_tile_manifest(manifest).views[0]
    assert view.transform is not None and "shear" in TRANSFORM_KINDS.names()
    np.testing.assert_allclose(view.transform.apply([[2.0, 0.0, 0.0]]), [[2.0, 0.0, 11.0]])
    # Not affine: the model is its affine part, the chain keeps the shear.
    assert view.transform.as_affine() is None
    np.testing.assert_allclose(view.model[:3, 3], [0, 0, 10])
    again = transform_from_json(view.transform.to_spec())
    np.testing.assert_allclose(again.apply([[2.0, 0.0, 0.0]]), [[2.0, 0.0, 11.0]])
