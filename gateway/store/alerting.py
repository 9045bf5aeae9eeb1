"""What both engines share for alerts: the records the alert subsystem hands the store, and SQL.

The store only saves what :mod:`gateway.alerts` decided (which causes open, change or
resolve; how a send attempt ended) and answers its questions (the facts per endpoint,
the notifications due). One open alert per cause is the partial unique index of migration 10.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import Status

Row = Mapping[str, Any]

#: the deliveries the alert causes look at (no need to count superseded or cancelled ones)
_FACT_STATES = ",".join(
    f"'{s}'"
    for s in (
        Status.QUEUED,
        Status.IN_FLIGHT,
        Status.RETRY_SCHEDULED,
        Status.IN_DOUBT,
        Status.FAILED,
        Status.DELIVERED,
        Status.CORRECTION_REQUIRED,
    )
)
_DEFERRED = "CASE WHEN deferred_from IS NULL THEN 0 ELSE 1 END"
FACT_GROUPS = (
    f"SELECT municipality, adapter, status, at_risk, {_DEFERRED} AS deferred, COUNT(*) AS n,"
    " MIN(created_at) AS first_created_at, MAX(updated_at) AS last_updated_at"
    f" FROM deliveries WHERE status IN ({_FACT_STATES})"
    f" GROUP BY municipality, adapter, status, at_risk, {_DEFERRED}"
)
#: a few delivery ids per cause (the newest); never more than this many rows are read
SAMPLE_ROWS = 1000
FACT_SAMPLES = (
    "SELECT d.id, d.municipality, d.adapter, d.status, d.at_risk, r.report_id"
    " FROM deliveries d JOIN reports r ON r.id = d.report_pk"
    f" WHERE d.status IN ('{Status.FAILED}', '{Status.IN_DOUBT}') OR d.at_risk = 1"
    f" ORDER BY d.id DESC LIMIT {SAMPLE_ROWS}"
)
OPEN_ALERTS = "SELECT * FROM alerts WHERE resolved_at IS NULL ORDER BY id"
INSERT_ALERT = (
    "INSERT INTO alerts (uid, cause, kind, payload, opened_at, updated_at)"
    " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (cause) WHERE resolved_at IS NULL DO NOTHING"
    " RETURNING id"
)
UPDATE_ALERT = "UPDATE alerts SET payload = ?, updated_at = ? WHERE id = ? AND resolved_at IS NULL"
RESOLVE_ALERT = (
    "UPDATE alerts SET resolved_at = ?, updated_at = ? WHERE id = ? AND resolved_at IS NULL"
    " RETURNING id, uid, cause, kind"
)
INSERT_NOTIFICATION = (
    "INSERT INTO alert_notifications (alert_id, notice, channel, state, created_at,"
    " next_attempt_at) VALUES (?, ?, ?, 'pending', ?, ?)"
)
_DUE = "state = 'pending' AND next_attempt_at <= ? AND (lease_until IS NULL OR lease_until <= ?)"
CLAIM_SQLITE = (
    "UPDATE alert_notifications SET lease_owner = ?, lease_until = ?"
    f" WHERE id IN (SELECT id FROM alert_notifications WHERE {_DUE} ORDER BY id LIMIT ?)"
    " RETURNING id"
)
CLAIM_POSTGRES = (
    "UPDATE alert_notifications SET lease_owner = ?, lease_until = ?"
    f" WHERE id IN (SELECT id FROM alert_notifications WHERE {_DUE} ORDER BY id LIMIT ?"
    " FOR UPDATE SKIP LOCKED) RETURNING id"
)
CLAIMED = (
    "SELECT n.id, n.alert_id, n.notice, n.channel, n.attempts, n.created_at,"
    " a.uid, a.cause, a.kind, a.payload, a.opened_at, a.resolved_at"
    " FROM alert_notifications n JOIN alerts a ON a.id = n.alert_id"
    " WHERE n.lease_owner = ? AND n.id IN ({ids}) ORDER BY n.id"
)
FINISH_NOTIFICATION = (
    "UPDATE alert_notifications SET state = ?, attempts = attempts + 1, next_attempt_at = ?,"
    " last_error = ?, finished_at = ?, lease_owner = NULL, lease_until = NULL"
    " WHERE id = ? AND lease_owner = ? AND state = 'pending'"
)
LIST_ALERTS = "SELECT * FROM alerts {where} ORDER BY id DESC LIMIT ?"
NOTIFICATIONS_OF = (
    "SELECT alert_id, notice, channel, state, attempts, next_attempt_at, last_error, finished_at"
    " FROM alert_notifications WHERE alert_id IN ({ids}) ORDER BY id"
)


@dataclass(frozen=True, slots=True)
class AlertOpen:
    """A cause that has no open alert yet."""

    cause: str
    kind: str
    payload: Mapping[str, Any]
    uid: str


@dataclass(frozen=True, slots=True)
class AlertPlan:
    """What one evaluation changes: alerts to open, payloads to refresh, alerts to resolve."""

    opened: Sequence[AlertOpen] = ()
    updated: Sequence[tuple[int, Mapping[str, Any]]] = ()  # (alert id, new payload)
    resolved: Sequence[int] = ()  # alert ids
    channels: Sequence[str] = ()  # a notification per channel for each opening (and resolution)
    notify_resolved: bool = True

    def __bool__(self) -> bool:
        return bool(self.opened or self.updated or self.resolved)


@dataclass(frozen=True, slots=True)
class SendOutcome:
    """How one send attempt of a notification ended, and its audit event."""

    state: str  # sent | pending (retry at next_attempt_at) | given_up
    next_attempt_at: float
    error: str | None
    event: str  # alert.sent | alert.retry_scheduled | alert.given_up
    detail: Mapping[str, Any] = field(default_factory=dict)


def payload_json(payload: Mapping[str, Any]) -> str:
    return json.dumps(payload, sort_keys=True, separators=(",", ":"))


def alert_view(row: Row) -> dict[str, Any]:
    return {
        "id": row["id"],
        "uid": row["uid"],
        "cause": row["cause"],
        "kind": row["kind"],
        "payload": json.loads(row["payload"]),
        "opened_at": row["opened_at"],
        "updated_at": row["updated_at"],
        "resolved_at": row["resolved_at"],
    }


def claimed_view(row: Row) -> dict[str, Any]:
    view = {k: row[k] for k in ("id", "alert_id", "notice", "channel", "attempts", "created_at")}
    view["alert"] = alert_view({**dict(row), "id": row["alert_id"], "updated_at": row["opened_at"]})
    return view


def notification_view(row: Row) -> dict[str, Any]:
    return {
        k: row[k]
        for k in ("notice", "channel", "state", "attempts", "next_attempt_at", "last_error")
    } | {"finished_at": row["finished_at"]}


def opened_event(plan_open: AlertOpen) -> dict[str, Any]:
    return {"alert": plan_open.uid, "cause": plan_open.cause, "kind": plan_open.kind}


def with_notifications(alerts: list[dict[str, Any]], rows: Sequence[Row]) -> list[dict[str, Any]]:
    by_alert: dict[int, list[dict[str, Any]]] = {}
    for row in rows:
        by_alert.setdefault(row["alert_id"], []).append(notification_view(row))
    return [{**a, "notifications": by_alert.get(a["id"], [])} for a in alerts]
