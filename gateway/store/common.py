"""Engine-independent parts of the store: filters, the state machine's facts from a row,
how a decision is written, row views, job building.

Both engines (``sqlite.py``, ``postgres.py``) run the same SQL where they can (``?``
placeholders; PostgreSQL numbers them) and turn rows into the same dicts here. Neither
decides a delivery's state: :mod:`gateway.deliveries` does; the engines fetch candidates,
ask it, and write its :class:`~gateway.deliveries.Decision` with :func:`decision_update`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

from adapters.base import DeliveredPart, Message

from .. import deliveries
from ..audit import event_hmac, legacy_broken, row_hmac, seal
from ..deliveries import Decision, Delivery
from ..privacy import MASKED_CPR, DataKeys, mask_cpr, mask_strings
from . import BLOCKING, FINAL, Job, NewReport, Settle, Status


class Row(Protocol):
    """A row by column name: ``sqlite3.Row``, ``asyncpg.Record`` or a dict."""

    def __getitem__(self, key: str, /) -> Any: ...
    def keys(self) -> Iterable[str]: ...


BLOCKING_SQL = ",".join(f"'{s}'" for s in sorted(BLOCKING))
#: a lane's head candidate: its first blocking delivery (the partial index
#: ``deliveries_lane_open`` of migration 12 has exactly this ``status IN`` list)
LANE_HEAD_CANDIDATE = (
    "SELECT id, status, next_attempt_at FROM deliveries WHERE municipality = ? AND adapter = ?"
    f" AND employee_key = ? AND status IN ({BLOCKING_SQL}) ORDER BY id LIMIT 1"
)
LANE_HEAD_UPSERT = (
    "INSERT INTO lane_heads (municipality, adapter, employee_key, delivery_id, status, due_at)"
    " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (municipality, adapter, employee_key) DO UPDATE SET"
    " delivery_id = excluded.delivery_id, status = excluded.status, due_at = excluded.due_at"
)
#: a new delivery, the last of its lane, heads it if nothing else blocks it
LANE_HEAD_IF_FIRST = LANE_HEAD_UPSERT.split(" DO UPDATE", 1)[0] + " DO NOTHING"
LANE_HEAD_DELETE = (
    "DELETE FROM lane_heads WHERE municipality = ? AND adapter = ? AND employee_key = ?"
)
#: after ``undefer``: the waiting heads take their deliveries' due times back (``AND`` an endpoint)
UNDEFER_HEADS = (
    "UPDATE lane_heads SET due_at = (SELECT d.next_attempt_at FROM deliveries d"
    " WHERE d.id = lane_heads.delivery_id) WHERE status IN (?, ?)"
)
#: ``decision_update`` (a state change) says which lane the delivery is in
RETURNING_LANE = " RETURNING municipality, adapter, employee_key"
WATCHED_SQL = ",".join(f"'{s}'" for s in sorted(deliveries.WATCHED))
#: stored states a blocked lane shows as ``held`` (the state machine says which)
WAITING_SQL = ",".join(
    f"'{s}'"
    for s in sorted(Status)
    if s is not Status.HELD and deliveries.shown_status(s, True) is Status.HELD
)
#: an earlier unfinished delivery of the same lane (employee at one endpoint) holds ``d`` back
LANE_BLOCKED_SQL = (
    "EXISTS (SELECT 1 FROM deliveries e"
    "   WHERE e.municipality = d.municipality AND e.adapter = d.adapter"
    f"  AND e.employee_key = d.employee_key AND e.id < d.id AND e.status IN ({BLOCKING_SQL}))"
)
BLOCKED_SQL = f"CASE WHEN d.status IN ({WAITING_SQL}) AND {LANE_BLOCKED_SQL} THEN 1 ELSE 0 END"
#: per stored state, how many deliveries wait behind an earlier one of their lane (blocked)
COUNT_SHOWN_SQL = (
    f"SELECT d.status, {BLOCKED_SQL} AS blocked, COUNT(*) AS n FROM deliveries d GROUP BY 1, 2"
)
#: the overview's counts per endpoint, stored state and blocked (parameter: the day's start)
OVERVIEW_SQL = (
    f"SELECT d.municipality, d.adapter, d.status, {BLOCKED_SQL} AS blocked, COUNT(*) AS n,"
    " SUM(CASE WHEN d.at_risk = 1 THEN 1 ELSE 0 END) AS at_risk,"
    " SUM(CASE WHEN d.updated_at >= ? THEN 1 ELSE 0 END) AS changed_today,"
    " MIN(d.created_at) AS oldest FROM deliveries d GROUP BY 1, 2, 3, 4"
)
#: latencies of attempts that ended in a window (parameters: from, to)
LATENCIES_SQL = (
    "SELECT d.municipality, d.adapter, a.latency_ms FROM attempts a"
    " JOIN deliveries d ON d.id = a.delivery_id"
    " WHERE a.finished_at >= ? AND a.finished_at <= ? AND a.latency_ms IS NOT NULL"
)
OLDEST_UNFINISHED_SQL = (
    "SELECT MIN(created_at) FROM deliveries WHERE status NOT IN ("
    + ",".join(f"'{s}'" for s in sorted(FINAL))
    + ")"
)
CONFLICT_ERRORS = (
    (
        "/Id",
        "this Id was already received with different content; the gateway keeps the "
        "first (change it in OS2indberetning as a new record, or ask the payroll office)",
    ),
)
AUDIT_INSERT = (
    "INSERT INTO audit_events (id, at, actor, event, report_pk, delivery_id, detail, prev_hash,"
    " hash, hmac) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
#: the head a new event chains onto (read inside the write transaction, under the writer lock)
AUDIT_HEAD = "SELECT id, hmac FROM audit_events ORDER BY id DESC LIMIT 1"
# the console's sessions (migration 11); expired rows are removed whenever one is created
SESSION_SWEEP = "DELETE FROM console_sessions WHERE expires_at <= ?"
SESSION_INSERT = "INSERT INTO console_sessions (token_hash, username, created_at, expires_at) VALUES (?, ?, ?, ?)"
SESSION_USER = "SELECT username FROM console_sessions WHERE token_hash = ? AND expires_at > ?"
SESSION_END = "DELETE FROM console_sessions WHERE token_hash = ?"
#: audit events newest first, with the municipality of the delivery or report they concern
AUDIT_PAGE = (
    "SELECT e.id, e.at, e.actor, e.event, e.delivery_id, e.detail,"
    " COALESCE(d.municipality, r.municipality) AS municipality FROM audit_events e"
    " LEFT JOIN deliveries d ON d.id = e.delivery_id LEFT JOIN reports r ON r.id = e.report_pk"
    " WHERE e.id < ? ORDER BY e.id DESC LIMIT ?"
)


def audit_page_row(row: Row) -> dict[str, Any]:
    """An event of :data:`AUDIT_PAGE`; an endpoint's event names its municipality in the detail."""
    detail = json.loads(row["detail"])
    municipality = row["municipality"]
    if municipality is None and isinstance(detail, dict):
        named = detail.get("municipality")
        municipality = named if isinstance(named, str) else None
    return {
        "id": row["id"],
        "at": row["at"],
        "actor": row["actor"],
        "event": row["event"],
        "delivery_id": row["delivery_id"],
        "detail": detail,
        "municipality": municipality,
    }


