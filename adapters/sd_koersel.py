"""SD Løn adapter: each wage code of a drive report becomes one ``AnsaettelseKoerselOpret20170501``
SOAP call (create only: SD has no edit or cancel, so changes wait for an operator).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import date
from decimal import Decimal, InvalidOperation
from types import MappingProxyType
from typing import Any

from lxml import etree
from zeep.exceptions import Error as ZeepError

from adapters.base import (
    Channel,
    DeliveredPart,
    InDoubt,
    InvalidPayload,
    Kind,
    Message,
    Payload,
    Plan,
    Receipt,
    Rejected,
    Report,
    Response,
    Transient,
    VendorSettings,
    classify_status,
    mask_cpr,
    post,
)
from adapters.resources import schema_path
from adapters.soap import (
    RequestTemplate,
    SoapFault,
    UnsafeXML,
    ZeepCodec,
    body_payload,
    find_fault,
    load_schema,
    parse_xml,
    schema_errors,
)

OPERATION = "AnsaettelseKoerselOpret20170501Operation"
WSDL_FILE = "sd/koersel-20170501.wsdl"
XSD_FILE = "sd/sd-20170501.xsd"
SCHEMA_FILES = (
    WSDL_FILE,
    XSD_FILE,
    "sd/sd-20120201.xsd",
    "sd/sd-20111201.xsd",
    "sd/sd-20070301.xsd",
    "sd/sd-20070401.xsd",
    "sd/skat-20080401.xsd",
)
SD_NS = "urn:oio:sd:snitflader:2017.05.01"
REQUEST_TAG = f"{{{SD_NS}}}AnsaettelseKoerselOpret"
RESPONSE_TAG = f"{{{SD_NS}}}AnsaettelseKoerselOpret20170501"
REFERENCE_TAG = f"{{{SD_NS}}}RegistreringIdentifikator"
# SD answers HTTP 200 with this text outside its opening hours (06-22 Europe/Copenhagen)
CLOSED_TEXT = "The webservice has failed"
CONTENT_TYPE = "text/xml; charset=utf-8"
PARTS = ("wage_code", "wage_code_optional")
_CENT = Decimal("0.01")


class SdKoersel:
    """The ``sd-koersel`` adapter (see DESIGN.md §4).

    Indicators follow what OS2indberetning sends: ``GodkendtIndikator``,
    ``KontrolleretIndikator`` and ``DokumentationEksternIndikator`` are all true; a tenant
    may turn the last two off with the settings options ``kontrolleret_indikator`` and
    ``dokumentation_ekstern_indikator``.
    """

    name = "sd-koersel"
    kinds = frozenset({Kind.DRIVE})
    schema_files = SCHEMA_FILES
    #: SD's BrugerIdentifikator is the approver's CPR
    required_fields = frozenset({"/approved_by_cpr"})
    field_formats: Mapping[str, tuple[str, str]] = MappingProxyType({})
    #: SD's web service answers 06:00-22:00 Danish time; a tenant may override this
    opening_hours: str | None = "06:00-22:00"
    file_based = False
    reads_back = False
    reads_before_send = False
    #: SD books on KontoNummerIdentifikator (``account``); it has no cost centre or PSP element
    unsupported_fields = frozenset({"/cost_center", "/psp_element"})

    def __init__(self) -> None:
        self._codec = ZeepCodec(schema_path(WSDL_FILE))
        self._schema = load_schema(schema_path(XSD_FILE))
        self._template = RequestTemplate(self._codec, OPERATION, self._schema)

    # -- plan -------------------------------------------------------------------------

    def plan(
        self, report: Report, delivered: Sequence[DeliveredPart], settings: VendorSettings
    ) -> Plan:
        carried = sorted(f[1:] for f in self.unsupported_fields if getattr(report, f[1:]))
        if carried:
            raise InvalidPayload(
                f"{self.name} cannot carry {' or '.join(carried)}: SD books mileage on an "
                "account number (KontoNummerIdentifikator) only"
            )
        done = {p.part: p for p in delivered}
        if report.cancelled:
            return _plan_cancelled(done)
        wanted = postings(report, settings)
        changed = [p for p in done if p not in wanted or not _same(done[p].fields, wanted[p])]
        if changed:
            return Plan(correction_required=_correction_text(changed, done, wanted))
        if report.distance_km is not None and report.distance_km == 0 and not done:
            return Plan(not_applicable="zero km: nothing to pay in SD Løn")
        return Plan(
            messages=tuple(
                Message(part, "create", fields)
                for part, fields in wanted.items()
                if part not in done
            )
        )

    # -- render -----------------------------------------------------------------------

    def render(self, report: Report, message: Message, settings: VendorSettings) -> Payload:
        values = _request_values(report, message.fields, settings)
        body = self._template.build(values)  # lxml, schema-checked; None: zeep says why
        if body is None:
            body = self._zeep_body(values, report)
        action = settings.endpoint or self._template.soap_action.strip('"')
        # SOAP 1.1 quotes the action; SD expects the endpoint URL there
        return Payload(body=body, content_type=CONTENT_TYPE, headers={"SOAPAction": f'"{action}"'})

    def _zeep_body(self, values: Mapping[str, Any], report: Report) -> bytes:
        """zeep's envelope for values the template would not write: the error that says why,
        or (should the two ever disagree) zeep's envelope when it passes the schema."""
        try:
            body, _ = self._codec.build(OPERATION, **values)
        except (TypeError, ValueError, ZeepError) as exc:
            raise InvalidPayload(
                mask_cpr(f"cannot build the SD request: {exc}", report.cprs)
            ) from exc
        errors = schema_errors(self._schema, body_payload(parse_xml(body)))
        if errors:
            text = "; ".join(errors)
            raise InvalidPayload(mask_cpr(f"SD request fails the schema: {text}", report.cprs))
        return body

    # -- send -------------------------------------------------------------------------

    async def send(self, payload: Payload, channel: Channel) -> Receipt:
        return interpret(await post(channel, payload))


