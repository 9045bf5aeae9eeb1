"""kmd-absence: golden payloads, planning of versions, and send/read-back against the simulator."""

from __future__ import annotations

import copy
import json
import os
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from lxml import etree

from adapters.base import (
    Adapter,
    Channel,
    DeliveredPart,
    DeliveryError,
    InDoubt,
    InvalidPayload,
    Message,
    ReadsBack,
    Rejected,
    Report,
    Response,
    Transient,
    VendorSettings,
)
from adapters.kmd_absence import KmdAbsence, _set_outcome, endpoint_url
from adapters.resources import schema
from adapters.soap import body_payload, parse_xml
from gateway.devcerts import DevCerts, ensure_dev_certs
from gateway.simulators import SimulatorOptions
from gateway.simulators.kmd import STATE, build_app, start

GOLDEN = Path(__file__).resolve().parent / "golden" / "kmd-absence"
NS = "urn:kmd.dk:LPT:VACAB:external"
CPR = "0707850000"
SETTINGS = VendorSettings(
    endpoint="https://kmd.invalid/XISOAPAdapter/MessageServlet",
    options={"senderService": "KMD_LPT_VACAB_Service"},
)


@pytest.fixture(scope="module")
def adapter() -> KmdAbsence:
    return KmdAbsence()


def vacation(**changes: Any) -> Report:
    data: dict[str, Any] = {
        "kind": "vacation",
        "municipality": "746",
        "report_id": "ferie-1",
        "version": 1,
        "employee": {"cpr": CPR, "employment_id": "00012345"},
        "start_date": "2026-07-06",
        "end_date": "2026-07-10",
        "vacation_type": "regular",
    }
    data.update(changes)
    return Report.from_dict(data)


def deliver(
    plan_messages: Sequence[Message], version: int, delivered: Sequence[DeliveredPart] = ()
) -> list[DeliveredPart]:
    """What the gateway records after every message was sent successfully (via JSON, as stored)."""
    parts = {p.part: p for p in delivered}
    for m in plan_messages:
        if m.deletes:
            parts.pop(m.part, None)
        else:
            parts[m.part] = DeliveredPart(m.part, version, json.loads(json.dumps(m.fields)))
    return list(parts.values())


def payload_of(body: bytes) -> etree._Element:
    return body_payload(parse_xml(body))


def fields_of(body: bytes) -> dict[str, str]:
    return {etree.QName(c).localname: c.text or "" for c in payload_of(body)}


def c14n(element: etree._Element) -> bytes:
    return etree.tostring(element, method="c14n", exclusive=True)


# ---------------------------------------------------------------------------------------
# Golden files
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    report: Report
    before: tuple[Report, ...] = ()  # earlier versions, delivered in order
    options: Mapping[str, Any] | None = None


PART_DAYS = {
    "start_date": "2026-08-03",
    "end_date": "2026-08-07",
    "start_time": "12:00",
    "end_time": "11:30",
}
CASES = {
    "whole-days-regular": Case(vacation()),
    "part-days-three-absences": Case(vacation(**PART_DAYS)),
    "two-day-part-no-middle": Case(
        vacation(
            start_date="2026-08-03", end_date="2026-08-04", start_time="13:00", end_time="10:00"
        )
    ),
    "single-day-both-times": Case(
        vacation(
            start_date="2026-09-14", end_date="2026-09-14", start_time="08:00", end_time="12:00"
        )
    ),
    "care-day": Case(
        vacation(
            start_date="2026-10-05", end_date="2026-10-05", vacation_type="care", child_number=3
        )
    ),
    "sixth-week": Case(vacation(vacation_type="sixth_week")),
    "senior-tenant-override": Case(
        vacation(vacation_type="senior", start_date="2026-11-02", end_date="2026-11-02"),
        options={"type_codes": {"senior": "SE"}},
    ),
    "edit-mod-originals-from-delivered": Case(
        vacation(version=2, start_date="2026-07-06", start_time="10:00"),
        before=(vacation(start_date="2026-07-06", start_time="12:00"),),
    ),
    "edit-del-then-ins": Case(
        vacation(version=2, start_date="2026-07-06", end_date="2026-07-07"),
        before=(vacation(start_date="2026-07-06", end_date="2026-07-06", start_time="12:00"),),
    ),
    "cancel-deletes-every-part": Case(
        vacation(version=2, cancelled=True, **PART_DAYS), before=(vacation(**PART_DAYS),)
    ),
}