FILTERS = {
    "id": "d.id = ?",
    "before_id": "d.id < ?",  # the cursor of a newest-first list
    "status": "d.status = ?",
    "municipality": "d.municipality = ?",
    "adapter": "d.adapter = ?",
    "report_id": "r.report_id = ?",
    "since": "d.created_at >= ?",
    "until": "d.created_at < ?",
    "error": "d.last_error LIKE '%' || ? || '%' ESCAPE '\\'",  # a substring, never a pattern
    "at_risk": "d.at_risk = ?",
    "period": "d.period = ?",
    "employee": "d.employee_key = ?",
    # the keyed lookup hash of the employee's full CPR (cpr_lookup_hash), any version
    "cpr_hash": "d.version_pk IN (SELECT c.version_pk FROM report_cprs c"
    " WHERE c.employee_cpr_hash = ?)",
}


def facts(row: Row, reads_back: bool = False) -> Delivery:
    """What the state machine looks at, from a ``deliveries`` row (``SELECT *`` or a part of it)."""
    keys = set(row.keys())

    def get(name: str, default: Any = None) -> Any:
        return row[name] if name in keys and row[name] is not None else default

    return Delivery(
        Status(row["status"]),
        attempts=get("attempts", 0),
        retry_since=get("retry_since", 0.0),
        reads_back=reads_back,
        cutoff_at=get("cutoff_at"),
        next_attempt_at=get("next_attempt_at"),
        at_risk=bool(get("at_risk", False)),
        last_error=get("last_error"),
    )


def lease_refusal(row: Row | None, owner: str, now: float) -> str | None:
    """Why ``owner`` may not start an attempt on this delivery (None: it may): the fence
    that keeps a claimer whose lease expired (and was reclaimed, perhaps re-claimed) from
    sending a second time."""
    if row is None:
        return "the delivery does not exist"
    if row["status"] != Status.IN_FLIGHT or row["lease_owner"] != owner:
        return f"the lease is no longer held by {owner} (now {row['status']}, {row['lease_owner'] or 'no owner'})"
    if row["lease_until"] is None or row["lease_until"] < now:
        return f"the lease of {owner} expired"
    return None


def settled(settle: Settle, event: str) -> Decision:
    """A ``Settle`` (what ``settle``/``end_attempt`` are given) as the decision it came from."""
    return Decision(
        settle.status,
        event,
        next_attempt_at=settle.next_attempt_at,
        last_error=settle.last_error,
        vendor_reference=settle.vendor_reference,
        warning=settle.warning,
        count_attempt=settle.count_attempt,
        at_risk=settle.at_risk,
    )


def due_heads(
    now: float,
    limit: int,
    adapters: Sequence[str],
    readback_adapters: Sequence[str],
    municipality: str | None,
    lock: str = "",
) -> tuple[str, list[Any]]:
    """The claim's read: the ids of due lane heads, oldest due first, at most ``limit``.

    One index range of ``lane_heads_due`` per (adapter, claimable state), each ``LIMIT n``,
    merged: with a municipality (the dispatcher claims endpoint by endpoint) it reads at most
    a few times ``limit`` index entries, however many deliveries wait. ``lock`` is appended
    to each range (PostgreSQL: ``FOR UPDATE SKIP LOCKED``).
    """
    arms: list[str] = []
    params: list[Any] = []
    where = "adapter = ? AND status = ? AND due_at <= ?"
    if municipality is not None:
        where = "municipality = ? AND " + where
    for adapter in dict.fromkeys(adapters):
        for status in sorted(deliveries.claimable(adapter in readback_adapters)):
            arms.append(
                f"SELECT * FROM (SELECT delivery_id, due_at FROM lane_heads WHERE {where}"
                f" ORDER BY due_at, delivery_id LIMIT ?{lock}) h{len(arms)}"
            )
            params += [*([municipality] if municipality is not None else []), adapter]
            params += [str(status), now, limit]
    sql = (
        f"SELECT delivery_id FROM ({' UNION ALL '.join(arms)}) h"
        " ORDER BY due_at, delivery_id LIMIT ?"
    )
    return sql, [*params, limit]


