"""Pixel writing: encode a level's stored objects and write them whole.

The fuse and downsample jobs own whole stored objects (Zarr v2 chunks, Zarr
v3 chunks or shards), so they need none of zarr-python's read-modify-write
machinery. :class:`LevelWriter` reads the array's own metadata
(``zarr.json`` or ``.zarray``), encodes each object with numcodecs on the
calling thread (the codecs release the GIL, so a job's threads encode in
parallel) and puts it in place atomically (:func:`tilefusion.fs.put_atomic`:
locally a temporary file, ``fsync``, rename; on an object store one PUT). The
SHA-256 of the bytes is taken from memory, not by reading the file back.
Objects are readable by any Zarr implementation; the metadata is written by
:mod:`tilefusion.store` and never touched here.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from tilefusion import fs
from tilefusion.errors import InputError
from tilefusion.plan import Level, Shape3

__all__ = [
    "LevelWriter",
    "UnsupportedLayout",
    "cast_into",
    "cast_to_dtype",
    "layout_problem",
    "object_digest",
]

_EMPTY = np.uint64(2**64 - 1)


class UnsupportedLayout(ValueError):
    """The array's metadata names a layout this writer does not encode."""


def cast_to_dtype(block: NDArray[np.floating[Any]], dtype: np.dtype[Any]) -> NDArray[Any]:
    """Round and clip a float block to ``dtype`` (floats pass through)."""
    out = np.empty(block.shape, dtype=dtype)
    cast_into(block.copy(), out)
    return out


def cast_into(block: NDArray[np.floating[Any]], out: NDArray[Any]) -> None:
    """:func:`cast_to_dtype` into ``out``, using ``block`` as scratch (it is overwritten)."""
    if np.issubdtype(out.dtype, np.integer):
        info = np.iinfo(out.dtype)
        np.rint(block, out=block)
        np.clip(block, info.min, info.max, out=block)
    np.copyto(out, block, casting="unsafe")


def object_digest(path: str | Path) -> str | None:
    """SHA-256 of a stored object's bytes (a local path or URL), or None when it does not exist."""
    try:
        return hashlib.sha256(fs.read_bytes(path)).hexdigest()
    except FileNotFoundError:
        return None


@dataclass(frozen=True)
class _Layout:
    """What the writer needs from an array's metadata."""

    shape: Shape3
    chunks: Shape3
    shards: Shape3 | None  # None: every chunk is its own object
    dtype: np.dtype[Any]
    fill_value: Any
    codec: Any  # a numcodecs codec, or None for raw bytes
    key_prefix: str
    separator: str


def _v3_compressor(codecs: Sequence[dict[str, Any]], where: str) -> Any:
    """The numcodecs codec for ``[bytes, <compressor>]``; None for bytes alone."""
    import numcodecs

    names = [c.get("name") for c in codecs]
    if not names or names[0] != "bytes" or len(names) > 2:
        raise UnsupportedLayout(f"{where}: codecs {names} are not [bytes, <compressor>]")
    if codecs[0].get("configuration", {}).get("endian", "little") != "little":
        raise UnsupportedLayout(f"{where}: only little-endian bytes are written")
    if len(codecs) == 1:
        return None
    name = names[1]
    config = dict(codecs[1].get("configuration", {}))
    if name == "zstd":
        return numcodecs.Zstd(level=config.get("level", 0), checksum=config.get("checksum", False))
    if name == "gzip":
        return numcodecs.GZip(level=config.get("level", 6))
    if name == "blosc":
        shuffles = {
            "noshuffle": numcodecs.Blosc.NOSHUFFLE,
            "shuffle": numcodecs.Blosc.SHUFFLE,
            "bitshuffle": numcodecs.Blosc.BITSHUFFLE,
        }
        return numcodecs.Blosc(
            cname=config.get("cname", "zstd"),
            clevel=config.get("clevel", 5),
            shuffle=shuffles[config.get("shuffle", "shuffle")],
            blocksize=config.get("blocksize", 0),
        )
    raise UnsupportedLayout(f"{where}: codec {name!r} is not written by tilefusion")


def _metadata(array_path: str) -> tuple[str, dict[str, Any]] | None:
    """``(document name, parsed document)`` of an array's metadata (v3 first), or None."""
    for document in ("zarr.json", ".zarray"):
        try:
            raw = fs.read_bytes(fs.join(array_path, document))
        except (FileNotFoundError, NotADirectoryError):
            continue
        return document, json.loads(raw)
    return None


