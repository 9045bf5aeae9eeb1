"""KMD Opus absence adapter: vacation reports as SAP PI ``SetAbsenceAttendance_OS_SI`` calls.

A report becomes up to three KMD absences (its *parts*), and each new version becomes the
few ``INS``/``MOD``/``DEL`` operations that turn what KMD holds into the new version.

Parts and their stable keys (see :func:`split`):

- ``absence:1``: the start day from its ``start_time`` to the end of that day (no
  ``EndTime``, as OS2ferie sends it); a single day with a start time (and maybe an end time).
- ``absence:2``: the whole days: the report without times, or the days between the part days.
- ``absence:3``: the end day from its start up to ``end_time`` (no ``StartTime``); a single
  day with only an end time.

Mapping a new version onto the delivered parts (see :meth:`KmdAbsence.plan`), by key:

1. a delivered part whose key the new version lacks, or whose personnel number or absence
   type changed, is deleted (``DEL``), first, so that the ranges it frees are free before
   anything moves in (the type is part of the record's key in SAP: a ``MOD`` cannot change
   it, so a type change is always ``DEL`` + ``INS``);
2. a key in both with changed fields is modified (``MOD``; ``Original*`` are the *delivered*
   part's fields); modifications are ordered so no intermediate state overlaps another part
   KMD holds, and any that cannot be so ordered fall back to ``DEL`` then ``INS``;
3. a key only in the new version is inserted (``INS``), last;
4. a key in both with equal fields is not sent (KMD already holds it).

``cancelled`` (or a type KMD is not told about) deletes every delivered part. A part's
``Message.fields`` are its state (``STATE_KEYS``, JSON-safe strings); a ``MOD`` adds the
delivered state under ``"original"``, which planning ignores when it reads the part back.
A period that is empty or ends before it starts raises :class:`InvalidPayload` from ``plan``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, time, timedelta
from types import MappingProxyType
from typing import Any
from urllib.parse import quote, urlencode

from lxml import etree

from adapters.base import (
    Channel,
    DeliveredPart,
    DeliveryError,
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
    UnsafeXML,
    ZeepCodec,
    body_payload,
    find_fault,
    load_schema,
    parse_xml,
    schema_errors,
)

__all__ = [
    "Absence",
    "HeldAbsence",
    "KmdAbsence",
    "NAMESPACE",
    "Point",
    "diff",
    "endpoint_url",
    "overlaps",
    "parse_holdings",
    "request_state",
    "span",
    "split",
    "type_code",
]

NAMESPACE = "urn:kmd.dk:LPT:VACAB:external"
SAP_XI = "http://sap.com/xi/WebService/xi2.0"
SET_INTERFACE = "SetAbsenceAttendance_OS_SI"
READ_INTERFACE = "GetAbsenceAttendanceByPeriod_OS_SI"
CONTENT_TYPE = "text/xml; charset=utf-8"
SOAP_ACTION = '"http://sap.com/xi/WebService/soap1.1"'

DEFAULT_TYPE_CODES: Mapping[str, str] = {
    "regular": "FE",
    "sixth_week": "6F",
    "senior": "SO",
    "care": "OS",
}
# the fields that describe what KMD holds for a part (Message.fields may add "original")
STATE_KEYS = (
    "personnel_number",
    "type",
    "start_date",
    "end_date",
    "start_time",
    "end_time",
    "additional_data",
)
# SAP PI SystemError codes that mean our settings are wrong, so retrying cannot help
_CONFIG_CODE_MARKERS = (
    "RCVR_DETERMINATION",
    "RECEIVER_DETERMINATION",
    "NO_RECEIVER",
    "IF_DETERMINATION",
    "INTERFACE",
    "SENDER_AGREEMENT",
    "CONFIG",
)
_SETTINGS_HINT = (
    "check the tenant's KMD settings (endpoint, options.senderService, options.interface, "
    "options.interfaceNamespace) and client certificate"
)

Point = tuple[int, int]  # (date ordinal, seconds into the day): comparable, no time zone
State = dict[str, str | None]


# ---------------------------------------------------------------------------------------
# Splitting a report into absences (pure).
# ---------------------------------------------------------------------------------------


def span(
    start_date: date, end_date: date, start_time: time | None, end_time: time | None
) -> tuple[Point, Point]:
    """The half-open interval an absence covers: no start time is midnight, no end time
    is the end of the end day."""
    start = (start_date.toordinal(), _seconds(start_time))
    end = (end_date.toordinal(), _seconds(end_time)) if end_time else (end_date.toordinal() + 1, 0)
    return start, end


def overlaps(a: tuple[Point, Point], b: tuple[Point, Point]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def _seconds(value: time | None) -> int:
    return 0 if value is None else value.hour * 3600 + value.minute * 60 + value.second


@dataclass(frozen=True, slots=True)
class Absence:
    """One KMD absence a report version needs, under its stable part key."""

    key: str
    start_date: date
    end_date: date
    start_time: time | None = None
    end_time: time | None = None

    @property
    def span(self) -> tuple[Point, Point]:
        return span(self.start_date, self.end_date, self.start_time, self.end_time)

    @property
    def empty(self) -> bool:
        start, end = self.span
        return start >= end


def split(report: Report) -> list[Absence]:
    """The absences of a vacation report, in time order; ValueError if its period is empty."""
    first, last = report.start_date, report.end_date
    if first is None or last is None:
        raise ValueError("a vacation report needs start_date and end_date")
    if first > last:
        raise ValueError(f"the period {first}..{last} ends before it starts")
    start_time, end_time = report.start_time, report.end_time
    if first == last or (start_time is None and end_time is None):
        parts = [Absence(_single_key(start_time, end_time), first, last, start_time, end_time)]
    else:
        parts = _multi_day(first, last, start_time, end_time)
    parts = [p for p in parts if not p.empty]  # e.g. an end part "until 00:00"
    if not parts:
        raise ValueError(f"the period {first}..{last} is empty or ends before it starts")
    return parts


def _single_key(start_time: time | None, end_time: time | None) -> str:
    if start_time is not None:
        return "absence:1"
    return "absence:3" if end_time is not None else "absence:2"


def _multi_day(
    first: date, last: date, start_time: time | None, end_time: time | None
) -> list[Absence]:
    parts = []
    if start_time is not None:
        parts.append(Absence("absence:1", first, first, start_time, None))
    days_from = first + timedelta(days=1) if start_time is not None else first
    days_to = last - timedelta(days=1) if end_time is not None else last
    if days_from <= days_to:  # two part days side by side leave no whole day between
        parts.append(Absence("absence:2", days_from, days_to))
    if end_time is not None:
        parts.append(Absence("absence:3", last, last, None, end_time))
    return parts


# ---------------------------------------------------------------------------------------
# Part state: what a Message.fields / DeliveredPart.fields says KMD holds (JSON-safe).
# ---------------------------------------------------------------------------------------


def _state_of(absence: Absence, code: str, extra: str | None, personnel: str) -> State:
    return {
        "personnel_number": personnel,
        "type": code,
        "start_date": absence.start_date.isoformat(),
        "end_date": absence.end_date.isoformat(),
        "start_time": _hms(absence.start_time),
        "end_time": _hms(absence.end_time),
        "additional_data": extra,
    }


def _state(fields: Mapping[str, Any]) -> State:
    return {k: fields.get(k) for k in STATE_KEYS}


def _hms(value: time | None) -> str | None:
    return None if value is None else value.strftime("%H:%M:%S")


def _state_span(state: Mapping[str, Any]) -> tuple[Point, Point]:
    return span(
        date.fromisoformat(state["start_date"]),
        date.fromisoformat(state["end_date"]),
        _time(state.get("start_time")),
        _time(state.get("end_time")),
    )


def _time(value: str | None) -> time | None:
    return time.fromisoformat(value) if value else None


def _reference(state: Mapping[str, Any]) -> str:
    """A descriptive handle (KMD returns no id); never a CPR number."""
    start = " ".join(filter(None, (state["start_date"], state.get("start_time"))))
    end = " ".join(filter(None, (state["end_date"], state.get("end_time"))))
    return f"{state['type']} {start}..{end} #{state['personnel_number']}"


# ---------------------------------------------------------------------------------------
# Planning the operations for a version (pure).
# ---------------------------------------------------------------------------------------


def _delete(key: str, held: State) -> Message:
    return Message(part=key, operation="DEL", fields=dict(held), deletes=True)


def _insert(key: str, wanted: State) -> Message:
    return Message(part=key, operation="INS", fields=dict(wanted))


def _modify(key: str, held: State, wanted: State) -> Message:
    return Message(part=key, operation="MOD", fields={**wanted, "original": dict(held)})


def _clashes(key: str, state: State, occupied: Mapping[str, State]) -> bool:
    mine = _state_span(state)
    return any(
        other["personnel_number"] == state["personnel_number"]
        and overlaps(mine, _state_span(other))
        for k, other in occupied.items()
        if k != key
    )


def _order_mods(
    changed: Iterable[str], held: Mapping[str, State], wanted: Mapping[str, State]
) -> tuple[list[str], list[str]]:
    """Modifications in an order where none overlaps what KMD holds at that moment, and
    those left over (an ordering that does not exist) for DEL + INS."""
    occupied, order, left = dict(held), [], list(changed)
    while left:
        free = next((k for k in left if not _clashes(k, wanted[k], occupied)), None)
        if free is None:
            break
        order.append(free)
        left.remove(free)
        occupied[free] = wanted[free]
    return order, left


def _same_record(held: State, wanted: State) -> bool:
    """Whether a MOD can turn ``held`` into ``wanted``: SAP keys a record by person and type."""
    return all(held[k] == wanted[k] for k in ("personnel_number", "type"))


def diff(held: Mapping[str, State], wanted: Mapping[str, State]) -> list[Message]:
    """The KMD operations that turn ``held`` into ``wanted`` (both keyed by part)."""
    gone = sorted(k for k, v in held.items() if k not in wanted or not _same_record(v, wanted[k]))
    kept = {k: v for k, v in held.items() if k not in gone}
    changed = [k for k in sorted(wanted) if k in kept and kept[k] != wanted[k]]
    mods, stuck = _order_mods(changed, kept, wanted)
    new = sorted(k for k in wanted if k not in kept or k in stuck)
    return [
        *(_delete(k, held[k]) for k in gone),
        *(_modify(k, kept[k], wanted[k]) for k in mods),
        *(_delete(k, kept[k]) for k in stuck),
        *(_insert(k, wanted[k]) for k in new),
    ]


def type_code(vacation_type: str | None, settings: VendorSettings) -> str | None:
    """KMD's absence type for a vacation type (tenant override first), or None: not sent."""
    overrides = settings.options.get("type_codes") or {}
    code = overrides.get(vacation_type) or DEFAULT_TYPE_CODES.get(vacation_type or "")
    return str(code) if code else None


