"""The operations API: what is stuck and why, and the actions that fix it without a database.

Every request carries an operator token (``[operators.NAME] token_hash`` in the config);
the operator's role says what it may do (``auth.ACTION_ROLES``; reading needs ``viewer``) and
its municipalities what it may see and touch. The operator's name is written to the audit
trail with every action, and every action needs a reason.
"""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

from aiohttp import web

from . import deliveries
from .auth import ACTION_ROLES, operator, require_municipality, require_role
from .errors import BadRequest, Conflict, FieldError, InvalidReport, NotFound
from .intake import _iso_times, read_json
from .keys import APP_ADAPTERS, APP_DISPATCHER, APP_STORE
from .privacy import DataKeys
from .settings import ALL_MUNICIPALITIES, Operator
from .store import Status, Store
from .store.common import cpr_lookup_hash, empty_overview_row
from .validation import pointer_token, readable_text

routes = web.RouteTableDef()
ACTIONS = tuple(deliveries.ACTIONS)  # what each may do is the state machine's to say
STATES = tuple(str(s) for s in Status)
MAX_ID = 2**63 - 1  # ids are 64-bit integers in every engine
MAX_IDS = 5000
FLAGS = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}
FILTER_KEYS = (
    "municipality",
    "adapter",
    "status",
    "report_id",
    "since",
    "until",
    "error",
    "at_risk",
    "period",
    "employee",
    "cpr",
)
MUNICIPALITY = re.compile(r"[0-9]{3}")
PERIOD = re.compile(r"[0-9]{4}-(0[1-9]|1[0-2])")
#: a full CPR number as an operator types it (DDMMYYXXXX, DDMMYY-XXXX or DDMMYY XXXX)
FULL_CPR = re.compile(r"[0-9]{6}[- ]?[0-9]{4}")
#: the last row's id in hex (at most 2**63 - 1): opaque to clients
CURSOR = re.compile(r"[0-9a-f]{1,15}|[0-7][0-9a-f]{15}")
COPENHAGEN = ZoneInfo("Europe/Copenhagen")


def scoped(who: Operator, filters: dict[str, Any]) -> list[dict[str, Any]]:
    """The filters once per municipality the operator may see (as given when it sees all).

    The store filters by one municipality at a time, so a list or an action for an operator
    of several municipalities is one query per municipality, never one unrestricted query.
    """
    if filters.get("municipality") is not None:
        require_municipality(who, filters["municipality"])
        return [filters]
    if ALL_MUNICIPALITIES in who.municipalities:
        return [filters]
    return [{**filters, "municipality": m} for m in sorted(who.municipalities)]


async def gather_scoped(
    who: Operator,
    filters: dict[str, Any],
    query: Callable[[dict[str, Any]], Awaitable[list[dict[str, Any]]]],
) -> list[dict[str, Any]]:
    return [row for f in scoped(who, filters) for row in await query(f)]


async def require_deliveries(store: Store, who: Operator, ids: list[int]) -> None:
    """403 when one of these deliveries belongs to a municipality the operator may not touch."""
    rows = await store.list_deliveries({"ids": ids}, max(len(ids), 1))
    for municipality in sorted({r["municipality"] for r in rows}):
        require_municipality(who, municipality)


def parse_filters(
    raw: Mapping[str, Any],
    where: str,
    adapters: Collection[str] | None = None,
    keys: DataKeys | None = None,
) -> dict[str, Any]:
    """Known filter names only, each of its type; times as ISO-8601 (or epoch seconds).

    A municipality is 3 digits, an adapter one of ``adapters`` (the known ones), a period
    ``YYYY-MM``; a ``cpr`` (a full CPR number) becomes the keyed ``cpr_hash`` the store
    looks up with (``keys``): it is never stored, echoed or written anywhere."""
    unknown = set(raw) - set(FILTER_KEYS) - {"ids"}
    if unknown:
        raise InvalidReport(
            "unknown filter",
            [
                FieldError(f"{where}/{pointer_token(k)}", "is not a known filter")
                for k in sorted(unknown)
            ],
        )
    filters: dict[str, Any] = {}
    for key, value in raw.items():
        pointer = f"{where}/{key}"
        if key in ("since", "until"):
            filters[key] = _time(value, pointer)
        elif key == "ids":
            filters["ids"] = _ids(value, pointer)
        elif key == "at_risk":
            filters[key] = _flag(value, pointer)
        elif key == "cpr":
            filters["cpr_hash"] = _cpr_hash(value, pointer, keys)
        else:
            filters[key] = _text_filter(key, value, pointer, adapters)
    return filters


