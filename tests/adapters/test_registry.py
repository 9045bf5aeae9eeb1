"""The adapter registry: the entry points load, and an adapter whose schema files are missing
is refused with one line that names the file, before the adapter tries to read it."""

from __future__ import annotations

from importlib.metadata import EntryPoint
from typing import Any

import pytest

import adapters.registry
from adapters.registry import RegistryError, load_adapters


class Unreadable:
    name = "unreadable"
    schema_files = ("sd/sd-20170501.xsd", "nowhere/missing.xsd")

    def __init__(self) -> None:
        raise FileNotFoundError("read before the check")


def test_every_registered_adapter_loads_with_its_schema_files() -> None:
    assert {"sd-koersel", "kmd-absence", "kmd-engangsydelser", "kmd-ind01"} <= set(load_adapters())


def test_a_missing_schema_file_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    ep = EntryPoint("unreadable", f"{__name__}:Unreadable", adapters.registry.GROUP)

    def only_this(**_: Any) -> list[EntryPoint]:
        return [ep]

    monkeypatch.setattr(adapters.registry, "entry_points", only_this)
    with pytest.raises(RegistryError, match=r"^adapter 'unreadable': schema file schemas/nowhere/missing.xsd is missing$"):
        load_adapters()


class _DeclaresLate:
    """An adapter whose schema files are only known once it is built."""

    kinds = frozenset()
    required_fields = unsupported_fields = frozenset()
    field_formats: dict[str, tuple[str, str]] = {}

    def __init__(self) -> None:
        self.name = "late"
        self.schema_files = ("nowhere/late.xsd",)

    def plan(self, *_: Any) -> Any: ...
    def render(self, *_: Any) -> Any: ...
    async def send(self, *_: Any) -> Any: ...


def make_late() -> _DeclaresLate:
    return _DeclaresLate()


def test_schema_files_declared_by_the_built_adapter_are_checked_too(monkeypatch: pytest.MonkeyPatch) -> None:
    ep = EntryPoint("late", f"{__name__}:make_late", adapters.registry.GROUP)
    monkeypatch.setattr(adapters.registry, "entry_points", lambda **_: [ep])
    with pytest.raises(RegistryError, match=r"^adapter 'late': schema file schemas/nowhere/late.xsd is missing$"):
        load_adapters()
