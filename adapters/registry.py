"""Adapters are found through the entry-point group ``payroll_gateway.adapters``.

Loaded once at start-up into a name → adapter mapping and checked on registration
(:func:`check_adapter`): the name is unique and matches the entry point, the adapter
satisfies the Protocol of its kind (:class:`~adapters.base.MessageAdapter` or
:class:`~adapters.base.FileAdapter`), its declared capabilities agree with what it
implements, and its schema files exist. Every refusal is one line naming the adapter. A
municipality adds a vendor by installing a package that declares such an entry point.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from importlib.metadata import EntryPoint, entry_points
from types import MappingProxyType
from typing import Any

from .base import Adapter, FileAdapter, Kind, MessageAdapter, ReadsBack
from .resources import schema

GROUP = "payroll_gateway.adapters"
_FLAGS = ("file_based", "reads_back", "reads_before_send")


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
        _require_schema_files(ep.name, getattr(factory, "schema_files", ()))
        adapter = factory()
    except RegistryError:
        raise
    except Exception as exc:
        raise RegistryError(f"adapter {ep.name!r} ({ep.value}) could not be loaded: {exc}") from exc
    if getattr(adapter, "name", None) != ep.name:
        raise RegistryError(
            f"adapter {ep.value} calls itself {getattr(adapter, 'name', None)!r}, "
            f"registered as {ep.name!r}"
        )
    return check_adapter(adapter)


def check_adapter(adapter: Any) -> Adapter:
    """The adapter, if it satisfies the Protocol of its kind with consistent capabilities.

    Raises :class:`RegistryError`, one line naming the adapter, otherwise.
    """
    name = getattr(adapter, "name", None)
    if not isinstance(name, str) or not name:
        raise RegistryError(
            f"adapter {type(adapter).__qualname__}: 'name' must be a non-empty string"
        )
    where = f"adapter {name!r}"
    for flag in _FLAGS:
        if not isinstance(getattr(adapter, flag, None), bool):
            raise RegistryError(f"{where}: declare {flag!r} as True or False")
    kind = FileAdapter if adapter.file_based else MessageAdapter
    if not isinstance(adapter, kind):
        missing = [m for m in protocol_members(kind) if not hasattr(adapter, m)]
        raise RegistryError(
            f"{where} does not implement the {kind.__name__} protocol "
            f"(missing: {', '.join(missing)})"
        )
    _check_capabilities(where, adapter)
    _require_schema_files(name, adapter.schema_files)
    return adapter


def _check_capabilities(where: str, adapter: Adapter) -> None:
    if adapter.reads_before_send and not adapter.reads_back:
        raise RegistryError(f"{where}: reads_before_send needs reads_back")
    if adapter.reads_back and not isinstance(adapter, ReadsBack):
        raise RegistryError(f"{where}: declares reads_back but has no read_back method")
    if adapter.reads_back and adapter.file_based:
        raise RegistryError(f"{where}: a file-based adapter cannot read back (file runs do not)")
    if not adapter.kinds or not all(isinstance(k, Kind) for k in adapter.kinds):
        raise RegistryError(f"{where}: kinds must be a non-empty set of report kinds")


def protocol_members(protocol: type) -> list[str]:
    """The attributes and methods a Protocol asks for (its own and inherited)."""
    names: set[str] = set()
    for klass in protocol.__mro__:
        if klass is object or klass.__name__ in ("Protocol", "Generic"):
            continue
        names |= {n for n in vars(klass) if not n.startswith("_")}
        names |= set(getattr(klass, "__annotations__", {}))
    return sorted(names)


def _require_schema_files(name: str, names: Iterable[str]) -> None:
    for rel in names:
        if not schema(rel).is_file():
            raise RegistryError(f"adapter {name!r}: schema file schemas/{rel} is missing")
