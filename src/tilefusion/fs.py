"""One file-system layer for every path tilefusion reads or writes: local, or an fsspec URL.

A path is either local (a plain path, or ``file://``) or a URL
(``s3://bucket/key``, ``gs://``, ``memory://``, any protocol fsspec knows).
Local paths go straight to the operating system, as fast as before there
was a layer; URLs go through `fsspec <https://filesystem-spec.readthedocs.io>`_
(``s3fs`` for ``s3://``). Every module that touches stored bytes (readers,
writer, store, validation) uses these helpers instead of testing for ``"://"``
itself.

Options of the URL file systems come from fsspec's own configuration
(``FSSPEC_S3_ENDPOINT_URL``, ``FSSPEC_S3_ANON``, ``~/.config/fsspec/``), from
the cloud SDK's environment (``AWS_ENDPOINT_URL``, ``AWS_PROFILE``,
``AWS_ACCESS_KEY_ID``, ...), and from the run's ``storage_options`` config key
(see :func:`set_storage_options`), which takes precedence.

:func:`put_atomic` is the one way a stored object or small file is put in
place: a reader sees the old bytes or the new ones, never a part. Locally a
temporary file beside the target is written, synced and renamed (and the
folder synced); an object store's single PUT is atomic by nature.
"""

from __future__ import annotations

import os
import posixpath
import re
import shutil
import stat
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

__all__ = [
    "BlobReader",
    "exists",
    "filesystem",
    "is_url",
    "isdir",
    "isfile",
    "join",
    "listdir",
    "makedirs",
    "name",
    "open_blob",
    "open_read",
    "parent",
    "put_atomic",
    "read_bytes",
    "remove",
    "remove_tree",
    "set_storage_options",
    "storage_options",
    "url_problem",
    "zarr_store",
]

PathLike = str | os.PathLike[str]

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_FILE = "file://"

_OPTIONS: dict[str, dict[str, Any]] = {}


def is_url(path: PathLike) -> bool:
    """Whether ``path`` is a URL that fsspec opens (``file://`` counts as local).

    Chained fsspec URLs (``simplecache::s3://...``) count as URLs too.
    """
    text = os.fspath(path)
    if text.startswith(_FILE):
        return False
    return bool(_URL.match(text)) or "::" in text


def _local(path: PathLike) -> str:
    text = os.fspath(path)
    return text[len(_FILE) :] if text.startswith(_FILE) else text


def join(base: PathLike, *parts: str) -> str:
    """``base/part/...``; a URL stays a URL (``/`` separators, no ``s3:/`` collapse).

    In a URL, ``.`` and ``..`` parts are resolved (object stores have no such folders).
    """
    text = os.fspath(base)
    if not is_url(text):
        return os.path.join(_local(text), *parts)
    out = text.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}" if part else out
    if "/." not in out:
        return out
    head, sep, rest = out.rpartition("://")
    normal = posixpath.normpath(rest)
    return f"{head}{sep}{'' if normal == '.' else normal}"


def name(path: PathLike) -> str:
    """The last component of a path or URL."""
    text = os.fspath(path)
    if not is_url(text):
        return Path(_local(text)).name
    return text.rstrip("/").rsplit("/", 1)[-1]


def parent(path: PathLike) -> str:
    """The folder (or URL prefix) holding ``path``."""
    text = os.fspath(path)
    if not is_url(text):
        return str(Path(_local(text)).parent)
    head, _, _ = text.rstrip("/").rpartition("/")
    return head if not head.endswith(":/") else head + "/"


def set_storage_options(options: Mapping[str, Mapping[str, Any]] | None) -> None:
    """Set the options of URL file systems, by protocol (the config's ``storage_options``).

    Parameters
    ----------
    options : mapping of protocol to mapping, or None
        For example ``{"s3": {"endpoint_url": "http://127.0.0.1:9000", "anon": True}}``
        (keyword arguments of ``s3fs.S3FileSystem``; ``profile`` picks an AWS
        profile). They are merged over fsspec's own configuration. None or
        empty: fsspec's configuration and the environment alone.
    """
    _OPTIONS.clear()
    for protocol, values in (options or {}).items():
        _OPTIONS[str(protocol)] = dict(values)


