"""What the console's pages show, as pure functions of store rows (no I/O, no clock).

Filters typed into a form become store filters here; store rows become the cells a template
prints (labels, CSS classes, masked text). Tested as tables in ``tests/console``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from .. import deliveries
from ..errors import BadRequest, FieldError, InvalidReport
from ..privacy import DataKeys, mask_cpr
from ..settings import Operator
from ..store import Status

COPENHAGEN = ZoneInfo("Europe/Copenhagen")
PAGE_SIZE = 50
MAX_BULK = 5000  # deliveries one bulk action may select (the ops API's limit on ids)
STATES = tuple(str(s) for s in Status)
TEXT_FILTERS = ("municipality", "adapter", "status", "period", "employee", "error", "report_id")
#: the filters a list link carries (a CPR never: its keyed hash stands in for it)
LINK_FILTERS = (*TEXT_FILTERS, "cpr_hash", "at_risk")
ID = re.compile(r"[1-9][0-9]{0,18}")

#: how each state reads at a glance: a CSS class (the colour) next to the state's own name
TONE = {
    "queued": "neutral",
    "in_flight": "busy",
    "retry_scheduled": "warn",
    "held": "warn",
    "in_doubt": "alert",
    "correction_required": "alert",
    "delivered": "ok",
    "failed": "bad",
    "not_applicable": "muted",
    "superseded": "muted",
    "cancelled": "muted",
}
#: overview columns: (row key, heading, tone when the count is above zero)
COUNTS = (
    ("queued", "Queued", "neutral"),
    ("retry_scheduled", "Retrying", "warn"),
    ("in_flight", "In flight", "busy"),
    ("delivered_today", "Delivered today", "ok"),
    ("held", "Held", "warn"),
    ("in_doubt", "In doubt", "alert"),
    ("correction_required", "Correction", "alert"),
    ("failed", "Failed", "bad"),
    ("at_risk", "At risk", "bad"),
)


def when(epoch: float | None) -> dict[str, str] | None:
    """A time as the page shows it: Copenhagen local, and ISO 8601 (UTC) for ``datetime``."""
    if epoch is None:
        return None
    moment = datetime.fromtimestamp(epoch, UTC)
    local = moment.astimezone(COPENHAGEN)
    return {
        "iso": moment.isoformat(timespec="seconds"),
        "text": local.strftime("%Y-%m-%d %H:%M:%S"),
    }


def age(seconds: float | None) -> str:
    """``3 d 4 h``, ``2 h 5 min``, ``4 min``, ``12 s``: how long something has waited."""
    if seconds is None:
        return "–"
    span = timedelta(seconds=max(0, int(seconds)))
    days, rest = span.days, span.seconds
    hours, minutes = rest // 3600, rest % 3600 // 60
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes} min"
    if minutes:
        return f"{minutes} min"
    return f"{rest} s"


def overview_rows(
    rows: Iterable[Mapping[str, Any]],
    endpoints: Iterable[Mapping[str, Any]],
    breakers: Mapping[tuple[str, str], float],
    who: Operator,
    now: float,
) -> list[dict[str, Any]]:
    """One row per (municipality, vendor) the operator may see: the store's counts merged
    with the endpoint's state (breaker, paused); endpoints without deliveries show zeros."""
    merged: dict[tuple[str, str], dict[str, Any]] = {}
    for e in endpoints:
        key = (str(e["municipality"]), str(e["adapter"]))
        merged[key] = {"municipality": key[0], "adapter": key[1], "endpoint": dict(e)}
    for r in rows:
        key = (str(r["municipality"]), str(r["adapter"]))
        merged.setdefault(key, {"municipality": key[0], "adapter": key[1], "endpoint": None})
        merged[key].update({k: v for k, v in r.items() if k not in ("municipality", "adapter")})
    shown = []
    for key in sorted(merged):
        if not who.covers(key[0]):
            continue
        row = merged[key]
        for name, _, _ in COUNTS:
            row[name] = int(row.get(name) or 0)
        row["breaker"] = breaker_state(row["endpoint"], breakers.get(key), now)
        row["paused"] = bool(row["endpoint"] and row["endpoint"].get("paused"))
        row["pause_reason"] = (row["endpoint"] or {}).get("pause_reason")
        oldest = row.get("oldest_unfinished_at")
        row["oldest_age"] = age(now - oldest) if oldest is not None else "–"
        p95 = row.get("p95_latency_ms_1h")
        row["p95"] = f"{p95:.0f} ms" if isinstance(p95, (int, float)) else "–"
        row["tone"] = row_tone(row)
        shown.append(row)
    return shown