def still_claimable(row: Row, now: float, readback_adapters: Sequence[str]) -> bool:
    """A due head, read again in the claim's transaction, may still be claimed (a head that
    moved meanwhile is left to the next claim)."""
    delivery = facts(row, row["adapter"] in readback_adapters)
    return bool(row["next_attempt_at"] <= now) and deliveries.allowed(
        delivery, deliveries.Event.CLAIMED
    )


def decision_update(
    delivery_id: int, decision: Decision, now: float
) -> tuple[str, tuple[Any, ...]]:
    """The one UPDATE that persists a decision (both engines; no deciding here).

    The status; ``next_attempt_at`` only if given; ``last_error`` replaced; vendor reference
    and warning only if given; attempts reset on a fresh budget (which starts at the next
    attempt) or counted; the deferral and the lease cleared; ``at_risk`` only if decided.
    A decision that changes no state (at risk) writes ``at_risk`` only.
    """
    at_risk = None if decision.at_risk is None else int(decision.at_risk)
    if not decision.changes_state:
        return "UPDATE deliveries SET at_risk = COALESCE(?, at_risk) WHERE id = ?", (
            at_risk,
            delivery_id,
        )
    fresh = int(decision.fresh_budget)
    return (
        "UPDATE deliveries SET status = ?, next_attempt_at = COALESCE(?, next_attempt_at),"
        " deferred_from = NULL, last_error = ?, vendor_reference = COALESCE(?, vendor_reference),"
        " warning = COALESCE(?, warning),"
        " attempts = CASE WHEN ? = 1 THEN 0 ELSE attempts + ? END,"
        " retry_since = CASE WHEN ? = 1 THEN ? ELSE retry_since END,"
        " lease_owner = NULL, lease_until = NULL, updated_at = ?, at_risk = COALESCE(?, at_risk)"
        " WHERE id = ?",
        (
            str(decision.status),
            decision.next_attempt_at,
            decision.last_error,
            decision.vendor_reference,
            decision.warning,
            fresh,
            int(decision.count_attempt),
            fresh,
            decision.next_attempt_at,
            now,
            at_risk,
            delivery_id,
        ),
    )


def decision_audit(decision: Decision) -> dict[str, Any]:
    """The audit detail of a decision: its own, or what a settle records."""
    if decision.detail:
        return dict(decision.detail)
    detail = {
        "status": str(decision.status),
        "error": decision.last_error,
        "vendor_reference": decision.vendor_reference,
        "warning": decision.warning,
    }
    return {k: v for k, v in detail.items() if v is not None}


#: a breaker opening is kept until the latest ``until`` any process gave it (both engines)
OPEN_BREAKER = (
    "INSERT INTO endpoint_breakers (municipality, adapter, open_until) VALUES (?, ?, ?)"
    " ON CONFLICT (municipality, adapter) DO UPDATE SET open_until = CASE"
    " WHEN excluded.open_until > endpoint_breakers.open_until THEN excluded.open_until"
    " ELSE endpoint_breakers.open_until END"
)
BREAKERS_OPEN = (
    "SELECT municipality, adapter, open_until FROM endpoint_breakers WHERE open_until > ?"
)


#: deliveries shown as ``held``: waiting behind an earlier unfinished one of their lane
HELD_SQL = f"(d.status IN ({WAITING_SQL}) AND {LANE_BLOCKED_SQL})"


def cpr_lookup_hash(keys: DataKeys, cpr: str) -> str:
    """The ``cpr_hash`` filter's value for a full CPR number (the keyed lookup hash stored
    next to each sealed CPR since migration 7): the CPR itself never reaches the SQL."""
    return keys.lookup_hash(cpr)


def filter_sql(filters: Mapping[str, Any]) -> tuple[str, tuple[Any, ...]]:
    """A WHERE clause from known filter names only (values are always parameters).

    ``status`` is the stored state (a waiting one includes those shown as held: what an
    action selects), or ``held``: only those an earlier delivery of their lane holds back.
    """
    clauses, params = ["1 = 1"], []
    for name, value in filters.items():
        if value is None:
            continue
        if name == "ids":
            clauses.append(f"d.id IN ({','.join('?' * len(value)) or 'NULL'})")
            params.extend(value)
            continue
        if name == "status" and value == Status.HELD:  # a state shown, never stored
            clauses.append(HELD_SQL)
            continue
        clauses.append(FILTERS[name])
        if name == "error":  # the text as typed: % and _ are not wildcards
            value = value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        params.append(int(value) if name == "at_risk" else value)
    return " AND ".join(clauses), tuple(params)


def message_json(message: Message) -> dict[str, Any]:
    return {
        "part": message.part,
        "operation": message.operation,
        "fields": dict(message.fields),
        "deletes": message.deletes,
    }


def message(data: dict[str, Any]) -> Message:
    return Message(data["part"], data["operation"], data["fields"], data["deletes"])


#: ``json.dumps(detail, sort_keys=True, default=str)`` without an encoder built per call
_DETAIL_JSON = json.JSONEncoder(sort_keys=True, default=str).encode


def audit_rows(
    key: bytes,
    head: Row | None,
    events: Iterable[tuple[float, str, str, int | None, int | None, dict[str, Any]]],
) -> list[tuple[Any, ...]]:
    """Audit rows (for ``AUDIT_INSERT``) chained onto ``head`` (id and HMAC of the last one).

    Ids are given, not drawn from a sequence, because the HMAC covers them: the trail has
    no gaps, and a renumbered event no longer verifies. ``hash`` keeps an unkeyed SHA-256
    of the detail (a convenience for readers; the HMAC is what proves).
    """
    rows = []
    last_id, prev = (int(head["id"]), head["hmac"] or "") if head is not None else (0, "")
    for now, actor, event, report_pk, delivery_id, detail in events:
        text = _DETAIL_JSON(detail)
        last_id += 1
        mac = event_hmac(key, prev, last_id, now, actor, event, report_pk, delivery_id, text)
        rows.append(
            (
                last_id,
                now,
                actor,
                event,
                report_pk,
                delivery_id,
                text,
                prev,
                hashlib.sha256(text.encode()).hexdigest(),
                mac,
            )
        )
        prev = mac
    return rows


