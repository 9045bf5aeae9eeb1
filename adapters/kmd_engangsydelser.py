"""KMD Opus "Webservice – Engangsydelser" adapter: mileage as one-off payments (REST/JSON, mTLS).

Corrections are sent as differences: before every plan the gateway reads what it posted for
the employee's month and sends only what is missing (a negative ``Antal`` withdraws).

Wire forms as OS2indberetning's production client sends them: ``Startdato`` is the date at
``T00:00:00Z`` (plans keep plain ISO dates; render writes the wire form; a read's
``Startdato`` is taken as ``payroll_date`` reads it), and ``Kun_Valider`` is
present only as ``"1"`` when the tenant validates without posting.
"""

from __future__ import annotations

import calendar
import json
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from decimal import Decimal, InvalidOperation
from types import MappingProxyType
from typing import Any, TypeVar

from jsonschema import Draft202012Validator

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
    payroll_date,
    post,
)
from adapters.resources import schema_text

__all__ = ["KmdEngangsydelser", "MAX_ITEMS", "batches", "format_antal"]

SCHEMA_FILES = (
    "kmd-engangsydelser/update-request.schema.json",
    "kmd-engangsydelser/update-response.schema.json",
    "kmd-engangsydelser/read-request.schema.json",
    "kmd-engangsydelser/read-response.schema.json",
)
UPDATE_PATH = "lpe/update-onetime-payments"
READ_PATH = "lpe/read-onetime-payments"
MAX_ITEMS = 999  # KMD accepts at most 999 Engangsydelser per call
PART = "payments"
DEFAULT_SENDER = "payroll-gateway"
NOT_FOUND = "Data ikke fundet."
CENT = Decimal("0.01")
ZERO = Decimal("0.00")
# Meddelelse codes KMD documents for this service, with the field an operator must fix.
FIELD_CODES = {
    119: "cost centre (Afv_Omkostningssted)",
    151: "PSP element (Afv_PSP_Element)",
    167: "cost centre and PSP element: give only one of them",
}
LOCKED = 138
CONFIG_HINT = "ClientID not allowed for the client certificate: check client_id and the certificate"

T = TypeVar("T")
Key = tuple[str, str]  # (month "YYYY-MM", Loenart)


def batches(items: Sequence[T], limit: int = MAX_ITEMS) -> list[list[T]]:
    """Split items into calls of at most ``limit``; each call numbers its items from 0."""
    if limit < 1:
        raise ValueError("limit must be at least 1")
    return [list(items[i : i + limit]) for i in range(0, len(items), limit)]


def format_antal(value: Decimal) -> str:
    """KMD's ``Antal``: '.' as separator, exactly 2 decimals (reports carry at most 2)."""
    return f"{value.quantize(CENT):.2f}"


def _decimal(value: Any) -> Decimal:
    try:
        return Decimal(str(value)).quantize(CENT)
    except (InvalidOperation, ValueError) as exc:
        raise ValueError(f"not a number: {value!r}") from exc


def _loenart(code: str) -> str:
    # OS2indberetning formats the pay type as %04d, so a short numeric code gets leading zeros.
    return code.zfill(4) if code.isdigit() and len(code) < 4 else code


def _month(d: date) -> str:
    return f"{d.year:04d}-{d.month:02d}"


def _month_bounds(month: str) -> tuple[str, str]:
    year, mon = (int(x) for x in month.split("-"))
    last = calendar.monthrange(year, mon)[1]
    return f"{month}-01T00:00:00Z", f"{month}-{last:02d}T23:59:59Z"


def _load(name: str) -> Draft202012Validator:
    schema = json.loads(schema_text(name))
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def _errors(validator: Draft202012Validator, doc: Any) -> list[str]:
    found = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
    return [f"/{'/'.join(str(p) for p in e.absolute_path)}: {e.message}" for e in found]


# ---------------------------------------------------------------------------------------
# What the vendor holds for a report: totals per (month, Loenart), and a date per month.
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Holdings:
    totals: Mapping[Key, Decimal] = field(default_factory=dict)
    dates: Mapping[str, str] = field(default_factory=dict)  # month -> a Startdato in it
    known: bool = False  # something was delivered (even if it now sums to zero)


def _holdings(delivered: Sequence[DeliveredPart], report_month: str) -> Holdings:
    totals: dict[Key, Decimal] = {}
    dates: dict[str, str] = {}
    parts = [p for p in delivered if p.part == PART]
    for part in parts:
        month = str(part.fields.get("month") or report_month)
        _add_month(totals, dates, month, part.fields.get("startdato"), part.fields.get("totals"))
        for other, held in dict(part.fields.get("other_months") or {}).items():
            _add_month(totals, dates, other, held.get("startdato"), held.get("totals"))
    return Holdings(totals, dates, known=bool(parts))


