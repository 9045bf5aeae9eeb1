"""Per-endpoint traffic control: circuit breaker, concurrency and rate limits, pause, opening hours.

An endpoint is one tenant's route to one vendor adapter (municipality, adapter). The
dispatcher asks :meth:`Endpoints.capacity` how many deliveries it may claim for each
endpoint now, and reports every vendor call's outcome back. Nothing here does I/O; the
breaker's transitions are returned so the caller can audit them.
"""

from __future__ import annotations

import enum
import math
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

from .opening_hours import ALWAYS, OpeningHours
from .settings import BreakerPolicy, EndpointPolicy

Key = tuple[str, str]  # (municipality, adapter)


class BreakerState(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(slots=True)
class Breaker:
    """Opens when the failure share over the window reaches the policy's rate.

    After ``open_seconds`` one probe call is let through (half-open): its success closes
    the breaker, its failure opens it again for another period.
    """

    policy: BreakerPolicy
    state: BreakerState = BreakerState.CLOSED
    opened_at: float = 0.0
    probing: bool = False
    calls: deque[tuple[float, bool]] = field(default_factory=deque)
    failures: int = 0  # the failed calls in ``calls``, kept with it (not recounted per call)

    def allowance(self, now: float) -> int | None:
        """How many calls may start now (None: no limit from the breaker)."""
        if self.state is BreakerState.OPEN and now >= self.opened_at + self.policy.open_seconds:
            self.state = BreakerState.HALF_OPEN
        if self.state is BreakerState.OPEN:
            return 0
        if self.state is BreakerState.HALF_OPEN:
            return 0 if self.probing else 1
        return None

    def started(self, count: int) -> None:
        if self.state is BreakerState.HALF_OPEN and count:
            self.probing = True

    def record(self, ok: bool, now: float) -> BreakerState | None:
        """Count one call's outcome; return the new state when it changed."""
        if self.state is BreakerState.HALF_OPEN:
            self.probing = False
            return self._close() if ok else self._open(now)
        if self.state is BreakerState.OPEN:
            return None  # a call that started before the breaker opened
        self.calls.append((now, ok))
        self.failures += not ok
        while self.calls and self.calls[0][0] < now - self.policy.window_seconds:
            self.failures -= not self.calls.popleft()[1]
        if (
            len(self.calls) >= self.policy.min_calls
            and self.failures / len(self.calls) >= self.policy.failure_rate
        ):
            return self._open(now)
        return None

    def open_until(self, until: float, now: float) -> bool:
        """Another process opened this endpoint's breaker until ``until``: hold back here too
        (then probe, as after an own opening). False when nothing changed: it is already
        open as long, a probe is running (its outcome decides), or ``until`` has passed."""
        if until <= now or (self.state is BreakerState.HALF_OPEN and self.probing):
            return False
        if self.state is BreakerState.OPEN and self.opened_at + self.policy.open_seconds >= until:
            return False
        self._open(until - self.policy.open_seconds)
        return True

    @property
    def open_ends(self) -> float:
        """When an open breaker lets its probe through."""
        return self.opened_at + self.policy.open_seconds

    def _open(self, now: float) -> BreakerState:
        self.state, self.opened_at = BreakerState.OPEN, now
        self.calls.clear()
        self.failures = 0
        return self.state

    def _close(self) -> BreakerState:
        self.state = BreakerState.CLOSED
        self.calls.clear()
        self.failures = 0
        return self.state


@dataclass(slots=True)
class Endpoint:
    key: Key
    policy: EndpointPolicy
    hours: OpeningHours
    breaker: Breaker
    in_flight: int = 0
    tokens: float = 0.0
    refilled_at: float = 0.0
    paused: str | None = None  # the operator's reason, when paused

    def capacity(self, now: float) -> int:
        if self.paused is not None or not self.hours.is_open(_dt(now)):
            return 0
        room = self.policy.max_in_flight - self.in_flight
        breaker = self.breaker.allowance(now)
        if breaker is not None:
            room = min(room, breaker)
        if self.policy.rate_per_second > 0:
            self._refill(now)
            room = min(room, math.floor(self.tokens))
        return max(0, room)

    def _refill(self, now: float) -> None:
        rate = self.policy.rate_per_second
        burst = max(1.0, rate)
        self.tokens = min(burst, self.tokens + (now - self.refilled_at) * rate)
        self.refilled_at = now

    def started(self, count: int) -> None:
        self.in_flight += count
        self.tokens -= count
        self.breaker.started(count)

    def view(self, now: float) -> dict[str, object]:
        return {
            "municipality": self.key[0],
            "adapter": self.key[1],
            "breaker": str(self.breaker.state),
            "in_flight": self.in_flight,
            "max_in_flight": self.policy.max_in_flight,
            "rate_per_second": self.policy.rate_per_second,
            "paused": self.paused is not None,
            "pause_reason": self.paused,
            "opening_hours": self.hours.describe(),
            "open_now": self.hours.is_open(_dt(now)),
        }


def _dt(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)


class Endpoints:
    """All endpoints of the configured routes."""

    def __init__(
        self, policies: Mapping[Key, EndpointPolicy], default_hours: Mapping[str, str | None]
    ) -> None:
        """Raises ValueError, naming the endpoint, for opening hours that do not parse."""
        self._all: dict[Key, Endpoint] = {}
        for key, policy in policies.items():
            text = policy.opening_hours or default_hours.get(key[1])
            try:
                hours = OpeningHours.parse(text) if text else ALWAYS
            except ValueError as exc:
                raise ValueError(f"tenants.{key[0]}.vendors.{key[1]}.opening_hours: {exc}") from exc
            self._all[key] = Endpoint(key, policy, hours, Breaker(policy.breaker))

    def __iter__(self) -> Iterator[Endpoint]:
        return iter(self._all.values())

    def get(self, key: Key) -> Endpoint | None:
        return self._all.get(key)

    def set_paused(self, paused: Mapping[Key, str]) -> None:
        for key, endpoint in self._all.items():
            endpoint.paused = paused.get(key)

    def apply_openings(self, openings: Mapping[Key, float], now: float) -> list[Key]:
        """Breaker openings other processes shared (by endpoint: open until); the changed ones."""
        return [
            key
            for key, until in openings.items()
            if key in self._all and self._all[key].breaker.open_until(until, now)
        ]

    def record(self, key: Key, ok: bool, now: float) -> BreakerState | None:
        """One vendor call's outcome (the vendor answered, or was unavailable)."""
        endpoint = self._all.get(key)
        return None if endpoint is None else endpoint.breaker.record(ok, now)

    def finished(self, key: Key) -> None:
        """A claimed delivery is done with the endpoint (whatever its calls were)."""
        endpoint = self._all.get(key)
        if endpoint is None:
            return
        endpoint.in_flight = max(0, endpoint.in_flight - 1)
        if endpoint.breaker.state is BreakerState.HALF_OPEN:
            endpoint.breaker.probing = False  # a probe that made no call decides nothing
