"""Coordinate transforms as objects: affines, flow fields, deskew, chains.

A tile's registration is a chain of :class:`Transform` objects, kept as
read (named items in BigStitcher order), not collapsed into one matrix.
Every transform maps (N, D) arrays of points, has an :meth:`~Transform.inverse`,
bounds a box through itself (:meth:`~Transform.bounds`) and returns its
matrix from :meth:`~Transform.as_affine` when it is affine, so affine chains
keep the affine fast paths of planning and of the kernels.

Conventions
-----------
Points are rows of coordinates in the axis order of the arrays (zyx for
tiles). :class:`Sequence` composes like :func:`tilefusion.geometry.compose`
and BigStitcher's ``<ViewTransform>`` lists: ``Sequence([a, b, c])`` is
``a(b(c(p)))``, the **last** item applied first. RFC-5 ``sequence`` objects
list theirs in the opposite order (first applied first); :func:`parse_transform`
reverses them on reading and :meth:`Sequence.to_spec` on writing.

Kinds and specs
---------------
Every kind is an entry of :data:`TRANSFORM_KINDS` (entry point group
``tilefusion.transforms``), a class with ``from_spec(value, spec, context)``
that builds it from one item. An item is written either as in a tile
manifest, ``{kind: value, name: ..., options...}``, or as in OME-Zarr 0.6
(RFC-5) metadata, ``{"type": kind, kind: value, ...}`` (``value`` is then
the item itself less ``type``/``name``/``input``/``output`` where it has no
field of the kind's name, as for ``bijection`` and ``displacements``).
Built-in kinds: ``identity``, ``affine``, ``affine_zyx``, ``rotation``,
``scale``, ``translation``, ``mapAxis``, ``sequence``, ``byDimension``,
``bijection``, ``inverseOf``, ``displacements``, ``deskew`` and
``anisotropy``. A third party adds a kind in its own ``pyproject.toml``::

    [project.entry-points."tilefusion.transforms"]
    swirl = "my_package.transforms:Swirl"

where ``Swirl`` subclasses :class:`Transform` and defines ``from_spec``,
``apply``, ``inverse`` and ``to_spec`` (``tests/test_transforms.py`` has a
worked example). Its items are then accepted in manifests (``- swirl: ...``)
and in plans.
"""

from __future__ import annotations

import contextvars
import functools
import math
import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Mapping
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from numpy.typing import ArrayLike, NDArray

from tilefusion.errors import InputError
from tilefusion.registry import Registry, UnknownEntry

__all__ = [
    "TRANSFORM_KINDS",
    "Affine",
    "Bijection",
    "ByDimension",
    "Displacements",
    "InverseDisplacements",
    "ParseContext",
    "Sequence",
    "Transform",
    "anisotropy_matrix",
    "block_coordinates",
    "chain_calibration",
    "deskew_matrix",
    "parse_chain",
    "parse_transform",
    "scene_transform",
    "transform_from_json",
    "transform_points_in_zarr",
    "unit_affine",
]

Points = NDArray[np.float64]


@dataclass(frozen=True)
class ParseContext:
    """Where an item comes from, for error messages and relative paths.

    Attributes
    ----------
    source : str
        The file read (manifest, XML, config, OME-Zarr group).
    field : str
        The item's place in it (``tiles[0].transforms[1]``).
    folder : Path or None
        Folder relative paths (of displacement fields) are resolved against.
    ndim : int
        Dimensionality of the points (3 for tiles).
    tolerance : float or None
        For numeric inverses: the largest residual allowed, in the units of
        the item's input space (see :class:`Displacements`).
    """

    source: str
    field: str
    folder: Path | None = None
    ndim: int = 3
    tolerance: float | None = None

    def at(self, suffix: str) -> ParseContext:
        """The context of a part of this item."""
        return ParseContext(self.source, f"{self.field}{suffix}", self.folder, self.ndim)

    def error(self, message: str, suffix: str = "") -> InputError:
        return InputError(self.source, f"{self.field}{suffix}", message)


class Transform(ABC):
    """A map between two coordinate spaces of ``ndim`` axes.

    Subclasses define :meth:`apply`, :meth:`inverse`, :meth:`to_spec` and,
    to be read from manifests, XML and plans, the classmethod ``from_spec``.
    """

    kind: ClassVar[str] = ""
    name: str = ""
    ndim: int = 3

    @abstractmethod
    def apply(self, points: ArrayLike) -> Points:
        """Map an (N, ndim) array of points."""

    @abstractmethod
    def inverse(self) -> Transform:
        """The inverse map (exact, given, or numeric)."""

    @abstractmethod
    def to_spec(self) -> dict[str, Any]:
        """This transform as an RFC-5 style item (``{"type": kind, ...}``), JSON-ready."""

    def as_affine(self) -> NDArray[np.float64] | None:
        """The ``(ndim + 1)``-square matrix when the map is affine, else None."""
        return None

    @property
    def is_affine(self) -> bool:
        return self.as_affine() is not None

    def bounds(self, lo: ArrayLike, hi: ArrayLike) -> tuple[Points, Points]:
        """An axis-aligned box holding the image of the box ``[lo, hi]`` (inclusive).

        Affine maps bound the corners exactly; others sample the box's faces
        (9 points per axis) and are overridden where a tighter bound is known.
        """
        lo_a = np.asarray(lo, dtype=np.float64)
        hi_a = np.asarray(hi, dtype=np.float64)
        matrix = self.as_affine()
        pts = _box_corners(lo_a, hi_a) if matrix is not None else _box_faces(lo_a, hi_a, 9)
        out = self.apply(pts)
        return out.min(axis=0), out.max(axis=0)

    def affine_part(self) -> NDArray[np.float64]:
        """The nearest affine stand-in: the matrix itself, or the identity for a flow.

        Used where only scale matters (world unit, stored level choice, blend
        ramps) and for a first guess of a chain's box.
        """
        matrix = self.as_affine()
        return np.eye(self.ndim + 1) if matrix is None else matrix


def _box_corners(lo: Points, hi: Points) -> Points:
    axes = [(a, b) for a, b in zip(lo, hi)]
    grid = np.meshgrid(*axes, indexing="ij")
    return np.stack([g.ravel() for g in grid], axis=1)


def _box_faces(lo: Points, hi: Points, n: int) -> Points:
    axes = [np.linspace(a, b, n) for a, b in zip(lo, hi)]
    grid = np.stack([g.ravel() for g in np.meshgrid(*axes, indexing="ij")], axis=1)
    on_face = np.zeros(len(grid), dtype=bool)
    for d in range(len(lo)):
        on_face |= (grid[:, d] == lo[d]) | (grid[:, d] == hi[d])
    return np.asarray(grid[on_face], dtype=np.float64)


