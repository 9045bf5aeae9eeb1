"""When a vendor answers: daily or per-weekday windows on the local wall clock, DST-aware.

Pure: the caller passes every instant; the module only reads the time zone database.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

TZ = "Europe/Copenhagen"
DAY = 24 * 60  # minutes
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
# A weekly window recurs within 7 days; 15 also covers one swallowed by a DST gap on its day.
_SEARCH_DAYS = 15
_CLOCK = re.compile(r"(\d{1,2}):(\d{2})")
_WINDOW = re.compile(r"(\S+?)\s*-\s*(\S+)")
_CLAUSE = re.compile(r"([a-z][a-z,\s-]*?)\s*(\d.*)?")


# ---------------------------------------------------------------------------------------
# Wall clock → instants (shared with payroll_calendar)
# ---------------------------------------------------------------------------------------


def zone(name: str) -> ZoneInfo:
    """``ZoneInfo(name)`` with a one-line ValueError for an unknown zone."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, TypeError) as exc:
        raise ValueError(f"unknown time zone {name!r}") from exc


def require_aware(at: datetime, name: str = "at") -> None:
    if not isinstance(at, datetime) or at.utcoffset() is None:
        raise ValueError(f"{name} must be a timezone-aware datetime, got {at!r}")


def utc(at: datetime) -> datetime:
    """Compare instants in UTC: aware datetimes sharing one tzinfo compare by wall time, ignoring fold."""
    return at.astimezone(UTC)


def local_instant(wall: datetime, tz: ZoneInfo) -> datetime:
    """The first instant at which the local clock reads ``wall`` or later.

    An ambiguous wall time (the repeated hour in October) is its first occurrence, ``fold=0``.
    A non-existent one (the skipped hour in March) is the moment the clock jumps over it:
    02:30 on the last Sunday of March is 03:00 CEST. Python's own ``fold=0`` reading would be
    03:30 CEST, which makes a deadline or an opening an hour later than the wall clock says.
    """
    first = wall.replace(tzinfo=tz, fold=0)
    if _exists(first):
        return first
    # In a gap, fold=1 reads the wall time with the later offset: an instant before the jump.
    return _transition(wall.replace(tzinfo=tz, fold=1), first, tz)


def transitions(start: datetime, end: datetime, tz: ZoneInfo) -> list[datetime]:
    """The instants in (start, end] at which ``tz`` changes its UTC offset (DST starts or ends)."""
    found = []
    step = 86400  # zones change offset at most once a day
    lo, end_ts = int(start.timestamp()), int(end.timestamp())
    while lo < end_ts:
        hi = min(lo + step, end_ts)
        if _offset(lo, tz) != _offset(hi, tz):
            found.append(_transition_ts(lo, hi, tz))
        lo = hi
    return found


def _exists(aware: datetime) -> bool:
    """Does this wall time occur on the clock (i.e. it is not in a DST gap)?"""
    back = utc(aware).astimezone(aware.tzinfo)
    return back.replace(tzinfo=None) == aware.replace(tzinfo=None)


def _offset(ts: int, tz: ZoneInfo) -> timedelta | None:
    return datetime.fromtimestamp(ts, tz).utcoffset()


def _transition(before: datetime, after: datetime, tz: ZoneInfo) -> datetime:
    return _transition_ts(int(before.timestamp()), int(after.timestamp()), tz)


def _transition_ts(lo: int, hi: int, tz: ZoneInfo) -> datetime:
    """Bisect to the first whole second in (lo, hi] with hi's offset (offsets differ at lo, hi)."""
    target = _offset(hi, tz)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _offset(mid, tz) == target:
            hi = mid
        else:
            lo = mid
    return datetime.fromtimestamp(hi, tz)


def _readings(wall: datetime, tz: ZoneInfo) -> tuple[datetime, ...]:
    """Instants at which the clock reaches ``wall``: two in the repeated hour, else one."""
    first = local_instant(wall, tz)
    second = wall.replace(tzinfo=tz, fold=1)
    return (first, second) if _exists(second) and utc(second) != utc(first) else (first,)


# ---------------------------------------------------------------------------------------
# Opening hours
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, order=True)
class Window:
    """Minutes after the local midnight of the day it starts on; an ``end`` past 1440 is the next day."""

    start: int
    end: int

    def describe(self) -> str:
        end = self.end if self.end <= DAY else self.end - DAY
        return f"{_clock(self.start)}-{_clock(end)}"


_ALL_DAY = (Window(0, DAY),)


