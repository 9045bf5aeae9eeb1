"""The KMD simulator: its ledger, its SOAP surface, mutual TLS and fault injection."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from lxml import etree

from adapters.kmd_absence import NAMESPACE, SAP_XI
from adapters.resources import schema_path
from adapters.soap import SOAP_ENV, body_payload, load_schema, parse_xml
from gateway.devcerts import DevCerts, ensure_dev_certs
from gateway.simulators import SimulatorOptions
from gateway.simulators.kmd import STATE, KmdLedger, build_app, ssl_context, start

SCHEMA = load_schema(schema_path("kmd/vacab.xsd"))
QUERY = (
    "?senderParty=&senderService=S&receiverParty=&receiverService=&interface={}"
    "&interfaceNamespace=urn%3Akmd.dk%3ALPT%3AVACAB%3Aexternal"
)
SET = QUERY.format("SetAbsenceAttendance_OS_SI")
READ = QUERY.format("GetAbsenceAttendanceByPeriod_OS_SI")


def ins(start: str, end: str, **extra: str) -> dict[str, str | None]:
    return {
        "StartDate": start,
        "EndDate": end,
        "Operation": "INS",
        "PersonnelNumber": "42",
        "AbsenceAttendanceType": "FE",
        **extra,
    }


# ---------------------------------------------------------------------------------------
# The ledger (pure)
# ---------------------------------------------------------------------------------------


def test_ledger_inserts_and_refuses_overlap() -> None:
    ledger = KmdLedger()
    assert ledger.apply(ins("2026-07-06", "2026-07-10")).type == "S"
    clash = ledger.apply(ins("2026-07-10", "2026-07-12", StartTime="12:00:00"))
    assert clash.type == "E" and "overlapper" in clash.text
    # a part day that ends before another begins on the same day is no overlap
    assert ledger.apply(ins("2026-07-11", "2026-07-11", EndTime="12:00:00")).type == "S"
    assert ledger.apply(ins("2026-07-11", "2026-07-11", StartTime="12:00:00")).type == "S"
    assert len(ledger.holdings("42")) == 3
    assert ledger.holdings("43") == []


def test_ledger_mod_needs_the_exact_original() -> None:
    ledger = KmdLedger()
    ledger.apply(ins("2026-07-06", "2026-07-06", StartTime="12:00:00"))
    # the old OS2ferie defect: OriginalStartTime taken from the old end time (none)
    wrong = {
        **ins("2026-07-06", "2026-07-06", StartTime="10:00:00"),
        "Operation": "MOD",
        "OriginalStartDate": "2026-07-06",
        "OriginalEndDate": "2026-07-06",
        "OriginalAbsenceAttendanceType": "FE",
    }
    status = ledger.apply(wrong)
    assert status.type == "E" and "findes ikke" in status.text
    right = {**wrong, "OriginalStartTime": "12:00:00"}
    assert ledger.apply(right).type == "S"
    [held] = ledger.holdings("42")
    assert str(held.start_time) == "10:00:00"


def test_ledger_mod_cannot_change_the_type() -> None:
    """The absence type is part of the record's key in SAP: a type change is DEL + INS."""
    ledger = KmdLedger()
    ledger.apply(ins("2026-07-06", "2026-07-10"))
    retype = {
        **ins("2026-07-06", "2026-07-10", AbsenceAttendanceType="6F"),
        "Operation": "MOD",
        "OriginalStartDate": "2026-07-06",
        "OriginalEndDate": "2026-07-10",
        "OriginalAbsenceAttendanceType": "FE",
    }
    status = ledger.apply(retype)
    assert status.type == "E" and "Fraværstype kan ikke ændres" in status.text
    [held] = ledger.holdings("42")
    assert held.type == "FE"
    assert ledger.apply({**ins("2026-07-06", "2026-07-10"), "Operation": "DEL"}).type == "S"
    assert ledger.apply(ins("2026-07-06", "2026-07-10", AbsenceAttendanceType="6F")).type == "S"
    assert [r.type for r in ledger.holdings("42")] == ["6F"]


def test_ledger_delete_of_what_it_does_not_hold_is_an_error() -> None:
    ledger = KmdLedger()
    ledger.apply(ins("2026-07-06", "2026-07-10"))
    assert ledger.apply({**ins("2026-07-06", "2026-07-09"), "Operation": "DEL"}).type == "E"
    assert ledger.apply({**ins("2026-07-06", "2026-07-10"), "Operation": "DEL"}).type == "S"
    assert ledger.holdings("42") == []


