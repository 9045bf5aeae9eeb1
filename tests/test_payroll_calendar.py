"""Payroll cut-offs: the rule's three forms, explicit dates per month, the target run, DST."""

from __future__ import annotations

import re
import tomllib
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.payroll_calendar import CutoffCalendar, CutoffRule

CPH = ZoneInfo("Europe/Copenhagen")


def cph(*args: int, fold: int = 0) -> datetime:
    return datetime(*args, tzinfo=CPH, fold=fold)


def calendar(
    rule: str, dates: list[str] | None = None, holidays: list[str] | None = None
) -> CutoffCalendar:
    raw: dict[str, object] = {"rule": rule}
    if dates is not None:
        raw["dates"] = dates
    if holidays is not None:
        raw["holidays"] = holidays
    return CutoffCalendar.from_config(raw)


# --- the rule ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "kind", "n", "at"),
    [
        ("business day 5 at 12:00", "business day", 5, time(12)),
        ("last business day at 16:00", "last business day", 0, time(16)),
        ("day 20 at 12:00", "day", 20, time(12)),
        ("  Business  Day 1 at 7:05 ", "business day", 1, time(7, 5)),
    ],
)
def test_rule_forms(text: str, kind: str, n: int, at: time) -> None:
    rule = CutoffRule.parse(text)
    assert (rule.kind, rule.n, rule.at) == (kind, n, at)
    assert CutoffRule.parse(rule.describe()) == rule


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({}, "rule: missing"),
        ({"rule": "the 5th at noon"}, "rule: expected 'business day 5 at 12:00'"),
        ({"rule": 5}, "rule: expected text like"),
        ({"rule": "business day 0 at 12:00"}, "rule: business day 0: N must be 1-20"),
        ({"rule": "business day 21 at 12:00"}, "rule: business day 21: N must be 1-20"),
        ({"rule": "day 29 at 12:00"}, "rule: day 29: N must be 1-28"),
        ({"rule": "day at 12:00"}, "rule: 'day' needs a number"),
        ({"rule": "last business day 2 at 12:00"}, "rule: expected 'last business day at HH:MM'"),
        ({"rule": "day 5 at 24:00"}, "rule: '24:00' is not a time of day"),
        ({"rule": "day 5 at 12"}, "rule: '12' is not a time of day"),
        (
            {"rule": "day 5 at 12:00", "cut": 1},
            "cut: unknown setting (allowed: dates, holidays, rule)",
        ),
        ({"rule": "day 5 at 12:00", "dates": "2026-12-07T12:00"}, "dates: expected a list"),
        (
            {"rule": "day 5 at 12:00", "dates": ["2026-12-07"]},
            "dates[0]: expected a local date and time",
        ),
        (
            {"rule": "day 5 at 12:00", "dates": [date(2026, 12, 7)]},
            "dates[0]: 2026-12-07 needs a time",
        ),
        (
            {"rule": "day 5 at 12:00", "dates": ["2026-12-07T12:00", "2026-02-30T12:00"]},
            "dates[1]: '2026-02-30' is not a date",
        ),
        (
            {"rule": "day 5 at 12:00", "dates": ["2026-12-07T12:60"]},
            "dates[0]: '12:60' is not a time",
        ),
        (
            {"rule": "day 5 at 12:00", "holidays": ["24-12-2026"]},
            "holidays[0]: expected a date YYYY-MM-DD",
        ),
        (
            {"rule": "day 5 at 12:00", "holidays": [datetime(2026, 12, 24)]},  # noqa: DTZ001 - a TOML local datetime
            "holidays[0]: expected a date",
        ),
        ([("rule", "day 5 at 12:00")], "expected a table"),
    ],
)
def test_config_errors_are_one_line_naming_the_sub_key(raw: object, message: str) -> None:
    with pytest.raises(ValueError, match="^" + re.escape(message)) as err:
        CutoffCalendar.from_config(raw)  # type: ignore[arg-type]
    assert "\n" not in str(err.value)