def _read_layout(array_path: str) -> _Layout:
    try:
        found = _metadata(array_path)
        if found is not None:
            document, meta = found
            where = fs.join(array_path, document)
            return _v3_layout(meta, where) if document == "zarr.json" else _v2_layout(meta, where)
        problem = "no zarr.json or .zarray"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        if isinstance(exc, UnsupportedLayout):
            raise
        problem = f"unreadable ({exc.__class__.__name__})"
    raise InputError(
        array_path,
        "array metadata",
        f"{problem}; rerun the job (tilefusion mends it), or snakemake --forcerun assemble",
    )


def layout_problem(array_path: str | Path) -> str | None:
    """Why an array's metadata cannot be written to (missing, unreadable), or None."""
    try:
        _read_layout(os.fspath(array_path))
    except InputError as exc:
        return str(exc)
    return None


def _v3_layout(meta: dict[str, Any], where: str) -> _Layout:
    outer = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
    encoding = meta.get("chunk_key_encoding", {"name": "default"})
    separator = encoding.get("configuration", {}).get(
        "separator", "/" if encoding["name"] == "default" else "."
    )
    prefix = "c" + separator if encoding["name"] == "default" else ""
    codecs = meta["codecs"]
    shards: Shape3 | None = None
    chunks = outer
    if codecs and codecs[0]["name"] == "sharding_indexed":
        config = codecs[0]["configuration"]
        index_names = [c.get("name") for c in config.get("index_codecs", [])]
        if index_names != ["bytes", "crc32c"] or config.get("index_location", "end") != "end":
            raise UnsupportedLayout(f"{where}: shard index {index_names} is not [bytes, crc32c]")
        shards = outer
        chunks = tuple(config["chunk_shape"])
        codecs = config["codecs"]
    return _Layout(
        shape=tuple(meta["shape"]),
        chunks=chunks,
        shards=shards,
        dtype=np.dtype(meta["data_type"]).newbyteorder("<"),
        fill_value=meta.get("fill_value", 0),
        codec=_v3_compressor(codecs, where),
        key_prefix=prefix,
        separator=separator,
    )


def _v2_layout(meta: dict[str, Any], where: str) -> _Layout:
    import numcodecs

    if meta.get("filters") or meta.get("order", "C") != "C":
        raise UnsupportedLayout(f"{where}: filters or Fortran order are not written")
    compressor = meta.get("compressor")
    return _Layout(
        shape=tuple(meta["shape"]),
        chunks=tuple(meta["chunks"]),
        shards=None,
        dtype=np.dtype(meta["dtype"]),
        fill_value=meta.get("fill_value", 0) or 0,
        codec=numcodecs.get_codec(compressor) if compressor else None,
        key_prefix="",
        separator=meta.get("dimension_separator", "."),
    )