def _additional_data(report: Report) -> str | None:
    if report.vacation_type != "care":
        return None
    if report.child_number is None:
        raise InvalidPayload("a care day needs child_number (KMD AdditionalData)")
    return f"{report.child_number:02d}"


# ---------------------------------------------------------------------------------------
# Reading KMD's answers.
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HeldAbsence:
    """One absence as GetAbsenceAttendanceByPeriod reports it, normalised for matching."""

    personnel_number: str
    type: str
    start_date: str
    end_date: str
    start_time: str | None
    end_time: str | None

    def matches(self, state: Mapping[str, Any]) -> bool:
        return self == _held_from_state(state)


def _held_from_state(state: Mapping[str, Any]) -> HeldAbsence:
    return HeldAbsence(
        personnel_number=str(state["personnel_number"]),
        type=str(state["type"]),
        start_date=str(state["start_date"]),
        end_date=str(state["end_date"]),
        start_time=_norm_time(state.get("start_time"), ("00:00:00",)),
        end_time=_norm_time(state.get("end_time"), ("00:00:00", "24:00:00")),
    )


def _norm_time(value: str | None, no_time: tuple[str, ...]) -> str | None:
    # KMD may write a whole day's missing time as midnight; both mean "no time"
    value = (value or "").strip()
    if len(value) == 5:
        value += ":00"
    return None if not value or value in no_time else value