def test_the_brief_toml_shape_and_toml_native_values() -> None:
    raw = tomllib.loads("""
        [cutoff]
        rule = "business day 5 at 12:00"
        dates = ["2026-12-07T12:00", "2027-01-08 09:30", 2027-02-05T10:00:00, 2027-03-05T10:00:00Z]
        holidays = ["2026-12-24", 2026-12-25]
    """)["cutoff"]
    cal = CutoffCalendar.from_config(raw)
    assert cal.dates == (
        cph(2026, 12, 7, 12),
        cph(2027, 1, 8, 9, 30),
        cph(2027, 2, 5, 10),
        cph(2027, 3, 5, 11),
    )
    assert cal.holidays == {date(2026, 12, 24), date(2026, 12, 25)}


def test_unknown_time_zone() -> None:
    with pytest.raises(ValueError, match="unknown time zone 'Mars/Olympus'"):
        CutoffCalendar.from_config({"rule": "day 5 at 12:00"}, tz="Mars/Olympus")


# --- business days -------------------------------------------------------------------


def test_business_day_n_skips_weekends_and_holidays() -> None:
    # December 2026 starts on a Tuesday: 1, 2, 3, 4 (Fri), 7 (Mon)
    assert calendar("business day 5 at 12:00").cutoff_for_month(2026, 12) == cph(2026, 12, 7, 12)
    assert calendar("business day 5 at 12:00", holidays=["2026-12-02"]).cutoff_for_month(
        2026, 12
    ) == cph(2026, 12, 8, 12)
    # January 2027: 1 (Fri, a holiday), 4, 5, 6, 7, 8
    assert calendar("business day 5 at 12:00", holidays=["2027-01-01"]).cutoff_for_month(
        2027, 1
    ) == cph(2027, 1, 8, 12)


def test_business_day_n_beyond_the_month_is_its_last_business_day() -> None:
    # February 2026 has exactly 20 weekdays (2nd to 27th); a holiday leaves 19
    assert calendar("business day 20 at 12:00").cutoff_for_month(2026, 2) == cph(2026, 2, 27, 12)
    cal = calendar("business day 20 at 12:00", holidays=["2026-02-10", "2026-02-27"])
    assert cal.cutoff_for_month(2026, 2) == cph(2026, 2, 26, 12)


def test_last_business_day() -> None:
    cal = calendar("last business day at 16:00", holidays=["2027-01-29"])
    assert cal.cutoff_for_month(2026, 12) == cph(2026, 12, 31, 16)
    assert cal.cutoff_for_month(2027, 1) == cph(2027, 1, 28, 16)  # 31st Sunday, 29th a holiday


def test_calendar_day_moves_to_the_business_day_before() -> None:
    cal = calendar("day 20 at 12:00", holidays=["2026-11-20"])
    assert cal.cutoff_for_month(2026, 7) == cph(2026, 7, 20, 12)  # a Monday
    assert cal.cutoff_for_month(2026, 6) == cph(2026, 6, 19, 12)  # 20th is a Saturday
    assert cal.cutoff_for_month(2026, 11) == cph(2026, 11, 19, 12)  # Friday 20th a holiday
    # "day 1" on a Sunday: the Friday before, in the previous month (earlier is the safe side)
    assert calendar("day 1 at 12:00").cutoff_for_month(2026, 2) == cph(2026, 1, 30, 12)


def test_month_out_of_range() -> None:
    with pytest.raises(ValueError, match="month must be 1-12"):
        calendar("day 5 at 12:00").cutoff_for_month(2026, 13)


# --- explicit dates --------------------------------------------------------------------