def render_case(adapter: KmdAbsence, case: Case) -> list[bytes]:
    settings = VendorSettings(
        endpoint=SETTINGS.endpoint, options={**SETTINGS.options, **(case.options or {})}
    )
    delivered: list[DeliveredPart] = []
    for earlier in case.before:
        delivered = deliver(
            adapter.plan(earlier, delivered, settings).messages, earlier.version, delivered
        )
    plan = adapter.plan(case.report, delivered, settings)
    return [adapter.render(case.report, m, settings).body for m in plan.messages]


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden(adapter: KmdAbsence, name: str) -> None:
    bodies = render_case(adapter, CASES[name])
    folder = GOLDEN / name
    if os.environ.get("UPDATE_GOLDEN") == "1":
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob("*.xml"):
            old.unlink()
        for i, body in enumerate(bodies, 1):
            element = copy.deepcopy(payload_of(body))
            etree.cleanup_namespaces(element)  # drop the envelope's namespace, unused here
            pretty = etree.tostring(element, pretty_print=True, encoding="utf-8")
            (folder / f"{i:04d}.xml").write_bytes(pretty)
    expected = sorted(folder.glob("*.xml"))
    assert [p.name for p in expected] == [f"{i:04d}.xml" for i in range(1, len(bodies) + 1)]
    blank = etree.XMLParser(remove_blank_text=True)
    for path, body in zip(expected, bodies, strict=True):
        assert c14n(etree.parse(str(path), blank).getroot()) == c14n(payload_of(body)), path


def test_golden_mod_takes_originals_from_the_delivered_part(adapter: KmdAbsence) -> None:
    [body] = render_case(adapter, CASES["edit-mod-originals-from-delivered"])
    f = fields_of(body)
    assert f["Operation"] == "MOD"
    assert (f["StartTime"], f["OriginalStartTime"]) == ("10:00:00", "12:00:00")
    assert "EndTime" not in f and "OriginalEndTime" not in f
    assert f["OriginalStartDate"] == f["OriginalEndDate"] == "2026-07-06"


def test_part_days_are_start_days_and_end(adapter: KmdAbsence) -> None:
    bodies = render_case(adapter, CASES["part-days-three-absences"])
    got = [fields_of(b) for b in bodies]
    assert [(f["StartDate"], f["EndDate"], f.get("StartTime"), f.get("EndTime")) for f in got] == [
        ("2026-08-03", "2026-08-03", "12:00:00", None),
        ("2026-08-04", "2026-08-06", None, None),
        ("2026-08-07", "2026-08-07", None, "11:30:00"),
    ]
    # children unqualified, only the root in KMD's namespace
    root = payload_of(bodies[0])
    assert root.tag == f"{{{NS}}}SetAbsenceAttendanceRequest_MT"
    assert all(etree.QName(c).namespace is None for c in root)


# ---------------------------------------------------------------------------------------
# Planning
# ---------------------------------------------------------------------------------------


def test_adapter_implements_the_protocols(adapter: KmdAbsence) -> None:
    assert isinstance(adapter, Adapter) and isinstance(adapter, ReadsBack)
    assert adapter.reads_before_send is False
    assert all(schema(f).is_file() for f in adapter.schema_files)


@pytest.mark.parametrize("kind", ["optional", "other"])
def test_types_kmd_is_not_told_about_are_not_applicable(adapter: KmdAbsence, kind: str) -> None:
    plan = adapter.plan(vacation(vacation_type=kind), [], SETTINGS)
    assert plan.messages == () and plan.not_applicable
    assert kind in plan.not_applicable


def test_tenant_may_map_optional_to_a_code(adapter: KmdAbsence) -> None:
    settings = VendorSettings(options={"type_codes": {"optional": "VF"}})
    [message] = adapter.plan(vacation(vacation_type="optional"), [], settings).messages
    assert message.fields["type"] == "VF"