def blocker_view(row: Row | None) -> dict[str, Any] | None:
    """What holds a delivery back: the first earlier unfinished delivery of its lane."""
    if row is None:
        return None
    return {
        "delivery_id": row["id"],
        "report_id": row["report_id"],
        "status": row["status"],
        "reason": f"waiting for delivery {row['id']} of the same employee ({row['status']})",
    }


def waits_in_lane(row: Row) -> bool:
    """Whether a delivery in this state may be held by an earlier one of its lane."""
    return deliveries.shown_status(Status(row["status"]), True) is Status.HELD


def shown_counts(rows: Iterable[Row]) -> dict[str, int]:
    """Rows of :data:`COUNT_SHOWN_SQL` as counts by the state shown (``held`` included)."""
    counts: dict[str, int] = {}
    for row in rows:
        status = str(deliveries.shown_status(Status(row["status"]), bool(row["blocked"])))
        counts[status] = counts.get(status, 0) + int(row["n"])
    return counts


def shown(row: Row, blocker: dict[str, Any] | None) -> str:
    """The state to show for a delivery row: ``held`` when an earlier one blocks its lane."""
    return str(deliveries.shown_status(Status(row["status"]), blocker is not None))


ATTEMPT_FIELDS = (
    "id",
    "part",
    "operation",
    "started_at",
    "finished_at",
    "outcome",
    "http_status",
    "latency_ms",
    "error",
    "request_body",
    "response_body",
)


def delivery_view(
    d: Row, attempts: Iterable[Row], blocker: dict[str, Any] | None
) -> dict[str, Any]:
    """A delivery as ``get_report`` shows it (held when an earlier one blocks it)."""
    view = {
        k: d[k]
        for k in (
            "id",
            "adapter",
            "version",
            "vendor_reference",
            "attempts",
            "next_attempt_at",
            "last_error",
            "warning",
            "cutoff_at",
            "created_at",
            "updated_at",
        )
    }
    view.update(
        status=shown(d, blocker),
        attempt_count=d["attempts"],
        attempts=[{k: a[k] for k in ATTEMPT_FIELDS} for a in attempts],
        at_risk=bool(d["at_risk"]),
    )
    if blocker is not None:
        view["held_by"] = blocker
    return view


AT_RISK_FIELDS = (
    "id",
    "municipality",
    "report_id",
    "adapter",
    "version",
    "status",
    "cutoff_at",
    "next_attempt_at",
    "last_error",
)


def at_risk_view(row: Row) -> dict[str, Any]:
    """A delivery just flagged at risk, as ``flag_at_risk`` returns it (for the alert)."""
    return {k: row[k] for k in AT_RISK_FIELDS}


def list_view(row: Row, blocker: dict[str, Any] | None) -> dict[str, Any]:
    """A delivery as ``list_deliveries`` shows it."""
    view = {
        k: row[k]
        for k in (
            "id",
            "municipality",
            "report_id",
            "adapter",
            "version",
            "status",
            "attempts",
            "next_attempt_at",
            "last_error",
            "vendor_reference",
            "warning",
            "cutoff_at",
            "created_at",
            "updated_at",
        )
    }
    view["at_risk"] = bool(row["at_risk"])
    view["employee"] = row["employee_key"]
    view["period"] = row["period"]
    if row["deferred_from"] is not None and waits_in_lane(row):
        view["waiting_for_opening_at"] = row["next_attempt_at"]  # the endpoint is closed until then
    view["status"] = shown(row, blocker)
    if blocker is not None:
        view["held_by"] = blocker
    return view


def rejection_view(r: Row) -> dict[str, Any]:
    return {
        "id": r["id"],
        "municipality": r["municipality"],
        "source": r["source"],
        "record_id": r["record_id"],
        "kind": r["kind"],
        "errors": json.loads(r["errors"]),
        "first_seen_at": r["first_seen_at"],
        "last_seen_at": r["last_seen_at"],
        "times_seen": r["times_seen"],
        "resolved_at": r["resolved_at"],
    }


def delivered_part(keys: DataKeys, p: Row) -> DeliveredPart:
    fields = open_json(keys, p["fields"], part_context(p["report_pk"], p["adapter"], p["part"]))
    return DeliveredPart(p["part"], p["version"], fields, p["vendor_reference"])


def job(
    row: Row, version: Row, parts: Iterable[Row], pending_texts: Iterable[str], keys: DataKeys
) -> Job:
    """A claimed delivery as the dispatcher gets it: the report with its CPR numbers restored
    (opened with the data keys), what was delivered of it before, and (in doubt) what may have
    reached the vendor."""
    report = open_body(keys, version["id"], version["body"])
    employee, approver = open_cprs(
        keys, version["id"], version["employee_cpr"], version["approved_by_cpr"]
    )
    report["employee"]["cpr"] = employee
    if approver is not None:
        report["approved_by_cpr"] = approver
    delivered = tuple(delivered_part(keys, p) for p in parts)
    pending: tuple[Message, ...] = ()
    if row["status"] == Status.IN_DOUBT:
        # the same message sent twice is pending once (compared opened: each seal differs)
        opened = dict.fromkeys(
            keys.open_or_plain(t, message_context(row["id"])) for t in pending_texts
        )
        pending = tuple(message(json.loads(t)) for t in opened)
    retry_since = row["retry_since"] if row["retry_since"] is not None else row["created_at"]
    return Job(
        row["id"],
        row["report_pk"],
        row["municipality"],
        row["adapter"],
        row["version"],
        row["attempts"],
        retry_since,
        row["status"],
        report,
        delivered,
        pending,
        cutoff_at=row["cutoff_at"],
        request_id=version["request_id"],
    )


