"""The output store: Zarr arrays (pixels) and OME-NGFF metadata, kept apart.

Pixels are written by the fuse and downsample jobs through
:class:`tilefusion.writer.LevelWriter`; the OME-NGFF ``multiscales`` and ``omero`` metadata is
written once, by :func:`write_ngff_metadata`, after every pixel job succeeded.
The NGFF version is an object (:class:`NgffFormat`), not a string compared
in branches.

The output may be a local folder or a URL (``s3://bucket/fused.ome.zarr``):
every read and write goes through :mod:`tilefusion.fs`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import zarr

from tilefusion import fs
from tilefusion.atomic import write_bytes_atomic, write_json_atomic
from tilefusion.errors import InputError
from tilefusion.plan import Plan

__all__ = [
    "FormatV04",
    "FormatV05",
    "NgffFormat",
    "check_owner",
    "format_from_name",
    "lock_output",
    "open_level",
    "prepare_store",
    "read_owner",
    "repair_metadata",
    "write_ngff_metadata",
]

log = logging.getLogger("tilefusion")

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


IDENTITY_FILE = ".tilefusion-identity.json"
"""The output's identity record, written (atomically) before anything else in it."""


def read_owner(path: str | Path) -> dict[str, Any] | None:
    """The identity record of an output tilefusion wrote, or None.

    The record file comes first; outputs of earlier versions hold it in the
    group's attributes only.
    """
    try:
        record = json.loads(fs.read_bytes(fs.join(path, IDENTITY_FILE)))
    except (OSError, ValueError):
        record = None
    if isinstance(record, dict) and isinstance(record.get("identity"), str):
        return record
    try:
        group = zarr.open_group(fs.zarr_store(path), mode="r")
        owner = group.attrs.get(OWNER_KEY)
    except Exception:  # an unreadable group is simply not known to be ours
        return None
    return owner if isinstance(owner, dict) else None


def _is_within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def _url_within(inner: str, outer: str) -> bool:
    inner, outer = inner.rstrip("/"), outer.rstrip("/")
    return inner == outer or inner.startswith(outer + "/")


def _refuse(path: str | Path, problem: str) -> InputError:
    return InputError(str(path), "output.path", problem)


def _check_location(path: Path) -> None:
    """Refuse an output that cannot be made: a dangling link, a file in the way, no access."""
    if path.is_symlink() and not path.exists():
        raise _refuse(path, f"is a dangling symbolic link (to {os.readlink(path)})")
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        if ancestor.is_symlink():
            raise _refuse(path, f"{ancestor} is a dangling symbolic link")
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise _refuse(path, f"{ancestor} is a file, not a folder")
    target = path if path.is_dir() else ancestor
    if not os.access(target, os.W_OK | os.X_OK):
        raise _refuse(path, f"{target} is not writable")


def check_owner(
    path: str | Path,
    *,
    identity: str,
    overwrite: bool,
    protected: Sequence[str | Path] = (),
) -> str:
    """Decide what may happen to an existing output, before anything is written.

    Parameters
    ----------
    path : path
        The output group.
    identity : str
        The identity of the configuration about to write it.
    overwrite : bool
        Whether the user asked to replace an output tilefusion wrote with
        another configuration.
    protected : sequence of paths
        Paths that must survive whatever happens (the dataset, its tiles, the
        working directory, the config files): an output at or above one is
        refused.

    Returns
    -------
    str
        ``"absent"`` (nothing there, or an empty folder), ``"resume"`` (written
        by tilefusion with the same identity; also a store whose writing was
        cut short) or ``"replace"`` (a tilefusion output of another
        configuration, and ``overwrite`` was asked).

    Raises
    ------
    InputError
        One line naming the path, for a location that cannot be written, for
        anything tilefusion did not write (even with ``overwrite``), for an
        output of another configuration without ``overwrite``, and for an
        output that holds a protected path.
    """
    if fs.is_url(path):
        url = os.fspath(path)
        if fs.isfile(url):
            raise _refuse(url, "is an object, not an OME-Zarr prefix; choose another path")
        if not fs.exists(url):
            return "absent"
        for keep in protected:
            if fs.is_url(keep) and _url_within(os.fspath(keep), url):
                raise _refuse(
                    url, f"holds {keep}, which tilefusion must not touch; choose another path"
                )
    else:
        path = Path(path)
        _check_location(path)
        if not path.exists():
            return "absent"
        resolved = path.resolve()
        for keep in protected:
            if fs.is_url(keep):
                continue
            kept = Path(keep).resolve()
            if _is_within(kept, resolved):
                raise _refuse(
                    path, f"holds {kept}, which tilefusion must not touch; choose another path"
                )
        if not path.is_dir():
            raise _refuse(path, "is a file, not an OME-Zarr folder; choose another path")
    owner = read_owner(path)
    if owner is None:
        # Empty, or left holding only our identity's temporary file by a kill.
        if all(name.startswith(f".{IDENTITY_FILE}.") for name in fs.listdir(path)):
            return "absent"
        advice = (
            "output.overwrite only replaces outputs tilefusion wrote; "
            "remove it yourself or choose another path"
            if overwrite
            else "choose another path"
        )
        raise _refuse(path, f"exists and was not written by tilefusion; {advice}")
    if owner.get("identity") == identity:
        return "resume"
    if overwrite:
        return "replace"
    raise _refuse(
        path,
        "was written with another configuration; set output.overwrite: true to replace "
        "it, or choose another path",
    )


