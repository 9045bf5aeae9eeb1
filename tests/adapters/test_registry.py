"""The adapter registry: the entry points load, and an adapter whose schema files are missing
is refused with one line that names the file, before the adapter tries to read it. An adapter
must satisfy the Protocol of its kind, and its declared capabilities must agree."""

from __future__ import annotations

from importlib.metadata import EntryPoint
from typing import Any

import pytest

import adapters.registry
from adapters.base import FileAdapter, Kind, MessageAdapter
from adapters.registry import RegistryError, check_adapter, load_adapters


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
    with pytest.raises(
        RegistryError,
        match=r"^adapter 'unreadable': schema file schemas/nowhere/missing.xsd is missing$",
    ):
        load_adapters()


# -- validation on registration: the Protocol of the adapter's kind, consistent capabilities ----------


class Good:
    """The smallest message adapter the registry accepts."""

    name = "good"
    kinds = frozenset({Kind.DRIVE})
    schema_files: tuple[str, ...] = ()
    required_fields: frozenset[str] = frozenset()
    unsupported_fields: frozenset[str] = frozenset()
    field_formats: dict[str, tuple[str, str]] = {}
    opening_hours: str | None = None
    file_based = False
    reads_back = False
    reads_before_send = False

    def plan(self, report: Any, delivered: Any, settings: Any) -> Any: ...

    def render(self, report: Any, message: Any, settings: Any) -> Any: ...

    async def send(self, payload: Any, channel: Any) -> Any: ...


class ReadsBeforeSendWithoutReadBack(Good):
    reads_back = False
    reads_before_send = True


class ClaimsReadBackWithoutMethod(Good):
    reads_back = True


class NoSend(Good):
    send = None  # type: ignore[assignment]


class FileWithoutLayout(Good):
    file_based = True


class NoDeclaration(Good):
    reads_back = None  # type: ignore[assignment]


class MissingSchema(Good):
    schema_files = ("nowhere/missing.xsd",)


class NoKinds(Good):
    kinds: frozenset[Kind] = frozenset()


def test_a_complete_adapter_is_accepted() -> None:
    adapter = Good()
    assert check_adapter(adapter) is adapter


@pytest.mark.parametrize(
    ("factory", "words"),
    [
        (ReadsBeforeSendWithoutReadBack, "reads_before_send needs reads_back"),
        (ClaimsReadBackWithoutMethod, "declares reads_back but has no read_back method"),
        (NoSend, "does not implement the MessageAdapter protocol"),
        (
            FileWithoutLayout,
            "does not implement the FileAdapter protocol (missing: check_settings, render_file)",
        ),
        (NoDeclaration, "declare 'reads_back' as True or False"),
        (MissingSchema, "schema file schemas/nowhere/missing.xsd is missing"),
        (NoKinds, "kinds must be a non-empty set"),
    ],
)
def test_an_inconsistent_adapter_is_refused_in_one_line_naming_it(
    factory: type[Good], words: str
) -> None:
    with pytest.raises(RegistryError) as err:
        check_adapter(factory())
    text = str(err.value)
    assert text.startswith("adapter 'good'") and words in text and "\n" not in text


def test_an_adapter_registered_under_another_name_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ep = EntryPoint("other", f"{__name__}:Good", adapters.registry.GROUP)
    monkeypatch.setattr(adapters.registry, "entry_points", lambda **_: [ep])
    with pytest.raises(RegistryError, match=r"calls itself 'good', registered as 'other'$"):
        load_adapters()


def test_the_same_name_twice_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    ep = EntryPoint("good", f"{__name__}:Good", adapters.registry.GROUP)
    monkeypatch.setattr(adapters.registry, "entry_points", lambda **_: [ep, ep])
    with pytest.raises(RegistryError, match=r"^adapter 'good' is registered twice$"):
        load_adapters()


def test_the_built_in_adapters_declare_their_kind_and_capabilities() -> None:
    loaded = load_adapters()
    declared = {
        name: (a.file_based, a.reads_back, a.reads_before_send) for name, a in loaded.items()
    }
    assert declared == {
        "sd-koersel": (False, False, False),
        "kmd-absence": (False, True, False),
        "kmd-engangsydelser": (False, True, True),
        "kmd-ind01": (True, False, False),
    }
    assert isinstance(loaded["kmd-ind01"], FileAdapter)
    assert all(isinstance(a, MessageAdapter) for n, a in loaded.items() if n != "kmd-ind01")


class _DeclaresLate(Good):
    """An adapter whose schema files are only known once it is built."""

    def __init__(self) -> None:
        self.schema_files = ("nowhere/late.xsd",)


def test_schema_files_declared_by_the_built_adapter_are_checked_too(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ep = EntryPoint("good", f"{__name__}:_DeclaresLate", adapters.registry.GROUP)
    monkeypatch.setattr(adapters.registry, "entry_points", lambda **_: [ep])
    with pytest.raises(
        RegistryError, match=r"^adapter 'good': schema file schemas/nowhere/late.xsd is missing$"
    ):
        load_adapters()
