"""Read crops of one tile's pixels, whatever container holds them.

:func:`open_array` turns an :class:`~tilefusion.readers.base.ArraySource` into
a :class:`TileArray`: a 3D (zyx) array whose :meth:`TileArray.read` loads only
the requested crop from disk. Opening reads metadata only.

Backends
--------
zarr
    Zarr v2 and v3, read-only. A path (or key) naming an OME-Zarr multiscale
    group resolves to its first dataset (level 0); a plain group resolves to
    its array ``"0"``. Arrays with a plain layout, in a local folder or at a
    URL (``s3://``, through :mod:`tilefusion.fs`), are opened
    from their JSON metadata and read chunk by chunk here (numcodecs decodes),
    without importing zarr-python or running its event loop: v2 with a
    ``zstd``, ``blosc``, ``gzip``, ``lz4`` or no compressor, no filters and C
    order; v3 with ``bytes`` and at most one ``zstd``, ``blosc`` or ``gzip``
    codec, optionally inside ``sharding_indexed`` (only the inner chunks a crop
    needs are read); numeric pixel types. Decoded chunks are kept in an LRU
    cache (64 MiB per opened array, or one cache shared by several arrays,
    see :func:`open_array`), so overlapping crops decode a chunk about once.
    Absent chunks (and inner chunks) read as the fill value; their keys are
    collected in ``absent_chunks``.
    Every other array (other codecs, transposes, filters, consolidated
    groups) and every error goes through zarr-python (with the same
    file-system options for URLs).
n5
    A small reader written here (zarr-python 3 has no N5 support):
    ``attributes.json`` gives ``dimensions`` and ``blockSize`` in **xyz**
    order, ``dataType`` and ``compression``; a block lives at ``key/x/y/z``
    and starts with a big-endian header (``mode`` uint16, ``ndim`` uint16,
    ``ndim`` uint32 block sizes) followed by big-endian data. Compression
    ``raw``, ``gzip``, ``bzip2``, ``xz``, ``zstd`` and ``blosc`` are read;
    absent blocks read as zeros (and are listed in ``absent_chunks``). A group
    holding ``s0`` (BDV) resolves to it. Local or at a URL.
hdf5
    h5py; a file at a URL is read through an fsspec file object. Legacy
    BigDataViewer HDF5 files store unsigned 16-bit pixels as
    ``int16`` without a ``dataType`` attribute; such ``t*/s*/*/cells``
    datasets are reinterpreted as ``uint16``, as BigDataViewer does.
tiff
    tifffile, memory-mapped where the file allows it and through tifffile's
    Zarr store otherwise (compressed or tiled files). The source key may select
    ``series=S`` and ``channel=C`` (on the series' ``C`` axis). Local files only.
memory
    Arrays registered in-process with :func:`register_memory_array` (tests).

Axes beyond three must be singletons (the ``t`` and ``c`` axes of a 5D
OME-Zarr tile) and are dropped; a 2D array is read as one z plane.
"""

from __future__ import annotations

import bz2
import contextlib
import functools
import gzip
import itertools
import json
import lzma
import math
import operator
import os
import re
import struct
import threading
import zlib
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
from numpy.typing import ArrayLike, NDArray

from tilefusion import fs
from tilefusion.errors import InputError
from tilefusion.readers.base import ArraySource

__all__ = [
    "ChunkCache",
    "StoredLevel",
    "TileArray",
    "forget_memory_array",
    "open_array",
    "register_memory_array",
    "stored_levels",
    "write_n5_array",
]

Index3 = tuple[int, int, int]

_MEMORY_ARRAYS: dict[str, NDArray[Any]] = {}


@runtime_checkable
class TileArray(Protocol):
    """A 3D (zyx) array on disk that reads crops on demand.

    Attributes
    ----------
    shape : tuple of int
        Shape, zyx.
    dtype : numpy.dtype
        Pixel type as the caller sees it (after any reinterpretation).
    """

    @property
    def shape(self) -> Index3: ...

    @property
    def dtype(self) -> np.dtype[Any]: ...

    @property
    def absent_chunks(self) -> frozenset[str]:
        """Keys of the stored chunks that reads so far found absent (read as no data).

        A snapshot: each distinct chunk (or inner chunk of a shard) counts
        once however often it is read. Containers may omit a chunk that holds
        only the fill value, so this is not an error, but a fusion says so.
        Backends that cannot tell (HDF5, TIFF, memory, arrays read through
        zarr-python) report none.
        """
        ...

    def read(self, lo_zyx: Sequence[int], hi_zyx: Sequence[int]) -> NDArray[Any]:
        """Return the crop ``[lo, hi)`` as an in-memory array of ``hi - lo`` shape."""
        ...


def register_memory_array(name: str, array: ArrayLike) -> ArraySource:
    """Register ``array`` under ``name`` for the ``memory`` backend.

    Returns
    -------
    ArraySource
        A source that :func:`open_array` resolves to ``array``.
    """
    _MEMORY_ARRAYS[name] = np.asarray(array)
    return ArraySource("memory", name)


def forget_memory_array(name: str) -> None:
    """Drop an array registered with :func:`register_memory_array`."""
    _MEMORY_ARRAYS.pop(name, None)


def open_array(source: ArraySource, *, chunk_cache: ChunkCache | None = None) -> TileArray:
    """Open the pixels ``source`` names, reading metadata only.

    Parameters
    ----------
    source : ArraySource
        Container format, path and key.
    chunk_cache : ChunkCache, optional
        Where a reader that keeps decoded chunks (Zarr read directly) keeps
        them, shared with the other arrays given the same cache, so that one
        bound holds for all of them; by default each array has its own.

    Returns
    -------
    TileArray

    Raises
    ------
    InputError
        If the container or array is missing, unreadable, not (squeezable to)
        3D, or its format cannot be read by tilefusion.
    """
    opener = _OPENERS.get(source.format)
    if opener is None:
        if source.format == "unsupported":
            raise InputError(
                source.path,
                "ImageLoader",
                f"pixels stored through image loader {source.key!r} cannot be read by "
                "tilefusion; re-save the dataset as bdv.multimg.zarr, bdv.n5 or bdv.hdf5",
            )
        raise InputError(source.path, "format", f"unknown array format {source.format!r}")
    return opener(source, chunk_cache=chunk_cache)


# ---------------------------------------------------------------------------
# Shared: reduce an N-D backing array to 3 spatial axes.


class _IndexedArray:
    """A 3D view of an N-D backing array: fixed indices on the extra axes.

    ``template`` has one entry per backing axis: an ``int`` fixes that axis,
    ``None`` marks a spatial axis. With only two spatial axes a unit z axis is
    added in front. ``fresh_reads`` says that ``backing[index]`` returns a new
    array nobody else holds, so a crop of the right type is handed out as is.
    """

    def __init__(
        self,
        backing: Any,
        template: Sequence[int | None],
        dtype: np.dtype[Any],
        *,
        view_as: np.dtype[Any] | None = None,
        backing_shape: Sequence[int] | None = None,
        where: tuple[str, str] = ("", ""),
        fresh_reads: bool = False,
    ) -> None:
        self._backing = backing
        self._fresh_reads = fresh_reads
        self._where = where
        self._template = tuple(template)
        full = backing.shape if backing_shape is None else backing_shape
        spatial = [int(n) for n, t in zip(full, self._template, strict=True) if t is None]
        self._flat = len(spatial) == 2
        if self._flat:
            spatial.insert(0, 1)
        self._shape: Index3 = (spatial[0], spatial[1], spatial[2])
        self._dtype = np.dtype(view_as if view_as is not None else dtype)
        self._view_as = view_as

    @property
    def shape(self) -> Index3:
        return self._shape

    @property
    def dtype(self) -> np.dtype[Any]:
        return self._dtype

    @property
    def absent_chunks(self) -> frozenset[str]:
        # Only the direct Zarr reader knows which chunks it found absent.
        absent = getattr(self._backing, "absent_chunks", None)
        return frozenset(absent) if absent is not None else frozenset()

    def read(self, lo_zyx: Sequence[int], hi_zyx: Sequence[int]) -> NDArray[Any]:
        return self.read_from(self._backing, lo_zyx, hi_zyx)

    def read_from(self, backing: Any, lo_zyx: Sequence[int], hi_zyx: Sequence[int]) -> NDArray[Any]:
        """Read the crop from ``backing``, an array laid out like the template."""
        lo, hi = _check_crop(self._shape, lo_zyx, hi_zyx)
        slices = [slice(a, b) for a, b in zip(lo, hi, strict=True)]
        if self._flat:
            if hi[0] == lo[0]:
                return np.zeros(tuple(b - a for a, b in zip(lo, hi, strict=True)), self._dtype)
            slices = slices[1:]
        it = iter(slices)
        index = tuple(next(it) if t is None else t for t in self._template)
        try:
            out = np.asarray(backing[index])
        except Exception as exc:
            # Corrupt or vanished chunks are the user's data, not a bug here.
            raise InputError(
                self._where[0], self._where[1], f"cannot read crop [{lo}, {hi}): {exc}"
            ) from exc
        if self._flat:
            out = out[np.newaxis]
        if self._view_as is not None:
            out = out.view(self._view_as)
        if self._fresh_reads and out.dtype == self._dtype:
            return out
        # A memory map or a view of a registered array must not leak out.
        return np.array(out, dtype=self._dtype, copy=True)


