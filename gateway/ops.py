"""The operations API: what is stuck and why, and the actions that fix it without a database.

Every request carries an operator token (``[operators.NAME] token_hash`` in the config);
the operator's role says what it may do (``auth.ACTION_ROLES``; reading needs ``viewer``) and
its municipalities what it may see and touch. The operator's name is written to the audit
trail with every action, and every action needs a reason.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

from aiohttp import web

from . import deliveries
from .auth import ACTION_ROLES, operator, require_municipality
from .errors import BadRequest, Conflict, FieldError, InvalidReport, NotFound
from .intake import _iso_times, read_json
from .keys import APP_ADAPTERS, APP_DISPATCHER, APP_STORE
from .settings import ALL_MUNICIPALITIES, Operator

routes = web.RouteTableDef()
ACTIONS = tuple(deliveries.ACTIONS)  # what each may do is the state machine's to say
FILTER_KEYS = ("municipality", "adapter", "status", "report_id", "since", "until", "error", "at_risk")


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


async def gather_scoped(who: Operator, filters: dict[str, Any],
                        query: Callable[[dict[str, Any]], Awaitable[list[dict[str, Any]]]]) -> list[dict[str, Any]]:
    return [row for f in scoped(who, filters) for row in await query(f)]


async def require_deliveries(request: web.Request, who: Operator, ids: list[int]) -> None:
    """403 when one of these deliveries belongs to a municipality the operator may not touch."""
    rows = await request.app[APP_STORE].list_deliveries({"ids": ids}, max(len(ids), 1))
    for municipality in sorted({r["municipality"] for r in rows}):
        require_municipality(who, municipality)


def parse_filters(raw: dict[str, Any], where: str) -> dict[str, Any]:
    """Known filter names only; times as ISO-8601 (or epoch seconds)."""
    unknown = set(raw) - set(FILTER_KEYS) - {"ids"}
    if unknown:
        raise InvalidReport("unknown filter", [FieldError(f"{where}/{k}", "is not a known filter") for k in sorted(unknown)])
    filters: dict[str, Any] = {}
    for key, value in raw.items():
        if key in ("since", "until"):
            filters[key] = _time(value, f"{where}/{key}")
        elif key == "ids":
            if not isinstance(value, list) or not all(isinstance(i, int) for i in value):
                raise InvalidReport("bad ids", [FieldError(f"{where}/ids", "must be an array of delivery ids")])
            filters["ids"] = value
        elif key == "at_risk":
            filters[key] = str(value).lower() in ("1", "true", "yes")
        else:
            filters[key] = str(value)
    return filters


def _time(value: Any, pointer: str) -> float:
    try:
        return float(value) if isinstance(value, (int, float)) else datetime.fromisoformat(str(value)).timestamp()
    except ValueError as exc:
        raise InvalidReport("bad time", [FieldError(pointer, "must be an ISO-8601 date or time")]) from exc


@routes.get("/v1/ops/deliveries")
async def list_deliveries(request: web.Request) -> web.Response:
    who = operator(request)
    raw = {k: v for k, v in request.query.items() if k != "limit"}
    limit = request.query.get("limit", "200")
    if not limit.isdigit() or not 0 < int(limit) <= 5000:
        raise BadRequest("limit must be a whole number from 1 to 5000")
    store = request.app[APP_STORE]
    rows = await gather_scoped(who, parse_filters(raw, ""), lambda f: store.list_deliveries(f, int(limit)))
    rows = sorted(rows, key=lambda r: r["id"])[:int(limit)]
    _iso_times(rows)
    return web.json_response({"deliveries": rows, "count": len(rows)})


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
    if not raw.isdigit():
        raise NotFound("no such delivery")
    return int(raw)


async def _act(request: web.Request, action: str, filters: dict[str, Any], reason: Any,
               vendor_reference: Any = None) -> dict[str, Any]:
    who = operator(request, ACTION_ROLES.get(action, "admin"))
    if not isinstance(reason, str) or not reason.strip():
        raise InvalidReport("a reason is required", [FieldError("/reason", "is required: say why")])
    if not filters:
        raise InvalidReport("select deliveries", [FieldError("/filter", "give ids or at least one filter")])
    app = request.app
    readback = [n for n, a in app[APP_ADAPTERS].items() if a.reads_back]
    if vendor_reference is not None and not isinstance(vendor_reference, str):
        raise InvalidReport("bad vendor_reference", [FieldError("/vendor_reference", "must be a string")])
    if filters.get("ids"):
        await require_deliveries(request, who, filters["ids"])
    result: dict[str, list[int]] = {"changed": [], "skipped": []}
    for selection in scoped(who, filters):
        done = await app[APP_STORE].operate(action, selection, who.name, reason.strip(), time.time(),
                                            readback, vendor_reference)
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
    raw = dict(body.get("filter") or {})
    if "ids" in body:
        raw["ids"] = body["ids"]
    return web.json_response(await _act(request, action, parse_filters(raw, "/filter"), body.get("reason"),
                                        body.get("vendor_reference")))


@routes.post("/v1/ops/deliveries/{id}/{action}")
async def act_on_one(request: web.Request) -> web.Response:
    action = _action(request)
    body = await read_json(request)
    body = body if isinstance(body, dict) else {}
    result = await _act(request, action, {"ids": [_id(request)]}, body.get("reason"),
                        body.get("vendor_reference"))
    if not result["changed"]:
        raise Conflict(f"delivery {_id(request)} cannot take '{action}' in its current state "
                       "(or does not exist)")
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
    endpoint = request.app[APP_DISPATCHER].endpoints.get(key)
    if endpoint is None:
        raise NotFound(f"no route {key[0]} → {key[1]} is configured")
    body = await read_json(request)
    reason = body.get("reason") if isinstance(body, dict) else None
    if not isinstance(reason, str) or not reason.strip():
        raise InvalidReport("a reason is required", [FieldError("/reason", "is required: say why")])
    paused = action == "pause"
    await request.app[APP_STORE].set_paused(*key, paused, reason.strip(), who.name, time.time())
    endpoint.paused = reason.strip() if paused else None
    if not paused:
        await request.app[APP_STORE].undefer(*key, time.time())  # re-planned against the hours now
        request.app[APP_DISPATCHER].wake()
    return web.json_response(endpoint.view(time.time()))


@routes.get("/v1/ops/rejections")
async def list_rejections(request: web.Request) -> web.Response:
    """Pulled records the gateway did not accept (and did not acknowledge), newest first."""
    who = operator(request)
    filters = rejection_filters(request.query)
    limit = request.query.get("limit", "200")
    if not limit.isdigit() or not 0 < int(limit) <= 5000:
        raise BadRequest("limit must be a whole number from 1 to 5000")
    store = request.app[APP_STORE]
    rows = await gather_scoped(who, filters, lambda f: store.list_rejections(f, int(limit)))
    rows = sorted(rows, key=lambda r: (r["first_seen_at"], r["id"]), reverse=True)[:int(limit)]
    _iso_times(rows)
    return web.json_response({"rejections": rows, "count": len(rows)})


REJECTION_FILTERS = ("municipality", "source", "kind", "record_id", "unresolved")


def rejection_filters(raw: Any) -> dict[str, Any]:
    unknown = sorted(set(raw) - set(REJECTION_FILTERS) - {"limit"})
    if unknown:
        raise InvalidReport("unknown filter", [FieldError(f"/{k}", "is not a known filter") for k in unknown])
    filters: dict[str, Any] = {k: str(raw[k]) for k in ("municipality", "source", "kind", "record_id") if k in raw}
    if "kind" in filters and filters["kind"] not in ("invalid", "conflict"):
        raise InvalidReport("bad kind", [FieldError("/kind", "must be 'invalid' or 'conflict'")])
    filters["unresolved"] = str(raw.get("unresolved", "")).lower() in ("1", "true", "yes")
    return filters
