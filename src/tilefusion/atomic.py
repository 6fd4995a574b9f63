"""Durable, atomic file writes: the one way tilefusion puts a small file in place.

A reader sees either the old file or the whole new one, never a part, and a
file that was renamed into place survives a crash of the machine: the bytes
are synced before the rename, and the folder after it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["write_bytes_atomic", "write_json_atomic", "write_text_atomic"]


def _sync_folder(folder: Path) -> None:
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


def write_bytes_atomic(path: str | Path, data: bytes, *, mkdir: bool = True) -> None:
    """Write ``data`` to ``path``: temporary file beside it, fsync, rename, fsync the folder.

    Parameters
    ----------
    path : path
        Destination; its folder is created when ``mkdir``.
    data : bytes
    mkdir : bool, optional
        Create missing parent folders.
    """
    path = Path(path)
    if mkdir:
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _sync_folder(path.parent)


def write_text_atomic(path: str | Path, text: str) -> None:
    """:func:`write_bytes_atomic` for UTF-8 text."""
    write_bytes_atomic(path, text.encode())


def write_json_atomic(path: str | Path, data: Mapping[str, Any], *, indent: int = 1) -> None:
    """:func:`write_bytes_atomic` for JSON (keys sorted, so equal data gives equal bytes)."""
    write_text_atomic(path, json.dumps(data, indent=indent, sort_keys=True))
