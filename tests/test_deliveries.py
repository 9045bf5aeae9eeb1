"""The delivery state machine as a table: every (state, event) pair, legal or not, with a
built delivery and no I/O, the way tenacity tests its strategies."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway import deliveries
from gateway.deliveries import DONE, Delivery, Detail, Event, IllegalTransition, decide, is_at_risk
from gateway.retry import THROTTLE_FLOOR_SECONDS, next_delay
from gateway.settings import RetryPolicy
from gateway.store import FINAL, Status

NOW = 1_000_000.0
POLICY = RetryPolicy(
    first_delay=10, multiplier=2, cap=3600, jitter=0, max_attempts=5, max_age=86400
)

Q, IF, RS, H, ID, CR = (
    Status.QUEUED,
    Status.IN_FLIGHT,
    Status.RETRY_SCHEDULED,
    Status.HELD,
    Status.IN_DOUBT,
    Status.CORRECTION_REQUIRED,
)
DL, FL, NA, SU, CA = (
    Status.DELIVERED,
    Status.FAILED,
    Status.NOT_APPLICABLE,
    Status.SUPERSEDED,
    Status.CANCELLED,
)
ALL = (Q, IF, RS, H, ID, CR, DL, FL, NA, SU, CA)

# event → {from: to}; every pair not listed must raise IllegalTransition.
# The delivery: no attempts yet, claimed from queued, its vendor cannot be asked.
EXPECTED: dict[Event, dict[Status, Status]] = {
    Event.CLAIMED: {Q: IF, RS: IF},
    Event.ATTEMPT_STARTED: {IF: IF},
    Event.READ_BACK: {IF: IF},
    Event.READ_BACK_FAILED: {IF: RS},
    Event.DELIVERED: {IF: DL},
    Event.ALREADY_DELIVERED: {IF: DL},
    Event.WRITTEN: {s: DL for s in ALL if s not in (H, DL)},
    Event.REJECTED: {IF: FL},
    Event.INVALID_PAYLOAD: {IF: FL},
    Event.ERROR: {IF: FL},
    Event.TRANSIENT: {IF: RS},
    Event.IN_DOUBT: {IF: ID},
    Event.NOT_APPLICABLE: {IF: NA},
    Event.CORRECTION_REQUIRED: {IF: CR},
    Event.SUPERSEDED: {Q: SU, RS: SU, FL: SU},
    Event.LEASE_EXPIRED: {IF: Q},
    Event.AT_RISK: {s: s for s in (Q, IF, RS, ID, CR, FL)},
    Event.REPLAY: {ID: Q, FL: Q, CA: Q, RS: Q},
    Event.CANCEL: {Q: CA, RS: CA, ID: CA, CR: CA, FL: CA},
    Event.CHECK: {},
    Event.CONFIRM: {ID: DL},
}
# where the vendor can be asked (ReadsBack), only these differ
READS_BACK: dict[tuple[Status, Event], Status] = {
    (ID, Event.CLAIMED): IF,
    (ID, Event.REPLAY): ID,
    (ID, Event.CHECK): ID,
    (FL, Event.CHECK): ID,
    (RS, Event.CHECK): ID,
}
PAIRS = [(s, e) for s in ALL for e in Event]


def facts(status: Status, **more: object) -> Delivery:
    base = Delivery(status, attempts=0, retry_since=NOW, claimed_from=Q)
    return replace(base, **more)  # type: ignore[arg-type]


def test_the_table_names_every_event() -> None:
    assert set(EXPECTED) == set(Event)


@pytest.mark.parametrize(("status", "event"), PAIRS, ids=[f"{s}-{e}" for s, e in PAIRS])
def test_every_pair_moves_as_the_table_says(status: Status, event: Event) -> None:
    expected = EXPECTED[event].get(status)
    if expected is None:
        with pytest.raises(IllegalTransition, match=f"a {status} delivery cannot take {event}"):
            decide(facts(status), event, POLICY, NOW, Detail(error="why"))
        assert not deliveries.allowed(facts(status), event)
    else:
        assert decide(facts(status), event, POLICY, NOW, Detail(error="why")).status is expected
        assert deliveries.allowed(facts(status), event)


@pytest.mark.parametrize(("status", "event"), PAIRS, ids=[f"{s}-{e}" for s, e in PAIRS])
def test_every_pair_where_the_vendor_can_be_asked(status: Status, event: Event) -> None:
    expected = READS_BACK.get((status, event), EXPECTED[event].get(status))
    delivery = facts(status, reads_back=True)
    if expected is None:
        with pytest.raises(IllegalTransition):
            decide(delivery, event, POLICY, NOW, Detail(error="why"))
    else:
        assert decide(delivery, event, POLICY, NOW, Detail(error="why")).status is expected


def test_held_is_shown_never_decided_on() -> None:
    for event in Event:
        with pytest.raises(IllegalTransition, match="held is shown, not stored"):
            decide(facts(H), event, POLICY, NOW)
    assert deliveries.shown_status(Q, held=True) is H
    assert deliveries.shown_status(RS, held=True) is H
    assert deliveries.shown_status(Q, held=False) is Q
    assert all(deliveries.shown_status(s, held=True) is s for s in ALL if s not in (Q, RS))


def test_check_says_why_when_the_vendor_cannot_be_asked() -> None:
    with pytest.raises(IllegalTransition, match="only a vendor that can be asked"):
        decide(facts(ID), Event.CHECK, POLICY, NOW)


# -- properties over every pair and many deliveries ---------------------------------------

deliveries_st = st.builds(
    Delivery,
    status=st.sampled_from(ALL),
    attempts=st.integers(0, 10),
    retry_since=st.floats(NOW - 200_000, NOW),
    claimed_from=st.sampled_from((Q, RS, ID)),
    reads_back=st.booleans(),
    cutoff_at=st.none() | st.floats(NOW - 1000, NOW + 100_000),
    next_attempt_at=st.none() | st.floats(NOW - 1000, NOW + 100_000),
    at_risk=st.booleans(),
)
details_st = st.builds(
    Detail,
    error=st.text(max_size=5),
    retry_after=st.none() | st.floats(0, 10_000),
    http_status=st.sampled_from((None, 500, 503, 429)),
    sent=st.booleans(),
    open_attempt=st.booleans(),
    by_version=st.integers(2, 9),
)


def _legal(delivery: Delivery, event: Event, detail: Detail) -> deliveries.Decision | None:
    try:
        return decide(delivery, event, POLICY, NOW, detail)
    except IllegalTransition:
        return None


@given(deliveries_st, st.sampled_from(list(Event)), details_st)
def test_final_states_only_leave_by_operator_replay(
    delivery: Delivery, event: Event, detail: Detail
) -> None:
    decision = _legal(delivery, event, detail)
    if decision is not None and delivery.status in FINAL and decision.status is not delivery.status:
        # WRITTEN is not a decision but a fact: the lines are in the vendor's file. A failed
        # delivery waits for an operator (any action), or a newer version replaces it (FL -> SU)
        operator = (Event.REPLAY, Event.CANCEL, Event.CHECK, Event.SUPERSEDED)
        assert event in (Event.REPLAY, Event.WRITTEN) or (
            delivery.status is FL and event in operator
        )


@given(deliveries_st, st.sampled_from(list(Event)), details_st)
def test_at_risk_is_cleared_whenever_a_delivery_is_done(
    delivery: Delivery, event: Event, detail: Detail
) -> None:
    decision = _legal(delivery, event, detail)
    if decision is not None and decision.status in DONE:
        assert decision.at_risk is False


@given(deliveries_st, st.sampled_from(list(Event)), details_st)
def test_decisions_are_pure(delivery: Delivery, event: Event, detail: Detail) -> None:
    assert _legal(delivery, event, detail) == _legal(delivery, event, detail)


@given(deliveries_st, details_st)
def test_only_a_request_that_left_counts_as_an_attempt(delivery: Delivery, detail: Detail) -> None:
    for event in (
        Event.INVALID_PAYLOAD,
        Event.ERROR,
        Event.NOT_APPLICABLE,
        Event.ALREADY_DELIVERED,
        Event.CORRECTION_REQUIRED,
        Event.SUPERSEDED,
        Event.REPLAY,
        Event.CANCEL,
        Event.CONFIRM,
    ):
        decision = _legal(delivery, event, detail)
        assert decision is None or not decision.count_attempt
    rejected = _legal(delivery, Event.REJECTED, detail)
    assert rejected is None or rejected.count_attempt is detail.sent


# -- what is recorded ----------------------------------------------------------------------

FLIGHT = facts(IF, attempts=1, retry_since=NOW - 100)


@pytest.mark.parametrize(
    ("event", "detail", "status", "next_at", "error", "counted", "outcome"),
    [
        (
            Event.TRANSIENT,
            Detail(error="503"),
            RS,
            NOW + next_delay(POLICY, 2),
            "503",
            True,
            "retry",
        ),
        (
            Event.TRANSIENT,
            Detail(error="slow", retry_after=500),
            RS,
            NOW + 500,
            "slow",
            True,
            "retry",
        ),
        (
            Event.TRANSIENT,
            Detail(error="busy", http_status=503),
            RS,
            NOW + THROTTLE_FLOOR_SECONDS,
            "busy",
            True,
            "retry",
        ),
        (
            Event.IN_DOUBT,
            Detail(error="read timeout"),
            ID,
            NOW + next_delay(POLICY, 2),
            "read timeout",
            True,
            "in_doubt",
        ),
        (
            Event.REJECTED,
            Detail(error="no such employment"),
            FL,
            None,
            "no such employment",
            True,
            "failed",
        ),
        (
            Event.REJECTED,
            Detail(error="refused a read", sent=False),
            FL,
            None,
            "refused a read",
            False,
            "failed",
        ),
        (
            Event.INVALID_PAYLOAD,
            Detail(error="bad"),
            FL,
            None,
            "payload failed the vendor schema check, not sent: bad",
            False,
            None,
        ),
        (Event.ERROR, Detail(error="unreadable"), FL, None, "unreadable", False, None),
        (Event.NOT_APPLICABLE, Detail(error="zero km"), NA, None, "zero km", False, None),
        (Event.CORRECTION_REQUIRED, Detail(error="no edit"), CR, None, "no edit", False, None),
        (
            Event.DELIVERED,
            Detail(vendor_reference="ref", warning="w"),
            DL,
            None,
            None,
            True,
            "delivered",
        ),
        (Event.ALREADY_DELIVERED, Detail(vendor_reference="ref"), DL, None, None, False, None),
    ],
    ids=lambda v: str(v) if isinstance(v, (Event, Status)) else None,
)
def test_what_each_outcome_records(
    event: Event,
    detail: Detail,
    status: Status,
    next_at: float | None,
    error: str | None,
    counted: bool,
    outcome: str | None,
) -> None:
    decision = decide(FLIGHT, event, POLICY, NOW, detail)
    assert (
        decision.status,
        decision.next_attempt_at,
        decision.last_error,
        decision.count_attempt,
        decision.attempt_outcome,
    ) == (status, next_at, error, counted, outcome)
    assert decision.audit == f"delivery.{status}"


def test_a_vendor_answer_keeps_its_reference_and_warning() -> None:
    decision = decide(
        FLIGHT, Event.DELIVERED, POLICY, NOW, Detail(vendor_reference="SD-1", warning="late")
    )
    assert (decision.vendor_reference, decision.warning, decision.at_risk) == (
        "SD-1",
        "late",
        False,
    )
    assert decision.settle().vendor_reference == "SD-1" and decision.settle().at_risk is False


@pytest.mark.parametrize(
    ("attempts", "retry_since", "exhausted"),
    [
        (3, NOW, False),  # the 4th attempt failed: a 5th is allowed
        (4, NOW, True),  # the 5th failed: max_attempts = 5
        (0, NOW - 86_400, True),  # the next attempt would be older than max_age
        (0, NOW - 86_000, False),
    ],
)
def test_retry_exhaustion_fails_with_the_reason(
    attempts: int, retry_since: float, exhausted: bool
) -> None:
    delivery = facts(IF, attempts=attempts, retry_since=retry_since)
    decision = decide(delivery, Event.TRANSIENT, POLICY, NOW, Detail(error="connect refused"))
    if exhausted:
        assert decision.status is FL and decision.next_attempt_at is None and decision.count_attempt
        assert (
            decision.last_error
            == f"retry policy exhausted after {attempts + 1} attempts: connect refused"
        )
    else:
        assert decision.status is RS and decision.last_error == "connect refused"


def test_a_read_back_that_fails_keeps_an_in_doubt_delivery_in_doubt() -> None:
    delivery = facts(IF, claimed_from=ID, reads_back=True, attempts=2)
    decision = decide(delivery, Event.READ_BACK_FAILED, POLICY, NOW, Detail(error="timeout"))
    assert (decision.status, decision.next_attempt_at, decision.count_attempt) == (
        ID,
        NOW + 40,
        False,
    )
    assert decision.last_error == "read-back failed, still in doubt: timeout"


@pytest.mark.parametrize(
    ("attempts", "open_attempt", "status", "counted", "error"),
    [
        (0, False, Q, False, "earlier error"),
        (2, False, RS, False, "earlier error"),
        (
            2,
            True,
            ID,
            True,
            "the gateway stopped while a request may have been on its way to the vendor",
        ),
    ],
)
def test_an_expired_lease_is_reclaimed(
    attempts: int, open_attempt: bool, status: Status, counted: bool, error: str
) -> None:
    delivery = facts(IF, attempts=attempts, last_error="earlier error")
    decision = decide(delivery, Event.LEASE_EXPIRED, POLICY, NOW, Detail(open_attempt=open_attempt))
    assert (
        decision.status,
        decision.count_attempt,
        decision.last_error,
        decision.next_attempt_at,
    ) == (status, counted, error, NOW)


@pytest.mark.parametrize(
    ("event", "status", "fresh", "next_at"),
    [
        (Event.REPLAY, FL, True, NOW),
        (Event.CANCEL, FL, False, None),
        (Event.CONFIRM, ID, False, None),
    ],
)
def test_operator_actions_are_noted_with_who_and_why(
    event: Event, status: Status, fresh: bool, next_at: float | None
) -> None:
    detail = Detail(error="checked at SD", actor="ops", vendor_reference="SD-9")
    decision = decide(facts(status, at_risk=True), event, POLICY, NOW, detail)
    assert decision.last_error == f"{event} by ops: checked at SD"
    assert decision.audit == f"delivery.{event}"
    assert dict(decision.detail) == {
        "from": str(status),
        "to": str(decision.status),
        "reason": "checked at SD",
    }
    assert (decision.fresh_budget, decision.next_attempt_at) == (fresh, next_at)
    assert decision.at_risk is (False if decision.status in DONE else None)


def test_a_superseded_delivery_names_the_newer_version() -> None:
    decision = decide(facts(FL, at_risk=True), Event.SUPERSEDED, POLICY, NOW, Detail(by_version=3))
    assert (decision.status, decision.last_error, decision.at_risk) == (
        SU,
        "superseded by version 3",
        False,
    )
    assert dict(decision.detail) == {"by_version": 3}


@pytest.mark.parametrize(("version", "latest", "status"), [(1, 1, Q), (2, 1, Q), (1, 2, SU)])
def test_a_new_delivery_starts_queued_unless_a_newer_version_is_stored(
    version: int, latest: int, status: Status
) -> None:
    assert deliveries.initial_status(version, latest) is status


MARGIN = 3600.0


@pytest.mark.parametrize(
    ("status", "cutoff", "next_at", "flagged", "at_risk"),
    [
        (Q, None, NOW, False, False),  # no payroll run to miss
        (Q, NOW + 10_000, NOW, False, False),  # in time
        (RS, NOW + 10_000, NOW + 20_000, True, False),  # its next attempt is after the cut-off
        (Q, NOW, NOW, True, False),  # the cut-off has passed
        (ID, NOW + 100, NOW, True, False),  # waits for an operator, cut-off within the margin
        (FL, NOW + 100, None, True, False),
        (CR, NOW + MARGIN + 1, NOW, False, False),
        (Q, NOW + 100, NOW, False, False),  # it will be tried before then
        (DL, NOW - 1, NOW, False, False),  # done
        (CA, NOW - 1, NOW, False, False),
        (Q, NOW - 1, NOW, False, True),  # already flagged
    ],
)
def test_at_risk_near_the_cutoff(
    status: Status, cutoff: float | None, next_at: float | None, flagged: bool, at_risk: bool
) -> None:
    delivery = facts(status, cutoff_at=cutoff, next_attempt_at=next_at, at_risk=at_risk)
    assert is_at_risk(delivery, NOW, MARGIN) is flagged
    if flagged:
        decision = decide(delivery, Event.AT_RISK, POLICY, NOW)
        assert (decision.status, decision.at_risk, decision.changes_state) == (status, True, False)
        assert dict(decision.detail) == {"cutoff_at": cutoff}


def test_lanes_are_blocked_by_undone_earlier_deliveries() -> None:
    assert {s for s in ALL if deliveries.blocks_lane(s)} == {Q, IF, RS, ID, FL}