def _text(parent: etree._Element | None, name: str) -> str:
    if parent is None:
        return ""
    return (parent.findtext(name) or "").strip()


def parse_holdings(payload: etree._Element) -> list[HeldAbsence]:
    """The absences in a GetAbsenceAttendanceByPeriodResponse_MT payload."""
    return [
        _held_item(item.find("Key"), item.find("Item"))
        for item in payload.iterfind("AbsenceAttendance/item")
    ]


def _held_item(key: etree._Element | None, body: etree._Element | None) -> HeldAbsence:
    def pick(name: str) -> str:  # the Item's value, else the record key's
        return _text(body, name) or _text(key, name)

    return _held_from_state(
        {
            "personnel_number": pick("PersonnelNumber"),
            "type": pick("AbsenceAttendanceType"),
            "start_date": pick("StartDate"),
            "end_date": pick("EndDate"),
            "start_time": _text(body, "StartTime"),
            "end_time": _text(body, "EndTime"),
        }
    )


def _system_error(envelope: etree._Element) -> dict[str, str]:
    """context/code/text of an SAP PI SystemError fault detail (empty if none)."""
    el = envelope.find(f".//{{{SAP_XI}}}SystemError")
    if el is None:
        return {}
    return {etree.QName(c).localname: (c.text or "").strip() for c in el if isinstance(c.tag, str)}