# ---------------------------------------------------------------------------------------
# plan helpers
# ---------------------------------------------------------------------------------------


def postings(report: Report, settings: VendorSettings) -> dict[str, dict[str, Any]]:
    """The fields of each SD posting a report asks for, by part (JSON-able values)."""
    codes = {"wage_code": report.wage_code, "wage_code_optional": report.wage_code_optional}
    common = _common_fields(report, settings)
    return {part: {"wage_code": code, **common} for part, code in codes.items() if code}


def _common_fields(report: Report, settings: VendorSettings) -> dict[str, Any]:
    route = report.route
    return {
        "institution": report.employee.institution or settings.institution,
        "employment_id": report.employee.employment_id,
        "drive_date": None if report.drive_date is None else report.drive_date.isoformat(),
        "distance_km": _km_text(report.distance_km),
        "account": report.account,
        "license_plate": report.license_plate,
        "purpose": report.purpose,
        "from": route.from_ if route else None,
        "to": route.to if route else None,
        "via": list(route.via) if route else [],
        "sixty_days_rule": report.sixty_days_rule,
    }


def _km_text(distance: Decimal | None) -> str | None:
    """Exactly two decimals; a value that would need rounding is kept as it is, so the
    schema check rejects it instead of paying a rounded distance."""
    if distance is None:
        return None
    cents = distance.quantize(_CENT)
    return str(cents) if cents == distance else str(distance)