# -- personal data at rest (gateway.privacy): what each engine writes and reads ---------------
# Each sealed value is bound to its row (the context), so it cannot be moved to another one.


def _context(column: str, key: Any) -> str:
    return f"{column}:{key}"


def sealed_cprs(
    keys: DataKeys, version_pk: int, new: NewReport
) -> tuple[str, str | None, str, str | None]:
    """A ``report_cprs`` row's values after the version_pk: the two CPRs sealed, their lookup hashes."""
    return (
        keys.seal(new.employee_cpr, _context("employee_cpr", version_pk)),
        None
        if new.approved_by_cpr is None
        else keys.seal(new.approved_by_cpr, _context("approved_by_cpr", version_pk)),
        keys.lookup_hash(new.employee_cpr),
        None if new.approved_by_cpr is None else keys.lookup_hash(new.approved_by_cpr),
    )


CPRS_INSERT = (
    "INSERT INTO report_cprs (version_pk, employee_cpr, approved_by_cpr, employee_cpr_hash,"
    " approved_cpr_hash) VALUES (?, ?, ?, ?, ?)"
)


def open_cprs(
    keys: DataKeys, version_pk: int, employee: str, approver: str | None
) -> tuple[str, str | None]:
    return (
        keys.open_or_plain(employee, _context("employee_cpr", version_pk)),
        None
        if approver is None
        else keys.open_or_plain(approver, _context("approved_by_cpr", version_pk)),
    )


def sealed_json(keys: DataKeys, value: Any, context: str) -> str:
    return keys.seal(json.dumps(value, sort_keys=True), context)


def open_json(keys: DataKeys, text: str, context: str) -> Any:
    return json.loads(keys.open_or_plain(text, context))


# What a sealed JSON column is bound to. A version's body, a message's fields and a delivered
# part hold free text (purpose, route) that may carry a CPR number; an IND01 run's bytes hold
# one in every record.
def body_context(version_pk: int) -> str:
    return f"body:{version_pk}"


def part_context(report_pk: int, adapter: str, part: str) -> str:
    return f"part:{report_pk}:{adapter}:{part}"


def message_context(delivery_id: int) -> str:
    return f"message:{delivery_id}"


def run_context(run_id: str, column: str = "data") -> str:
    return f"file_run:{run_id}" if column == "data" else f"file_run.{column}:{run_id}"


def sealed_body(keys: DataKeys, version_pk: int, body: Mapping[str, Any]) -> str:
    return sealed_json(keys, body, body_context(version_pk))


def open_body(keys: DataKeys, version_pk: int, text: str) -> dict[str, Any]:
    body: dict[str, Any] = open_json(keys, text, body_context(version_pk))
    return body


def sealed_part(
    keys: DataKeys, report_pk: int, adapter: str, part: str, fields: Mapping[str, Any]
) -> str:
    return sealed_json(keys, dict(fields), part_context(report_pk, adapter, part))


def sealed_message(keys: DataKeys, delivery_id: int, msg: Message) -> str:
    return keys.seal(message_text(msg), message_context(delivery_id))


def message_text(msg: Message) -> str:
    """What a sealed message says: the plaintext :func:`sealed_message` seals."""
    return json.dumps(message_json(msg), sort_keys=True)


def message_seal(audit_key: bytes, text: str) -> str:
    """The audit trail's keyed digest of a message whose sealed plaintext is ``text``: what
    :func:`audit_attempt_rows` computes from the stored row, without opening the seal."""
    said = json.dumps(message_json(message(json.loads(text))), sort_keys=True)
    return hmac.new(audit_key, said.encode(), hashlib.sha256).hexdigest()


def open_message(keys: DataKeys, delivery_id: int, text: str) -> Message:
    return message(open_json(keys, text, message_context(delivery_id)))


def sealed_run_data(keys: DataKeys, run_id: str, data: str) -> str:
    """An IND01 run's journalled bytes (CPR numbers in every record) sealed as one blob."""
    return keys.seal(data, run_context(run_id))


def sealed_run_deliveries(keys: DataKeys, run_id: str, deliveries: Any) -> str:
    return sealed_json(keys, deliveries, run_context(run_id, "deliveries"))


def open_run_deliveries(keys: DataKeys, run_id: str, text: str) -> dict[str, Any]:
    found: dict[str, Any] = open_json(keys, text, run_context(run_id, "deliveries"))
    return found


def open_run(keys: DataKeys, row: Row) -> dict[str, Any]:
    """A ``file_runs`` row as the journal reads it: its data and deliveries opened."""
    return {
        **{k: row[k] for k in row.keys()},
        "data": keys.open_or_plain(row["data"], run_context(row["run_id"])),
        "deliveries": open_run_deliveries(keys, row["run_id"], row["deliveries"]),
    }


