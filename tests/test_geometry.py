import numpy as np
import pytest

from tilefusion import geometry
from tilefusion.errors import InputError


def test_bdv_affine_is_row_major_xyz():
    # x' = 2x + 10, y' = 3y + 20, z' = 4z + 30, plus x' += 0.5 z (a shear)
    values = [2, 0, 0.5, 10, 0, 3, 0, 20, 0, 0, 4, 30]
    a = geometry.affine_from_bdv(values)
    z, y, x = 1.0, 2.0, 3.0
    out = geometry.transform_points(a, [[z, y, x]])[0]
    assert out == pytest.approx([4 * z + 30, 3 * y + 20, 2 * x + 0.5 * z + 10])
    assert geometry.affine_to_bdv(a) == pytest.approx(values)


def test_compose_applies_last_first():
    calibration = geometry.scale([2.0, 1.0, 1.0])
    shift = geometry.translation([5.0, 0.0, 0.0])
    model = geometry.compose(shift, calibration)  # XML order: shift, then calibration
    # calibration first: z=1 -> 2, then +5
    assert geometry.transform_points(model, [[1, 0, 0]])[0] == pytest.approx([7, 0, 0])


def test_invert_is_a_true_inverse():
    rng = np.random.default_rng(0)
    a = np.eye(4)
    a[:3, :3] = rng.normal(size=(3, 3)) + 3 * np.eye(3)
    a[:3, 3] = [10.0, -20.0, 30.0]
    assert geometry.invert(a) @ a == pytest.approx(np.eye(4))
    assert a @ geometry.invert(a) == pytest.approx(np.eye(4))


@pytest.mark.parametrize(
    ("matrix", "message"),
    [
        (np.diag([1.0, 0.0, 1.0, 1.0]), "singular"),
        (np.diag([1.0, np.nan, 1.0, 1.0]), "NaN"),
        (np.diag([1.0, np.inf, 1.0, 1.0]), "infinity"),
    ],
)
def test_check_affine_refuses_unusable(matrix, message):
    with pytest.raises(InputError, match=message) as info:
        geometry.check_affine(matrix, source="data.xml", field="ViewRegistration t0 s1")
    assert "data.xml" in str(info.value) and "ViewRegistration t0 s1" in str(info.value)


def test_check_affine_accepts_tiny_voxels():
    geometry.check_affine(geometry.scale([1e-3, 1e-3, 1e-3]), source="x", field="y")


def test_bounding_box_uses_voxel_centres():
    box = geometry.transformed_box(geometry.translation([1, 2, 3]), (10, 20, 30))
    assert box.lo == (1, 2, 3)
    assert box.hi == (10, 21, 32)


@pytest.mark.parametrize(
    ("model", "calibration", "expected"),
    [
        # BigStitcher: calibration = voxel / min(voxel), world unit = min voxel
        (geometry.scale([4.0, 1.0, 1.0]), (4.0, 1.0, 1.0), [0.5, 0.5, 0.5]),
        # MoBIE: physical voxel size in the model, world unit = 1 physical unit
        (geometry.scale([2.0, 0.5, 0.5]), None, [1.0, 1.0, 1.0]),
        # exaSPIM/HCR without calibration: world in voxels
        (geometry.translation([5, 6, 7]), None, [2.0, 0.5, 0.5]),
    ],
)
def test_world_unit_of_view(model, calibration, expected):
    unit = geometry.world_unit_of_view(model, (2.0, 0.5, 0.5), calibration_zyx=calibration)
    assert unit == pytest.approx(expected)


def test_consensus_world_unit_refuses_disagreement():
    with pytest.raises(InputError, match="world_unit"):
        geometry.consensus_world_unit([[1, 1, 1], [2, 1, 1]], source="d.xml")
    assert geometry.consensus_world_unit(
        [[0.5, 0.5, 0.5], [0.5000001, 0.5, 0.5]], source="d.xml"
    ) == pytest.approx([0.5, 0.5, 0.5])
