"""KMD Opus IND01 mileage file: the 55-character records, grouped per employment (with its
employment type and extra number), wage code, account and month (legacy pick-up file; KMD
closed the interface in 2024).

Layout (1-based positions), as the OS2indberetning file generator wrote it::

    1-3 "DA6" | 4-7 KMD municipality no. | 8 employment type | 9-18 CPR | 19 extra number
    20-23 wage code | 24-29 km x 100 | 30-36 "0000000" | 37-49 3 spaces + account, or 13
    spaces | 50-55 DDMMYY, the last day of the month

Every line (the header too) ends CRLF, as the OS2indberetning file writer (.NET on Windows)
ended them; the file is written in ``options["encoding"]`` (default ISO-8859-1), which
:func:`check_settings` checks at start-up against every configured text that goes into it.
"""

from __future__ import annotations

import calendar
import codecs
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date
from decimal import ROUND_DOWN, Decimal
from types import MappingProxyType
from typing import Any

from adapters.base import (
    Channel,
    DeliveredPart,
    InvalidPayload,
    Kind,
    Message,
    Payload,
    Plan,
    Receipt,
    Rejected,
    Report,
    VendorSettings,
    mask_cpr,
)

__all__ = [
    "DEFAULT_ENCODING",
    "LINE_END",
    "RECORD_LENGTH",
    "UNSUPPORTED_FIELDS",
    "Failure",
    "FieldOverflow",
    "Group",
    "KmdInd01",
    "Record",
    "check_settings",
    "encode_lines",
    "file_encoding",
    "format_record",
    "group",
    "header_line",
    "last_day_of_month",
    "parse_record",
    "records",
    "render_file",
    "unsupported_reason",
]

RECORD_LENGTH = 55
LINE_END = "\r\n"  # as the OS2indberetning writer wrote every line, the header too
DEFAULT_ENCODING = "iso-8859-1"
#: fields a report may carry that an IND01 record cannot (it has only a 10-digit account)
UNSUPPORTED_FIELDS = frozenset({"/cost_center", "/psp_element"})
FILLER = "0000000"
# The record read back field by field; render checks every line against it before returning.
RECORD_RE = re.compile(
    r"^DA6(?P<municipality>\d{4})(?P<employment_type>\d)(?P<cpr>\d{10})(?P<extra_number>\d)"
    r"(?P<wage_code>[0-9A-Za-z]{4})(?P<centikm>\d{6})0000000"
    r"(?P<account>   \d{10}| {13})(?P<date>\d{6})$"
)
Covers = tuple[str, str, int]  # (municipality, report_id, version)


class FieldOverflow(InvalidPayload):
    """A value does not fit its IND01 field: the group is not written (never a wrong line)."""


def last_day_of_month(d: date) -> date:
    return d.replace(day=calendar.monthrange(d.year, d.month)[1])


@dataclass(frozen=True, slots=True)
class Group:
    """One future IND01 record: the reports of one employment, wage code, account and month."""

    municipality: str
    employment_id: str
    cpr: str
    employment_type: int | None
    extra_number: int | None
    wage_code: str
    account: str | None
    month_end: date
    km: Decimal
    covers: tuple[Covers, ...]
    conflict: str | None = None  # reports in the group disagree on a person field

    def __repr__(self) -> str:  # the CPR stays out of logs and tracebacks
        return (
            f"Group({self.municipality}/{self.employment_id} {self.wage_code} "
            f"{self.month_end:%Y-%m} km={self.km} covers={len(self.covers)})"
        )


@dataclass(frozen=True, slots=True)
class Failure:
    group: Group
    reason: str


@dataclass(frozen=True, slots=True)
class Record:
    """A record parsed back from a line (for checks and tests)."""

    municipality: str
    employment_type: int
    cpr: str
    extra_number: int
    wage_code: str
    centikm: int
    account: str | None
    month_end: date


def _postings(report: Report) -> Iterable[tuple[str, Report]]:
    if report.kind is not Kind.DRIVE or report.cancelled:
        return ()
    return ((code, report) for code in (report.wage_code, report.wage_code_optional) if code)


