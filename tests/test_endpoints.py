"""Endpoint traffic control as pure logic: breaker transitions, limits, pause, opening hours."""

from __future__ import annotations

from datetime import UTC, datetime

from hypothesis import given
from hypothesis import strategies as st

from gateway.endpoints import Breaker, BreakerState, Endpoints
from gateway.settings import BreakerPolicy, EndpointPolicy

KEY = ("746", "sd-koersel")


def endpoints(**policy: object) -> Endpoints:
    return Endpoints({KEY: EndpointPolicy(**{"opening_hours": "always", **policy})}, {})


def test_breaker_opens_on_the_failure_share_then_probes_once() -> None:
    breaker = Breaker(
        BreakerPolicy(window_seconds=10, min_calls=4, failure_rate=0.5, open_seconds=5)
    )
    assert breaker.record(True, 0) is None and breaker.record(False, 1) is None
    assert breaker.record(True, 2) is None
    assert breaker.record(False, 3) is BreakerState.OPEN  # 2 of 4 failed
    assert breaker.allowance(4) == 0
    assert breaker.allowance(8.1) == 1  # half-open: one probe
    breaker.started(1)
    assert breaker.allowance(8.2) == 0
    assert breaker.record(False, 9) is BreakerState.OPEN  # the probe failed: open again
    assert breaker.allowance(14.5) == 1
    breaker.started(1)
    assert breaker.record(True, 15) is BreakerState.CLOSED
    assert breaker.allowance(15) is None


def test_old_calls_leave_the_window() -> None:
    breaker = Breaker(
        BreakerPolicy(window_seconds=10, min_calls=3, failure_rate=0.5, open_seconds=5)
    )
    breaker.record(False, 0)
    breaker.record(False, 1)
    assert breaker.record(True, 30) is None  # the two failures are outside the window


def test_max_in_flight_and_rate_limit() -> None:
    eps = endpoints(max_in_flight=3, rate_per_second=2)
    endpoint = eps.get(KEY)
    assert endpoint is not None
    assert endpoint.capacity(100.0) == 2  # the bucket holds at most one second of rate
    endpoint.started(2)
    assert endpoint.capacity(100.1) == 0
    assert endpoint.capacity(100.6) == 1  # refilled 0.5 s x 2/s = 1 token; 1 slot of 3 left
    eps.finished(KEY)
    eps.finished(KEY)
    assert endpoint.in_flight == 0


def test_pause_and_opening_hours_stop_claims() -> None:
    eps = endpoints()
    endpoint = eps.get(KEY)
    assert endpoint is not None and endpoint.capacity(0) == 8
    eps.set_paused({KEY: "SD maintenance"})
    assert endpoint.capacity(0) == 0 and endpoint.view(0)["pause_reason"] == "SD maintenance"
    eps.set_paused({})
    night = datetime(2026, 11, 30, 23, 0, tzinfo=UTC).timestamp()  # 00:00 in Copenhagen
    sd = Endpoints({KEY: EndpointPolicy()}, {"sd-koersel": "06:00-22:00"}).get(KEY)
    assert sd is not None and sd.capacity(night) == 0 and not sd.view(night)["open_now"]


def test_an_opening_shared_by_another_process_holds_back_then_probes() -> None:
    breaker = Breaker(
        BreakerPolicy(window_seconds=10, min_calls=4, failure_rate=0.5, open_seconds=5)
    )
    assert not breaker.open_until(10, now=10)  # already over
    assert breaker.open_until(20, now=12)
    assert breaker.allowance(19.9) == 0
    assert not breaker.open_until(18, now=13)  # an earlier end changes nothing
    assert breaker.allowance(20) == 1  # then one probe, as after an own opening
    breaker.started(1)
    assert not breaker.open_until(30, now=20)  # a running probe decides
    assert breaker.record(True, 21) is BreakerState.CLOSED


@given(st.lists(st.tuples(st.floats(0, 3), st.booleans()), max_size=60))
def test_the_breaker_opens_exactly_when_a_recount_of_its_window_says_so(
    steps: list[tuple[float, bool]],
) -> None:
    """The failure count kept as calls come and leave equals a recount of the window."""
    policy = BreakerPolicy(window_seconds=5, min_calls=4, failure_rate=0.5, open_seconds=1000)
    breaker, now, window = Breaker(policy), 0.0, []
    for gap, ok in steps:
        now += gap
        window = [(t, good) for t, good in [*window, (now, ok)] if t >= now - 5]
        failed = sum(not good for _, good in window)
        expected = len(window) >= 4 and failed / len(window) >= 0.5
        assert (breaker.record(ok, now) is BreakerState.OPEN) == expected
        if expected:
            return  # open: what follows is the probe's business
