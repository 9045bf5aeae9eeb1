"""The intake API (DESIGN.md §3): validate, store durably, answer 202 only after the commit."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import hashlib
import json
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

from aiohttp import hdrs, web

from adapters.base import Adapter

from .auth import bearer, refuse
from .errors import (
    BadRequest,
    Conflict,
    FieldError,
    Forbidden,
    GatewayError,
    InvalidReport,
    NotFound,
    PayloadTooLarge,
    StoreUnavailable,
    UnsupportedMediaType,
)
from .jsonbody import MAX_RECORDS, TooManyRecords, parse
from .keys import (
    APP_ADAPTERS,
    APP_CALENDARS,
    APP_DISPATCHER,
    APP_METRICS,
    APP_SETTINGS,
    APP_STORE,
)
from .logs import correlation_id
from .payroll_calendar import CutoffCalendar
from .privacy import MASKED_CPR, mask_cpr, mask_strings
from .settings import Tenant
from .store import SETTLED, ConflictingReport, NewReport, Store, StoreError, Submitted
from .store.common import report_period
from .validation import normalise, quick_valid, readable_text, validate_report, vendor_fields

MAX_BATCH = MAX_RECORDS
MAX_ERRORS = 100  # listed in one problem; a hostile body must not buy a 40 MB answer
MAX_WAIT = 30.0  # seconds a sender may ask to wait for the vendor's answer (Prefer: wait)
#: a body this small is parsed on the event loop, and so are its reports when the compiled
#: check finds them valid (tens of µs, less than the thread hops it saves); larger bodies,
#: and reports whose errors must be worded (which can take milliseconds), go to a thread
INLINE_BYTES = 2048
routes = web.RouteTableDef()
T = TypeVar("T")


def authenticate(request: web.Request) -> Tenant:
    """The tenant of the request's API key; failures count against the client's address."""
    key = bearer(request, "an API key")
    tenant = request.app[APP_SETTINGS].tenant_for_key(key)
    if tenant is None:
        raise refuse(request, "unknown or revoked API key")
    return tenant


def check_json_type(request: web.Request) -> None:
    """415 for a body declared as anything but JSON; no Content-Type at all is read as JSON."""
    if hdrs.CONTENT_TYPE not in request.headers:
        return
    mime, charset = request.content_type, request.charset
    is_json = mime == "application/json" or (
        mime.startswith("application/") and mime.endswith("+json")
    )
    if not is_json or (charset is not None and charset.lower() not in ("utf-8", "utf8")):
        raise UnsupportedMediaType("send the body as application/json (UTF-8)")


async def read_json(request: web.Request, max_records: int | None = None) -> Any:
    """The body as JSON, parsed in a worker thread unless it is small (see ``jsonbody``)."""
    raw = await read_body(request)
    if len(raw) <= INLINE_BYTES:
        return parse(raw, max_records)
    return await off_loop(parse, raw, max_records)


async def read_body(request: web.Request) -> bytes:
    """The raw body of a JSON request, within the size limit."""
    check_json_type(request)
    limit = request.app[APP_SETTINGS].max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"the body is larger than {limit} bytes", limit=limit)
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        raise PayloadTooLarge(f"the body is larger than {limit} bytes", limit=limit) from exc


async def off_loop(func: Callable[..., T], *args: Any) -> T:
    """CPU work on a request (parsing, validating up to MAX_RECORDS reports) in a worker thread,
    so that no request delays /healthz or another request's answer. The thread sees the
    request's context (its correlation id: logged, and stored with each report)."""
    context = contextvars.copy_context()
    return await asyncio.get_running_loop().run_in_executor(
        None, functools.partial(context.run, func, *args)
    )


def split_batch(body: Any) -> tuple[list[Any], str]:
    """The reports of a body, and the pointer prefix of their positions."""
    if isinstance(body, dict) and "reports" in body and "kind" not in body:
        reports = body["reports"]
        if not isinstance(reports, list) or not reports:
            raise InvalidReport(
                "'reports' must be a non-empty array",
                [FieldError("/reports", "must be a non-empty array")],
            )
        if len(reports) > MAX_BATCH:
            raise TooManyRecords(MAX_BATCH)
        return reports, "/reports/{}"
    return [body], ""


