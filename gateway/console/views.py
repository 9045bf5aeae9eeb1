"""The console's routes: a sub-application mounted at ``/ui/`` (server-rendered, no CDN).

Every page but sign-in needs a session; every POST needs the form's CSRF token and a
same-site ``Origin``. Reading needs the role ``viewer``; actions go through the ops API's
own functions (``ops.act``, ``ops.pause_endpoint``), so roles, municipalities, reasons and
the audit trail work the same in both.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import jinja2
from aiohttp import web
from markupsafe import Markup

from .. import ops
from ..audit import anchor_path, load_key, read_anchors, verify
from ..auth import ACTION_ROLES, client_address, require_municipality, require_role
from ..errors import BadRequest, Forbidden, GatewayError, NotFound
from ..keys import (
    APP_ADAPTERS,
    APP_AUTH_FAILURES,
    APP_DISPATCHER,
    APP_SETTINGS,
    APP_STORE,
)
from ..privacy import mask_cpr
from ..settings import ALL_MUNICIPALITIES, Operator
from . import pages
from .passwords import dummy_hash, verify_password
from .sessions import (
    COOKIE,
    SIGNIN_COOKIE,
    SIGNIN_SECONDS,
    Session,
    clear_cookie,
    csrf_for,
    csrf_ok,
    new_token,
    same_origin,
    secure_cookies,
    set_cookie,
    token_hash,
)

log = logging.getLogger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
APP_PARENT: web.AppKey[web.Application] = web.AppKey("console_parent")
APP_TEMPLATES: web.AppKey[jinja2.Environment] = web.AppKey("console_templates")
APP_AUDIT_CACHE: web.AppKey[dict[str, Any]] = web.AppKey("console_audit_cache")
APP_OVERVIEW_CACHE: web.AppKey[dict[str, Any]] = web.AppKey("console_overview_cache")
OVERVIEW_TTL = 5.0
SESSION_KEY = web.RequestKey("console_session", Session)
PUBLIC = ("/ui/signin", "/ui/static/")
CSP = (
    "default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
DONE = {
    "replay": "Replay recorded: the delivery is queued again.",
    "cancel": "Cancelled.",
    "check": "Check recorded: the gateway asks the vendor what it holds.",
    "confirm": "Confirmed as delivered.",
    "pause": "Endpoint paused.",
    "resume": "Endpoint resumed.",
}
routes = web.RouteTableDef()


def mount(app: web.Application) -> None:
    """Serve the console under ``/ui/`` of ``app`` (the gateway)."""
    console = web.Application(middlewares=[guard])
    console[APP_PARENT] = app
    console[APP_TEMPLATES] = templates()
    console[APP_AUDIT_CACHE] = {}
    console[APP_OVERVIEW_CACHE] = {}
    console.add_routes(routes)
    static = resources.files("gateway.console") / "static"
    console.router.add_static("/static/", Path(str(static)), append_version=False)
    app.add_subapp("/ui/", console)
    app.router.add_get("/ui", _to_console)


async def _to_console(request: web.Request) -> web.StreamResponse:
    raise _redirect("/ui/")


def templates() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("gateway.console", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        finalize=_masked,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["when"] = pages.when
    env.filters["pretty"] = pages.pretty
    env.globals["tone"] = pages.TONE
    return env


def _masked(value: Any) -> Any:
    """Every printed text is CPR-masked (the CSRF token, marked safe, is left alone)."""
    if isinstance(value, str) and not isinstance(value, Markup):
        return mask_cpr(value)
    return value


# -- the guard: session, CSRF, origin, error pages -----------------------------------------


@web.middleware
async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        response = await _guarded(request, handler)
    except GatewayError as exc:
        fields = [(e.pointer.lstrip("/").replace("/", " "), e.message) for e in exc.errors]
        response = page(
            request, "error.html", exc.status, title=exc.title, detail=exc.detail, fields=fields
        )
        for name, value in exc.headers.items():
            response.headers[name] = value
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = page(
            request, "error.html", exc.status, title=exc.reason, detail=exc.reason, fields=[]
        )
    response.headers["Content-Security-Policy"] = CSP
    # not "no-referrer" (the API's): with it browsers post forms with "Origin: null"
    response.headers["Referrer-Policy"] = "same-origin"
    # report data never stays in a cache; the stylesheet and script may
    static = request.path.startswith("/ui/static/")
    response.headers["Cache-Control"] = "max-age=3600" if static else "no-store"
    return response


async def _guarded(request: web.Request, handler: Handler) -> web.StreamResponse:
    public = request.path.startswith(PUBLIC)
    if not public:
        session = await _session(request)
        if session is None:
            if request.method == "GET":
                raise _redirect("/ui/signin")
            raise Forbidden("sign in first (the session has ended)")
        request[SESSION_KEY] = session
    if request.method == "POST":
        await _check_post(request)
    return await handler(request)


async def _check_post(request: web.Request) -> None:
    if not same_origin(request):
        raise Forbidden("a form of another site was refused (Origin)")
    form = await request.post()
    token = (
        request.cookies.get(SIGNIN_COOKIE)
        if request.path == "/ui/signin"
        else request.cookies.get(COOKIE)
    )
    if not csrf_ok(token, form.get("csrf")):
        raise Forbidden("the form's CSRF token is missing or wrong: reload the page and try again")


async def _session(request: web.Request) -> Session | None:
    token = request.cookies.get(COOKIE)
    if not token or len(token) > 200:
        return None
    digest = token_hash(token)
    name = await _store(request).session_user(digest, time.time())
    account = _settings(request).accounts.get(name) if name is not None else None
    if account is None:  # expired, signed out, or the account was removed from the config
        return None
    return Session(account.operator(), digest, csrf_for(token))


def who(request: web.Request) -> Operator:
    return request[SESSION_KEY].who


def page(request: web.Request, template: str, status: int = 200, **values: Any) -> web.Response:
    session = request.get(SESSION_KEY)
    env = request.app[APP_TEMPLATES] if APP_TEMPLATES in request.app else templates()
    text = env.get_template(template).render(
        user=session.who if session else None,
        csrf=Markup(session.csrf) if session else "",
        path=request.path,
        **values,
    )
    return web.Response(text=text, status=status, content_type="text/html", charset="utf-8")


def _redirect(location: str) -> web.HTTPSeeOther:
    return web.HTTPSeeOther(location)


def _parent(request: web.Request) -> web.Application:
    return request.app[APP_PARENT]


def _store(request: web.Request) -> Any:
    return _parent(request)[APP_STORE]


def _settings(request: web.Request) -> Any:
    return _parent(request)[APP_SETTINGS]


# -- sign-in -----------------------------------------------------------------------------


@routes.get("/signin")
async def signin_form(request: web.Request) -> web.StreamResponse:
    if await _session(request) is not None:
        raise _redirect("/ui/")
    return _signin_page(request, 200, "")


def _signin_page(
    request: web.Request, status: int, message: str, username: str = ""
) -> web.Response:
    token = new_token()
    response = page(
        request,
        "signin.html",
        status,
        signin_csrf=Markup(csrf_for(token)),
        message=message,
        username=username,
    )
    set_cookie(response, SIGNIN_COOKIE, token, SIGNIN_SECONDS, secure_cookies(_settings(request)))
    return response


@routes.post("/signin")
async def signin(request: web.Request) -> web.StreamResponse:
    failures = _parent(request)[APP_AUTH_FAILURES]
    address = client_address(request)
    failures.check(address)
    form = await request.post()
    username, password = str(form.get("username", "")), str(form.get("password", ""))
    account = _settings(request).accounts.get(username)
    stored = account.password_hash if account is not None else dummy_hash()
    # scrypt takes ~50 ms of CPU and 16 MiB: in a thread, so the loop keeps serving
    matches = await asyncio.to_thread(verify_password, password, stored)
    if account is None or not matches or len(password) > 1024:
        failures.fail(address)
        return _signin_page(request, 401, "Wrong user name or password.", username[:64])
    token = new_token()
    now = time.time()
    settings = _settings(request)
    await _store(request).create_session(
        token_hash(token), account.name, now, now + settings.session_hours * 3600
    )
    response = web.HTTPSeeOther("/ui/")
    secure = secure_cookies(settings)
    set_cookie(response, COOKIE, token, int(settings.session_hours * 3600), secure)
    clear_cookie(response, SIGNIN_COOKIE, secure)
    log.info("console: %s signed in", account.name)
    raise response


@routes.post("/signout")
async def signout(request: web.Request) -> web.StreamResponse:
    await _store(request).end_session(request[SESSION_KEY].token_hash)
    response = web.HTTPSeeOther("/ui/signin")
    clear_cookie(response, COOKIE, secure_cookies(_settings(request)))
    raise response


# -- overview ----------------------------------------------------------------------------


@routes.get("/")
async def overview(request: web.Request) -> web.Response:
    now = time.time()
    store = _store(request)
    rows = await _overview_rows(request, now)
    endpoints = [e.view(now) for e in _parent(request)[APP_DISPATCHER].endpoints]
    breakers = await store.breakers_open(now)
    shown = pages.overview_rows(rows, endpoints, breakers, who(request), now)
    tenants = _settings(request).tenants
    for row in shown:
        tenant = tenants.get(row["municipality"])
        row["name"] = tenant.name if tenant is not None else ""
    rejections = await ops.gather_scoped(
        who(request), {"unresolved": True}, lambda f: store.list_rejections(f, 20)
    )
    rejections = sorted(rejections, key=lambda r: (r["first_seen_at"], r["id"]), reverse=True)
    totals = {name: sum(r[name] for r in shown) for name, _, _ in pages.COUNTS}
    return page(
        request,
        "overview.html",
        rows=shown,
        counts=pages.COUNTS,
        totals=totals,
        rejections=rejections[:20],
        done=DONE.get(request.query.get("done", "")),
        now=now,
    )


async def _overview_rows(request: web.Request, now: float) -> list[dict[str, Any]]:
    """The store's counts, shared by every viewer for :data:`OVERVIEW_TTL` seconds: they cost
    a scan of the deliveries (about 0.7 s at 100,000), and open overviews refresh themselves."""
    cache = request.app[APP_OVERVIEW_CACHE]
    lock = cache.setdefault("lock", asyncio.Lock())
    async with lock:
        if now - cache.get("at", 0.0) >= OVERVIEW_TTL:
            cache["rows"] = await _store(request).overview(now, ops.day_start(now))
            cache["at"] = now
        rows: list[dict[str, Any]] = cache["rows"]
    return [dict(r) for r in rows]


# -- deliveries --------------------------------------------------------------------------


@routes.get("/deliveries")
async def deliveries(request: web.Request) -> web.Response:
    filters = _filters(request, request.query)
    before = pages.cursor(request.query)
    rows = await _list(request, filters, before, pages.PAGE_SIZE + 1)
    more = len(rows) > pages.PAGE_SIZE
    rows = rows[: pages.PAGE_SIZE]
    count = await _count(request, filters)
    next_query = (
        urlencode(pages.link_query(filters, before=rows[-1]["id"])) if more and rows else None
    )
    return page(
        request,
        "deliveries.html",
        rows=rows,
        count=count,
        filters=filters,
        summary=pages.filter_summary(filters),
        next_query=next_query,
        first_query=urlencode(pages.link_query(filters)) if before else None,
        filter_query=urlencode(pages.link_query(filters)),
        states=pages.STATES,
        municipalities=_municipalities(request),
        adapters=sorted({a for _, a in _endpoint_keys(request)}),
        done=DONE.get(request.query.get("done", "")),
        changed=request.query.get("changed"),
    )


@routes.post("/deliveries/search")
async def search(request: web.Request) -> web.StreamResponse:
    """The filter form is posted, so that a CPR typed in it never ends up in a URL (history,
    proxies): the list's address carries the CPR's keyed hash instead."""
    form = await request.post()
    filters = _filters(request, {k: str(v) for k, v in form.items()})
    raise _redirect("/ui/deliveries?" + urlencode(pages.link_query(filters)))


def _filters(request: web.Request, query: Mapping[str, str]) -> dict[str, Any]:
    adapters = _parent(request)[APP_ADAPTERS]
    return pages.delivery_filters(query, list(adapters), _store(request).keys)


async def _list(
    request: web.Request, filters: dict[str, Any], before: int | None, limit: int
) -> list[dict[str, Any]]:
    """Newest first across the operator's municipalities (one keyset query each)."""
    store = _store(request)
    selection = {**filters, "before_id": before} if before is not None else filters
    rows = await ops.gather_scoped(
        who(request), selection, lambda f: store.list_deliveries(f, limit)
    )
    return sorted(rows, key=lambda r: r["id"], reverse=True)[:limit]


