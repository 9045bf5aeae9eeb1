"""When to try again: tenacity's wait/stop strategies, computed without sleeping.

The schedule is persisted in the store (``attempts``, ``next_attempt_at``); nothing here
waits. ``attempts`` counts attempts already made, including the one that just failed.
"""

from __future__ import annotations

from tenacity import AsyncRetrying, RetryCallState, stop_after_attempt, wait_exponential_jitter

from .settings import RetryPolicy

#: 429 and 503 mean "not now": never come back sooner than this
THROTTLE_FLOOR_SECONDS = 60.0


def _state(policy: RetryPolicy, attempts: int) -> tuple[RetryCallState, wait_exponential_jitter]:
    wait = wait_exponential_jitter(
        multiplier=policy.first_delay,
        exp_base=policy.multiplier,
        max=policy.cap,
        jitter=policy.jitter,
    )
    state = RetryCallState(retry_object=AsyncRetrying(wait=wait), fn=None, args=(), kwargs={})
    state.attempt_number = max(1, attempts)
    return state, wait


def next_delay(
    policy: RetryPolicy, attempts: int, retry_after: float | None = None, status: int | None = None
) -> float:
    """Seconds until the next attempt after ``attempts`` failed ones."""
    state, wait = _state(policy, attempts)
    delay = min(float(wait(state)), policy.cap + policy.jitter)
    if retry_after is not None:
        delay = max(delay, min(retry_after, policy.retry_after_cap))
    if status in (429, 503):
        delay = max(delay, THROTTLE_FLOOR_SECONDS)
    return delay


def exhausted(policy: RetryPolicy, attempts: int, age_at_next: float) -> bool:
    """True when no further attempt is allowed (by count, or by the age it would have)."""
    state, _ = _state(policy, attempts)
    return bool(stop_after_attempt(policy.max_attempts)(state)) or age_at_next > policy.max_age
