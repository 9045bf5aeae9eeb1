"""The retry schedule: tenacity strategies, computed without sleeping."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from gateway.retry import THROTTLE_FLOOR_SECONDS, exhausted, next_delay
from gateway.settings import RetryPolicy

DEFAULT = RetryPolicy()


def test_defaults_start_at_ten_seconds_and_double_to_an_hour() -> None:
    policy = RetryPolicy(jitter=0)
    delays = [next_delay(policy, n) for n in range(1, 12)]
    assert delays[:4] == [10, 20, 40, 80]
    assert delays[-1] == 3600


@given(st.integers(1, 400), st.floats(0, 5))
def test_delays_are_monotone_and_capped_without_jitter(attempts: int, first: float) -> None:
    policy = RetryPolicy(first_delay=max(first, 0.01), jitter=0, cap=600)
    assert next_delay(policy, attempts) <= next_delay(policy, attempts + 1) <= 600


@given(st.integers(1, 50))
def test_jitter_stays_within_its_bound(attempts: int) -> None:
    base = next_delay(RetryPolicy(jitter=0), attempts)
    assert base <= next_delay(DEFAULT, attempts) <= base + DEFAULT.jitter


@given(st.floats(0, 100_000))
def test_retry_after_is_honoured_up_to_its_cap(retry_after: float) -> None:
    delay = next_delay(DEFAULT, 1, retry_after=retry_after)
    assert delay >= min(retry_after, DEFAULT.retry_after_cap)
    assert delay <= max(DEFAULT.retry_after_cap, DEFAULT.cap + DEFAULT.jitter)


def test_throttling_waits_at_least_a_minute() -> None:
    assert next_delay(DEFAULT, 1, status=429) >= THROTTLE_FLOOR_SECONDS
    assert next_delay(DEFAULT, 1, retry_after=5, status=503) >= THROTTLE_FLOOR_SECONDS


def test_exhausted_by_attempts_or_by_age() -> None:
    policy = RetryPolicy(max_attempts=3, max_age=3600)
    assert not exhausted(policy, 2, 10)
    assert exhausted(policy, 3, 10)
    assert exhausted(policy, 1, 3601)