def _check_crop(
    shape: Index3, lo_zyx: Sequence[int], hi_zyx: Sequence[int]
) -> tuple[Index3, Index3]:
    lo = tuple(int(v) for v in lo_zyx)
    hi = tuple(int(v) for v in hi_zyx)
    if len(lo) != 3 or len(hi) != 3:
        raise ValueError(f"a crop has 3 bounds per side, got lo={lo}, hi={hi}")
    if any(a < 0 or a > b or b > n for a, b, n in zip(lo, hi, shape, strict=True)):
        raise ValueError(f"crop [{lo}, {hi}) is outside an array of shape {shape}")
    return (lo[0], lo[1], lo[2]), (hi[0], hi[1], hi[2])


def _spatial_template(
    shape: Sequence[int], *, source: str, field: str, fixed: dict[int, int] | None = None
) -> list[int | None]:
    """Fix ``fixed`` axes, drop leading singletons, keep the last 3 (or 2) axes."""
    fixed = dict(fixed or {})
    free = [i for i in range(len(shape)) if i not in fixed]
    if len(free) < 2:
        raise InputError(source, field, f"array of shape {tuple(shape)} is not 2D or 3D")
    spatial = free[-3:]
    for i in free[:-3]:
        if shape[i] != 1:
            raise InputError(
                source,
                field,
                f"array of shape {tuple(shape)} has more than 3 non-singleton axes; "
                "tilefusion reads one 3D (zyx) tile per view",
            )
        fixed[i] = 0
    return [None if i in spatial else fixed[i] for i in range(len(shape))]


def _field(source: ArraySource) -> str:
    return f"array {source.key!r}" if source.key else "array"


# ---------------------------------------------------------------------------
# memory


def _open_memory(source: ArraySource, *, chunk_cache: ChunkCache | None = None) -> TileArray:
    try:
        arr = _MEMORY_ARRAYS[source.path]
    except KeyError:
        raise InputError(source.path, "memory", "no array registered under this name") from None
    template = _spatial_template(arr.shape, source=source.path, field="memory")
    return _IndexedArray(arr, template, arr.dtype)


# ---------------------------------------------------------------------------
# zarr


def _open_zarr(source: ArraySource, *, chunk_cache: ChunkCache | None = None) -> TileArray:
    where = (source.path, _field(source))
    chunks = _open_direct_zarr(source, cache=chunk_cache)
    if chunks is not None:
        template = _spatial_template(chunks.shape, source=source.path, field=_field(source))
        return _IndexedArray(chunks, template, chunks.dtype, where=where, fresh_reads=True)
    import zarr

    try:
        store = fs.zarr_store(source.path)
        node: Any = zarr.open(store=store, path=source.key or None, mode="r")
    except FileNotFoundError:
        raise InputError(source.path, _field(source), "zarr array or group not found") from None
    except Exception as exc:
        raise InputError(source.path, _field(source), f"cannot open as zarr: {exc}") from None
    if isinstance(node, zarr.Group):
        node = _zarr_level0(node, source)
    template = _spatial_template(node.shape, source=source.path, field=_field(source))
    direct = _ZarrChunks.for_array(node, cache=chunk_cache)
    if direct is not None:
        return _IndexedArray(direct, template, direct.dtype, where=where, fresh_reads=True)
    return _IndexedArray(node, template, np.dtype(node.dtype), where=where)


def _level0_name(attrs: Any) -> str | None:
    """The array a group with attributes ``attrs`` resolves to; ``None`` if none is named.

    An OME-Zarr multiscales group (0.4, or 0.5 under ``"ome"``) names its
    first dataset; a plain group resolves to ``"0"``.
    """
    attrs = dict(attrs)
    multiscales = attrs.get("multiscales") or dict(attrs.get("ome") or {}).get("multiscales")
    if not multiscales:
        return "0"
    try:
        return str(multiscales[0]["datasets"][0]["path"])
    except (KeyError, IndexError, TypeError):
        return None


def _zarr_level0(group: Any, source: ArraySource) -> Any:
    import zarr

    name = _level0_name(group.attrs)
    if name is None:
        raise InputError(source.path, "multiscales", "OME-Zarr multiscales lists no datasets")
    try:
        node = group[name]
    except KeyError:
        raise InputError(
            source.path, _field(source), f"zarr group has no array {name!r} (level 0)"
        ) from None
    if not isinstance(node, zarr.Array):
        raise InputError(source.path, _field(source), f"zarr node {name!r} is not an array")
    return node


# ---------------------------------------------------------------------------
# zarr: metadata without zarr-python


class _ZarrPythonDecides(Exception):
    """The local metadata reader leaves this node to zarr-python."""


def _open_direct_zarr(
    source: ArraySource, *, cache: ChunkCache | None = None
) -> _ZarrChunks | None:
    """The direct reader of a Zarr node (local or a URL), resolved from its JSON metadata files.

    Importing zarr-python costs a fresh process about 0.3 s, which every fuse
    job would pay only to read a few small JSON files. The node resolves as
    :func:`_open_zarr` resolves it through zarr-python (an array; an OME-Zarr
    multiscales group's first dataset; a plain group's array ``"0"``).

    Returns
    -------
    _ZarrChunks or None
        ``None`` leaves the node to zarr-python: chained fsspec URLs
        (``simplecache::s3://``), anything missing or malformed (so errors
        keep zarr-python's outcome and wording), groups with consolidated
        metadata (zarr-python looks their children up there), folders
        holding both v2 and v3 metadata, data
        types and fill values beyond plain numbers, and layouts that
        :class:`_ZarrChunks` does not read.
    """
    if "::" in source.path:
        return None  # a chained fsspec URL: its caches and options are zarr-python's
    try:
        folder = fs.join(source.path, *_zarr_path(source.key))
        fmt, kind, meta = _zarr_node(folder, None)
        if kind == "group":
            if meta.get("consolidated_metadata") is not None or (
                fmt == 2 and fs.exists(fs.join(folder, ".zmetadata"))
            ):
                raise _ZarrPythonDecides
            name = _level0_name(meta.get("attributes") or {})
            parts = _zarr_path(name) if name is not None else []
            if not parts or "/".join(parts) != name:
                raise _ZarrPythonDecides
            folder = fs.join(folder, *parts)
            _, kind, meta = _zarr_node(folder, fmt)
            if kind != "array":
                raise _ZarrPythonDecides
        return _ZarrChunks.from_metadata(folder, meta, cache=cache)
    except Exception:
        # _ZarrPythonDecides, and whatever odd metadata raises here: zarr-python
        # then opens the node or reports what is wrong with it.
        return None


