"""Durable, atomic writes of small files (JSON, text), over :func:`tilefusion.fs.put_atomic`.

A reader sees either the old file or the whole new one, never a part; a
local file renamed into place survives a crash of the machine (see
:mod:`tilefusion.fs`, the one home of the atomic put, for local paths and
object stores alike).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tilefusion.fs import put_atomic

__all__ = ["write_bytes_atomic", "write_json_atomic", "write_text_atomic"]


def write_bytes_atomic(path: str | Path, data: bytes, *, mkdir: bool = True) -> None:
    """Put ``data`` at ``path`` atomically and durably (see :func:`tilefusion.fs.put_atomic`).

    Parameters
    ----------
    path : path or URL
        Destination; a local one's folder is created when ``mkdir``.
    data : bytes
    mkdir : bool, optional
        Create missing parent folders.
    """
    put_atomic(path, data, mkdir=mkdir)


def write_text_atomic(path: str | Path, text: str) -> None:
    """:func:`write_bytes_atomic` for UTF-8 text."""
    write_bytes_atomic(path, text.encode())


def write_json_atomic(path: str | Path, data: Mapping[str, Any], *, indent: int = 1) -> None:
    """:func:`write_bytes_atomic` for JSON (keys sorted, so equal data gives equal bytes)."""
    write_text_atomic(path, json.dumps(data, indent=indent, sort_keys=True))
