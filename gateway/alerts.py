"""Alerts that are not lost: causes found in the gateway's state, one open alert per cause,
notifications stored, signed, and retried with backoff until they arrive (or are given up).

The pure part: :func:`causes` (a snapshot of the state → the open causes, each with a stable
key such as ``delivery.failed:746/sd-koersel``), :func:`plan` (open alerts + causes → what
to open, refresh and resolve), :func:`sign`/:func:`verify` and :func:`after_attempt` (the
retry schedule, tenacity's strategies via :mod:`gateway.retry`, computed without sleeping).
:class:`Alerts` does the I/O: it evaluates periodically and when nudged (the dispatcher
nudges it when it settles a delivery as failed or in doubt, or opens a breaker), and its
sender claims due notifications under a lease, so two processes never send the same one.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import smtplib
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage
from typing import Any, Protocol

import aiohttp

from .endpoints import Endpoints, Key
from .privacy import mask_cpr
from .retry import exhausted, next_delay
from .settings import AlertSettings, RetryPolicy, Settings, SmtpSettings
from .sources import PullerState
from .store import Status, Store
from .store.alerting import AlertOpen, AlertPlan, SendOutcome

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Payroll-Gateway-Signature"
ID_HEADER = "X-Payroll-Gateway-Alert-Id"
KINDS = (
    "delivery.failed",
    "delivery.in_doubt",
    "breaker.open",
    "endpoint.paused_with_work",
    "endpoint.no_progress",
    "source.failing",
    "deliveries.at_risk",
)
SAMPLE_IDS = 5  # delivery ids named in one alert (never a CPR: ids and report ids only)
SOURCE_FAILURES = 3  # failed pulls in a row before a source is "failing"
SEND_POLL_SECONDS = 1.0
EVALUATION_GAP_SECONDS = 2.0  # at most one evaluation this often, however often nudged
SEND_BATCH = 20
LEASE_MARGIN_SECONDS = 30.0
_WAITING = (Status.QUEUED, Status.IN_FLIGHT, Status.RETRY_SCHEDULED)


# -- the causes (pure) ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EndpointFacts:
    """One endpoint's deliveries as the causes see them."""

    counts: Mapping[str, int] = field(default_factory=dict)  # by stored state
    at_risk: int = 0  # flagged, not yet done
    waiting: int = 0  # queued, in flight or scheduled for a retry (deferred ones included)
    due: int = 0  # of those, the ones not deferred to an opening
    due_since: float | None = None  # when the oldest of the due ones was created
    last_delivered_at: float | None = None
    samples: Mapping[str, tuple[dict[str, Any], ...]] = field(default_factory=dict)  # by kind


@dataclass(frozen=True, slots=True)
class SourceFacts:
    municipality: str
    name: str
    failures: int  # failed pulls in a row
    last_pulled_at: float | None


@dataclass(frozen=True, slots=True)
class Snapshot:
    now: float
    endpoints: Mapping[Key, EndpointFacts] = field(default_factory=dict)
    paused: Mapping[Key, str] = field(default_factory=dict)  # the operator's reason
    breakers: Mapping[Key, str] = field(default_factory=dict)  # open | half_open
    sources: Sequence[SourceFacts] = ()
    no_progress_seconds: float = 3600.0


@dataclass(frozen=True, slots=True)
class Cause:
    key: str
    kind: str
    payload: Mapping[str, Any]


def cause_key(kind: str, municipality: str, subject: str) -> str:
    return f"{kind}:{municipality}/{subject}"


def causes(s: Snapshot) -> dict[str, Cause]:
    """Every cause that is open in the snapshot, by its key."""
    found: list[Cause] = []
    for key in sorted(set(s.endpoints) | set(s.paused) | set(s.breakers)):
        found.extend(_endpoint_causes(key, s.endpoints.get(key, EndpointFacts()), s))
    for source in s.sources:
        if source.failures >= SOURCE_FAILURES:
            found.append(_source_failing(source))
    return {c.key: c for c in found}


