"""The aiohttp application: intake API, health, metrics, OpenAPI; store and dispatcher as resources."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from adapters.base import Adapter
from adapters.registry import load_adapters
from adapters.resources import schema_text

from . import compat, intake, ops, ops_alerts, retention
from .alerts import Alerts
from .audit import Anchor, anchor_path, load_key
from .auth import AuthFailures, metrics_token
from .channels import Channels
from .console import views as console
from .dispatcher import Dispatcher, build_endpoints
from .errors import ConfigError, GatewayError
from .filerun import FileRunner
from .keys import (
    APP_ADAPTERS,
    APP_ALERTS,
    APP_AUTH_FAILURES,
    APP_CALENDARS,
    APP_DISPATCHER,
    APP_ENDPOINTS,
    APP_FILE_RUNNER,
    APP_METRICS,
    APP_SETTINGS,
    APP_SOURCES,
    APP_STORE,
    APP_WATCH,
)
from .logs import correlation_id
from .metrics import Metrics
from .metrics import snapshot as metrics_snapshot
from .payroll_calendar import CutoffCalendar
from .privacy import keys_for, mask_cpr
from .settings import Settings, parse_role
from .sources import build_pullers
from .store import Store, open_store
from .watch import AtRiskWatch

log = logging.getLogger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
PROBLEM = "application/problem+json"
LEASE_MARGIN_SECONDS = 10.0


@web.middleware
async def correlation(request: web.Request, handler: Handler) -> web.StreamResponse:
    # a caller's id is logged and echoed: a CPR number in it is masked in both
    # 32 random hex digits, as uuid4().hex gave, at a fifth of its cost (a hot path)
    rid = mask_cpr((request.headers.get("X-Request-ID") or os.urandom(16).hex())[:64])
    token = correlation_id.set(rid)
    try:
        response = await handler(request)
        response.headers["X-Request-ID"] = rid
        return response
    finally:
        correlation_id.reset(token)


access_log = logging.getLogger("gateway.access")


@web.middleware
async def access(request: web.Request, handler: Handler) -> web.StreamResponse:
    """One line per request: method, path (never the query), status, duration."""
    started = time.monotonic()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        duration = round((time.monotonic() - started) * 1000, 2)
        fields = {
            "method": request.method,
            "path": request.path,
            "status": status,
            "duration_ms": duration,
        }
        access_log.info(
            "%s %s %d %.2f ms", request.method, request.path, status, duration, extra=fields
        )


def problem_response(
    status: int, body: dict[str, object], headers: Mapping[str, str] | None = None
) -> web.Response:
    # the last guard of "never echo a CPR": whatever a message quotes, a CPR leaves masked
    return web.Response(
        status=status, text=mask_cpr(json.dumps(body)), content_type=PROBLEM, headers=headers
    )


def _plain_problem(status: int, title: str, detail: str, instance: str) -> dict[str, object]:
    return {
        "type": "about:blank",
        "title": title,
        "status": status,
        "detail": detail,
        "instance": instance,
    }


@web.middleware
async def problems(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error leaves as RFC 9457 problem+json; nothing leaks a traceback."""
    try:
        return await handler(request)
    except GatewayError as exc:
        return problem_response(exc.status, exc.problem(request.path), exc.headers)
    except web.HTTPRequestEntityTooLarge:
        limit = request.app[APP_SETTINGS].max_body_bytes
        return problem_response(
            413,
            {
                **_plain_problem(
                    413, "Payload too large", f"the body is larger than {limit} bytes", request.path
                ),
                "limit": limit,
            },
        )
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        allow = (
            {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        )  # 405 says what is allowed
        return problem_response(
            exc.status, _plain_problem(exc.status, exc.reason, exc.reason, request.path), allow
        )
    except Exception as exc:  # a bug: say so without details, log it masked
        log.error("unhandled error on %s %s: %s", request.method, request.path, mask_cpr(repr(exc)))
        return problem_response(
            500,
            _plain_problem(
                500,
                "Internal error",
                "an internal error occurred; it has been logged",
                request.path,
            ),
        )


def _protocol_problem(
    self: RequestHandler,
    request: BaseRequest,
    status: int = 500,
    exc: BaseException | None = None,
    message: str | None = None,
) -> web.StreamResponse:
    """aiohttp's own answer to a request it cannot parse (bad request line, bad or too long
    headers), as problem+json. Its plain-text page quotes the request line, which may hold a
    CPR; so does its log line: this one names only the kind of error."""
    if request.writer.output_size > 0:
        raise ConnectionError("a response was sent already; the connection is closed")
    log.warning(
        "unreadable HTTP request (%d): %s", status, type(exc).__name__ if exc else "unknown"
    )
    try:
        title = HTTPStatus(status).phrase
    except ValueError:
        title = "Error"
    detail = (
        "the request could not be read as HTTP/1.1"
        if status < 500
        else "an internal error occurred; it has been logged"
    )
    response = problem_response(status, _plain_problem(status, title, detail, "/"))
    response.force_close()
    return response


def _serves_gateway(handler: RequestHandler) -> bool:
    app = getattr(getattr(handler, "_manager", None), "request_handler", None)
    return APP_SETTINGS in getattr(app, "__self__", {})


def _install_protocol_problems() -> None:
    """aiohttp has no hook for these pages, so the method is wrapped once, for gateway apps only
    (the simulators, which stand in for vendors, keep aiohttp's own pages)."""
    original = RequestHandler.handle_error
    if getattr(original, "_gateway", False):
        return

    def handle_error(
        self: RequestHandler,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if _serves_gateway(self):
            return _protocol_problem(self, request, status, exc, message)
        return original(self, request, status, exc, message)

    handle_error._gateway = True  # type: ignore[attr-defined]
    RequestHandler.handle_error = handle_error  # type: ignore[method-assign]


_install_protocol_problems()


SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "default-src 'none'",  # JSON and text only; a page may set its own
}


async def security_headers(request: web.Request, response: web.StreamResponse) -> None:
    """On every answer, errors too; ``no-store`` wherever report data or a problem may show.

    A response-prepare signal rather than a middleware, so that it holds whatever the
    middlewares answer (and in whichever order they run).
    """
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    if request.path.startswith("/v1/") or response.content_type == PROBLEM:
        response.headers["Cache-Control"] = "no-store"


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    try:
        ok = await asyncio.wait_for(request.app[APP_STORE].ping(), 2)
    except Exception:
        ok = False
    return web.json_response(
        {"status": "ready" if ok else "store unreachable"}, status=200 if ok else 503
    )


async def metrics(request: web.Request) -> web.Response:
    metrics_token(request)
    app = request.app
    values = await metrics_snapshot(app[APP_STORE])
    registry = app[APP_METRICS]
    sources = app[APP_SOURCES]
    registry.refresh(values, app[APP_DISPATCHER].endpoints, sources, time.time())
    body, content_type = registry.exposition(request.headers.get("Accept", ""))
    return web.Response(body=body, headers={"Content-Type": content_type})


async def openapi(request: web.Request) -> web.Response:
    return web.Response(text=schema_text("openapi.json"), content_type="application/json")


def build_calendars(settings: Settings) -> dict[tuple[str, str], CutoffCalendar]:
    """The payroll cut-off calendar of each (municipality, adapter) that configures one."""
    calendars = {}
    for municipality, tenant in settings.tenants.items():
        for adapter, policy in tenant.endpoints.items():
            if policy.cutoff is None:
                continue
            try:
                calendars[(municipality, adapter)] = CutoffCalendar.from_config(policy.cutoff)
            except ValueError as exc:
                raise ConfigError(
                    f"tenants.{municipality}.vendors.{adapter}.cutoff: {exc}"
                ) from exc
    return calendars


def warn_short_leases(settings: Settings) -> None:
    """A lease shorter than a request could make two dispatchers send the same delivery."""
    for municipality, tenant in settings.tenants.items():
        for adapter, vendor in tenant.vendors.items():
            needed = vendor.connect_timeout + vendor.read_timeout + LEASE_MARGIN_SECONDS
            if settings.lease_seconds < needed:
                log.warning(
                    "dispatcher.lease_seconds (%g) should be at least %g: the request timeouts of "
                    "tenants.%s.vendors.%s plus a %g s margin",
                    settings.lease_seconds,
                    needed,
                    municipality,
                    adapter,
                    LEASE_MARGIN_SECONDS,
                )


def check_routes(settings: Settings, adapters: Mapping[str, Adapter]) -> None:
    """Every route names a loaded adapter that handles that kind of report."""
    for municipality, tenant in settings.tenants.items():
        for kind, name in tenant.routes.items():
            where = f"tenants.{municipality}.routes.{kind}"
            if name not in adapters:
                known = ", ".join(sorted(adapters)) or "none"
                raise ConfigError(f"{where}: unknown or disabled adapter {name!r} (known: {known})")
            if kind not in adapters[name].kinds:
                raise ConfigError(f"{where}: adapter {name!r} does not deliver {kind} reports")


def create_app(
    settings: Settings,
    *,
    store: Store | None = None,
    adapters: Mapping[str, Adapter] | None = None,
    run_dispatcher: bool = True,
    role: str | None = None,
) -> web.Application:
    """The gateway as one aiohttp application, doing what its role says (DESIGN.md §5).

    ``intake`` serves the intake, compat and ops API and runs no background work;
    ``dispatch`` runs the dispatcher, file runs, at-risk watch and pull sources and serves
    only ``/healthz``, ``/readyz`` and ``/metrics``; ``all`` does both. ``role`` overrides
    ``settings.role``; ``run_dispatcher=False`` (tests) keeps the background work stopped.
    """
    role = parse_role(role if role is not None else settings.role, "role")
    app = web.Application(
        middlewares=[correlation, access, problems], client_max_size=settings.max_body_bytes
    )
    app[APP_SETTINGS] = settings
    app[APP_METRICS] = Metrics()
    app[APP_AUTH_FAILURES] = AuthFailures(settings.auth_failures_per_minute)
    app.on_response_prepare.append(security_headers)
    app[APP_ADAPTERS] = (
        adapters if adapters is not None else load_adapters(settings.disabled_adapters)
    )
    check_routes(settings, app[APP_ADAPTERS])
    app[APP_CALENDARS] = build_calendars(settings)
    # after the config checks: a key file is generated (SQLite, no key configured) only for a
    # gateway that will start; PostgreSQL without a configured key refuses here. The audit key
    # is read (or, the first time, generated) before anything is stored.
    if store is None:
        store = open_store(
            settings.store_url,
            settings.store_pool_size,
            keys_for(settings.data_keys, settings.store_url),
            load_key(settings.audit, settings.data_dir),
        )
    app[APP_STORE] = store
    FileRunner(app[APP_STORE], app[APP_ADAPTERS], settings).check_schedules()
    app[APP_ENDPOINTS] = build_endpoints(settings, app[APP_ADAPTERS])
    warn_short_leases(settings)
    if role != "dispatch":
        app.add_routes(intake.routes)
        app.add_routes(compat.routes)
        app.add_routes(ops.routes)
        app.add_routes(ops_alerts.routes)
        console.mount(app)
        app.add_routes([web.get("/openapi.json", openapi)])
    app.add_routes(
        [web.get("/healthz", healthz), web.get("/readyz", readyz), web.get("/metrics", metrics)]
    )
    background = run_dispatcher and role != "intake"
    app.cleanup_ctx.append(_store_ctx)
    app.cleanup_ctx.append(_dispatcher_ctx(background))
    app.cleanup_ctx.append(_sources_ctx(background))
    return app


async def _store_ctx(app: web.Application) -> AsyncIterator[None]:
    """The store, and the anchor of its audit trail's head (at start, every N events, at shutdown)."""
    store, settings = app[APP_STORE], app[APP_SETTINGS]
    await store.open()
    anchor = Anchor(
        anchor_path(settings.audit, settings.data_dir),
        settings.audit.anchor_every,
        store.audit_head,
    )
    await anchor.check(force=True)
    task = asyncio.create_task(anchor.run(), name="audit-anchor")
    yield
    await stop_tasks([task])
    try:
        await anchor.check(force=True)
    except Exception as exc:  # the store may be gone already: say so, close anyway
        log.error("could not anchor the audit head at shutdown: %s", exc)
    await store.aclose()


STOP_SECONDS = 15.0  # how long a background task may take to end once cancelled


async def stop_tasks(tasks: Sequence[asyncio.Task[Any]], within: float = STOP_SECONDS) -> None:
    """Cancel ``tasks`` and wait for them, at most ``within`` seconds in all: a task that does
    not end (it swallowed its cancellation, or waits on something that never comes) is named
    in the log and left behind, so that shutting down never hangs."""
    for task in tasks:
        task.cancel()
    if not tasks:
        return
    done, pending = await asyncio.wait(tasks, timeout=within)
    for task in done:
        if not task.cancelled() and task.exception() is not None:
            log.error("%s stopped with an error: %r", task.get_name(), task.exception())
    for task in pending:
        log.error(
            "%s did not stop within %.0f s of being cancelled; left behind", task.get_name(), within
        )


def _dispatcher_ctx(run: bool) -> Callable[[web.Application], AsyncIterator[None]]:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        channels = Channels(app[APP_SETTINGS])
        dispatcher = Dispatcher(
            app[APP_STORE],
            app[APP_ADAPTERS],
            app[APP_SETTINGS],
            channels,
            endpoints=app[APP_ENDPOINTS],
            metrics=app[APP_METRICS],
        )
        app[APP_DISPATCHER] = dispatcher
        app[APP_FILE_RUNNER] = FileRunner(app[APP_STORE], app[APP_ADAPTERS], app[APP_SETTINGS])
        task = asyncio.create_task(dispatcher.run(), name="dispatcher") if run else None
        alerts = app[APP_ALERTS] = Alerts(
            app[APP_STORE],
            app[APP_SETTINGS],
            app[APP_ENDPOINTS],
            sources=lambda: app.get(APP_SOURCES, []),
        )
        dispatcher.on_alarm = alerts.nudge
        app[APP_WATCH] = AtRiskWatch(app[APP_STORE], app[APP_SETTINGS], on_flagged=alerts.nudge)
        if run and app[APP_SETTINGS].alerts.url and app[APP_SETTINGS].alerts.secret is None:
            log.warning("alerts.url is set without secret_file or secret_env: alerts go unsigned")
        side = (
            [
                asyncio.create_task(alerts.run(), name="alerts"),
                asyncio.create_task(alerts.run_sender(), name="alert-sender"),
                asyncio.create_task(app[APP_FILE_RUNNER].run(), name="file-runs"),
                asyncio.create_task(app[APP_WATCH].run(), name="at-risk-watch"),
                asyncio.create_task(
                    retention.run_daily(app[APP_STORE], app[APP_SETTINGS], time.time),
                    name="retention",
                ),
            ]
            if run
            else []
        )
        yield
        await dispatcher.aclose()
        await stop_tasks(side + ([task] if task is not None else []))
        await alerts.aclose()
        await channels.aclose()

    return ctx


def _sources_ctx(run: bool) -> Callable[[web.Application], AsyncIterator[None]]:
    """The pull sources (one per tenant and source); they run only where the dispatcher runs."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        dispatcher = app[APP_DISPATCHER]
        calendars = app[APP_CALENDARS]
        pullers = (
            build_pullers(
                app[APP_SETTINGS], app[APP_STORE], calendars, dispatcher.wake, app[APP_ADAPTERS]
            )
            if run
            else []
        )
        app[APP_SOURCES] = pullers
        tasks = [
            asyncio.create_task(p.run(), name=f"source-{p.municipality}-{p.name}") for p in pullers
        ]
        yield
        await stop_tasks(tasks)
        for puller in pullers:
            await puller.aclose()

    return ctx
