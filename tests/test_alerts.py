"""Alerts: causes from the gateway's state, one open alert per cause, signed notifications
retried with backoff until they arrive, never sent twice, resolved when the cause is gone."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from email import message_from_bytes
from email.message import EmailMessage
from email.policy import default as email_policy
from pathlib import Path
from types import MappingProxyType
from typing import Any
from zoneinfo import ZoneInfo

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
from gateway.errors import ConfigError
from gateway.keys import APP_ALERTS, APP_WATCH
from gateway.settings import (
    AlertSettings,
    BreakerPolicy,
    Operator,
    PullSource,
    RetryPolicy,
    Settings,
    SmtpSettings,
    hash_api_key,
    load,
)
from gateway.simulators import SimulatorOptions
from gateway.simulators import os2indberetning as os2_sim
from gateway.simulators.sd import STATE as SD_STATE
from gateway.sources.os2indberetning import Os2Indberetning
from gateway.store import open_store
from gateway.store.alerting import AlertOpen, AlertPlan
from tests.conftest import TEST_KEYS, Gateway, drive
from tests.test_engine import of, with_endpoint

REPO = Path(__file__).resolve().parent.parent
SECRET = "alert-test-secret-0123456789"
CPR = "0101901234"  # the test report's employee: never in an alert
T0 = 1_900_000_000.0
CPH = ZoneInfo("Europe/Copenhagen")
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


def detail(event: dict[str, Any]) -> Any:
    """An audit event's detail (the SQLite engine returns it as JSON text)."""
    value = event["detail"]
    return json.loads(value) if isinstance(value, str) else value


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
    make_gateway: Any,
    settings: Settings,
    sd_server: TestServer,
    receiver: Receiver,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.alerts")
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
    logged = [r for r in caplog.records if r.name == "gateway.alerts"]
    assert [r.levelname for r in logged] == ["WARNING"] * 4 + ["INFO"]  # opened, 3 retries, sent
    assert {getattr(r, "alert", None) for r in logged} == {opened[0]}
    assert CPR not in caplog.text
    clock.now += 3600
    assert await alerts.evaluate() == {"opened": [], "resolved": []}  # still the same cause
    assert await alerts.send_due() == 0 and len(receiver.requests) == 4


async def test_one_alert_per_cause_refreshed_then_resolved_and_a_new_one_when_it_returns(
    make_gateway: Any, settings: Settings, sd_server: TestServer, receiver: Receiver
) -> None:
    viewer = Operator("v840", hash_api_key("token-840"), "viewer", frozenset({"840"}))
    cfg = replace(settings, operators={**settings.operators, "v840": viewer})
    gw = await make_gateway(alerting(cfg, receiver), run_dispatcher=False)
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
    assert (await gw.ops("GET", "alerts?limit=0"))[0] == 400
    assert (await gw.ops("GET", "alerts", token="nope"))[0] == 401
    status, listed = await gw.ops("GET", "alerts?state=all", token="token-840")
    assert status == 200 and listed["count"] == 0  # 746's alerts are not 840's to see
    assert len((await gw.ops("GET", "alerts?state=all"))[1]["alerts"]) == 2


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


async def test_a_notice_nobody_takes_is_given_up_after_the_policy_and_audited(
    store_url: str, settings: Settings, receiver: Receiver
) -> None:
    receiver.fail_first = 100
    cfg = alerting(settings, receiver, retry=replace(STEADY, max_attempts=2))
    store = open_store(store_url, keys=TEST_KEYS)
    await store.open()
    sender = Alerts(store, cfg, clock=(clock := Clock(time.time())))
    try:
        opened = AlertOpen("delivery.failed:746/sd-koersel", "delivery.failed", {}, "g1")
        await store.apply_alerts(AlertPlan(opened=[opened], channels=("webhook",)), clock.now)
        assert await sender.send_due() == 1
        clock.now += 1
        assert await sender.send_due() == 1
        clock.now += 3600
        assert await sender.send_due() == 0 and len(receiver.requests) == 2
        [alert] = await store.list_alerts(open_only=True)
        [notice] = alert["notifications"]
        assert (notice["state"], notice["attempts"], notice["last_error"]) == (
            "given_up",
            2,
            "HTTP 503",
        )
        audited = [e for e in await store.audit_chain() if e["event"].startswith("alert.")]
        assert [e["event"] for e in audited] == [
            "alert.opened",
            "alert.retry_scheduled",
            "alert.given_up",
        ]
        assert detail(audited[-1])["error"] == "HTTP 503"
    finally:
        await sender.aclose()
        await store.aclose()