def _empty_folder(path: str | Path) -> None:
    """Remove what is in ``path`` (a tilefusion output), keeping the folder (or link) itself.

    The identity record goes last, so an interrupted removal is still ours.
    """
    if fs.is_url(path):
        for entry in sorted(fs.listdir(path), key=lambda entry: entry == IDENTITY_FILE):
            key = fs.join(path, entry)
            # On an object store a name may be both an object and a prefix.
            fs.remove_tree(key)
            fs.remove(key)
        return
    path = Path(path)
    children = sorted(path.iterdir(), key=lambda child: child.name == IDENTITY_FILE)
    for child in children:
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def _metadata_documents(
    plan: Plan,
    *,
    ngff: NgffFormat,
    dtype: str,
    codec: str,
    level: int,
    owner: dict[str, Any],
) -> dict[str, bytes]:
    """Every Zarr metadata document of the empty output, by store key (made in memory)."""
    from zarr.storage import MemoryStore

    documents: dict[str, Any] = {}
    group = zarr.open_group(
        store=MemoryStore(store_dict=documents),
        mode="w",
        zarr_format=ngff.zarr_format,  # type: ignore[arg-type]
        attributes={OWNER_KEY: owner},
    )
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
    return {key: buffer.to_bytes() for key, buffer in documents.items()}


def _parsed(path: str) -> Any:
    try:
        return json.loads(fs.read_bytes(path))
    except (OSError, ValueError):
        return None


def _root_key(key: str) -> bool:
    return "/" not in key


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
    protected: Sequence[str | Path] = (),
) -> str:
    """Create the output group and every level's (empty) array, or resume it.

    The identity record is written first, atomically, so a store whose
    creation was cut short (a kill, a full disk) is recognised as ours and
    completed by the next run. Each metadata document is then put in place
    atomically. On resume, damaged metadata is written again (see
    :func:`repair_metadata`); stored pixels are never touched. Anything
    tilefusion did not write is refused (see :func:`check_owner`).

    Returns
    -------
    str
        ``"created"``, ``"resumed"``, ``"repaired"`` (resumed, with metadata
        written again) or ``"replaced"``.
    """
    state = check_owner(path, identity=identity, overwrite=overwrite, protected=protected)
    path = os.fspath(path)
    if state == "replace":
        _empty_folder(path)
    fs.makedirs(path)
    if state == "resume":
        repaired = repair_metadata(
            plan, path, ngff=ngff, dtype=dtype, codec=codec, level=level, identity=identity
        )
        return "repaired" if repaired else "resumed"
    documents = _identity_and_documents(
        plan, path, ngff=ngff, dtype=dtype, codec=codec, level=level, identity=identity
    )
    for key, data in documents.items():
        write_bytes_atomic(fs.join(path, key), data)
    return "replaced" if state == "replace" else "created"


def _identity_and_documents(
    plan: Plan, path: str, *, ngff: NgffFormat, dtype: str, codec: str, level: int, identity: str
) -> dict[str, bytes]:
    """Put the identity record in place (first, when it is not), then make the metadata."""
    owner = {"identity": identity, "plan_dataset": plan.dataset}
    if _parsed(fs.join(path, IDENTITY_FILE)) != owner:
        write_json_atomic(fs.join(path, IDENTITY_FILE), owner)
    return _metadata_documents(plan, ngff=ngff, dtype=dtype, codec=codec, level=level, owner=owner)