async def _count(request: web.Request, filters: dict[str, Any]) -> int:
    store = _store(request)
    return sum([await store.count_deliveries(f) for f in ops.scoped(who(request), filters)])


def _endpoint_keys(request: web.Request) -> list[tuple[str, str]]:
    return sorted(
        e.key for e in _parent(request)[APP_DISPATCHER].endpoints if who(request).covers(e.key[0])
    )


def _municipalities(request: web.Request) -> list[str]:
    operator = who(request)
    known = sorted(_settings(request).tenants)
    if ALL_MUNICIPALITIES in operator.municipalities:
        return known
    return [m for m in known if m in operator.municipalities]


@routes.get("/deliveries/{id}")
async def delivery(request: web.Request) -> web.Response:
    detail = await _detail(request)
    adapter = _parent(request)[APP_ADAPTERS].get(detail["adapter"])
    reads_back = bool(adapter is not None and adapter.reads_back)
    return page(
        request,
        "delivery.html",
        d=detail,
        actions=pages.actions_for(detail["status"], reads_back, who(request)),
        done=DONE.get(request.query.get("done", "")),
    )


async def _detail(request: web.Request) -> dict[str, Any]:
    raw = request.match_info["id"]
    if not pages.ID.fullmatch(raw) or int(raw) > ops.MAX_ID:
        raise NotFound("no such delivery")
    detail: dict[str, Any] | None = await _store(request).delivery_detail(int(raw))
    # another municipality's delivery is not there, for this operator
    if detail is None or not who(request).covers(detail["municipality"]):
        raise NotFound("no such delivery")
    return detail