# -- every kind of cause, opened by a real scenario -----------------------------------------


def with_vendor(settings: Settings, **changes: Any) -> Settings:
    old = settings.tenants["746"]
    vendors = {**old.vendors, "sd-koersel": replace(old.vendors["sd-koersel"], **changes)}
    tenants = {**settings.tenants, "746": replace(old, vendors=MappingProxyType(vendors))}
    return replace(settings, tenants=tenants)


async def open_causes(gw: Gateway) -> set[str]:
    return {a["cause"] for a in await gw.store.open_alerts()}


async def test_a_request_that_times_out_opens_an_in_doubt_alert(
    make_gateway: Any, settings: Settings, sd_server: TestServer
) -> None:
    cfg = alerting(with_vendor(settings, read_timeout=0.3), None)
    gw = await make_gateway(cfg, run_dispatcher=False)
    sd_server.app[SD_STATE].fault = "timeout"  # no answer: it may have been registered
    async with dispatching(gw):
        await gw.post(drive())
        await gw.wait_for("R-1", {"in_doubt"})
    assert gw.app[APP_ALERTS].nudged
    await gw.app[APP_ALERTS].evaluate()
    assert await open_causes(gw) == {"delivery.in_doubt:746/sd-koersel"}


async def test_an_open_breaker_opens_an_alert_resolved_once_it_closes(
    make_gateway: Any, settings: Settings, sd_server: TestServer
) -> None:
    breaker = BreakerPolicy(window_seconds=60, min_calls=3, failure_rate=0.5, open_seconds=0.3)
    gw = await make_gateway(alerting(with_endpoint(settings, breaker=breaker), None))
    alerts: Alerts = gw.app[APP_ALERTS]  # its own loops run: nudged by the dispatcher
    sd_server.app[SD_STATE].fault = "server"
    await gw.post({"reports": [of(f"E{i}", f"R-{i}") for i in range(6)]})
    await until(lambda: has_cause(gw, "breaker.open:746/sd-koersel"), 10)
    sd_server.app[SD_STATE].fault = None
    for i in range(6):
        await gw.wait_for(f"R-{i}", {"delivered"})
    await alerts.evaluate()
    assert await open_causes(gw) == set()
    kinds = [detail(e)["kind"] for e in await events(gw, "alert.resolved")]
    assert "breaker.open" in kinds


async def has_cause(gw: Gateway, key: str) -> bool:
    return key in await open_causes(gw)


async def test_a_paused_endpoint_with_work_opens_an_alert_not_a_no_progress_one(
    make_gateway: Any, settings: Settings, sd_server: TestServer
) -> None:
    gw = await make_gateway(alerting(settings, None, no_progress_minutes=1), run_dispatcher=False)
    alerts: Alerts = gw.app[APP_ALERTS]
    alerts.clock = lambda: time.time() + 3600  # long past no_progress_minutes
    async with dispatching(gw):
        pause = {"reason": "SD maintenance"}
        assert (await gw.ops("POST", "endpoints/746/sd-koersel/pause", pause))[0] == 200
        await alerts.evaluate()
        assert await open_causes(gw) == set()  # paused, nothing waiting
        await gw.post(drive())
        await alerts.evaluate()
        assert await open_causes(gw) == {"endpoint.paused_with_work:746/sd-koersel"}
        assert (await gw.ops("POST", "endpoints/746/sd-koersel/resume", pause))[0] == 200
        await gw.wait_for("R-1", {"delivered"})
    await alerts.evaluate()
    assert await open_causes(gw) == set()


async def test_work_due_and_nothing_delivered_for_the_configured_time_opens_an_alert(
    make_gateway: Any, settings: Settings, sd_server: TestServer
) -> None:
    gw = await make_gateway(alerting(settings, None, no_progress_minutes=1), run_dispatcher=False)
    alerts: Alerts = gw.app[APP_ALERTS]
    sd_server.app[SD_STATE].fault = "unavailable"  # 503, Retry-After 120 s
    async with dispatching(gw):
        await gw.post(drive())
        await gw.wait_for("R-1", {"retry_scheduled"})
    await alerts.evaluate()
    assert await open_causes(gw) == set()  # due for less than a minute
    alerts.clock = lambda: time.time() + 61
    await alerts.evaluate()
    assert await open_causes(gw) == {"endpoint.no_progress:746/sd-koersel"}
    [alert] = await gw.store.open_alerts()
    assert alert["payload"]["count"] == 1 and "nothing delivered" in alert["payload"]["summary"]