def _as_points(points: ArrayLike, ndim: int) -> Points:
    pts = np.asarray(points, dtype=np.float64)
    return pts.reshape(-1, ndim)


TRANSFORM_KINDS: Registry[Any] = Registry("tilefusion.transforms", kind="transform kind")
"""Transform kinds by name: classes with ``from_spec(value, spec, context)``."""


# ---------------------------------------------------------------------------
# affine kinds


def _numbers(value: Any, ctx: ParseContext, suffix: str = "") -> NDArray[np.float64]:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ctx.error(f"not numbers: {value!r}", suffix) from None
    if not np.all(np.isfinite(arr)):
        raise ctx.error("holds NaN or infinity", suffix)
    return arr


def _vector(value: Any, ctx: ParseContext, suffix: str) -> NDArray[np.float64]:
    arr = _numbers(value, ctx, suffix)
    if arr.shape != (ctx.ndim,):
        axes = "z, y, x" if ctx.ndim == 3 else f"{ctx.ndim} axes"
        raise ctx.error(f"needs {ctx.ndim} finite numbers ({axes}), got {value!r}", suffix)
    return arr


class Affine(Transform):
    """An affine map, held as an ``(ndim + 1)``-square homogeneous matrix.

    The ``scale``, ``translation``, ``rotation``, ``affine`` (and
    ``affine_zyx``, ``identity``, ``mapAxis``) items all read as this class;
    ``spec_kind`` remembers which, for :meth:`to_spec`.
    """

    kind = "affine"

    def __init__(self, matrix: ArrayLike, *, name: str = "", spec_kind: str = "affine") -> None:
        m = np.array(matrix, dtype=np.float64)
        if m.ndim != 2 or m.shape[0] != m.shape[1]:
            raise ValueError(f"an affine is a square homogeneous matrix, got shape {m.shape}")
        self.matrix = m
        self.ndim = m.shape[0] - 1
        self.name = name
        self.spec_kind = spec_kind

    def __repr__(self) -> str:
        return f"Affine({self.matrix.tolist()!r}, name={self.name!r})"

    def apply(self, points: ArrayLike) -> Points:
        pts = _as_points(points, self.ndim)
        return np.asarray(pts @ self.matrix[:-1, :-1].T + self.matrix[:-1, -1], dtype=np.float64)

    def inverse(self) -> Affine:
        n = self.ndim
        try:
            inv_linear = np.linalg.inv(self.matrix[:n, :n])
        except np.linalg.LinAlgError:
            raise ValueError("affine is singular: it has no inverse") from None
        out = np.eye(n + 1)
        out[:n, :n] = inv_linear
        out[:n, n] = -inv_linear @ self.matrix[:n, n]
        return Affine(out, name=self.name)

    def as_affine(self) -> NDArray[np.float64]:
        return self.matrix

    def to_spec(self) -> dict[str, Any]:
        spec: dict[str, Any] = {"type": "affine", "affine": self.matrix[:-1].tolist()}
        if self.name:
            spec["name"] = self.name
        return spec

    @classmethod
    def from_spec(cls, value: Any, spec: Mapping[str, Any], ctx: ParseContext) -> Transform:
        kind = str(spec.get("type") or next(k for k in spec if k in _AFFINE_KINDS))
        name = str(spec.get("name", "") or "")
        n = ctx.ndim
        if kind == "identity":
            return cls(np.eye(n + 1), name=name, spec_kind=kind)
        if kind == "scale":
            out = np.eye(n + 1)
            out[:n, :n] = np.diag(_vector(value, ctx, ".scale"))
            return cls(out, name=name, spec_kind=kind)
        if kind == "translation":
            out = np.eye(n + 1)
            out[:n, n] = _vector(value, ctx, ".translation")
            return cls(out, name=name, spec_kind=kind)
        if kind == "mapAxis":
            order = _numbers(value, ctx, ".mapAxis").astype(int).ravel()
            if sorted(order.tolist()) != list(range(n)):
                raise ctx.error(f"must permute 0..{n - 1}, got {value!r}", ".mapAxis")
            out = np.zeros((n + 1, n + 1))
            out[np.arange(n), order] = 1.0
            out[n, n] = 1.0
            return cls(out, name=name, spec_kind=kind)
        arr = _numbers(value, ctx, f".{kind}")
        if kind == "affine" and arr.shape == (12,) and n == 3:
            # BigStitcher's 12 numbers: row-major 3x4 acting on xyz.
            from tilefusion.geometry import affine_from_bdv

            return cls(affine_from_bdv(arr.tolist()), name=name, spec_kind=kind)
        if kind == "rotation":
            if arr.shape != (n, n):
                raise ctx.error(f"needs a {n}x{n} nested list", ".rotation")
            out = np.eye(n + 1)
            out[:n, :n] = arr
            return cls(out, name=name, spec_kind=kind)
        if arr.shape == (n, n + 1):
            arr = np.vstack([arr, np.eye(n + 1)[n]])
        if arr.shape != (n + 1, n + 1) or not np.array_equal(arr[n], np.eye(n + 1)[n]):
            expected = "12 numbers (row-major 3x4, xyz) or " if kind == "affine" and n == 3 else ""
            raise ctx.error(
                f"needs {expected}a {n}x{n + 1} or {n + 1}x{n + 1} nested list", f".{kind}"
            )
        return cls(arr, name=name, spec_kind=kind)


_AFFINE_KINDS = ("identity", "affine", "affine_zyx", "rotation", "scale", "translation", "mapAxis")
for _name in _AFFINE_KINDS:
    TRANSFORM_KINDS.register(_name, Affine)


def deskew_matrix(
    angle_deg: float, *, scan_axis: str = "x", sign: float = 1.0, rotate: bool = False
) -> NDArray[np.float64]:
    """The zyx matrix of a stage-scan deskew (and, with ``rotate``, the rotation after it).

    A stage-scanning light sheet records plane ``k`` after the stage moved
    ``k`` steps along the scan axis; the tile's z voxel size is that step,
    ``dz``. In physical coordinates (z = k * dz) a point of plane k lies
    ``sign * cos(angle) * z`` further along the scan axis and at height
    ``sin(angle) * z`` (``angle``: between the sheet and the scan axis)::

        deskew (scan axis x):      rotate (about y, by -angle):
        [ sin a   0  0 ]           [  cos a  0  sin a ]
        [ 0       1  0 ]           [  0      1  0     ]
        [ s cos a 0  1 ]           [ -sin a  0  cos a ]   (acting on z, y, x)

    For scan axis y, the shear term is in row y instead of x. ``rotate``
    applies the rotation after the deskew (PetaKit5D's "deskew/rotate"),
    turning the sheet's frame into the coverslip's.
    """
    a = math.radians(float(angle_deg))
    axis = {"y": 1, "x": 2}[scan_axis]
    out = np.eye(4)
    out[0, 0] = math.sin(a)
    out[axis, 0] = float(sign) * math.cos(a)
    if rotate:
        rot = np.eye(4)
        rot[0, 0] = rot[axis, axis] = math.cos(a)
        rot[0, axis] = math.sin(a)
        rot[axis, 0] = -math.sin(a)
        out = rot @ out
    return out