def test_unchanged_version_plans_nothing(adapter: KmdAbsence) -> None:
    v1 = vacation(**PART_DAYS)
    delivered = deliver(adapter.plan(v1, [], SETTINGS).messages, 1)
    plan = adapter.plan(vacation(version=2, **PART_DAYS), delivered, SETTINGS)
    assert plan.messages == () and plan.not_applicable is None


def test_only_the_changed_part_is_planned(adapter: KmdAbsence) -> None:
    delivered = deliver(adapter.plan(vacation(**PART_DAYS), [], SETTINGS).messages, 1)
    v2 = vacation(version=2, **{**PART_DAYS, "end_time": "14:00"})
    [message] = adapter.plan(v2, delivered, SETTINGS).messages
    assert (message.part, message.operation) == ("absence:3", "MOD")
    assert message.fields["original"]["end_time"] == "11:30:00"


def test_deletes_come_before_inserts(adapter: KmdAbsence) -> None:
    delivered = deliver(adapter.plan(vacation(**PART_DAYS), [], SETTINGS).messages, 1)
    v2 = vacation(version=2, start_date="2026-08-03", end_date="2026-08-05")
    ops = [(m.operation, m.part) for m in adapter.plan(v2, delivered, SETTINGS).messages]
    assert ops == [("DEL", "absence:1"), ("DEL", "absence:3"), ("MOD", "absence:2")]


def test_a_type_kmd_does_not_know_deletes_what_was_delivered(adapter: KmdAbsence) -> None:
    delivered = deliver(adapter.plan(vacation(), [], SETTINGS).messages, 1)
    plan = adapter.plan(vacation(version=2, vacation_type="other"), delivered, SETTINGS)
    assert [(m.operation, m.deletes) for m in plan.messages] == [("DEL", True)]


def test_new_personnel_number_is_delete_and_insert(adapter: KmdAbsence) -> None:
    delivered = deliver(adapter.plan(vacation(), [], SETTINGS).messages, 1)
    v2 = vacation(version=2, employee={"cpr": CPR, "employment_id": "00099999"})
    plan = adapter.plan(v2, delivered, SETTINGS)
    assert [(m.operation, m.fields["personnel_number"]) for m in plan.messages] == [
        ("DEL", "00012345"),
        ("INS", "00099999"),
    ]


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        # same period, another type: never a MOD (the type is part of SAP's record key)
        ({"vacation_type": "sixth_week"}, [("DEL", "absence:2", "FE"), ("INS", "absence:2", "6F")]),
        # another type and another period: still DEL + INS, not a MOD of both
        (
            {"vacation_type": "senior", "end_date": "2026-07-08"},
            [("DEL", "absence:2", "FE"), ("INS", "absence:2", "SO")],
        ),
    ],
)
def test_a_type_change_is_delete_and_insert_never_mod(
    adapter: KmdAbsence, changes: dict[str, Any], expected: list[tuple[str, str, str]]
) -> None:
    delivered = deliver(adapter.plan(vacation(), [], SETTINGS).messages, 1)
    plan = adapter.plan(vacation(version=2, **changes), delivered, SETTINGS)
    assert [(m.operation, m.part, m.fields["type"]) for m in plan.messages] == expected


def test_a_type_change_of_part_days_deletes_every_part_first(adapter: KmdAbsence) -> None:
    delivered = deliver(adapter.plan(vacation(**PART_DAYS), [], SETTINGS).messages, 1)
    v2 = vacation(version=2, **{**PART_DAYS, "vacation_type": "sixth_week", "end_time": "14:00"})
    ops = [(m.operation, m.part) for m in adapter.plan(v2, delivered, SETTINGS).messages]
    assert ops == [
        ("DEL", "absence:1"),
        ("DEL", "absence:2"),
        ("DEL", "absence:3"),
        ("INS", "absence:1"),
        ("INS", "absence:2"),
        ("INS", "absence:3"),
    ]