def group(reports: Iterable[Report]) -> list[Group]:
    """Group drive reports into records; a ``wage_code_optional`` gives a second record.

    Cancelled reports are left out (the file cannot withdraw). Groups come in first-seen order.
    """
    buckets: dict[tuple[Any, ...], list[Report]] = {}
    for report in reports:
        for code, rep in _postings(report):
            assert rep.drive_date is not None
            # employment type and extra number are in the key: a mid-month change gives
            # two records (KMD books each under its own employment form), not a conflict
            key = (
                rep.municipality,
                rep.employee.employment_id,
                rep.employee.employment_type,
                rep.employee.extra_number,
                code,
                rep.account,
                _unsupported(rep),
                rep.drive_date.year,
                rep.drive_date.month,
            )
            buckets.setdefault(key, []).append(rep)
    return [_group(key[4], reps) for key, reps in buckets.items()]


def _unsupported(report: Report) -> tuple[str, ...]:
    return tuple(sorted(f[1:] for f in UNSUPPORTED_FIELDS if getattr(report, f[1:])))


def unsupported_reason(fields: Iterable[str]) -> str:
    return (
        f"kmd-ind01 cannot carry {' or '.join(sorted(fields))}: the IND01 record has only a "
        "10-digit account position (use account, or route the tenant to kmd-engangsydelser)"
    )


def _group(wage_code: str, reps: Sequence[Report]) -> Group:
    first = reps[0]
    assert first.drive_date is not None
    conflict = None
    if len({r.employee.cpr for r in reps}) > 1:
        conflict = "reports of one employment disagree on the CPR number"
    if unsupported := _unsupported(first):
        conflict = unsupported_reason(unsupported)
    return Group(
        municipality=first.municipality,
        employment_id=first.employee.employment_id,
        cpr=first.employee.cpr,
        employment_type=first.employee.employment_type,
        extra_number=first.employee.extra_number,
        wage_code=wage_code,
        account=first.account,
        month_end=last_day_of_month(first.drive_date),
        km=sum((r.distance_km or Decimal(0) for r in reps), Decimal(0)),
        covers=tuple((r.municipality, r.report_id, r.version) for r in reps),
        conflict=conflict,
    )


def _digits(value: str, width: int, what: str, group: Group) -> str:
    if not (value.isascii() and value.isdigit() and len(value) <= width):
        shown = mask_cpr(value, (group.cpr,))
        raise FieldOverflow(f"{what} {shown!r} does not fit {width} digits ({group!r})")
    return value.zfill(width)


def _digit(value: int | None, what: str, group: Group) -> str:
    return _digits(str(0 if value is None else value), 1, what, group)


def _municipality(group: Group, settings: VendorSettings) -> str:
    return str(settings.options.get("kmd_municipality") or group.municipality)


def format_record(group: Group, settings: VendorSettings) -> str:
    """The 55-character line for a group, or :class:`FieldOverflow` with the reason."""
    if group.conflict:
        raise FieldOverflow(f"{group.conflict} ({group!r})")
    if len(group.cpr) != 10:
        raise FieldOverflow(f"CPR is not 10 digits ({group!r})")
    if len(group.wage_code) != 4 or not group.wage_code.isascii() or not group.wage_code.isalnum():
        raise FieldOverflow(f"wage code {group.wage_code!r} is not 4 characters ({group!r})")
    centikm = int((group.km * 100).to_integral_value(rounding=ROUND_DOWN))
    if centikm < 0:
        raise FieldOverflow(f"negative distance {group.km} km ({group!r})")
    account = " " * 13
    if group.account is not None:
        account = "   " + _account(group)
    line = "".join(
        (
            "DA6",
            _digits(_municipality(group, settings), 4, "KMD municipality number", group),
            _digit(group.employment_type, "employment type", group),
            _digits(group.cpr, 10, "CPR", group),
            _digit(group.extra_number, "extra number", group),
            group.wage_code,
            _digits(str(centikm), 6, "km x 100", group),
            FILLER,
            account,
            f"{group.month_end:%d%m%y}",
        )
    )
    if not RECORD_RE.match(line):  # a last guard: never hand out a line we cannot parse back
        raise FieldOverflow(f"record does not match the IND01 layout ({group!r})")
    return line


def _account(group: Group) -> str:
    assert group.account is not None
    if len(group.account) != 10:
        raise FieldOverflow(f"account {group.account!r} is not 10 digits ({group!r})")
    return _digits(group.account, 10, "account", group)


