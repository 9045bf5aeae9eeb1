"""The delivery engine through the real API and the SD simulator: ordering, supersede,
corrections, Retry-After, opening hours, breaker, pause, cut-off alerts, replay and cancel."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.keys import APP_WATCH
from gateway.settings import AlertSettings, BreakerPolicy, Settings
from gateway.simulators.sd import STATE as SD_STATE
from tests.conftest import KEY_746, Gateway, drive, tenant

CPH = ZoneInfo("Europe/Copenhagen")


def accepted(sd: TestServer) -> list[Any]:
    return sd.app[SD_STATE].accepted


def with_endpoint(settings: Settings, **policy: Any) -> Settings:
    """Tenant 746's SD endpoint with other engine settings (breaker, hours, cut-off...)."""
    old = settings.tenants["746"]
    tenants = dict(settings.tenants)
    tenants["746"] = tenant("746", KEY_746, dict(old.vendors), dict(old.routes), **policy)
    return replace(settings, tenants=tenants)


def of(employment: str, report_id: str, **changes: Any) -> dict[str, Any]:
    report = drive(report_id=report_id, **changes)
    report["employee"]["employment_id"] = employment
    return report


async def test_a_failed_delivery_holds_back_only_that_employee(
    gateway: Gateway, sd_server: TestServer
) -> None:
    # SD does not know employment 00000000: its first report fails, its second must wait
    await gateway.post(
        {"reports": [of("00000000", "A-1"), of("00000000", "A-2"), of("00555", "B-1")]}
    )
    await gateway.wait_for("A-1", {"failed"})
    await gateway.wait_for("B-1", {"delivered"})
    _, held = await gateway.get("746", "A-2")
    assert held["status"] == "held"
    assert held["deliveries"][0]["held_by"]["report_id"] == "A-1"
    assert "failed" in held["deliveries"][0]["held_by"]["reason"]
    # the operator cancels the failed one: the next one of that employee goes out
    status, result = await gateway.ops(
        "POST",
        f"deliveries/{held['deliveries'][0]['held_by']['delivery_id']}/cancel",
        {"reason": "employment closed in SD; paid by hand"},
    )
    assert status == 200 and result["operator"] == "ops"
    await gateway.wait_for("A-2", {"failed"})  # attempted now (and SD still does not know it)


async def test_a_newer_version_supersedes_an_undelivered_one(
    gateway: Gateway, sd_server: TestServer
) -> None:
    status, _ = await gateway.ops(
        "POST", "endpoints/746/sd-koersel/pause", {"reason": "SD maintenance"}
    )
    assert status == 200
    await gateway.post(drive(distance_km="10.00"))
    await gateway.post(drive(version=2, distance_km="11.00"))
    _, view = await gateway.get("746", "R-1")
    assert [d["status"] for d in view["deliveries"]] == ["superseded", "queued"]
    await gateway.ops("POST", "endpoints/746/sd-koersel/resume", {"reason": "maintenance over"})
    await gateway.wait_for("R-1", {"delivered"})
    assert [str(a.km) for a in accepted(sd_server)] == ["11.00"]  # version 1 was never sent


async def test_a_new_version_of_a_delivered_sd_report_needs_an_operator(
    gateway: Gateway, sd_server: TestServer
) -> None:
    await gateway.post(drive())
    await gateway.wait_for("R-1", {"delivered"})
    await gateway.post(drive(version=2, distance_km="20.00"))
    view = await gateway.wait_for("R-1", {"correction_required"})
    assert "no edit" in view["deliveries"][-1]["last_error"]
    assert len(accepted(sd_server)) == 1  # never a second posting by itself


async def test_retry_after_is_honoured_and_503_waits_at_least_a_minute(
    gateway: Gateway, sd_server: TestServer
) -> None:
    sd_server.app[SD_STATE].fault = "unavailable"  # 503 with Retry-After: 120
    before = datetime.now(UTC)
    await gateway.post(drive())
    view = await gateway.wait_for("R-1", {"retry_scheduled"})
    next_at = datetime.fromisoformat(view["deliveries"][0]["next_attempt_at"])
    assert timedelta(seconds=119) <= next_at - before <= timedelta(seconds=130)