def test_cancel_with_nothing_delivered_is_not_applicable(adapter: KmdAbsence) -> None:
    plan = adapter.plan(vacation(cancelled=True), [], SETTINGS)
    assert plan.messages == () and plan.not_applicable


def test_empty_period_is_invalid(adapter: KmdAbsence) -> None:
    with pytest.raises(InvalidPayload):
        adapter.plan(vacation(end_date="2026-07-05"), [], SETTINGS)
    with pytest.raises(InvalidPayload):
        adapter.plan(
            vacation(
                end_date="2026-07-06", start_date="2026-07-06", start_time="12:00", end_time="09:00"
            ),
            [],
            SETTINGS,
        )


def test_render_refuses_what_fails_our_schema(adapter: KmdAbsence) -> None:
    settings = VendorSettings(options={"type_codes": {"regular": "fe-bad"}})
    [message] = adapter.plan(vacation(), [], settings).messages
    with pytest.raises(InvalidPayload, match="AbsenceAttendanceType"):
        adapter.render(vacation(), message, settings)
    with pytest.raises(InvalidPayload):
        adapter.render(vacation(), Message("absence:2", "MOD", message.fields), settings)


def test_render_headers(adapter: KmdAbsence) -> None:
    [message] = adapter.plan(vacation(), [], SETTINGS).messages
    payload = adapter.render(vacation(), message, SETTINGS)
    assert payload.content_type == "text/xml; charset=utf-8"
    assert payload.headers["SOAPAction"].strip('"') == "http://sap.com/xi/WebService/soap1.1"
    assert CPR.encode() not in payload.body


def test_endpoint_url_carries_sap_pi_parameters() -> None:
    url = endpoint_url(SETTINGS, "SetAbsenceAttendance_OS_SI")
    assert url == (
        "https://kmd.invalid/XISOAPAdapter/MessageServlet?senderParty=&senderService="
        "KMD_LPT_VACAB_Service&receiverParty=&receiverService=&interface="
        "SetAbsenceAttendance_OS_SI&interfaceNamespace=urn%3Akmd.dk%3ALPT%3AVACAB%3Aexternal"
    )
    with pytest.raises(Rejected, match="senderService"):
        endpoint_url(VendorSettings(endpoint="https://x/"), "SetAbsenceAttendance_OS_SI")


# ---------------------------------------------------------------------------------------
# Interpreting answers (no network)
# ---------------------------------------------------------------------------------------

SOAP = "http://schemas.xmlsoap.org/soap/envelope/"


def sap_fault(code: str) -> bytes:
    return (
        f'<SOAP:Envelope xmlns:SOAP="{SOAP}"><SOAP:Body><SOAP:Fault>'
        "<faultcode>SOAP:Server</faultcode><faultstring>Server Error</faultstring><detail>"
        '<s:SystemError xmlns:s="http://sap.com/xi/WebService/xi2.0"><context>XIServer</context>'
        f"<code>{code}</code><text>details for 0707850000</text></s:SystemError>"
        "</detail></SOAP:Fault></SOAP:Body></SOAP:Envelope>"
    ).encode()


def test_configuration_fault_is_rejected_with_a_hint() -> None:
    resp = Response(500, {}, sap_fault("RCVR_DETERMINATION.NO_RECEIVER_CASE_BE"))
    with pytest.raises(Rejected, match="senderService") as info:
        _set_outcome(resp, "ref")
    assert CPR not in info.value.message


def test_other_system_faults_are_transient() -> None:
    with pytest.raises(Transient, match="ADAPTER.JAVA_EXCEPTION"):
        _set_outcome(Response(500, {}, sap_fault("ADAPTER.JAVA_EXCEPTION")), "ref")
    with pytest.raises(Transient):
        _set_outcome(Response(502, {}, b"<html>bad gateway</html>"), "ref")


@pytest.mark.parametrize("status", [429, 503])
def test_busy_is_transient_with_retry_after(status: int) -> None:
    with pytest.raises(Transient) as info:
        _set_outcome(Response(status, {"Retry-After": "120"}, b""), "ref")
    assert info.value.retry_after == 120


