"""KMD absence end to end: HTTP API → store → dispatcher → KMD simulator over mutual TLS.

After each scenario, what the simulator holds equals the latest version, and no
operation reached KMD twice.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from datetime import date, time
from typing import Any

import pytest
from aiohttp.test_utils import TestServer

from gateway.settings import Settings
from gateway.simulators import kmd as sim
from tests.conftest import KEY_746, Gateway, tenant, tls_simulator, tls_vendor

PERSONNEL = "00012345"
VACATION = {
    "kind": "vacation",
    "municipality": "746",
    "report_id": "V-1",
    "version": 1,
    "employee": {"cpr": "0101901234", "employment_id": PERSONNEL},
    "start_date": "2026-07-06",
    "end_date": "2026-07-10",
    "vacation_type": "regular",
}


def vacation(**changes: Any) -> dict[str, Any]:
    report = copy.deepcopy(VACATION)
    report.update(changes)
    return report


@pytest.fixture
async def kmd_server(aiohttp_server: Any, dev_certs: Any) -> TestServer:
    return await tls_simulator(aiohttp_server, sim, dev_certs, seed=5)


def kmd_vendor(server: TestServer, certs: Any) -> Any:
    return tls_vendor(str(server.make_url(sim.PATH)), certs, senderService="TEST_SENDER")


@pytest.fixture
async def gw(
    make_gateway: Any, settings: Settings, kmd_server: TestServer, dev_certs: Any
) -> Gateway:
    old = settings.tenants["746"]
    tenants = dict(settings.tenants)
    tenants["746"] = tenant(
        "746",
        KEY_746,
        {**old.vendors, "kmd-absence": kmd_vendor(kmd_server, dev_certs)},
        {**old.routes, "vacation": "kmd-absence"},
    )
    return await make_gateway(replace(settings, tenants=tenants))


def held(server: TestServer, personnel: str = PERSONNEL) -> list[tuple[Any, ...]]:
    return sorted(
        (r.type, r.start_date, r.end_date, r.start_time, r.end_time, r.additional_data)
        for r in server.app[sim.STATE].ledger.holdings(personnel)
    )


def operations(server: TestServer) -> list[str]:
    return [
        r.fields.get("Operation") or "INS"
        for r in server.app[sim.STATE].received
        if r.outcome in ("applied", "dropped")
    ]


def assert_nothing_twice(server: TestServer) -> None:
    seen = [
        tuple(sorted((k, v) for k, v in r.fields.items()))
        for r in server.app[sim.STATE].received
        if r.outcome in ("applied", "dropped")
    ]
    assert len(seen) == len(set(seen)), "an operation reached KMD twice"


async def deliver(gw: Gateway, body: dict[str, Any], expect: str = "delivered") -> Any:
    status, _ = await gw.post(body)
    assert status in (200, 202)
    return await gw.wait_for(body["report_id"], {expect})


D = date


async def test_create_edit_with_mod_then_cancel(gw: Gateway, kmd_server: TestServer) -> None:
    await deliver(gw, vacation())
    assert held(kmd_server) == [("FE", D(2026, 7, 6), D(2026, 7, 10), None, None, None)]
    await deliver(gw, vacation(version=2, end_date="2026-07-14"))
    assert held(kmd_server) == [("FE", D(2026, 7, 6), D(2026, 7, 14), None, None, None)]
    mod = kmd_server.app[sim.STATE].received[-1].fields
    assert mod["Operation"] == "MOD"
    assert (mod["OriginalStartDate"], mod["OriginalEndDate"]) == ("2026-07-06", "2026-07-10")
    await deliver(gw, vacation(version=3, end_date="2026-07-14", cancelled=True))
    assert held(kmd_server) == []
    assert operations(kmd_server) == ["INS", "MOD", "DEL"]
    assert_nothing_twice(kmd_server)


async def test_edit_that_needs_delete_and_insert(gw: Gateway, kmd_server: TestServer) -> None:
    await deliver(gw, vacation())
    moved = vacation(version=2)
    moved["employee"]["employment_id"] = "00099999"  # another employment: DEL there, INS here
    await deliver(gw, moved)
    assert held(kmd_server) == []
    assert held(kmd_server, "00099999") == [("FE", D(2026, 7, 6), D(2026, 7, 10), None, None, None)]
    assert operations(kmd_server) == ["INS", "DEL", "INS"]
    assert_nothing_twice(kmd_server)


async def test_part_days_become_three_absences_and_edits_send_only_changes(
    gw: Gateway, kmd_server: TestServer
) -> None:
    part = vacation(
        start_date="2026-08-03", end_date="2026-08-07", start_time="12:00", end_time="10:30"
    )
    await deliver(gw, part)
    assert held(kmd_server) == [
        ("FE", D(2026, 8, 3), D(2026, 8, 3), time(12), None, None),
        ("FE", D(2026, 8, 4), D(2026, 8, 6), None, None, None),
        ("FE", D(2026, 8, 7), D(2026, 8, 7), None, time(10, 30), None),
    ]
    await deliver(gw, {**part, "version": 2, "end_time": "14:00"})  # only the last day changes
    assert operations(kmd_server) == ["INS", "INS", "INS", "MOD"]
    assert held(kmd_server)[-1] == ("FE", D(2026, 8, 7), D(2026, 8, 7), None, time(14), None)
    assert_nothing_twice(kmd_server)


async def test_two_part_days_have_no_empty_middle(gw: Gateway, kmd_server: TestServer) -> None:
    await deliver(
        gw,
        vacation(
            start_date="2026-08-03", end_date="2026-08-04", start_time="12:00", end_time="10:00"
        ),
    )
    assert [h[1:3] for h in held(kmd_server)] == [
        (D(2026, 8, 3), D(2026, 8, 3)),
        (D(2026, 8, 4), D(2026, 8, 4)),
    ]


async def test_care_day_sends_the_child_number(gw: Gateway, kmd_server: TestServer) -> None:
    await deliver(gw, vacation(vacation_type="care", child_number=3, end_date="2026-07-06"))
    assert held(kmd_server) == [("OS", D(2026, 7, 6), D(2026, 7, 6), None, None, "03")]


async def test_optional_vacation_is_not_applicable(gw: Gateway, kmd_server: TestServer) -> None:
    view = await deliver(gw, vacation(vacation_type="optional"), expect="not_applicable")
    assert "optional" in view["deliveries"][0]["last_error"]
    assert kmd_server.app[sim.STATE].received == []


async def test_in_doubt_is_read_back_and_delivered_once(
    gw: Gateway, kmd_server: TestServer
) -> None:
    kmd_server.app[sim.STATE].drop_next = 1
    view = await deliver(gw, vacation())
    assert [a["outcome"] for a in view["deliveries"][0]["attempts"]] == ["in_doubt_reconciled"]
    assert held(kmd_server) == [("FE", D(2026, 7, 6), D(2026, 7, 10), None, None, None)]
    assert operations(kmd_server) == ["INS"]
    assert kmd_server.app[sim.STATE].reads >= 1


async def test_kmd_error_fails_with_its_text(gw: Gateway, kmd_server: TestServer) -> None:
    await deliver(gw, vacation())
    other = vacation(report_id="V-2")  # the same days again: KMD refuses the overlap
    view = await deliver(gw, other, expect="failed")
    assert view["deliveries"][0]["last_error"]
    assert len(held(kmd_server)) == 1


async def test_operator_check_at_kmd_reconciles_a_failed_delivery(
    make_gateway: Any, settings: Settings, kmd_server: TestServer, dev_certs: Any
) -> None:
    from gateway.settings import RetryPolicy

    one_try = RetryPolicy(
        first_delay=0.01, multiplier=1, cap=0.01, jitter=0, max_attempts=1, max_age=60
    )
    tenants = dict(settings.tenants)
    tenants["746"] = tenant(
        "746",
        KEY_746,
        {"kmd-absence": kmd_vendor(kmd_server, dev_certs)},
        {"vacation": "kmd-absence"},
    )
    gw = await make_gateway(replace(settings, tenants=tenants, retry=one_try))
    kmd_server.app[sim.STATE].fault = "server"
    view = await deliver(gw, vacation(), expect="failed")
    assert "retry policy exhausted" in view["deliveries"][0]["last_error"]
    kmd_server.app[sim.STATE].fault = None
    status, result = await gw.ops(
        "POST",
        f"deliveries/{view['deliveries'][0]['id']}/check",
        {"reason": "KMD was down; check what it holds"},
    )
    assert status == 200 and result["changed"] == [view["deliveries"][0]["id"]]
    await gw.wait_for("V-1", {"delivered"})
    assert held(kmd_server) == [("FE", D(2026, 7, 6), D(2026, 7, 10), None, None, None)]
    assert kmd_server.app[sim.STATE].reads >= 1
