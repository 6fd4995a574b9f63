"""The output store: Zarr arrays (pixels) and OME-NGFF metadata, kept apart.

Pixels are written by the fuse and downsample jobs through
:class:`tilefusion.writer.LevelWriter`; the OME-NGFF ``multiscales`` and ``omero`` metadata is
written once, by :func:`write_ngff_metadata`, after every pixel job succeeded.
The NGFF version is an object (:class:`NgffFormat`), not a string compared
in branches.
"""

from __future__ import annotations

import shutil
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import zarr

from tilefusion.errors import InputError
from tilefusion.plan import Plan

__all__ = [
    "FormatV04",
    "FormatV05",
    "NgffFormat",
    "check_owner",
    "format_from_name",
    "open_level",
    "prepare_store",
    "write_ngff_metadata",
]

OWNER_KEY = "tilefusion"
AXES = [
    {"name": "z", "type": "space"},
    {"name": "y", "type": "space"},
    {"name": "x", "type": "space"},
]


class NgffFormat(ABC):
    """One OME-NGFF version: its Zarr format and how metadata is laid out."""

    version: ClassVar[str]
    zarr_format: ClassVar[int]
    sharding: ClassVar[bool]

    @abstractmethod
    def wrap(self, ome: dict[str, Any]) -> dict[str, Any]:
        """Place the OME metadata in the group's attributes."""

    @abstractmethod
    def unwrap(self, attrs: dict[str, Any]) -> dict[str, Any]:
        """The OME metadata from a group's attributes."""

    def multiscales(self, plan: Plan, *, name: str) -> dict[str, Any]:
        axes = [dict(a, unit=plan.unit) for a in AXES]
        datasets = [
            {
                "path": str(k),
                "coordinateTransformations": [
                    {"type": "scale", "scale": list(level.scale_zyx)},
                    {"type": "translation", "translation": list(level.translation_zyx)},
                ],
            }
            for k, level in enumerate(plan.levels)
        ]
        entry: dict[str, Any] = {
            "name": name,
            "axes": axes,
            "datasets": datasets,
            "type": "mean",
        }
        return entry

    @abstractmethod
    def chunk_key(self, index: Sequence[int]) -> str:
        """Store key of a stored object (chunk or shard) of one array."""


class FormatV04(NgffFormat):
    """OME-NGFF 0.4: Zarr v2, ``multiscales`` in ``.zattrs``, no sharding."""

    version = "0.4"
    zarr_format = 2
    sharding = False

    def wrap(self, ome: dict[str, Any]) -> dict[str, Any]:
        out = dict(ome)
        out["multiscales"] = [dict(m, version=self.version) for m in ome["multiscales"]]
        return out

    def unwrap(self, attrs: dict[str, Any]) -> dict[str, Any]:
        return attrs

    def chunk_key(self, index: Sequence[int]) -> str:
        return "/".join(str(i) for i in index)


class FormatV05(NgffFormat):
    """OME-NGFF 0.5: Zarr v3 with sharding, metadata under ``attributes.ome``."""

    version = "0.5"
    zarr_format = 3
    sharding = True

    def wrap(self, ome: dict[str, Any]) -> dict[str, Any]:
        return {"ome": dict(ome, version=self.version)}

    def unwrap(self, attrs: dict[str, Any]) -> dict[str, Any]:
        ome: dict[str, Any] = attrs.get("ome", {})
        return ome

    def chunk_key(self, index: Sequence[int]) -> str:
        return "c/" + "/".join(str(i) for i in index)


_FORMATS: dict[str, NgffFormat] = {
    "ome-zarr-0.4": FormatV04(),
    "ome-zarr-0.5": FormatV05(),
}


def format_from_name(name: str) -> NgffFormat:
    """Return the :class:`NgffFormat` for a config name like ``ome-zarr-0.5``."""
    try:
        return _FORMATS[name]
    except KeyError:
        raise InputError(
            "config", "output.format", f"{name!r} is not one of {list(_FORMATS)}"
        ) from None


def _compressors(codec: str, level: int, zarr_format: int) -> Any:
    import numcodecs

    if codec == "none":
        return None
    if zarr_format == 2:
        v2 = {
            "zstd": lambda: numcodecs.Zstd(level=level),
            "blosc-zstd": lambda: numcodecs.Blosc(
                "zstd", clevel=level, shuffle=numcodecs.Blosc.SHUFFLE
            ),
            "blosc-lz4": lambda: numcodecs.Blosc(
                "lz4", clevel=level, shuffle=numcodecs.Blosc.SHUFFLE
            ),
            "gzip": lambda: numcodecs.GZip(level=level),
        }
        return v2[codec]()
    from zarr.codecs import BloscCodec, GzipCodec, ZstdCodec

    v3 = {
        "zstd": lambda: ZstdCodec(level=level),
        "blosc-zstd": lambda: BloscCodec(cname="zstd", clevel=level, shuffle="shuffle"),
        "blosc-lz4": lambda: BloscCodec(cname="lz4", clevel=level, shuffle="shuffle"),
        "gzip": lambda: GzipCodec(level=level),
    }
    return v3[codec]()