def test_ledger_refuses_nonsense() -> None:
    ledger = KmdLedger()
    assert ledger.apply(ins("2026-07-10", "2026-07-06")).type == "E"
    assert ledger.apply({**ins("2026-07-06", "2026-07-06"), "Operation": "XYZ"}).type == "E"
    assert ledger.apply({"EndDate": "2026-07-06"}).type == "E"


def test_ledger_holdings_filter_by_period() -> None:
    ledger = KmdLedger()
    ledger.apply(ins("2026-07-06", "2026-07-10"))
    ledger.apply(ins("2026-08-03", "2026-08-03"))
    assert len(ledger.holdings("42", None, None)) == 2
    assert [
        str(r.start_date) for r in ledger.holdings("42", *_dates("2026-07-10", "2026-08-01"))
    ] == ["2026-07-06"]


def _dates(a: str, b: str) -> tuple[object, object]:
    from datetime import date

    return date.fromisoformat(a), date.fromisoformat(b)


# ---------------------------------------------------------------------------------------
# The SOAP surface (plain HTTP here; TLS below)
# ---------------------------------------------------------------------------------------


def envelope(payload: str) -> bytes:
    return (f'<s:Envelope xmlns:s="{SOAP_ENV}"><s:Body>{payload}</s:Body></s:Envelope>').encode()


def set_request(**fields: str) -> bytes:
    inner = "".join(f"<{k}>{v}</{k}>" for k, v in fields.items())
    return envelope(
        f'<k:SetAbsenceAttendanceRequest_MT xmlns:k="{NAMESPACE}">{inner}'
        "</k:SetAbsenceAttendanceRequest_MT>"
    )


def read_request(personnel: str) -> bytes:
    return envelope(
        f'<k:GetAbsenceAttendanceByPeriodRequest_MT xmlns:k="{NAMESPACE}">'
        f"<StartDate>2026-01-01</StartDate><EndDate>2026-12-31</EndDate>"
        f"<PersonnelNumber>{personnel}</PersonnelNumber>"
        "</k:GetAbsenceAttendanceByPeriodRequest_MT>"
    )


GOOD = {
    "StartDate": "2026-10-05",
    "EndDate": "2026-10-05",
    "AdditionalData": "03",
    "Operation": "INS",
    "PersonnelNumber": "42",
    "AbsenceAttendanceType": "OS",
}


@pytest.fixture
async def client(aiohttp_client: Any) -> TestClient:
    return await aiohttp_client(build_app(SimulatorOptions(seed=1)))


async def post(client: TestClient, query: str, body: bytes) -> tuple[int, etree._Element]:
    resp = await client.post(
        "/XISOAPAdapter/MessageServlet" + query,
        data=body,
        headers={"Content-Type": "text/xml; charset=utf-8"},
    )
    return resp.status, parse_xml(await resp.read())


async def test_set_then_read_answers_in_our_schema(client: TestClient) -> None:
    status, env = await post(client, SET, set_request(**GOOD))
    answer = body_payload(env)
    assert status == 200 and SCHEMA.validate(answer)
    assert answer.findtext("ReturnStatus/StatusType") == "S"
    status, env = await post(client, READ, read_request("42"))
    answer = body_payload(env)
    assert status == 200 and SCHEMA.validate(answer), SCHEMA.error_log
    [item] = answer.findall("AbsenceAttendance/item")
    assert item.findtext("Key/AbsenceAttendanceType") == "OS"
    assert item.findtext("Item/StartTime") == "00:00:00"
    assert item.findtext("Item/CompLeave/Item/ChildNumber") == "03"
    assert [etree.QName(c).localname for c in item.find("Key")] == [
        "PersonnelNumber",
        "AbsenceAttendanceType",
        "ObjectId",
        "LockIndicator",
        "EndDate",
        "StartDate",
        "RecordNumber",
    ]
    assert client.app[STATE].reads == 1 and len(client.app[STATE].received) == 1


async def test_routes_on_the_body_root_without_interface(client: TestClient) -> None:
    status, env = await post(client, "?senderService=S", set_request(**GOOD))
    assert status == 200 and body_payload(env).findtext("ReturnStatus/StatusType") == "S"


def fault_of(env: etree._Element) -> tuple[str, str]:
    fault = env.find(f"{{{SOAP_ENV}}}Body/{{{SOAP_ENV}}}Fault")
    assert fault is not None
    return fault.findtext("faultcode") or "", fault.findtext(
        f"detail/{{{SAP_XI}}}SystemError/code"
    ) or ""


async def test_schema_invalid_request_is_a_client_fault(client: TestClient) -> None:
    status, env = await post(client, SET, set_request(**{**GOOD, "StartDate": "05-10-2026"}))
    assert status == 500 and fault_of(env)[0] == "SOAP:Client"
    assert client.app[STATE].received == []