def _raise_for_status(resp: Response) -> None:
    """Translate an answer whose status is not a success into the error the dispatcher acts on."""
    error = classify_status(resp, "KMD", hint=_SETTINGS_HINT, body_rules=_fault_error)
    if error is not None:
        raise error


def _fault_error(resp: Response) -> Transient | Rejected | None:
    """What an SAP PI fault in a server error (5xx) says: configuration, client or system."""
    if resp.status < 500:
        return None
    try:
        envelope = parse_xml(resp.body)
    except UnsafeXML:
        return None
    fault = find_fault(envelope)
    if fault is None:
        return None
    error = _system_error(envelope)
    text = mask_cpr(" / ".join(filter(None, (fault.string, *error.values()))))
    code = error.get("code", "").upper()
    if any(marker in code for marker in _CONFIG_CODE_MARKERS):
        return Rejected(
            f"KMD SAP PI configuration error: {text}; {_SETTINGS_HINT}",
            status=resp.status,
            body=resp.body,
        )
    if fault.code == "Client":
        return Rejected(
            f"KMD rejected the request: {mask_cpr(fault.string + ' ' + fault.detail)}",
            status=resp.status,
            body=resp.body,
        )
    return Transient(f"KMD system error: {text}", status=resp.status, body=resp.body)


def _payload_element(resp: Response, garbled: type[DeliveryError]) -> etree._Element:
    try:
        return body_payload(parse_xml(resp.body))
    except UnsafeXML as exc:
        raise garbled(
            f"KMD answered HTTP 200 with no readable SOAP body: {exc}",
            status=resp.status,
            body=resp.body,
        ) from exc


def _set_outcome(resp: Response, reference: str) -> Receipt:
    _raise_for_status(resp)
    # the request was processed but the answer is unreadable: it may have been applied
    payload = _payload_element(resp, InDoubt)
    kind = _text(payload.find("ReturnStatus"), "StatusType").upper()
    text = mask_cpr(_text(payload.find("ReturnStatus"), "MessageText"))
    if kind in ("", "S"):
        return Receipt(reference, status=resp.status, body=resp.body)
    if kind in ("W", "I"):
        return Receipt(reference, status=resp.status, body=resp.body, warning=text or kind)
    raise Rejected(f"KMD: {text or 'status ' + kind}", status=resp.status, body=resp.body)


def _read_outcome(resp: Response) -> list[HeldAbsence]:
    _raise_for_status(resp)
    payload = _payload_element(resp, Transient)
    for item in payload.iterfind("ReturnStatus/item"):
        if _text(item, "StatusType").upper() in ("E", "A"):
            raise Transient(
                f"KMD read failed: {mask_cpr(_text(item, 'MessageText'))}",
                status=resp.status,
                body=resp.body,
            )
    return parse_holdings(payload)


# ---------------------------------------------------------------------------------------
# The adapter.
# ---------------------------------------------------------------------------------------