def anisotropy_matrix(factor: float, *, axis: str = "z") -> NDArray[np.float64]:
    """``diag`` scaling one axis by ``factor`` (BigStitcher's anisotropy, z by default)."""
    out = np.eye(4)
    index = {"z": 0, "y": 1, "x": 2}[axis]
    out[index, index] = float(factor)
    return out


class Deskew(Affine):
    """A stage-scan deskew: ``deskew: {angle, scan_axis, sign, rotate}`` (:func:`deskew_matrix`)."""

    kind = "deskew"

    def __init__(
        self,
        angle: float,
        *,
        scan_axis: str = "x",
        sign: float = 1.0,
        rotate: bool = False,
        name: str = "",
    ) -> None:
        super().__init__(
            deskew_matrix(angle, scan_axis=scan_axis, sign=sign, rotate=rotate),
            name=name or "deskew",
            spec_kind="deskew",
        )
        self.options = {"angle": angle, "scan_axis": scan_axis, "sign": sign, "rotate": rotate}

    @classmethod
    def from_spec(cls, value: Any, spec: Mapping[str, Any], ctx: ParseContext) -> Transform:
        if ctx.ndim != 3:
            raise ctx.error("deskew needs 3 axes (z, y, x)")
        if not isinstance(value, Mapping):
            raise ctx.error("a mapping with 'angle' (and scan_axis, sign, rotate)", ".deskew")
        unknown = set(value) - {"angle", "scan_axis", "sign", "rotate"}
        if unknown:
            raise ctx.error("unknown key", f".deskew.{sorted(unknown)[0]}")
        if "angle" not in value:
            raise ctx.error(
                "missing (degrees between the light sheet and the scan axis)", ".deskew.angle"
            )
        angle = float(_numbers(value["angle"], ctx, ".deskew.angle"))
        if not 0.0 < abs(angle) < 180.0 or angle % 180.0 == 0.0:
            raise ctx.error(
                f"must be strictly between 0 and 180 degrees, got {angle}", ".deskew.angle"
            )
        scan_axis = str(value.get("scan_axis", "x"))
        if scan_axis not in ("x", "y"):
            raise ctx.error(f"must be 'x' or 'y', got {scan_axis!r}", ".deskew.scan_axis")
        sign = float(value.get("sign", 1))
        if sign not in (1.0, -1.0):
            raise ctx.error(f"must be 1 or -1, got {value.get('sign')!r}", ".deskew.sign")
        rotate = value.get("rotate", False)
        if not isinstance(rotate, bool):
            raise ctx.error(f"must be true or false, got {rotate!r}", ".deskew.rotate")
        return cls(
            angle,
            scan_axis=scan_axis,
            sign=sign,
            rotate=rotate,
            name=str(spec.get("name", "") or ""),
        )

    def to_spec(self) -> dict[str, Any]:
        return {"type": "deskew", "deskew": dict(self.options), "name": self.name}


class Anisotropy(Affine):
    """A named anisotropy scale, ``anisotropy: F`` or ``{factor: F, axis: z}``."""

    kind = "anisotropy"

    def __init__(self, factor: float, *, axis: str = "z", name: str = "") -> None:
        super().__init__(
            anisotropy_matrix(factor, axis=axis), name=name or "anisotropy", spec_kind="anisotropy"
        )
        self.options = {"factor": factor, "axis": axis}

    @classmethod
    def from_spec(cls, value: Any, spec: Mapping[str, Any], ctx: ParseContext) -> Transform:
        if ctx.ndim != 3:
            raise ctx.error("anisotropy needs 3 axes (z, y, x)")
        options = dict(value) if isinstance(value, Mapping) else {"factor": value}
        unknown = set(options) - {"factor", "axis"}
        if unknown:
            raise ctx.error("unknown key", f".anisotropy.{sorted(unknown)[0]}")
        factor = _numbers(options.get("factor"), ctx, ".anisotropy.factor")
        if factor.shape != () or float(factor) <= 0:
            raise ctx.error(
                f"must be one positive number, got {options.get('factor')!r}", ".anisotropy"
            )
        axis = str(options.get("axis", "z"))
        if axis not in ("z", "y", "x"):
            raise ctx.error(f"must be z, y or x, got {axis!r}", ".anisotropy.axis")
        return cls(float(factor), axis=axis, name=str(spec.get("name", "") or ""))

    def to_spec(self) -> dict[str, Any]:
        return {"type": "anisotropy", "anisotropy": dict(self.options), "name": self.name}


TRANSFORM_KINDS.register("deskew", Deskew)
TRANSFORM_KINDS.register("anisotropy", Anisotropy)


# ---------------------------------------------------------------------------
# composite kinds


class Sequence(Transform):
    """A chain, in BigStitcher order: ``Sequence([a, b, c])(p) = a(b(c(p)))``.

    Consecutive affine items are multiplied into one matrix for applying and
    bounding, so an affine chain costs one matrix product.
    """

    kind = "sequence"

    def __init__(self, items: SequenceABC[Transform], *, name: str = "") -> None:
        self.items = list(items)
        self.name = name
        dims = {t.ndim for t in self.items}
        if len(dims) > 1:
            raise ValueError(f"a sequence's items have different dimensionalities: {dims}")
        self.ndim = dims.pop() if dims else 3

    def __repr__(self) -> str:
        return f"Sequence({self.items!r})"

    @functools.cached_property
    def _runs(self) -> list[Transform]:
        """Items in application order, consecutive affines multiplied together.

        Products are taken left to right, as :func:`tilefusion.geometry.compose`
        does, so an affine chain's matrix is bit for bit the composed model.
        """
        runs: list[Transform] = []
        for item in _flat(self.items):
            matrix = item.as_affine()
            if matrix is not None and runs and isinstance(runs[-1], Affine):
                runs[-1] = Affine(runs[-1].matrix @ matrix)
            elif matrix is not None:
                runs.append(Affine(np.eye(self.ndim + 1) @ matrix))
            else:
                runs.append(item)
        return runs[::-1]

    def apply(self, points: ArrayLike) -> Points:
        pts = _as_points(points, self.ndim)
        for item in self._runs:
            pts = item.apply(pts)
        return pts

    def inverse(self) -> Sequence:
        return Sequence([t.inverse() for t in reversed(self.items)], name=self.name)

    def as_affine(self) -> NDArray[np.float64] | None:
        runs = self._runs
        if not runs:
            return np.eye(self.ndim + 1)
        if len(runs) == 1:
            return runs[0].as_affine()
        return None

    def affine_part(self) -> NDArray[np.float64]:
        out = np.eye(self.ndim + 1)
        for item in self.items:
            out = out @ item.affine_part()
        return out

    def bounds(self, lo: ArrayLike, hi: ArrayLike) -> tuple[Points, Points]:
        box = (np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64))
        for item in self._runs:
            box = item.bounds(*box)
        return box

    def to_spec(self) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "type": "sequence",
            # RFC-5 lists the first applied first.
            "transformations": [t.to_spec() for t in reversed(self.items)],
        }
        if self.name:
            spec["name"] = self.name
        return spec

    @classmethod
    def from_spec(cls, value: Any, spec: Mapping[str, Any], ctx: ParseContext) -> Transform:
        items = value.get("transformations") if isinstance(value, Mapping) else value
        if not isinstance(items, list):
            raise ctx.error("a sequence lists its transformations", ".transformations")
        parsed = [
            parse_transform(item, ctx.at(f".transformations[{k}]")) for k, item in enumerate(items)
        ]
        return cls(parsed[::-1], name=str(spec.get("name", "") or ""))


