"""A stand-in for KMD Opus behind SAP PI: SetAbsenceAttendance and GetAbsenceAttendanceByPeriod
on one MessageServlet path, over mutual TLS, holding absences in a pure ledger.

Fault kinds (``options.fault``, forced on every Set request, or on the share ``fail_rate``
of them): ``server`` (HTTP 500 SAP SystemError, not applied), ``timeout`` (no answer for
``timeout_seconds``, not applied), ``drop-after-apply`` (applied, then the connection is
closed unanswered: the sender is in doubt), ``warning`` (applied, answered ``W``). Tests
change them at runtime through ``app[STATE]`` (``fault``, ``fail_rate``, ``fail_next``,
``drop_next``). Reads are never faulted, so reconciliation can always look.
"""

from __future__ import annotations

import asyncio
import random
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import date, time

from aiohttp import web
from lxml import etree

from adapters.kmd_absence import NAMESPACE, READ_INTERFACE, SAP_XI, SET_INTERFACE, overlaps, span
from adapters.resources import schema_path
from adapters.soap import (
    SOAP_ENV,
    UnsafeXML,
    body_payload,
    load_schema,
    parse_xml,
    schema_errors,
)
from gateway.simulators import SimulatorOptions

__all__ = [
    "FAULTS",
    "PATH",
    "STATE",
    "HeldRecord",
    "KmdLedger",
    "KmdSimState",
    "Received",
    "Status",
    "build_app",
    "ssl_context",
    "start",
]

PATH = "/XISOAPAdapter/MessageServlet"
FAULTS = ("server", "timeout", "drop-after-apply", "warning")
_SCHEMA = load_schema(schema_path("kmd/vacab.xsd"))
_SET_ROOT = f"{{{NAMESPACE}}}SetAbsenceAttendanceRequest_MT"
_READ_ROOT = f"{{{NAMESPACE}}}GetAbsenceAttendanceByPeriodRequest_MT"
_TYPE_TEXT = {"FE": "Ferie", "6F": "6. ferieuge", "SO": "Seniordag", "OS": "Omsorgsdag"}


# ---------------------------------------------------------------------------------------
# The ledger: what KMD holds per personnel number (pure, no I/O).
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Status:
    """A SAP BAPIRET2 outcome: ``S`` success, ``E`` error, ``W`` warning."""

    type: str
    text: str = ""


@dataclass(frozen=True, slots=True)
class HeldRecord:
    personnel_number: str
    type: str
    start_date: date
    end_date: date
    start_time: time | None = None
    end_time: time | None = None
    additional_data: str | None = None
    object_id: str = ""
    record_number: str = "000"
    lock_indicator: str = ""

    @property
    def span(self) -> tuple[tuple[int, int], tuple[int, int]]:
        return span(self.start_date, self.end_date, self.start_time, self.end_time)

    @property
    def identity(self) -> tuple[object, ...]:
        """What a MOD's Original* fields or a DEL's fields must name to find this record."""
        return (self.type, self.start_date, self.end_date, self.start_time, self.end_time)

    def describe(self) -> str:
        start = f"{self.start_date} {self.start_time or ''}".strip()
        end = f"{self.end_date} {self.end_time or ''}".strip()
        return f"{self.type} {start}..{end}"


def _date(value: str | None, name: str) -> date:
    if not value:
        raise ValueError(f"{name} is missing")
    return date.fromisoformat(value)


def _time(value: str | None) -> time | None:
    return time.fromisoformat(value) if value else None


def _record(request: Mapping[str, str | None], prefix: str = "") -> HeldRecord:
    """The record a request names: its new values, or with ``prefix="Original"`` the old ones
    (a left-out OriginalStartDate/EndDate/Type means the new value; a left-out Original time
    means the record had no time)."""

    def get(name: str) -> str | None:
        if prefix + name in request or name.endswith("Time"):
            return request.get(prefix + name)
        return request.get(name)

    return HeldRecord(
        personnel_number=request.get("PersonnelNumber") or "",
        type=get("AbsenceAttendanceType") or "",
        start_date=_date(get("StartDate"), prefix + "StartDate"),
        end_date=_date(get("EndDate"), prefix + "EndDate"),
        start_time=_time(get("StartTime")),
        end_time=_time(get("EndTime")),
        additional_data=request.get("AdditionalData"),
    )