class KmdAbsence:
    """``kmd-absence``: vacation → KMD Opus SetAbsenceAttendance (mTLS, SAP PI)."""

    name = "kmd-absence"
    kinds = frozenset({Kind.VACATION})
    schema_files = (
        "kmd/vacab.xsd",
        "kmd/SetAbsenceAttendance_OS_SI.wsdl",
        "kmd/GetAbsenceAttendanceByPeriod_OS_SI.wsdl",
    )
    required_fields: frozenset[str] = frozenset()
    unsupported_fields: frozenset[str] = frozenset()
    field_formats: Mapping[str, tuple[str, str]] = MappingProxyType({})
    opening_hours: str | None = None
    file_based = False
    #: GetAbsenceAttendanceByPeriod reconciles in-doubt deliveries; no read before each plan
    reads_back = True
    reads_before_send = False

    def __init__(self) -> None:
        self._set = ZeepCodec(schema_path("kmd/SetAbsenceAttendance_OS_SI.wsdl"))
        self._read = ZeepCodec(schema_path("kmd/GetAbsenceAttendanceByPeriod_OS_SI.wsdl"))
        self._schema = load_schema(schema_path("kmd/vacab.xsd"))
        self._set_template = RequestTemplate(self._set, SET_INTERFACE, self._schema)
        self._read_template = RequestTemplate(self._read, READ_INTERFACE, self._schema)

    # -- plan -------------------------------------------------------------------------

    def plan(
        self, report: Report, delivered: Sequence[DeliveredPart], settings: VendorSettings
    ) -> Plan:
        held = {p.part: _state(p.fields) for p in delivered}
        code = type_code(report.vacation_type, settings)
        if report.cancelled or code is None:
            if held:
                return Plan(messages=tuple(_delete(k, held[k]) for k in sorted(held)))
            return Plan(not_applicable=_why_nothing(report))
        return Plan(messages=tuple(diff(held, self._wanted(report, code))))

    def _wanted(self, report: Report, code: str) -> dict[str, State]:
        """The parts KMD should hold for this version, keyed by part."""
        extra = _additional_data(report)
        try:
            absences = split(report)
        except ValueError as exc:
            raise InvalidPayload(str(exc)) from exc
        return {a.key: _state_of(a, code, extra, report.employee.employment_id) for a in absences}

    # -- render -----------------------------------------------------------------------

    def render(self, report: Report, message: Message, settings: VendorSettings) -> Payload:
        try:
            values = _set_values(message)
            body = self._set_template.build(values)  # lxml, schema-checked
            if body is not None:
                return self._payload(body, self._set_template.soap_action)
            body, headers = self._set.build(SET_INTERFACE, **values)  # zeep says why
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidPayload(
                mask_cpr(f"cannot build {message.operation}: {exc!r}", report.cprs)
            ) from exc
        return self._checked(body, headers, report)

    def render_read(
        self, report: Report, period_start: date, period_end: date, settings: VendorSettings
    ) -> Payload:
        """The GetAbsenceAttendanceByPeriod request for the report's employee."""
        return self._read_payload(report.employee.employment_id, period_start, period_end, report)

    def _read_payload(self, personnel: str, start: date, end: date, report: Report) -> Payload:
        values = {
            "StartDate": start.isoformat(),
            "EndDate": end.isoformat(),
            "PersonnelNumber": personnel,
        }
        body = self._read_template.build(values)
        if body is not None:
            return self._payload(body, self._read_template.soap_action)
        body, headers = self._read.build(READ_INTERFACE, **values)
        return self._checked(body, headers, report)

    def _checked(self, body: bytes, headers: Mapping[str, str], report: Report) -> Payload:
        """zeep's envelope, checked against the schema (the template's fallback)."""
        errors = schema_errors(self._schema, body_payload(parse_xml(body)))
        if errors:
            raise InvalidPayload(mask_cpr("; ".join(errors), report.cprs), body=body)
        return self._payload(body, headers.get("SOAPAction", SOAP_ACTION))

    @staticmethod
    def _payload(body: bytes, action: str) -> Payload:
        return Payload(body=body, content_type=CONTENT_TYPE, headers={"SOAPAction": action})

    # -- send -------------------------------------------------------------------------

    async def send(self, payload: Payload, channel: Channel) -> Receipt:
        url = endpoint_url(channel.settings, SET_INTERFACE)
        reference = _reference(_request_state(payload.body))
        resp = await post(channel, payload, url=url)
        return _set_outcome(resp, reference)

    # -- read back --------------------------------------------------------------------

    async def read_back(
        self,
        report: Report,
        known: Sequence[DeliveredPart],
        pending: Sequence[Message],
        channel: Channel,
    ) -> Sequence[DeliveredPart]:
        candidates = [(p.part, p.version, _state(p.fields)) for p in known]
        candidates += [
            (m.part, report.version, _state(m.fields)) for m in pending if not m.deletes
        ]  # a pending DEL's part is among the known ones
        found: dict[str, DeliveredPart] = {}
        for personnel, rows in _by_personnel(candidates).items():
            held = await self._holdings(report, personnel, rows, channel)
            for part, version, state in rows:
                if _held_from_state(state) in held:
                    found[part] = DeliveredPart(part, version, state, _reference(state))
        return list(found.values())

    async def _holdings(
        self,
        report: Report,
        personnel: str,
        rows: Sequence[tuple[str, int, State]],
        channel: Channel,
    ) -> set[HeldAbsence]:
        start = min(date.fromisoformat(str(s["start_date"])) for _, _, s in rows)
        end = max(date.fromisoformat(str(s["end_date"])) for _, _, s in rows)
        payload = self._read_payload(personnel, start, end, report)
        url = endpoint_url(channel.settings, READ_INTERFACE, read=True)
        try:
            resp = await post(channel, payload, url=url)
        except InDoubt as exc:  # a read changes nothing: simply try again later
            raise Transient(f"KMD read: {exc.message}") from exc
        return set(_read_outcome(resp))