async def test_a_failing_pull_source_opens_an_alert_only_its_puller_resolves(
    make_gateway: Any, settings: Settings, aiohttp_server: Any
) -> None:
    key = "os2-alert-test-key-0001"
    os2 = await aiohttp_server(os2_sim.build_app(SimulatorOptions(api_key=key)))
    os2.app[os2_sim.STATE].fault = "server"
    source = PullSource("os2indberetning", str(os2.make_url("/api/")), key, interval_seconds=60)
    tenant = replace(settings.tenants["746"], sources={"os2indberetning": source})
    cfg = alerting(replace(settings, tenants={**settings.tenants, "746": tenant}), None)
    gw = await make_gateway(cfg, run_dispatcher=False)  # its pullers stay stopped
    puller = Os2Indberetning(tenant, source, gw.store, {}, lambda: None)
    mine = Alerts(gw.store, cfg, sources=lambda: [puller])
    other = Alerts(gw.store, cfg)  # a process that does not pull it
    try:
        for expected in (set(), set(), {"source.failing:746/os2indberetning"}):
            await puller.pull_safely()
            await mine.evaluate()
            assert await open_causes(gw) == expected
        os2.app[os2_sim.STATE].fault = None
        assert await puller.pull_safely() is not None and puller.failures == 0
        assert (await other.evaluate())["resolved"] == []
        assert len((await mine.evaluate())["resolved"]) == 1
    finally:
        await puller.aclose()


async def test_deliveries_at_risk_open_an_alert_when_the_watch_flags_them(
    make_gateway: Any, settings: Settings, sd_server: TestServer
) -> None:
    cutoff = (datetime.now(CPH) + timedelta(minutes=2)).replace(second=0, microsecond=0)
    rule = {"rule": "business day 5 at 12:00", "dates": [cutoff.strftime("%Y-%m-%dT%H:%M")]}
    gw = await make_gateway(
        alerting(with_endpoint(settings, cutoff=rule), None), run_dispatcher=False
    )
    alerts: Alerts = gw.app[APP_ALERTS]
    sd_server.app[SD_STATE].fault = "unavailable"  # Retry-After 120 s: after the cut-off
    async with dispatching(gw):
        await gw.post(drive())
        await gw.wait_for("R-1", {"retry_scheduled"})
    await alerts.evaluate()
    assert await open_causes(gw) == set()
    assert len(await gw.app[APP_WATCH].check()) == 1
    assert alerts.nudged
    await alerts.evaluate()
    assert await open_causes(gw) == {"deliveries.at_risk:746/sd-koersel"}
    [alert] = await gw.store.open_alerts()
    assert alert["payload"]["deliveries"][0]["report_id"] == "R-1"


# -- e-mail -------------------------------------------------------------------------------------


class Mailbox:
    def __init__(self) -> None:
        self.messages: list[EmailMessage] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append(message_from_bytes(envelope.content, policy=email_policy))
        return "250 OK"