def _flat(items: SequenceABC[Transform]) -> list[Transform]:
    """Items with nested sequences expanded (same order), so their affines merge."""
    out: list[Transform] = []
    for item in items:
        out.extend(_flat(item.items) if isinstance(item, Sequence) else [item])
    return out


class Bijection(Transform):
    """A forward map with its inverse given, ``bijection: {forward: ..., inverse: ...}``."""

    kind = "bijection"

    def __init__(self, forward: Transform, inverse: Transform, *, name: str = "") -> None:
        self.forward = forward
        self._inverse = inverse
        self.name = name
        self.ndim = forward.ndim

    def apply(self, points: ArrayLike) -> Points:
        return self.forward.apply(points)

    def inverse(self) -> Bijection:
        return Bijection(self._inverse, self.forward, name=self.name)

    def as_affine(self) -> NDArray[np.float64] | None:
        return self.forward.as_affine()

    def affine_part(self) -> NDArray[np.float64]:
        return self.forward.affine_part()

    def bounds(self, lo: ArrayLike, hi: ArrayLike) -> tuple[Points, Points]:
        return self.forward.bounds(lo, hi)

    def to_spec(self) -> dict[str, Any]:
        return {
            "type": "bijection",
            "forward": self.forward.to_spec(),
            "inverse": self._inverse.to_spec(),
            "name": self.name,
        }

    @classmethod
    def from_spec(cls, value: Any, spec: Mapping[str, Any], ctx: ParseContext) -> Transform:
        if not isinstance(value, Mapping) or set(value) - {"forward", "inverse"} or len(value) != 2:
            raise ctx.error("a bijection is a mapping with exactly 'forward' and 'inverse'")
        return cls(
            parse_transform(value["forward"], ctx.at(".forward")),
            parse_transform(value["inverse"], ctx.at(".inverse")),
            name=str(spec.get("name", "") or ""),
        )


class Inverse(Transform):
    """``inverseOf``: the inverse of another transform."""

    kind = "inverseOf"

    def __init__(self, of: Transform) -> None:
        self.of = of
        self.ndim = of.ndim
        self._inverse = of.inverse()

    def apply(self, points: ArrayLike) -> Points:
        return self._inverse.apply(points)

    def inverse(self) -> Transform:
        return self.of

    def as_affine(self) -> NDArray[np.float64] | None:
        return self._inverse.as_affine()

    def bounds(self, lo: ArrayLike, hi: ArrayLike) -> tuple[Points, Points]:
        return self._inverse.bounds(lo, hi)

    def to_spec(self) -> dict[str, Any]:
        return {"type": "inverseOf", "transformation": self.of.to_spec()}

    @classmethod
    def from_spec(cls, value: Any, spec: Mapping[str, Any], ctx: ParseContext) -> Transform:
        inner = value.get("transformation") if isinstance(value, Mapping) else None
        if inner is None:
            raise ctx.error("inverseOf needs a 'transformation'")
        return cls(parse_transform(inner, ctx.at(".transformation")))


class ByDimension(Transform):
    """``byDimension``: lower-dimensional transforms, each on some of the axes."""

    kind = "byDimension"

    def __init__(self, parts: SequenceABC[tuple[Transform, list[int], list[int]]], ndim: int):
        self.parts = list(parts)
        self.ndim = ndim

    def apply(self, points: ArrayLike) -> Points:
        pts = _as_points(points, self.ndim)
        out = np.array(pts, copy=True)
        for item, ins, outs in self.parts:
            out[:, outs] = item.apply(pts[:, ins])
        return out

    def inverse(self) -> ByDimension:
        return ByDimension([(t.inverse(), outs, ins) for t, ins, outs in self.parts], self.ndim)

    def to_spec(self) -> dict[str, Any]:
        return {
            "type": "byDimension",
            "transformations": [
                dict(t.to_spec(), input_axes=ins, output_axes=outs) for t, ins, outs in self.parts
            ],
        }

    def as_affine(self) -> NDArray[np.float64] | None:
        out = np.eye(self.ndim + 1)
        for item, ins, outs in self.parts:
            m = item.as_affine()
            if m is None:
                return None
            k = len(ins)
            out[np.ix_(outs, ins)] = m[:k, :k]
            out[outs, self.ndim] = m[:k, k]
        return out

    @classmethod
    def from_spec(cls, value: Any, spec: Mapping[str, Any], ctx: ParseContext) -> Transform:
        items = value.get("transformations") if isinstance(value, Mapping) else value
        if not isinstance(items, list):
            raise ctx.error("byDimension lists its transformations", ".transformations")
        parts = []
        for k, item in enumerate(items):
            sub = ctx.at(f".transformations[{k}]")
            if not isinstance(item, Mapping):
                raise sub.error("a transformation is a mapping")
            ins = [int(a) for a in item.get("input_axes", [])]
            outs = [int(a) for a in item.get("output_axes", [])]
            if len(ins) != len(outs) or not ins or max(ins + outs) >= ctx.ndim:
                raise sub.error("input_axes and output_axes must list the same number of axes")
            body = {k: v for k, v in item.items() if k not in ("input_axes", "output_axes")}
            parts.append(
                (
                    parse_transform(
                        body, ParseContext(sub.source, sub.field, sub.folder, len(ins))
                    ),
                    ins,
                    outs,
                )
            )
        return cls(parts, ctx.ndim)


for _cls in (Sequence, Bijection, Inverse, ByDimension):
    TRANSFORM_KINDS.register(_cls.kind, _cls)


# ---------------------------------------------------------------------------
# displacement fields