def storage_options(path: PathLike) -> dict[str, Any]:
    """The options :func:`set_storage_options` gave for the protocol of URL ``path``."""
    text = os.fspath(path)
    protocol = text.split("::")[-1].split("://", 1)[0] if "://" in text else ""
    return dict(_OPTIONS.get(protocol, {}))


def url_problem(path: PathLike) -> str | None:
    """Why URL ``path`` cannot be opened here (unknown protocol, backend not installed), or None.

    Local paths have none. Nothing is contacted: only the protocol is looked up.
    """
    text = os.fspath(path)
    if not is_url(text):
        return None
    import fsspec

    for part in text.split("::"):
        protocol = part.split("://", 1)[0] if "://" in part else part
        try:
            fsspec.get_filesystem_class(protocol)
        except ValueError:
            return f"{protocol}:// is not a protocol fsspec knows"
        except ImportError as exc:
            hint = " (pip install 'tilefusion[s3]')" if protocol in ("s3", "s3a") else ""
            return f"{protocol}:// needs a package that is not installed ({exc}){hint}"
    return None


def filesystem(path: PathLike) -> tuple[Any, str]:
    """The fsspec file system of ``path`` and the path inside it.

    Local paths get fsspec's local file system (the helpers here do not use
    it: they call the operating system directly).
    """
    import fsspec.core

    text = os.fspath(path)
    if not is_url(text):
        return fsspec.filesystem("file"), _local(text)
    try:
        return fsspec.core.url_to_fs(text, **storage_options(text))
    except ImportError as exc:
        raise ImportError(
            f"{text}: reading or writing this URL needs {exc.name or 'its fsspec backend'} "
            "(for s3://: pip install 'tilefusion[s3]')"
        ) from exc


def exists(path: PathLike) -> bool:
    """Whether anything (file, folder, object or prefix) is at ``path``."""
    if not is_url(path):
        return os.path.exists(_local(path))
    fs, inner = filesystem(path)
    return bool(fs.exists(inner))


def isdir(path: PathLike) -> bool:
    """Whether ``path`` is a folder (for object stores: a prefix holding objects)."""
    if not is_url(path):
        return os.path.isdir(_local(path))
    fs, inner = filesystem(path)
    return bool(fs.isdir(inner))


def isfile(path: PathLike) -> bool:
    """Whether ``path`` is a file (an object)."""
    if not is_url(path):
        return os.path.isfile(_local(path))
    fs, inner = filesystem(path)
    return bool(fs.isfile(inner))


def listdir(path: PathLike) -> list[str]:
    """The names directly inside folder (or prefix) ``path``, sorted.

    Raises
    ------
    FileNotFoundError
        When there is nothing at ``path``.
    """
    if not is_url(path):
        return sorted(os.listdir(_local(path)))
    fs, inner = filesystem(path)
    entries = fs.ls(inner, detail=False)
    return sorted(str(e).rstrip("/").rsplit("/", 1)[-1] for e in entries)


def makedirs(path: PathLike) -> None:
    """Create folder ``path`` and its parents (object stores have none to make)."""
    if not is_url(path):
        os.makedirs(_local(path), exist_ok=True)


def read_bytes(path: PathLike) -> bytes:
    """The whole content of file (object) ``path``.

    Raises
    ------
    FileNotFoundError
        When it does not exist (also ``IsADirectoryError`` / ``NotADirectoryError`` locally).
    """
    if not is_url(path):
        with open(_local(path), "rb") as handle:
            return handle.read()
    fs, inner = filesystem(path)
    return bytes(fs.cat_file(inner))


def open_read(path: PathLike) -> BinaryIO:
    """A seekable binary file object of ``path`` (for libraries that want one, such as h5py)."""
    if not is_url(path):
        return open(_local(path), "rb")
    fs, inner = filesystem(path)
    handle: BinaryIO = fs.open(inner, "rb")
    return handle