async def test_outside_opening_hours_nothing_is_sent_and_it_waits_for_the_opening(
    make_gateway: Any, settings: Settings, sd_server: TestServer
) -> None:
    now = datetime.now(CPH)
    start = (now + timedelta(hours=3)).replace(second=0, microsecond=0)
    window = f"{start:%H:%M}-{start + timedelta(minutes=30):%H:%M}"
    gw = await make_gateway(with_endpoint(settings, opening_hours=window))
    await gw.post(drive())
    deadline = asyncio.get_running_loop().time() + 5
    while True:
        _, view = await gw.get("746", "R-1")
        next_at = datetime.fromisoformat(view["deliveries"][0]["next_attempt_at"])
        if (
            next_at > datetime.now(UTC) + timedelta(hours=1)
            or asyncio.get_running_loop().time() > deadline
        ):
            break
        await asyncio.sleep(0.05)
    assert next_at == start.astimezone(UTC)  # the window's opening, not a burned retry
    assert view["deliveries"][0]["status"] == "queued" and view["deliveries"][0]["attempts"] == []
    assert sd_server.app[SD_STATE].received == 0


async def test_breaker_opens_then_a_probe_closes_it(
    make_gateway: Any, settings: Settings, sd_server: TestServer
) -> None:
    breaker = BreakerPolicy(window_seconds=60, min_calls=3, failure_rate=0.5, open_seconds=0.3)
    gw = await make_gateway(with_endpoint(settings, breaker=breaker))
    sd_server.app[SD_STATE].fault = "server"
    await gw.post({"reports": [of(f"E{i}", f"R-{i}") for i in range(6)]})
    for _ in range(100):
        events = [e["event"] for e in await gw.store.audit_chain()]
        if "endpoint.breaker_open" in events:
            break
        await asyncio.sleep(0.02)
    _, endpoints = await gw.ops("GET", "endpoints")
    assert "endpoint.breaker_open" in events
    assert endpoints["endpoints"][0]["breaker"] in ("open", "half_open")
    sd_server.app[SD_STATE].fault = None
    for i in range(6):
        await gw.wait_for(f"R-{i}", {"delivered"})
    events = [e["event"] for e in await gw.store.audit_chain()]
    assert "endpoint.breaker_closed" in events


async def test_max_in_flight_is_respected(
    make_gateway: Any, settings: Settings, sd_server: TestServer
) -> None:
    gw = await make_gateway(with_endpoint(settings, max_in_flight=2))
    sd_server.app[SD_STATE].options = replace(sd_server.app[SD_STATE].options, latency_ms=50)
    peak = 0
    original = gw.dispatcher.endpoints.get(("746", "sd-koersel"))
    await gw.post({"reports": [of(f"E{i}", f"R-{i}") for i in range(8)]})
    for _ in range(200):
        peak = max(peak, original.in_flight)
        _, rows = await gw.ops("GET", "deliveries?status=delivered")
        if rows["count"] == 8:
            break
        await asyncio.sleep(0.01)
    assert rows["count"] == 8 and 1 <= peak <= 2


async def test_cutoff_at_risk_is_flagged_counted_and_alerted(
    make_gateway: Any, settings: Settings, sd_server: TestServer, aiohttp_server: Any
) -> None:
    received: list[Any] = []

    async def hook(request: web.Request) -> web.Response:
        received.append(await request.json())
        return web.json_response({})

    app = web.Application()
    app.router.add_post("/alert", hook)
    alert_server = await aiohttp_server(app)
    cutoff = (datetime.now(CPH) + timedelta(minutes=2)).replace(second=0, microsecond=0)
    cfg = with_endpoint(
        settings,
        cutoff={"rule": "business day 5 at 12:00", "dates": [cutoff.strftime("%Y-%m-%dT%H:%M")]},
    )
    gw = await make_gateway(
        replace(cfg, alerts=AlertSettings(url=str(alert_server.make_url("/alert"))))
    )
    sd_server.app[SD_STATE].fault = "unavailable"  # Retry-After 120 s: after the cut-off
    await gw.post(drive())
    await gw.wait_for("R-1", {"retry_scheduled"})
    flagged = await gw.app[APP_WATCH].check()
    assert [f["report_id"] for f in flagged] == ["R-1"]
    for _ in range(500):  # the watch nudges the alerts (at most one evaluation per 2 s)
        if received:
            break
        await asyncio.sleep(0.02)
    assert received and received[0]["event"] == "alert.opened"
    assert received[0]["cause"] == "deliveries.at_risk:746/sd-koersel"
    assert received[0]["deliveries"][0]["report_id"] == "R-1"
    assert "0101901234" not in str(received)
    _, rows = await gw.ops("GET", "deliveries?at_risk=true")
    assert rows["count"] == 1 and rows["deliveries"][0]["at_risk"] is True
    metrics = await (await gw.client.get("/metrics")).text()
    assert "payroll_gateway_at_risk 1.0" in metrics
    assert await gw.app[APP_WATCH].check() == []  # flagged once, alerted once
    await asyncio.sleep(0.2)
    assert len(received) == 1


