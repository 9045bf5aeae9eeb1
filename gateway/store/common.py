"""Engine-independent parts of the store: filters, operator rules, row views, job building.

Both engines (``sqlite.py``, ``postgres.py``) run the same SQL where they can (``?``
placeholders; PostgreSQL numbers them) and turn rows into the same dicts here.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from adapters.base import DeliveredPart, Message

from ..audit import event_hash
from . import BLOCKING, FINAL, Job, Status

Row = Mapping[str, Any]

BLOCKING_SQL = ",".join(f"'{s}'" for s in sorted(BLOCKING))
FINAL_SQL = ",".join(f"'{s}'" for s in sorted(FINAL))
RECLAIM_IN_DOUBT = "the gateway stopped while a request may have been on its way to the vendor"
CONFLICT_ERRORS = (("/Id", "this Id was already received with different content; the gateway keeps the "
                           "first (change it in OS2indberetning as a new record, or ask the payroll office)"),)
AUDIT_INSERT = ("INSERT INTO audit_events (at, actor, event, report_pk, delivery_id, detail, prev_hash, hash)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)")
FILTERS = {
    "id": "d.id = ?",
    "municipality": "d.municipality = ?",
    "adapter": "d.adapter = ?",
    "status": "d.status = ?",
    "report_id": "r.report_id = ?",
    "since": "d.created_at >= ?",
    "until": "d.created_at < ?",
    "error": "d.last_error LIKE '%' || ? || '%'",
    "at_risk": "d.at_risk = ?",
}


def filter_sql(filters: Mapping[str, Any]) -> tuple[str, tuple[Any, ...]]:
    """A WHERE clause from known filter names only (values are always parameters)."""
    clauses, params = ["1 = 1"], []
    for name, value in filters.items():
        if value is None:
            continue
        if name == "ids":
            clauses.append(f"d.id IN ({','.join('?' * len(value)) or 'NULL'})")
            params.extend(value)
            continue
        clauses.append(FILTERS[name])
        params.append(int(value) if name == "at_risk" else value)
    return " AND ".join(clauses), tuple(params)


def _replay(row: Row, reads_back: bool) -> Status | None:
    status = row["status"]
    if status == Status.IN_DOUBT:
        # a vendor that can be asked is asked first; elsewhere the operator checked by hand
        return Status.IN_DOUBT if reads_back else Status.QUEUED
    if status in (Status.FAILED, Status.CANCELLED, Status.RETRY_SCHEDULED):
        return Status.QUEUED
    return None


def _cancel(row: Row, reads_back: bool) -> Status | None:
    cancellable = {Status.QUEUED, Status.RETRY_SCHEDULED, Status.IN_DOUBT,
                   Status.CORRECTION_REQUIRED, Status.FAILED}
    return Status.CANCELLED if row["status"] in cancellable else None


def _check(row: Row, reads_back: bool) -> Status | None:
    checkable = {Status.IN_DOUBT, Status.FAILED, Status.RETRY_SCHEDULED}
    return Status.IN_DOUBT if reads_back and row["status"] in checkable else None


def _confirm(row: Row, reads_back: bool) -> Status | None:
    return Status.DELIVERED if row["status"] == Status.IN_DOUBT else None


OPERATIONS = {"replay": _replay, "cancel": _cancel, "check": _check, "confirm": _confirm}


def message_json(message: Message) -> dict[str, Any]:
    return {"part": message.part, "operation": message.operation,
            "fields": dict(message.fields), "deletes": message.deletes}


def message(data: dict[str, Any]) -> Message:
    return Message(data["part"], data["operation"], data["fields"], data["deletes"])




def audit_rows(prev: str, events: Iterable[tuple[float, str, str, int | None, int | None, dict[str, Any]]],
               ) -> list[tuple[Any, ...]]:
    """Audit rows (for ``AUDIT_INSERT``) chained onto ``prev``, the last stored hash."""
    rows = []
    for now, actor, event, report_pk, delivery_id, detail in events:
        text = json.dumps(detail, sort_keys=True, default=str)
        digest = event_hash(prev, now, actor, event, report_pk, delivery_id, text)
        rows.append((now, actor, event, report_pk, delivery_id, text, prev, digest))
        prev = digest
    return rows


def blocker_view(row: Row | None) -> dict[str, Any] | None:
    """What holds a delivery back: the first earlier unfinished delivery of its lane."""
    if row is None:
        return None
    return {"delivery_id": row["id"], "report_id": row["report_id"], "status": row["status"],
            "reason": f"waiting for delivery {row['id']} of the same employee ({row['status']})"}


def waits_in_lane(row: Row) -> bool:
    """Whether a delivery in this state may be held by an earlier one of its lane."""
    return row["status"] in (Status.QUEUED, Status.RETRY_SCHEDULED)


ATTEMPT_FIELDS = ("id", "part", "operation", "started_at", "finished_at", "outcome",
                  "http_status", "latency_ms", "error", "request_body", "response_body")


def delivery_view(d: Row, attempts: Iterable[Row], blocker: dict[str, Any] | None) -> dict[str, Any]:
    """A delivery as ``get_report`` shows it (held when an earlier one blocks it)."""
    status = str(Status.HELD) if blocker is not None else str(d["status"])
    view = {k: d[k] for k in ("id", "adapter", "version", "vendor_reference", "attempts",
                              "next_attempt_at", "last_error", "warning", "cutoff_at",
                              "created_at", "updated_at")}
    view.update(status=status, attempt_count=d["attempts"],
                attempts=[{k: a[k] for k in ATTEMPT_FIELDS} for a in attempts],
                at_risk=bool(d["at_risk"]))
    if blocker is not None:
        view["held_by"] = blocker
    return view


def list_view(row: Row, blocker: dict[str, Any] | None) -> dict[str, Any]:
    """A delivery as ``list_deliveries`` shows it."""
    view = {k: row[k] for k in ("id", "municipality", "report_id", "adapter", "version", "status",
                                "attempts", "next_attempt_at", "last_error", "vendor_reference",
                                "warning", "cutoff_at", "created_at", "updated_at")}
    view["at_risk"] = bool(row["at_risk"])
    if row["deferred_from"] is not None and waits_in_lane(row):
        view["waiting_for_opening_at"] = row["next_attempt_at"]  # the endpoint is closed until then
    if blocker is not None:
        view["status"], view["held_by"] = str(Status.HELD), blocker
    return view


def rejection_view(r: Row) -> dict[str, Any]:
    return {"id": r["id"], "municipality": r["municipality"], "source": r["source"],
            "record_id": r["record_id"], "kind": r["kind"], "errors": json.loads(r["errors"]),
            "first_seen_at": r["first_seen_at"], "last_seen_at": r["last_seen_at"],
            "times_seen": r["times_seen"], "resolved_at": r["resolved_at"]}


def delivered_part(p: Row) -> DeliveredPart:
    return DeliveredPart(p["part"], p["version"], json.loads(p["fields"]), p["vendor_reference"])


def job(row: Row, version: Row, parts: Iterable[Row], pending_texts: Iterable[str]) -> Job:
    """A claimed delivery as the dispatcher gets it: the report with its CPR numbers restored,
    what was delivered of it before, and (in doubt) what may have reached the vendor."""
    report = json.loads(version["body"])
    report["employee"]["cpr"] = version["employee_cpr"]
    if version["approved_by_cpr"] is not None:
        report["approved_by_cpr"] = version["approved_by_cpr"]
    delivered = tuple(delivered_part(p) for p in parts)
    pending: tuple[Message, ...] = ()
    if row["status"] == Status.IN_DOUBT:
        pending = tuple(message(json.loads(t)) for t in dict.fromkeys(pending_texts))
    retry_since = row["retry_since"] if row["retry_since"] is not None else row["created_at"]
    return Job(row["id"], row["report_pk"], row["municipality"], row["adapter"], row["version"],
               row["attempts"], retry_since, row["status"], report, delivered, pending,
               cutoff_at=row["cutoff_at"])


#: attempt outcomes whose message may have reached the vendor: in doubt, and (asked by an
#: operator's check) even refused or retried sends, since a vendor may apply and still answer 5xx
PENDING_OUTCOMES = ("in_doubt", "retry", "failed")