#: every sealed column but the CPRs: (table, key columns, context columns, column, context)
_SEALED: dict[str, tuple[str, tuple[str, ...], tuple[str, ...], str, Any]] = {
    "report_versions.body": (
        "report_versions",
        ("id",),
        (),
        "body",
        lambda r: body_context(r["id"]),
    ),
    "file_runs.data": ("file_runs", ("run_id",), (), "data", lambda r: run_context(r["run_id"])),
    "file_runs.deliveries": (
        "file_runs",
        ("run_id",),
        (),
        "deliveries",
        lambda r: run_context(r["run_id"], "deliveries"),
    ),
    "parts.fields": (
        "parts",
        ("report_pk", "adapter", "part"),
        (),
        "fields",
        lambda r: part_context(r["report_pk"], r["adapter"], r["part"]),
    ),
    "attempts.message": (
        "attempts",
        ("id",),
        ("delivery_id",),
        "message",
        lambda r: message_context(r["delivery_id"]),
    ),
}
_CPRS_READ = (
    "SELECT version_pk, employee_cpr, approved_by_cpr, employee_cpr_hash, approved_cpr_hash"
    " FROM report_cprs"
)
#: at start, only CPR rows stored in clear (or without a lookup hash) need work
_CPRS_IN_CLEAR = (
    "employee_cpr NOT LIKE 'v1:%' OR approved_by_cpr NOT LIKE 'v1:%'"
    " OR employee_cpr_hash IS NULL OR (approved_by_cpr IS NOT NULL AND approved_cpr_hash IS NULL)"
)
RESEAL_TABLES = ("report_cprs", *_SEALED)
RESEAL_UPDATE = {
    "report_cprs": "UPDATE report_cprs SET employee_cpr = ?, approved_by_cpr = ?, employee_cpr_hash = ?,"
    " approved_cpr_hash = ? WHERE version_pk = ?",
    **{
        name: f"UPDATE {t} SET {column} = ? WHERE {' AND '.join(f'{k} = ?' for k in keys)}"
        for name, (t, keys, _, column, _) in _SEALED.items()
    },
}


def reseal_select(name: str, rotate: bool) -> str:
    """The rows ``reseal`` looks at: all of them to rotate, else those with work in clear."""
    if name == "report_cprs":
        return f"{_CPRS_READ}{'' if rotate else f' WHERE {_CPRS_IN_CLEAR}'} ORDER BY version_pk"
    table, keys, extra, column, _ = _SEALED[name]
    where = "" if rotate else f" WHERE {column} NOT LIKE 'v1:%'"
    return f"SELECT {', '.join((*keys, *extra, column))} FROM {table}{where} ORDER BY {', '.join(keys)}"


def resealed(keys: DataKeys, name: str, row: Row, rotate: bool) -> tuple[Any, ...] | None:
    """The ``RESEAL_UPDATE`` parameters for one row, None when it needs nothing.

    Without ``rotate`` only values stored in clear (before encryption) are sealed; with it,
    every value not sealed under the current key is re-sealed and stale lookup hashes
    recomputed. Either way a second run finds nothing to do.
    """

    def again(value: str | None, context: str) -> str | None:
        if value is None or (not rotate and value.startswith("v1:")):
            return None
        return keys.reseal(value, context)

    if name != "report_cprs":
        _, key_columns, _, column, context = _SEALED[name]
        value = again(row[column], context(row))
        return None if value is None else (value, *(row[k] for k in key_columns))
    pk = row["version_pk"]
    emp = again(row["employee_cpr"], _context("employee_cpr", pk))
    appr = again(row["approved_by_cpr"], _context("approved_by_cpr", pk))
    fresh = keys.current_id + ":" if rotate else ""  # at start: only missing hashes
    stale = (
        row["employee_cpr_hash"] is None
        or not row["employee_cpr_hash"].startswith(fresh)
        or (
            row["approved_by_cpr"] is not None
            and (row["approved_cpr_hash"] is None or not row["approved_cpr_hash"].startswith(fresh))
        )
    )
    if emp is None and appr is None and not stale:
        return None
    e_plain, a_plain = open_cprs(keys, pk, row["employee_cpr"], row["approved_by_cpr"])
    return (
        emp or row["employee_cpr"],
        appr or row["approved_by_cpr"],
        keys.lookup_hash(e_plain),
        None if a_plain is None else keys.lookup_hash(a_plain),
        pk,
    )


#: attempt outcomes whose message may have reached the vendor: in doubt, and (asked by an
#: operator's check) even refused or retried sends, since a vendor may apply and still answer 5xx
PENDING_OUTCOMES = ("in_doubt", "retry", "failed")


# -- the audit trail's seals, the re-chain, retention (both engines) ----------------------

ATTEMPT_COLUMNS = (
    "id, delivery_id, part, operation, message, started_at, finished_at, outcome,"
    " http_status, latency_ms, error, request_body, response_body"
)
ATTEMPT_ROW = f"SELECT {ATTEMPT_COLUMNS} FROM attempts"
#: an attempt's end, and its row as the audit trail seals it, in one statement (PostgreSQL:
#: SQLite's RETURNING gives values before affinity, 3 where 3.0 is stored)
END_ATTEMPT = (
    "UPDATE attempts SET finished_at = ?, outcome = ?, http_status = ?, latency_ms = ?,"
    f" response_body = ?, error = ? WHERE id = ? RETURNING {ATTEMPT_COLUMNS}"
)
#: a failed delivery still waits for an operator (replay needs its body and CPR): only done ones go
DONE_SQL = ",".join(f"'{s}'" for s in sorted(deliveries.DONE))
#: report versions whose bodies may go: received before the cut-off, every delivery of
#: them done and last changed before it, not purged yet (parameters: before, before)
PURGEABLE = (
    "SELECT v.id FROM report_versions v WHERE v.purged_at IS NULL AND v.received_at < ?"
    " AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.version_pk = v.id"
    f" AND (d.status NOT IN ({DONE_SQL}) OR d.updated_at >= ?))"
)
PURGE_BATCH = 500  # versions per transaction (and per audited purge event)
#: what a purge would drop, counted without touching anything (dry run)
PURGE_PREVIEW = (
    f"SELECT (SELECT COUNT(*) FROM ({PURGEABLE}) p) AS versions,"
    f" (SELECT COUNT(*) FROM report_cprs WHERE version_pk IN ({PURGEABLE})) AS cprs,"
    " (SELECT COUNT(*) FROM attempts a JOIN deliveries d ON d.id = a.delivery_id"
    f"  WHERE d.version_pk IN ({PURGEABLE})"
    "  AND (a.request_body IS NOT NULL OR a.response_body IS NOT NULL)) AS attempt_bodies"
)