def test_unreadable_success_is_in_doubt_and_403_is_rejected() -> None:
    with pytest.raises(InDoubt):
        _set_outcome(Response(200, {}, b"not xml"), "ref")
    with pytest.raises(Rejected, match="certificate"):
        _set_outcome(Response(403, {}, b""), "ref")


# ---------------------------------------------------------------------------------------
# Against the simulator, over HTTPS with client certificates
# ---------------------------------------------------------------------------------------


@dataclass
class Kmd:
    app: Any
    settings: VendorSettings
    certs: DevCerts

    @property
    def state(self) -> Any:
        return self.app[STATE]


@pytest.fixture
async def kmd(tmp_path: Path) -> AsyncIterator[Kmd]:
    certs = ensure_dev_certs(tmp_path / "certs")
    options = SimulatorOptions(
        cert_file=str(certs.server_cert),
        key_file=str(certs.server_key),
        client_ca_file=str(certs.ca_file),
    )
    app = build_app(options)
    runner, url = await start(app, options)
    settings = VendorSettings(
        endpoint=url, read_timeout=2.0, options={"senderService": "KMD_LPT_VACAB_Service"}
    )
    try:
        yield Kmd(app, settings, certs)
    finally:
        await runner.cleanup()


@pytest.fixture
async def channel(kmd: Kmd) -> AsyncIterator[Channel]:
    connector = aiohttp.TCPConnector(ssl=kmd.certs.client_context())
    async with aiohttp.ClientSession(connector=connector) as session:
        yield Channel(session, kmd.settings)


async def send_all(
    adapter: KmdAbsence, report: Report, messages: Sequence[Message], channel: Channel
) -> list[Any]:
    return [
        await adapter.send(adapter.render(report, m, channel.settings), channel) for m in messages
    ]


async def test_send_inserts_and_reads_back(adapter: KmdAbsence, kmd: Kmd, channel: Channel) -> None:
    report = vacation(**PART_DAYS)
    plan = adapter.plan(report, [], kmd.settings)
    receipts = await send_all(adapter, report, plan.messages, channel)
    assert [r.vendor_reference for r in receipts] == [
        "FE 2026-08-03 12:00:00..2026-08-03 #00012345",
        "FE 2026-08-04..2026-08-06 #00012345",
        "FE 2026-08-07..2026-08-07 11:30:00 #00012345",
    ]
    assert all(r.warning is None for r in receipts)
    delivered = deliver(plan.messages, 1)
    held = await adapter.read_back(report, delivered, [], channel)
    assert {p.part: p.fields for p in held} == {p.part: p.fields for p in delivered}


async def test_edit_and_cancel_round_trip(adapter: KmdAbsence, kmd: Kmd, channel: Channel) -> None:
    v1 = vacation(**PART_DAYS)
    delivered = deliver(adapter.plan(v1, [], kmd.settings).messages, 1)
    await send_all(adapter, v1, adapter.plan(v1, [], kmd.settings).messages, channel)
    v2 = vacation(version=2, **{**PART_DAYS, "start_time": "09:00", "end_date": "2026-08-10"})
    plan2 = adapter.plan(v2, delivered, kmd.settings)
    await send_all(adapter, v2, plan2.messages, channel)
    delivered = deliver(plan2.messages, 2, delivered)
    held = kmd.state.ledger.holdings("00012345")
    assert [(str(r.start_date), str(r.end_date)) for r in held] == [
        ("2026-08-03", "2026-08-03"),
        ("2026-08-04", "2026-08-09"),
        ("2026-08-10", "2026-08-10"),
    ]
    v3 = vacation(version=3, cancelled=True, **PART_DAYS)
    await send_all(adapter, v3, adapter.plan(v3, delivered, kmd.settings).messages, channel)
    assert kmd.state.ledger.holdings("00012345") == []
    assert all(r.outcome == "applied" for r in kmd.state.received)


async def test_warning_is_a_receipt_with_the_text(
    adapter: KmdAbsence, kmd: Kmd, channel: Channel
) -> None:
    kmd.state.fault = "warning"
    [receipt] = await send_all(
        adapter, vacation(), adapter.plan(vacation(), [], SETTINGS).messages, channel
    )
    assert receipt.warning and "advarsel" in receipt.warning


