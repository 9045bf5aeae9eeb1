"""Tests of the SD Løn simulator: auth, request checks, accepted registrations, fault injection."""

from __future__ import annotations

import asyncio
import base64
import json
import random
import time
from collections import Counter
from pathlib import Path

import aiohttp
import pytest
from lxml import etree

from adapters.base import Report, VendorSettings
from adapters.resources import schema_path
from adapters.sd_koersel import SdKoersel
from adapters.soap import (
    body_payload,
    find_fault,
    load_schema,
    parse_xml,
    schema_errors,
)
from gateway.simulators import SimulatorOptions, pick_fault
from gateway.simulators.sd import STATE, build_app

SD = "urn:oio:sd:snitflader:2017.05.01"
REPORT = json.loads(
    (Path(__file__).resolve().parents[1] / "data" / "reports" / "drive-minimal.json").read_text()
)
SETTINGS = VendorSettings(endpoint="http://sd.test/sd", institution="XY")
AUTH = {"Authorization": "Basic " + base64.b64encode(b"SYtest:pw").decode()}


@pytest.fixture(scope="module")
def adapter() -> SdKoersel:
    return SdKoersel()


def request_body(adapter: SdKoersel, **changes: object) -> bytes:
    report = Report.from_dict({**REPORT, **changes})
    (message,) = adapter.plan(report, [], SETTINGS).messages
    return adapter.render(report, message, SETTINGS).body


@pytest.fixture
def client_for(aiohttp_client):
    async def make(**options: object):
        opts = SimulatorOptions(**{"username": "SYtest", "password": "pw", **options})
        return await aiohttp_client(build_app(opts))

    return make


async def post(client, body: bytes, headers: dict[str, str] | None = None):
    resp = await client.post(
        "/sdws/AnsaettelseKoerselOpret20170501",
        data=body,
        headers=AUTH if headers is None else headers,
    )
    return resp.status, await resp.read()


def fault_text(body: bytes) -> tuple[str, str]:
    fault = find_fault(parse_xml(body))
    assert fault is not None, body
    return fault.code, fault.detail


# ---------------------------------------------------------------------------------------
# auth
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Basic " + base64.b64encode(b"SYtest:wrong").decode()},
        {"Authorization": "Basic !!!not-base64"},
        {"Authorization": "Bearer SYtest:pw"},
    ],
)
async def test_wrong_or_missing_credentials_get_401(client_for, adapter, headers) -> None:
    client = await client_for()
    status, _ = await post(client, request_body(adapter), headers)
    assert status == 401
    assert client.server.app[STATE].accepted == []


async def test_any_credentials_when_no_username(client_for, adapter) -> None:
    client = await client_for(username=None, password=None)
    status, _ = await post(client, request_body(adapter), {})
    assert status == 200


# ---------------------------------------------------------------------------------------
# request checks
# ---------------------------------------------------------------------------------------


async def test_schema_invalid_body_is_a_client_fault(client_for, adapter) -> None:
    client = await client_for()
    body = request_body(adapter).replace(b">12.30<", b">12.345<")
    status, answer = await post(client, body)
    code, text = fault_text(answer)
    assert (status, code) == (500, "Client")
    assert "Schema validation failed" in text and "KilometerMaal" in text
    assert client.server.app[STATE].accepted == []


@pytest.mark.parametrize(
    "body",
    [
        b"not xml at all",
        b'<?xml version="1.0"?><!DOCTYPE a [<!ENTITY x "y">]><a>&x;</a>',
        b'<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"><s:Body>'
        b'<k:KoerselDato xmlns:k="urn:oio:sd:snitflader:2012.02.01">2026-01-01</k:KoerselDato>'
        b"</s:Body></s:Envelope>",
    ],
)
async def test_unreadable_or_foreign_requests_are_client_faults(client_for, body) -> None:
    client = await client_for()
    status, answer = await post(client, body)
    assert (status, fault_text(answer)[0]) == (500, "Client")