@dataclass(frozen=True, slots=True)
class OpeningHours:
    """Windows per weekday (Monday first), read on the wall clock of ``tz``; end is exclusive."""

    days: tuple[tuple[Window, ...], ...]
    tz: ZoneInfo

    @classmethod
    def parse(cls, text: str, tz: str = TZ) -> OpeningHours:
        """``"always"``, ``"06:00-22:00"`` (every day) or ``"mon-fri 06:00-22:00; sat 08:00-12:00"``.

        Clauses add up; days a weekday form does not name are closed. A window whose end is not
        after its start crosses midnight (``"22:00-06:00"``); ``"00:00-24:00"`` is all day.
        """
        zone_ = zone(tz)
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"expected opening hours like '06:00-22:00' or 'always', got {text!r}")
        spec = " ".join(text.lower().split())
        if spec == "always":
            return cls(days=(_ALL_DAY,) * 7, tz=zone_)
        days: list[list[Window]] = [[] for _ in WEEKDAYS]
        for clause in spec.split(";"):
            weekdays, windows = _clause(clause.strip())
            for day in weekdays:
                days[day].extend(windows)
        return cls(days=tuple(tuple(sorted(set(d))) for d in days), tz=zone_)

    @property
    def always(self) -> bool:
        return all(day == _ALL_DAY for day in self.days)

    def is_open(self, at: datetime) -> bool:
        """Open when the local wall time lies in a window of today, or in one carried over from yesterday."""
        require_aware(at)
        wall = at.astimezone(self.tz).replace(tzinfo=None)
        today = wall.date()
        return self._open_on(wall, today) or self._open_on(wall, today - timedelta(days=1))

    def next_opening(self, at: datetime) -> datetime:
        """``at`` itself when open, else the first instant after it that is open (in ``tz``).

        The clock turns from closed to open only at a window's start (either reading of it in
        the repeated hour) or when it jumps at a DST change; the earliest open one of those wins.
        """
        if self.is_open(at):
            return at
        horizon = at + timedelta(days=_SEARCH_DAYS)
        candidates = [
            *self._starts(at.astimezone(self.tz).date()),
            *transitions(at, horizon, self.tz),
        ]
        after = [c for c in candidates if utc(c) > utc(at) and self.is_open(c)]
        opening = min(after, key=utc, default=None)
        if opening is None:  # only for hand-built hours without any window
            raise LookupError(f"never open within {_SEARCH_DAYS} days: {self.describe()}")
        return opening

    def describe(self) -> str:
        """The canonical text; ``parse(describe())`` gives the same hours back."""
        if self.always:
            return "always"
        if len(set(self.days)) == 1:
            return _windows_text(self.days[0])
        return "; ".join(
            f"{_days_text(first, last)} {_windows_text(self.days[first])}"
            for first, last in _runs(self.days)
        )

    def _open_on(self, wall: datetime, day: date) -> bool:
        since = wall - datetime.combine(day, time())
        return any(
            timedelta(minutes=w.start) <= since < timedelta(minutes=w.end)
            for w in self.days[day.weekday()]
        )

    def _starts(self, first_day: date) -> Iterator[datetime]:
        for offset in range(_SEARCH_DAYS):
            day = first_day + timedelta(days=offset)
            midnight = datetime.combine(day, time())
            for w in self.days[day.weekday()]:
                yield from _readings(midnight + timedelta(minutes=w.start), self.tz)


ALWAYS = OpeningHours(days=(_ALL_DAY,) * 7, tz=ZoneInfo(TZ))


# ---------------------------------------------------------------------------------------
# Parsing and describing
# ---------------------------------------------------------------------------------------


def _clause(clause: str) -> tuple[Sequence[int], tuple[Window, ...]]:
    if not clause:
        raise ValueError("empty part between ';'")
    named = _CLAUSE.fullmatch(clause)
    if named is None:  # no weekday names: every day
        return range(7), _windows(clause)
    weekdays = _weekdays(named[1].replace(" ", ""))
    if named[2] is None:
        raise ValueError(f"'{clause}': no time window (e.g. '{clause} 06:00-22:00')")
    return weekdays, _windows(named[2])


def _weekdays(spec: str) -> list[int]:
    days: list[int] = []
    for item in spec.split(","):
        first, _, last = item.partition("-")
        start, stop = _weekday(first), _weekday(last or first)
        # a range may wrap the week end: "fri-mon"
        days.extend((start + i) % 7 for i in range((stop - start) % 7 + 1))
    return days


def _weekday(name: str) -> int:
    try:
        return WEEKDAYS.index(name)
    except ValueError:
        raise ValueError(f"unknown weekday {name!r} (use {', '.join(WEEKDAYS)})") from None


def _windows(text: str) -> tuple[Window, ...]:
    return tuple(_window(item.strip()) for item in text.split(","))


def _window(text: str) -> Window:
    match = _WINDOW.fullmatch(text)
    if match is None:
        raise ValueError(f"'{text}': expected a window HH:MM-HH:MM")
    start, end = _minutes(match[1], end=False), _minutes(match[2], end=True)
    if start == end:
        raise ValueError(f"'{text}': empty window (use 00:00-24:00 or 'always' for all day)")
    return Window(start, end if end > start else end + DAY)


def _minutes(text: str, *, end: bool) -> int:
    match = _CLOCK.fullmatch(text)
    hours, minutes = (int(match[1]), int(match[2])) if match else (-1, -1)
    if end and (hours, minutes) == (24, 0):
        return DAY
    if not (0 <= hours <= 23 and 0 <= minutes <= 59):
        allowed = "HH:MM, 00:00-24:00" if end else "HH:MM, 00:00-23:59"
        raise ValueError(f"'{text}' is not a time ({allowed})")
    return hours * 60 + minutes


def _clock(minutes: int) -> str:
    return f"{minutes // 60:02d}:{minutes % 60:02d}"


def _windows_text(windows: tuple[Window, ...]) -> str:
    return ", ".join(w.describe() for w in windows)


def _days_text(first: int, last: int) -> str:
    return WEEKDAYS[first] if first == last else f"{WEEKDAYS[first]}-{WEEKDAYS[last]}"


def _runs(days: tuple[tuple[Window, ...], ...]) -> Iterator[tuple[int, int]]:
    """Runs of consecutive weekdays (Monday to Sunday) with the same windows; closed days skipped."""
    first = 0
    for day in range(1, 8):
        if day == 7 or days[day] != days[first]:
            if days[first]:
                yield first, day - 1
            first = day