def repair_metadata(
    plan: Plan,
    path: str | Path,
    *,
    ngff: NgffFormat,
    dtype: str,
    codec: str = "zstd",
    level: int = 1,
    identity: str,
) -> list[str]:
    """Write again every Zarr metadata document of an output that is missing or damaged.

    Array documents must equal what the plan makes; the root group's must be
    a readable group of the right Zarr format (its attributes hold the NGFF
    metadata, which :func:`write_ngff_metadata` writes). Pixels are never
    touched, and documents are written atomically, so jobs may call this at
    once.

    Returns
    -------
    list of str
        The store keys written.
    """
    path = os.fspath(path)
    documents = _identity_and_documents(
        plan, path, ngff=ngff, dtype=dtype, codec=codec, level=level, identity=identity
    )
    return _repair(path, documents, ngff)


def _usable(key: str, found: Any, expected: dict[str, Any], ngff: NgffFormat) -> bool:
    if not isinstance(found, dict):
        return False
    name = key.rsplit("/", 1)[-1]
    if not _root_key(key):
        return bool(found == expected)
    if name == ".zattrs":
        return True  # any readable attributes
    if found.get("zarr_format") != ngff.zarr_format:
        return False
    return name == ".zgroup" or found.get("node_type") == "group"


def _repair(path: str, documents: dict[str, bytes], ngff: NgffFormat) -> list[str]:
    written = []
    for key, data in documents.items():
        if not _usable(key, _parsed(fs.join(path, key)), json.loads(data), ngff):
            write_bytes_atomic(fs.join(path, key), data)
            written.append(key)
    return written


class OutputLock:
    """An exclusive lock on an output for the life of one run (see :func:`lock_output`)."""

    def __init__(self, path: Path | None, handle: Any) -> None:
        self.path = path
        self._handle = handle

    def release(self) -> None:
        """Drop the lock (the kernel also drops it when the process ends)."""
        if self._handle is not None:
            self._handle.close()


def lock_output(path: str | Path) -> OutputLock:
    """Take the run's lock on the output at ``path``, or refuse in one line.

    The lock is a file beside the output, ``.<name>.lock``, held with
    ``flock`` by the process that runs the workflow: two runs from two
    working directories cannot write one output at once, and a run that dies
    leaves no stale lock.

    An output on an object store (a URL) gets no lock: ``flock`` needs a
    local file, and object stores offer no lock a dying run would release.
    This is logged; the identity record still keeps runs of other
    configurations out (see :func:`check_owner`), but two runs of one
    configuration must not write it at once.

    Raises
    ------
    InputError
        When another run holds it (naming its process, host and folder).
    """
    import fcntl
    import socket

    if fs.is_url(path):
        log.warning(
            "%s: an output on an object store is not locked; do not start a second run on it "
            "until this one ends",
            path,
        )
        return OutputLock(None, None)
    path = Path(path)
    lock_path = path.with_name(f".{path.name}.lock")
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        handle = lock_path.open("a+")
    except OSError as exc:
        raise _refuse(path, f"cannot make its lock {lock_path} ({exc.strerror or exc})") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if not isinstance(exc, BlockingIOError):
            handle.close()
            raise _refuse(path, f"cannot lock {lock_path} ({exc.strerror or exc})") from None
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise _refuse(
            path, f"another run is writing this output ({holder}); wait for it or stop it"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}, working directory {os.getcwd()}")
    handle.flush()
    return OutputLock(lock_path, handle)


def open_level(path: str | Path, level: int, *, mode: str = "r+") -> zarr.Array:
    """Open one level's array.

    Raises
    ------
    InputError
        When its metadata is missing or unreadable (the plan step writes it again).
    """
    try:
        store = fs.zarr_store(fs.join(path, str(level)), read_only=mode == "r")
        return zarr.open_array(store, mode=mode)
    except Exception as exc:  # missing or damaged metadata
        raise InputError(
            f"{path}/{level}",
            "array metadata",
            f"missing or unreadable ({exc.__class__.__name__}); "
            "snakemake --forcerun assemble writes it again",
        ) from None


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
    group = zarr.open_group(fs.zarr_store(path, read_only=False), mode="r+")
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