@dataclass(frozen=True)
class _Field:
    """A displacement field on a regular grid: ``values[..., c]`` at ``origin + i * spacing``."""

    values: NDArray[np.float64]  # (Z, Y, X, 3): z, y, x components, world units
    origin: NDArray[np.float64]
    spacing: NDArray[np.float64]

    @functools.cached_property
    def extremes(self) -> tuple[Points, Points]:
        """The smallest and largest value of each component."""
        flat = self.values.reshape(-1, 3)
        return flat.min(axis=0), flat.max(axis=0)

    def sample(self, points: Points) -> Points:
        """Trilinear interpolation of the field at ``points``, clamped at the grid's faces."""
        shape = np.asarray(self.values.shape[:3])
        g = (points - self.origin) / self.spacing
        g = np.clip(g, 0.0, shape - 1.0)
        base = np.minimum(np.floor(g).astype(np.int64), np.maximum(shape - 2, 0))
        frac = g - base
        out = np.zeros((len(points), 3), dtype=np.float64)
        for dz in (0, 1):
            wz = frac[:, 0] if dz else 1.0 - frac[:, 0]
            iz = np.minimum(base[:, 0] + dz, shape[0] - 1)
            for dy in (0, 1):
                wy = frac[:, 1] if dy else 1.0 - frac[:, 1]
                iy = np.minimum(base[:, 1] + dy, shape[1] - 1)
                for dx in (0, 1):
                    wx = frac[:, 2] if dx else 1.0 - frac[:, 2]
                    ix = np.minimum(base[:, 2] + dx, shape[2] - 1)
                    out += (wz * wy * wx)[:, None] * self.values[iz, iy, ix]
        return out


_FIELDS: dict[str, _Field] = {}
_FIELDS_LOCK = threading.Lock()


def _read_field(path: str, ctx: ParseContext) -> _Field:
    """Read an OME-Zarr displacement field (cached per process: fuse threads share it)."""
    with _FIELDS_LOCK:
        found = _FIELDS.get(path)
    if found is not None:
        return found
    import zarr

    suffix = ".displacements.path"
    try:
        group = zarr.open_group(path, mode="r")
    except Exception as error:  # zarr raises several kinds for a missing or bad group
        raise ctx.error(f"cannot open the displacement field {path}: {error}", suffix) from None
    attrs: dict[str, Any] = dict(group.attrs)
    ome: Any = attrs.get("ome", attrs)
    multiscales = ome.get("multiscales") if isinstance(ome, Mapping) else None
    if not multiscales:
        raise ctx.error(f"{path}: no OME-Zarr multiscales metadata", suffix)
    ms: Any = multiscales[0]
    axes = ms.get("axes", [])
    kinds = [a.get("type") for a in axes]
    if len(axes) != 4 or kinds.count("displacement") != 1 or kinds.count("space") != 3:
        raise ctx.error(
            f"{path}: axes must be one of type 'displacement' and three 'space', got {kinds}",
            suffix,
        )
    dataset = ms["datasets"][0]
    scale = np.ones(4)
    offset = np.zeros(4)
    for t in dataset.get("coordinateTransformations", []):
        if t.get("type") == "scale":
            scale = np.asarray(t["scale"], dtype=np.float64)
        elif t.get("type") == "translation":
            offset = np.asarray(t["translation"], dtype=np.float64)
    stored: Any = group[str(dataset["path"])]
    array = np.asarray(stored[...], dtype=np.float64)
    comp = kinds.index("displacement")
    if array.shape[comp] != 3:
        raise ctx.error(
            f"{path}: the displacement axis has length {array.shape[comp]}, not 3", suffix
        )
    space = [k for k in range(4) if k != comp]
    values = np.ascontiguousarray(np.moveaxis(array, comp, -1))
    if not np.all(np.isfinite(values)):
        raise ctx.error(f"{path}: the field holds NaN or infinity", suffix)
    result = _Field(values, offset[space], scale[space])
    with _FIELDS_LOCK:
        _FIELDS[path] = result
    return result


_MAX_ITERATIONS = 200
# From this many points the compiled field code (transforms_numba) is used.
_COMPILED_POINTS = 4096


class Displacements(Transform):
    """``p -> p + D(p)``, ``D`` a displacement field (OME-Zarr 0.6 / RFC-5 ``displacements``).

    The field is an OME-Zarr image with one axis of type ``displacement``
    (length 3: z, y, x components) and three ``space`` axes; its level-0
    ``scale`` and ``translation`` place its grid in the item's input space,
    in world units, and its values are world units. ``D`` is trilinear
    between grid points and constant beyond the grid's faces (edge values).

    The inverse is numeric (:class:`InverseDisplacements`) unless a
    ``bijection`` item gives it.
    """

    kind = "displacements"

    def __init__(
        self,
        path: str,
        *,
        interpolation: str = "linear",
        name: str = "",
        tolerance: float | None = None,
        source: str = "",
        field_name: str = "",
    ) -> None:
        self.path = path
        self.interpolation = interpolation
        self.name = name
        self.ndim = 3
        self.tolerance = tolerance
        self._ctx = ParseContext(source or path, field_name or "displacements")
        self.field = _read_field(path, self._ctx)

    def apply(self, points: ArrayLike) -> Points:
        pts = _as_points(points, 3)
        if len(pts) >= _COMPILED_POINTS:
            from tilefusion.transforms_numba import displace

            return displace(pts, self.field)
        return pts + self.field.sample(pts)

    def inverse(self) -> InverseDisplacements:
        return InverseDisplacements(self)

    def bounds(self, lo: ArrayLike, hi: ArrayLike) -> tuple[Points, Points]:
        # Every point moves by at least the smallest and at most the largest value.
        least, most = self.field.extremes
        return (
            np.asarray(lo, dtype=np.float64) + np.minimum(least, 0.0),
            np.asarray(hi, dtype=np.float64) + np.maximum(most, 0.0),
        )

    def max_displacement(self) -> float:
        return float(np.max(np.abs(self.field.values))) if self.field.values.size else 0.0

    def to_spec(self) -> dict[str, Any]:
        spec: dict[str, Any] = {
            "type": "displacements",
            "path": self.path,
            "interpolation": self.interpolation,
            "name": self.name,
        }
        if self.tolerance is not None:
            spec["tolerance"] = self.tolerance
        return spec

    def check_invertible(self) -> None:
        """Invert the forward images of the grid points; refuse a field that does not converge.

        Raises
        ------
        InputError
            Naming the field, when the fixed-point iteration does not reach
            the tolerance (the field folds space: its gradient is too steep).
        """
        f = self.field
        axes = [f.origin[d] + f.spacing[d] * np.arange(f.values.shape[d]) for d in range(3)]
        grid = np.stack([g.ravel() for g in np.meshgrid(*axes, indexing="ij")], axis=1)
        self.inverse().apply(self.apply(grid))

    @classmethod
    def from_spec(cls, value: Any, spec: Mapping[str, Any], ctx: ParseContext) -> Transform:
        if ctx.ndim != 3:
            raise ctx.error("displacement fields need 3 axes (z, y, x)")
        if not isinstance(value, Mapping) or "path" not in value:
            raise ctx.error("a mapping with 'path' (and 'interpolation')", ".displacements")
        unknown = set(value) - {"path", "interpolation", "tolerance", "type", "name"}
        if unknown:
            raise ctx.error("unknown key", f".displacements.{sorted(unknown)[0]}")
        interpolation = str(value.get("interpolation", "linear"))
        if interpolation != "linear":
            raise ctx.error(
                f"only 'linear' interpolation is supported, got {interpolation!r}",
                ".displacements.interpolation",
            )
        raw = str(value["path"])
        path = raw
        if "://" not in raw and ctx.folder is not None:
            path = str((ctx.folder / os.path.expanduser(raw)).resolve())
        tolerance = value.get("tolerance", ctx.tolerance)
        return cls(
            path,
            interpolation=interpolation,
            name=str(spec.get("name", "") or value.get("name", "") or ""),
            tolerance=None if tolerance is None else float(tolerance),
            source=ctx.source,
            field_name=ctx.field,
        )