def rechained(key: bytes, events: Sequence[Row]) -> list[tuple[str, str, str, int]]:
    """(prev_hash, hash, hmac, id) for every stored event, chained with ``key`` (the one-time
    re-chain of migration 8: history is re-anchored from that point)."""
    updates, prev = [], ""
    for e in events:
        mac = row_hmac(key, prev, dict(e))
        updates.append((prev, hashlib.sha256(e["detail"].encode()).hexdigest(), mac, int(e["id"])))
        prev = mac
    return updates


def audit_attempt_rows(
    keys: DataKeys, audit_key: bytes, rows: Sequence[Row], known: Mapping[int, str] = {}
) -> list[dict[str, Any]]:
    """Attempt rows as the audit trail seals them: the sealed message replaced by an HMAC (audit
    key) of what it says. Its ciphertext changes with every rotation of the data key, what it
    says does not; and a keyed digest of a text that may hold a CPR cannot be guessed from the
    database alone. ``known``: attempt id to :func:`message_seal` of the plaintext its caller
    sealed (saves opening the seal again)."""
    out = []
    for row in rows:
        a = dict(row)
        digest = known.get(int(a["id"]))
        if digest is None:
            said = json.dumps(
                message_json(open_message(keys, a["delivery_id"], a["message"])), sort_keys=True
            )
            digest = hmac.new(audit_key, said.encode(), hashlib.sha256).hexdigest()
        a["message"] = digest
        out.append(a)
    return out


def rechain_detail(events: Sequence[Row], attempts: Sequence[Row]) -> dict[str, Any]:
    """The ``audit.rechained`` event: what was re-chained, whether the old unkeyed chain held,
    and a seal of every attempt written before seals existed."""
    broken = legacy_broken([dict(e) for e in events])
    return {
        "events": len(events),
        "legacy_chain": "intact" if broken is None else f"broken at event {broken}",
        "attempts_sealed": [seal(dict(a)) for a in attempts],
    }


def purge_detail(
    before: float,
    versions: Sequence[int],
    cprs: int,
    deliveries_: Sequence[int],
    bodies: int,
    extra: Mapping[str, Any],
) -> dict[str, Any]:
    """The ``retention.purged`` event: counts, and the deliveries whose attempt bodies went
    (``audit verify`` accepts a missing body only for those)."""
    return {
        "before": before,
        "versions": len(versions),
        "cprs": cprs,
        "attempt_bodies": bodies,
        "deliveries": list(deliveries_),
        **extra,
    }


def version_view(keys: DataKeys, v: Row) -> dict[str, Any]:
    """A report version as ``get_report`` shows it (body opened): a purged one without its body."""
    if v["purged_at"] is not None:
        return {
            "id": v["id"],
            "version": v["version"],
            "received_at": v["received_at"],
            "purged": True,
            "purged_at": v["purged_at"],
        }
    return {
        "id": v["id"],
        "version": v["version"],
        "received_at": v["received_at"],
        "purged": False,
        "report": open_body(keys, v["id"], v["body"]),
    }


# -- read models (the console, the ops API) -----------------------------------------------


def report_period(report: Mapping[str, Any]) -> str | None:
    """The payroll period ("YYYY-MM") a report belongs to: the month of its own date (a
    drive's ``drive_date``, a vacation's ``start_date``), not of when it was received."""
    day = report.get("drive_date") if report.get("kind") == "drive" else report.get("start_date")
    return day[:7] if isinstance(day, str) and len(day) >= 7 else None


#: deliveries stored before migration 9 without a period, whose report body is still there
PERIODLESS_SQL = (
    "SELECT d.id, v.id AS version_pk, v.body FROM deliveries d"
    " JOIN report_versions v ON v.id = d.version_pk"
    " WHERE d.period IS NULL AND v.purged_at IS NULL ORDER BY d.id"
)
SET_PERIOD_SQL = "UPDATE deliveries SET period = ? WHERE id = ?"


def backfilled_periods(keys: DataKeys, rows: Iterable[Row]) -> list[tuple[str, int]]:
    """(period, delivery id) for :data:`PERIODLESS_SQL` rows whose body has a date."""
    found = []
    for row in rows:
        period = report_period(open_body(keys, row["version_pk"], row["body"]))
        if period is not None:
            found.append((period, int(row["id"])))
    return found


#: a list's rows: the delivery, its report's id (newest first: the keyset cursor is the id)
LIST_SQL = (
    "SELECT d.*, r.report_id FROM deliveries d JOIN reports r ON r.id = d.report_pk"
    " WHERE {where} ORDER BY d.id DESC LIMIT ?"
)
COUNT_SQL = "SELECT COUNT(*) FROM deliveries d JOIN reports r ON r.id = d.report_pk WHERE {where}"


#: the filters of a count: the whole result, whatever page a cursor points at
def count_filters(filters: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in filters.items() if k != "before_id"}


OVERVIEW_STATES = (
    Status.QUEUED,
    Status.RETRY_SCHEDULED,
    Status.IN_FLIGHT,
    Status.HELD,
    Status.IN_DOUBT,
    Status.FAILED,
    Status.CORRECTION_REQUIRED,
)
LATENCY_WINDOW = 3600.0  # p95 over the attempts that ended in the last hour


def percentile(values: Sequence[float], p: float) -> float | None:
    """The nearest-rank ``p``-th percentile (None without values)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * p // 100))  # ceil(n * p / 100), at least the first
    return float(ordered[int(rank) - 1])


def empty_overview_row(municipality: str, adapter: str) -> dict[str, Any]:
    """An endpoint's overview row before anything is counted."""
    return {
        "municipality": municipality,
        "adapter": adapter,
        **{str(s): 0 for s in OVERVIEW_STATES},
        "delivered_today": 0,
        "at_risk": 0,
        "oldest_unfinished_at": None,
        "p95_latency_ms_1h": None,
    }


