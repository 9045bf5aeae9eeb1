"""The public plugin API: what an adapter is given, what it returns and what it raises.

An adapter turns one canonical report into the vendor's payloads. It has three steps:

- ``plan(report, delivered, settings) -> Plan``: pure. Given the report version to deliver
  and what the gateway already delivered for earlier versions of the same report (its
  *parts*), decide which vendor messages are needed. A part already delivered and
  unchanged is never planned again.
- ``render(report, message, settings) -> Payload``: pure. The exact bytes to send,
  already validated against the vendor schema (raise :class:`InvalidPayload` if not).
- ``send(payload, channel) -> Receipt``: I/O only. Post the bytes and interpret the
  answer, raising one of the errors below when it is not a success.

An adapter is one of two kinds, each a Protocol with its capabilities declared as
attributes (checked by ``adapters/registry.py`` when the adapter is registered):

- :class:`MessageAdapter` (``file_based = False``): the dispatcher sends each planned
  message. ``reads_back`` says it implements :class:`ReadsBack`; ``reads_before_send``
  (which needs ``reads_back``) that the dispatcher reads before every plan.
- :class:`FileAdapter` (``file_based = True``): scheduled file runs write the records of
  many reports into one file (``render_file``), with the file options checked at start-up
  (``check_settings``).

The errors are shaped by what the dispatcher does with them (the whole gateway's tree is
drawn in ``gateway/errors.py``)::

    DeliveryError
    ├── Transient      the request was not processed: retry later (optionally not before
    │                  ``retry_after`` seconds)
    ├── InDoubt        the request may have reached the vendor, no answer came: never
    │                  resent blindly, reconciled first
    ├── Rejected       the vendor said no: permanent, the vendor's reason is kept
    └── InvalidPayload the payload failed the schema check: never sent, never retried

Foreign exceptions and HTTP statuses become these errors here, once for every adapter:
:func:`post` translates aiohttp's, :func:`classify_status` the status codes. An adapter
adds only its vendor's body-level rules (SOAP faults, status fields in the answer).

An adapter imports this module and the libraries it needs; never the gateway's store,
app or dispatcher.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, time
from decimal import Decimal
from types import MappingProxyType
from typing import Any, Protocol, runtime_checkable
from zoneinfo import ZoneInfo

import aiohttp
from multidict import CIMultiDict

__all__ = [
    "BUSY_STATUSES",
    "POSTING_TARGETS",
    "Adapter",
    "Channel",
    "DeliveredPart",
    "DeliveryError",
    "Employee",
    "FileAdapter",
    "InDoubt",
    "InvalidPayload",
    "Kind",
    "Message",
    "MessageAdapter",
    "Payload",
    "Plan",
    "ReadsBack",
    "Receipt",
    "Rejected",
    "Report",
    "Response",
    "Route",
    "Transient",
    "VendorSettings",
    "classify_status",
    "mask_cpr",
    "payroll_date",
    "post",
    "retry_after_seconds",
]

_EMPTY: Mapping[str, Any] = MappingProxyType({})
DEFAULT_MAX_REPLY_BYTES = 1024 * 1024  # a vendor's answer is a receipt: 1 MiB is generous


class Kind(enum.StrEnum):
    DRIVE = "drive"
    VACATION = "vacation"


# ---------------------------------------------------------------------------------------
# The canonical report (DESIGN.md §2), as typed values.
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Employee:
    cpr: str = field(repr=False)
    employment_id: str
    employment_type: int | None = None
    extra_number: int | None = None
    institution: str | None = None


@dataclass(frozen=True, slots=True)
class Route:
    from_: str | None = None
    to: str | None = None
    via: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Report:
    """One version of a report, already validated against ``schemas/``."""

    kind: Kind
    municipality: str
    report_id: str
    version: int
    employee: Employee
    cancelled: bool = False
    # drive
    drive_date: date | None = None
    distance_km: Decimal | None = None
    wage_code: str | None = None
    wage_code_optional: str | None = None
    approved_by_cpr: str | None = field(default=None, repr=False)
    account: str | None = None
    cost_center: str | None = None  # deviating cost centre (KMD Afv_Omkostningssted)
    psp_element: str | None = None  # deviating PSP element (KMD Afv_PSP_Element)
    license_plate: str | None = None
    purpose: str | None = None
    route: Route | None = None
    sixty_days_rule: bool = False
    # vacation
    start_date: date | None = None
    end_date: date | None = None
    start_time: time | None = None
    end_time: time | None = None
    vacation_type: str | None = None
    child_number: int | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Report:
        """Build from a canonical JSON object that passed the JSON Schema."""
        emp = data["employee"]
        route = data.get("route")
        return cls(
            kind=Kind(data["kind"]),
            municipality=data["municipality"],
            report_id=data["report_id"],
            version=int(data.get("version", 1)),
            employee=Employee(
                cpr=emp["cpr"],
                employment_id=emp["employment_id"],
                employment_type=emp.get("employment_type"),
                extra_number=emp.get("extra_number"),
                institution=emp.get("institution"),
            ),
            cancelled=bool(data.get("cancelled", False)),
            drive_date=_date(data.get("drive_date")),
            distance_km=_decimal(data.get("distance_km")),
            wage_code=data.get("wage_code"),
            wage_code_optional=data.get("wage_code_optional") or None,
            approved_by_cpr=data.get("approved_by_cpr"),
            account=data.get("account") or None,
            cost_center=data.get("cost_center") or None,
            psp_element=data.get("psp_element") or None,
            license_plate=data.get("license_plate") or None,
            purpose=data.get("purpose") or None,
            route=None
            if route is None
            else Route(route.get("from"), route.get("to"), tuple(route.get("via", ()))),
            sixty_days_rule=bool(data.get("sixty_days_rule", False)),
            start_date=_date(data.get("start_date")),
            end_date=_date(data.get("end_date")),
            start_time=_time(data.get("start_time")),
            end_time=_time(data.get("end_time")),
            vacation_type=data.get("vacation_type"),
            child_number=data.get("child_number"),
        )

    @property
    def cprs(self) -> tuple[str, ...]:
        """Every CPR number in this report (for masking anything derived from it)."""
        return tuple(c for c in (self.employee.cpr, self.approved_by_cpr) if c)


def _date(value: str | None) -> date | None:
    return None if value is None else date.fromisoformat(value)


def _time(value: str | None) -> time | None:
    return None if value is None else time.fromisoformat(value)


def _decimal(value: str | float | int | None) -> Decimal | None:
    # str() first: a JSON float such as 12.3 must become Decimal("12.3"), not its binary value.
    return None if value is None else Decimal(str(value))


#: payroll dates are Danish dates, whatever offset the sending host wrote
DENMARK = ZoneInfo("Europe/Copenhagen")


def payroll_date(text: str) -> date:
    """The payroll date of an ISO date or date-time, as Denmark means it.

    A plain date, or a date-time without an offset, is the date as written (a local
    time). A date-time with an offset or ``Z`` is an instant: converted to
    Europe/Copenhagen first, then cut to the date, so ``2026-10-31T23:00:00+00:00``
    is 1 November. Raises ValueError for text that is neither.
    """
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is not None:
        moment = moment.astimezone(DENMARK)
    return moment.date()


#: how a CPR number is shown wherever it is shown at all (the gateway's one form)
MASKED_CPR = "xxxxxx-xxxx"
#: ten digits written ``DDMMYYXXXX``, ``DDMMYY-XXXX`` or ``DDMMYY XXXX`` (``\d``: any Unicode
#: decimal digit, as ``str.isdecimal``). No look-behind: a pattern that starts with a
#: character class lets ``re`` skip ahead fast (about 2x); the left boundary (no digit
#: before the six) is checked in :func:`_mask_match`. A match that starts inside a run of
#: digits covers only the rest of that run and, at most, a separator and a run of exactly
#: four digits; neither can begin a CPR (that needs a run of six or ten digits at its
#: start), so rejecting such a match never hides one: the matches kept are exactly those
#: of ``(?<!\d)(\d{6})[- ]?(\d{4})(?!\d)``.
_CPR_RE = re.compile(r"\d{6}[- ]?\d{4}(?!\d)")


def mask_cpr(text: str, cprs: Sequence[str] = ()) -> str:
    """Replace CPR numbers in ``text`` with ``xxxxxx-xxxx`` (the one masking function: logs,
    API answers, errors, the CLI, stored attempt bodies; ``gateway.privacy`` re-exports it).

    Known CPRs of the report are masked wherever and however they are written; any other
    ten-digit number (also written ``DDMMYY-XXXX`` or ``DDMMYY XXXX``) whose first six digits
    form a plausible DDMMYY (replacement numbers: day 61-91) is masked too.
    """
    for cpr in cprs:
        if cpr and len(cpr) == 10:
            for written in (cpr, f"{cpr[:6]}-{cpr[6:]}", f"{cpr[:6]} {cpr[6:]}"):
                text = text.replace(written, MASKED_CPR)
    return _CPR_RE.sub(_mask_match, text)


def _mask_match(m: re.Match[str]) -> str:
    found = m.group()
    start = m.start()
    if start and m.string[start - 1].isdecimal():
        return found  # inside a longer run of digits: not a CPR
    day, month = int(found[:2]), int(found[2:4])
    if (1 <= day <= 31 or 61 <= day <= 91) and 1 <= month <= 12:
        return MASKED_CPR
    return found


# ---------------------------------------------------------------------------------------
# Settings an adapter receives (built by gateway/settings.py from the TOML file).
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VendorSettings:
    """One tenant's connection to one vendor endpoint."""

    endpoint: str = ""
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    institution: str | None = None
    connect_timeout: float = 5.0
    read_timeout: float = 30.0  # between two reads of the answer
    cert_file: str | None = None
    key_file: str | None = None
    ca_file: str | None = None
    # adapter-specific keys (e.g. KMD senderService, type-code overrides, ClientID)
    options: Mapping[str, Any] = field(default_factory=lambda: _EMPTY)
    max_reply_bytes: int = (
        DEFAULT_MAX_REPLY_BYTES  # a longer answer is not read: the delivery is in doubt
    )
    total_timeout: float | None = None  # the whole request; None: connect + read timeouts

    def deadline(self) -> float:
        """Seconds one request may take from start to the last byte of the answer."""
        return (
            self.total_timeout
            if self.total_timeout is not None
            else self.connect_timeout + self.read_timeout
        )