#: what a text filter's value must be, beyond readable text: (test, the message saying so)
TEXT_RULES: dict[str, tuple[Callable[[str], bool], str]] = {
    "status": (lambda v: v in STATES, f"must be one of: {', '.join(STATES)}"),
    "municipality": (lambda v: bool(MUNICIPALITY.fullmatch(v)), "must be 3 digits (kommunekode)"),
    "period": (lambda v: bool(PERIOD.fullmatch(v)), "must be a payroll period YYYY-MM"),
}


def _text_filter(key: str, value: Any, pointer: str, adapters: Collection[str] | None) -> str:
    if not isinstance(value, str) or not readable_text(value) or len(value) > 500:
        raise InvalidReport(
            f"bad {key}",
            [FieldError(pointer, "must be a text of at most 500 readable characters")],
        )
    test, message = TEXT_RULES.get(key, (lambda v: True, ""))
    if not test(value):
        raise InvalidReport(f"bad {key}", [FieldError(pointer, message)])
    if key == "adapter" and adapters is not None and value not in adapters:
        raise InvalidReport(
            "bad adapter", [FieldError(pointer, f"must be one of: {', '.join(sorted(adapters))}")]
        )
    return value


def _cpr_hash(value: Any, pointer: str, keys: DataKeys | None) -> str:
    """The lookup hash of a full CPR number; the value itself is never echoed."""
    if not isinstance(value, str) or not FULL_CPR.fullmatch(value) or keys is None:
        raise InvalidReport(
            "bad cpr", [FieldError(pointer, "must be a full CPR number (10 digits)")]
        )
    return cpr_lookup_hash(keys, value)


def encode_cursor(last_id: int) -> str:
    return format(last_id, "x")


def decode_cursor(raw: str | None) -> int | None:
    """The id a cursor continues after (None: the first page); 400 for one not given by us."""
    if raw is None:
        return None
    if not CURSOR.fullmatch(raw):
        raise BadRequest(
            "bad cursor",
            [FieldError("/cursor", "must be a next_cursor of an earlier answer")],
        )
    return int(raw, 16)


def day_start(now: float) -> float:
    """Local midnight (Europe/Copenhagen) of the day ``now`` falls in, as epoch seconds."""
    local = datetime.fromtimestamp(now, COPENHAGEN)
    return local.replace(hour=0, minute=0, second=0, microsecond=0).timestamp()


