"""The Engangsydelser simulator over mutual TLS, driven by the real adapter."""

from __future__ import annotations

import ssl
import uuid
from dataclasses import replace
from datetime import date
from decimal import Decimal
from typing import Any

import aiohttp
import pytest

from adapters.base import Channel, InDoubt, Plan, Rejected, Report, Transient, VendorSettings
from adapters.kmd_engangsydelser import KmdEngangsydelser
from gateway.devcerts import DevCerts, ensure_dev_certs
from gateway.simulators import SimulatorOptions
from gateway.simulators.engangsydelser import (
    STATE,
    Ledger,
    SimState,
    _mixed_fault,
    build_app,
    ssl_context,
)

ADAPTER = KmdEngangsydelser()
EMPLOYEE = "00012345"


def drive(**over: Any) -> Report:
    data: dict[str, Any] = {
        "kind": "drive",
        "municipality": "840",
        "report_id": "R-1",
        "version": 1,
        "employee": {"cpr": "0101901234", "employment_id": EMPLOYEE},
        "drive_date": "2024-11-27",
        "distance_km": "12.5",
        "wage_code": "0100",
        "approved_by_cpr": "0202801234",
    }
    data.update(over)
    return Report.from_dict(data)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> DevCerts:
    return ensure_dev_certs(tmp_path_factory.mktemp("certs"))


def _options(certs: DevCerts, **over: Any) -> SimulatorOptions:
    return SimulatorOptions(
        cert_file=str(certs.server_cert),
        key_file=str(certs.server_key),
        client_ca_file=str(certs.ca_file),
        seed=1,
        **over,
    )


@pytest.fixture
async def kmd(aiohttp_server: Any, certs: DevCerts) -> Any:
    """(simulator state, channel over mTLS)."""
    options = _options(certs)
    app = build_app(options)
    server = await aiohttp_server(app, ssl=ssl_context(options))
    connector = aiohttp.TCPConnector(ssl=certs.client_context())
    async with aiohttp.ClientSession(connector=connector) as session:
        settings = VendorSettings(endpoint=str(server.make_url("/")), read_timeout=2)
        yield app[STATE], Channel(session, settings)


async def deliver(report: Report, channel: Channel) -> Any:
    """What the dispatcher does: read back, plan, render, send (None when nothing to send)."""
    delivered = await ADAPTER.read_back(report, [], [], channel)
    plan = ADAPTER.plan(report, delivered, channel.settings)
    if not plan.messages:
        return plan
    payload = ADAPTER.render(report, plan.messages[0], channel.settings)
    return await ADAPTER.send(payload, channel)


# -- ledger (pure) ------------------------------------------------------------------------


def _item(antal: str, startdato: str = "2024-11-27", loenart: str = "0100") -> dict[str, Any]:
    return {
        "Startdato": f"{startdato}T00:00:00Z",
        "Loenart": loenart,
        "Loebenummer": 1,
        "Sekvensnummer": "0",
        "Antal": antal,
        "Afsendelses_System": "payroll-gateway",
        "Indv_Bemaerkning": "R-1",
    }


def test_ledger_sums_per_employee_month_and_loenart() -> None:
    ledger = Ledger()
    ledger.post(
        "1",
        [
            _item("12.50"),
            _item("-2.50"),
            _item("4.00", loenart="0200"),
            _item("9.00", startdato="2024-12-01"),
        ],
    )
    ledger.post("2", [_item("100.00")])
    assert ledger.sum("1", "2024-11", "0100") == Decimal("10.00")
    assert ledger.sum("1", "2024-12", "0100") == Decimal("9.00")
    assert ledger.sum("3", "2024-11", "0100") == Decimal("0")
    assert len(ledger.read("1", date(2024, 11, 1), date(2024, 11, 30))) == 3


# -- end-to-end with the adapter ----------------------------------------------------------


async def test_first_delivery_then_corrections_by_difference(kmd: Any) -> None:
    state, channel = kmd
    receipt = await deliver(drive(), channel)
    assert receipt.vendor_reference.endswith("#0")
    assert state.sum(EMPLOYEE, "2024-11", "0100") == Decimal("12.50")
    await deliver(drive(version=2, distance_km="10", wage_code_optional="0200"), channel)
    assert state.sum(EMPLOYEE, "2024-11", "0100") == Decimal("10.00")
    assert state.sum(EMPLOYEE, "2024-11", "0200") == Decimal("10.00")
    await deliver(drive(version=3, cancelled=True), channel)
    assert state.sum(EMPLOYEE, "2024-11", "0100") == state.sum(EMPLOYEE, "2024-11", "0200") == 0
    sent = [i["Antal"] for doc in state.received for i in doc["Engangsydelser"]]
    assert sent == ["12.50", "-2.50", "10.00", "-10.00", "-10.00"]
    assert all(doc["Medarbejder"] == {"Medarbejdernummer": EMPLOYEE} for doc in state.received)


async def test_reads_return_what_was_posted_with_sender_and_remark(kmd: Any) -> None:
    state, channel = kmd
    await deliver(drive(), channel)
    parts = await ADAPTER.read_back(drive(), [], [], channel)
    assert parts[0].fields["totals"] == {"0100": "12.50"}
    posting = state.ledger.all()[0]
    assert (posting.sender, posting.remark) == ("payroll-gateway", "R-1")


