"""The intake API (DESIGN.md §3): validate, store durably, answer 202 only after the commit."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from adapters.base import Adapter, mask_cpr

from .auth import bearer, refuse
from .errors import (
    BadRequest,
    Conflict,
    FieldError,
    Forbidden,
    InvalidReport,
    NotFound,
    PayloadTooLarge,
    StoreUnavailable,
)
from .keys import APP_ADAPTERS, APP_CALENDARS, APP_DISPATCHER, APP_SETTINGS, APP_STORE
from .payroll_calendar import CutoffCalendar
from .settings import Tenant
from .store import SETTLED, ConflictingReport, NewReport, Store, StoreError, Submitted
from .validation import normalise, validate_report, vendor_fields

MAX_BATCH = 1000
MAX_WAIT = 30.0  # seconds a sender may ask to wait for the vendor's answer (Prefer: wait)
routes = web.RouteTableDef()


def authenticate(request: web.Request) -> Tenant:
    """The tenant of the request's API key; failures count against the client's address."""
    key = bearer(request, "an API key")
    tenant = request.app[APP_SETTINGS].tenant_for_key(key)
    if tenant is None:
        raise refuse(request, "unknown or revoked API key")
    return tenant


async def read_json(request: web.Request) -> Any:
    limit = request.app[APP_SETTINGS].max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"the body is larger than {limit} bytes")
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        raise PayloadTooLarge(f"the body is larger than {limit} bytes") from exc
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequest(f"the body is not valid JSON: {exc.__class__.__name__} at position "
                         f"{getattr(exc, 'pos', getattr(exc, 'start', '?'))}") from exc
    except RecursionError as exc:
        raise BadRequest("the body is nested too deeply") from exc


def split_batch(body: Any) -> tuple[list[Any], str]:
    """The reports of a body, and the pointer prefix of their positions."""
    if isinstance(body, dict) and "reports" in body and "kind" not in body:
        reports = body["reports"]
        if not isinstance(reports, list) or not reports:
            raise InvalidReport("'reports' must be a non-empty array",
                                [FieldError("/reports", "must be a non-empty array")])
        if len(reports) > MAX_BATCH:
            raise InvalidReport(f"at most {MAX_BATCH} reports per request",
                                [FieldError("/reports", f"must have at most {MAX_BATCH} items")])
        return reports, "/reports/{}"
    return [body], ""


def to_new_reports(tenant: Tenant, reports: Sequence[Any], pointer: str,
                   cutoff: Callable[[str], float | None] = lambda adapter: None,
                   adapters: Mapping[str, Adapter] | None = None) -> list[NewReport]:
    """Validate every report (all errors at once) and prepare them for the store.

    With ``adapters``, a report is also checked against what its route's vendor needs
    and can carry, so that nothing is stored that could only fail later.
    """
    errors: list[FieldError] = []
    for i, data in enumerate(reports):
        errors.extend(validate_report(data, pointer.format(i)))
    if errors:
        raise InvalidReport(f"{len(errors)} problem(s) in the submitted report(s)", errors)
    for i, data in enumerate(reports):
        if data["municipality"] != tenant.municipality:
            raise Forbidden(f"this API key is not allowed for municipality {data['municipality']} "
                            f"(at {pointer.format(i) or '/'}municipality)")
    missing = [FieldError(f"{pointer.format(i)}/kind", f"municipality {tenant.municipality} has no route for '{d['kind']}'")
               for i, d in enumerate(reports) if d["kind"] not in tenant.routes]
    if missing:
        raise InvalidReport("no payroll vendor is configured for this kind of report", missing)
    if adapters is not None:
        errors = [e for i, d in enumerate(reports)
                  for e in vendor_fields(d, adapters[tenant.routes[d["kind"]]], pointer.format(i))]
        if errors:
            raise InvalidReport("the municipality's payroll vendor cannot take these report(s)", errors)
    return [_new_report(tenant, normalise(d), cutoff) for d in reports]


def cutoff_finder(request: web.Request, tenant: Tenant) -> Callable[[str], float | None]:
    """The cut-off of the payroll run a report received now targets, per adapter."""
    return cutoffs(request.app[APP_CALENDARS], tenant, datetime.now(UTC))


def cutoffs(calendars: Mapping[tuple[str, str], CutoffCalendar], tenant: Tenant,
            now: datetime) -> Callable[[str], float | None]:
    """The cut-off of the payroll run a report received at ``now`` targets, per adapter."""

    def find(adapter: str) -> float | None:
        calendar = calendars.get((tenant.municipality, adapter))
        return None if calendar is None else calendar.target_cutoff(now).timestamp()

    return find


def _new_report(tenant: Tenant, data: dict[str, Any], cutoff: Callable[[str], float | None]) -> NewReport:
    digest = hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    body = json.loads(json.dumps(data))
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
    )


async def submit(request: web.Request, new: list[NewReport], pointer: str) -> web.Response:
    try:
        results = await request.app[APP_STORE].submit(new, time.time())
    except ConflictingReport as exc:
        errors = [FieldError(f"{pointer.format(i)}/version",
                             "this version was already submitted with different content; send a new version")
                  for i in exc.indexes]
        raise Conflict("a report version was already submitted with different content", errors) from exc
    except StoreError as exc:
        raise StoreUnavailable("the report could not be stored; nothing was accepted, try again") from exc
    if any(r.created for r in results):
        request.app[APP_DISPATCHER].wake()
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


async def wait_until_settled(store: Store, version_pks: Sequence[int], seconds: float,
                             clock: Callable[[], float] = time.monotonic) -> dict[int, list[dict[str, Any]]]:
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
    item["deliveries"] = [{"id": d["id"], "adapter": d["adapter"], "status": d["status"],
                           "vendor_reference": d["vendor_reference"],
                           "message": mask_cpr(d["last_error"] or d["warning"] or "") or None}
                          for d in deliveries]
    if deliveries:
        item["status"] = deliveries[-1]["status"]


def _submitted(r: Submitted) -> dict[str, Any]:
    return {"id": r.id, "municipality": r.municipality, "report_id": r.report_id,
            "version": r.version, "status": r.status}


@routes.post("/v1/reports")
async def post_reports(request: web.Request) -> web.Response:
    tenant = authenticate(request)
    reports, pointer = split_batch(await read_json(request))
    new = to_new_reports(tenant, reports, pointer, cutoff_finder(request, tenant), request.app[APP_ADAPTERS])
    return await submit(request, new, pointer)


@routes.get("/v1/reports/{municipality}/{report_id}")
async def get_report(request: web.Request) -> web.Response:
    tenant = authenticate(request)
    municipality = request.match_info["municipality"]
    if municipality != tenant.municipality:
        raise Forbidden(f"this API key is not allowed for municipality {municipality}")
    view = await request.app[APP_STORE].get_report(municipality, request.match_info["report_id"])
    if view is None:
        raise NotFound("no such report")
    view["purged"] = all(v["purged"] for v in view["versions"])  # retention: metadata only
    for v in view["versions"]:
        if v["purged"]:
            continue
        v["report"]["employee"]["cpr"] = "xxxxxx-xxxx"
        if v["report"].get("approved_by_cpr"):
            v["report"]["approved_by_cpr"] = "xxxxxx-xxxx"
    _iso_times(view)
    latest = [d for d in view["deliveries"] if d["version"] == view["latest_version"]]
    view["status"] = latest[-1]["status"] if latest else "not_routed"
    return web.json_response(view)


def _iso_times(value: Any) -> None:
    """Store times are epoch seconds; the API shows ISO-8601 UTC."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in list(items):
        if isinstance(key, str) and key.endswith("_at") and isinstance(item, (int, float)):
            value[key] = datetime.fromtimestamp(item, UTC).isoformat(timespec="milliseconds")
        else:
            _iso_times(item)
