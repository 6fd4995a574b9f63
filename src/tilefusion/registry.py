"""Named extension points, filled by tilefusion itself and by Python entry points.

Every extension point (blending modes, transform kinds, dataset readers, ...)
is one :class:`Registry`. Built-in entries register themselves when their
module is imported; third-party packages add entries through the entry point
group of the registry, declared in their own ``pyproject.toml``::

    [project.entry-points."tilefusion.blending"]
    darkest = "my_package.blending:DarkestMode"

The entry point's object is registered under the entry point's name the first
time the registry is asked for a name it does not know, or for its list of
names. A broken plugin is reported with the group and entry name, and does not
hide the built-in entries.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from importlib.metadata import entry_points
from typing import Generic, TypeVar, overload

__all__ = ["Registry", "UnknownEntry"]

T = TypeVar("T")

log = logging.getLogger(__name__)


class UnknownEntry(ValueError):
    """A name that no entry of a registry (built-in or plugin) has."""


class Registry(Generic[T]):
    """A mapping from names to extensions of one kind.

    Parameters
    ----------
    group : str
        Entry point group that plugins register in, e.g. ``"tilefusion.blending"``.
    kind : str
        What an entry is, for messages (``"blending mode"``).
    """

    def __init__(self, group: str, *, kind: str) -> None:
        self.group = group
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._plugins_loaded = False

    @overload
    def register(self, name: str) -> Callable[[T], T]: ...

    @overload
    def register(self, name: str, entry: T) -> T: ...

    def register(self, name: str, entry: T | None = None) -> T | Callable[[T], T]:
        """Add ``entry`` under ``name``; without ``entry``, return a decorator.

        Registering a name twice replaces the earlier entry, so a plugin can
        override a built-in on purpose; a warning says so.
        """

        def add(value: T) -> T:
            if name in self._entries and self._entries[name] is not value:
                log.warning("%s %r replaced by %r", self.kind, name, value)
            self._entries[name] = value
            return value

        if entry is None:
            return add
        return add(entry)

    def _load_plugins(self) -> None:
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        for point in entry_points(group=self.group):
            if point.name in self._entries:
                continue
            try:
                self._entries[point.name] = point.load()
            except Exception as error:  # a broken plugin must not hide the others
                log.warning(
                    "could not load %s %r from entry point %s (%s): %s",
                    self.kind,
                    point.name,
                    self.group,
                    point.value,
                    error,
                )

    def get(self, name: str) -> T:
        """Return the entry called ``name``.

        Raises
        ------
        UnknownEntry
            Naming the registry's kind, the name and the known names.
        """
        if name not in self._entries:
            self._load_plugins()
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(repr(n) for n in self.names())
            raise UnknownEntry(
                f"unknown {self.kind} {name!r}; expected one of {{{known}}}"
            ) from None

    def names(self) -> tuple[str, ...]:
        """Names of every entry, built-in and plugin, sorted."""
        self._load_plugins()
        return tuple(sorted(self._entries))

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        if name not in self._entries:
            self._load_plugins()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())