def _flag(value: Any, pointer: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in FLAGS:
        return FLAGS[value.lower()]
    raise InvalidReport("bad flag", [FieldError(pointer, f"must be one of: {', '.join(FLAGS)}")])


def _ids(value: Any, pointer: str) -> list[int]:
    if (
        not isinstance(value, list)
        or not value
        or len(value) > MAX_IDS
        or not all(type(i) is int and 0 < i <= MAX_ID for i in value)
    ):
        raise InvalidReport(
            "bad ids",
            [
                FieldError(
                    pointer,
                    f"must be an array of 1 to {MAX_IDS} delivery ids (positive 64-bit integers)",
                )
            ],
        )
    return value


def _time(value: Any, pointer: str) -> float:
    try:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError(value)
        moment = (
            float(value)
            if not isinstance(value, str)
            else datetime.fromisoformat(value).timestamp()
        )
        datetime.fromtimestamp(moment, UTC)  # in range for every engine
        return moment
    except (ValueError, OverflowError, OSError) as exc:
        raise InvalidReport(
            "bad time", [FieldError(pointer, "must be an ISO-8601 date or time")]
        ) from exc


def query_filters(request: web.Request) -> dict[str, Any]:
    """The list's filters from the query (``limit`` and ``cursor`` are not filters)."""
    raw = {k: v for k, v in request.query.items() if k not in ("limit", "cursor")}
    store = request.app[APP_STORE]
    try:
        return parse_filters(raw, "", request.app[APP_ADAPTERS], store.keys)
    except InvalidReport as exc:  # a bad query parameter is a bad request, not a bad body
        raise BadRequest(exc.detail, exc.errors) from exc


@routes.get("/v1/ops/deliveries")
async def list_deliveries(request: web.Request) -> web.Response:
    """Newest first, a page at a time: ``next_cursor`` continues after the page's last row;
    ``count`` is the whole result (every page, every municipality the operator sees)."""
    who = operator(request)
    filters = query_filters(request)
    limit = _limit(request)
    before = decode_cursor(request.query.get("cursor"))
    store = request.app[APP_STORE]
    selections = scoped(who, filters)
    rows = [
        row
        for f in selections
        for row in await store.list_deliveries({**f, "before_id": before}, limit + 1)
    ]
    rows.sort(key=lambda r: r["id"], reverse=True)
    page = rows[:limit]
    count = sum([await store.count_deliveries(f) for f in selections])
    next_cursor = encode_cursor(page[-1]["id"]) if len(rows) > limit else None
    _iso_times(page)
    return web.json_response({"deliveries": page, "count": count, "next_cursor": next_cursor})


@routes.get("/v1/ops/deliveries/{id}")
async def delivery_detail(request: web.Request) -> web.Response:
    """One delivery: its report (CPR masked), versions, attempts as sent, audit events."""
    who = operator(request)
    detail = await request.app[APP_STORE].delivery_detail(_id(request))
    if detail is None:
        raise NotFound("no such delivery")
    require_municipality(who, detail["municipality"])
    _iso_times(detail)
    return web.json_response(detail)


@routes.get("/v1/ops/overview")
async def overview(request: web.Request) -> web.Response:
    """Per endpoint the operator sees: deliveries by state shown, delivered today (since
    midnight Europe/Copenhagen), at risk, the oldest unfinished, the last hour's p95 latency,
    and the endpoint's breaker and pause (``endpoint``: null when no route is configured now)."""
    who = operator(request)
    now = time.time()
    start = day_start(now)
    views = {
        e.key: e.view(now) for e in request.app[APP_DISPATCHER].endpoints if who.covers(e.key[0])
    }
    rows = {
        (r["municipality"], r["adapter"]): r
        for r in await request.app[APP_STORE].overview(now, start)
        if who.covers(r["municipality"])
    }
    for key in views.keys() - rows.keys():
        rows[key] = empty_overview_row(*key)
    listed = [{**rows[k], "endpoint": views.get(k)} for k in sorted(rows)]
    answer = {"endpoints": listed, "day_start_at": start}
    _iso_times(answer)
    return web.json_response(answer)


@routes.get("/v1/ops/deliveries/{id}/audit")
async def delivery_audit(request: web.Request) -> web.Response:
    who = operator(request)
    rows = await request.app[APP_STORE].list_deliveries({"ids": [_id(request)]}, 1)
    if not rows:
        raise NotFound("no such delivery")
    require_municipality(who, rows[0]["municipality"])
    events = await request.app[APP_STORE].audit_for(_id(request))
    if not events:
        raise NotFound("no such delivery")
    _iso_times(events)
    return web.json_response({"events": events})


def _id(request: web.Request) -> int:
    raw = request.match_info["id"]
    if not (raw.isascii() and raw.isdecimal() and len(raw) <= 19) or not 0 < int(raw) <= MAX_ID:
        raise NotFound("no such delivery")
    return int(raw)


def _limit(request: web.Request) -> int:
    limit = request.query.get("limit", "200")
    if (
        not (limit.isascii() and limit.isdecimal() and len(limit) <= 4)
        or not 0 < int(limit) <= 5000
    ):
        raise BadRequest("limit must be a whole number from 1 to 5000")
    return int(limit)


def _text(value: Any, pointer: str, what: str) -> str:
    """A reason or reference as stored: readable text, at most 2000 characters."""
    if (
        not isinstance(value, str)
        or not value.strip()
        or len(value) > 2000
        or not readable_text(value)
    ):
        raise InvalidReport(
            f"{what} is required",
            [FieldError(pointer, "is required: a text of at most 2000 readable characters")],
        )
    return value.strip()


async def _act(
    request: web.Request,
    action: str,
    filters: dict[str, Any],
    reason: Any,
    vendor_reference: Any = None,
) -> dict[str, Any]:
    who = operator(request, ACTION_ROLES.get(action, "admin"))
    return await act(request.app, who, action, filters, reason, vendor_reference)


async def act(
    app: web.Application,
    who: Operator,
    action: str,
    filters: dict[str, Any],
    reason: Any,
    vendor_reference: Any = None,
) -> dict[str, Any]:
    """An operator's action on the selected deliveries, for the ops API and the console alike:
    role, scope and reason checked, the store's state machine applied, the dispatcher woken."""
    require_role(who, ACTION_ROLES.get(action, "admin"))
    reason = _text(reason, "/reason", "a reason")
    if not filters:
        raise InvalidReport(
            "select deliveries", [FieldError("/filter", "give ids or at least one filter")]
        )
    readback = [n for n, a in app[APP_ADAPTERS].items() if a.reads_back]
    if vendor_reference is not None:
        vendor_reference = _text(vendor_reference, "/vendor_reference", "a vendor_reference")
    if filters.get("ids"):
        await require_deliveries(app[APP_STORE], who, filters["ids"])
    result: dict[str, list[int]] = {"changed": [], "skipped": []}
    for selection in scoped(who, filters):
        done = await app[APP_STORE].operate(
            action, selection, who.name, reason, time.time(), readback, vendor_reference
        )
        for key in result:
            result[key] = sorted(result[key] + done[key])
    if result["changed"]:
        app[APP_DISPATCHER].wake()
    return {"action": action, "operator": who.name, **result}


def _action(request: web.Request) -> str:
    action = request.match_info["action"]
    if action not in ACTIONS:
        raise NotFound(f"unknown action {action!r} (known: {', '.join(ACTIONS)})")
    operator(request, ACTION_ROLES.get(action, "admin"))
    return action


@routes.post("/v1/ops/deliveries/{action}")
async def act_on_many(request: web.Request) -> web.Response:
    action = _action(request)
    body = await read_json(request)
    if not isinstance(body, dict):
        raise BadRequest("expected a JSON object with 'reason' and 'ids' or 'filter'")
    if not isinstance(body.get("filter", {}), dict):
        raise InvalidReport("bad filter", [FieldError("/filter", "must be an object")])
    raw = dict(body.get("filter") or {})
    if "ids" in body:
        raw["ids"] = body["ids"]
    filters = parse_filters(raw, "/filter", request.app[APP_ADAPTERS], request.app[APP_STORE].keys)
    return web.json_response(
        await _act(request, action, filters, body.get("reason"), body.get("vendor_reference"))
    )


@routes.post("/v1/ops/deliveries/{id}/{action}")
async def act_on_one(request: web.Request) -> web.Response:
    action = _action(request)
    body = await read_json(request)
    body = body if isinstance(body, dict) else {}
    result = await _act(
        request, action, {"ids": [_id(request)]}, body.get("reason"), body.get("vendor_reference")
    )
    if not result["changed"]:
        raise Conflict(
            f"delivery {_id(request)} cannot take '{action}' in its current state "
            "(or does not exist)"
        )
    return web.json_response(result)


@routes.get("/v1/ops/endpoints")
async def list_endpoints(request: web.Request) -> web.Response:
    who = operator(request)
    now = time.time()
    views = [e.view(now) for e in request.app[APP_DISPATCHER].endpoints if who.covers(e.key[0])]
    return web.json_response({"endpoints": views})


@routes.post("/v1/ops/endpoints/{municipality}/{adapter}/{action}")
async def pause_or_resume(request: web.Request) -> web.Response:
    action = request.match_info["action"]
    if action not in ("pause", "resume"):
        raise NotFound("the actions are pause and resume")
    who = operator(request, ACTION_ROLES[action])
    key = (request.match_info["municipality"], request.match_info["adapter"])
    require_municipality(who, key[0])
    if request.app[APP_DISPATCHER].endpoints.get(key) is None:
        raise NotFound(f"no route {key[0]} → {key[1]} is configured")
    body = await read_json(request)
    reason = body.get("reason") if isinstance(body, dict) else None
    return web.json_response(await pause_endpoint(request.app, who, key, action, reason))


async def pause_endpoint(
    app: web.Application, who: Operator, key: tuple[str, str], action: str, reason: Any
) -> dict[str, Any]:
    """Pause or resume one endpoint (ops API and console): recorded with the operator's name."""
    require_role(who, ACTION_ROLES[action])
    require_municipality(who, key[0])
    endpoint = app[APP_DISPATCHER].endpoints.get(key)
    if endpoint is None:
        raise NotFound(f"no route {key[0]} → {key[1]} is configured")
    reason = _text(reason, "/reason", "a reason")
    paused = action == "pause"
    await app[APP_STORE].set_paused(*key, paused, reason, who.name, time.time())
    endpoint.paused = reason if paused else None
    if not paused:
        await app[APP_STORE].undefer(*key, time.time())  # re-planned against the hours now
        app[APP_DISPATCHER].wake()
    view: dict[str, Any] = endpoint.view(time.time())
    return view


@routes.get("/v1/ops/rejections")
async def list_rejections(request: web.Request) -> web.Response:
    """Pulled records the gateway did not accept (and did not acknowledge), newest first."""
    who = operator(request)
    try:
        filters = rejection_filters(request.query)
    except InvalidReport as exc:  # a bad query parameter is a bad request, not a bad body
        raise BadRequest(exc.detail, exc.errors) from exc
    limit = _limit(request)
    store = request.app[APP_STORE]
    rows = await gather_scoped(who, filters, lambda f: store.list_rejections(f, limit))
    rows = sorted(rows, key=lambda r: (r["first_seen_at"], r["id"]), reverse=True)[:limit]
    _iso_times(rows)
    return web.json_response({"rejections": rows, "count": len(rows)})


REJECTION_FILTERS = ("municipality", "source", "kind", "record_id", "unresolved")


def rejection_filters(raw: Any) -> dict[str, Any]:
    unknown = sorted(set(raw) - set(REJECTION_FILTERS) - {"limit"})
    if unknown:
        raise InvalidReport(
            "unknown filter",
            [FieldError(f"/{pointer_token(k)}", "is not a known filter") for k in unknown],
        )
    filters: dict[str, Any] = {
        k: str(raw[k]) for k in ("municipality", "source", "kind", "record_id") if k in raw
    }
    if not all(readable_text(v) and len(v) <= 500 for v in filters.values()):
        raise InvalidReport(
            "bad filter",
            [FieldError("/", "filters must be texts of at most 500 readable characters")],
        )
    if "kind" in filters and filters["kind"] not in ("invalid", "conflict"):
        raise InvalidReport("bad kind", [FieldError("/kind", "must be 'invalid' or 'conflict'")])
    filters["unresolved"] = _flag(raw.get("unresolved", False), "/unresolved")
    return filters