async def test_replay_and_cancel_need_a_reason_and_are_audited(
    gateway: Gateway, sd_server: TestServer
) -> None:
    sd_server.app[SD_STATE].fault = "client"
    await gateway.post({"reports": [drive(report_id="R-1"), of("00777", "R-2")]})
    await gateway.wait_for("R-1", {"failed"})
    await gateway.wait_for("R-2", {"failed"})
    assert (await gateway.ops("POST", "deliveries/replay", {"filter": {"status": "failed"}}))[
        0
    ] == 422
    assert (
        await gateway.ops("POST", "deliveries/replay", {"reason": "x", "ids": [1]}, token="nope")
    )[0] == 401
    sd_server.app[SD_STATE].fault = None
    status, result = await gateway.ops(
        "POST",
        "deliveries/replay",
        {"reason": "SD fixed the employment", "filter": {"status": "failed", "report_id": "R-1"}},
    )
    assert status == 200 and len(result["changed"]) == 1
    view = await gateway.wait_for("R-1", {"delivered"})
    status, _ = await gateway.ops(
        "POST", "deliveries/cancel", {"reason": "duplicate of R-1", "ids": [2]}
    )
    assert status == 200
    _, cancelled = await gateway.get("746", "R-2")
    assert (
        cancelled["status"] == "cancelled"
        and "duplicate of R-1" in cancelled["deliveries"][0]["last_error"]
    )
    _, audit = await gateway.ops("GET", f"deliveries/{view['deliveries'][0]['id']}/audit")
    replays = [e for e in audit["events"] if e["event"] == "delivery.replay"]
    assert (
        replays[0]["actor"] == "ops" and replays[0]["detail"]["reason"] == "SD fixed the employment"
    )
    # a delivered one cannot be cancelled
    assert (
        await gateway.ops(
            "POST", f"deliveries/{view['deliveries'][0]['id']}/cancel", {"reason": "x"}
        )
    )[0] == 409


async def test_check_is_only_for_vendors_that_can_be_asked(
    gateway: Gateway, sd_server: TestServer
) -> None:
    sd_server.app[SD_STATE].fault = "client"
    await gateway.post(drive())
    view = await gateway.wait_for("R-1", {"failed"})
    status, problem = await gateway.ops(
        "POST", f"deliveries/{view['deliveries'][0]['id']}/check", {"reason": "?"}
    )
    assert status == 409


def test_a_lease_shorter_than_a_request_is_warned_about(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    from gateway.app import warn_short_leases

    with caplog.at_level(logging.WARNING):
        warn_short_leases(replace(settings, lease_seconds=5))
    assert "lease_seconds (5) should be at least" in caplog.text


async def test_confirming_an_in_doubt_sd_delivery_records_it_so_a_new_version_is_not_paid_twice(
    gateway: Gateway, sd_server: TestServer
) -> None:
    sd_server.app[SD_STATE].fault = "drop-after-apply"
    await gateway.post(drive())
    view = await gateway.wait_for("R-1", {"in_doubt"})
    sd_server.app[SD_STATE].fault = None
    registration = accepted(sd_server)[0].registrering_id
    delivery = view["deliveries"][0]["id"]
    status, _ = await gateway.ops(
        "POST",
        f"deliveries/{delivery}/confirm",
        {"reason": "found it in SD Løn", "vendor_reference": registration},
    )
    assert status == 200
    _, view = await gateway.get("746", "R-1")
    assert (
        view["status"] == "delivered" and view["deliveries"][0]["vendor_reference"] == registration
    )
    await gateway.post(drive(version=2, distance_km="30.00"))
    await gateway.wait_for("R-1", {"correction_required"})
    assert len(accepted(sd_server)) == 1
    # confirm only applies to in-doubt deliveries
    assert (await gateway.ops("POST", f"deliveries/{delivery}/confirm", {"reason": "again"}))[
        0
    ] == 409