class InverseDisplacements(Transform):
    """The numeric inverse of ``p -> p + D(p)``: ``q`` with ``q + D(q) = p``.

    Fixed-point iteration ``q <- p - D(q)`` from ``q = p - D(p)``, until the
    residual ``|q + D(q) - p|`` is at most ``tolerance`` on every axis (the
    field's ``tolerance``, else a thousandth of its smallest grid spacing).
    It converges where ``D`` changes by less than its distance (gradient
    below 1), which a field that does not fold space satisfies.
    """

    kind = "inverseOf"

    def __init__(self, of: Displacements) -> None:
        self.of = of
        self.ndim = 3
        self.tolerance = (
            of.tolerance if of.tolerance is not None else 1e-3 * float(np.min(of.field.spacing))
        )

    def apply(self, points: ArrayLike) -> Points:
        p = _as_points(points, 3)
        tolerance = self.tolerance * _TIGHTER.get()
        if len(p) >= _COMPILED_POINTS:
            from tilefusion.transforms_numba import invert_displacement

            q, worst = invert_displacement(p, self.of.field, tolerance, _MAX_ITERATIONS)
            if worst <= tolerance:
                return q
            self._refuse(worst)
        q = p - self.of.field.sample(p)
        for _ in range(_MAX_ITERATIONS):
            residual = q + self.of.field.sample(q) - p
            if not len(residual) or np.max(np.abs(residual)) <= tolerance:
                return q
            q = q - residual
        self._refuse(float(np.max(np.abs(q + self.of.field.sample(q) - p))))
        return q

    def _refuse(self, worst: float) -> None:
        raise self.of._ctx.error(
            f"the displacement field {self.of.path} cannot be inverted numerically: "
            f"the fixed-point iteration did not converge to {self.tolerance:.3g} in "
            f"{_MAX_ITERATIONS} steps (residual {worst:.3g}); the field folds space, or "
            "give its inverse with a 'bijection' item"
        )

    def inverse(self) -> Displacements:
        return self.of

    def bounds(self, lo: ArrayLike, hi: ArrayLike) -> tuple[Points, Points]:
        least, most = self.of.field.extremes
        return (
            np.asarray(lo, dtype=np.float64) - np.maximum(most, 0.0),
            np.asarray(hi, dtype=np.float64) - np.minimum(least, 0.0),
        )

    def to_spec(self) -> dict[str, Any]:
        return {"type": "inverseOf", "transformation": self.of.to_spec()}


TRANSFORM_KINDS.register("displacements", Displacements)


# ---------------------------------------------------------------------------
# parsing


_RFC_FIELDS = {"type", "name", "input", "output"}


def parse_transform(spec: Any, context: ParseContext) -> Transform:
    """Build one transform from a manifest item or an RFC-5 object.

    Raises
    ------
    InputError
        Naming the file and the item, for an unknown kind or a bad value.
    """
    if not isinstance(spec, Mapping):
        raise context.error("a transform is a mapping (e.g. {translation: [z, y, x]})")
    if "type" in spec:
        kind = str(spec["type"])
        value = (
            spec[kind] if kind in spec else {k: v for k, v in spec.items() if k not in _RFC_FIELDS}
        )
    else:
        kinds = [k for k in spec if k != "name"]
        if len(kinds) != 1:
            raise context.error(
                f"needs exactly one of {', '.join(TRANSFORM_KINDS.names())} "
                "(and an optional 'name')"
            )
        known = kinds
        kind = known[0]
        value = spec[kind]
    try:
        cls = TRANSFORM_KINDS.get(kind)
    except UnknownEntry as error:
        raise context.error(str(error)) from None
    if kind == "affine_zyx":
        spec = dict(spec, type="affine_zyx")
    try:
        out = cls.from_spec(value, spec, context)
    except InputError:
        raise
    except (TypeError, ValueError, KeyError) as error:
        raise context.error(f"bad {kind} transform: {error}") from None
    if not isinstance(out, Transform):
        raise context.error(f"transform kind {kind!r} did not build a Transform")
    return out


def parse_chain(items: Any, context: ParseContext) -> Sequence:
    """Read a list of items in BigStitcher order (the last listed is applied first).

    Each displacement field gets the tolerance of its numeric inverse from
    the items applied before it: 0.01 of the smallest tile voxel there
    (unless it states its own), and is checked to invert before any job.
    """
    if not isinstance(items, list):
        raise context.error("must be a list")
    parsed = [parse_transform(item, context.at(f"[{k}]")) for k, item in enumerate(items)]
    for k, item in enumerate(parsed):
        if isinstance(item, Displacements) and item.tolerance is None:
            before = Sequence(parsed[k + 1 :]).affine_part() if k + 1 < len(parsed) else np.eye(4)
            voxel = float(np.min(np.linalg.norm(before[:3, :3], axis=0)))
            item.tolerance = 0.01 * voxel
        if isinstance(item, Displacements):
            item.check_invertible()
    return Sequence(parsed)


def transform_from_json(spec: Mapping[str, Any], *, source: str = "plan") -> Transform:
    """Rebuild a transform from :meth:`Transform.to_spec` (as plans store it)."""
    return parse_transform(spec, ParseContext(source, "transform"))