async def test_unknown_employment_is_refused(client_for, adapter) -> None:
    client = await client_for()
    data = {**REPORT, "employee": {**REPORT["employee"], "employment_id": "00000000"}}
    report = Report.from_dict(data)
    (message,) = adapter.plan(report, [], SETTINGS).messages
    status, answer = await post(client, adapter.render(report, message, SETTINGS).body)
    assert status == 500
    assert fault_text(answer) == ("Client", "The stated EmploymentIdentifier does not exist")


# ---------------------------------------------------------------------------------------
# accepted registrations
# ---------------------------------------------------------------------------------------


async def test_accepted_list_counts_and_answers_echo(client_for, adapter) -> None:
    client = await client_for()
    references = []
    for km in ("1", "2.5", "3.75"):
        status, answer = await post(client, request_body(adapter, distance_km=km))
        assert status == 200
        payload = body_payload(parse_xml(answer))
        assert schema_errors(load_schema(schema_path("sd/sd-20170501.xsd")), payload) == []
        assert payload.findtext(f"{{{SD}}}InddataStruktur/{{{SD}}}AnsaettelseIdentifikator") == (
            "00012345"
        )
        references.append(payload.findtext(f"{{{SD}}}RegistreringIdentifikator"))
    accepted = client.server.app[STATE].accepted
    assert [a.registrering_id for a in accepted] == references
    assert len(set(references)) == 3
    assert [str(a.km) for a in accepted] == ["1.00", "2.50", "3.75"]
    assert {(a.employment_id, a.wage_code, a.date.isoformat()) for a in accepted} == {
        ("00012345", "1234", "2026-02-10")
    }
    assert etree.fromstring(accepted[0].body).tag.endswith("Envelope")
    assert client.server.app[STATE].received == 3


# ---------------------------------------------------------------------------------------
# fault injection
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "status", "retry_after"),
    [
        ("server", 500, None),
        ("client", 500, None),
        ("closed", 200, None),
        ("unavailable", 503, "120"),
        ("throttle", 429, "61"),
    ],
)
async def test_forced_faults_store_nothing(client_for, adapter, fault, status, retry_after) -> None:
    client = await client_for(fault=fault)
    resp = await client.post("/x", data=request_body(adapter), headers=AUTH)
    assert resp.status == status
    assert resp.headers.get("Retry-After") == retry_after
    body = await resp.read()
    if fault == "closed":
        assert b"The webservice has failed" in body
    assert client.server.app[STATE].accepted == []


async def test_fail_next_counts_down_then_recovers(client_for, adapter) -> None:
    client = await client_for()
    client.server.app[STATE].fail_next = 2
    statuses = [(await post(client, request_body(adapter)))[0] for _ in range(3)]
    assert statuses == [500, 500, 200]
    assert len(client.server.app[STATE].accepted) == 1


async def test_fault_can_be_changed_at_run_time(client_for, adapter) -> None:
    client = await client_for(fault="closed")
    assert (await post(client, request_body(adapter)))[0] == 200
    assert client.server.app[STATE].accepted == []
    client.server.app[STATE].fault = None
    assert (await post(client, request_body(adapter)))[0] == 200
    assert len(client.server.app[STATE].accepted) == 1


async def test_fail_rate_is_seeded(client_for, adapter) -> None:
    async def outcomes(seed: int) -> list[int]:
        client = await client_for(fail_rate=0.5, seed=seed)
        return [(await post(client, request_body(adapter)))[0] for _ in range(12)]

    first, again = await outcomes(7), await outcomes(7)
    assert first == again
    assert set(first) == {200, 500}


async def test_latency_is_added(client_for, adapter) -> None:
    client = await client_for(latency_ms=80)
    started = time.monotonic()
    await post(client, request_body(adapter))
    assert time.monotonic() - started >= 0.08


