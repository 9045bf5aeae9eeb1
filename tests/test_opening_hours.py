"""Vendor opening hours: boundaries (end exclusive), the next opening, midnight, DST nights."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.opening_hours import ALWAYS, OpeningHours, Window, local_instant

CPH = ZoneInfo("Europe/Copenhagen")
SD = OpeningHours.parse("06:00-22:00")


def cph(*args: int, fold: int = 0) -> datetime:
    return datetime(*args, tzinfo=CPH, fold=fold)


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


# --- parsing ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("06:00-22:00", "06:00-22:00"),
        (" ALWAYS ", "always"),
        ("00:00-24:00", "always"),
        ("22:00-06:00", "22:00-06:00"),
        ("22:00-00:00", "22:00-24:00"),
        ("mon-fri 06:00-22:00; sat 08:00-12:00", "mon-fri 06:00-22:00; sat 08:00-12:00"),
        ("Sat 08:00-12:00; MON - FRI 6:00-22:00", "mon-fri 06:00-22:00; sat 08:00-12:00"),
        (
            "mon,wed-thu 13:00-14:00, 08:00-12:00",
            "mon 08:00-12:00, 13:00-14:00; wed-thu 08:00-12:00, 13:00-14:00",
        ),
        (
            "sun-mon 10:00-11:00",
            "mon 10:00-11:00; sun 10:00-11:00",
        ),  # a range may wrap the week end
        ("mon-sun 06:00-22:00", "06:00-22:00"),
        (
            "06:00-22:00; sat 22:00-23:00",
            "mon-fri 06:00-22:00; sat 06:00-22:00, 22:00-23:00; sun 06:00-22:00",
        ),
    ],
)
def test_parse_and_describe_round_trip(text: str, canonical: str) -> None:
    hours = OpeningHours.parse(text)
    assert hours.describe() == canonical
    assert OpeningHours.parse(canonical) == hours


def test_always_and_all_day_are_the_same() -> None:
    assert OpeningHours.parse("always") == OpeningHours.parse("00:00-24:00") == ALWAYS
    assert ALWAYS.always and not SD.always
    assert ALWAYS.is_open(cph(2026, 3, 29, 2, 30))
    at = cph(2026, 10, 25, 2, 30, fold=1)
    assert ALWAYS.next_opening(at) is at


def test_crossing_midnight_is_stored_on_its_start_day() -> None:
    assert OpeningHours.parse("fri 22:00-06:00").days[4] == (Window(22 * 60, 30 * 60),)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "expected opening hours like '06:00-22:00' or 'always', got ''"),
        ("6-22", "'6' is not a time (HH:MM, 00:00-23:59)"),
        ("06:00-25:00", "'25:00' is not a time (HH:MM, 00:00-24:00)"),
        ("24:00-06:00", "'24:00' is not a time (HH:MM, 00:00-23:59)"),
        ("06:00-06:00", "'06:00-06:00': empty window (use 00:00-24:00 or 'always' for all day)"),
        ("06:00", "'06:00': expected a window HH:MM-HH:MM"),
        ("mon-fro 06:00-22:00", "unknown weekday 'fro' (use mon, tue, wed, thu, fri, sat, sun)"),
        ("mon-fri", "'mon-fri': no time window (e.g. 'mon-fri 06:00-22:00')"),
        ("06:00-22:00;", "empty part between ';'"),
        ("06:00-22:00,", "'': expected a window HH:MM-HH:MM"),
    ],
)
def test_parse_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        OpeningHours.parse(text)


def test_parse_rejects_an_unknown_zone_and_non_text() -> None:
    with pytest.raises(ValueError, match="unknown time zone 'Europe/Atlantis'"):
        OpeningHours.parse("06:00-22:00", tz="Europe/Atlantis")
    with pytest.raises(ValueError, match="got None"):
        OpeningHours.parse(None)  # type: ignore[arg-type]


# --- is_open / next_opening ------------------------------------------------------------


def test_boundaries_start_inclusive_end_exclusive() -> None:
    assert not SD.is_open(cph(2026, 6, 1, 5, 59, 59, 999999))
    assert SD.is_open(cph(2026, 6, 1, 6))
    assert SD.is_open(cph(2026, 6, 1, 21, 59, 59, 999999))
    assert not SD.is_open(cph(2026, 6, 1, 22))
    assert SD.is_open(utc(2026, 6, 1, 4))  # 06:00 CEST, given in UTC
    assert not SD.is_open(utc(2026, 1, 5, 4, 30))  # 05:30 CET


def test_next_opening() -> None:
    at = cph(2026, 6, 1, 12)
    assert SD.next_opening(at) is at  # open: unchanged
    assert SD.next_opening(cph(2026, 6, 1, 22)) == cph(2026, 6, 2, 6)
    assert SD.next_opening(cph(2026, 6, 1, 23, 30)) == cph(2026, 6, 2, 6)
    assert SD.next_opening(cph(2026, 6, 2, 3)) == cph(2026, 6, 2, 6)
    assert SD.next_opening(cph(2026, 12, 31, 22, 30)) == cph(2027, 1, 1, 6)
    assert SD.next_opening(utc(2026, 6, 1, 21)) == cph(2026, 6, 2, 6)  # 23:00 CEST


def test_next_opening_across_dst_nights_is_06_local() -> None:
    spring = SD.next_opening(cph(2026, 3, 28, 22))
    assert spring == cph(2026, 3, 29, 6) and spring.astimezone(UTC) == utc(2026, 3, 29, 4)
    autumn = SD.next_opening(cph(2026, 10, 24, 22))
    assert autumn == cph(2026, 10, 25, 6) and autumn.astimezone(UTC) == utc(2026, 10, 25, 5)
    assert SD.next_opening(cph(2026, 10, 25, 2, 30, fold=1)) == cph(2026, 10, 25, 6)


def test_crossing_midnight() -> None:
    night = OpeningHours.parse("22:00-06:00")
    assert night.is_open(cph(2026, 6, 1, 23)) and night.is_open(cph(2026, 6, 2, 5, 59))
    assert not night.is_open(cph(2026, 6, 2, 6)) and not night.is_open(cph(2026, 6, 1, 21, 59))
    assert night.next_opening(cph(2026, 6, 1, 12)) == cph(2026, 6, 1, 22)
    # a weekday window carries over midnight into the next day only
    friday_night = OpeningHours.parse("fri 22:00-06:00")
    assert friday_night.is_open(cph(2026, 6, 6, 5))  # Saturday morning
    assert not friday_night.is_open(cph(2026, 6, 7, 5))  # Sunday morning
    assert friday_night.next_opening(cph(2026, 6, 6, 6)) == cph(2026, 6, 12, 22)


def test_weekday_form() -> None:
    hours = OpeningHours.parse("mon-fri 06:00-22:00; sat 08:00-12:00")
    assert hours.next_opening(cph(2026, 6, 5, 22, 30)) == cph(2026, 6, 6, 8)  # Friday → Saturday
    assert hours.next_opening(cph(2026, 6, 6, 12)) == cph(2026, 6, 8, 6)  # Saturday → Monday
    assert not hours.is_open(cph(2026, 6, 7, 12))  # Sunday


def test_a_window_starting_in_the_skipped_hour_opens_when_the_clock_jumps() -> None:
    hours = OpeningHours.parse("02:30-04:00")
    opening = hours.next_opening(cph(2026, 3, 29, 1))
    assert opening.astimezone(UTC) == utc(2026, 3, 29, 1)  # 02:00 CET → 03:00 CEST
    assert hours.is_open(opening) and not hours.is_open(
        opening.astimezone(UTC) - timedelta(seconds=1)
    )
    # a window wholly inside the skipped hour does not happen that night
    gone = OpeningHours.parse("02:10-02:40")
    assert gone.next_opening(cph(2026, 3, 29, 1)) == cph(2026, 3, 30, 2, 10)


def test_the_repeated_hour_opens_a_window_twice() -> None:
    hours = OpeningHours.parse("02:00-02:30")
    assert hours.is_open(cph(2026, 10, 25, 2, 10))  # CEST
    assert not hours.is_open(cph(2026, 10, 25, 2, 40))
    again = hours.next_opening(cph(2026, 10, 25, 2, 40))
    assert again.astimezone(UTC) == utc(2026, 10, 25, 1)  # 02:00 CET, the second reading
    # re-entering a window in the middle: the clock falls back from 03:00 into 01:30-02:45
    middle = OpeningHours.parse("01:30-02:45")
    assert middle.next_opening(cph(2026, 10, 25, 2, 50)).astimezone(UTC) == utc(2026, 10, 25, 1)


def test_local_instant_reading_of_wall_times() -> None:
    assert local_instant(datetime(2026, 3, 29, 2, 30), CPH).astimezone(UTC) == utc(2026, 3, 29, 1)  # noqa: DTZ001
    autumn = datetime(2026, 10, 25, 2, 30)  # noqa: DTZ001
    assert local_instant(autumn, CPH).astimezone(UTC) == utc(2026, 10, 25, 0, 30)
    assert local_instant(datetime(2026, 6, 1, 6), CPH) == cph(2026, 6, 1, 6)  # noqa: DTZ001


def test_naive_datetimes_are_refused() -> None:
    with pytest.raises(ValueError, match="at must be a timezone-aware datetime"):
        SD.is_open(datetime(2026, 6, 1, 12))  # noqa: DTZ001 - the point
    with pytest.raises(ValueError, match="at must be a timezone-aware datetime"):
        SD.next_opening(datetime(2026, 6, 1, 12))  # noqa: DTZ001


# --- properties ------------------------------------------------------------------------

instants = st.datetimes(
    datetime(2026, 1, 1),  # noqa: DTZ001
    datetime(2028, 12, 31),  # noqa: DTZ001
    timezones=st.sampled_from([CPH, UTC]),
    allow_imaginary=False,
)
dst_nights = st.sampled_from(
    [cph(2026, 3, 28, 20), cph(2026, 10, 24, 20), cph(2027, 3, 27, 20), cph(2027, 10, 30, 20)]
)
clock = st.builds(lambda h, m: f"{h:02d}:{m:02d}", st.integers(0, 23), st.integers(0, 59))
daily = st.builds(lambda a, b: f"{a}-{b}", clock, clock).filter(lambda t: t[:5] != t[6:])
weekly = st.builds(
    lambda d, w: f"{d} {w}", st.sampled_from(["mon", "sat-sun", "fri-tue", "wed,fri"]), daily
)
hours_text = st.one_of(
    daily, weekly, st.lists(weekly, min_size=1, max_size=3).map("; ".join), st.just("always")
)


@settings(max_examples=300, deadline=None)
@given(
    hours_text,
    st.one_of(
        instants,
        dst_nights.flatmap(
            lambda night: st.integers(0, 12 * 60).map(
                lambda m: night.astimezone(UTC) + timedelta(minutes=m)
            )
        ),
    ),
)
def test_next_opening_is_open_and_not_earlier(text: str, t: datetime) -> None:
    hours = OpeningHours.parse(text)
    opening = hours.next_opening(t)
    assert opening.astimezone(UTC) >= t.astimezone(UTC)
    assert hours.is_open(opening)
    if opening.astimezone(UTC) != t.astimezone(UTC):  # an edge: closed just before
        assert not hours.is_open(opening.astimezone(UTC) - timedelta(microseconds=1))
    assert OpeningHours.parse(hours.describe()) == hours


@settings(max_examples=60, deadline=None)
@given(daily, dst_nights, st.integers(0, 24 * 60))
def test_next_opening_is_the_first_open_minute(text: str, night: datetime, minutes: int) -> None:
    # Copenhagen's offsets are whole hours and change on the hour, so every closed→open edge of
    # minute-precision windows is a whole UTC minute: scanning minutes finds the exact answer
    hours, t = OpeningHours.parse(text), night.astimezone(UTC) + timedelta(minutes=minutes)
    step = t
    while not hours.is_open(step):
        step += timedelta(minutes=1)
    assert hours.next_opening(t).astimezone(UTC) == step
