"""OS2indberetning's payroll export, accepted as it is (DESIGN.md §3).

OS2indberetning can point its export at the gateway without changing its format: a JSON
array of records whose keys are matched case-insensitively (ASP.NET writes PascalCase or
camelCase). ``DriveDate`` without an offset is a local date-time whose date is taken as
written; with an offset or ``Z`` it is an instant, converted to Europe/Copenhagen before it
is cut to the date (a UTC host writes 1 November as ``2026-10-31T23:00:00+00:00``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Any

from aiohttp import web

from adapters.base import Adapter, payroll_date

from .errors import FieldError, InvalidReport
from .intake import (
    MAX_BATCH,
    authenticate,
    counting_refusals,
    cutoff_finder,
    off_loop,
    read_json,
    submit,
    to_new_reports,
)
from .keys import APP_ADAPTERS
from .settings import Tenant
from .store import NewReport

routes = web.RouteTableDef()

#: canonical pointer (without the leading report index) → OS2indberetning key
_FIELDS = {
    "/report_id": "Id",
    "/employee/cpr": "CprNumber",
    "/wage_code": "TFCode",
    "/wage_code_optional": "TFCodeOptional",
    "/account": "AccountNumber",
    "/employee/employment_id": "EmploymentId",
    "/distance_km": "DistanceMeters",
    "/drive_date": "DriveDate",
    "/employee/extra_number": "ExtraNumber",
    "/employee/employment_type": "EmploymentType",
    "/employee/institution": "InstituteCode",
    "/approved_by_cpr": "ApprovedByCpr",
    "/license_plate": "LicensePlate",
}
_DATE = re.compile(r"^(\d{4}-\d{2}-\d{2})")


def _lower_keys(record: dict[str, Any]) -> dict[str, Any]:
    return {str(k).lower(): v for k, v in record.items()}


def _text(value: Any) -> Any:
    """A text or number as a trimmed text; anything else is passed on for the schema to reject."""
    if value is None or isinstance(value, bool) or not isinstance(value, (str, int)):
        return value
    text = str(value).strip()
    return text or None


def _km(meters: Any) -> Any:
    """Meters → km with 2 decimals; anything unreadable is passed on for the schema to reject."""
    try:
        km = (Decimal(str(meters)) / 1000).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)
    except (InvalidOperation, ValueError):
        return meters
    return str(km)


def _date(value: Any) -> Any:
    """The payroll date (Europe/Copenhagen) of ``DriveDate``; unreadable values go on to the schema."""
    if not isinstance(value, str):
        return value
    try:
        return payroll_date(value.strip()).isoformat()
    except (ValueError, OverflowError):  # OverflowError: year 9999 with an offset
        match = _DATE.match(value)  # an impossible date is reported as one, at /DriveDate
        return match.group(1) if match else value


def _digit(value: Any) -> Any:
    text = value.strip() if isinstance(value, str) else ""
    return int(text) if text.isascii() and text.isdecimal() and len(text) < 10 else value


def to_canonical(record: Any, municipality: str) -> Any:
    """One export record as a canonical drive report (invalid values are kept for the schema)."""
    if not isinstance(record, dict):
        return record
    r = _lower_keys(record)
    employee = {"cpr": _text(r.get("cprnumber")), "employment_id": _text(r.get("employmentid"))}
    for key, source in (("extra_number", "extranumber"), ("employment_type", "employmenttype")):
        if r.get(source) is not None:
            employee[key] = _digit(r[source])
    if _text(r.get("institutecode")):
        employee["institution"] = _text(r["institutecode"])
    report = {
        "kind": "drive",
        "municipality": municipality,
        "report_id": _text(r.get("id")),
        "version": 1,
        "employee": employee,
        "drive_date": _date(r.get("drivedate")),
        "distance_km": _km(r.get("distancemeters")),
        "wage_code": _text(r.get("tfcode")),
        "wage_code_optional": _text(r.get("tfcodeoptional")),
        "approved_by_cpr": _text(r.get("approvedbycpr")),
        "account": _text(r.get("accountnumber")),
        "license_plate": _text(r.get("licenseplate")),
    }
    return _drop_none(report)


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    return value


def _os2_pointer(error: FieldError) -> FieldError:
    """Point at the key the sender wrote, not at our canonical field."""
    _, index, rest = error.pointer.split("/", 2) if error.pointer.count("/") >= 2 else ("", "", "")
    source = _FIELDS.get("/" + rest)
    if source is None:
        return error
    return FieldError(f"/{index}/{source}", error.message)


def to_new_report(
    tenant: Tenant,
    record: Any,
    cutoff: Callable[[str], float | None],
    adapters: Mapping[str, Adapter] | None = None,
) -> NewReport:
    """One export record, on its own, as a report version ready for the store.

    Raises InvalidReport whose pointers name the record's own keys (``/CprNumber``), as
    the compat endpoint does, without the position in an array.
    """
    try:
        return to_new_reports(
            tenant, [to_canonical(record, tenant.municipality)], "/{}", cutoff, adapters
        )[0]
    except InvalidReport as exc:
        errors = [_os2_pointer(e) for e in exc.errors]
        raise InvalidReport(
            exc.detail, [FieldError(e.pointer.removeprefix("/0") or "/", e.message) for e in errors]
        ) from exc


@routes.post("/v1/compat/os2indberetning/drive-reports")
async def post_drive_reports(request: web.Request) -> web.Response:
    tenant = authenticate(request)
    with counting_refusals(request, tenant):
        body = await read_json(request, MAX_BATCH)
        new = await off_loop(
            to_new_records, tenant, body, cutoff_finder(request, tenant), request.app[APP_ADAPTERS]
        )
        return await submit(request, new, "/{}")


def to_new_records(
    tenant: Tenant,
    body: Any,
    cutoff: Callable[[str], float | None],
    adapters: Mapping[str, Adapter],
) -> list[NewReport]:
    """The export records of a compat body as report versions, pointers in the sender's keys."""
    if not isinstance(body, list) or not body:
        raise InvalidReport(
            "expected a non-empty JSON array of OS2indberetning records",
            [FieldError("/", "must be a non-empty array")],
        )
    reports = [to_canonical(r, tenant.municipality) for r in body]
    try:
        return to_new_reports(tenant, reports, "/{}", cutoff, adapters)
    except InvalidReport as exc:
        raise InvalidReport(exc.detail, [_os2_pointer(e) for e in exc.errors]) from exc