@routes.post("/deliveries/{id}/{action}")
async def act_on_one(request: web.Request) -> web.StreamResponse:
    action = request.match_info["action"]
    if action not in ops.ACTIONS:
        raise NotFound(f"unknown action {action!r}")
    detail = await _detail(request)
    form = await request.post()
    reference = form.get("vendor_reference") if action == "confirm" else None
    result = await ops.act(
        _parent(request),
        who(request),
        action,
        {"ids": [detail["id"]]},
        form.get("reason"),
        reference,
    )
    if not result["changed"]:
        raise web.HTTPConflict(reason=f"this delivery cannot take {action} in its current state")
    raise _redirect(f"/ui/deliveries/{detail['id']}?done={action}")


@routes.post("/bulk")
async def bulk(request: web.Request) -> web.StreamResponse:
    """Replay or cancel a filtered list: the first post shows how many and asks; the second
    (``confirm``) acts on exactly the deliveries counted then."""
    form = await request.post()
    action = str(form.get("action", ""))
    if action not in ("replay", "cancel"):
        raise BadRequest("a bulk action is replay or cancel")
    operator = who(request)
    filters = _filters(request, {k: str(v) for k, v in form.items()})
    if form.get("confirm") == "yes":
        ids = _ids(str(form.get("ids", "")))
        result = await ops.act(_parent(request), operator, action, {"ids": ids}, form.get("reason"))
        query = pages.link_query(filters, done=action, changed=len(result["changed"]))
        raise _redirect("/ui/deliveries?" + urlencode(query))
    require_role(operator, ACTION_ROLES[action])
    if not filters:
        raise BadRequest("filter the list first: a bulk action never takes every delivery")
    rows = await _list(request, filters, None, pages.MAX_BULK + 1)
    return page(
        request,
        "bulk.html",
        action=action,
        ids=" ".join(str(r["id"]) for r in rows[: pages.MAX_BULK]),
        count=min(len(rows), pages.MAX_BULK),
        too_many=len(rows) > pages.MAX_BULK,
        reason=str(form.get("reason", "")),
        filters=pages.link_query(filters),
        summary=pages.filter_summary(filters),
    )