def smtp_login(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> Any:
    from aiosmtpd.smtp import AuthResult, LoginPassword

    ok = isinstance(data, LoginPassword) and (data.login, data.password) == (b"gw", b"pw-1")
    return AuthResult(success=ok)


async def test_alerts_by_e_mail_are_retried_until_the_smtp_server_takes_them(
    store_url: str, settings: Settings
) -> None:
    from aiosmtpd.controller import Controller

    from bench.reliability import free_port

    port = free_port()
    smtp = SmtpSettings(
        "127.0.0.1", port, "gateway@example.dk", ("ops@example.dk",), False, "gw", "pw-1", 2.0
    )
    cfg = alerting(settings, None, smtp=smtp)
    assert "pw-1" not in repr(cfg)
    store = open_store(store_url, keys=TEST_KEYS)
    await store.open()
    sender = Alerts(store, cfg, clock=(clock := Clock(time.time())))
    mailbox = Mailbox()
    controller = Controller(
        mailbox, hostname="127.0.0.1", port=port, authenticator=smtp_login, auth_require_tls=False
    )
    try:
        cause = "delivery.failed:746/sd-koersel"
        payload = {"summary": "746/sd-koersel: 2 deliveries failed", "municipality": "746"}
        opened = AlertOpen(cause, "delivery.failed", payload, "m1")
        await store.apply_alerts(AlertPlan(opened=[opened], channels=("email",)), clock.now)
        assert await sender.send_due() == 1  # nobody listens yet: retried in 1 s
        controller.start()
        clock.now += 1
        assert await sender.send_due() == 1
        clock.now += 100
        assert await sender.send_due() == 0
        [mail] = mailbox.messages
        assert mail["Subject"] == "[payroll-gateway] alert: 746/sd-koersel: 2 deliveries failed"
        assert (mail["From"], mail["To"], mail[ID_HEADER]) == (
            "gateway@example.dk",
            "ops@example.dk",
            "m1-opened",
        )
        content = json.loads(mail.get_content())
        assert content["cause"] == cause and content["event"] == "alert.opened"
        audited = [e["event"] for e in await store.audit_chain()]
        assert audited[-2:] == ["alert.retry_scheduled", "alert.sent"]
    finally:
        with contextlib.suppress(Exception):
            controller.stop()
        await sender.aclose()
        await store.aclose()


# -- settings -----------------------------------------------------------------------------------


def config(tmp_path: Path, alerts: str) -> Path:
    from tests.test_settings import BASE, write

    return write(tmp_path, BASE + alerts)


def test_the_url_alone_still_configures_alerts(tmp_path: Path) -> None:
    cfg = load(config(tmp_path, '[alerts]\nurl = "https://mon.example/hook"\n'), {"SD_PW": "x"})
    assert cfg.alerts.url == cfg.alert_url == "https://mon.example/hook"
    assert cfg.alerts.secret is None and cfg.alerts.channels == ("webhook",)


def test_the_full_alert_settings_and_secrets_never_shown(tmp_path: Path) -> None:
    (tmp_path / "alert-secret").write_text("from-a-file-0123456789\n")
    text = """
[alerts]
url = "https://mon.example/hook"
secret_file = "alert-secret"
no_progress_minutes = 15
[alerts.retry]
first_delay_seconds = 5
max_attempts = 8
[alerts.smtp]
host = "smtp.example.dk"
port = 587
from = "gw@example.dk"
to = ["a@example.dk", "b@example.dk"]
starttls = true
username = "gw"
password_env = "SMTP_PW"
"""
    cfg = load(config(tmp_path, text), {"SD_PW": "x", "SMTP_PW": "smtp-secret-value"})
    a = cfg.alerts
    assert (a.secret, a.no_progress_minutes, a.retry.first_delay, a.retry.max_attempts) == (
        "from-a-file-0123456789",
        15.0,
        5.0,
        8,
    )
    assert a.smtp is not None and a.smtp.to == ("a@example.dk", "b@example.dk")
    assert a.smtp.password == "smtp-secret-value" and a.smtp.starttls
    assert a.channels == ("webhook", "email")
    assert "from-a-file" not in repr(cfg) and "smtp-secret-value" not in repr(cfg)


SMTP = '[alerts.smtp]\nhost = "h"\nfrom = "a@b.dk"\nto = ["c@d.dk"]\n'


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[alerts]\nsecret = "inline"\n', "alerts.secret: secrets are not accepted inline"),
        ('[alerts]\nurl = "ftp://x"\n', "alerts.url: expected an http(s) URL"),
        ('[alerts]\nsecret_env = "NOPE"\n', "alerts.secret_env: environment variable NOPE"),
        ('[alerts]\nsecret_env = "SHORT"\n', "alerts.secret_env: the secret must be at least"),
        ("[alerts]\nno_progress_minutes = 0\n", "alerts.no_progress_minutes: must be positive"),
        ("[alerts]\nbogus = 1\n", "alerts.bogus: unknown setting"),
        ('[alerts.retry]\nmultiplier = "x"\n', "alerts.retry.multiplier: expected"),
        ("[alerts.smtp]\nport = 25\n", "alerts.smtp.host: required"),
        (SMTP.replace("a@b.dk", "nope"), "alerts.smtp.from: expected an e-mail address"),
        (SMTP.replace('to = ["c@d.dk"]', "to = []"), "alerts.smtp.to: required"),
        (SMTP + 'password = "x"\n', "alerts.smtp.password: secrets are not accepted inline"),
        (SMTP + 'username = "u"\n', "alerts.smtp.username: give both"),
        (SMTP + "port = 70000\n", "alerts.smtp.port: expected 1-65535"),
    ],
)
def test_alert_settings_errors_are_one_line_naming_the_key(
    tmp_path: Path, text: str, message: str
) -> None:
    with pytest.raises(ConfigError) as err:
        load(config(tmp_path, text), {"SD_PW": "x", "SHORT": "abc"})
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
    assert "inline" not in str(err.value).split(":", 1)[0]