def _zarr_path(key: str) -> list[str]:
    """The folders of a key inside a store, normalised as zarr-python does."""
    parts = [p for p in key.replace("\\", "/").split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise _ZarrPythonDecides  # zarr-python refuses these
    return parts


def _zarr_node(folder: str, zarr_format: int | None) -> tuple[int, str, dict[str, Any]]:
    """``(format, "array" or "group", metadata)`` of the Zarr node in ``folder``.

    ``zarr_format`` ``None`` looks for either format (v3 first), as
    :func:`zarr.open` does; a group's children have the group's format. The
    v2 metadata gets the ``.zattrs`` object as ``"attributes"``, as in v3.
    """
    v3 = _json_object(fs.join(folder, "zarr.json")) if zarr_format != 2 else None
    if v3 is not None:
        kind = v3.get("node_type")
        if (
            v3.get("zarr_format") != 3
            or kind not in ("array", "group")
            # zarr-python warns, then reads the v3 node; let it.
            or (
                zarr_format is None
                and any(fs.exists(fs.join(folder, n)) for n in (".zarray", ".zgroup"))
            )
        ):
            raise _ZarrPythonDecides
        return 3, kind, v3
    if zarr_format == 3:
        raise _ZarrPythonDecides
    attrs = _json_object(fs.join(folder, ".zattrs"))
    for kind, name in (("array", ".zarray"), ("group", ".zgroup")):
        meta = _json_object(fs.join(folder, name))
        if meta is not None:
            if meta.get("zarr_format") != 2 or "attributes" in meta:
                raise _ZarrPythonDecides
            return 2, kind, {**meta, "attributes": {} if attrs is None else attrs}
    raise _ZarrPythonDecides


def _json_object(path: str) -> dict[str, Any] | None:
    """The JSON object in ``path``; ``None`` if there is no such file."""
    try:
        raw = fs.read_bytes(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    out = json.loads(raw)
    if not isinstance(out, dict):
        raise _ZarrPythonDecides
    return out


_V2_REQUIRED = frozenset(
    {"zarr_format", "shape", "chunks", "dtype", "compressor", "fill_value", "order", "filters"}
)
_V2_KEYS = _V2_REQUIRED | {"dimension_separator", "attributes"}
_V3_REQUIRED = frozenset(
    {
        "zarr_format",
        "node_type",
        "shape",
        "data_type",
        "chunk_grid",
        "chunk_key_encoding",
        "fill_value",
        "codecs",
    }
)
_V3_KEYS = _V3_REQUIRED | {"attributes", "dimension_names", "storage_transformers"}
_V3_DTYPES = frozenset(
    {"bool", "float16", "float32", "float64"}
    | {f"{s}int{n}" for s in ("", "u") for n in (8, 16, 32, 64)}
)
_FLOAT_WORDS = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _zarr_dtype(meta: dict[str, Any]) -> np.dtype[Any]:
    """The pixel type zarr-python gives the array with metadata ``meta`` (numbers only)."""
    if meta["zarr_format"] == 2:
        name = meta["dtype"]
        dtype = np.dtype(name) if isinstance(name, str) else None
        # zarr-python takes byte order marked names ("<u2", "|u1") only.
        if dtype is None or dtype.str != name:
            raise _ZarrPythonDecides
    else:
        name = meta["data_type"]
        if name not in _V3_DTYPES:
            raise _ZarrPythonDecides
        # zarr-python gives v3 arrays little-endian types, whatever the codecs say.
        dtype = np.dtype(name).newbyteorder("<")
    if dtype.kind not in "biuf" or dtype.fields is not None or dtype.shape:
        raise _ZarrPythonDecides
    return dtype


def _zarr_fill(value: Any, dtype: np.dtype[Any], *, zarr_format: int) -> Any:
    """The fill value of JSON ``value`` as zarr-python reads it (plain numbers only)."""
    kind = dtype.kind
    if value is None and zarr_format == 2:
        return np.zeros((), dtype)[()]  # v2 "null": zarr-python reads zeros
    if kind == "b" and isinstance(value, bool):
        return dtype.type(value)
    if isinstance(value, bool):
        raise _ZarrPythonDecides
    if kind in "iu" and isinstance(value, int):
        info = np.iinfo(dtype)
        if info.min <= value <= info.max:
            return dtype.type(value)
    if kind == "f" and isinstance(value, int | float):
        return dtype.type(value)
    if kind == "f" and isinstance(value, str) and value in _FLOAT_WORDS:
        return dtype.type(_FLOAT_WORDS[value])
    raise _ZarrPythonDecides


# ---------------------------------------------------------------------------
# zarr: the direct chunk reader


# Compressors the direct reader decodes with numcodecs. They all describe
# themselves in the stream (zstd frames, blosc headers, gzip members), so the
# decoder needs none of the settings the writer used.
_V2_COMPRESSORS = frozenset({"zstd", "blosc", "gzip", "lz4"})
_V3_COMPRESSORS = frozenset({"zstd", "blosc", "gzip"})
_DIRECT_KINDS = frozenset("biufc")
_EMPTY_CHUNK = 2**64 - 1  # shard index entry (offset and length) of an absent inner chunk


@dataclass(frozen=True)
class _ZarrLayout:
    """How one Zarr array lays out its chunks on disk.

    Attributes
    ----------
    chunks : tuple of int
        Shape of one encoded chunk (the inner chunk of a sharded array).
    stored : numpy.dtype
        Pixel type in the chunk bytes, byte order included.
    codec : numcodecs.abc.Codec or None
        Decompressor of one chunk; ``None`` for raw bytes.
    prefix, separator : str
        A chunk (or shard) key is ``prefix + separator.join(grid index)``.
    shard : tuple of int or None
        Shape of one shard file, or ``None`` when each chunk is a file.
    index_at_end, index_crc : bool
        Where a shard keeps its index, and whether a crc32c follows it.
    """

    chunks: tuple[int, ...]
    stored: np.dtype[Any]
    codec: Any
    prefix: str
    separator: str
    shard: tuple[int, ...] | None = None
    index_at_end: bool = True
    index_crc: bool = True


_CACHE_IDS = itertools.count()

_CHUNK_CACHE_BYTES = 64 * 2**20
"""Default bound, in bytes, of one opened Zarr array's own cache of decoded chunks.

Fuse jobs do not use it: their tiles share one cache
(:data:`tilefusion.fuse.JOB_CHUNK_CACHE_BYTES`). Crops of neighbouring
32 x 256 x 256 output shards in C order reuse chunks of 32 x 128 x 128
uint16 (1 MiB each, 18 per crop) across x and y within 64 MiB in tiles up
to about 1024 x 1024 voxels across; reuse across z layers of shards would
need a tile's two chunk layers (128 MiB there).
"""


class ChunkCache:
    """A thread-safe LRU of decoded chunks, bounded by their bytes.

    Entries are read-only arrays, shared by every reader; readers copy out
    of them. :meth:`get_or_load` and :meth:`claim` let the first thread that
    misses a key load it while others asking for that key wait for it
    instead of decoding it again; nothing is loaded under the lock.

    Parameters
    ----------
    limit : int
        Most bytes held; an array larger than that is never kept, and ``0``
        keeps nothing (every request loads).

    Attributes
    ----------
    hits, misses : int
        Requests answered from the cache, and loads started.
    nbytes : int
        Bytes held now.
    """

    def __init__(self, limit: int) -> None:
        self.limit = max(0, int(limit))
        self.hits = 0
        self.misses = 0
        self.nbytes = 0
        self._entries: OrderedDict[Hashable, NDArray[Any]] = OrderedDict()
        self._pending: dict[Hashable, threading.Event] = {}
        self._lock = threading.Lock()

    def get_or_load(
        self, key: Hashable, load: Callable[[], NDArray[Any] | None]
    ) -> NDArray[Any] | None:
        """The entry ``key``, else ``load()`` (kept unless ``None``) once for all askers."""
        if self.limit == 0:
            return load()
        while True:
            with self._lock:
                hit = self._hit(key)
                if hit is not None:
                    return hit
                event = self._pending.get(key)
                if event is None:
                    claimed = {key: threading.Event()}
                    self._pending.update(claimed)
                    self.misses += 1
                    break
            # Another thread loads it; afterwards it is usually here. If not
            # (evicted, absent, or the load failed), this thread loads it.
            event.wait()
        try:
            value = load()
            if value is not None:
                self.put(key, value)
        finally:
            self.release(claimed)
        return value

    def claim(
        self, keys: Iterable[Hashable]
    ) -> tuple[dict[Hashable, NDArray[Any]], dict[Hashable, threading.Event], list[Hashable]]:
        """Sort ``keys`` into cached entries, keys to load, and keys others load.

        Returns
        -------
        found : dict
            Key to cached array.
        mine : dict
            Keys the caller now loads: it keeps what it loaded with
            :meth:`put`, and must :meth:`release` them all (also on errors)
            **before** it waits for any other key, or threads could wait on
            each other.
        theirs : list
            Keys other threads are loading; ask for them with
            :meth:`get_or_load` after releasing ``mine``.
        """
        found: dict[Hashable, NDArray[Any]] = {}
        mine: dict[Hashable, threading.Event] = {}
        theirs: list[Hashable] = []
        if self.limit == 0:
            # Not registered: with nothing kept, waiting for another load gains nothing.
            return found, {key: threading.Event() for key in keys}, theirs
        with self._lock:
            for key in keys:
                hit = self._hit(key)
                if hit is not None:
                    found[key] = hit
                elif key in self._pending:
                    theirs.append(key)
                else:
                    mine[key] = self._pending[key] = threading.Event()
                    self.misses += 1
        return found, mine, theirs

    def put(self, key: Hashable, value: NDArray[Any]) -> None:
        """Keep ``value`` (made read-only) under ``key``, evicting the least recently used."""
        if value.nbytes > self.limit:
            return
        value.flags.writeable = False
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.nbytes -= old.nbytes
            self._entries[key] = value
            self.nbytes += value.nbytes
            while self.nbytes > self.limit:
                _, dropped = self._entries.popitem(last=False)
                self.nbytes -= dropped.nbytes

    def release(self, claimed: dict[Hashable, threading.Event]) -> None:
        """End the loads of ``claimed`` (from :meth:`claim`) and wake their waiters; empties it."""
        with self._lock:
            for key, event in claimed.items():
                if self._pending.get(key) is event:
                    del self._pending[key]
        for event in claimed.values():
            event.set()
        claimed.clear()

    def _hit(self, key: Hashable) -> NDArray[Any] | None:
        hit = self._entries.get(key)
        if hit is not None:
            self._entries.move_to_end(key)
            self.hits += 1
        return hit


class _ZarrChunks:
    """One Zarr array (a local folder or a URL), read chunk by chunk without zarr-python.

    zarr-python 3 runs every read through its event loop with a task per
    chunk and codec, and its threads contend for locks; for plain
    layouts (:meth:`from_metadata`, :meth:`for_array`) the chunk files are
    read and decoded here. Indexing with one ``int`` or step-1 ``slice`` per
    axis returns a new array equal to zarr-python's; absent chunks read as
    the fill value. Threads may read concurrently.

    Decoded chunks (and shard indices) are kept in an LRU cache
    (:class:`ChunkCache`): overlapping crops, such as those of neighbouring
    output shards, then decode each chunk about once instead of once per
    crop. The cache is the memory bound: at most :data:`_CHUNK_CACHE_BYTES`
    (64 MiB) of decoded chunks per opened array, on top of the crops handed
    out, unless arrays share one ``cache`` (and its bound). A cache of limit
    0 keeps nothing.

    Parameters
    ----------
    folder : str
        The array's folder (local path or URL).
    layout : _ZarrLayout
        How its chunks are stored.
    shape : sequence of int
        Array shape.
    dtype : numpy.dtype
        Pixel type of the reads (zarr-python's).
    fill_value : scalar
        Value of absent chunks.
    cache : ChunkCache, optional
        A cache shared with other arrays (each array's entries are its own);
        by default the array's own, of :data:`_CHUNK_CACHE_BYTES`.

    Attributes
    ----------
    cache : ChunkCache
        The decoded-chunk cache (its counters tell hits from loads).
    absent_chunks : frozenset of str
        Keys of the chunks reads found absent so far (see :class:`TileArray`):
        chunk files that do not exist, and, in a sharded array, the inner
        chunks of a missing shard file or with an empty index entry, named
        ``shard key[inner index]``.
    """

    def __init__(
        self,
        folder: str,
        layout: _ZarrLayout,
        *,
        shape: Sequence[int],
        dtype: np.dtype[Any],
        fill_value: Any,
        cache: ChunkCache | None = None,
    ) -> None:
        self._folder = folder
        self._layout = layout
        self.shape = tuple(int(n) for n in shape)
        self.dtype = dtype
        self._fill = fill_value
        shard = layout.shard or layout.chunks
        self._per_shard = tuple(s // c for s, c in zip(shard, layout.chunks, strict=True))
        self._index_size = 16 * math.prod(self._per_shard) + (4 if layout.index_crc else 0)
        if cache is None:
            cache = ChunkCache(_CHUNK_CACHE_BYTES)
        self.cache = cache
        # Keys in a shared cache: this array's, never another's (ids are reused).
        self._cache_id = next(_CACHE_IDS)
        self._decodes = 0
        self._count_lock = threading.Lock()
        # set.add and frozenset(set) are atomic under the GIL: threads may add.
        self._absent: set[str] = set()

    @property
    def decodes(self) -> int:
        """Chunks decoded so far (a count for tests and benchmarks)."""
        return self._decodes

    @property
    def absent_chunks(self) -> frozenset[str]:
        return frozenset(self._absent)

    @classmethod
    def from_metadata(
        cls,
        folder: str,
        meta: dict[str, Any],
        *,
        cache: ChunkCache | None = None,
    ) -> _ZarrChunks:
        """The direct reader of the array in ``folder`` with metadata ``meta``.

        Parameters
        ----------
        folder : str
            The array's folder (local path or URL).
        meta : dict
            The ``zarr.json`` object, or the ``.zarray`` one with the
            ``.zattrs`` object as ``"attributes"``.
        cache : ChunkCache, optional
            The decoded-chunk cache (see the class).

        Raises
        ------
        _ZarrPythonDecides
            If the metadata is not of a plain numeric array with a layout
            read here (zarr-python then reads it, or says what is wrong).
        """
        fmt = meta.get("zarr_format")
        required, allowed = (_V2_REQUIRED, _V2_KEYS) if fmt == 2 else (_V3_REQUIRED, _V3_KEYS)
        if fmt not in (2, 3) or not required <= meta.keys() <= allowed:
            raise _ZarrPythonDecides
        shape = meta["shape"]
        if (
            not isinstance(shape, list)
            or not shape
            or any(type(n) is not int or n < 0 for n in shape)
        ):
            raise _ZarrPythonDecides
        dtype = _zarr_dtype(meta)
        fill = _zarr_fill(meta["fill_value"], dtype, zarr_format=fmt)
        layout = _v2_layout(meta, dtype) if fmt == 2 else _v3_layout(meta, dtype)
        if (
            layout is None
            or len(layout.chunks) != len(shape)
            or any(n < 1 for n in (*layout.chunks, *(layout.shard or ())))
        ):
            raise _ZarrPythonDecides
        return cls(
            folder,
            layout,
            shape=shape,
            dtype=dtype,
            fill_value=fill,
            cache=cache,
        )

    @classmethod
    def for_array(cls, node: Any, *, cache: ChunkCache | None = None) -> _ZarrChunks | None:
        """The direct reader of zarr-python array ``node``, or ``None`` if it has none.

        Only arrays in a local folder whose metadata names a layout read
        here qualify; the rest stay on zarr-python.
        """
        from zarr.storage import LocalStore

        if not isinstance(node.store, LocalStore):
            return None
        root = Path(node.store.root)
        folder = str(root / node.path if node.path else root)
        dtype = np.dtype(node.dtype)
        if dtype.kind not in _DIRECT_KINDS or dtype.fields is not None or len(node.shape) < 1:
            return None
        meta = node.metadata.to_dict()
        fmt = meta.get("zarr_format")
        layout = (
            _v2_layout(meta, dtype) if fmt == 2 else _v3_layout(meta, dtype) if fmt == 3 else None
        )
        if layout is None or len(layout.chunks) != len(node.shape):
            return None
        if not os.path.isdir(folder):
            return None
        # zarr-python reads a v2 null fill value as zero.
        fill = node.fill_value if node.fill_value is not None else np.zeros((), dtype)[()]
        return cls(folder, layout, shape=node.shape, dtype=dtype, fill_value=fill, cache=cache)

    def __getitem__(self, index: tuple[int | slice, ...]) -> NDArray[Any]:
        """Read ``index`` (an ``int`` or step-1 ``slice`` per axis; ints drop the axis)."""
        if len(index) != len(self.shape):
            raise IndexError(f"{len(index)} indices for an array of {len(self.shape)} axes")
        starts: list[int] = []
        stops: list[int] = []
        kept: list[int] = []
        for key, n in zip(index, self.shape, strict=True):
            if isinstance(key, slice):
                a, b, step = key.indices(n)
                if step != 1:
                    raise IndexError("only step-1 slices are read")
                b = max(a, b)
                kept.append(b - a)
            else:
                a = operator.index(key)
                if not 0 <= a < n:
                    raise IndexError(f"index {a} outside an axis of {n}")
                b = a + 1
            starts.append(a)
            stops.append(b)
        out = np.empty(tuple(b - a for a, b in zip(starts, stops, strict=True)), self.dtype)
        if out.size:
            if self._layout.shard is None:
                self._read_chunks(out, starts, stops)
            else:
                self._read_shards(out, starts, stops)
        return out.reshape(kept)

    def _key(self, coords: Sequence[int]) -> str:
        return self._layout.prefix + self._layout.separator.join(str(c) for c in coords)

    def _read_chunks(self, out: NDArray[Any], starts: Sequence[int], stops: Sequence[int]) -> None:
        for coords, dst, src in _grid_blocks(starts, stops, self._layout.chunks):
            chunk = self.cache.get_or_load(
                (self._cache_id, coords), functools.partial(self._load_chunk, coords)
            )
            out[dst] = self._fill if chunk is None else chunk[src]

    def _load_chunk(self, coords: tuple[int, ...]) -> NDArray[Any] | None:
        """The decoded chunk ``coords``; ``None`` if it was never written."""
        key = self._key(coords)
        try:
            raw = fs.read_bytes(fs.join(self._folder, key))
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            # zarr-python's local store answers these as "no such chunk".
            self._absent.add(key)
            return None
        return self._decode(raw, key)

    def _read_shards(self, out: NDArray[Any], starts: Sequence[int], stops: Sequence[int]) -> None:
        assert self._layout.shard is not None
        for coords, dst, src in _grid_blocks(starts, stops, self._layout.shard):
            self._read_shard(out[dst], coords, [s.start for s in src], [s.stop for s in src])

    def _read_shard(
        self, out: NDArray[Any], coords: tuple[int, ...], starts: list[int], stops: list[int]
    ) -> None:
        """Fill ``out`` with the shard-local box ``[starts, stops)`` of shard ``coords``."""
        origin = [c * n for c, n in zip(coords, self._per_shard, strict=True)]
        # Cache keys: inner chunk indices in the whole array's grid.
        blocks: dict[Hashable, tuple[tuple[int, ...], tuple[slice, ...], tuple[slice, ...]]] = {
            (self._cache_id, tuple(o + i for o, i in zip(origin, inner, strict=True))): (
                inner,
                dst,
                src,
            )
            for inner, dst, src in _grid_blocks(starts, stops, self._layout.chunks)
        }
        found, mine, theirs = self.cache.claim(blocks)
        try:
            for key, chunk in found.items():
                _, dst, src = blocks[key]
                out[dst] = chunk[src]
            if mine or theirs:
                self._load_shard(out, coords, blocks, mine, theirs)
        finally:
            self.cache.release(mine)

    def _load_shard(
        self,
        out: NDArray[Any],
        coords: tuple[int, ...],
        blocks: dict[Hashable, tuple[tuple[int, ...], tuple[slice, ...], tuple[slice, ...]]],
        mine: dict[Hashable, threading.Event],
        theirs: list[Hashable],
    ) -> None:
        """Read the inner chunks ``mine`` and ``theirs`` (see :meth:`ChunkCache.claim`)."""
        key = self._key(coords)
        try:
            fh = fs.open_blob(fs.join(self._folder, key))
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            for chunk_key in (*mine, *theirs):
                inner, dst, _ = blocks[chunk_key]
                self._absent.add(self._inner_name(key, inner))
                out[dst] = self._fill
            return
        with fh:
            # The one wait while holding claims (see ChunkCache.claim): loading
            # an index never waits on the cache, so it cannot close a cycle.
            index = self.cache.get_or_load(
                (self._cache_id, "index", *coords), functools.partial(self._shard_index, fh, key)
            )
            assert index is not None
            wanted: list[tuple[int, int, Hashable]] = []
            for chunk_key in mine:
                inner, dst, _ = blocks[chunk_key]
                offset, nbytes = (int(v) for v in index[inner])
                if offset == _EMPTY_CHUNK and nbytes == _EMPTY_CHUNK:
                    self._absent.add(self._inner_name(key, inner))
                    out[dst] = self._fill
                else:
                    wanted.append((offset, nbytes, chunk_key))
            # One read per run of inner chunks that lie back to back in the
            # file (zarr-python writes them in C order): fewer system calls,
            # and far fewer round trips on network file systems.
            wanted.sort(key=lambda w: w[0])
            start = 0
            while start < len(wanted):
                end = start + 1
                while end < len(wanted) and wanted[end][0] == sum(wanted[end - 1][:2]):
                    end += 1
                first = wanted[start][0]
                raw = self._read_exactly(fh, key, first, sum(wanted[end - 1][:2]) - first)
                for offset, nbytes, chunk_key in wanted[start:end]:
                    inner, dst, src = blocks[chunk_key]
                    name = self._inner_name(key, inner)
                    chunk = self._decode(raw[offset - first : offset - first + nbytes], name)
                    self.cache.put(chunk_key, chunk)
                    out[dst] = chunk[src]
                start = end
            # Wake the threads waiting for these before waiting for any.
            self.cache.release(mine)
            for chunk_key in theirs:
                inner, dst, src = blocks[chunk_key]
                load = functools.partial(self._load_inner, fh, key, index, inner)
                loaded = self.cache.get_or_load(chunk_key, load)
                out[dst] = self._fill if loaded is None else loaded[src]

    def _load_inner(
        self, fh: fs.BlobReader, key: str, index: NDArray[np.uint64], inner: tuple[int, ...]
    ) -> NDArray[Any] | None:
        """Inner chunk ``inner`` of open shard ``fh``; ``None`` if it was never written."""
        offset, nbytes = (int(v) for v in index[inner])
        name = self._inner_name(key, inner)
        if offset == _EMPTY_CHUNK and nbytes == _EMPTY_CHUNK:
            self._absent.add(name)
            return None
        raw = self._read_exactly(fh, key, offset, nbytes)
        return self._decode(raw, name)

    @staticmethod
    def _inner_name(key: str, inner: Sequence[int]) -> str:
        """``shard key[i,j,k]``: how errors and :attr:`absent_chunks` name an inner chunk."""
        return f"{key}[{','.join(str(c) for c in inner)}]"

    @staticmethod
    def _read_exactly(fh: fs.BlobReader, key: str, offset: int, size: int) -> memoryview:
        raw = fh.read(offset, size)
        if len(raw) != size:
            raise ValueError(f"shard {key} is truncated")
        return memoryview(raw)

    def _shard_index(self, fh: fs.BlobReader, key: str) -> NDArray[np.uint64]:
        """The ``(chunks per shard..., 2)`` table of (offset, length) of open shard ``fh``."""
        size = self._index_size
        start = 0
        if self._layout.index_at_end:
            total = fh.size()
            if total < size:
                raise ValueError(f"shard {key} is shorter than its index")
            start = total - size
        raw = fh.read(start, size)
        if len(raw) != size:
            raise ValueError(f"shard {key} is shorter than its index")
        if self._layout.index_crc:
            import google_crc32c

            body = raw[:-4]
            if google_crc32c.value(body) != struct.unpack("<I", raw[-4:])[0]:
                raise ValueError(f"shard {key}: index checksum mismatch")
        else:
            body = raw
        return np.frombuffer(body, "<u8").reshape((*self._per_shard, 2))

    def _decode(self, raw: bytes | memoryview, name: str) -> NDArray[Any]:
        """Chunk ``name`` from its stored bytes: a read-only array of the chunk shape."""
        with self._count_lock:
            self._decodes += 1
        codec = self._layout.codec
        try:
            # Raw bytes are copied out of the run they were read with, so a
            # cached chunk holds its own bytes and not the whole run's.
            data = bytes(raw) if codec is None else codec.decode(raw)
            out = np.frombuffer(data, self._layout.stored).reshape(self._layout.chunks)
        except Exception as exc:
            # numcodecs raises assorted types for damaged input; name the chunk.
            raise ValueError(f"chunk {name} is corrupt: {exc}") from exc
        out.flags.writeable = False
        return out


def _grid_blocks(
    starts: Sequence[int], stops: Sequence[int], block: Sequence[int]
) -> Iterator[tuple[tuple[int, ...], tuple[slice, ...], tuple[slice, ...]]]:
    """The blocks of a regular grid that the non-empty box ``[starts, stops)`` touches.

    Yields
    ------
    tuple
        ``(grid index, slices of the box, slices of the block)`` per block, in
        C order; the two slices select the same voxels.
    """
    ranges = [range(a // s, (b - 1) // s + 1) for a, b, s in zip(starts, stops, block, strict=True)]
    for coords in itertools.product(*ranges):
        dst: list[slice] = []
        src: list[slice] = []
        for c, a, b, s in zip(coords, starts, stops, block, strict=True):
            origin = c * s
            lo, hi = max(a, origin), min(b, origin + s)
            dst.append(slice(lo - a, hi - a))
            src.append(slice(lo - origin, hi - origin))
        yield coords, tuple(dst), tuple(src)


def _v2_layout(meta: dict[str, Any], dtype: np.dtype[Any]) -> _ZarrLayout | None:
    """The layout of a v2 array (``.zarray`` as ``meta``), if read directly."""
    import numcodecs

    if meta.get("order", "C") != "C" or meta.get("filters"):
        return None
    separator = meta.get("dimension_separator") or "."
    if separator not in (".", "/"):
        return None
    compressor = meta.get("compressor")
    codec = None
    if compressor is not None:
        if not isinstance(compressor, dict) or compressor.get("id") not in _V2_COMPRESSORS:
            return None
        codec = numcodecs.get_codec(dict(compressor))
    try:
        stored = np.dtype(meta["dtype"])
    except (KeyError, TypeError, ValueError):
        return None
    if stored.newbyteorder("=") != dtype.newbyteorder("="):
        return None
    chunks = tuple(int(n) for n in meta["chunks"])
    return _ZarrLayout(chunks, stored, codec, prefix="", separator=separator)


def _v3_layout(meta: dict[str, Any], dtype: np.dtype[Any]) -> _ZarrLayout | None:
    """The layout of a v3 array (``zarr.json`` as ``meta``), if read directly."""
    if meta.get("storage_transformers"):
        return None
    grid = _named(meta.get("chunk_grid"))
    encoding = _named(meta.get("chunk_key_encoding"))
    if grid is None or grid[0] != "regular" or encoding is None:
        return None
    outer = tuple(int(n) for n in grid[1].get("chunk_shape", ()))
    if encoding[0] == "default":
        separator = encoding[1].get("separator", "/")
        prefix = f"c{separator}"
    elif encoding[0] == "v2":
        separator = encoding[1].get("separator", ".")
        prefix = ""
    else:
        return None
    if separator not in (".", "/"):
        return None
    codecs = [_named(c) for c in meta.get("codecs", ())]
    if len(codecs) == 1 and codecs[0] is not None and codecs[0][0] == "sharding_indexed":
        config = codecs[0][1]
        inner = tuple(int(n) for n in config.get("chunk_shape", ()))
        chain = _v3_chain([_named(c) for c in config.get("codecs", ())], dtype)
        index = [_named(c) for c in config.get("index_codecs", ())]
        location = config.get("index_location", "end")
        crc = len(index) == 2 and index[1] == ("crc32c", {})
        if (
            chain is None
            or location not in ("start", "end")
            or not index
            or index[0] is None
            or index[0][0] != "bytes"
            or index[0][1].get("endian", "little") != "little"
            or not (len(index) == 1 or crc)
            or len(inner) != len(outer)
            or any(c < 1 or s % c for s, c in zip(outer, inner, strict=True))
        ):
            return None
        return _ZarrLayout(
            inner,
            chain[0],
            chain[1],
            prefix=prefix,
            separator=separator,
            shard=outer,
            index_at_end=location == "end",
            index_crc=crc,
        )
    chain = _v3_chain(codecs, dtype)
    if chain is None:
        return None
    return _ZarrLayout(outer, chain[0], chain[1], prefix=prefix, separator=separator)


def _v3_chain(
    codecs: Sequence[tuple[str, dict[str, Any]] | None], dtype: np.dtype[Any]
) -> tuple[np.dtype[Any], Any] | None:
    """(stored dtype, decompressor) of a ``bytes`` [+ one compressor] chain, else ``None``."""
    import numcodecs

    if not 1 <= len(codecs) <= 2 or any(c is None for c in codecs):
        return None
    first = codecs[0]
    assert first is not None
    endian = first[1].get("endian") or "little"
    if first[0] != "bytes" or endian not in ("little", "big"):
        return None
    stored = dtype.newbyteorder("<" if endian == "little" else ">")
    codec = None
    if len(codecs) == 2:
        second = codecs[1]
        assert second is not None
        if second[0] not in _V3_COMPRESSORS:
            return None
        codec = numcodecs.get_codec({"id": second[0]})
    return stored, codec


def _named(entry: object) -> tuple[str, dict[str, Any]] | None:
    """``(name, configuration)`` of a v3 metadata entry (a dict or a bare name)."""
    if isinstance(entry, str):
        return entry, {}
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
        return None
    config = entry.get("configuration") or {}
    return (entry["name"], dict(config)) if isinstance(config, dict) else None


# ---------------------------------------------------------------------------
# N5

_N5_HEADER = struct.Struct(">HH")


def _n5_decoder(compression: dict[str, Any], *, source: str) -> Callable[[bytes], bytes]:
    kind = str(compression.get("type", "raw")).lower()
    if kind == "raw":
        return lambda b: b
    if kind == "gzip":
        # wbits 47 accepts both gzip and zlib ("useZlib": true) streams.
        return lambda b: zlib.decompress(b, 47)
    if kind == "bzip2":
        return bz2.decompress
    if kind == "xz":
        return lzma.decompress
    if kind in ("zstd", "blosc"):
        import numcodecs

        codec = numcodecs.Zstd() if kind == "zstd" else numcodecs.Blosc()
        return lambda b: bytes(codec.decode(b))
    raise InputError(source, "compression", f"N5 compression {kind!r} is not supported")


class _N5Array:
    """One N5 dataset; reads only the blocks a crop touches."""

    def __init__(self, source: ArraySource) -> None:
        root = source.path
        self._source = source.path
        if not fs.isdir(root):
            raise InputError(source.path, "n5", "N5 container not found")
        parts = [p for p in source.key.replace("\\", "/").split("/") if p]
        folder = fs.join(root, *parts)
        attrs = self._attributes(folder)
        if "dimensions" not in attrs and fs.isfile(fs.join(folder, "s0", "attributes.json")):
            folder = fs.join(folder, "s0")
            parts.append("s0")
            attrs = self._attributes(folder)
        field = f"{'/'.join(parts) or '.'}/attributes.json"
        try:
            dims = [int(v) for v in attrs["dimensions"]]
            block = [int(v) for v in attrs["blockSize"]]
            dtype = np.dtype(str(attrs["dataType"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(
                source.path, field, f"not an N5 dataset (dimensions/blockSize/dataType): {exc}"
            ) from None
        compression = attrs.get("compression", {"type": attrs.get("compressionType", "raw")})
        if not isinstance(compression, dict):
            compression = {"type": str(compression)}
        self._decode = _n5_decoder(compression, source=source.path)
        self._folder = folder
        self._field = field
        shape = dims[::-1]
        if len(shape) != 3:
            template = _spatial_template(shape, source=source.path, field=field)
            if template.count(None) != 3:
                raise InputError(source.path, field, f"N5 dataset of shape {shape} is not 3D")
        self._ndim = len(shape)
        self._lead = len(shape) - 3
        self._shape: Index3 = (shape[-3], shape[-2], shape[-1])
        self._block: Index3 = (block[::-1][-3], block[::-1][-2], block[::-1][-1])
        self._native = dtype.newbyteorder("=")
        self._stored = dtype.newbyteorder(">")
        self._absent: set[str] = set()

    def _attributes(self, folder: str) -> dict[str, Any]:
        path = fs.join(folder, "attributes.json")
        try:
            out = json.loads(fs.read_bytes(path))
        except FileNotFoundError:
            raise InputError(str(path), "attributes.json", "N5 dataset not found") from None
        except (OSError, ValueError) as exc:
            raise InputError(str(path), "attributes.json", f"unreadable: {exc}") from None
        if not isinstance(out, dict):
            raise InputError(str(path), "attributes.json", "not a JSON object")
        return out

    @property
    def shape(self) -> Index3:
        return self._shape

    @property
    def dtype(self) -> np.dtype[Any]:
        return self._native

    @property
    def absent_chunks(self) -> frozenset[str]:
        """Blocks found absent so far, as ``x/y/z`` paths inside the dataset."""
        return frozenset(self._absent)

    def read(self, lo_zyx: Sequence[int], hi_zyx: Sequence[int]) -> NDArray[Any]:
        lo, hi = _check_crop(self._shape, lo_zyx, hi_zyx)
        out = np.zeros(tuple(b - a for a, b in zip(lo, hi, strict=True)), self._native)
        if out.size == 0:
            return out
        ranges = [
            range(a // s, (b - 1) // s + 1) for a, b, s in zip(lo, hi, self._block, strict=True)
        ]
        for bz in ranges[0]:
            for by in ranges[1]:
                for bx in ranges[2]:
                    data = self._read_block((bz, by, bx))
                    if data is None:
                        continue
                    origin = (bz * self._block[0], by * self._block[1], bx * self._block[2])
                    src = []
                    dst = []
                    for o, n, a, b in zip(origin, data.shape, lo, hi, strict=True):
                        s0, s1 = max(a, o), min(b, o + n)
                        src.append(slice(s0 - o, s1 - o))
                        dst.append(slice(s0 - a, s1 - a))
                    out[tuple(dst)] = data[tuple(src)]
        return out

    def _read_block(self, index_zyx: Index3) -> NDArray[Any] | None:
        grid = [0] * self._lead + list(index_zyx)
        grid_s = [str(i) for i in grid]
        path = fs.join(self._folder, *reversed(grid_s))
        try:
            raw = fs.read_bytes(path)
        except FileNotFoundError:
            self._absent.add("/".join(reversed(grid_s)))
            return None
        where = f"{self._field.removesuffix('attributes.json')}{'/'.join(reversed(grid_s))}"
        try:
            mode, ndim = _N5_HEADER.unpack_from(raw, 0)
            dims = struct.unpack_from(f">{ndim}I", raw, 4)
            offset = 4 + 4 * ndim
            if mode == 1:
                offset += 4  # varlength blocks store an element count; size comes from dims
            elif mode != 0:
                raise ValueError(f"block mode {mode} is not an array block")
            data = np.frombuffer(self._decode(raw[offset:]), dtype=self._stored)
            shape = tuple(int(d) for d in reversed(dims))
            data = data[: int(np.prod(shape))].reshape(shape)
        except (struct.error, ValueError, OSError, zlib.error, RuntimeError) as exc:
            raise InputError(self._source, where, f"corrupt N5 block: {exc}") from None
        lead = data.shape[: len(data.shape) - 3]
        if any(n != 1 for n in lead):
            raise InputError(self._source, where, f"block shape {data.shape} is not 3D")
        return data.reshape(data.shape[-3:]).astype(self._native, copy=False)


def _open_n5(source: ArraySource, *, chunk_cache: ChunkCache | None = None) -> TileArray:
    return _N5Array(source)


def write_n5_array(
    path: str | Path,
    key: str,
    data: ArrayLike,
    *,
    block_size_zyx: Sequence[int],
    compression: str = "gzip",
) -> ArraySource:
    """Write a 3D array as an N5 dataset (for test and demo data).

    Parameters
    ----------
    path : str or Path
        The N5 container (a folder), created if needed.
    key : str
        Dataset path inside the container, e.g. ``"setup0/timepoint0/s0"``.
    data : array_like
        The zyx array.
    block_size_zyx : sequence of 3 int
        Block shape.
    compression : {"gzip", "raw", "zstd"}
        Block compression.

    Returns
    -------
    ArraySource
    """
    arr = np.asarray(data)
    if arr.ndim != 3:
        raise ValueError(f"write_n5_array writes 3D arrays, got shape {arr.shape}")
    if compression not in ("gzip", "raw", "zstd"):
        raise ValueError(f"unknown N5 compression {compression!r}")
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "attributes.json").exists():
        (root / "attributes.json").write_text(json.dumps({"n5": "2.0.0"}))
    folder = root / key
    folder.mkdir(parents=True, exist_ok=True)
    block = [int(v) for v in block_size_zyx]
    attrs = {
        "dimensions": list(arr.shape[::-1]),
        "blockSize": block[::-1],
        "dataType": arr.dtype.name,
        "compression": {"type": compression},
    }
    (folder / "attributes.json").write_text(json.dumps(attrs))
    encode: Callable[[bytes], bytes]
    if compression == "gzip":
        encode = gzip.compress
    elif compression == "zstd":
        import numcodecs

        codec = numcodecs.Zstd()
        encode = lambda b: bytes(codec.encode(b))  # noqa: E731
    else:
        encode = lambda b: b  # noqa: E731
    big = arr.astype(arr.dtype.newbyteorder(">"))
    grid = [-(-n // b) for n, b in zip(arr.shape, block, strict=True)]
    for gz in range(grid[0]):
        for gy in range(grid[1]):
            for gx in range(grid[2]):
                chunk = big[
                    gz * block[0] : (gz + 1) * block[0],
                    gy * block[1] : (gy + 1) * block[1],
                    gx * block[2] : (gx + 1) * block[2],
                ]
                header = struct.pack(">HH3I", 0, 3, *chunk.shape[::-1])
                target = folder / str(gx) / str(gy) / str(gz)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(header + encode(np.ascontiguousarray(chunk).tobytes()))
    return ArraySource("n5", str(root.resolve()), key)


# ---------------------------------------------------------------------------
# HDF5

_BDV_CELLS = re.compile(r"^/?t\d+/(s\d+)/\d+/cells$")


@contextlib.contextmanager
def _h5_file(path: str) -> Iterator[Any]:
    """An open ``h5py.File`` of a local path, or of a URL through an fsspec file object."""
    import h5py

    if not fs.is_url(path):
        with h5py.File(path, "r") as fh:
            yield fh
        return
    # h5py does not close a file object it was given: the stack closes both.
    with fs.open_read(path) as handle, h5py.File(handle, "r") as fh:
        yield fh


class _Hdf5Array:
    """One HDF5 dataset; the file is opened per read so the object pickles."""

    def __init__(self, source: ArraySource) -> None:
        self._path = source.path
        try:
            with _h5_file(source.path) as fh:
                key = self._resolve(fh, source.key or "/", source)
                ds = fh[key]
                shape = tuple(int(n) for n in ds.shape)
                stored = np.dtype(ds.dtype)
                view_as = self._legacy_type(fh, key, stored)
        except FileNotFoundError:
            raise InputError(source.path, "hdf5", "HDF5 file not found") from None
        except OSError as exc:
            raise InputError(source.path, "hdf5", f"cannot open as HDF5: {exc}") from None
        self._key = key
        field = f"dataset {key!r}"
        self._template = _spatial_template(shape, source=source.path, field=field)
        self._index = _IndexedArray(
            None,
            self._template,
            stored,
            view_as=view_as,
            backing_shape=shape,
            where=(source.path, field),
        )

    @staticmethod
    def _resolve(fh: Any, key: str, source: ArraySource) -> str:
        import h5py

        if key not in fh:
            raise InputError(source.path, f"dataset {key!r}", "not found in the HDF5 file")
        node = fh[key]
        # A BDV setup/level group: follow to level 0 and its "cells" dataset.
        while isinstance(node, h5py.Group):
            child = "cells" if "cells" in node else "0" if "0" in node else None
            if child is None:
                raise InputError(source.path, f"dataset {key!r}", "is a group, not a dataset")
            key = f"{key.rstrip('/')}/{child}"
            node = fh[key]
        return key

    @staticmethod
    def _legacy_type(fh: Any, key: str, stored: np.dtype[Any]) -> np.dtype[Any] | None:
        match = _BDV_CELLS.match(key)
        if match is None:
            return None
        setup = fh.get(match.group(1))
        declared = setup.attrs.get("dataType") if setup is not None else None
        if declared is None:
            # BigDataViewer wrote uint16 pixels into int16 datasets before it
            # recorded a dataType; it reads them back as uint16.
            return np.dtype(np.uint16) if stored == np.int16 else None
        if isinstance(declared, bytes):
            declared = declared.decode()
        wanted = np.dtype(str(declared))
        return wanted if wanted != stored and wanted.itemsize == stored.itemsize else None

    @property
    def shape(self) -> Index3:
        return self._index.shape

    @property
    def dtype(self) -> np.dtype[Any]:
        return self._index.dtype

    @property
    def absent_chunks(self) -> frozenset[str]:
        # BigDataViewer writes every chunk; unallocated HDF5 chunks are not tracked.
        return frozenset()

    def read(self, lo_zyx: Sequence[int], hi_zyx: Sequence[int]) -> NDArray[Any]:
        with contextlib.ExitStack() as stack:
            try:
                fh = stack.enter_context(_h5_file(self._path))
            except OSError as exc:
                raise InputError(
                    self._path, f"dataset {self._key!r}", f"cannot open: {exc}"
                ) from exc
            return self._index.read_from(fh[self._key], lo_zyx, hi_zyx)


def _open_hdf5(source: ArraySource, *, chunk_cache: ChunkCache | None = None) -> TileArray:
    return _Hdf5Array(source)


# ---------------------------------------------------------------------------
# TIFF


def _tiff_options(source: ArraySource) -> dict[str, int]:
    options: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in source.key.split(","))):
        name, sep, value = part.partition("=")
        if not sep or name.strip() not in ("series", "channel"):
            raise InputError(source.path, f"key {source.key!r}", "TIFF key is 'series=S,channel=C'")
        try:
            options[name.strip()] = int(value)
        except ValueError:
            raise InputError(
                source.path, f"key {source.key!r}", f"{part!r} is not an integer"
            ) from None
    return options


def _open_tiff(source: ArraySource, *, chunk_cache: ChunkCache | None = None) -> TileArray:
    import tifffile

    if fs.is_url(source.path):
        raise InputError(
            source.path,
            "tiff",
            "TIFF tiles are read from local (or mounted) files only; copy the file there, "
            "or convert the tiles to OME-Zarr",
        )
    options = _tiff_options(source)
    series = options.get("series", 0)
    try:
        with tifffile.TiffFile(source.path) as tf:
            if not 0 <= series < len(tf.series):
                raise InputError(
                    source.path, "series", f"series {series} not in file ({len(tf.series)} series)"
                )
            info = tf.series[series]
            shape = tuple(int(n) for n in info.shape)
            axes = str(info.axes)
            dtype = np.dtype(info.dtype)
    except FileNotFoundError:
        raise InputError(source.path, "tiff", "TIFF file not found") from None
    except (OSError, tifffile.TiffFileError) as exc:
        raise InputError(source.path, "tiff", f"cannot open as TIFF: {exc}") from None
    fixed: dict[int, int] = {}
    channel = options.get("channel")
    if "C" in axes:
        c_axis = axes.index("C")
        c = channel or 0
        if not 0 <= c < shape[c_axis]:
            raise InputError(source.path, "channel", f"channel {c} not in 0..{shape[c_axis] - 1}")
        if channel is not None or shape[c_axis] == 1:
            fixed[c_axis] = c
    elif channel:
        raise InputError(source.path, "channel", f"channel {channel} requested, file has no C axis")
    template = _spatial_template(shape, source=source.path, field=f"series {series}", fixed=fixed)
    backing: Any
    try:
        backing = tifffile.memmap(source.path, series=series, mode="r")
    except (ValueError, OSError):
        # Compressed, tiled or scattered pixels cannot be mapped.
        import zarr

        store = tifffile.imread(source.path, aszarr=True, series=series, level=0)
        backing = zarr.open(store, mode="r")
    return _IndexedArray(backing, template, dtype, where=(source.path, f"series {series}"))


# ---------------------------------------------------------------------------
# Stored resolution levels (pyramids)


@dataclass(frozen=True)
class StoredLevel:
    """One stored resolution level of a tile, as its container's metadata states it.

    Attributes
    ----------
    index : int
        Level number (0 is the full resolution).
    source : ArraySource
        What :func:`open_array` opens for this level (level 0: the tile's own
        source, unchanged).
    factors_zyx : tuple of float
        Level voxel size over level-0 voxel size, per axis.
    to_level0 : ndarray of shape (4, 4)
        Level voxel index (zyx) to level-0 voxel index.
    """

    index: int
    source: ArraySource
    factors_zyx: tuple[float, float, float]
    to_level0: NDArray[np.float64]


def _bdv_mipmap(factors_zyx: Sequence[float]) -> NDArray[np.float64]:
    """BigDataViewer's level-to-full-resolution map: ``x0 = f * x + (f - 1) / 2`` per axis.

    bdv-core builds it in ``MipmapTransforms.getMipmapTransformDefault`` for
    every HDF5 and N5 level (its loaders know no other); BigStitcher composes
    the registration with it when it fuses from a level. It states that level
    voxel ``i`` averages full-resolution voxels ``f*i .. f*i + f - 1``, whose
    centre is ``f*i + (f - 1)/2``: how BigDataViewer writes its levels.
    """
    out = np.eye(4)
    for axis, f in enumerate(factors_zyx):
        out[axis, axis] = f
        out[axis, 3] = (f - 1.0) / 2.0
    return out


def _level_factors(values: Any) -> tuple[float, float, float] | None:
    """zyx factors from a BDV xyz triple of positive numbers, else ``None``."""
    try:
        xyz = [float(v) for v in values]
    except (TypeError, ValueError):
        return None
    if len(xyz) != 3 or not all(math.isfinite(v) and v > 0 for v in xyz):
        return None
    return (xyz[2], xyz[1], xyz[0])


def _level0_of(source: ArraySource) -> StoredLevel:
    return StoredLevel(0, source, (1.0, 1.0, 1.0), np.eye(4))


def stored_levels(source: ArraySource) -> tuple[StoredLevel, ...]:
    """The resolution levels stored with a tile, reading metadata only.

    Level 0 (the tile's own ``source``) comes first, then the further levels
    the container declares:

    hdf5
        A BigDataViewer ``t{T}/s{S}/0/cells`` dataset: levels
        ``t{T}/s{S}/{L}/cells``, factors from ``s{S}/resolutions`` (xyz rows).
    n5
        A BigDataViewer ``.../s0`` dataset: its siblings ``s1, s2, ...``,
        factors from the setup's ``downsamplingFactors`` (xyz rows, in the
        attributes of the folder two levels up, as bdv-core writes them) or
        else from each level's own ``downsamplingFactors``.
    zarr
        An OME-Zarr multiscales group (0.4, or 0.5 under ``"ome"``): its
        ``datasets``, factors and offsets from their ``scale`` and
        ``translation`` against the first dataset's (the last three axes).

    HDF5 and N5 levels use BigDataViewer's convention (:func:`_bdv_mipmap`):
    level voxel ``i`` lies at level-0 coordinate ``f*i + (f - 1)/2``. OME-Zarr
    levels use their own metadata, which places every voxel centre: a
    pyramid written with an offset of ``(f - 1)/2`` level-0 voxels (averaged
    blocks, as tilefusion writes them) gets it, one written without (taken
    every ``f``-th voxel) does not.

    Other formats, other layouts, and metadata that is missing or not of
    positive numbers give level 0 only (a level whose factors are unknown is
    left out); nothing here raises for the pyramid's metadata. The level
    arrays themselves are not opened.
    """
    try:
        if source.format == "hdf5":
            found = _hdf5_levels(source)
        elif source.format == "n5":
            found = _n5_levels(source)
        elif source.format == "zarr":
            found = _zarr_levels(source)
        else:
            found = []
    except Exception:  # odd metadata, no access, an object store's error
        # Stored levels only spare reads: whatever keeps them from view leaves level 0.
        found = []
    return (_level0_of(source), *found)


_BDV_LEVEL0_CELLS = re.compile(r"^/?(t\d+)/(s\d+)/0/cells$")


def _hdf5_levels(source: ArraySource) -> list[StoredLevel]:
    with _h5_file(source.path) as fh:
        key = _Hdf5Array._resolve(fh, source.key or "/", source)
        match = _BDV_LEVEL0_CELLS.match(key)
        if match is None:
            return []
        timepoint, setup = match.groups()
        resolutions = fh.get(f"{setup}/resolutions")
        if resolutions is None:
            return []
        rows = np.asarray(resolutions[()], dtype=np.float64)
        out = []
        for level in range(1, len(rows)):
            factors = _level_factors(rows[level])
            level_key = f"{timepoint}/{setup}/{level}/cells"
            if factors is not None and level_key in fh:
                level_source = ArraySource("hdf5", source.path, level_key)
                out.append(StoredLevel(level, level_source, factors, _bdv_mipmap(factors)))
        return out


def _n5_levels(source: ArraySource) -> list[StoredLevel]:
    root = source.path
    key = [p for p in source.key.replace("\\", "/").split("/") if p]
    folder = fs.join(root, *key)
    if "dimensions" not in (_json_object(fs.join(folder, "attributes.json")) or {}):
        key.append("s0")  # a BDV group resolves to its s0 (see _N5Array)
    if not key or key[-1] != "s0":
        return []
    parent = key[:-1]
    setup = _json_object(fs.join(root, *parent[:-1], "attributes.json")) if parent else None
    table = (setup or {}).get("downsamplingFactors")
    out: list[StoredLevel] = []
    level = 1
    while True:
        level_key = [*parent, f"s{level}"]
        attrs = _json_object(fs.join(root, *level_key, "attributes.json"))
        if attrs is None:
            return out
        stated = None
        if isinstance(table, list) and level < len(table):
            stated = table[level]
        elif "downsamplingFactors" in attrs:
            stated = attrs["downsamplingFactors"]
        factors = _level_factors(stated)
        if factors is not None:
            level_source = ArraySource("n5", source.path, "/".join(level_key))
            out.append(StoredLevel(level, level_source, factors, _bdv_mipmap(factors)))
        level += 1


def _ngff_placement(dataset: Any) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Scale and translation (last three axes) of an OME-Zarr multiscales dataset."""
    scale = translation = None
    for step in dataset["coordinateTransformations"]:
        if step["type"] == "scale" and scale is None:
            scale = [float(v) for v in step["scale"]]
        elif step["type"] == "translation" and scale is not None and translation is None:
            translation = [float(v) for v in step["translation"]]
        else:
            raise ValueError(f"unexpected coordinate transformation {step['type']!r}")
    if scale is None:
        raise ValueError("no scale")
    if translation is None:
        translation = [0.0] * len(scale)
    if len(translation) != len(scale) or len(scale) < 2:
        raise ValueError("scale and translation disagree")
    pad = max(0, 3 - len(scale))
    out_scale = np.array([1.0] * pad + scale[-3:])
    out_translation = np.array([0.0] * pad + translation[-3:])
    if not np.all(np.isfinite(out_scale) & (out_scale > 0)) or not np.all(
        np.isfinite(out_translation)
    ):
        raise ValueError("scale and translation must be finite, scales positive")
    return out_scale, out_translation


def _zarr_levels(source: ArraySource) -> list[StoredLevel]:
    if "::" in source.path:
        return []
    key = _zarr_path(source.key)
    _, kind, meta = _zarr_node(fs.join(source.path, *key), None)
    if kind != "group":
        return []
    attrs = dict(meta.get("attributes") or {})
    multiscales = attrs.get("multiscales") or dict(attrs.get("ome") or {}).get("multiscales")
    if not multiscales:
        return []
    datasets = multiscales[0]["datasets"]
    scale0, translation0 = _ngff_placement(datasets[0])
    out = []
    for level, dataset in enumerate(datasets[1:], start=1):
        try:
            scale, translation = _ngff_placement(dataset)
            path = _zarr_path(str(dataset["path"]))
        except (KeyError, TypeError, ValueError, _ZarrPythonDecides):
            continue
        factors = scale / scale0
        to_level0 = np.eye(4)
        to_level0[:3, :3] = np.diag(factors)
        to_level0[:3, 3] = (translation - translation0) / scale0
        level_source = ArraySource("zarr", source.path, "/".join([*key, *path]))
        zyx = (float(factors[0]), float(factors[1]), float(factors[2]))
        out.append(StoredLevel(level, level_source, zyx, to_level0))
    return out


class _Opener(Protocol):
    def __call__(
        self, source: ArraySource, *, chunk_cache: ChunkCache | None = None
    ) -> TileArray: ...


_OPENERS: dict[str, _Opener] = {
    "zarr": _open_zarr,
    "n5": _open_n5,
    "hdf5": _open_hdf5,
    "tiff": _open_tiff,
    "memory": _open_memory,
}