def _ids(text: str) -> list[int]:
    parts = text.split()
    if not parts or len(parts) > pages.MAX_BULK or not all(pages.ID.fullmatch(p) for p in parts):
        raise BadRequest("the confirmed list of deliveries is missing or malformed")
    return [int(p) for p in parts]


# -- endpoints ---------------------------------------------------------------------------


@routes.post("/endpoints/{municipality}/{adapter}/{action}")
async def pause_or_resume(request: web.Request) -> web.StreamResponse:
    action = request.match_info["action"]
    if action not in ("pause", "resume"):
        raise NotFound("the actions are pause and resume")
    key = (request.match_info["municipality"], request.match_info["adapter"])
    require_municipality(who(request), key[0])
    form = await request.post()
    await ops.pause_endpoint(_parent(request), who(request), key, action, form.get("reason"))
    raise _redirect(f"/ui/?done={action}")


# -- audit -------------------------------------------------------------------------------

AUDIT_PAGE = 100
AUDIT_SCAN = 5000  # events looked at per page for an operator of some municipalities
VERIFY_EVERY = 600.0  # seconds a verification result is shown before the page runs it again


@routes.get("/audit")
async def audit(request: web.Request) -> web.Response:
    before = pages.cursor(request.query)
    events, more = await _audit_page(request, before)
    status = await _chain_status(request, request.query.get("verify") == "1")
    return page(
        request,
        "audit.html",
        events=events,
        next_before=events[-1]["id"] if more and events else None,
        first=before is not None,
        chain=status,
    )


