"""The extension-point registry: built-ins, plugins through entry points, errors."""

from __future__ import annotations

import importlib.metadata as metadata
import logging

import pytest

from tilefusion.registry import Registry, UnknownEntry


def test_register_and_get_by_name() -> None:
    modes: Registry[int] = Registry("tilefusion.test-none", kind="thing")
    modes.register("one", 1)

    @modes.register("two")
    def two() -> int:
        return 2

    assert modes.get("one") == 1
    assert modes.get("two") is two
    assert modes.names() == ("one", "two")
    assert "one" in modes and "three" not in modes
    assert list(modes) == ["one", "two"] and len(modes) == 2


def test_unknown_name_lists_the_known_ones() -> None:
    modes: Registry[int] = Registry("tilefusion.test-none", kind="blending mode")
    modes.register("cosine", 0)
    with pytest.raises(UnknownEntry, match=r"unknown blending mode 'cosin'.*'cosine'"):
        modes.get("cosin")


class _Point:
    def __init__(self, name: str, value: object, *, broken: bool = False) -> None:
        self.name = name
        self.value = f"plugin:{name}"
        self._object = value
        self._broken = broken

    def load(self) -> object:
        if self._broken:
            raise ImportError("no module named plugin")
        return self._object


def test_plugins_come_from_entry_points(monkeypatch, caplog) -> None:
    points = [_Point("darkest", "DARKEST"), _Point("broken", None, broken=True)]

    def fake_entry_points(*, group: str) -> list[_Point]:
        return points if group == "tilefusion.test-plugins" else []

    monkeypatch.setattr("tilefusion.registry.entry_points", fake_entry_points)
    modes: Registry[str] = Registry("tilefusion.test-plugins", kind="blending mode")
    modes.register("cosine", "COSINE")
    with caplog.at_level(logging.WARNING, logger="tilefusion.registry"):
        assert modes.get("darkest") == "DARKEST"
    assert modes.names() == ("cosine", "darkest")
    assert "broken" in caplog.text and "tilefusion.test-plugins" in caplog.text


def test_real_entry_point_api_is_callable() -> None:
    # The standard library API the registry relies on, as installed here.
    assert list(metadata.entry_points(group="tilefusion.no-such-group")) == []
