"""Pull sources: systems the gateway fetches reports from instead of being sent them.

A source is pulled on its interval or cron schedule; after a failed pull (or a failed
acknowledgement) the next one waits longer, by the retry policy's backoff, up to a cap.
The schedule is a pure function of (source, now, failures in a row): nothing here sleeps.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Protocol
from zoneinfo import ZoneInfo

from adapters.base import Adapter

from ..ind01_file import next_run
from ..retry import next_delay
from ..settings import PullSource, RetryPolicy, Settings
from ..store import Store

if TYPE_CHECKING:
    from ..payroll_calendar import CutoffCalendar
    from .os2indberetning import Os2Indberetning

COPENHAGEN = ZoneInfo("Europe/Copenhagen")
#: the longest wait between two pulls while a source keeps failing (or its interval, if longer)
BACKOFF_CAP_SECONDS = 900.0
#: the first backoff of a source pulled on a cron schedule
CRON_FIRST_BACKOFF_SECONDS = 60.0


class PullerState(Protocol):
    """What the metrics and the alerts read of a running pull source."""

    @property
    def name(self) -> str: ...
    @property
    def municipality(self) -> str: ...
    @property
    def failures(self) -> int: ...
    @property
    def started_at(self) -> float: ...
    @property
    def last_pulled_at(self) -> float | None: ...


class PullError(Exception):
    """A pull or acknowledgement failed; the message names the operation, never the API key."""


def next_pull_at(source: PullSource, now: float, failures: int) -> float:
    """When to pull next, after ``failures`` failed pulls in a row (0: the last one worked)."""
    first = source.interval_seconds or CRON_FIRST_BACKOFF_SECONDS
    wait = first
    if failures:
        policy = RetryPolicy(
            first_delay=first, multiplier=2.0, cap=max(first, BACKOFF_CAP_SECONDS), jitter=0.0
        )
        wait = next_delay(policy, failures)
    if source.schedule is None:
        return now + wait
    after = now + (
        wait if failures else 0.0
    )  # a failing cron source skips ticks until its backoff ran out
    return next_run(
        source.schedule, datetime.fromtimestamp(after, UTC).astimezone(COPENHAGEN)
    ).timestamp()


def build_pullers(
    settings: Settings,
    store: Store,
    calendars: Mapping[tuple[str, str], CutoffCalendar],
    wake: Callable[[], None],
    adapters: Mapping[str, Adapter],
) -> list[Os2Indberetning]:
    """One puller per configured (tenant, source)."""
    from .os2indberetning import Os2Indberetning

    return [
        Os2Indberetning(tenant, source, store, calendars, wake, adapters)
        for tenant in settings.tenants.values()
        for source in tenant.sources.values()
    ]