async def _audit_page(
    request: web.Request, before: int | None
) -> tuple[list[dict[str, Any]], bool]:
    """The newest events the operator may see: those of its municipalities (an event of no
    municipality, such as a purge, only for an operator of all)."""
    store, operator = _store(request), who(request)
    shown: list[dict[str, Any]] = []
    scanned = 0
    while len(shown) <= AUDIT_PAGE and scanned < AUDIT_SCAN:
        batch = await store.audit_events(before, 500)
        if not batch:
            return shown, False
        scanned += len(batch)
        before = batch[-1]["id"]
        shown += [e for e in batch if _may_see(operator, e.get("municipality"))]
    return shown[:AUDIT_PAGE], True


def _may_see(operator: Operator, municipality: Any) -> bool:
    if ALL_MUNICIPALITIES in operator.municipalities:
        return True
    return isinstance(municipality, str) and operator.covers(municipality)


async def _chain_status(request: web.Request, again: bool) -> dict[str, Any]:
    """``audit verify`` for the page. It reads the whole trail (seconds for a million events),
    so it runs when asked, on the first visit, and when the last result is older than
    :data:`VERIFY_EVERY`; one run at a time, whoever asks."""
    cache = request.app[APP_AUDIT_CACHE]
    lock = cache.setdefault("lock", asyncio.Lock())
    async with lock:
        last = cache.get("result")
        if last is not None and not again and time.time() - last["at"] < VERIFY_EVERY:
            return dict(last)
        result = await _verify(request)
        cache["result"] = result
        return dict(result)


async def _verify(request: web.Request) -> dict[str, Any]:
    store, settings = _store(request), _settings(request)
    events = await store.audit_chain()
    attempts = await store.audit_attempts()
    try:
        key = load_key(settings.audit, settings.data_dir, create=False)
        anchors = read_anchors(anchor_path(settings.audit, settings.data_dir))
        problem = await asyncio.to_thread(verify, events, attempts, key, anchors)
        result = {"ok": problem is None, "text": str(problem) if problem else "intact"}
    except Exception as exc:  # a missing key file is a status to show, not a broken page
        result = {"ok": False, "text": f"cannot verify: {exc}"}
    result.update(events=len(events), at=time.time())
    return result