# ---------------------------------------------------------------------------------------
# What plan/render/send exchange.
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Message:
    """One vendor call the plan asks for.

    ``part`` is a stable key of the part of the report this message affects (for
    example ``"wage_code"`` and ``"wage_code_optional"`` for SD, ``"absence:1"`` for KMD).
    ``fields`` are the values render needs; after a successful send the gateway records
    them as what the vendor now holds for that part (or forgets the part if ``deletes``).
    """

    part: str
    operation: str
    fields: Mapping[str, Any] = field(default_factory=lambda: _EMPTY)
    deletes: bool = False


@dataclass(frozen=True, slots=True)
class DeliveredPart:
    """What the gateway recorded as delivered for one part of a report."""

    part: str
    version: int
    fields: Mapping[str, Any]
    vendor_reference: str | None = None


@dataclass(frozen=True, slots=True)
class Plan:
    """The messages to send for one report version, in order.

    An empty plan with ``not_applicable`` set ends the delivery in ``not_applicable``;
    with ``correction_required`` set it waits for an operator; an empty plan with
    neither means everything is already delivered.
    """

    messages: tuple[Message, ...] = ()
    not_applicable: str | None = None
    correction_required: str | None = None


@dataclass(frozen=True, slots=True)
class Payload:
    body: bytes
    content_type: str
    headers: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    path: str = ""  # appended to the endpoint, for vendors with several resources