async def test_kmd_error_is_rejected_with_its_text(
    adapter: KmdAbsence, kmd: Kmd, channel: Channel
) -> None:
    [message] = adapter.plan(vacation(), [], SETTINGS).messages
    await send_all(adapter, vacation(), [message], channel)
    other = vacation(report_id="ferie-2", start_date="2026-07-08", end_date="2026-07-12")
    [clash] = adapter.plan(other, [], SETTINGS).messages
    with pytest.raises(Rejected, match="overlapper"):
        await send_all(adapter, other, [clash], channel)


async def test_server_fault_is_transient_and_not_applied(
    adapter: KmdAbsence, kmd: Kmd, channel: Channel
) -> None:
    kmd.state.fail_next = 1
    [message] = adapter.plan(vacation(), [], SETTINGS).messages
    with pytest.raises(Transient, match="system error"):
        await send_all(adapter, vacation(), [message], channel)
    assert kmd.state.ledger.holdings("00012345") == []
    await send_all(adapter, vacation(), [message], channel)  # the retry goes through
    assert len(kmd.state.ledger.holdings("00012345")) == 1


async def test_wrong_interface_namespace_is_rejected(
    adapter: KmdAbsence, kmd: Kmd, channel: Channel
) -> None:
    settings = VendorSettings(
        endpoint=kmd.settings.endpoint,
        options={"senderService": "X", "interfaceNamespace": "urn:wrong"},
    )
    [message] = adapter.plan(vacation(), [], settings).messages
    payload = adapter.render(vacation(), message, settings)
    with pytest.raises(Rejected, match="configuration"):
        await adapter.send(payload, Channel(channel.session, settings))


async def test_drop_after_apply_is_in_doubt_then_read_back_finds_it(
    adapter: KmdAbsence, kmd: Kmd, channel: Channel
) -> None:
    report = vacation(**PART_DAYS)
    plan = adapter.plan(report, [], kmd.settings)
    first, in_doubt, *rest = plan.messages
    await send_all(adapter, report, [first], channel)
    kmd.state.drop_next = 1
    with pytest.raises(InDoubt):
        await send_all(adapter, report, [in_doubt], channel)
    known = deliver([first], 1)
    found = await adapter.read_back(report, known, [in_doubt, *rest], channel)
    assert sorted(p.part for p in found) == ["absence:1", "absence:2"]
    # the dispatcher replans from what KMD holds: the in-doubt INS is not sent again
    replan = adapter.plan(report, found, kmd.settings)
    assert [(m.operation, m.part) for m in replan.messages] == [("INS", "absence:3")]
    await send_all(adapter, report, replan.messages, channel)
    sent = [(r.fields["StartDate"], r.fields["Operation"]) for r in kmd.state.received]
    assert len(sent) == len(set(sent)) == 3


async def test_read_back_of_a_pending_delete(
    adapter: KmdAbsence, kmd: Kmd, channel: Channel
) -> None:
    report = vacation()
    plan = adapter.plan(report, [], kmd.settings)
    await send_all(adapter, report, plan.messages, channel)
    known = deliver(plan.messages, 1)
    cancel = vacation(version=2, cancelled=True)
    [delete] = adapter.plan(cancel, known, kmd.settings).messages
    assert [p.part for p in await adapter.read_back(cancel, known, [delete], channel)] == [
        "absence:2"
    ]
    kmd.state.drop_next = 1
    with pytest.raises(InDoubt):
        await send_all(adapter, cancel, [delete], channel)
    assert await adapter.read_back(cancel, known, [delete], channel) == []


async def test_a_session_without_client_certificate_is_refused(kmd: Kmd) -> None:
    import ssl

    context = ssl.create_default_context(cafile=str(kmd.certs.ca_file))
    adapter = KmdAbsence()
    [message] = adapter.plan(vacation(), [], SETTINGS).messages
    payload = adapter.render(vacation(), message, SETTINGS)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as session:
        with pytest.raises(DeliveryError):
            await adapter.send(payload, Channel(session, kmd.settings))
    assert kmd.state.received == []