async def test_unsafe_xml_is_a_client_fault(client: TestClient) -> None:
    bomb = b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaa">]><x>&a;</x>'
    resp = await client.post("/XISOAPAdapter/MessageServlet" + SET, data=bomb)
    assert resp.status == 500 and b"SOAP:Client" in await resp.read()


async def test_unknown_interface_is_a_receiver_determination_fault(client: TestClient) -> None:
    status, env = await post(client, QUERY.format("Nope_OS_SI"), set_request(**GOOD))
    assert status == 500 and fault_of(env) == (
        "SOAP:Server",
        "RCVR_DETERMINATION.NO_RECEIVER_CASE_BE",
    )
    status, env = await post(
        client, SET.replace("senderService=S", "senderService="), set_request(**GOOD)
    )
    assert status == 500 and "RCVR_DETERMINATION" in fault_of(env)[1]


async def test_fail_next_is_a_server_fault_not_applied(client: TestClient) -> None:
    client.app[STATE].fail_next = 1
    status, env = await post(client, SET, set_request(**GOOD))
    assert status == 500 and fault_of(env) == ("SOAP:Server", "ADAPTER.JAVA_EXCEPTION")
    assert client.app[STATE].ledger.holdings("42") == []
    assert [r.outcome for r in client.app[STATE].received] == ["fault"]


async def test_fail_rate_with_a_seed_is_reproducible(aiohttp_client: Any) -> None:
    outcomes = []
    for _ in range(2):
        client = await aiohttp_client(build_app(SimulatorOptions(fail_rate=0.5, seed=7)))
        statuses = []
        for day in range(1, 11):
            req = set_request(
                **{**GOOD, "StartDate": f"2026-10-{day:02d}", "EndDate": f"2026-10-{day:02d}"}
            )
            statuses.append((await post(client, SET, req))[0])
        outcomes.append(statuses)
    assert outcomes[0] == outcomes[1] and {200, 500} == set(outcomes[0])


async def test_timeout_fault_gives_no_timely_answer(client: TestClient) -> None:
    state = client.app[STATE]
    state.fault, state.timeout_seconds = "timeout", 5.0
    with pytest.raises(TimeoutError):
        await client.post(
            "/XISOAPAdapter/MessageServlet" + SET,
            data=set_request(**GOOD),
            timeout=aiohttp.ClientTimeout(total=0.3),
        )
    assert state.ledger.holdings("42") == []


def test_unknown_fault_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown KMD fault"):
        build_app(SimulatorOptions(fault="gremlins"))


# ---------------------------------------------------------------------------------------
# Mutual TLS
# ---------------------------------------------------------------------------------------


@dataclass
class Served:
    app: web.Application
    url: str
    certs: DevCerts


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    certs = ensure_dev_certs(tmp_path / "certs")
    options = SimulatorOptions(
        cert_file=str(certs.server_cert),
        key_file=str(certs.server_key),
        client_ca_file=str(certs.ca_file),
        fault="drop-after-apply",
    )
    app = build_app(options)
    runner, url = await start(app, options)
    try:
        yield Served(app, url, certs)
    finally:
        await runner.cleanup()


async def test_client_certificate_is_required(served: Served) -> None:
    assert served.url.startswith("https://127.0.0.1:")
    bare = ssl.create_default_context(cafile=str(served.certs.ca_file))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=bare)) as session:
        with pytest.raises(aiohttp.ClientError):
            async with session.post(served.url + SET, data=set_request(**GOOD)) as resp:
                await resp.read()
    assert served.app[STATE].received == []


async def test_drop_after_apply_applies_and_leaves_the_caller_unanswered(served: Served) -> None:
    connector = aiohttp.TCPConnector(ssl=served.certs.client_context())
    async with aiohttp.ClientSession(connector=connector) as session:
        with pytest.raises(aiohttp.ServerDisconnectedError):
            async with session.post(served.url + SET, data=set_request(**GOOD)) as resp:
                await resp.read()
        # reads are never faulted, so the caller can reconcile
        async with session.post(served.url + READ, data=read_request("42")) as resp:
            answer = body_payload(parse_xml(await resp.read()))
    assert len(answer.findall("AbsenceAttendance/item")) == 1
    assert [r.outcome for r in served.app[STATE].received] == ["dropped"]


def test_ssl_context_needs_all_three_files() -> None:
    with pytest.raises(ValueError, match="client_ca_file"):
        ssl_context(SimulatorOptions(cert_file="a.pem", key_file="a.key"))
