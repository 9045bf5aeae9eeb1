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
