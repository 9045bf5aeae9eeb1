"""KMD Engangsydelser end to end: HTTP API → store → dispatcher → simulator over mutual TLS.

After every scenario the simulator's net sum per employee, month and wage code equals
the latest version exactly: corrections are sent as differences, nothing twice.
"""

from __future__ import annotations

from dataclasses import replace
from decimal import Decimal
from typing import Any

import pytest
from aiohttp.test_utils import TestServer

from gateway.settings import Settings
from gateway.simulators import engangsydelser as sim
from tests.conftest import KEY_840, Gateway, drive, tenant, tls_simulator, tls_vendor

EMPLOYEE = "00777"


@pytest.fixture
async def eng_server(aiohttp_server: Any, dev_certs: Any) -> TestServer:
    return await tls_simulator(aiohttp_server, sim, dev_certs, seed=3)


@pytest.fixture
async def gw(
    make_gateway: Any, settings: Settings, eng_server: TestServer, dev_certs: Any
) -> Gateway:
    vendor = tls_vendor(str(eng_server.make_url("/")), dev_certs)
    tenants = dict(settings.tenants)
    tenants["840"] = tenant(
        "840", KEY_840, {"kmd-engangsydelser": vendor}, {"drive": "kmd-engangsydelser"}
    )
    return await make_gateway(replace(settings, tenants=tenants))


def state(server: TestServer) -> Any:
    return server.app[sim.STATE]


def report(version: int = 1, km: Any = "10.00", **changes: Any) -> dict[str, Any]:
    r = drive(
        municipality="840",
        report_id="E-1",
        version=version,
        distance_km=km,
        drive_date="2026-03-29",
        wage_code="0201",
        **changes,
    )
    r["employee"]["employment_id"] = EMPLOYEE
    return r


async def deliver(gw: Gateway, body: dict[str, Any], expect: str = "delivered") -> Any:
    status, _ = await gw.post(body, key=KEY_840)
    assert status in (200, 202)
    return await gw.wait_for(body["report_id"], {expect}, municipality="840", key=KEY_840)


def net(server: TestServer, loenart: str = "0201") -> Decimal:
    return state(server).sum(EMPLOYEE, "2026-03", loenart)


async def test_versions_are_sent_as_differences(gw: Gateway, eng_server: TestServer) -> None:
    await deliver(gw, report(1, "10.00", wage_code_optional="0202"))
    assert (net(eng_server), net(eng_server, "0202")) == (Decimal("10.00"), Decimal("10.00"))
    await deliver(gw, report(2, "15.50", wage_code_optional="0202"))
    assert (net(eng_server), net(eng_server, "0202")) == (Decimal("15.50"), Decimal("15.50"))
    view = await deliver(gw, report(3, "7.25"))  # fewer km, and the optional code withdrawn
    assert (net(eng_server), net(eng_server, "0202")) == (Decimal("7.25"), Decimal("0"))
    await deliver(gw, report(4, "7.25", cancelled=True))
    assert (net(eng_server), net(eng_server, "0202")) == (Decimal("0"), Decimal("0"))
    assert len(state(eng_server).received) == 4
    assert view["deliveries"][-1]["vendor_reference"]


async def test_the_same_version_twice_sends_once(gw: Gateway, eng_server: TestServer) -> None:
    await deliver(gw, report(1))
    status, _ = await gw.post(report(1), key=KEY_840)
    assert status == 200
    assert len(state(eng_server).received) == 1 and net(eng_server) == Decimal("10.00")


async def test_in_doubt_send_is_reconciled_by_reading(gw: Gateway, eng_server: TestServer) -> None:
    state(eng_server).drop_next = 1  # applied, then the connection is dropped
    view = await deliver(gw, report(1, "12.00"))
    outcomes = [a["outcome"] for a in view["deliveries"][0]["attempts"]]
    assert outcomes == ["in_doubt_reconciled"]  # nothing was sent a second time
    assert len(state(eng_server).received) == 1 and net(eng_server) == Decimal("12.00")


async def test_locked_employee_is_retried_and_delivered(
    gw: Gateway, eng_server: TestServer
) -> None:
    state(eng_server).locked.add(EMPLOYEE)
    await gw.post(report(1), key=KEY_840)
    view = await gw.wait_for("E-1", {"retry_scheduled", "held"}, municipality="840", key=KEY_840)
    assert (
        "138" in view["deliveries"][0]["last_error"]
        or "låst" in view["deliveries"][0]["last_error"]
    )
    state(eng_server).locked.clear()
    await gw.wait_for("E-1", {"delivered"}, municipality="840", key=KEY_840)
    assert net(eng_server) == Decimal("10.00")


async def test_invalid_cost_centre_fails_with_kmds_text(
    gw: Gateway, eng_server: TestServer
) -> None:
    view = await deliver(gw, report(1, account="9999999999"), expect="failed")
    error = view["deliveries"][0]["last_error"]
    assert "119" in error and "Omkostningssted" in error
    assert net(eng_server) == Decimal("0")