class BlobReader:
    """Range reads of one file or object (a shard): :meth:`size` and :meth:`read`.

    Local files are read with ``os.pread`` on one descriptor (threads may
    share it); objects with one ranged GET per read.
    """

    def __init__(self, path: PathLike) -> None:
        self.path = os.fspath(path)
        self._fd: int | None = None
        self._fs: Any = None
        self._size: int | None = None
        if is_url(self.path):
            self._fs, self._inner = filesystem(self.path)
            info = self._fs.info(self._inner)
            if info.get("type") == "directory":
                raise IsADirectoryError(self.path)
            self._size = int(info["size"])
        else:
            fd = os.open(_local(self.path), os.O_RDONLY)
            info = os.fstat(fd)
            if stat.S_ISDIR(info.st_mode):
                os.close(fd)
                raise IsADirectoryError(self.path)
            self._fd = fd
            self._size = info.st_size

    def size(self) -> int:
        """Length in bytes."""
        assert self._size is not None
        return self._size

    def read(self, offset: int, size: int) -> bytes:
        """``size`` bytes from ``offset`` (fewer where the blob ends)."""
        if self._fd is not None:
            return os.pread(self._fd, size, offset)
        end = min(offset + size, self.size())
        if end <= offset:
            return b""
        return bytes(self._fs.cat_file(self._inner, start=offset, end=end))

    def close(self) -> None:
        """Release the descriptor (nothing for objects)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> BlobReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_blob(path: PathLike) -> BlobReader:
    """A :class:`BlobReader` of ``path``.

    Raises
    ------
    FileNotFoundError
        When it does not exist (``IsADirectoryError`` for a folder).
    """
    return BlobReader(path)


def _sync_folder(folder: str) -> None:
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - folders that cannot be opened (some FUSE mounts)
        return
    try:
        os.fsync(handle)
    except OSError:  # pragma: no cover - file systems without directory fsync
        pass
    finally:
        os.close(handle)


def put_atomic(
    path: PathLike, data: bytes, *, mkdir: bool = True, sync_folder: bool = True
) -> None:
    """Put ``data`` at ``path`` so that readers see the old bytes or all the new ones.

    Parameters
    ----------
    path : path or URL
        Destination.
    data : bytes
    mkdir : bool, optional
        Create missing parent folders (local paths).
    sync_folder : bool, optional
        Also sync the folder after the rename (local paths), so that the new
        name survives a crash of the machine; stored pixel objects, which a
        marker written after them vouches for, skip it.

    Notes
    -----
    Locally: a temporary file beside the target (named after it, the process
    and the thread, so concurrent writers never share one), ``fsync``,
    rename over the target. Object stores: one PUT, which replaces the whole
    object at once.
    """
    if is_url(path):
        fs, inner = filesystem(path)
        fs.pipe_file(inner, data)
        return
    local = _local(path)
    folder, base = os.path.split(local)
    if mkdir and folder:
        os.makedirs(folder, exist_ok=True)
    temporary = os.path.join(folder, f".{base}.{os.getpid()}.{threading.get_ident()}.partial")
    try:
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, local)
    except BaseException:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        raise
    if sync_folder:
        _sync_folder(folder or ".")


def remove(path: PathLike) -> None:
    """Remove file (object) ``path``; nothing there is fine."""
    if not is_url(path):
        try:
            os.unlink(_local(path))
        except FileNotFoundError:
            pass
        return
    fs, inner = filesystem(path)
    try:
        fs.rm_file(inner)
    except FileNotFoundError:
        pass


def remove_tree(path: PathLike) -> None:
    """Remove folder (prefix) ``path`` and all it holds; nothing there is fine."""
    if not is_url(path):
        if os.path.isdir(_local(path)):
            shutil.rmtree(_local(path))
        return
    fs, inner = filesystem(path)
    try:
        fs.rm(inner, recursive=True)
    except FileNotFoundError:
        pass


def zarr_store(path: PathLike, *, read_only: bool = True) -> Any:
    """What ``zarr.open_*`` takes for ``path``: the path itself, or an fsspec store of the URL."""
    text = os.fspath(path)
    if not is_url(text):
        return _local(text)
    from zarr.storage import FsspecStore

    return FsspecStore.from_url(text, storage_options=storage_options(text), read_only=read_only)