def chain_calibration(chain: Sequence) -> tuple[float, float, float] | None:
    """Diagonal of the chain's ``calibration`` item (named so, diagonal, positive), if any."""
    found = None
    for item in chain.items:
        matrix = item.as_affine()
        if item.name.lower() != "calibration" or matrix is None or item.ndim != 3:
            continue
        linear = matrix[:3, :3]
        if (
            np.all(linear == np.diag(np.diag(linear)))
            and np.all(matrix[:3, 3] == 0)
            and np.all(np.diag(linear) > 0)
        ):
            found = (float(linear[0, 0]), float(linear[1, 1]), float(linear[2, 2]))
    return found


def unit_affine(chain: Sequence) -> NDArray[np.float64] | None:
    """The item that sets a chain's world unit: the last listed affine (applied first).

    BigStitcher lists the calibration last, or the translation to the nominal
    grid where there is no calibration; registration items before it (an
    affine that rescales a tile by 1e-4, say) do not change the unit.
    """
    for item in reversed(chain.items):
        matrix = item.as_affine()
        if matrix is not None:
            return matrix
    return None


# ---------------------------------------------------------------------------
# OME-Zarr 0.6 scenes


def scene_transform(
    scene: Mapping[str, Any], source: str, target: str, *, origin: str
) -> Transform:
    """The transform from coordinate system ``source`` to ``target`` of an RFC-5 scene.

    The scene's ``coordinateTransformations`` make a graph whose edges run
    from ``input`` to ``output`` (the transform) and back (its inverse); the
    shortest path is composed.

    Raises
    ------
    InputError
        Naming ``origin``, for an unknown coordinate system, no path, or an
        item that does not parse or invert.
    """
    systems = {
        str(cs.get("name")): len(cs.get("axes", []))
        for cs in scene.get("coordinateSystems", [])
        if isinstance(cs, Mapping)
    }
    for role, name in (("source", source), ("target", target)):
        if name not in systems:
            raise InputError(origin, "scene.coordinateSystems", f"no {role} system {name!r}")
    edges: dict[str, list[tuple[str, int, bool]]] = {}
    items = list(scene.get("coordinateTransformations", []))
    for k, item in enumerate(items):
        if not isinstance(item, Mapping):
            continue
        a, b = str(item.get("input")), str(item.get("output"))
        edges.setdefault(a, []).append((b, k, False))
        edges.setdefault(b, []).append((a, k, True))
    path: dict[str, list[tuple[int, bool]]] = {source: []}
    frontier = [source]
    while frontier and target not in path:
        nxt = []
        for node in frontier:
            for other, k, backwards in edges.get(node, []):
                if other not in path:
                    path[other] = [*path[node], (k, backwards)]
                    nxt.append(other)
        frontier = nxt
    if target not in path:
        raise InputError(
            origin, "scene.coordinateTransformations", f"no path from {source!r} to {target!r}"
        )
    steps: list[Transform] = []
    for k, backwards in path[target]:
        ndim = systems.get(str(items[k].get("input")), systems[source])
        ctx = ParseContext(origin, f"scene.coordinateTransformations[{k}]", ndim=ndim)
        step = parse_transform(items[k], ctx)
        try:
            steps.append(step.inverse() if backwards else step)
        except ValueError as error:
            raise ctx.error(f"cannot be inverted: {error}") from None
    # Sequence applies its last item first.
    return Sequence(steps[::-1]) if steps else Affine(np.eye(systems[source] + 1))