@dataclass(frozen=True, slots=True)
class Receipt:
    """A vendor's acceptance of one payload."""

    vendor_reference: str | None
    status: int | None = None
    body: bytes = b""
    warning: str | None = None


# ---------------------------------------------------------------------------------------
# Errors, shaped by what the dispatcher does with them (see module docstring).
# ---------------------------------------------------------------------------------------


class DeliveryError(Exception):
    """Base of the errors an adapter's render or send raises."""

    def __init__(self, message: str, *, status: int | None = None, body: bytes = b"") -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.body = body


class Transient(DeliveryError):
    """Not processed by the vendor; retry later."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        body: bytes = b"",
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, status=status, body=body)
        self.retry_after = retry_after


class InDoubt(DeliveryError):
    """Sent, but no answer: the vendor may or may not hold it."""


class Rejected(DeliveryError):
    """The vendor refused the payload: permanent."""


class InvalidPayload(DeliveryError):
    """The payload fails the vendor schema: it is never sent."""


# ---------------------------------------------------------------------------------------
# Transport: the I/O an adapter's send uses, with errors translated in one place.
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Channel:
    """The injected transport for one tenant's vendor endpoint."""

    session: aiohttp.ClientSession
    settings: VendorSettings


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    headers: Mapping[str, str]
    body: bytes