def to_new_reports(
    tenant: Tenant,
    reports: Sequence[Any],
    pointer: str,
    cutoff: Callable[[str], float | None] = lambda adapter: None,
    adapters: Mapping[str, Adapter] | None = None,
) -> list[NewReport]:
    """Validate every report (all errors at once) and prepare them for the store.

    With ``adapters``, a report is also checked against what its route's vendor needs
    and can carry, so that nothing is stored that could only fail later.
    """
    errors: list[FieldError] = []
    for i, data in enumerate(reports):
        errors.extend(validate_report(data, pointer.format(i)))
    if errors:
        listed = "" if len(errors) <= MAX_ERRORS else f"; the first {MAX_ERRORS} are listed"
        raise InvalidReport(
            f"{len(errors)} problem(s) in the submitted report(s){listed}", errors[:MAX_ERRORS]
        )
    for i, data in enumerate(reports):
        if data["municipality"] != tenant.municipality:
            raise Forbidden(
                f"this API key is not allowed for municipality {data['municipality']} "
                f"(at {pointer.format(i) or '/'}municipality)"
            )
    missing = [
        FieldError(
            f"{pointer.format(i)}/kind",
            f"municipality {tenant.municipality} has no route for '{d['kind']}'",
        )
        for i, d in enumerate(reports)
        if d["kind"] not in tenant.routes
    ]
    if missing:
        raise InvalidReport("no payroll vendor is configured for this kind of report", missing)
    if adapters is not None:
        errors = [
            e
            for i, d in enumerate(reports)
            for e in vendor_fields(d, adapters[tenant.routes[d["kind"]]], pointer.format(i))
        ]
        if errors:
            raise InvalidReport(
                "the municipality's payroll vendor cannot take these report(s)", errors
            )
    return [_new_report(tenant, normalise(d), cutoff) for d in reports]


def cutoff_finder(request: web.Request, tenant: Tenant) -> Callable[[str], float | None]:
    """The cut-off of the payroll run a report received now targets, per adapter."""
    return cutoffs(request.app[APP_CALENDARS], tenant, datetime.now(UTC))


def cutoffs(
    calendars: Mapping[tuple[str, str], CutoffCalendar], tenant: Tenant, now: datetime
) -> Callable[[str], float | None]:
    """The cut-off of the payroll run a report received at ``now`` targets, per adapter."""

    def find(adapter: str) -> float | None:
        calendar = calendars.get((tenant.municipality, adapter))
        return None if calendar is None else calendar.target_cutoff(now).timestamp()

    return find


