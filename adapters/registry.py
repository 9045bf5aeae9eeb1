"""Adapters are found through the entry-point group ``payroll_gateway.adapters``.

Loaded once at start-up into a name → adapter mapping and checked on registration: the
name is unique, matches the entry point, and the adapter's schema files exist. A
municipality adds a vendor by installing a package that declares such an entry point.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from importlib.metadata import EntryPoint, entry_points
from types import MappingProxyType

from .base import Adapter
from .resources import schema

GROUP = "payroll_gateway.adapters"


class RegistryError(Exception):
    """An adapter could not be registered; the message names it."""


def load_adapters(disabled: Iterable[str] = ()) -> Mapping[str, Adapter]:
    """Instantiate every registered adapter except the disabled ones."""
    skip = set(disabled)
    adapters: dict[str, Adapter] = {}
    for ep in sorted(entry_points(group=GROUP), key=lambda e: e.name):
        if ep.name in skip:
            continue
        if ep.name in adapters:
            raise RegistryError(f"adapter {ep.name!r} is registered twice")
        adapters[ep.name] = _instantiate(ep)
    return MappingProxyType(adapters)


def _instantiate(ep: EntryPoint) -> Adapter:
    try:
        factory = ep.load()
        # checked before the adapter is built: its __init__ reads them
        _require_schema_files(ep, getattr(factory, "schema_files", ()))
        adapter = factory()
    except RegistryError:
        raise
    except Exception as exc:
        raise RegistryError(f"adapter {ep.name!r} ({ep.value}) could not be loaded: {exc}") from exc
    if not isinstance(adapter, Adapter):
        raise RegistryError(f"adapter {ep.name!r} does not implement the Adapter protocol")
    if adapter.name != ep.name:
        raise RegistryError(f"adapter {ep.value} calls itself {adapter.name!r}, registered as {ep.name!r}")
    _require_schema_files(ep, adapter.schema_files)
    return adapter


def _require_schema_files(ep: EntryPoint, names: Iterable[str]) -> None:
    for rel in names:
        if not schema(rel).is_file():
            raise RegistryError(f"adapter {ep.name!r}: schema file schemas/{rel} is missing")