def _add_month(
    totals: dict[Key, Decimal], dates: dict[str, str], month: str, startdato: Any, sums: Any
) -> None:
    for loenart, amount in dict(sums or {}).items():
        totals[(month, loenart)] = totals.get((month, loenart), ZERO) + _decimal(amount)
    if startdato:
        dates.setdefault(month, str(startdato))


def _desired(report: Report) -> dict[str, Decimal]:
    if report.cancelled:
        return {}
    km = (report.distance_km or ZERO).quantize(CENT)
    wanted: dict[str, Decimal] = {}
    for code in (report.wage_code, report.wage_code_optional):
        if code:
            wanted[_loenart(code)] = wanted.get(_loenart(code), ZERO) + km
    return wanted


def _account(report: Report, settings: VendorSettings) -> dict[str, str]:
    """``Afv_Omkostningssted`` or ``Afv_PSP_Element`` for every item (never both).

    The report's own ``account`` (sent as ``options.account_as`` says), ``cost_center`` or
    ``psp_element`` wins over the tenant's default ``cost_centre``/``psp_element``.
    """
    opts = settings.options
    cost, psp = opts.get("cost_centre"), opts.get("psp_element")
    if cost and psp:
        raise InvalidPayload(
            "tenant settings give both cost_centre and psp_element; KMD accepts only one "
            "(code 167): remove one of them"
        )
    own = [v for v in (report.account, report.cost_center, report.psp_element) if v]
    if len(own) > 1:  # intake refuses this; a report stored before that rule is never sent
        raise InvalidPayload(
            "the report gives more than one of account, cost_center and psp_element; KMD "
            "accepts only one (code 167)"
        )
    if report.cost_center:
        return {"Afv_Omkostningssted": report.cost_center}
    if report.psp_element:
        return {"Afv_PSP_Element": report.psp_element}
    if report.account:
        target = (
            "Afv_PSP_Element"
            if opts.get("account_as") == "psp_element"
            else ("Afv_Omkostningssted")
        )
        return {target: report.account}
    if cost:
        return {"Afv_Omkostningssted": str(cost)}
    return {"Afv_PSP_Element": str(psp)} if psp else {}


def _loebenummer(loenart: str, settings: VendorSettings) -> int:
    value = settings.options.get("loebenummer", 1)
    if isinstance(value, Mapping):
        value = value.get(loenart, value.get("default", 1))
    return int(value)


# ---------------------------------------------------------------------------------------
# Reading KMD's answers.
# ---------------------------------------------------------------------------------------


def _reply(
    resp: Response, operation: str, schema: Any, error: type[InDoubt] | type[Transient]
) -> Any:
    """The answer's JSON, checked against our schema of it; ``error`` when it is not usable."""
    _check_http(resp, operation)
    try:
        doc = _json(resp.body)
    except ValueError as exc:
        raise error(
            f"{operation}: unreadable answer: {exc}", status=resp.status, body=resp.body
        ) from exc
    errors = _errors(schema, doc)
    if errors:
        raise error(
            f"{operation}: unexpected answer: " + "; ".join(errors),
            status=resp.status,
            body=resp.body,
        )
    return doc


def _json(body: bytes) -> Any:
    try:
        return json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"not JSON: {body[:200]!r}") from exc


def _excerpt(body: bytes) -> str:
    return mask_cpr(body[:300].decode("utf-8", "replace").strip())


def _check_http(resp: Response, what: str) -> None:
    """Translate an answer whose status is not a success into the error the dispatcher acts on."""
    error = classify_status(resp, what, hint=CONFIG_HINT)
    if error is not None:
        raise error


@dataclass(frozen=True, slots=True)
class Meddelelse:
    kode: int
    type: str
    tekst: str

    def __str__(self) -> str:
        return f"{self.kode} {self.tekst}"


def _messages(doc: Mapping[str, Any]) -> list[Meddelelse]:
    return [
        Meddelelse(int(m["Kode"]), str(m.get("Type") or ""), mask_cpr(str(m.get("Tekst") or "")))
        for m in doc.get("Meddelelse") or ()
    ]