def breaker_state(endpoint: Mapping[str, Any] | None, open_until: float | None, now: float) -> str:
    """``open`` when this process's breaker is open or another process opened it (store)."""
    if open_until is not None and open_until > now:
        return "open"
    return str(endpoint["breaker"]) if endpoint else "closed"


def row_tone(row: Mapping[str, Any]) -> str:
    """The colour of a whole row: the worst thing in it."""
    if row["failed"] or row["at_risk"] or row["breaker"] == "open":
        return "bad"
    if row["in_doubt"] or row["correction_required"]:
        return "alert"
    if row["paused"] or row["held"] or row["retry_scheduled"]:
        return "warn"
    return "ok"


def delivery_filters(
    query: Mapping[str, str],
    adapters: Collection[str] | None = None,
    keys: DataKeys | None = None,
) -> dict[str, Any]:
    """The list's filters from a query string (or a posted filter form), checked by the ops
    API's own rules (``ops.parse_filters``): a 400 naming the field for a bad one.

    ``cpr``, a full CPR number, is never kept: its keyed lookup hash (``keys``) stands in for
    it, in the filters and in every link (``cpr_hash``).
    """
    from ..ops import FILTER_KEYS, parse_filters

    raw: dict[str, Any] = {}
    for key in TEXT_FILTERS:
        value = query.get(key, "").strip()
        if value:
            raw[key] = value
    if query.get("at_risk") in ("1", "on", "true"):
        raw["at_risk"] = True
    cpr = query.get("cpr", "").strip()
    if cpr:
        raw["cpr"] = cpr.replace("-", "").replace(" ", "")
    assert set(raw) <= set(FILTER_KEYS)
    try:
        filters = parse_filters(raw, "", adapters, keys)
    except InvalidReport as exc:  # a bad filter is a bad request, as in the ops API
        raise BadRequest(exc.detail, exc.errors) from exc
    if not cpr and query.get("cpr_hash"):
        value = query["cpr_hash"]
        if not re.fullmatch(r"[A-Za-z0-9:_=+/-]{8,200}", value):
            raise _bad("cpr_hash", "is not a CPR lookup hash")
        filters["cpr_hash"] = value
    return filters


def cursor(query: Mapping[str, str]) -> int | None:
    raw = query.get("before", "")
    if not raw:
        return None
    if not ID.fullmatch(raw) or int(raw) > 2**63 - 1:
        raise _bad("before", "must be a delivery id")
    return int(raw)


def link_query(filters: Mapping[str, Any], **extra: Any) -> dict[str, str]:
    """The query string of a list link: the filters (CPR as its hash), plus ``extra``."""
    query = {k: str(filters[k]) for k in LINK_FILTERS if k in filters and k != "at_risk"}
    if filters.get("at_risk"):
        query["at_risk"] = "1"
    query.update({k: str(v) for k, v in extra.items() if v is not None})
    return query


def filter_summary(filters: Mapping[str, Any]) -> list[tuple[str, str]]:
    """What the list is filtered by, as the page says it (a CPR as ``xxxxxx-xxxx``)."""
    shown = [(k.replace("_", " "), str(filters[k])) for k in TEXT_FILTERS if k in filters]
    if "cpr_hash" in filters:
        shown.append(("CPR", "xxxxxx-xxxx"))
    if filters.get("at_risk"):
        shown.append(("at risk", "yes"))
    return shown


def actions_for(status: str, reads_back: bool, who: Operator) -> list[str]:
    """The actions the state machine allows on a delivery in ``status`` that ``who`` may take."""
    from ..auth import ACTION_ROLES

    stored = Status.QUEUED if status == Status.HELD else Status(status)
    facts = deliveries.Delivery(status=stored, reads_back=reads_back)
    return [
        name
        for name, event in deliveries.ACTIONS.items()
        if who.may(ACTION_ROLES.get(name, "admin")) and deliveries.allowed(facts, event)
    ]


def pretty(value: Any) -> str:
    """A stored body or answer as readable text, CPR-masked: JSON indented, text as it is."""
    if value is None:
        return ""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return mask_cpr(value)
        if isinstance(value, str):
            return mask_cpr(value)
    return mask_cpr(json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True))


def _bad(field: str, message: str) -> BadRequest:
    return BadRequest(f"bad filter {field}: {message}", [FieldError(f"/{field}", message)])
