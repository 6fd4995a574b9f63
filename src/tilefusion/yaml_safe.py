"""YAML for files users hand us: safe types only, and no aliases.

An alias (``*name``) makes a small file expand into an enormous document
(the "billion laughs"); a manifest or config never needs one, so a document
holding one is refused before it is built.
"""

from __future__ import annotations

from typing import Any

import yaml

from tilefusion.errors import InputError

__all__ = ["load_yaml"]


class _AliasFound(yaml.YAMLError):
    def __init__(self, line: int) -> None:
        super().__init__(f"alias at line {line}")
        self.line = line


class _NoAliasLoader(yaml.SafeLoader):
    """A safe loader that stops at the first alias."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            raise _AliasFound(self.peek_event().start_mark.line + 1)
        return super().compose_node(parent, index)


def load_yaml(text: str, *, source: str) -> Any:
    """Parse one YAML document with safe types and no aliases.

    Parameters
    ----------
    text : str
        The document.
    source : str
        The file it came from, named in errors.

    Raises
    ------
    InputError
        For an alias (naming its line) or malformed YAML, in one line.
    """
    try:
        return yaml.load(text, Loader=_NoAliasLoader)
    except _AliasFound as exc:
        raise InputError(
            source,
            "YAML",
            f"uses an alias (*name) at line {exc.line}; aliases are not accepted, "
            "write the values out",
        ) from None
    except yaml.YAMLError as exc:
        raise InputError(source, "YAML", f"malformed YAML: {exc}".replace("\n", " ")) from None