def _update_error(msgs: Sequence[Meddelelse], resp: Response) -> Exception:
    """The error for ``Status "Error"``: KMD applied nothing of this call."""
    errors = [m for m in msgs if m.type == "E"] or list(msgs)
    text = "; ".join(str(m) for m in errors) or "Status Error without Meddelelse"
    if any(m.kode == LOCKED for m in errors):
        return Transient(
            f"employee locked at KMD, retry later: {text}", status=resp.status, body=resp.body
        )
    fields = sorted({FIELD_CODES[m.kode] for m in errors if m.kode in FIELD_CODES})
    fix = f" (fix: {', '.join(fields)})" if fields else ""
    return Rejected(f"KMD rejected the payments: {text}{fix}", status=resp.status, body=resp.body)


# ---------------------------------------------------------------------------------------
# The adapter.
# ---------------------------------------------------------------------------------------


class KmdEngangsydelser:
    """Mileage to KMD Opus as one-off payments, corrected by differences after a read."""

    name = "kmd-engangsydelser"
    kinds = frozenset({Kind.DRIVE})
    schema_files = SCHEMA_FILES
    required_fields: frozenset[str] = frozenset()
    unsupported_fields: frozenset[str] = frozenset()
    field_formats = MappingProxyType(
        {  # Medarbejdernummer and Loenart as KMD takes them
            "/employee/employment_id": (r"[0-9A-Za-z]{1,32}", "1-32 letters or digits"),
            "/wage_code": (r"[0-9]{4}", "4 digits"),
            "/wage_code_optional": (r"[0-9]{4}", "4 digits"),
        }
    )
    opening_hours: str | None = None
    file_based = False
    #: corrections are sent as differences, so KMD is read before every plan
    reads_back = True
    reads_before_send = True

    def __init__(self) -> None:
        self._update = _load(SCHEMA_FILES[0])
        self._update_reply = _load(SCHEMA_FILES[1])
        self._read = _load(SCHEMA_FILES[2])
        self._read_reply = _load(SCHEMA_FILES[3])

    # -- plan ---------------------------------------------------------------------------

    def plan(
        self, report: Report, delivered: Sequence[DeliveredPart], settings: VendorSettings
    ) -> Plan:
        if report.kind is not Kind.DRIVE or report.drive_date is None:
            raise InvalidPayload(f"{self.name} delivers drive reports only")
        month = _month(report.drive_date)
        held = _holdings(delivered, month)
        wanted = {(month, code): km for code, km in _desired(report).items()}
        keys = sorted(set(held.totals) | set(wanted))
        diffs = {k: wanted.get(k, ZERO) - held.totals.get(k, ZERO) for k in keys}
        changed = [k for k in keys if diffs[k] != 0]
        if not changed:
            if held.known:
                return Plan()
            return Plan(not_applicable="cancelled" if report.cancelled else "zero distance")
        account = _account(report, settings)
        items = [self._item(report, held, k, diffs[k], account, settings) for k in changed]
        totals = {code: format_antal(wanted.get((m, code), ZERO)) for m, code in keys if m == month}
        fields = {
            "totals": totals,
            "month": month,
            "startdato": report.drive_date.isoformat(),
            "items": items,
        }
        return Plan((Message(PART, "update", fields),))

    @staticmethod
    def _item(
        report: Report,
        held: Holdings,
        key: Key,
        diff: Decimal,
        account: Mapping[str, str],
        settings: VendorSettings,
    ) -> dict[str, Any]:
        month, loenart = key
        assert report.drive_date is not None
        own_month = month == _month(report.drive_date)
        startdato = (
            report.drive_date.isoformat() if own_month else held.dates.get(month, f"{month}-01")
        )
        return {
            "Startdato": startdato,
            "Loenart": loenart,
            "Loebenummer": _loebenummer(loenart, settings),
            "Antal": format_antal(diff),
            **account,
        }

    # -- render -------------------------------------------------------------------------

    def render(self, report: Report, message: Message, settings: VendorSettings) -> Payload:
        """The update request JSON (several JSON lines when there are over 999 items).

        Pure except for one value: ``OpdateringsID`` is ``message.fields["opdaterings_id"]``
        when given, otherwise a fresh uuid4 (KMD's id of this call). Calls after the first
        use ids derived from it with uuid5, so the whole payload depends on that one value.
        """
        items = list(message.fields.get("items") or ())
        if not items:
            raise InvalidPayload("no Engangsydelser to send")
        base = str(message.fields.get("opdaterings_id") or uuid.uuid4().hex).upper()
        docs = [
            self._request(report, chunk, _call_id(base, n), settings)
            for n, chunk in enumerate(batches(items))
        ]
        body = "\n".join(json.dumps(d, ensure_ascii=False) for d in docs).encode("utf-8")
        return Payload(body=body, content_type="application/json", path=UPDATE_PATH)

    def _request(
        self,
        report: Report,
        items: Sequence[Mapping[str, Any]],
        call_id: str,
        settings: VendorSettings,
    ) -> dict[str, Any]:
        opts = settings.options
        sender = str(opts.get("sender") or DEFAULT_SENDER)
        header = {
            "ClientID": str(opts.get("client_id") or report.municipality),
            "OpdateringsID": call_id,
        }
        if opts.get("validate_only"):
            header["Kun_Valider"] = "1"  # otherwise absent, as OS2indberetning's client sends it
        doc: dict[str, Any] = {
            "Header": header,
            "Medarbejder": {"Medarbejdernummer": report.employee.employment_id},
            "Engangsydelser": [
                _item_fields(item, seq, sender, report.report_id) for seq, item in enumerate(items)
            ],
        }
        _require_one_account(doc["Engangsydelser"])
        errors = _errors(self._update, doc)
        if errors:
            raise InvalidPayload("update request fails the schema: " + "; ".join(errors[:20]))
        return doc

    # -- send ---------------------------------------------------------------------------

    async def send(self, payload: Payload, channel: Channel) -> Receipt:
        refs: list[str] = []
        warnings: list[str] = []
        resp: Response | None = None
        for n, line in enumerate(payload.body.splitlines()):
            call = Payload(line, payload.content_type, payload.headers, payload.path)
            try:
                resp = await post(channel, call)
                ref, warning = self._interpret_update(line, resp)
            except (Transient, Rejected, InDoubt) as exc:
                if n:  # earlier calls were applied; the next read-back accounts for them
                    exc.message = f"{exc.message} (calls 1-{n} were applied: {', '.join(refs)})"
                    exc.args = (exc.message,)
                raise
            refs.append(ref)
            warnings += warning
        assert resp is not None
        return Receipt(
            vendor_reference=";".join(refs),
            status=resp.status,
            body=resp.body,
            warning="; ".join(warnings) or None,
        )

    def _interpret_update(self, request: bytes, resp: Response) -> tuple[str, list[str]]:
        # an update answer we cannot read may still mean it was applied
        doc = _reply(resp, "update-onetime-payments", self._update_reply, InDoubt)
        msgs = _messages(doc)
        if doc["Header"]["Status"] != "OK":
            raise _update_error(msgs, resp)
        sent = json.loads(request)
        seqs = ",".join(i["Sekvensnummer"] for i in sent["Engangsydelser"])
        warnings = [m.tekst for m in msgs if m.type == "W"]
        if sent["Header"].get("Kun_Valider") == "1":
            warnings.append("validate_only: KMD validated the payments and posted nothing")
        return f"{sent['Header']['OpdateringsID']}#{seqs}", warnings

    # -- read back ----------------------------------------------------------------------

    async def read_back(
        self,
        report: Report,
        known: Sequence[DeliveredPart],
        pending: Sequence[Message],
        channel: Channel,
    ) -> Sequence[DeliveredPart]:
        """What KMD holds from this gateway for this report: one ``payments`` part, or none."""
        if report.drive_date is None:
            raise InvalidPayload(f"{self.name} delivers drive reports only")
        month = _month(report.drive_date)
        sender = str(channel.settings.options.get("sender") or DEFAULT_SENDER)
        sums: dict[Key, Decimal] = {}
        dates: dict[str, str] = {}
        for m in sorted(_months(month, known, pending)):
            for entry in await self._read_month(report, m, channel):
                # entries outside the month asked for are KMD's filter's business, not ours
                if _ours(entry, sender, report.report_id) and _read_date(entry)[:7] == m:
                    _collect(sums, dates, entry)
        return _as_parts(report, month, sums, dates)

    async def _read_month(self, report: Report, month: str, channel: Channel) -> list[Any]:
        fra, til = _month_bounds(month)
        doc = {
            "Header": {
                "ClientID": str(channel.settings.options.get("client_id") or report.municipality)
            },
            "Medarbejder": {"Medarbejdernummer": report.employee.employment_id},
            "VirkningFilter": {"FraDatoTid": fra, "TilDatoTid": til},
        }
        errors = _errors(self._read, doc)
        if errors:
            raise InvalidPayload("read request fails the schema: " + "; ".join(errors))
        body = json.dumps(doc, ensure_ascii=False).encode("utf-8")
        resp = await post(channel, Payload(body, "application/json", path=READ_PATH))
        return self._interpret_read(resp)

    def _interpret_read(self, resp: Response) -> list[Any]:
        doc = _reply(resp, "read-onetime-payments", self._read_reply, Transient)
        header = doc["Header"]
        if header["Status"] == 1 and header.get("Tekst") == NOT_FOUND:
            return []
        if header["Status"] != 0:
            text = mask_cpr(str(header.get("Tekst") or ""))
            raise Rejected(
                f"read-onetime-payments: status {header['Status']}: {text}",
                status=resp.status,
                body=resp.body,
            )
        return list(doc.get("Engangsydelser") or ())