class KmdLedger:
    """Absences per personnel number, changed by INS/MOD/DEL the way KMD does."""

    def __init__(self) -> None:
        self._held: dict[str, list[HeldRecord]] = {}
        self._next_id = 1

    def apply(self, request: Mapping[str, str | None]) -> Status:
        """Apply one SetAbsenceAttendance request (its child element texts by name)."""
        operation = (request.get("Operation") or "INS").upper()
        try:
            record = _record(request)
            original = _record(request, "Original") if operation == "MOD" else record
        except ValueError as exc:
            return Status("E", f"Ugyldig forespørgsel: {exc}")
        if not record.personnel_number or not record.type:
            return Status("E", "PersonnelNumber and AbsenceAttendanceType are required")
        if record.span[0] >= record.span[1]:
            return Status("E", f"Fravær {record.describe()} slutter før det starter")
        if operation == "INS":
            return self._insert(record)
        if operation == "MOD":
            return self._modify(original, record)
        if operation == "DEL":
            return self._delete(record)
        return Status("E", f"Ukendt operation {operation}")

    def holdings(
        self, personnel: str, start: date | None = None, end: date | None = None
    ) -> list[HeldRecord]:
        """The person's records whose dates touch ``start..end`` (all without bounds)."""
        return sorted(
            (
                r
                for r in self._held.get(personnel, ())
                if (start is None or r.end_date >= start) and (end is None or r.start_date <= end)
            ),
            key=lambda r: r.span,
        )

    def _find(self, wanted: HeldRecord) -> HeldRecord | None:
        mine = self._held.get(wanted.personnel_number, [])
        return next((r for r in mine if r.identity == wanted.identity), None)

    def _clash(self, record: HeldRecord, ignore: HeldRecord | None = None) -> HeldRecord | None:
        mine = self._held.get(record.personnel_number, [])
        return next((r for r in mine if r is not ignore and overlaps(r.span, record.span)), None)

    def _insert(self, record: HeldRecord) -> Status:
        clash = self._clash(record)
        if clash is not None:
            return Status("E", f"Fravær {record.describe()} overlapper {clash.describe()}")
        record = replace(record, object_id=f"{self._next_id:08d}")
        self._next_id += 1
        self._held.setdefault(record.personnel_number, []).append(record)
        return Status("S", f"Fravær {record.describe()} oprettet")

    def _modify(self, original: HeldRecord, record: HeldRecord) -> Status:
        old = self._find(original)
        if old is None:
            return Status("E", f"Fravær {original.describe()} findes ikke og kan ikke ændres")
        if record.type != old.type:  # the type is part of SAP's record key: delete and insert
            return Status(
                "E",
                f"Fraværstype kan ikke ændres ({old.type} til {record.type}): "
                "slet fraværet og opret et nyt",
            )
        clash = self._clash(record, ignore=old)
        if clash is not None:
            return Status("E", f"Fravær {record.describe()} overlapper {clash.describe()}")
        mine = self._held[record.personnel_number]
        mine[mine.index(old)] = replace(
            record, object_id=old.object_id, record_number=old.record_number
        )
        return Status("S", f"Fravær {original.describe()} ændret til {record.describe()}")

    def _delete(self, record: HeldRecord) -> Status:
        old = self._find(record)
        if old is None:
            return Status("E", f"Fravær {record.describe()} findes ikke og kan ikke slettes")
        self._held[record.personnel_number].remove(old)
        return Status("S", f"Fravær {record.describe()} slettet")


# ---------------------------------------------------------------------------------------
# The HTTP side.
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Received:
    """One schema-valid SetAbsenceAttendance request and what became of it."""

    fields: Mapping[str, str | None]
    outcome: str  # "applied", "rejected", "fault", "timeout", "dropped"
    status: Status | None = None


@dataclass(slots=True)
class KmdSimState:
    """The simulator's mutable state; tests read and change it through ``app[STATE]``."""

    ledger: KmdLedger = field(default_factory=KmdLedger)
    received: list[Received] = field(default_factory=list)
    reads: int = 0
    fault: str | None = None
    fail_rate: float = 0.0
    latency_ms: int = 0
    fail_next: int = 0  # the next N Set requests get a server fault
    drop_next: int = 0  # the next N Set requests are applied and left unanswered
    timeout_seconds: float = 30.0
    rng: random.Random = field(default_factory=random.Random)

    @classmethod
    def from_options(cls, options: SimulatorOptions) -> KmdSimState:
        if options.fault is not None and options.fault not in FAULTS:
            raise ValueError(f"unknown KMD fault {options.fault!r}; known: {', '.join(FAULTS)}")
        return cls(
            fault=options.fault,
            fail_rate=options.fail_rate,
            latency_ms=options.latency_ms,
            rng=random.Random(options.seed),
        )

    def next_fault(self) -> str | None:
        if self.fail_next > 0:
            self.fail_next -= 1
            return "server"
        if self.drop_next > 0:
            self.drop_next -= 1
            return "drop-after-apply"
        if self.fail_rate > 0:
            return (self.fault or "server") if self.rng.random() < self.fail_rate else None
        return self.fault