def transform_points_in_zarr(
    path: str | os.PathLike[str], source: str, target: str, coordinates: Any
) -> list[list[float]]:
    """Map points between two coordinate systems of an OME-Zarr hierarchy's scene.

    Reads ``attributes.ome.scene`` of the group at ``path`` (``zarr.json``;
    ``.zattrs`` for Zarr v2) and applies :func:`scene_transform`.
    """
    import json

    root = Path(path)
    origin = str(root)
    document = None
    for name in ("zarr.json", ".zattrs"):
        try:
            document = json.loads((root / name).read_text(encoding="utf-8"))
            break
        except FileNotFoundError:
            continue
        except (OSError, ValueError) as error:
            raise InputError(origin, name, f"cannot read: {error}") from None
    if not isinstance(document, Mapping):
        raise InputError(origin, "zarr.json", "no Zarr group metadata")
    attrs = document.get("attributes", document)
    ome = attrs.get("ome", attrs) if isinstance(attrs, Mapping) else None
    scene = ome.get("scene") if isinstance(ome, Mapping) else None
    if not isinstance(scene, Mapping):
        raise InputError(origin, "attributes.ome.scene", "missing: not an OME-Zarr 0.6 scene")
    transform = scene_transform(scene, source, target, origin=origin)
    try:
        points = np.asarray(coordinates, dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError("command line", "COORDINATES", "not an array of numbers") from None
    if points.ndim != 2 or points.shape[1] != transform.ndim:
        raise InputError(
            "command line",
            "COORDINATES",
            f"needs a list of {transform.ndim}-element points, got shape {list(points.shape)}",
        )
    return [[float(v) for v in row] for row in transform.apply(points)]


# ---------------------------------------------------------------------------
# sampling maps: coordinates per block


def block_coordinates(
    output_to_tile: Transform,
    lo_zyx: SequenceABC[int],
    shape_zyx: SequenceABC[int],
    *,
    device: str | None = None,
    tolerance: float = 0.01,
) -> NDArray[np.float64]:
    """Tile coordinates of every voxel of an output block: a ``(3, Z, Y, X)`` array.

    ``output_to_tile`` maps output voxel indices (level 0) to tile voxel
    indices; the block's voxels are ``lo + (k, j, i)``.

    On the CPU a map that is not affine is evaluated exactly on a lattice
    of every 8th (else 4th, 2nd) voxel per axis, plus each axis's last, and
    interpolated trilinearly in between, which is exact for the map's affine
    part; a lattice is used only when, at the centre of every one of its
    cells, the interpolated coordinates are within ``tolerance / 2`` tile
    voxels of the exact ones (else the next finer, down to every voxel).
    On a CUDA ``device`` every voxel is evaluated exactly with torch
    (float64), for the transforms that can (affines, displacement fields and
    their numeric inverses; others on the CPU).
    """
    shape = tuple(int(n) for n in shape_zyx)
    lo = np.asarray(lo_zyx, dtype=np.float64)
    matrix = output_to_tile.as_affine()
    if matrix is not None:
        axes = [np.arange(n, dtype=np.float64) + a for a, n in zip(lo, shape)]
        grid = np.meshgrid(*axes, indexing="ij")
        return np.stack(
            [
                ((matrix[d, 3] + matrix[d, 0] * grid[0]) + matrix[d, 1] * grid[1])
                + matrix[d, 2] * grid[2]
                for d in range(3)
            ]
        )
    if device is not None and str(device).startswith("cuda"):
        import torch

        axes_t = [
            torch.arange(n, dtype=torch.float64, device=device) + float(a)
            for a, n in zip(lo, shape)
        ]
        grid_t = torch.meshgrid(*axes_t, indexing="ij")
        pts = torch.stack([g.reshape(-1) for g in grid_t], dim=1)
        out = _apply_torch(output_to_tile, pts)
        return np.ascontiguousarray(out.T.reshape((3, *shape)).cpu().numpy())
    for step in (8, 4, 2):
        if min(shape) < 2 or max(shape) <= step:
            continue
        nodes = [_lattice(n, step) for n in shape]
        # Lattice points are inverted 100 times tighter: their own residual
        # must not hide in (or spoil) the interpolation check.
        token = _TIGHTER.set(0.01)
        try:
            exact = _evaluate(output_to_tile, lo, nodes)
            centres = [(a[:-1] + a[1:]) / 2.0 if len(a) > 1 else a for a in nodes]
            check = _evaluate(output_to_tile, lo, centres)
        finally:
            _TIGHTER.reset(token)
        guess = _interpolate(exact, nodes, centres)
        if np.max(np.abs(guess - check)) <= tolerance / 2.0:
            from tilefusion.transforms_numba import interpolate_lattice

            cells, fractions = [], []
            for node, n in zip(nodes, shape):
                target = np.arange(n, dtype=np.float64)
                cell = np.clip(np.searchsorted(node, target, side="right") - 1, 0, len(node) - 2)
                cells.append(cell.astype(np.int64))
                fractions.append((target - node[cell]) / (node[cell + 1] - node[cell]))
            return interpolate_lattice(exact, cells, fractions)
    return _evaluate(output_to_tile, lo, [np.arange(n, dtype=np.float64) for n in shape])


_TIGHTER: contextvars.ContextVar[float] = contextvars.ContextVar("tighter", default=1.0)
"""Factor on numeric inverses' tolerance, for this thread's current evaluation."""


def _lattice(n: int, step: int) -> NDArray[np.float64]:
    nodes = np.arange(0, n, step, dtype=np.float64)
    if nodes[-1] != n - 1:
        nodes = np.append(nodes, float(n - 1))
    return nodes


def _evaluate(
    transform: Transform, lo: NDArray[np.float64], axes: list[NDArray[np.float64]]
) -> NDArray[np.float64]:
    """The map at every point of a separable grid (block-local ``axes``), ``(3, ...)``."""
    grid = np.meshgrid(*[a + o for a, o in zip(axes, lo)], indexing="ij")
    pts = np.stack([g.ravel() for g in grid], axis=1)
    shape = tuple(len(a) for a in axes)
    return np.ascontiguousarray(transform.apply(pts).T.reshape((3, *shape)))


def _interpolate(
    values: NDArray[np.float64],
    nodes: list[NDArray[np.float64]],
    targets: list[NDArray[np.float64]],
) -> NDArray[np.float64]:
    """Trilinear interpolation of ``values`` (on the grid ``nodes``) at the grid ``targets``."""
    out = values
    for axis in range(3):
        node, target = nodes[axis], targets[axis]
        if len(node) == 1:
            out = np.repeat(out, len(target), axis=axis + 1)
            continue
        cell = np.clip(np.searchsorted(node, target, side="right") - 1, 0, len(node) - 2)
        t = (target - node[cell]) / (node[cell + 1] - node[cell])
        shape = [1, 1, 1, 1]
        shape[axis + 1] = len(target)
        t = t.reshape(shape)
        a = np.take(out, cell, axis=axis + 1)
        b = np.take(out, cell + 1, axis=axis + 1)
        out = a + t * (b - a)
    return np.ascontiguousarray(out)


def _apply_torch(transform: Transform, pts: Any) -> Any:
    """``transform.apply`` on a torch tensor of points, where the kind allows it."""
    import torch

    matrix = transform.as_affine()
    if matrix is not None:
        m = torch.as_tensor(matrix, dtype=pts.dtype, device=pts.device)
        return pts @ m[:-1, :-1].T + m[:-1, -1]
    if isinstance(transform, Sequence):
        for item in transform._runs:
            pts = _apply_torch(item, pts)
        return pts
    if isinstance(transform, Bijection):
        return _apply_torch(transform.forward, pts)
    if isinstance(transform, Displacements):
        return pts + _sample_torch(transform.field, pts)
    if isinstance(transform, InverseDisplacements):
        f = transform.of.field
        q = pts - _sample_torch(f, pts)
        for _ in range(_MAX_ITERATIONS):
            residual = q + _sample_torch(f, q) - pts
            done = residual.abs().amax(dim=1) <= transform.tolerance
            if bool(done.all()):
                return q
            # Points stop where they converge, as the compiled CPU code's do.
            q = torch.where(done[:, None], q, q - residual)
        transform.apply(q.cpu().numpy()[:1])  # raises the refusal, naming the field
        return q
    out = transform.apply(pts.cpu().numpy())
    return torch.as_tensor(out, dtype=pts.dtype, device=pts.device)


_TORCH_FIELDS: dict[tuple[int, str], Any] = {}


def _sample_torch(f: _Field, pts: Any) -> Any:
    """:meth:`_Field.sample` in torch (same clamping and trilinear weights)."""
    import torch

    key = (id(f), str(pts.device))
    values = _TORCH_FIELDS.get(key)
    if values is None:
        values = torch.as_tensor(f.values, dtype=pts.dtype, device=pts.device)
        _TORCH_FIELDS[key] = values
    shape = torch.as_tensor(f.values.shape[:3], dtype=pts.dtype, device=pts.device)
    origin = torch.as_tensor(f.origin, dtype=pts.dtype, device=pts.device)
    spacing = torch.as_tensor(f.spacing, dtype=pts.dtype, device=pts.device)
    g = (pts - origin) / spacing
    g = torch.minimum(torch.clamp(g, min=0.0), shape - 1.0)
    base = torch.minimum(torch.floor(g), torch.clamp(shape - 2.0, min=0.0))
    frac = g - base
    base_i = base.long()
    n = [int(s) for s in f.values.shape[:3]]
    out = torch.zeros_like(pts)
    for dz in (0, 1):
        wz = frac[:, 0] if dz else 1.0 - frac[:, 0]
        iz = torch.clamp(base_i[:, 0] + dz, max=n[0] - 1)
        for dy in (0, 1):
            wy = frac[:, 1] if dy else 1.0 - frac[:, 1]
            iy = torch.clamp(base_i[:, 1] + dy, max=n[1] - 1)
            for dx in (0, 1):
                wx = frac[:, 2] if dx else 1.0 - frac[:, 2]
                ix = torch.clamp(base_i[:, 2] + dx, max=n[2] - 1)
                out += (wz * wy * wx)[:, None] * values[iz, iy, ix]
    return out