def _call_id(base: str, n: int) -> str:
    if n == 0:
        return base
    try:
        return uuid.uuid5(uuid.UUID(hex=base), f"batch-{n}").hex.upper()
    except ValueError:
        return base  # not a UUID: the schema check reports it


def _item_fields(item: Mapping[str, Any], seq: int, sender: str, remark: str) -> dict[str, Any]:
    """One Engangsydelse, its fields in the order KMD documents them."""
    values = {
        **item,
        "Startdato": _wire_date(item.get("Startdato")),
        "Sekvensnummer": str(seq),
        "Afsendelses_System": sender,
        "Indv_Bemaerkning": remark,
    }
    keys = (
        "Startdato",
        "Loenart",
        "Loebenummer",
        "Sekvensnummer",
        "Antal",
        "Afv_Omkostningssted",
        "Afv_PSP_Element",
        "Afsendelses_System",
        "Indv_Bemaerkning",
    )
    return {k: values[k] for k in keys if values.get(k) not in (None, "")}


def _wire_date(value: Any) -> Any:
    """A plan's ISO date as KMD's client sends it: ``YYYY-MM-DDT00:00:00Z``."""
    if isinstance(value, str) and len(value) == 10:
        return f"{value}T00:00:00Z"
    return value  # anything else: the schema check names it