def _endpoint_causes(key: Key, f: EndpointFacts, s: Snapshot) -> Iterable[Cause]:
    failed, doubt = f.counts.get(Status.FAILED, 0), f.counts.get(Status.IN_DOUBT, 0)
    if failed:
        yield _cause("delivery.failed", key, failed, f, f"{_n(failed)} failed")
    if doubt:
        yield _cause("delivery.in_doubt", key, doubt, f, f"{_n(doubt)} in doubt")
    breaker = s.breakers.get(key)
    if breaker == "open" or (breaker == "half_open" and f.waiting):
        yield _cause("breaker.open", key, f.waiting, f, f"the circuit breaker is {breaker}")
    if key in s.paused and f.waiting:
        text = f"paused ({s.paused[key]}) with {_n(f.waiting)} waiting"
        yield _cause("endpoint.paused_with_work", key, f.waiting, f, text)
    idle = _idle_since(f)
    if key not in s.paused and idle is not None and s.now - idle >= s.no_progress_seconds:
        minutes = int((s.now - idle) // 60)
        text = f"nothing delivered for {minutes} min while {_n(f.due)} due"
        yield _cause("endpoint.no_progress", key, f.due, f, text, since=_iso(idle))
    if f.at_risk:
        text = f"{_n(f.at_risk)} at risk of missing the payroll cut-off"
        yield _cause("deliveries.at_risk", key, f.at_risk, f, text)


def _idle_since(f: EndpointFacts) -> float | None:
    """Since when work has been due without anything being delivered (None: no work due)."""
    if not f.due or f.due_since is None:
        return None
    return max(f.due_since, f.last_delivered_at or f.due_since)


def _cause(kind: str, key: Key, count: int, f: EndpointFacts, summary: str, **extra: Any) -> Cause:
    payload = {
        "kind": kind,
        "municipality": key[0],
        "adapter": key[1],
        "count": count,
        "deliveries": list(f.samples.get(kind, ())),
        "summary": f"{key[0]}/{key[1]}: {summary}",
        **extra,
    }
    return Cause(cause_key(kind, *key), kind, payload)


def _source_failing(source: SourceFacts) -> Cause:
    kind = "source.failing"
    payload = {
        "kind": kind,
        "municipality": source.municipality,
        "source": source.name,
        "count": source.failures,
        "summary": f"{source.municipality}/{source.name}: {source.failures} failed pulls in a row",
        "last_pulled": _iso(source.last_pulled_at) if source.last_pulled_at else None,
    }
    return Cause(cause_key(kind, source.municipality, source.name), kind, payload)


def endpoint_facts(
    groups: Iterable[Mapping[str, Any]], samples: Iterable[Mapping[str, Any]]
) -> dict[Key, EndpointFacts]:
    """The store's grouped counts and sample rows (``Store.alert_facts``), per endpoint."""
    acc: dict[Key, dict[str, Any]] = {}
    for g in groups:
        e = acc.setdefault((g["municipality"], g["adapter"]), {"counts": {}, "samples": {}})
        n, status = int(g["n"]), g["status"]
        e["counts"][status] = e["counts"].get(status, 0) + n
        if g["at_risk"] and status != Status.DELIVERED:
            e["at_risk"] = e.get("at_risk", 0) + n
        if status in _WAITING:
            e["waiting"] = e.get("waiting", 0) + n
            if not g["deferred"]:
                e["due"] = e.get("due", 0) + n
                e["due_since"] = _min(e.get("due_since"), float(g["first_created_at"]))
        if status == Status.DELIVERED:
            e["last_delivered_at"] = _max(e.get("last_delivered_at"), float(g["last_updated_at"]))
    for row in samples:
        e = acc.setdefault((row["municipality"], row["adapter"]), {"counts": {}, "samples": {}})
        for kind in _sample_kinds(row):
            picked = e["samples"].setdefault(kind, [])
            if len(picked) < SAMPLE_IDS:
                picked.append({"id": row["id"], "report_id": row["report_id"]})
    return {
        key: EndpointFacts(**{**e, "samples": {k: tuple(v) for k, v in e["samples"].items()}})
        for key, e in acc.items()
    }


def _sample_kinds(row: Mapping[str, Any]) -> list[str]:
    kinds = {Status.FAILED: ["delivery.failed"], Status.IN_DOUBT: ["delivery.in_doubt"]}
    return kinds.get(row["status"], []) + (["deliveries.at_risk"] if row["at_risk"] else [])


def plan(
    open_alerts: Sequence[Mapping[str, Any]],
    wanted: Mapping[str, Cause],
    observes: Callable[[str], bool],
    channels: Sequence[str],
    new_uid: Callable[[], str] = lambda: uuid.uuid4().hex,
) -> AlertPlan:
    """Open what has no open alert, refresh changed payloads, resolve what went away.

    Only causes this process ``observes`` are resolved (a process that does not pull a
    source cannot tell that the source works again).
    """
    by_cause = {a["cause"]: a for a in open_alerts}
    return AlertPlan(
        opened=[
            AlertOpen(key, c.kind, c.payload, new_uid())
            for key, c in sorted(wanted.items())
            if key not in by_cause
        ],
        updated=[
            (a["id"], wanted[key].payload)
            for key, a in by_cause.items()
            if key in wanted and a["payload"] != _plain(wanted[key].payload)
        ],
        resolved=[a["id"] for key, a in by_cause.items() if key not in wanted and observes(key)],
        channels=tuple(channels),
    )


# -- signing and retrying (pure) -------------------------------------------------------------


def sign(secret: str, body: bytes, timestamp: int) -> str:
    """``t=<unix>,v1=<hex HMAC-SHA256 of "<t>.<body>">``"""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


def verify(secret: str, header: str, body: bytes, now: float, tolerance: float = 300) -> bool:
    """True when ``header`` signs ``body`` with ``secret`` and is at most ``tolerance`` s old."""
    parts = dict(p.split("=", 1) for p in header.split(",") if "=" in p)
    if not parts.get("t", "").isdigit() or abs(now - int(parts["t"])) > tolerance:
        return False
    return hmac.compare_digest(sign(secret, body, int(parts["t"])), header)


def after_attempt(
    policy: RetryPolicy, note: Mapping[str, Any], error: str | None, now: float
) -> SendOutcome:
    """The outcome of one send attempt of the notification ``note`` (``error`` None: sent)."""
    attempts = int(note["attempts"]) + 1
    detail = {
        "alert": note["alert"]["uid"],
        "cause": note["alert"]["cause"],
        "notice": note["notice"],
        "channel": note["channel"],
        "attempt": attempts,
    }
    if error is None:
        return SendOutcome("sent", now, None, "alert.sent", detail)
    delay = next_delay(policy, attempts)
    if exhausted(policy, attempts, now + delay - float(note["created_at"])):
        return SendOutcome("given_up", now, error, "alert.given_up", {**detail, "error": error})
    retry = {**detail, "error": error, "next_attempt_in_seconds": round(delay, 3)}
    return SendOutcome("pending", now + delay, error, "alert.retry_scheduled", retry)


def notification_body(note: Mapping[str, Any]) -> bytes:
    """The JSON a receiver gets: the alert's payload, its id, the notice, ISO times."""
    alert = note["alert"]
    body = {
        **alert["payload"],
        "alert_id": alert["uid"],
        "event": f"alert.{note['notice']}",
        "cause": alert["cause"],
        "kind": alert["kind"],
        "opened_at": _iso(alert["opened_at"]),
        "resolved_at": _iso(alert["resolved_at"]) if alert["resolved_at"] else None,
    }
    # the last guard of "never a CPR": whatever a payload quotes leaves masked
    return mask_cpr(json.dumps(body, sort_keys=True)).encode()


def notification_id(note: Mapping[str, Any]) -> str:
    """The same on every retry of one notification (receivers dedupe on it)."""
    return f"{note['alert']['uid']}-{note['notice']}"


# -- channels ---------------------------------------------------------------------------------


class Channel(Protocol):
    async def send(self, note: Mapping[str, Any], now: float) -> str | None:
        """Deliver one notification; None when it arrived, else the error (no secret in it)."""

    async def aclose(self) -> None: ...


class Webhook:
    """A signed JSON POST to ``[alerts] url``; any 2xx answer means it arrived."""

    def __init__(self, url: str, secret: str | None, timeout: float) -> None:
        self.url, self.secret, self.timeout = url, secret, timeout
        self._session: aiohttp.ClientSession | None = None

    async def send(self, note: Mapping[str, Any], now: float) -> str | None:
        body = notification_body(note)
        headers = {"Content-Type": "application/json", ID_HEADER: notification_id(note)}
        if self.secret is not None:
            headers[SIGNATURE_HEADER] = sign(self.secret, body, int(now))
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        try:
            async with self._session.post(self.url, data=body, headers=headers) as resp:
                return None if 200 <= resp.status < 300 else f"HTTP {resp.status}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            return exc.__class__.__name__

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class Email:
    """The notification as an e-mail (stdlib ``smtplib`` in a thread)."""

    def __init__(self, smtp: SmtpSettings) -> None:
        self.smtp = smtp

    async def send(self, note: Mapping[str, Any], now: float) -> str | None:
        message = email_message(self.smtp, note)
        try:
            await asyncio.to_thread(self._send, message)
        except (smtplib.SMTPException, OSError) as exc:
            return exc.__class__.__name__
        return None

    def _send(self, message: EmailMessage) -> None:
        s = self.smtp
        with smtplib.SMTP(s.host, s.port, timeout=s.timeout) as client:
            if s.starttls:
                client.starttls()
            if s.username is not None and s.password is not None:
                client.login(s.username, s.password)
            client.send_message(message)

    async def aclose(self) -> None:
        return None


def email_message(smtp: SmtpSettings, note: Mapping[str, Any]) -> EmailMessage:
    """The notice as a plain-text e-mail: the JSON body, indented (no signature: the mail
    system's own transport security and sender checks apply)."""
    payload = json.loads(notification_body(note))
    message = EmailMessage()
    state = "resolved" if note["notice"] == "resolved" else "alert"
    message["Subject"] = f"[payroll-gateway] {state}: {payload.get('summary', payload['cause'])}"
    message["From"], message["To"] = smtp.sender, ", ".join(smtp.to)
    message[ID_HEADER] = notification_id(note)
    message.set_content(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    return message


def build_channels(alerts: AlertSettings) -> dict[str, Channel]:
    channels: dict[str, Channel] = {}
    if alerts.url:
        channels["webhook"] = Webhook(alerts.url, alerts.secret, alerts.timeout)
    if alerts.smtp is not None:
        channels["email"] = Email(alerts.smtp)
    return channels


# -- the service ------------------------------------------------------------------------------


class Alerts:
    """Evaluates the causes (periodically, and when nudged) and sends the notifications."""

    def __init__(
        self,
        store: Store,
        settings: Settings,
        endpoints: Endpoints | None = None,
        sources: Callable[[], Sequence[PullerState]] = lambda: (),
        clock: Callable[[], float] = time.time,
        channels: Mapping[str, Channel] | None = None,
    ) -> None:
        self.store, self.settings, self.endpoints = store, settings, endpoints
        self.sources, self.clock = sources, clock
        self.channels = dict(channels) if channels is not None else build_channels(settings.alerts)
        self.owner = f"alerts-{uuid.uuid4().hex[:12]}"
        self._nudged = asyncio.Event()
        self._send_now = asyncio.Event()

    def nudge(self) -> None:
        """Something changed (a delivery failed, a breaker opened): evaluate soon."""
        self._nudged.set()

    @property
    def nudged(self) -> bool:
        """A nudge is waiting for the evaluation loop."""
        return self._nudged.is_set()

    async def snapshot(self, now: float) -> Snapshot:
        groups, samples = await self.store.alert_facts()
        breakers = {key: "open" for key in await self.store.breakers_open(now)}
        for endpoint in self.endpoints or ():
            if endpoint.breaker.state != "closed":
                breakers.setdefault(endpoint.key, str(endpoint.breaker.state))
        sources = [
            SourceFacts(s.municipality, s.name, s.failures, s.last_pulled_at)
            for s in self.sources()
        ]
        return Snapshot(
            now=now,
            endpoints=endpoint_facts(groups, samples),
            paused=await self.store.paused_endpoints(),
            breakers=breakers,
            sources=sources,
            no_progress_seconds=self.settings.alerts.no_progress_minutes * 60,
        )

    async def evaluate(self) -> dict[str, list[str]]:
        """Open, refresh and resolve alerts now; the alert ids (uids) opened and resolved."""
        now = self.clock()
        snapshot = await self.snapshot(now)
        pulled = {cause_key("source.failing", s.municipality, s.name) for s in snapshot.sources}
        configured = {
            cause_key("source.failing", m, name)
            for m, tenant in self.settings.tenants.items()
            for name in tenant.sources
        }

        def observes(key: str) -> bool:
            """Source causes: only the process pulling it knows (a removed source: any)."""
            return not key.startswith("source.failing:") or key in pulled or key not in configured

        current = await self.store.open_alerts()
        change = plan(current, causes(snapshot), observes, tuple(self.channels))
        if not change:
            return {"opened": [], "resolved": []}
        done = await self.store.apply_alerts(change, now)
        for new in change.opened:
            if new.uid in done["opened"]:
                fields = {"alert": new.uid, "cause": new.cause}
                log.warning("alert opened: %s", new.payload.get("summary"), extra=fields)
        for alert in current:
            if alert["uid"] in done["resolved"]:
                log.info("alert resolved: %s", alert["cause"], extra={"alert": alert["uid"]})
        if done["opened"] or done["resolved"]:
            self._send_now.set()
        return done

    async def send_due(self) -> int:
        """Send every due notification once (claimed under a lease); how many were tried."""
        now = self.clock()
        lease = self.settings.alerts.timeout + LEASE_MARGIN_SECONDS
        notes = await self.store.claim_alert_notifications(now, self.owner, lease, SEND_BATCH)
        for note in notes:
            await self._send_one(note)
        return len(notes)

    async def _send_one(self, note: Mapping[str, Any]) -> None:
        channel = self.channels.get(note["channel"])
        error = "channel not configured" if channel is None else None
        if channel is not None:
            error = await channel.send(note, self.clock())
        now = self.clock()
        outcome = after_attempt(self.settings.alerts.retry, note, error, now)
        await self.store.finish_alert_notification(note["id"], self.owner, outcome, now)
        fields = {"alert": note["alert"]["uid"], "channel": note["channel"]}
        if outcome.state == "sent":
            log.info("alert notification sent: %s", note["alert"]["cause"], extra=fields)
        elif outcome.state == "given_up":
            log.error("alert notification given up: %s", error, extra=fields)
        else:
            log.warning("alert notification failed, retrying: %s", error, extra=fields)

    async def run(self) -> None:
        """Evaluate now, then every ``at_risk_check_seconds`` or when nudged."""
        while True:
            started = time.monotonic()
            try:
                await self.evaluate()
            except Exception:
                log.exception("evaluating alerts failed; trying again at the next interval")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._nudged.wait(), self.settings.at_risk_check_seconds)
            # a burst of failures is one evaluation, not one per delivery
            await asyncio.sleep(max(0.0, EVALUATION_GAP_SECONDS - (time.monotonic() - started)))
            self._nudged.clear()

    async def run_sender(self) -> None:
        while True:
            try:
                while await self.send_due() == SEND_BATCH:
                    pass
            except Exception:
                log.exception("sending alert notifications failed; trying again shortly")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._send_now.wait(), SEND_POLL_SECONDS)
            self._send_now.clear()

    async def aclose(self) -> None:
        for channel in self.channels.values():
            await channel.aclose()


def _plain(payload: Mapping[str, Any]) -> Any:
    """A payload as it reads back from the store (JSON)."""
    return json.loads(json.dumps(payload, sort_keys=True))


def _n(count: int) -> str:
    return f"{count} delivery" if count == 1 else f"{count} deliveries"


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds")


def _min(a: float | None, b: float) -> float:
    return b if a is None else min(a, b)


def _max(a: float | None, b: float) -> float:
    return b if a is None else max(a, b)
