"""``GET /v1/ops/alerts``: the alerts (open, or all), newest first, read-only.

Each alert shows its cause, its payload (counts and a few delivery ids, never a CPR), when
it opened and resolved (ISO 8601), and the state of each of its notifications. An operator
sees the alerts of the municipalities it may see.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from .auth import operator
from .errors import BadRequest
from .intake import _iso_times
from .keys import APP_STORE
from .ops import _limit

routes = web.RouteTableDef()
STATES = ("open", "all")


@routes.get("/v1/ops/alerts")
async def list_alerts(request: web.Request) -> web.Response:
    who = operator(request)
    state = request.query.get("state", "open")
    if state not in STATES:
        raise BadRequest("state must be open or all")
    limit = _limit(request)
    rows = await request.app[APP_STORE].list_alerts(state == "open", limit)
    alerts: list[dict[str, Any]] = [
        _public(a) for a in rows if who.covers(str(a["payload"].get("municipality", "")))
    ]
    _iso_times(alerts)
    return web.json_response({"count": len(alerts), "alerts": alerts})


def _public(alert: dict[str, Any]) -> dict[str, Any]:
    view = {k: v for k, v in alert.items() if k not in ("id", "uid")}
    return {"id": alert["uid"], "state": "resolved" if alert["resolved_at"] else "open", **view}