def _read_date(entry: Mapping[str, Any]) -> str:
    """A read entry's ``Startdato`` as ``YYYY-MM-DD``, by the gateway's one date rule: a plain
    date or local date-time as written, an instant as the Danish date (our own
    ``T00:00:00Z`` is 01:00 or 02:00 in Denmark: the same day)."""
    text = str(entry["Startdato"])
    try:
        return payroll_date(text).isoformat()
    except ValueError:
        return text[:10]


def _require_one_account(items: Iterable[Mapping[str, Any]]) -> None:
    for item in items:
        if item.get("Afv_Omkostningssted") and item.get("Afv_PSP_Element"):
            raise InvalidPayload(
                f"Engangsydelse {item['Sekvensnummer']} gives both Afv_Omkostningssted and "
                "Afv_PSP_Element; KMD accepts only one (code 167)"
            )


def _months(month: str, known: Sequence[DeliveredPart], pending: Sequence[Message]) -> set[str]:
    """The report's month plus every month an earlier version was posted in."""
    months = {month}
    for part in known:
        if part.part == PART:
            months.add(str(part.fields.get("month") or month))
            months.update(dict(part.fields.get("other_months") or {}))
    for msg in pending:
        months.update(str(i["Startdato"])[:7] for i in msg.fields.get("items") or ())
    return months


def _ours(entry: Mapping[str, Any], sender: str, report_id: str) -> bool:
    return (
        entry.get("Indv_Bemaerkning_1") == sender and entry.get("Indv_Bemaerkning_2") == report_id
    )


def _collect(sums: dict[Key, Decimal], dates: dict[str, str], entry: Mapping[str, Any]) -> None:
    startdato = _read_date(entry)
    key = (startdato[:7], _loenart(str(entry["Loenart"])))
    sums[key] = sums.get(key, ZERO) + _decimal(entry["Antal"])
    dates[key[0]] = min(dates.get(key[0], startdato), startdato)


def _as_parts(
    report: Report, month: str, sums: Mapping[Key, Decimal], dates: Mapping[str, str]
) -> list[DeliveredPart]:
    if not sums:
        return []
    totals = {code: format_antal(v) for (m, code), v in sorted(sums.items()) if m == month}
    fields: dict[str, Any] = {"totals": totals, "month": month}
    if month in dates:
        fields["startdato"] = dates[month]
    other: dict[str, Any] = {}
    for (m, code), v in sorted(sums.items()):
        if m != month and v != 0:
            held = other.setdefault(m, {"startdato": dates[m], "totals": {}})
            held["totals"][code] = format_antal(v)
    if other:
        fields["other_months"] = other
    return [DeliveredPart(part=PART, version=report.version, fields=fields)]