def _is_ours(path: Path) -> dict[str, Any] | None:
    try:
        group = zarr.open_group(str(path), mode="r")
    except Exception:
        return None
    owner = group.attrs.get(OWNER_KEY)
    return owner if isinstance(owner, dict) else None


def check_owner(path: str | Path, *, identity: str, overwrite: bool) -> str:
    """Decide what may happen to an existing output, before anything is written.

    Returns
    -------
    str
        ``"absent"`` (nothing there), ``"resume"`` (written by this workflow
        with the same identity) or ``"replace"`` (``overwrite`` was asked).

    Raises
    ------
    InputError
        When something else is at ``path`` and ``overwrite`` is not set.
    """
    path = Path(path)
    if not path.exists():
        return "absent"
    owner = _is_ours(path)
    if owner is not None and owner.get("identity") == identity:
        return "resume"
    if overwrite:
        return "replace"
    what = (
        "was written with another configuration"
        if owner is not None
        else "exists and was not written by tilefusion"
    )
    raise InputError(
        str(path),
        "output.path",
        f"{what}; set output.overwrite: true to replace it, or choose another path",
    )


def prepare_store(
    plan: Plan,
    path: str | Path,
    *,
    ngff: NgffFormat,
    dtype: str,
    codec: str = "zstd",
    level: int = 1,
    identity: str,
    overwrite: bool = False,
) -> str:
    """Create the output group and every level's (empty) array.

    An existing output written by this workflow with the same ``identity``
    is kept as it is (a rerun resumes). Anything else at ``path`` is refused
    unless ``overwrite``.

    Returns
    -------
    str
        ``"created"``, ``"resumed"`` or ``"replaced"``.
    """
    path = Path(path)
    state = check_owner(path, identity=identity, overwrite=overwrite)
    if state == "resume":
        return "resumed"
    if state == "replace":
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    group = zarr.open_group(str(path), mode="w-", zarr_format=ngff.zarr_format)  # type: ignore[arg-type]
    for k, lev in enumerate(plan.levels):
        kwargs: dict[str, Any] = {
            "name": str(k),
            "shape": lev.shape_zyx,
            "chunks": lev.chunks_zyx,
            "dtype": dtype,
            "fill_value": 0,
            "compressors": _compressors(codec, level, ngff.zarr_format),
            "config": {"write_empty_chunks": False},
        }
        if ngff.zarr_format == 3:
            kwargs["dimension_names"] = ["z", "y", "x"]
            if lev.shards_zyx != lev.chunks_zyx:
                kwargs["shards"] = lev.shards_zyx
        else:
            kwargs["chunk_key_encoding"] = {"name": "v2", "separator": "/"}
        group.create_array(**kwargs)
    # Written last: a store without the owner record is not ours, so a crash
    # above is refused on the next run rather than silently resumed.
    group.attrs[OWNER_KEY] = {"identity": identity, "plan_dataset": plan.dataset}
    return "replaced" if state == "replace" else "created"


def open_level(path: str | Path, level: int, *, mode: str = "r+") -> zarr.Array:
    """Open one level's array."""
    return zarr.open_array(str(Path(path) / str(level)), mode=mode)


def write_ngff_metadata(
    plan: Plan,
    path: str | Path,
    *,
    ngff: NgffFormat,
    name: str,
    window: tuple[float, float],
    dtype_max: float,
) -> dict[str, Any]:
    """Write ``multiscales`` and ``omero`` metadata into the output group."""
    group = zarr.open_group(str(path), mode="r+")
    omero = {
        "name": name,
        "version": ngff.version,
        "channels": [
            {
                "label": name,
                "color": "FFFFFF",
                "active": True,
                "coefficient": 1,
                "family": "linear",
                "inverted": False,
                "window": {
                    "min": 0.0,
                    "max": float(dtype_max),
                    "start": float(window[0]),
                    "end": float(window[1]),
                },
            }
        ],
        "rdefs": {"model": "greyscale", "defaultT": 0, "defaultZ": plan.shape_zyx[0] // 2},
    }
    ome = {"multiscales": [ngff.multiscales(plan, name=name)], "omero": omero}
    wrapped = ngff.wrap(ome)
    attrs = dict(group.attrs)
    attrs.update(wrapped)
    group.attrs.update(attrs)
    return wrapped