async def post(channel: Channel, payload: Payload, url: str | None = None) -> Response:
    """POST a payload; translate transport failures into Transient or InDoubt.

    Before the request left (connection refused, DNS, connect timeout, TLS handshake):
    :class:`Transient`. After it may have left (read timeout, reset, disconnect):
    :class:`InDoubt`. An answer that is longer than ``max_reply_bytes`` or not complete
    within the total deadline is :class:`InDoubt` too: the vendor had the request and may
    have applied it, so it is reconciled, never resent blindly.
    """
    s = channel.settings
    target = url if url is not None else s.endpoint + payload.path
    timeout = aiohttp.ClientTimeout(
        total=s.deadline(),
        connect=s.connect_timeout,
        sock_connect=s.connect_timeout,
        sock_read=s.read_timeout,
    )
    headers = {"Content-Type": payload.content_type, **payload.headers}
    if s.username:
        # aiohttp 3.14 deprecates BasicAuth (a warning, an error under our pytest settings)
        headers["Authorization"] = aiohttp.encode_basic_auth(s.username, s.password or "")
    try:
        async with channel.session.post(
            target, data=payload.body, headers=headers, timeout=timeout
        ) as resp:
            body = await _read_bounded(resp, s.max_reply_bytes)
            return Response(resp.status, CIMultiDict(resp.headers), body)
    except aiohttp.ConnectionTimeoutError as exc:
        raise Transient(f"connect timeout after {s.connect_timeout:g} s") from exc
    except (aiohttp.ClientConnectorError, aiohttp.ClientSSLError) as exc:
        raise Transient(f"could not connect: {exc.__class__.__name__}: {exc}") from exc
    except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
        raise InDoubt(
            f"no answer within {s.read_timeout:g} s of silence or {s.deadline():g} s in all, "
            "after sending"
        ) from exc
    except aiohttp.ClientError as exc:
        raise InDoubt(f"connection lost after sending: {exc.__class__.__name__}: {exc}") from exc


