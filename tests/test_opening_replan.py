"""Work deferred to an endpoint's opening is planned again when the hours may have changed."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp.test_utils import TestServer

from gateway.settings import Settings
from gateway.simulators.sd import STATE as SD_STATE
from gateway.store import Settle, Status
from tests.conftest import Gateway, drive
from tests.test_engine import CPH, with_endpoint


def closed_window() -> str:
    start = (datetime.now(CPH) + timedelta(hours=3)).replace(second=0, microsecond=0)
    return f"{start:%H:%M}-{start + timedelta(minutes=30):%H:%M}"


async def next_attempt(gw: Gateway, report_id: str = "R-1") -> float:
    """When the delivery is due, to the millisecond the API shows."""
    _, view = await gw.get("746", report_id)
    return datetime.fromisoformat(view["deliveries"][0]["next_attempt_at"]).timestamp()


def ms(t: float) -> float:
    return datetime.fromisoformat(
        datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds")
    ).timestamp()


async def wait_deferred(gw: Gateway) -> float:
    deadline = time.monotonic() + 5
    while (at := await next_attempt(gw)) < time.time() + 3600:
        assert time.monotonic() < deadline, "never deferred to the opening"
        await asyncio.sleep(0.05)
    return at


async def test_a_restart_with_new_hours_delivers_what_waited_for_the_old_opening(
    make_gateway: Any, settings: Settings, sd_server: TestServer
) -> None:
    first = await make_gateway(with_endpoint(settings, opening_hours=closed_window()))
    await first.post(drive())
    opening = await wait_deferred(first)
    _, listed = await first.ops("GET", "deliveries?municipality=746")
    assert (
        datetime.fromisoformat(listed["deliveries"][0]["waiting_for_opening_at"]).timestamp()
        == opening
    )
    await first.client.close()
    assert sd_server.app[SD_STATE].received == 0

    second = await make_gateway(with_endpoint(settings, opening_hours="always"))
    view = await second.wait_for("R-1", {"delivered"})
    assert len(view["deliveries"][0]["attempts"]) == 1


async def test_a_restart_with_the_same_hours_waits_for_the_same_opening(
    make_gateway: Any, settings: Settings, sd_server: TestServer
) -> None:
    window = closed_window()
    first = await make_gateway(with_endpoint(settings, opening_hours=window))
    await first.post(drive())
    opening = await wait_deferred(first)
    await first.client.close()
    second = await make_gateway(with_endpoint(settings, opening_hours=window))
    await asyncio.sleep(0.3)
    assert await wait_deferred(second) == opening
    assert sd_server.app[SD_STATE].received == 0


async def test_resume_gives_deferred_work_its_own_due_time_back(
    make_gateway: Any, settings: Settings
) -> None:
    gw = await make_gateway(settings, run_dispatcher=False)
    await gw.post(drive())
    due = await next_attempt(gw)
    store, now = gw.store, time.time()
    assert await store.defer_due("746", "sd-koersel", now + 7200, now) == 1
    assert (
        await store.defer_due("746", "sd-koersel", now + 9000, now) == 1
    )  # deferred twice: first due kept
    assert await next_attempt(gw) == ms(now + 9000)
    assert (await gw.ops("POST", "endpoints/746/sd-koersel/pause", {"reason": "SD down"}))[0] == 200
    assert (await gw.ops("POST", "endpoints/746/sd-koersel/resume", {"reason": "SD is back"}))[
        0
    ] == 200
    assert await next_attempt(gw) == due
    _, listed = await gw.ops("GET", "deliveries?municipality=746")
    assert "waiting_for_opening_at" not in listed["deliveries"][0]


async def test_undefer_touches_only_deferred_waiting_work_of_that_endpoint(
    make_gateway: Any, settings: Settings
) -> None:
    gw = await make_gateway(settings, run_dispatcher=False)
    await gw.post({"reports": [drive(report_id="A"), drive(report_id="B")]})
    store, now = gw.store, time.time()
    due_a = await next_attempt(gw, "A")
    await store.defer_due("746", "sd-koersel", now + 7200, now)
    assert await store.undefer("840", "sd-koersel", now) == 0  # another endpoint
    _, view = await gw.get("746", "B")
    # a delivery settled after its deferral forgets it: its new schedule is the one that counts
    await store.settle(
        view["deliveries"][0]["id"],
        Settle(Status.RETRY_SCHEDULED, next_attempt_at=now + 600),
        now,
        "delivery.retry",
    )
    assert await store.undefer(None, None, now) == 1
    assert await next_attempt(gw, "A") == due_a
    assert await next_attempt(gw, "B") == ms(now + 600)
    assert await store.undefer(None, None, now) == 0
    assert datetime.fromtimestamp(due_a, UTC) <= datetime.now(UTC)
