"""Payroll cut-offs per tenant and adapter: explicit local dates, else a monthly business-day rule.

Pure: the caller passes every instant; wall times are local to the municipality (DST-aware).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from .opening_hours import TZ, local_instant, require_aware, utc, zone

BUSINESS_DAY = "business day"
LAST_BUSINESS_DAY = "last business day"
CALENDAR_DAY = "day"
MAX_BUSINESS_DAY = (
    20  # February has 20 weekdays; every month has business day 1..20 before holidays
)
MAX_CALENDAR_DAY = 28  # every month has day 28; month end is "last business day"
RULE_EXAMPLES = "'business day 5 at 12:00', 'last business day at 16:00' or 'day 20 at 12:00'"
_KEYS = {"rule", "dates", "holidays"}
_RULE = re.compile(r"(last business day|business day|day)\s*(\d*)\s+at\s+(\S+)")
_CLOCK = re.compile(r"(\d{1,2}):(\d{2})")
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_LOCAL = re.compile(r"(\d{4}-\d{2}-\d{2})[T ](\S+)")

IsBusinessDay = Callable[[date], bool]


@dataclass(frozen=True, slots=True)
class CutoffRule:
    """The monthly fallback: the Nth business day, the last business day, or calendar day N."""

    kind: str  # BUSINESS_DAY, LAST_BUSINESS_DAY or CALENDAR_DAY
    n: int  # N; 0 for LAST_BUSINESS_DAY
    at: time  # local wall time

    @classmethod
    def parse(cls, text: str) -> CutoffRule:
        if not isinstance(text, str):
            raise ValueError(f"expected text like {RULE_EXAMPLES}, got {text!r}")
        match = _RULE.fullmatch(" ".join(text.lower().split()))
        if match is None:
            raise ValueError(f"expected {RULE_EXAMPLES}, got {text!r}")
        kind, digits, clock = match.groups()
        return cls(kind=kind, n=_rule_n(kind, digits, text), at=_clock(clock))

    def day_in(self, year: int, month: int, is_business: IsBusinessDay) -> date:
        """The cut-off's local date for this month.

        Business day N beyond the month's business days (holidays) is the month's last one.
        Day N that is not a business day moves to the business day before it, even into the
        previous month ("day 1" on a Sunday is the Friday before): earlier is the safe side.
        """
        month_end = _month_end(year, month)
        if self.kind == BUSINESS_DAY:
            business = [d for d in _days(date(year, month, 1), month_end) if is_business(d)]
            if len(business) >= self.n:
                return business[self.n - 1]
        day = date(year, month, self.n) if self.kind == CALENDAR_DAY else month_end
        return _business_on_or_before(day, is_business)

    def describe(self) -> str:
        n = f" {self.n}" if self.n else ""
        return f"{self.kind}{n} at {self.at:%H:%M}"


@dataclass(frozen=True, slots=True)
class CutoffCalendar:
    """One tenant's cut-offs for one adapter.

    A month with explicit dates uses those only; every explicit date is a cut-off of its own
    (a second payroll run in December, say). Other months get the rule's one cut-off.
    """

    rule: CutoffRule
    dates: tuple[datetime, ...] = ()  # explicit cut-offs, aware in ``tz``, ascending
    holidays: frozenset[date] = frozenset()  # not business days for the rule
    tz: ZoneInfo = ZoneInfo(TZ)

    @classmethod
    def from_config(cls, raw: Mapping[str, Any], tz: str = TZ) -> CutoffCalendar:
        """The ``cutoff`` table; a ValueError's message starts with the offending sub-key."""
        if not isinstance(raw, Mapping):
            raise ValueError(f"expected a table with rule, dates, holidays, got {raw!r}")
        unknown = sorted(set(raw) - _KEYS)
        if unknown:
            raise ValueError(f"{unknown[0]}: unknown setting (allowed: {', '.join(sorted(_KEYS))})")
        if "rule" not in raw:
            raise ValueError(f"rule: missing; expected {RULE_EXAMPLES}")
        zone_ = zone(tz)
        rule = _at("rule", CutoffRule.parse, raw["rule"])
        explicit = [
            _at(f"dates[{i}]", _explicit, v, zone_) for i, v in enumerate(_list(raw, "dates"))
        ]
        dates = {utc(d): d for d in explicit}  # by instant: one tzinfo compares wall times
        holidays = {
            _at(f"holidays[{i}]", _holiday, v) for i, v in enumerate(_list(raw, "holidays"))
        }
        return cls(
            rule=rule,
            dates=tuple(dates[k] for k in sorted(dates)),
            holidays=frozenset(holidays),
            tz=zone_,
        )

    def is_business_day(self, day: date) -> bool:
        return day.weekday() < 5 and day not in self.holidays

    def cutoffs_for_month(self, year: int, month: int) -> tuple[datetime, ...]:
        """The month's cut-offs, ascending: its explicit dates, else the rule's one."""
        explicit = self._explicit_in(year, month)
        return explicit or (self._ruled(year, month),)

    def cutoff_for_month(self, year: int, month: int) -> datetime:
        """The month's last cut-off: the last moment a posting still makes that month's payroll."""
        return self.cutoffs_for_month(year, month)[-1]

    def target_cutoff(self, received: datetime) -> datetime:
        """The cut-off a delivery received at ``received`` targets: the first one at or after it."""
        require_aware(received, "received")
        explicit = next((d for d in self.dates if utc(d) >= utc(received)), None)
        ruled = self._next_ruled(received)
        return ruled if explicit is None or utc(ruled) < utc(explicit) else explicit

    def at_risk(
        self, target: datetime, next_attempt_at: datetime | None, waiting_for_operator: bool
    ) -> bool:
        """Will the (undelivered) delivery miss ``target``, as things stand?

        Yes when its next attempt is after the cut-off, and always while it waits for an operator:
        nothing automatic will deliver it. No attempt scheduled and no operator (in flight) is no.
        """
        if waiting_for_operator:
            return True
        return next_attempt_at is not None and utc(next_attempt_at) > utc(target)

    def _explicit_in(self, year: int, month: int) -> tuple[datetime, ...]:
        if not 1 <= month <= 12:
            raise ValueError(f"month must be 1-12, got {month}")
        return tuple(d for d in self.dates if (d.year, d.month) == (year, month))

    def _ruled(self, year: int, month: int) -> datetime:
        day = self.rule.day_in(year, month, self.is_business_day)
        return local_instant(datetime.combine(day, self.rule.at), self.tz)

    def _next_ruled(self, received: datetime) -> datetime:
        """The first rule cut-off at or after ``received``, over months without explicit dates.

        Rule cut-offs never fall after their month's end and never decrease from one month to
        the next, so the first month whose one is at or after ``received`` holds the earliest.
        """
        local = received.astimezone(self.tz)
        year, month = local.year, local.month
        while True:  # ends: explicit months are finitely many, and months run past ``received``
            if not self._explicit_in(year, month):
                ruled = self._ruled(year, month)
                if utc(ruled) >= utc(received):
                    return ruled
            year, month = (year + 1, 1) if month == 12 else (year, month + 1)