async def test_drop_after_apply_is_in_doubt_and_the_read_prevents_a_duplicate(kmd: Any) -> None:
    state, channel = kmd
    state.drop_next = 1
    with pytest.raises(InDoubt):
        await deliver(drive(), channel)
    assert state.sum(EMPLOYEE, "2024-11", "0100") == Decimal("12.50")
    assert await deliver(drive(), channel) == Plan()  # already delivered: nothing resent
    assert len(state.received) == 1 and state.sum(EMPLOYEE, "2024-11", "0100") == Decimal("12.50")


async def test_locked_employee_is_transient_and_nothing_is_applied(kmd: Any) -> None:
    state, channel = kmd
    state.locked.add(EMPLOYEE)
    with pytest.raises(Transient, match="138"):
        await deliver(drive(), channel)
    assert state.ledger.all() == []
    state.locked.clear()
    await deliver(drive(), channel)
    assert state.sum(EMPLOYEE, "2024-11", "0100") == Decimal("12.50")


@pytest.mark.parametrize(
    ("options", "code"),
    [
        ({"cost_centre": "9999999999"}, "119"),
        ({"psp_element": "XG-9999999999-99999"}, "151"),
    ],
)
async def test_invalid_account_fields_are_rejected_with_kmd_codes(
    kmd: Any, options: dict[str, str], code: str
) -> None:
    state, channel = kmd
    channel = Channel(channel.session, replace(channel.settings, options=options))
    with pytest.raises(Rejected, match=code):
        await deliver(drive(), channel)
    assert state.ledger.all() == []


async def test_validate_only_posts_nothing(kmd: Any) -> None:
    state, channel = kmd
    channel = Channel(channel.session, replace(channel.settings, options={"validate_only": True}))
    receipt = await deliver(drive(), channel)
    assert len(state.received) == 1 and state.ledger.all() == []
    assert "posted nothing" in receipt.warning


async def test_client_id_not_allowed_is_403_with_a_hint(kmd: Any) -> None:
    state, channel = kmd
    state.allowed_clients = {"101"}
    with pytest.raises(Rejected, match="check client_id"):
        await deliver(drive(), channel)


async def test_injected_503_is_transient_with_retry_after(kmd: Any) -> None:
    state, channel = kmd
    state.fail_next, state.fail_status, state.retry_after = 1, 503, 9
    with pytest.raises(Transient) as err:
        await deliver(drive(), channel)
    assert err.value.retry_after == 9
    await deliver(drive(), channel)  # the next request passes
    assert state.sum(EMPLOYEE, "2024-11", "0100") == Decimal("12.50")


async def test_timeout_fault_is_in_doubt(kmd: Any) -> None:
    state, channel = kmd
    state.fault, state.hang_seconds = "timeout", 0.5
    channel = Channel(channel.session, replace(channel.settings, read_timeout=0.1))
    with pytest.raises(InDoubt):
        await ADAPTER.read_back(drive(), [], [], channel)


# -- raw requests -------------------------------------------------------------------------


def _update_doc(items: list[dict[str, Any]], client: str = "840") -> dict[str, Any]:
    return {
        "Header": {
            "ClientID": client,
            "OpdateringsID": uuid.uuid4().hex.upper(),
        },
        "Medarbejder": {"Medarbejdernummer": EMPLOYEE},
        "Engangsydelser": items,
    }


async def _post(channel: Channel, doc: Any) -> tuple[int, Any]:
    url = channel.settings.endpoint + "lpe/update-onetime-payments"
    async with channel.session.post(url, json=doc) as resp:
        return resp.status, await resp.json(content_type=None)


async def test_both_cost_centre_and_psp_element_is_code_167(kmd: Any) -> None:
    state, channel = kmd
    item = {**_item("1.00"), "Afv_Omkostningssted": "1234", "Afv_PSP_Element": "XG-1"}
    status, doc = await _post(channel, _update_doc([item]))
    assert status == 200 and doc["Header"]["Status"] == "Error"
    assert [(m["Kode"], m["Tekst"][:21]) for m in doc["Meddelelse"]] == [
        (167, "Engangsydelse Nr. 000")
    ]


async def test_wire_forms_of_os2s_production_client(kmd: Any) -> None:
    """Startdato at T00:00:00Z; Kun_Valider "1" or absent: a plain date or "0" is a 400."""
    state, channel = kmd
    for bad in (
        {**_item("1.00"), "Startdato": "2024-11-27"},
        {**_item("1.00"), "Startdato": "2024-11-27T00:00:00Z\n"},
        {**_item("1.00"), "Startdato": "2024-11-27T13:00:00Z"},
    ):
        status, doc = await _post(channel, _update_doc([bad]))
        assert status == 400 and "Startdato" in doc["details"][0]
    zero = _update_doc([_item("1.00")])
    zero["Header"]["Kun_Valider"] = "0"
    status, doc = await _post(channel, zero)
    assert status == 400 and "Kun_Valider" in doc["details"][0]
    assert state.ledger.all() == []
    status, _ = await _post(channel, _update_doc([_item("1.00")]))  # Kun_Valider absent: posted
    assert status == 200 and [str(p.startdato) for p in state.ledger.all()] == ["2024-11-27"]
    (sent,) = state.received
    assert "Kun_Valider" not in sent["Header"]