def _same(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    # delivered fields come back from the store as JSON: compare in that form
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def _plan_cancelled(done: Mapping[str, DeliveredPart]) -> Plan:
    if not done:
        return Plan(not_applicable="cancelled before anything was delivered to SD Løn")
    refs = ", ".join(f"{p.part} ({p.vendor_reference or 'no reference'})" for p in done.values())
    return Plan(
        correction_required=(
            "SD Løn has no edit or cancel operation; the report was cancelled after "
            f"{refs} was delivered: withdraw the registration in SD Løn by hand"
        )
    )


def _correction_text(
    changed: Sequence[str], done: Mapping[str, DeliveredPart], wanted: Mapping[str, Any]
) -> str:
    notes = [_change_note(part, done[part], wanted.get(part)) for part in changed]
    return "SD Løn has no edit or cancel operation; " + "; ".join(notes)


def _change_note(part: str, old: DeliveredPart, new: Mapping[str, Any] | None) -> str:
    ref = old.vendor_reference or "no reference"
    if new is None:
        return f"{part} ({ref}) was delivered but the new version drops it"
    diffs = [
        f"{key} {old.fields.get(key)!r} -> {new.get(key)!r}"
        for key in sorted(set(old.fields) | set(new))
        if old.fields.get(key) != new.get(key)
    ]
    return f"{part} ({ref}) was delivered with other values: " + ", ".join(diffs)


# ---------------------------------------------------------------------------------------
# render helpers
# ---------------------------------------------------------------------------------------


def _request_values(
    report: Report, fields: Mapping[str, Any], settings: VendorSettings
) -> dict[str, Any]:
    """The zeep keyword arguments, in the vendor's element order (zeep orders them anyway)."""
    opts = settings.options
    values: dict[str, Any] = {
        "InstitutionIdentifikator": _institution(fields, settings),
        "BrugerIdentifikator": _approver(report),
        "AnsaettelseIdentifikator": fields.get("employment_id"),
        "RegistreringTypeIdentifikator": fields.get("wage_code"),
        "KoerselDato": _drive_date(fields.get("drive_date")),
        "KilometerMaal": _distance(fields.get("distance_km")),
        "KontoNummerIdentifikator": fields.get("account"),
        "GodkendtIndikator": True,
        "KontrolleretIndikator": bool(opts.get("kontrolleret_indikator", True)),
        "DokumentationEksternIndikator": bool(opts.get("dokumentation_ekstern_indikator", True)),
        "Regel60DageIndikator": bool(fields.get("sixty_days_rule", False)),
        "RegistreringNummerIdentifikator": fields.get("license_plate"),
        "AarsagTekst": fields.get("purpose"),
        "KoertFraTekst": fields.get("from"),
        "KoertTilTekst": fields.get("to"),
        "KoertViaTekst": list(fields.get("via") or []),
    }
    return {key: v for key, v in values.items() if v is not None and v != []}


def _institution(fields: Mapping[str, Any], settings: VendorSettings) -> str:
    institution = fields.get("institution") or settings.institution
    if not institution:
        raise InvalidPayload(
            "no SD institution: set employee.institution in the report or the setting "
            "'institution' for the sd-koersel vendor of this tenant"
        )
    return str(institution)


def _approver(report: Report) -> str:
    if not report.approved_by_cpr:
        raise InvalidPayload("approved_by_cpr is missing: SD's BrugerIdentifikator is the approver")
    return report.approved_by_cpr


def _drive_date(value: Any) -> date:
    # a date as written, never a timestamp: no time zone may move it
    try:
        return date.fromisoformat(str(value))
    except ValueError as exc:
        raise InvalidPayload(f"drive_date {value!r} is not an ISO date") from exc


def _distance(value: Any) -> Decimal:
    try:
        return Decimal(str(value))
    except InvalidOperation as exc:
        raise InvalidPayload(f"distance_km {value!r} is not a decimal number") from exc


# ---------------------------------------------------------------------------------------
# send helpers: classify SD's answer
# ---------------------------------------------------------------------------------------


def interpret(resp: Response) -> Receipt:
    """A receipt for SD's answer, or the error that says what the dispatcher does next."""
    envelope = _parse_or_none(resp.body)  # once: the fault check and the receipt read it

    def body_rules(resp: Response) -> Transient | Rejected | None:
        return _body_error(resp, envelope)

    error = classify_status(resp, "SD Løn", hint=_hint(resp.status), body_rules=body_rules)
    if error is not None:
        raise error
    return _receipt(envelope, resp)


def _body_error(resp: Response, envelope: etree._Element | None) -> Transient | Rejected | None:
    """SD's answers that say more than their status: the closed page, a SOAP fault."""
    if CLOSED_TEXT.encode() in resp.body:
        return Transient(
            f"SD Løn is closed (it is open 06:00-22:00 Europe/Copenhagen): {CLOSED_TEXT!r}",
            status=resp.status,
            body=resp.body,
        )
    fault = None if envelope is None else find_fault(envelope)
    return None if fault is None else fault_error(fault, resp)


def _hint(status: int) -> str:
    if status == 404:
        return "check the endpoint URL (and the test environment's path prefix)"
    return "check the SD username (it starts with 'SY') and password of this tenant"


def _parse_or_none(body: bytes) -> etree._Element | None:
    try:
        return parse_xml(body)
    except UnsafeXML:
        return None


def fault_error(fault: SoapFault, resp: Response) -> Transient | Rejected:
    """Classify an SD fault by its text first (SD publishes no codes), then its code."""
    text = fault.detail or fault.string
    message = mask_cpr(f"SD Løn fault {fault.code or '?'}: {text}")
    if "does not exist" in text.lower():
        return Rejected(message, status=resp.status, body=resp.body)
    if fault.code == "Server":
        return Transient(message, status=resp.status, body=resp.body)
    # Client, and any fault we do not know: permanent, kept for an operator to judge
    return Rejected(message, status=resp.status, body=resp.body)


def _receipt(envelope: etree._Element | None, resp: Response) -> Receipt:
    try:
        payload = None if envelope is None else body_payload(envelope)
    except UnsafeXML:
        payload = None
    if payload is None or payload.tag != RESPONSE_TAG:
        raise InDoubt(
            f"SD Løn answered HTTP {resp.status} without a readable "
            "AnsaettelseKoerselOpret20170501 response: the registration may have been created",
            status=resp.status,
            body=resp.body,
        )
    reference = (payload.findtext(REFERENCE_TAG) or "").strip() or None
    warning = None if reference else "SD Løn accepted it without a RegistreringIdentifikator"
    return Receipt(vendor_reference=reference, status=resp.status, body=resp.body, warning=warning)