def _why_nothing(report: Report) -> str:
    if report.cancelled:
        return "cancelled, and KMD holds nothing for this report"
    return f"vacation type {report.vacation_type!r} is not registered in KMD Opus"


def _by_personnel(
    rows: Sequence[tuple[str, int, State]],
) -> dict[str, list[tuple[str, int, State]]]:
    groups: dict[str, list[tuple[str, int, State]]] = {}
    for row in rows:
        groups.setdefault(str(row[2]["personnel_number"]), []).append(row)
    return groups


def _set_values(message: Message) -> dict[str, str]:
    """SetAbsenceAttendanceRequest_MT children from a message (None values are omitted)."""
    f = message.fields
    values = {
        "StartDate": f["start_date"],
        "StartTime": f.get("start_time"),
        "EndDate": f["end_date"],
        "EndTime": f.get("end_time"),
        "AdditionalData": f.get("additional_data"),
        "Operation": message.operation,
        "PersonnelNumber": f["personnel_number"],
        "AbsenceAttendanceType": f["type"],
    }
    if message.operation == "MOD":
        # from the delivered part, never from the new version (OS2ferie filled
        # OriginalStartTime from the old end time, so KMD could not find the record)
        original = f["original"]
        values.update(
            OriginalStartDate=original["start_date"],
            OriginalStartTime=original.get("start_time"),
            OriginalEndDate=original["end_date"],
            OriginalEndTime=original.get("end_time"),
            OriginalAbsenceAttendanceType=original["type"],
        )
    return {k: v for k, v in values.items() if v is not None}


_ELEMENT_OF = {
    "personnel_number": "PersonnelNumber",
    "type": "AbsenceAttendanceType",
    "start_date": "StartDate",
    "end_date": "EndDate",
    "start_time": "StartTime",
    "end_time": "EndTime",
    "additional_data": "AdditionalData",
}


def request_state(payload: etree._Element) -> State:
    """The part state a SetAbsenceAttendanceRequest_MT payload describes."""
    return {key: (payload.findtext(name) or None) for key, name in _ELEMENT_OF.items()}


def _request_state(body: bytes) -> State:
    return request_state(body_payload(parse_xml(body)))


def endpoint_url(settings: VendorSettings, interface: str, *, read: bool = False) -> str:
    """The SAP PI MessageServlet URL with the sender/interface query parameters."""
    options = settings.options
    sender = options.get("senderService")
    if not sender:
        raise Rejected(f"KMD settings lack options.senderService; {_SETTINGS_HINT}")
    if not read:
        interface = options.get("interface", interface)
    query = {
        "senderParty": "",
        "senderService": sender,
        "receiverParty": "",
        "receiverService": "",
        "interface": interface,
        "interfaceNamespace": options.get("interfaceNamespace", NAMESPACE),
    }
    joiner = "&" if "?" in settings.endpoint else "?"
    return f"{settings.endpoint}{joiner}{urlencode(query, quote_via=quote, safe='')}"