def _new_report(
    tenant: Tenant, data: dict[str, Any], cutoff: Callable[[str], float | None]
) -> NewReport:
    digest = hashlib.sha256(
        json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()
    body = {**data, "employee": dict(data["employee"])}  # JSON values: only these two change
    employee_cpr = body["employee"].pop("cpr")
    approved = body.pop("approved_by_cpr", None)
    return NewReport(
        municipality=data["municipality"],
        report_id=data["report_id"],
        version=data["version"],
        kind=data["kind"],
        employee_key=data["employee"]["employment_id"],
        body=body,
        employee_cpr=employee_cpr,
        approved_by_cpr=approved,
        content_hash=digest,
        adapter=tenant.routes.get(data["kind"]),
        cutoff_at=cutoff(tenant.routes[data["kind"]]) if data["kind"] in tenant.routes else None,
        period=report_period(data),
        request_id=current_request_id(),
    )


def current_request_id() -> str | None:
    """The correlation id of the request (or pull) being handled: the sender's X-Request-ID."""
    rid = correlation_id.get()
    return None if rid == "-" else rid


async def submit(request: web.Request, new: list[NewReport], pointer: str) -> web.Response:
    try:
        results = await request.app[APP_STORE].submit(new, time.time())
    except ConflictingReport as exc:
        errors = [
            FieldError(
                f"{pointer.format(i)}/version",
                "this version was already submitted with different content; send a new version",
            )
            for i in exc.indexes
        ]
        raise Conflict(
            "a report version was already submitted with different content", errors
        ) from exc
    except StoreError as exc:
        raise StoreUnavailable(
            "the report could not be stored; nothing was accepted, try again"
        ) from exc
    if any(r.created for r in results):
        request.app[APP_DISPATCHER].wake()
    created = sum(r.created for r in results)
    metrics, municipality = request.app[APP_METRICS], new[0].municipality
    metrics.count_intake(municipality, "accepted", created)
    metrics.count_intake(municipality, "duplicate", len(results) - created)
    status = 202 if any(r.created for r in results) else 200
    body = {"reports": [_submitted(r) for r in results]}
    headers = {"Vary": "Prefer"}
    wait = preferred_wait(",".join(request.headers.getall("Prefer", [])))
    if wait is not None:
        # committed above: whatever happens while waiting, the answer stays 202/200
        with contextlib.suppress(StoreError):
            found = await wait_until_settled(request.app[APP_STORE], [r.id for r in results], wait)
            for item in body["reports"]:
                _show_deliveries(item, found.get(item["id"], []))
            headers["Preference-Applied"] = f"wait={wait:g}"
    return web.json_response(body, status=status, headers=headers)


def preferred_wait(header: str) -> float | None:
    """The seconds of a ``Prefer: wait=N`` (RFC 7240), at most MAX_WAIT; None when not asked for."""
    for preference in header.split(","):
        name, _, value = preference.split(";", 1)[0].partition("=")
        if name.strip().lower() != "wait":
            continue
        value = value.strip().strip('"')
        return min(float(value), MAX_WAIT) if value.isascii() and value.isdigit() else None
    return None


async def wait_until_settled(
    store: Store,
    version_pks: Sequence[int],
    seconds: float,
    clock: Callable[[], float] = time.monotonic,
) -> dict[int, list[dict[str, Any]]]:
    """The deliveries of these versions once all are settled, or as they are after ``seconds``."""
    deadline = clock() + seconds
    pause = 0.01
    while True:
        found = await store.deliveries_of(version_pks)
        settled = all(d["status"] in SETTLED for ds in found.values() for d in ds)
        left = deadline - clock()
        if settled or left <= 0:
            return found
        await asyncio.sleep(min(pause, left))
        pause = min(pause * 2, 0.25)


def _show_deliveries(item: dict[str, Any], deliveries: list[dict[str, Any]]) -> None:
    item["deliveries"] = [
        {
            "id": d["id"],
            "adapter": d["adapter"],
            "status": d["status"],
            "vendor_reference": d["vendor_reference"],
            "message": mask_cpr(d["last_error"] or d["warning"] or "") or None,
        }
        for d in deliveries
    ]
    if deliveries:
        item["status"] = deliveries[-1]["status"]


def _submitted(r: Submitted) -> dict[str, Any]:
    return {
        "id": r.id,
        "municipality": r.municipality,
        "report_id": r.report_id,
        "version": r.version,
        "status": r.status,
    }


#: the intake metric's result for each refusal (anything else counts as "error")
REFUSALS: tuple[tuple[type[GatewayError], str], ...] = (
    (BadRequest, "invalid"),
    (Conflict, "conflict"),
    (Forbidden, "forbidden"),
    (InvalidReport, "invalid"),
    (PayloadTooLarge, "too_large"),
    (UnsupportedMediaType, "invalid"),
    (StoreUnavailable, "unavailable"),
)


@contextlib.contextmanager
def counting_refusals(request: web.Request, tenant: Tenant) -> Iterator[None]:
    """Count a refused submission (once per request) by why it was refused, then re-raise."""
    try:
        yield
    except GatewayError as exc:
        result = next((name for kind, name in REFUSALS if isinstance(exc, kind)), "error")
        request.app[APP_METRICS].count_intake(tenant.municipality, result)
        raise


@routes.post("/v1/reports")
async def post_reports(request: web.Request) -> web.Response:
    tenant = authenticate(request)
    with counting_refusals(request, tenant):
        raw = await read_body(request)
        small = len(raw) <= INLINE_BYTES
        body = parse(raw, MAX_BATCH) if small else await off_loop(parse, raw, MAX_BATCH)
        reports, pointer = split_batch(body)
        args = (tenant, reports, pointer, cutoff_finder(request, tenant), request.app[APP_ADAPTERS])
        if small and all(map(quick_valid, reports)):
            new = to_new_reports(*args)  # bounded: a few valid reports
        else:
            new = await off_loop(to_new_reports, *args)
        return await submit(request, new, pointer)


@routes.get("/v1/reports/{municipality}/{report_id}")
async def get_report(request: web.Request) -> web.Response:
    tenant = authenticate(request)
    municipality, report_id = request.match_info["municipality"], request.match_info["report_id"]
    if municipality != tenant.municipality:
        if not (len(municipality) == 3 and municipality.isascii() and municipality.isdecimal()):
            raise NotFound("no such report")  # not a kommunekode: said without echoing it
        raise Forbidden(f"this API key is not allowed for municipality {municipality}")
    if not 1 <= len(report_id) <= 64 or not readable_text(report_id):
        raise NotFound("no such report")  # could never have been stored
    view = await request.app[APP_STORE].get_report(municipality, report_id)
    if view is None:
        raise NotFound("no such report")
    view["purged"] = all(v["purged"] for v in view["versions"])  # retention: metadata only
    for v in view["versions"]:  # free text (purpose, route) may hold a CPR number too
        if v["purged"]:
            continue
        v["report"] = mask_strings(v["report"])
        v["report"]["employee"]["cpr"] = MASKED_CPR
        if v["report"].get("approved_by_cpr"):
            v["report"]["approved_by_cpr"] = MASKED_CPR
    _iso_times(view)
    latest = [d for d in view["deliveries"] if d["version"] == view["latest_version"]]
    view["status"] = latest[-1]["status"] if latest else "not_routed"
    return web.json_response(view)


def _iso_times(value: Any) -> None:
    """Store times are epoch seconds; the API shows ISO-8601 UTC (every ``*_at`` and ``at``)."""
    items = (
        value.items()
        if isinstance(value, dict)
        else enumerate(value)
        if isinstance(value, list)
        else ()
    )
    for key, item in list(items):
        if (
            isinstance(key, str)
            and (key.endswith("_at") or key == "at")
            and isinstance(item, (int, float))
            and not isinstance(item, bool)
        ):
            value[key] = datetime.fromtimestamp(item, UTC).isoformat(timespec="milliseconds")
        else:
            _iso_times(item)