def test_explicit_dates_override_their_month_only() -> None:
    cal = calendar("business day 5 at 12:00", dates=["2026-12-04T09:00", "2026-12-18 12:00"])
    assert cal.cutoffs_for_month(2026, 12) == (cph(2026, 12, 4, 9), cph(2026, 12, 18, 12))
    assert cal.cutoff_for_month(2026, 12) == cph(2026, 12, 18, 12)  # the month's last one
    assert cal.cutoff_for_month(2026, 11) == cph(2026, 11, 6, 12)  # the rule
    assert cal.cutoff_for_month(2027, 1) == cph(2027, 1, 7, 12)
    # each explicit date is a cut-off of its own: a delivery targets the first one ahead
    assert cal.target_cutoff(cph(2026, 12, 1)) == cph(2026, 12, 4, 9)
    assert cal.target_cutoff(cph(2026, 12, 4, 9, 1)) == cph(2026, 12, 18, 12)


def test_explicit_date_on_a_weekend_stands_and_duplicates_collapse() -> None:
    cal = calendar("day 5 at 12:00", dates=["2026-12-05T10:00", "2026-12-05 10:00"])
    assert cal.cutoffs_for_month(2026, 12) == (cph(2026, 12, 5, 10),)


# --- target cut-off --------------------------------------------------------------------


def test_target_at_the_cutoff_and_just_after() -> None:
    cal = calendar("business day 5 at 12:00")
    cutoff = cph(2026, 1, 7, 12)
    assert cal.target_cutoff(cph(2026, 1, 1)) == cutoff
    assert cal.target_cutoff(cutoff) == cutoff  # exactly at the cut-off still makes it
    assert cal.target_cutoff(cutoff + timedelta(microseconds=1)) == cph(2026, 2, 6, 12)
    assert cal.target_cutoff(cph(2026, 1, 31, 23, 59)) == cph(2026, 2, 6, 12)
    assert cal.target_cutoff(cutoff.astimezone(UTC)) == cutoff  # any zone in, same instant


def test_target_december_to_january() -> None:
    cal = calendar("business day 5 at 12:00", dates=["2026-12-07T12:00"], holidays=["2027-01-01"])
    assert cal.target_cutoff(cph(2026, 12, 7, 12, 0, 1)) == cph(2027, 1, 8, 12)
    assert cal.target_cutoff(cph(2026, 12, 31, 23, 59, 59)) == cph(2027, 1, 8, 12)
    explicit = calendar("last business day at 16:00", dates=["2027-01-08 09:30"])
    assert explicit.target_cutoff(cph(2026, 12, 31, 16, 0, 1)) == cph(2027, 1, 8, 9, 30)


def test_target_takes_the_earliest_even_when_a_later_month_falls_back_into_this_one() -> None:
    # explicit Saturday 31 January 16:00; February's "day 1" (a Sunday) is Friday 30 January 12:00
    cal = calendar("day 1 at 12:00", dates=["2026-01-31T16:00"])
    assert cal.target_cutoff(cph(2026, 1, 30, 11)) == cph(2026, 1, 30, 12)
    assert cal.target_cutoff(cph(2026, 1, 30, 13)) == cph(2026, 1, 31, 16)
    assert cal.target_cutoff(cph(2026, 1, 31, 17)) == cph(2026, 2, 27, 12)  # March 1st is a Sunday


def test_target_needs_an_aware_datetime() -> None:
    with pytest.raises(ValueError, match="received must be a timezone-aware datetime"):
        calendar("day 5 at 12:00").target_cutoff(datetime(2026, 1, 1))  # noqa: DTZ001 - the point


# --- DST -------------------------------------------------------------------------------


def test_rule_cutoffs_keep_their_wall_time_across_dst() -> None:
    cal = calendar("last business day at 16:00")
    march, october = cal.cutoff_for_month(2026, 3), cal.cutoff_for_month(2026, 10)
    assert (march.hour, march.utcoffset()) == (16, timedelta(hours=2))  # after DST began (29th)
    assert (october.hour, october.utcoffset()) == (16, timedelta(hours=1))  # Friday 30th, CET
    assert cal.cutoff_for_month(2026, 2).astimezone(UTC).hour == 15
    assert march.astimezone(UTC).hour == 14