async def _read_bounded(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """The answer's body, reading at most ``limit + 1`` bytes; InDoubt when it is longer."""
    too_long = InDoubt(
        f"the answer is longer than {limit} bytes (status {resp.status}); it was not read, "
        "the vendor may have applied the request",
        status=resp.status,
    )
    if resp.content_length is not None and resp.content_length > limit:
        raise too_long
    body = bytearray()
    while len(body) <= limit:
        chunk = await resp.content.read(limit + 1 - len(body))
        if not chunk:
            return bytes(body)
        body += chunk
    raise too_long


def retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    """The ``Retry-After`` header as seconds (delta form only), or None.

    Servers and proxies vary the header's case: any spelling is found, in a plain dict too.
    """
    raw = headers.get("Retry-After")
    if raw is None:
        raw = next((v for k, v in headers.items() if k.lower() == "retry-after"), None)
    if raw is None:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        return None


#: the vendor is busy or down for a while: retried, not before its ``Retry-After``
BUSY_STATUSES = frozenset({429, 503})
_CONFIG_STATUSES = {
    401: "refused the credentials",
    403: "refused access",
    404: "has no such resource",
}

#: an adapter's rules for what the answer's body says, whatever its status
BodyRules = Callable[[Response], DeliveryError | None]


def classify_status(
    response: Response, vendor: str, *, hint: str = "", body_rules: BodyRules | None = None
) -> DeliveryError | None:
    """The error an HTTP answer's status means, or None for a 2xx with nothing wrong in it.

    Written once for every adapter, in this order:

    1. 429 and 503 (busy): :class:`Transient`, with the answer's ``Retry-After``;
    2. the vendor's ``body_rules`` (SOAP faults, "closed" pages…): their error, if any,
       wins over the status, so a fault answered with 500 says what it is;
    3. 2xx: None (the adapter reads the answer);
    4. 5xx: :class:`Transient`;
    5. 401, 403, 404: :class:`Rejected` with the adapter's ``hint`` (they mean the
       tenant's settings are wrong: credentials, certificate, endpoint URL);
    6. anything else (3xx, other 4xx): :class:`Rejected`.

    ``vendor`` starts every message (``"SD Løn"``, ``"KMD read-onetime-payments"``).
    """
    status, body = response.status, response.body
    if status in BUSY_STATUSES:
        return Transient(
            f"{vendor} answered HTTP {status}: busy or unavailable",
            status=status,
            body=body,
            retry_after=retry_after_seconds(response.headers),
        )
    error = body_rules(response) if body_rules is not None else None
    if error is not None or 200 <= status < 300:
        return error
    snippet = mask_cpr(body[:300].decode("utf-8", "replace").strip())
    if status >= 500:
        return Transient(f"{vendor} answered HTTP {status}: {snippet}", status=status, body=body)
    if status in _CONFIG_STATUSES:
        text = f"{vendor} answered HTTP {status}: it {_CONFIG_STATUSES[status]}"
        return Rejected(f"{text}; {hint}" if hint else text, status=status, body=body)
    return Rejected(f"{vendor} answered HTTP {status}: {snippet}", status=status, body=body)


# ---------------------------------------------------------------------------------------
# The plug-in contract.
# ---------------------------------------------------------------------------------------


#: report fields that say where a posting is booked; a report carries at most one of them
POSTING_TARGETS = ("account", "cost_center", "psp_element")


@runtime_checkable
class Adapter(Protocol):
    """What every adapter declares, whatever its kind.

    What the vendor needs or cannot carry beyond the report schema is declared below, so
    that intake refuses such a report before it is stored; ``plan`` still refuses one
    that was stored before a rule existed.
    """

    name: str
    kinds: frozenset[Kind]
    #: schema files that must exist, relative to the ``schemas`` package (``adapters.resources``)
    schema_files: tuple[str, ...]
    #: report fields (JSON pointers such as ``/employee/extra_number``) the vendor needs
    #: beyond what the report schema requires, and fields the vendor cannot carry; intake
    #: refuses a report routed to this adapter that lacks or holds one (422, nothing stored)
    required_fields: frozenset[str]
    unsupported_fields: frozenset[str]
    #: formats the vendor needs that are narrower than the report schema's: pointer →
    #: (regular expression the whole value must match, the format in words)
    field_formats: Mapping[str, tuple[str, str]]
    #: when the vendor takes deliveries (``"06:00-22:00"``, Europe/Copenhagen), or None for
    #: always; a tenant's ``opening_hours`` setting overrides it
    opening_hours: str | None
    #: the kind: False for a :class:`MessageAdapter`, True for a :class:`FileAdapter`
    file_based: bool
    #: the adapter implements :class:`ReadsBack` (the vendor can be asked what it holds)
    reads_back: bool
    #: the dispatcher reads back before every plan (corrections sent as differences);
    #: needs ``reads_back``
    reads_before_send: bool

    def plan(
        self, report: Report, delivered: Sequence[DeliveredPart], settings: VendorSettings
    ) -> Plan: ...

    def render(self, report: Report, message: Message, settings: VendorSettings) -> Payload: ...


@runtime_checkable
class MessageAdapter(Adapter, Protocol):
    """A vendor integration the dispatcher delivers message by message (``file_based = False``)."""

    async def send(self, payload: Payload, channel: Channel) -> Receipt: ...


@runtime_checkable
class FileAdapter(Adapter, Protocol):
    """A vendor integration delivered by scheduled file runs (``file_based = True``).

    ``plan`` and ``render`` give each report's records (one payload per record line);
    ``render_file`` lays out the whole file (header, records, line ends, encoding) as a
    file run creating it would write it, with the groups that cannot be written.
    """

    def render_file(
        self, reports: Iterable[Report], settings: VendorSettings
    ) -> tuple[bytes, Sequence[object]]: ...

    def check_settings(self, settings: VendorSettings, municipality: str) -> list[tuple[str, str]]:
        """Start-up check of the file options, as (option key, message) pairs."""
        ...


@runtime_checkable
class ReadsBack(Protocol):
    """The read-back capability of a :class:`MessageAdapter` that declares ``reads_back``.

    The dispatcher calls ``read_back`` to reconcile an ``in_doubt`` delivery and, when
    ``reads_before_send`` is true, before every plan (vendors whose corrections are sent
    as differences). It returns the parts the vendor actually holds for this report,
    among the ``known`` ones the gateway recorded and the ``pending`` messages whose
    outcome is unknown; the dispatcher replaces its record with them and plans again.
    """

    reads_before_send: bool

    async def read_back(
        self,
        report: Report,
        known: Sequence[DeliveredPart],
        pending: Sequence[Message],
        channel: Channel,
    ) -> Sequence[DeliveredPart]: ...