def parse_record(line: str) -> Record:
    """Read a record back; ValueError when the line is not an IND01 record."""
    m = RECORD_RE.match(line)
    if not m or len(line) != RECORD_LENGTH:
        raise ValueError("not a 55-character IND01 record")
    d = m.groupdict()
    dd, mm, yy = int(d["date"][:2]), int(d["date"][2:4]), int(d["date"][4:])
    return Record(
        municipality=d["municipality"],
        employment_type=int(d["employment_type"]),
        cpr=d["cpr"],
        extra_number=int(d["extra_number"]),
        wage_code=d["wage_code"],
        centikm=int(d["centikm"]),
        account=d["account"].strip() or None,
        month_end=date(2000 + yy, mm, dd),
    )


def file_encoding(settings: VendorSettings) -> str:
    """The codec the file is written in (``options["encoding"]``, default ISO-8859-1).

    ValueError for an unknown name or one that does not write ASCII as ASCII (UTF-16,
    say): the records, the CRLF ends and the crash recovery all rely on single bytes.
    """
    name = str(settings.options.get("encoding") or DEFAULT_ENCODING)
    try:
        codec = codecs.lookup(name)
    except LookupError:
        raise ValueError(f"unknown encoding {name!r}") from None
    probe = "DA6 0123456789 ABCXYZ abcxyz" + LINE_END
    try:
        same = probe.encode(codec.name) == probe.encode("ascii")
    except (UnicodeError, LookupError):
        same = False
    if not same:
        raise ValueError(f"encoding {name!r} does not write ASCII text as ASCII bytes")
    return name


def encode_lines(lines: Iterable[str], encoding: str) -> bytes:
    """Lines as the file holds them: each ended CRLF, in the file's encoding."""
    return "".join(f"{line}{LINE_END}" for line in lines).encode(encoding)


def check_settings(settings: VendorSettings, municipality: str) -> list[tuple[str, str]]:
    """Problems with the options that go into the file, as (option key, message), for the
    start-up check: an unknown encoding, or a configured text it cannot write."""
    try:
        encoding = file_encoding(settings)
    except ValueError as exc:
        return [("encoding", str(exc))]
    problems = []
    for key in ("file_header", "municipality_name"):
        value = settings.options.get(key)
        if value is None:
            continue
        text = str(value)
        if "\n" in text or "\r" in text:
            problems.append((key, f"{_shown(text)} must be a single line"))
            continue
        try:
            text.encode(encoding)
        except UnicodeEncodeError:
            problems.append((key, f"{_shown(text)} cannot be written in {encoding}"))
    number = settings.options.get("kmd_municipality")
    if number is not None and not re.fullmatch(r"[0-9]{1,4}", str(number)):
        problems.append(("kmd_municipality", f"{_shown(str(number))} is not 1-4 digits"))
    return problems


def _shown(text: str, width: int = 24) -> str:
    return repr(text if len(text) <= width else text[: width - 1] + "…")


def header_line(settings: VendorSettings, municipality: str) -> str:
    """The line the file starts with (written only when the file is created).

    The OS2indberetning generator wrote a configured free-text line (``FileHeader``, its
    sample is "026 Test Kommune"); KMD's meaning of it is not public. We write
    ``options["file_header"]`` verbatim, otherwise ``"<municipality> <municipality_name>"``
    with the name defaulting to "Kommune".
    """
    configured = settings.options.get("file_header")
    if configured is not None:
        text = str(configured)
    else:
        text = f"{municipality} {settings.options.get('municipality_name') or 'Kommune'}"
    if "\n" in text or "\r" in text:
        raise ValueError("file_header must be a single line")
    return text


def records(
    reports: Iterable[Report], settings: VendorSettings
) -> tuple[list[tuple[Group, str]], list[Failure]]:
    """The lines to write (group, line), and the groups that cannot be written, with why.

    Groups with zero km are neither: nothing is sent for them.
    """
    written: list[tuple[Group, str]] = []
    failures: list[Failure] = []
    for g in group(reports):
        if g.km == 0:
            continue
        try:
            written.append((g, format_record(g, settings)))
        except FieldOverflow as exc:
            failures.append(Failure(g, exc.message))
    return written, failures


def render_file(reports: Iterable[Report], settings: VendorSettings) -> tuple[bytes, list[Failure]]:
    """The bytes of a new ``ind01.txt`` (header + records, CRLF, in the file's encoding)
    exactly as a file run creating the file writes them, and the failed groups."""
    written, failures = records(reports, settings)
    if not written:
        return b"", failures
    header = header_line(settings, written[0][0].municipality)
    lines = [header, *(w[1] for w in written)]
    return encode_lines(lines, file_encoding(settings)), failures


# ---------------------------------------------------------------------------------------
# The per-report adapter (dry runs, planning); delivery itself happens in file runs.
# ---------------------------------------------------------------------------------------

