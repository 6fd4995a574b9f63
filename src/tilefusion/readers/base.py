"""The dataset model every reader returns.

A :class:`Dataset` is what planning and fusion need to know about an
acquisition, independent of the file format it came from: per view, where its
pixels are (:class:`ArraySource`), its shape, voxel size and voxel-to-world
model (zyx, see :mod:`tilefusion.geometry`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np
from numpy.typing import NDArray

if TYPE_CHECKING:
    from tilefusion.transforms import Transform

__all__ = ["ArraySource", "Dataset", "View"]

ArrayFormat = Literal["zarr", "n5", "hdf5", "tiff", "memory", "unsupported"]


@dataclass(frozen=True)
class ArraySource:
    """Where one view's pixels are stored.

    Attributes
    ----------
    format : {"zarr", "n5", "hdf5", "tiff", "memory", "unsupported"}
        Container format. ``zarr`` covers Zarr v2 and v3. ``unsupported``
        marks pixels that tilefusion cannot read (e.g. a ``bdv.remote`` image
        loader): the geometry can still be planned, opening fails clearly.
    path : str
        Absolute path (or URI) of the container; for ``unsupported``, the file
        that names the pixels (usually the XML).
    key : str
        Array inside the container ("" for the container itself). For
        ``tiff``, ``"series=S,channel=C"`` (either part optional); for
        ``unsupported``, the image loader's name.
    """

    format: ArrayFormat
    path: str
    key: str = ""


@dataclass(frozen=True)
class View:
    """One tile of one setup at one timepoint.

    Attributes
    ----------
    setup, timepoint : int
        BigDataViewer ids (a tile manifest numbers its tiles as setups).
    shape_zyx : tuple of int
        Array shape at full resolution.
    voxel_size_zyx : tuple of float
        Physical voxel size, in ``Dataset.unit``.
    model : ndarray of shape (4, 4)
        Voxel (zyx) to world (zyx) map: the composed registration chain.
    source : ArraySource
        Where the pixels are.
    attributes : mapping of str to int
        BDV attributes of the setup: channel, illumination, tile, angle.
    calibration_zyx : tuple of float or None
        Diagonal of the chain's ``calibration`` transform, when it has one.
    dtype : str or None
        Pixel type the metadata declares, when it declares one.
    transform : Transform or None
        The registration as read: its chain of transform objects
        (:mod:`tilefusion.transforms`), BigStitcher order. ``model`` is its
        matrix where the chain is affine, else its affine part (flows taken
        as the identity). None: ``model`` is the whole registration.
    """

    setup: int
    timepoint: int
    shape_zyx: tuple[int, int, int]
    voxel_size_zyx: tuple[float, float, float]
    model: NDArray[np.float64]
    source: ArraySource
    attributes: Mapping[str, int] = field(default_factory=dict)
    calibration_zyx: tuple[float, float, float] | None = None
    dtype: str | None = None
    transform: Transform | None = field(default=None, compare=False)

    @property
    def name(self) -> str:
        """Stable identifier used in plans and manifests."""
        return f"t{self.timepoint}-s{self.setup}"


@dataclass(frozen=True)
class Dataset:
    """An acquisition: its views and the physical unit of their voxel sizes.

    Attributes
    ----------
    path : str
        The XML or manifest the dataset was read from.
    unit : str
        Physical unit name ("micrometer", "nm", ...).
    views : tuple of View
        Every view with a registration and an image, in (timepoint, setup) order.
    """

    path: str
    unit: str
    views: tuple[View, ...]

    def select(
        self,
        *,
        timepoint: int | None = None,
        channel: int | None = None,
        illumination: int | None = None,
        angle: int | None = None,
        setups: list[int] | None = None,
    ) -> Dataset:
        """Return the dataset restricted to one selection of views."""
        wanted = {
            k: v
            for k, v in {"channel": channel, "illumination": illumination, "angle": angle}.items()
            if v is not None
        }
        views = tuple(
            v
            for v in self.views
            if (timepoint is None or v.timepoint == timepoint)
            and (setups is None or v.setup in setups)
            and all(v.attributes.get(k, val) == val for k, val in wanted.items())
        )
        return Dataset(self.path, self.unit, views)