STATE: web.AppKey[KmdSimState] = web.AppKey("kmd_simulator_state", KmdSimState)


def build_app(options: SimulatorOptions | None = None) -> web.Application:
    """The simulator app; serve it with :func:`ssl_context` for mutual TLS."""
    app = web.Application(client_max_size=1024 * 1024)
    app[STATE] = KmdSimState.from_options(options or SimulatorOptions())
    app.router.add_post(PATH, _servlet)
    return app


def ssl_context(options: SimulatorOptions) -> ssl.SSLContext:
    """A TLS server context that requires client certificates from ``client_ca_file``."""
    if not (options.cert_file and options.key_file and options.client_ca_file):
        raise ValueError("the KMD simulator needs cert_file, key_file and client_ca_file")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=options.client_ca_file)
    ctx.load_cert_chain(options.cert_file, options.key_file)
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


async def start(app: web.Application, options: SimulatorOptions) -> tuple[web.AppRunner, str]:
    """Serve ``app`` on ``options.host:port``: HTTPS with client certificates when
    ``options.cert_file`` is set, else plain HTTP. Returns the runner (``await
    runner.cleanup()`` to stop) and the MessageServlet URL."""
    tls = ssl_context(options) if options.cert_file else None
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, options.host, options.port, ssl_context=tls)
    await site.start()
    host, port = runner.addresses[0][:2]
    scheme = "https" if tls else "http"
    return runner, f"{scheme}://{host}:{port}{PATH}"