PARTS = (("wage_code", "wage_code"), ("wage_code_optional", "wage_code_optional"))


def _message_fields(report: Report, code: str) -> dict[str, Any]:
    assert report.drive_date is not None and report.distance_km is not None
    return {
        "month": f"{report.drive_date:%Y-%m}",
        "month_end": last_day_of_month(report.drive_date).isoformat(),
        "wage_code": code,
        "km": f"{report.distance_km:.2f}",
        "account": report.account,
    }


class KmdInd01:
    """IND01 records for one report; the file runs append them (see gateway/ind01_file.py)."""

    name = "kmd-ind01"
    kinds = frozenset({Kind.DRIVE})
    #: delivered by the gateway's scheduled file runs, not by the dispatcher's sends
    file_based = True
    reads_back = False
    reads_before_send = False
    opening_hours: str | None = None  # the file drop is always open; the schedule decides
    unsupported_fields = UNSUPPORTED_FIELDS
    schema_files: tuple[str, ...] = ()  # the layout is checked by RECORD_RE in render
    #: both stand in every record; a missing one written as 0 could book to another employment
    required_fields = frozenset({"/employee/employment_type", "/employee/extra_number"})
    field_formats = MappingProxyType(
        {
            "/wage_code": (r"[0-9A-Za-z]{4}", "4 letters or digits"),
            "/wage_code_optional": (r"[0-9A-Za-z]{4}", "4 letters or digits"),
        }
    )

    def render_file(
        self, reports: Iterable[Report], settings: VendorSettings
    ) -> tuple[bytes, list[Failure]]:
        """The dry run's ``ind01.txt``: the bytes a file run creating the file would write,
        and the groups that cannot be written."""
        return render_file(reports, settings)

    def check_settings(self, settings: VendorSettings, municipality: str) -> list[tuple[str, str]]:
        """Start-up check of the file options, as (option key, message) pairs."""
        return check_settings(settings, municipality)

    def plan(
        self, report: Report, delivered: Sequence[DeliveredPart], settings: VendorSettings
    ) -> Plan:
        if report.kind is not Kind.DRIVE or report.drive_date is None:
            raise InvalidPayload(f"{self.name} delivers drive reports only")
        if unsupported := _unsupported(report):
            raise InvalidPayload(unsupported_reason(unsupported))
        held = {p.part: p for p in delivered}
        if report.cancelled:
            if held:
                return Plan(
                    correction_required="cancelled after delivery: the IND01 file "
                    "cannot withdraw a record"
                )
            return Plan(not_applicable="cancelled before delivery")
        if not report.distance_km:
            if held:
                return Plan(
                    correction_required="distance changed to 0 after delivery: the "
                    "IND01 file has no edit"
                )
            return Plan(not_applicable="zero distance")
        return self._plan_parts(report, held)

    def _plan_parts(self, report: Report, held: Mapping[str, DeliveredPart]) -> Plan:
        wanted = {
            part: _message_fields(report, code)
            for part, attr in PARTS
            if (code := getattr(report, attr))
        }
        changed = [p for p in held if p not in wanted or dict(held[p].fields) != wanted[p]]
        if changed:
            return Plan(
                correction_required=f"version {report.version} changes a delivered "
                f"report ({', '.join(sorted(changed))}): the IND01 file has no edit"
            )
        return Plan(
            tuple(
                Message(part, "append", fields)
                for part, fields in wanted.items()
                if part not in held
            )
        )

    def render(self, report: Report, message: Message, settings: VendorSettings) -> Payload:
        if unsupported := _unsupported(report):
            raise InvalidPayload(unsupported_reason(unsupported))
        f = message.fields
        g = Group(
            municipality=report.municipality,
            employment_id=report.employee.employment_id,
            cpr=report.employee.cpr,
            employment_type=report.employee.employment_type,
            extra_number=report.employee.extra_number,
            wage_code=str(f["wage_code"]),
            account=f.get("account"),
            month_end=date.fromisoformat(str(f["month_end"])),
            km=Decimal(str(f["km"])),
            covers=((report.municipality, report.report_id, report.version),),
        )
        line = format_record(g, settings)
        # a record is ASCII, which every allowed file encoding writes as ASCII
        return Payload(body=encode_lines([line], "ascii"), content_type="text/plain")

    async def send(self, payload: Payload, channel: Channel) -> Receipt:
        raise Rejected("kmd-ind01 is delivered by file runs, not per message")