def test_unknown_fault_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown SD fault"):
        build_app(SimulatorOptions(fault="explode"))


# ---------------------------------------------------------------------------------------
# fault_mix: one seeded draw per request
# ---------------------------------------------------------------------------------------

MIX = (("server", 0.3), ("timeout", 0.1), ("reset", 0.05))


def test_pick_fault_shares_are_observed_over_1000_seeded_draws() -> None:
    rng = random.Random(20260101)
    counts = Counter(pick_fault(MIX, rng.random()) for _ in range(1000))
    for kind, share in (*MIX, (None, 0.55)):
        assert abs(counts[kind] / 1000 - share) < 0.05, counts
    again = random.Random(20260101)
    assert Counter(pick_fault(MIX, again.random()) for _ in range(1000)) == counts  # seeded


def test_pick_fault_uses_cumulative_shares() -> None:
    assert [pick_fault(MIX, d) for d in (0.0, 0.2999, 0.3, 0.3999, 0.4, 0.4499, 0.45, 0.99)] == [
        "server",
        "server",
        "timeout",
        "timeout",
        "reset",
        "reset",
        None,
        None,
    ]
    assert pick_fault((), 0.0) is None


@pytest.mark.parametrize(
    ("mix", "message"),
    [
        ((("explode", 0.1),), "unknown fault"),
        ((("server", 1.5),), "between 0 and 1"),
        ((("server", 0.6), ("reset", 0.6)), "more than 1"),
    ],
)
def test_bad_fault_mix_is_refused(mix, message) -> None:
    with pytest.raises(ValueError, match=message):
        build_app(SimulatorOptions(fault_mix=mix))


async def _post_mixed(client, adapter, read_timeout: float = 5.0):
    timeout = aiohttp.ClientTimeout(sock_read=read_timeout)
    async with client.post("/x", data=request_body(adapter), headers=AUTH, timeout=timeout) as resp:
        return resp.status, await resp.read()


async def test_mixed_server_fault_stores_nothing(client_for, adapter) -> None:
    client = await client_for(fault_mix=(("server", 1.0),), seed=1)
    status, body = await _post_mixed(client, adapter)
    assert (status, fault_text(body)[0]) == (500, "Server")
    assert client.server.app[STATE].accepted == []
    assert client.server.app[STATE].injected == {"server": 1}


async def test_mixed_timeout_stores_then_answers_too_late(client_for, adapter) -> None:
    client = await client_for(fault_mix=(("timeout", 1.0),), seed=1)
    client.server.app[STATE].hang_seconds = 1.0
    with pytest.raises(asyncio.TimeoutError):
        await _post_mixed(client, adapter, read_timeout=0.1)
    assert len(client.server.app[STATE].accepted) == 1  # applied, the client cannot know


@pytest.mark.parametrize(("kind", "stored"), [("reset", 0), ("drop-after-apply", 1)])
async def test_mixed_reset_and_drop_close_without_an_answer(
    client_for, adapter, kind, stored
) -> None:
    client = await client_for(fault_mix=((kind, 1.0),), seed=1)
    with pytest.raises(aiohttp.ClientError):
        await _post_mixed(client, adapter)
    assert len(client.server.app[STATE].accepted) == stored


async def test_mix_draws_are_seeded_and_empty_mix_changes_nothing(client_for, adapter) -> None:
    async def outcomes(**options: object) -> list[str]:
        client = await client_for(seed=5, **options)
        found = []
        for _ in range(20):
            try:
                found.append(str((await _post_mixed(client, adapter))[0]))
            except aiohttp.ClientError:
                found.append("closed")
        return found

    mix = (("server", 0.4), ("reset", 0.2))
    first, again = await outcomes(fault_mix=mix), await outcomes(fault_mix=mix)
    assert first == again and {"200", "500", "closed"} <= set(first)
    assert set(await outcomes()) == {"200"}