async def test_more_than_999_items_or_a_schema_error_is_400(kmd: Any) -> None:
    state, channel = kmd
    status, doc = await _post(channel, _update_doc([_item("1.00")] * 1000))
    assert status == 400 and "999" in doc["details"][0]
    status, doc = await _post(channel, _update_doc([{**_item("1.00"), "Loenart": "x"}]))
    assert status == 400 and "Loenart" in doc["details"][0]
    assert state.received == [] and state.ledger.all() == [] and len(state.refused) == 2


async def test_a_client_without_certificate_is_refused(
    aiohttp_server: Any, certs: DevCerts
) -> None:
    options = _options(certs)
    server = await aiohttp_server(build_app(options), ssl=ssl_context(options))
    no_cert = ssl.create_default_context(cafile=str(certs.ca_file))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=no_cert)) as session:
        with pytest.raises(aiohttp.ClientError):
            async with session.post(server.make_url("/lpe/read-onetime-payments"), json={}) as r:
                await r.read()


def test_options_are_checked() -> None:
    with pytest.raises(ValueError, match="unknown fault"):
        build_app(SimulatorOptions(fault="melt"))
    with pytest.raises(ValueError, match="client_ca_file"):
        ssl_context(SimulatorOptions(cert_file="a", key_file="b"))
    assert isinstance(build_app(SimulatorOptions())[STATE], SimState)


@pytest.mark.parametrize("over", [{"fault": "server"}, {"fail_rate": 1.0}])
async def test_server_faults_from_options_are_transient(
    aiohttp_server: Any, over: dict[str, Any]
) -> None:
    server = await aiohttp_server(build_app(SimulatorOptions(seed=3, **over)))
    async with aiohttp.ClientSession() as session:
        channel = Channel(session, VendorSettings(endpoint=str(server.make_url("/"))))
        with pytest.raises(Transient, match="HTTP 500"):
            await ADAPTER.read_back(drive(), [], [], channel)


# -- fault_mix: one seeded draw per request, each kind's effect through the real adapter --


async def _mixed(aiohttp_server: Any, certs: DevCerts, kind: str) -> tuple[SimState, Any]:
    options = _options(certs, fault_mix=((kind, 1.0),))
    app = build_app(options)
    server = await aiohttp_server(app, ssl=ssl_context(options))
    return app[STATE], server


async def _send(server: Any, certs: DevCerts, report: Report) -> Any:
    """Plan without reading (the read would draw a fault too), render, send."""
    settings = VendorSettings(endpoint=str(server.make_url("/")), read_timeout=0.3)
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=certs.client_context())
    ) as s:
        channel = Channel(s, settings)
        plan = ADAPTER.plan(report, [], settings)
        return await ADAPTER.send(ADAPTER.render(report, plan.messages[0], settings), channel)


@pytest.mark.parametrize(
    ("kind", "error", "applied"),
    [
        ("server", Transient, Decimal("0")),
        ("timeout", InDoubt, Decimal("12.50")),
        ("reset", InDoubt, Decimal("0")),
        ("drop-after-apply", InDoubt, Decimal("12.50")),
    ],
)
async def test_each_mixed_fault_kind(
    aiohttp_server: Any, certs: DevCerts, kind: str, error: type, applied: Decimal
) -> None:
    state, server = await _mixed(aiohttp_server, certs, kind)
    state.hang_seconds = 1.0
    with pytest.raises(error):
        await _send(server, certs, drive())
    assert state.sum(EMPLOYEE, "2024-11", "0100") == applied
    assert state.injected == {kind: 1}


async def test_mixed_faults_hit_reads_too(aiohttp_server: Any, certs: DevCerts) -> None:
    state, server = await _mixed(aiohttp_server, certs, "reset")
    settings = VendorSettings(endpoint=str(server.make_url("/")), read_timeout=1)
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=certs.client_context())
    ) as s:
        with pytest.raises(InDoubt):
            await ADAPTER.read_back(drive(), [], [], Channel(s, settings))
    assert state.reads == []


def test_bad_fault_mix_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown fault"):
        build_app(SimulatorOptions(fault_mix=(("client", 0.1),)))
    with pytest.raises(ValueError, match="more than 1"):
        build_app(SimulatorOptions(fault_mix=(("server", 0.7), ("timeout", 0.7))))


async def test_mixed_draws_are_seeded(aiohttp_server: Any, certs: DevCerts) -> None:
    mix = (("server", 0.3), ("timeout", 0.1), ("reset", 0.05))
    draws = []
    for _ in range(2):
        app = build_app(_options(certs, fault_mix=mix))
        state = app[STATE]
        draws.append([_mixed_fault(state) for _ in range(200)])
    assert draws[0] == draws[1] and set(draws[0]) == {"server", "timeout", "reset", None}