class LevelWriter:
    """Write whole stored objects of one level's array.

    Parameters
    ----------
    root : path or URL
        The output group.
    level_index : int
        Which level (its array is ``root/<level_index>``).
    level : Level
        The level's plan; its shards are the units :meth:`write` takes.

    Raises
    ------
    UnsupportedLayout
        When the array's codecs are not ones :func:`tilefusion.store.prepare_store` creates.
    """

    def __init__(self, root: str | Path, level_index: int, level: Level) -> None:
        self.root = os.fspath(root)
        self.level_index = level_index
        self.level = level
        self._remote = fs.is_url(self.root)
        self.layout = _read_layout(fs.join(self.root, str(level_index)))
        if tuple(self.layout.shape) != tuple(level.shape_zyx):
            raise UnsupportedLayout(
                f"{fs.join(self.root, str(level_index))}: array shape {list(self.layout.shape)} "
                f"is not the plan's {list(level.shape_zyx)}"
            )

    @property
    def dtype(self) -> np.dtype[Any]:
        """The stored data type (native byte order)."""
        return self.layout.dtype.newbyteorder("=")

    def _key(self, index: Sequence[int]) -> str:
        return self.layout.key_prefix + self.layout.separator.join(str(i) for i in index)

    def object_indices(self, shard: Shape3) -> list[tuple[int, ...]]:
        """Indices of the stored objects inside one plan shard."""
        step = self.layout.shards or self.layout.chunks
        lo = [s * n for s, n in zip(shard, self.level.shards_zyx)]
        hi = [min(a + n, s) for a, n, s in zip(lo, self.level.shards_zyx, self.layout.shape)]
        ranges = [range(a // k, math.ceil(b / k)) for a, b, k in zip(lo, hi, step)]
        return [(z, y, x) for z in ranges[0] for y in ranges[1] for x in ranges[2]]

    def write(self, shard: Shape3, block: NDArray[Any] | None) -> dict[str, str | None]:
        """Encode and write the objects of one plan shard.

        Parameters
        ----------
        shard : tuple of 3 ints
            The shard's index in the level's shard grid.
        block : ndarray or None
            The shard's voxels (its box clipped to the array), of :attr:`dtype`;
            None when nothing touches it.

        Returns
        -------
        dict
            Store key (``"<level>/<object key>"``) to the SHA-256 of the bytes
            written, or None for an object left out because it holds only the
            fill value (a stale object from an earlier run is removed).
        """
        step = self.layout.shards or self.layout.chunks
        origin = [s * n for s, n in zip(shard, self.level.shards_zyx)]
        out: dict[str, str | None] = {}
        for index in self.object_indices(shard):
            lo = [i * k for i, k in zip(index, step)]
            payload = None
            if block is not None:
                local = tuple(
                    slice(a - o, min(a + k, n) - o)
                    for a, o, k, n in zip(lo, origin, step, self.layout.shape)
                )
                payload = self._encode_object(block[local])
            key = f"{self.level_index}/{self._key(index)}"
            out[key] = self._store(fs.join(self.root, key), payload)
        return out

    def _encode_object(self, data: NDArray[Any]) -> bytes | None:
        if self.layout.shards is None:
            return self._encode_chunk(data)
        return self._encode_shard(data)

    def _encode_chunk(self, data: NDArray[Any]) -> bytes | None:
        """One chunk, padded with the fill value to the full chunk shape; None if empty."""
        if not np.any(data != self.layout.fill_value):
            return None
        chunk = data
        if data.shape != self.layout.chunks:
            chunk = np.full(self.layout.chunks, self.layout.fill_value, dtype=data.dtype)
            chunk[tuple(slice(0, s) for s in data.shape)] = data
        raw = np.ascontiguousarray(chunk, dtype=self.layout.dtype)
        if self.layout.codec is None:
            return raw.tobytes()
        return bytes(self.layout.codec.encode(raw))

    def _encode_shard(self, data: NDArray[Any]) -> bytes | None:
        import google_crc32c

        chunks = self.layout.chunks
        per_shard = [s // c for s, c in zip(self.layout.shards, chunks)]  # type: ignore[arg-type]
        index = np.full((*per_shard, 2), _EMPTY, dtype="<u8")
        parts: list[bytes] = []
        offset = 0
        for inner in _c_order(per_shard):
            lo = [i * c for i, c in zip(inner, chunks)]
            if any(a >= s for a, s in zip(lo, data.shape)):
                continue
            sub = data[tuple(slice(a, a + c) for a, c in zip(lo, chunks))]
            encoded = self._encode_chunk(sub)
            if encoded is None:
                continue
            index[(*inner, 0)] = offset
            index[(*inner, 1)] = len(encoded)
            parts.append(encoded)
            offset += len(encoded)
        if not parts:
            return None
        index_bytes = index.tobytes()
        checksum = np.array([google_crc32c.value(index_bytes)], dtype="<u4").tobytes()
        return b"".join([*parts, index_bytes, checksum])

    def _store(self, path: str, payload: bytes | None) -> str | None:
        # On an object store a key and a "folder" of that name can coexist: no damage to mend.
        if not self._remote and os.path.isdir(path) and not os.path.islink(path):
            # A folder where this job's object belongs (damage): the key is ours.
            shutil.rmtree(path)
        if payload is None:
            # An earlier run may have stored data here; the plan says it is empty now.
            fs.remove(path)
            return None
        # Readers never see a half-written object, and a killed job leaves the old
        # one. The folder is not synced: the marker, written after, vouches for it.
        fs.put_atomic(path, payload, sync_folder=False)
        return hashlib.sha256(payload).hexdigest()


def _c_order(shape: Sequence[int]) -> Iterator[tuple[int, ...]]:
    return (tuple(int(v) for v in idx) for idx in np.ndindex(*shape))