# ---------------------------------------------------------------------------------------
# Config values
# ---------------------------------------------------------------------------------------


def _at(where: str, parse: Callable[..., Any], *args: Any) -> Any:
    """Run ``parse`` and prefix its ValueError with the sub-key it concerns."""
    try:
        return parse(*args)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


def _list(raw: Mapping[str, Any], key: str) -> list[Any] | tuple[Any, ...]:
    value = raw.get(key, [])
    if not isinstance(value, list | tuple):
        raise ValueError(f"{key}: expected a list, got {value!r}")
    return value


def _rule_n(kind: str, digits: str, text: str) -> int:
    if kind == LAST_BUSINESS_DAY:
        if digits:
            raise ValueError(f"expected 'last business day at HH:MM', got {text!r}")
        return 0
    if not digits:
        raise ValueError(f"'{kind}' needs a number, as in {RULE_EXAMPLES}; got {text!r}")
    limit = MAX_BUSINESS_DAY if kind == BUSINESS_DAY else MAX_CALENDAR_DAY
    if not 1 <= int(digits) <= limit:
        hint = "" if kind == BUSINESS_DAY else "; use 'last business day' for month end"
        raise ValueError(f"{kind} {digits}: N must be 1-{limit}, which every month has{hint}")
    return int(digits)


def _clock(text: str) -> time:
    match = _CLOCK.fullmatch(text)
    if match is None or int(match[1]) > 23 or int(match[2]) > 59:
        raise ValueError(f"'{text}' is not a time of day (HH:MM, 00:00-23:59)")
    return time(int(match[1]), int(match[2]))


def _explicit(value: Any, tz: ZoneInfo) -> datetime:
    """A local cut-off: ``"2026-12-07T12:00"``, ``"2026-12-07 12:00"`` or a TOML datetime."""
    if isinstance(value, datetime):
        return value.astimezone(tz) if value.utcoffset() is not None else local_instant(value, tz)
    if isinstance(value, date):
        raise ValueError(f"{value.isoformat()} needs a time of day (YYYY-MM-DDTHH:MM)")
    match = _LOCAL.fullmatch(value.strip()) if isinstance(value, str) else None
    if match is None:
        raise ValueError(f"expected a local date and time YYYY-MM-DDTHH:MM, got {value!r}")
    return local_instant(datetime.combine(_date(match[1]), _clock(match[2])), tz)


def _holiday(value: Any) -> date:
    if isinstance(value, date) and not isinstance(value, datetime):
        return value
    if not isinstance(value, str) or not _DATE.fullmatch(value.strip()):
        raise ValueError(f"expected a date YYYY-MM-DD, got {value!r}")
    return _date(value.strip())


def _date(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise ValueError(f"'{text}' is not a date (YYYY-MM-DD)") from None


def _month_end(year: int, month: int) -> date:
    first_of_next = date(year + 1, 1, 1) if month == 12 else date(year, month + 1, 1)
    return first_of_next - timedelta(days=1)


def _days(first: date, last: date) -> list[date]:
    return [first + timedelta(days=i) for i in range((last - first).days + 1)]


def _business_on_or_before(day: date, is_business: IsBusinessDay) -> date:
    # ends: holidays are finitely many, so a weekday that is no holiday comes up
    while not is_business(day):
        day -= timedelta(days=1)
    return day
