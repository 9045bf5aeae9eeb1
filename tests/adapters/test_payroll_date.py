"""Payroll dates are Danish dates: instants are converted to Europe/Copenhagen, local times are kept."""

from __future__ import annotations

from datetime import date

import pytest

from adapters.base import payroll_date


@pytest.mark.parametrize(
    ("written", "expected"),
    [
        # an instant from a UTC host: already 1 November in Denmark (CET, +01:00)
        ("2026-10-31T23:00:00+00:00", date(2026, 11, 1)),
        ("2026-10-31T22:59:59+00:00", date(2026, 10, 31)),
        ("2026-10-31T23:00:00Z", date(2026, 11, 1)),
        # summer time (CEST, +02:00): 22:00 UTC is already midnight
        ("2026-03-28T23:30:00Z", date(2026, 3, 29)),
        ("2026-07-14T22:00:00Z", date(2026, 7, 15)),
        ("2026-07-14T21:59:59.9999999Z", date(2026, 7, 14)),  # .NET writes 7 decimals
        # the last Sundays of March and October, written in Danish offsets
        ("2026-10-25T00:00:00+02:00", date(2026, 10, 25)),
        ("2026-10-25T23:30:00+01:00", date(2026, 10, 25)),
        ("2026-03-29T00:00:00+01:00", date(2026, 3, 29)),
        # a host east of Denmark
        ("2026-11-01T00:30:00+02:00", date(2026, 10, 31)),
        # no offset: a local date-time, the date as written
        ("2026-10-25T00:00:00", date(2026, 10, 25)),
        ("2026-10-31T23:00:00", date(2026, 10, 31)),
        ("2026-10-31", date(2026, 10, 31)),
    ],
)
def test_instants_become_danish_dates_and_local_times_stay(written: str, expected: date) -> None:
    assert payroll_date(written) == expected


@pytest.mark.parametrize("written", ["", "yesterday", "2026-02-30T00:00:00", "2026-13-01"])
def test_what_is_no_date_raises(written: str) -> None:
    with pytest.raises(ValueError):
        payroll_date(written)