def test_explicit_wall_times_in_the_dst_gap_and_the_repeated_hour() -> None:
    cal = calendar("day 5 at 12:00", dates=["2026-03-29T02:30", "2026-10-25T02:30"])
    skipped, repeated = cal.dates
    # 02:30 never shows on 29 March: the cut-off is when the clock jumps past it, 03:00 CEST
    assert skipped.astimezone(UTC) == datetime(2026, 3, 29, 1, 0, tzinfo=UTC)
    # 02:30 shows twice on 25 October: the first time (fold=0, CEST)
    assert repeated.astimezone(UTC) == datetime(2026, 10, 25, 0, 30, tzinfo=UTC)
    # one tzinfo compares wall times; the calendar compares instants
    assert cal.target_cutoff(cph(2026, 10, 25, 2, 15, fold=1)) == cph(2026, 11, 5, 12)


# --- at risk ---------------------------------------------------------------------------


def test_at_risk() -> None:
    cal = calendar("day 5 at 12:00")
    target = cph(2026, 6, 5, 12)
    assert not cal.at_risk(target, cph(2026, 6, 5, 11, 59), waiting_for_operator=False)
    assert not cal.at_risk(target, target, waiting_for_operator=False)
    assert cal.at_risk(target, target + timedelta(seconds=1), waiting_for_operator=False)
    assert cal.at_risk(target, cph(2026, 6, 1), waiting_for_operator=True)
    assert cal.at_risk(target, None, waiting_for_operator=True)
    assert not cal.at_risk(target, None, waiting_for_operator=False)  # in flight right now


# --- property --------------------------------------------------------------------------

_MIN, _MAX = datetime(2026, 1, 1), datetime(2028, 12, 31)  # noqa: DTZ001 - local wall times


def _month(year: int, month: int, add: int) -> tuple[int, int]:
    index = year * 12 + month - 1 + add
    return index // 12, index % 12 + 1


rules = st.one_of(
    st.builds(
        lambda n, h, m: f"business day {n} at {h:02d}:{m:02d}",
        st.integers(1, 20),
        st.integers(0, 23),
        st.integers(0, 59),
    ),
    st.builds(
        lambda h, m: f"last business day at {h}:{m:02d}", st.integers(0, 23), st.integers(0, 59)
    ),
    st.builds(
        lambda n, h, m: f"day {n} at {h:02d}:{m:02d}",
        st.integers(1, 28),
        st.integers(0, 23),
        st.integers(0, 59),
    ),
)
explicit_dates = st.lists(
    st.datetimes(_MIN, _MAX).map(lambda d: d.strftime("%Y-%m-%dT%H:%M")), max_size=6
)
holidays = st.lists(st.dates(_MIN.date(), _MAX.date()).map(date.isoformat), max_size=15)
received = st.datetimes(
    datetime(2026, 1, 1),  # noqa: DTZ001
    datetime(2028, 9, 30),  # noqa: DTZ001
    timezones=st.just(CPH),
    allow_imaginary=False,
)


@settings(max_examples=200, deadline=None)
@given(rules, explicit_dates, holidays, received)
def test_target_is_the_first_cutoff_at_or_after(
    rule: str, dates: list[str], days: list[str], t: datetime
) -> None:
    cal = calendar(rule, dates, days)
    target = cal.target_cutoff(t)
    assert target.astimezone(UTC) >= t.astimezone(UTC)
    local = t.astimezone(CPH)
    nearby = [
        c
        for add in range(-1, 4)
        for c in cal.cutoffs_for_month(*_month(local.year, local.month, add))
    ]
    assert target.astimezone(UTC) == min(
        c.astimezone(UTC) for c in nearby if c.astimezone(UTC) >= t
    )
    # ... and it falls in this month or the next two
    landed = target.astimezone(CPH)
    assert (landed.year * 12 + landed.month) - (local.year * 12 + local.month) in (0, 1, 2)