def overview_rows(counts: Iterable[Row], latencies: Iterable[Row]) -> list[dict[str, Any]]:
    """One row per endpoint (municipality, adapter) from :data:`OVERVIEW_SQL` and
    :data:`LATENCIES_SQL` rows; the states as shown (held included), as ``/metrics`` counts."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for c in counts:
        key = (c["municipality"], c["adapter"])
        row = rows.get(key) or rows.setdefault(key, empty_overview_row(*key))
        stored = Status(c["status"])
        state = str(deliveries.shown_status(stored, bool(c["blocked"])))
        if state in row:
            row[state] += int(c["n"])
        if stored is Status.DELIVERED:
            row["delivered_today"] += int(c["changed_today"] or 0)
        row["at_risk"] += int(c["at_risk"] or 0)
        if stored not in FINAL and c["oldest"] is not None:
            oldest = float(c["oldest"])
            before = row["oldest_unfinished_at"]
            row["oldest_unfinished_at"] = oldest if before is None else min(before, oldest)
    spent: dict[tuple[str, str], list[float]] = {}
    for a in latencies:
        spent.setdefault((a["municipality"], a["adapter"]), []).append(float(a["latency_ms"]))
    for key, values in spent.items():
        if key in rows:
            rows[key]["p95_latency_ms_1h"] = percentile(values, 95)
    return [rows[k] for k in sorted(rows)]


ANSWER_LIMIT = 2000  # characters of a vendor's answer shown


def _masked(text: str | None, cprs: Sequence[str], limit: int | None = None) -> str | None:
    if text is None:
        return None
    return mask_cpr(text if limit is None else text[:limit], cprs)


def detail_attempt(a: Row, version: int, cprs: Sequence[str]) -> dict[str, Any]:
    """An attempt as the delivery's detail shows it: bodies CPR-masked (purged: null), the
    vendor's answer cut to :data:`ANSWER_LIMIT` characters."""
    answer = a["response_body"]
    return {
        "id": a["id"],
        "version": version,
        "part": a["part"],
        "operation": a["operation"],
        "started_at": a["started_at"],
        "ended_at": a["finished_at"],
        "latency_ms": a["latency_ms"],
        "outcome": a["outcome"],
        "http_status": a["http_status"],
        "error": _masked(a["error"], cprs),
        "request_body": _masked(a["request_body"], cprs),
        "response_body": _masked(answer, cprs, ANSWER_LIMIT),
        "response_truncated": answer is not None and len(answer) > ANSWER_LIMIT,
    }


def detail_version(keys: DataKeys, v: Row, cprs: Sequence[str]) -> dict[str, Any]:
    """A report version in the detail: its body with every CPR masked (purged: null)."""
    purged = v["purged_at"] is not None
    return {
        "version": v["version"],
        "received_at": v["received_at"],
        "content_hash": v["content_hash"],
        "request_id": v["request_id"],
        "purged_at": v["purged_at"],
        "body": None if purged else mask_strings(open_body(keys, v["id"], v["body"]), cprs),
    }


#: a report's versions with their CPR columns (sealed), for the detail
DETAIL_VERSIONS_SQL = (
    "SELECT v.id, v.version, v.received_at, v.content_hash, v.request_id, v.purged_at, v.body,"
    " c.employee_cpr, c.approved_by_cpr FROM report_versions v"
    " LEFT JOIN report_cprs c ON c.version_pk = v.id WHERE v.report_pk = ? ORDER BY v.version"
)
DETAIL_REPORT_SQL = (
    "SELECT id, municipality, report_id, kind, employee_key FROM reports WHERE id = ?"
)


def delivery_detail_view(
    keys: DataKeys,
    listed: dict[str, Any],
    report: Row,
    versions: Sequence[Row],
    attempts: Iterable[Row],
    audit: list[dict[str, Any]],
) -> dict[str, Any]:
    """The console's (and ``GET /v1/ops/deliveries/{id}``'s) view of one delivery: the list row,
    its report (the CPR masked only), every version's body (CPRs masked), its attempts (bodies
    as sent, masked) and its audit events. No CPR number appears in clear anywhere in it."""
    cprs: list[str] = []
    for v in versions:
        if v["employee_cpr"] is not None:
            cprs.extend(
                c
                for c in open_cprs(keys, v["id"], v["employee_cpr"], v["approved_by_cpr"])
                if c is not None
            )
    known = tuple(dict.fromkeys(cprs))
    return {
        **listed,
        "attempt_count": listed["attempts"],  # ``attempts`` lists them here
        "report": {
            "municipality": report["municipality"],
            "report_id": report["report_id"],
            "kind": report["kind"],
            "employee": {
                "employment_id": report["employee_key"],
                "cpr": MASKED_CPR if known else None,
            },
        },
        "versions": [detail_version(keys, v, known) for v in versions],
        "attempts": [detail_attempt(a, listed["version"], known) for a in attempts],
        # written masked by the dispatcher; masked again here, as every text of this view
        "audit": [{**e, "detail": mask_strings(e["detail"], known)} for e in audit],
    }


AUDIT_FOR_SQL = (
    "SELECT id, at, actor, event, detail FROM audit_events WHERE delivery_id = ? ORDER BY id"
)


def audit_view(r: Row) -> dict[str, Any]:
    """An audit event of one delivery as ``audit_for`` returns it (detail parsed)."""
    return {**{k: r[k] for k in ("id", "at", "actor", "event")}, "detail": json.loads(r["detail"])}