async def _servlet(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    if state.latency_ms:
        await asyncio.sleep(state.latency_ms / 1000)
    try:
        payload = body_payload(parse_xml(await request.read()))
    except UnsafeXML as exc:
        return _fault("Client", "Invalid request", "ADAPTER.SOAP_EXCEPTION", str(exc))
    routing = _routing_error(request, payload)
    if routing:
        return _fault("Server", "Server Error", "RCVR_DETERMINATION.NO_RECEIVER_CASE_BE", routing)
    errors = schema_errors(_SCHEMA, payload)
    if errors:
        return _fault("Client", "Invalid request", "ADAPTER.SOAP_EXCEPTION", "; ".join(errors))
    if payload.tag == _READ_ROOT:
        state.reads += 1
        return _answer(_read_response(state.ledger, _children(payload)))
    return await _set(request, state, _children(payload))


def _routing_error(request: web.Request, payload: etree._Element) -> str:
    """Why SAP PI would find no receiver for this call ("" when it would)."""
    query = request.query
    interface = query.get("interface") or etree.QName(payload).localname.replace(
        "Request_MT", "_OS_SI"
    )
    expected = {SET_INTERFACE: _SET_ROOT, READ_INTERFACE: _READ_ROOT}.get(interface)
    if not query.get("senderService"):
        return "No sender service given (senderService)"
    if query.get("interfaceNamespace", NAMESPACE) != NAMESPACE or expected is None:
        return f"No receiver could be determined for interface {interface}"
    if payload.tag != expected:
        return f"Payload {etree.QName(payload).localname} does not belong to {interface}"
    return ""


def _children(payload: etree._Element) -> dict[str, str | None]:
    return {
        etree.QName(c).localname: (c.text or "").strip() or None
        for c in payload
        if isinstance(c.tag, str)
    }


async def _set(
    request: web.Request, state: KmdSimState, fields: dict[str, str | None]
) -> web.StreamResponse:
    fault = state.next_fault()
    if fault == "server":
        state.received.append(Received(fields, "fault"))
        return _fault(
            "Server", "Server Error", "ADAPTER.JAVA_EXCEPTION", "Simulated SAP PI system error"
        )
    if fault == "timeout":
        state.received.append(Received(fields, "timeout"))
        await asyncio.sleep(state.timeout_seconds)
        return _fault("Server", "Server Error", "ADAPTER.TIMEOUT", "Simulated timeout")
    status = state.ledger.apply(fields)
    if fault == "warning" and status.type == "S":
        status = Status("W", f"{status.text} (simuleret advarsel)")
    outcome = "rejected" if status.type in ("E", "A") else "applied"
    if fault == "drop-after-apply":
        state.received.append(Received(fields, "dropped", status))
        return _drop(request)
    state.received.append(Received(fields, outcome, status))
    return _answer(_set_response(status))


def _drop(request: web.Request) -> web.StreamResponse:
    # close the socket under the handler: the client sees the connection lost unanswered
    if request.transport is not None:
        request.transport.close()
    raise asyncio.CancelledError


def _element(parent: etree._Element, name: str, text: str | None = None) -> etree._Element:
    el = etree.SubElement(parent, name)
    if text is not None:
        el.text = text
    return el


def _set_response(status: Status) -> etree._Element:
    root = etree.Element(
        f"{{{NAMESPACE}}}SetAbsenceAttendanceResponse_MT", nsmap={"ns1": NAMESPACE}
    )
    rs = _element(root, "ReturnStatus")
    _element(rs, "StatusType", status.type)
    _element(rs, "MessageText", status.text)
    return root


def _read_response(ledger: KmdLedger, fields: Mapping[str, str | None]) -> etree._Element:
    root = etree.Element(
        f"{{{NAMESPACE}}}GetAbsenceAttendanceByPeriodResponse_MT", nsmap={"ns1": NAMESPACE}
    )
    start, end = fields.get("StartDate"), fields.get("EndDate")
    records = ledger.holdings(
        fields.get("PersonnelNumber") or "",
        date.fromisoformat(start) if start else None,
        date.fromisoformat(end) if end else None,
    )
    item = _element(_element(root, "ReturnStatus"), "item")
    _element(item, "StatusType", "S")
    _element(item, "MessageText", f"{len(records)} fravær fundet")
    listing = _element(root, "AbsenceAttendance")
    for record in records:
        _read_item(_element(listing, "item"), record)
    return root


def _read_item(parent: etree._Element, r: HeldRecord) -> None:
    key = _element(parent, "Key")
    for name, value in (
        ("PersonnelNumber", r.personnel_number),
        ("AbsenceAttendanceType", r.type),
        ("ObjectId", r.object_id),
        ("LockIndicator", r.lock_indicator),
        ("EndDate", str(r.end_date)),
        ("StartDate", str(r.start_date)),
        ("RecordNumber", r.record_number),
    ):
        _element(key, name, value)
    item = _element(parent, "Item")
    # KMD writes a missing time as midnight, as SAP does
    for name, value in (
        ("PersonnelNumber", r.personnel_number),
        ("StartDate", str(r.start_date)),
        ("EndDate", str(r.end_date)),
        ("StartTime", _hms(r.start_time)),
        ("EndTime", _hms(r.end_time)),
        ("AbsenceAttendanceType", r.type),
        ("AbsenceAttendanceTypeText", _TYPE_TEXT.get(r.type, r.type)),
    ):
        _element(item, name, value)
    if r.type == "OS" and r.additional_data:
        _element(_element(_element(item, "CompLeave"), "Item"), "ChildNumber", r.additional_data)


def _hms(value: time | None) -> str:
    return "00:00:00" if value is None else value.strftime("%H:%M:%S")


def _envelope(payload: etree._Element) -> bytes:
    env = etree.Element(f"{{{SOAP_ENV}}}Envelope", nsmap={"SOAP": SOAP_ENV})
    etree.SubElement(env, f"{{{SOAP_ENV}}}Header")
    etree.SubElement(env, f"{{{SOAP_ENV}}}Body").append(payload)
    return bytes(etree.tostring(env, xml_declaration=True, encoding="utf-8"))


def _answer(payload: etree._Element, status: int = 200) -> web.Response:
    return web.Response(
        status=status, body=_envelope(payload), content_type="text/xml", charset="utf-8"
    )


def _fault(code: str, string: str, error_code: str, text: str) -> web.Response:
    """A SAP PI fault: HTTP 500 with a SystemError detail (context, code, text)."""
    env = etree.Element(f"{{{SOAP_ENV}}}Envelope", nsmap={"SOAP": SOAP_ENV})
    etree.SubElement(env, f"{{{SOAP_ENV}}}Header")
    fault = etree.SubElement(etree.SubElement(env, f"{{{SOAP_ENV}}}Body"), f"{{{SOAP_ENV}}}Fault")
    _element(fault, "faultcode", f"SOAP:{code}")
    _element(fault, "faultstring", string)
    error = etree.SubElement(
        _element(fault, "detail"), f"{{{SAP_XI}}}SystemError", nsmap={"s": SAP_XI}
    )
    _element(error, "context", "XIAdapter")
    _element(error, "code", error_code)
    _element(error, "text", text)
    body = etree.tostring(env, xml_declaration=True, encoding="utf-8")
    return web.Response(status=500, body=body, content_type="text/xml", charset="utf-8")
