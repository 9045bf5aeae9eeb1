"""Alerts: causes from the gateway's state, one open alert per cause, signed notifications
retried with backoff until they arrive, never sent twice, resolved when the cause is gone."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.alerts import (
    ID_HEADER,
    SIGNATURE_HEADER,
    Alerts,
    Cause,
    EndpointFacts,
    Snapshot,
    SourceFacts,
    after_attempt,
    causes,
    endpoint_facts,
    plan,
    sign,
    verify,
)
from gateway.keys import APP_ALERTS
from gateway.settings import AlertSettings, RetryPolicy, Settings
from gateway.simulators.sd import STATE as SD_STATE
from gateway.store import open_store
from gateway.store.alerting import AlertOpen, AlertPlan
from tests.conftest import TEST_KEYS, Gateway, drive
from tests.test_engine import of

REPO = Path(__file__).resolve().parent.parent
SECRET = "alert-test-secret-0123456789"
CPR = "0101901234"  # the test report's employee: never in an alert
T0 = 1_900_000_000.0
EP = ("746", "sd-koersel")
#: 1, 2, 4, 8 … seconds apart, no jitter: the spacing of the retries can be checked exactly
STEADY = RetryPolicy(
    first_delay=1.0, multiplier=2.0, cap=60.0, jitter=0.0, max_attempts=10, max_age=3600.0
)


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class Receiver:
    """A real webhook receiver on loopback: answers ``fail_first`` requests with 503."""

    fail_first: int = 0
    delay: float = 0.0
    requests: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    server: TestServer | None = None

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.requests.append((dict(request.headers), body))
        if self.delay:
            await asyncio.sleep(self.delay)
        return web.Response(status=503 if len(self.requests) <= self.fail_first else 200)

    @property
    def url(self) -> str:
        assert self.server is not None
        return str(self.server.make_url("/hook"))

    def bodies(self) -> list[dict[str, Any]]:
        return [json.loads(body) for _, body in self.requests]


@pytest.fixture
async def receiver(aiohttp_server: Any) -> Receiver:
    rec = Receiver()
    app = web.Application()
    app.router.add_post("/hook", rec.handle)
    rec.server = await aiohttp_server(app)
    return rec


def alerting(settings: Settings, receiver: Receiver | None, **kw: Any) -> Settings:
    alerts = AlertSettings(
        url=receiver.url if receiver else None, secret=SECRET, retry=STEADY, timeout=2.0
    )
    return replace(settings, alerts=replace(alerts, **kw))


@contextlib.asynccontextmanager
async def dispatching(gw: Gateway) -> AsyncIterator[None]:
    """The dispatcher of an app made with run_dispatcher=False, for the length of a block
    (the alert loops stay stopped: the test drives them with its own clock)."""
    task = asyncio.create_task(gw.dispatcher.run())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def events(gw: Gateway, prefix: str = "alert.") -> list[dict[str, Any]]:
    return [e for e in await gw.store.audit_chain() if e["event"].startswith(prefix)]


async def until(check: Callable[[], Any], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not await _value(check()):
        assert time.monotonic() < deadline, "not within the time"
        await asyncio.sleep(0.02)


async def _value(value: Any) -> Any:
    return await value if asyncio.iscoroutine(value) else value


# -- the causes (pure, a table) ------------------------------------------------------------

HOUR = 3600.0
FAILED = EndpointFacts(counts={"failed": 2}, samples={"delivery.failed": ({"id": 7},)})
WAITING = EndpointFacts(counts={"queued": 3}, waiting=3, due=3, due_since=T0 - 60)


@pytest.mark.parametrize(
    ("snapshot", "expected"),
    [
        (Snapshot(T0), set()),
        (Snapshot(T0, {EP: FAILED}), {"delivery.failed:746/sd-koersel"}),
        (
            Snapshot(T0, {EP: EndpointFacts(counts={"in_doubt": 1})}),
            {"delivery.in_doubt:746/sd-koersel"},
        ),
        (Snapshot(T0, breakers={EP: "open"}), {"breaker.open:746/sd-koersel"}),
        (Snapshot(T0, breakers={EP: "half_open"}), set()),  # no work: nothing waits for it
        (Snapshot(T0, {EP: WAITING}, breakers={EP: "half_open"}), {"breaker.open:746/sd-koersel"}),
        (Snapshot(T0, paused={EP: "maintenance"}), set()),  # paused, nothing waiting
        (
            Snapshot(T0 + 2 * HOUR, {EP: WAITING}, paused={EP: "x"}),  # paused: not "no progress"
            {"endpoint.paused_with_work:746/sd-koersel"},
        ),
        (Snapshot(T0, {EP: WAITING}), set()),  # due for a minute only
        (Snapshot(T0 + HOUR, {EP: WAITING}), {"endpoint.no_progress:746/sd-koersel"}),
        (
            Snapshot(T0 + HOUR, {EP: replace(WAITING, last_delivered_at=T0 + HOUR - 5)}),
            set(),  # delivered 5 s ago: it moves
        ),
        (
            Snapshot(T0 + HOUR, {EP: replace(WAITING, due=0, due_since=None)}),
            set(),  # all of it deferred to the endpoint's opening
        ),
        (
            Snapshot(T0 + 600, {EP: WAITING}, no_progress_seconds=300),
            {"endpoint.no_progress:746/sd-koersel"},
        ),
        (
            Snapshot(T0, sources=[SourceFacts("746", "os2indberetning", 3, None)]),
            {"source.failing:746/os2indberetning"},
        ),
        (Snapshot(T0, sources=[SourceFacts("746", "os2indberetning", 2, T0)]), set()),
        (
            Snapshot(T0, {EP: EndpointFacts(at_risk=4)}),
            {"deliveries.at_risk:746/sd-koersel"},
        ),
        (
            Snapshot(T0, {EP: FAILED, ("840", "sd-koersel"): FAILED}),
            {"delivery.failed:746/sd-koersel", "delivery.failed:840/sd-koersel"},
        ),
    ],
)
def test_causes(snapshot: Snapshot, expected: set[str]) -> None:
    found = causes(snapshot)
    assert set(found) == expected
    for key, cause in found.items():
        assert key.startswith(cause.kind + ":") and cause.payload["kind"] == cause.kind


def test_a_mass_failure_is_one_cause_with_a_count_and_a_few_ids() -> None:
    groups = [
        {
            "municipality": "746",
            "adapter": "sd-koersel",
            "status": "failed",
            "at_risk": 0,
            "deferred": 0,
            "n": 500,
            "first_created_at": T0,
            "last_updated_at": T0,
        }
    ]
    samples = [
        {"id": i, "municipality": "746", "adapter": "sd-koersel", "status": "failed"}
        | {"at_risk": 0, "report_id": f"R-{i}"}
        for i in range(500, 0, -1)
    ]
    found = causes(Snapshot(T0, endpoint_facts(groups, samples)))
    assert list(found) == ["delivery.failed:746/sd-koersel"]
    payload = found["delivery.failed:746/sd-koersel"].payload
    assert payload["count"] == 500
    assert [d["id"] for d in payload["deliveries"]] == [500, 499, 498, 497, 496]


def test_endpoint_facts_count_waiting_due_and_the_last_delivery() -> None:
    def group(status: str, n: int, deferred: int = 0, at_risk: int = 0) -> dict[str, Any]:
        return {
            "municipality": "746",
            "adapter": "sd-koersel",
            "status": status,
            "at_risk": at_risk,
            "deferred": deferred,
            "n": n,
            "first_created_at": T0 + n,
            "last_updated_at": T0 + 10 * n,
        }

    rows = [group("queued", 2), group("retry_scheduled", 3, deferred=1, at_risk=1)]
    rows += [group("delivered", 4), group("delivered", 7, at_risk=1)]
    facts = endpoint_facts(rows, [])[EP]
    assert (facts.waiting, facts.due, facts.due_since, facts.at_risk) == (5, 2, T0 + 2, 3 - 0)
    assert facts.last_delivered_at == T0 + 70


def test_plan_opens_new_causes_refreshes_changed_ones_and_resolves_only_what_it_sees() -> None:
    def cause(key: str, count: int) -> Cause:
        return Cause(key, key.split(":")[0], {"count": count})

    open_alerts = [
        {"id": 1, "cause": "delivery.failed:746/sd", "payload": {"count": 1}},
        {"id": 2, "cause": "delivery.in_doubt:746/sd", "payload": {"count": 1}},
        {"id": 3, "cause": "source.failing:840/os2indberetning", "payload": {"count": 3}},
        {"id": 4, "cause": "source.failing:746/os2indberetning", "payload": {"count": 3}},
    ]
    wanted = {
        "delivery.failed:746/sd": cause("delivery.failed:746/sd", 2),
        "breaker.open:746/sd": cause("breaker.open:746/sd", 0),
    }
    sees = {"source.failing:746/os2indberetning"}
    result = plan(
        open_alerts,
        wanted,
        lambda key: not key.startswith("source.") or key in sees,
        ("webhook",),
        lambda: "uid-1",
    )
    assert [(o.cause, o.uid) for o in result.opened] == [("breaker.open:746/sd", "uid-1")]
    assert result.updated == [(1, {"count": 2})]
    assert result.resolved == [2, 4]  # 3: another process pulls 840's source
    assert result.channels == ("webhook",)
    unchanged = plan(open_alerts[:1], {"delivery.failed:746/sd": cause("x", 1)}, bool, ())
    assert not unchanged


# -- signing and the retry schedule (pure) ---------------------------------------------------


def docs_verifier() -> Callable[..., bool]:
    text = (REPO / "docs" / "alerts.md").read_text(encoding="utf-8")
    block = re.search(r"## Verifying the signature.*?```python\n(.*?)```", text, re.S)
    assert block is not None
    assert len(block.group(1).strip().splitlines()) <= 12  # short enough to paste
    namespace: dict[str, Any] = {}
    exec(block.group(1), namespace)  # the documented verifier, as a receiver would paste it
    verifier: Callable[..., bool] = namespace["verify"]
    return verifier


@pytest.mark.parametrize("verifier", [verify, docs_verifier()], ids=["gateway", "docs"])
def test_the_signature_verifies_and_nothing_else_does(verifier: Callable[..., bool]) -> None:
    body = b'{"event":"alert.opened"}'
    header = sign(SECRET, body, int(T0))
    assert re.fullmatch(r"t=1900000000,v1=[0-9a-f]{64}", header)
    assert verifier(SECRET, header, body, T0 + 10)
    assert not verifier(SECRET, header, body + b" ", T0)  # another body
    assert not verifier("another-secret-0123456789", header, body, T0)
    assert not verifier(SECRET, header, body, T0 + 301)  # too old: a replay
    assert not verifier(SECRET, header.replace("t=1900000000", "t=1900000001"), body, T0)
    assert not verifier(SECRET, "v1=" + header.split("v1=")[1], body, T0)  # no time
    assert not verifier(SECRET, "", body, T0)


def note(attempts: int, created_at: float = T0) -> dict[str, Any]:
    alert = {"uid": "u1", "cause": "delivery.failed:746/sd-koersel"}
    return {"attempts": attempts, "created_at": created_at, "notice": "opened"} | {
        "channel": "webhook",
        "alert": alert,
    }


def test_retries_back_off_exponentially_capped_then_give_up() -> None:
    policy = replace(STEADY, cap=10.0, max_attempts=7)
    waits = [after_attempt(policy, note(n), "HTTP 503", T0).next_attempt_at - T0 for n in range(6)]
    assert waits == [1, 2, 4, 8, 10, 10]
    last = after_attempt(policy, note(6), "HTTP 503", T0)
    assert (last.state, last.event, last.error) == ("given_up", "alert.given_up", "HTTP 503")
    old = after_attempt(STEADY, note(2, created_at=T0 - 3599), "HTTP 503", T0)
    assert old.state == "given_up"  # the next try would be past max_age
    sent = after_attempt(STEADY, note(3), None, T0)
    assert (sent.state, sent.event, sent.detail["attempt"]) == ("sent", "alert.sent", 4)
    retry = after_attempt(STEADY, note(0), "ClientConnectorError", T0)
    assert (retry.state, retry.event) == ("pending", "alert.retry_scheduled")
    assert retry.detail["next_attempt_in_seconds"] == 1.0


# -- the acceptance test (both engines) ------------------------------------------------------


async def test_receiver_down_for_three_tries_gets_the_alert_once_signed_after_backoff(
    make_gateway: Any, settings: Settings, sd_server: TestServer, receiver: Receiver
) -> None:
    receiver.fail_first = 3
    gw = await make_gateway(alerting(settings, receiver), run_dispatcher=False)
    alerts: Alerts = gw.app[APP_ALERTS]
    alerts.clock = clock = Clock(T0)
    sd_server.app[SD_STATE].fault = "client"  # SD refuses it: failed, waits for an operator
    async with dispatching(gw):
        await gw.post(drive())
        await gw.wait_for("R-1", {"failed"})
    assert alerts.nudged  # the dispatcher said so at once
    opened = (await alerts.evaluate())["opened"]
    assert len(opened) == 1
    for wait, expected in [(0, 1), (0.5, 0), (0.5, 1), (1.9, 0), (0.1, 1), (4, 1), (100, 0)]:
        clock.now += wait
        assert await alerts.send_due() == expected, f"at +{clock.now - T0} s"
    statuses = [503, 503, 503, 200]
    assert len(receiver.requests) == len(statuses)
    times = [int(h[SIGNATURE_HEADER].split(",")[0][2:]) for h, _ in receiver.requests]
    assert [t - times[0] for t in times] == [0, 1, 3, 7]  # 1, 2, 4 s apart: the backoff
    assert {h[ID_HEADER] for h, _ in receiver.requests} == {f"{opened[0]}-opened"}
    headers, body = receiver.requests[-1]  # the one that arrived
    assert docs_verifier()(SECRET, headers[SIGNATURE_HEADER], body, T0 + 7)
    alert = json.loads(body)
    assert alert["event"] == "alert.opened" and alert["cause"] == "delivery.failed:746/sd-koersel"
    assert alert["count"] == 1 and alert["deliveries"][0]["report_id"] == "R-1"
    assert alert["opened_at"].startswith("2030-03-17T") and alert["resolved_at"] is None
    assert CPR not in str(receiver.requests)
    audited = [e["event"] for e in await events(gw)]
    assert audited == ["alert.opened"] + ["alert.retry_scheduled"] * 3 + ["alert.sent"]
    clock.now += 3600
    assert await alerts.evaluate() == {"opened": [], "resolved": []}  # still the same cause
    assert await alerts.send_due() == 0 and len(receiver.requests) == 4


async def test_one_alert_per_cause_refreshed_then_resolved_and_a_new_one_when_it_returns(
    make_gateway: Any, settings: Settings, sd_server: TestServer, receiver: Receiver
) -> None:
    gw = await make_gateway(alerting(settings, receiver), run_dispatcher=False)
    alerts: Alerts = gw.app[APP_ALERTS]
    sd_server.app[SD_STATE].fault = "client"
    async with dispatching(gw):
        await gw.post(of("E1", "R-1"))
        await gw.wait_for("R-1", {"failed"})
        first = (await alerts.evaluate())["opened"]
        await gw.post(of("E2", "R-2"))  # the same cause again: the same alert, counted
        await gw.wait_for("R-2", {"failed"})
        assert await alerts.evaluate() == {"opened": [], "resolved": []}
        status, listed = await gw.ops("GET", "alerts")
        assert status == 200 and listed["count"] == 1
        assert listed["alerts"][0]["id"] == first[0]
        assert listed["alerts"][0]["payload"]["count"] == 2
        assert datetime.fromisoformat(listed["alerts"][0]["opened_at"]).tzinfo is not None
        metrics = await (await gw.client.get("/metrics")).text()
        assert 'payroll_gateway_alerts_open{cause="delivery.failed"} 1.0' in metrics
        assert 'payroll_gateway_alerts_open{cause="breaker.open"} 0.0' in metrics
        await alerts.send_due()
        cancel = {"reason": "paid by hand", "filter": {"status": "failed"}}
        status, _ = await gw.ops("POST", "deliveries/cancel", cancel)
        assert status == 200
        done = await alerts.evaluate()
        assert done == {"opened": [], "resolved": first}
        await alerts.send_due()
        assert [b["event"] for b in receiver.bodies()] == ["alert.opened", "alert.resolved"]
        assert receiver.bodies()[1]["resolved_at"] is not None
        assert receiver.requests[1][0][ID_HEADER] == f"{first[0]}-resolved"
        _, listed = await gw.ops("GET", "alerts")
        assert listed["count"] == 0
        _, listed = await gw.ops("GET", "alerts?state=all")
        assert [a["state"] for a in listed["alerts"]] == ["resolved"]
        assert [n["state"] for n in listed["alerts"][0]["notifications"]] == ["sent", "sent"]
        await gw.post(of("E3", "R-3"))  # it comes back: a new alert
        await gw.wait_for("R-3", {"failed"})
        again = (await alerts.evaluate())["opened"]
    assert len(again) == 1 and again != first
    assert (await gw.ops("GET", "alerts?state=maybe"))[0] == 400
    assert (await gw.ops("GET", "alerts", token="nope"))[0] == 401


async def test_two_senders_on_two_store_connections_never_send_the_same_notice(
    settings: Settings, receiver: Receiver
) -> None:
    receiver.delay = 0.02  # the sends overlap
    cfg = alerting(settings, receiver)
    stores = [open_store(cfg.store_url, keys=TEST_KEYS) for _ in range(2)]
    for store in stores:
        await store.open()
    try:
        senders = [Alerts(store, cfg) for store in stores]
        opened = [
            AlertOpen(f"delivery.failed:{m}/sd-koersel", "delivery.failed", {"n": m}, f"u{m}")
            for m in range(100, 130)
        ]
        now = time.time()
        await stores[0].apply_alerts(AlertPlan(opened=opened, channels=("webhook",)), now)
        tried = await asyncio.gather(*(s.send_due() for s in senders * 3))
        assert sum(tried) == 30 and all(n <= 20 for n in tried)
        ids = [h[ID_HEADER] for h, _ in receiver.requests]
        assert sorted(ids) == sorted(f"u{m}-opened" for m in range(100, 130))
        assert await asyncio.gather(*(s.send_due() for s in senders)) == [0, 0]
        listed = await stores[1].list_alerts(open_only=True)
        assert {n["state"] for a in listed for n in a["notifications"]} == {"sent"}
        # a sender that claimed and died: the notice waits for the lease, then goes once
        dead = AlertOpen("delivery.failed:999/sd-koersel", "delivery.failed", {}, "z")
        await stores[0].apply_alerts(AlertPlan(opened=[dead], channels=("webhook",)), now)
        claimed = await stores[0].claim_alert_notifications(time.time(), "dead", 60, 10)
        assert [n["alert"]["uid"] for n in claimed] == ["z"]
        assert await senders[1].send_due() == 0  # leased to the dead one
        senders[1].clock = lambda: time.time() + 61
        assert await senders[1].send_due() == 1
        assert [h[ID_HEADER] for h, _ in receiver.requests].count("z-opened") == 1
    finally:
        for sender in senders:
            await sender.aclose()
        for store in stores:
            await store.aclose()
