"""The delivery state machine: which state a delivery moves to, and what to record, as a pure
function of (state, event, policy, now).

The dispatcher, the file runner, the operator actions and the store all ask :func:`decide`;
the store only persists the :class:`Decision` it returns. No I/O and no clock here.

``held`` is never stored and never decided on: it is how a ``queued`` or
``retry_scheduled`` delivery is *shown* while an earlier one of the same employee blocks
its lane (:func:`shown_status`). Events are decided on the stored state, so every event
on ``held`` is an :class:`IllegalTransition`.

``failed`` is final until an operator replays it, but it is not *done*: it still needs an
operator before the payroll cut-off, so entering it leaves the ``at_risk`` flag as it is
(and the at-risk watch may flag it). Entering a :data:`DONE` state always clears the flag.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from . import retry
from .settings import RetryPolicy
from .store import BLOCKING, FINAL, Settle, Status


class Event(enum.StrEnum):
    """What happened to a delivery."""

    CLAIMED = "claimed"  # a dispatcher or file run took it under a lease
    ATTEMPT_STARTED = "attempt_started"  # a request is about to leave (recorded before sending)
    READ_BACK = "read_back"  # the vendor said what it holds; the plan is made against that
    READ_BACK_FAILED = "read_back_failed"  # the vendor could not be asked
    DELIVERED = "delivered"  # the vendor accepted the last message (perhaps with a warning)
    ALREADY_DELIVERED = "already_delivered"  # the plan has nothing left to send
    WRITTEN = "written"  # its lines are in the vendor's file (a file run, or its recovery)
    REJECTED = "rejected"  # the vendor refused it: permanent
    INVALID_PAYLOAD = "invalid_payload"  # the payload fails the vendor schema: never sent
    ERROR = "error"  # the gateway cannot deliver it as it is (unreadable, adapter error)
    TRANSIENT = "transient"  # failed before the request left: retry (unless the policy ran out)
    IN_DOUBT = "in_doubt"  # failed after the request may have left: never resent blindly
    NOT_APPLICABLE = "not_applicable"  # the adapter has nothing to send for it
    CORRECTION_REQUIRED = "correction_required"  # the vendor cannot edit what it holds
    SUPERSEDED = "superseded"  # a newer version of the report arrived
    LEASE_EXPIRED = "lease_expired"  # its claimer went away: reclaim it
    AT_RISK = "at_risk"  # it will miss its payroll cut-off (see :func:`is_at_risk`)
    REPLAY = "replay"  # operator: try again, with a fresh retry budget
    CANCEL = "cancel"  # operator: never send it
    CHECK = "check"  # operator: ask the vendor what it holds (read-back vendors only)
    CONFIRM = "confirm"  # operator: the in-doubt sends are at the vendor


#: states that need nothing more from anyone: entering one clears ``at_risk``
DONE = FINAL - {Status.FAILED}
#: states that are stored (``held`` is only shown)
STORED = frozenset(Status) - {Status.HELD}
#: states the at-risk watch looks at
WATCHED = STORED - DONE
#: states in which a delivery waits for an operator, for the at-risk margin
NEEDS_OPERATOR = frozenset({Status.IN_DOUBT, Status.CORRECTION_REQUIRED, Status.FAILED})
#: operator actions, by the name the API and the CLI use
ACTIONS = MappingProxyType(
    {
        "replay": Event.REPLAY,
        "cancel": Event.CANCEL,
        "check": Event.CHECK,
        "confirm": Event.CONFIRM,
    }
)


class IllegalTransition(Exception):
    """The event cannot happen to a delivery in this state ("not in a state for it")."""

    def __init__(self, status: Status, event: Event, why: str = "") -> None:
        self.status, self.event = status, event
        text = f"a {status} delivery cannot take {event}"
        super().__init__(f"{text}: {why}" if why else text)


@dataclass(frozen=True, slots=True)
class Delivery:
    """The facts about one delivery the rules look at."""

    status: Status
    attempts: int = 0  # attempts counted so far
    retry_since: float = 0.0  # when the current retry budget started
    claimed_from: Status | None = None  # while in_flight: the state it was claimed in
    reads_back: bool = False  # its vendor can be asked what it holds
    cutoff_at: float | None = None
    next_attempt_at: float | None = None
    at_risk: bool = False
    last_error: str | None = None


@dataclass(frozen=True, slots=True)
class Detail:
    """What came with the event."""

    error: str | None = None  # the error or reason, already CPR-masked
    retry_after: float | None = None  # a vendor's Retry-After, in seconds
    http_status: int | None = None
    vendor_reference: str | None = None
    warning: str | None = None
    sent: bool = True  # whether a request went out (a refusal of a read or plan is not counted)
    actor: str = "gateway"
    by_version: int | None = None  # SUPERSEDED: the newer version
    open_attempt: bool = False  # LEASE_EXPIRED: an attempt started and never finished


NO_DETAIL = Detail()


@dataclass(frozen=True, slots=True)
class Decision:
    """The new state and what to record. ``None`` fields leave the stored value as it is."""

    status: Status
    audit: str  # the audit event name
    detail: Mapping[str, Any] = field(default_factory=dict)  # the audit detail (no CPR)
    next_attempt_at: float | None = None
    last_error: str | None = None  # replaces the stored one (None clears it)
    vendor_reference: str | None = None
    warning: str | None = None
    count_attempt: bool = False
    fresh_budget: bool = False  # attempts = 0 and the retry budget starts at ``next_attempt_at``
    at_risk: bool | None = None
    attempt_outcome: str | None = None  # how the attempt that ended with this event is recorded
    changes_state: bool = True  # False: nothing about the delivery row changes but the audit

    def settle(self) -> Settle:
        """The part of the decision the store's ``settle`` and ``end_attempt`` persist."""
        return Settle(
            self.status,
            next_attempt_at=self.next_attempt_at,
            last_error=self.last_error,
            vendor_reference=self.vendor_reference,
            warning=self.warning,
            count_attempt=self.count_attempt,
            at_risk=self.at_risk,
        )


Rule = Callable[[Delivery, Detail, RetryPolicy, float], Decision]


def decide(
    delivery: Delivery,
    event: Event,
    policy: RetryPolicy | None,
    now: float,
    detail: Detail = NO_DETAIL,
) -> Decision:
    """The decision for ``event`` happening to ``delivery`` at ``now``; raises IllegalTransition."""
    sources, rule = _RULES[event]
    if delivery.status not in sources:
        why = (
            "held is shown, not stored: decide on the stored state"
            if delivery.status is Status.HELD
            else ""
        )
        raise IllegalTransition(delivery.status, event, why)
    guard = _GUARDS.get(event)
    refusal = guard(delivery) if guard else None
    if refusal:
        raise IllegalTransition(delivery.status, event, refusal)
    return _unflag(rule(delivery, detail, policy or RetryPolicy(), now))


def allowed(delivery: Delivery, event: Event) -> bool:
    """Whether ``event`` may happen to ``delivery`` (no decision is made)."""
    try:
        decide(delivery, event, None, 0.0)
    except IllegalTransition:
        return False
    return True


def initial_status(version: int, latest: int) -> Status:
    """A new delivery waits for its first attempt, unless a newer version is already stored."""
    return Status.QUEUED if version >= latest else Status.SUPERSEDED


def shown_status(status: Status, held: bool) -> Status:
    """The state to show: ``held`` when a waiting delivery's lane is blocked."""
    return Status.HELD if held and status in _WAITING else status


def blocks_lane(status: Status) -> bool:
    """Whether an earlier delivery in this state holds back later ones of the same employee."""
    return status in BLOCKING


def lane_head(
    candidates: Iterable[tuple[int, str, float]],
) -> tuple[int, Status, float] | None:
    """The head of an employee lane: of its deliveries ``(id, status, due time)``, the first
    (lowest id) that holds back the later ones; ``None`` when nothing blocks the lane.

    Only the head of a lane may be claimed (in lane order), and only while it waits
    (:func:`claimable`): the stores keep one row per lane with its head, indexed by due time.
    """
    blocking = [(i, Status(s), due) for i, s, due in candidates if blocks_lane(Status(s))]
    return min(blocking, key=lambda c: c[0], default=None)


def claimable(reads_back: bool) -> frozenset[Status]:
    """The stored states from which a delivery of an adapter that (does not) read back can
    be claimed: the ones :data:`Event.CLAIMED` is allowed in."""
    return frozenset(
        s for s in STORED if allowed(Delivery(s, reads_back=reads_back), Event.CLAIMED)
    )


def is_at_risk(delivery: Delivery, now: float, margin: float) -> bool:
    """It will not be delivered before its cut-off unless something changes.

    Its next attempt is after the cut-off; or the cut-off has passed; or it waits for an
    operator and the cut-off is less than ``margin`` seconds away.
    """
    cutoff = delivery.cutoff_at
    if cutoff is None or delivery.at_risk or delivery.status not in WATCHED:
        return False
    if delivery.next_attempt_at is not None and delivery.next_attempt_at > cutoff:
        return True
    return cutoff <= now or (delivery.status in NEEDS_OPERATOR and cutoff - now < margin)


# -- the rules ---------------------------------------------------------------------------

_WAITING = frozenset({Status.QUEUED, Status.RETRY_SCHEDULED})
_IN_FLIGHT = frozenset({Status.IN_FLIGHT})


def _unflag(decision: Decision) -> Decision:
    """A delivery that will not be sent any more is no longer at risk of missing payroll."""
    if decision.status in DONE and decision.at_risk is not False:
        return _replace(decision, at_risk=False)
    return decision


def _replace(decision: Decision, **changes: Any) -> Decision:
    values = {name: getattr(decision, name) for name in Decision.__dataclass_fields__}
    return Decision(**{**values, **changes})


def _settled(status: Status, detail: Detail, **more: Any) -> Decision:
    return Decision(status, f"delivery.{status}", last_error=detail.error, **more)


def _claimed(d: Delivery, detail: Detail, policy: RetryPolicy, now: float) -> Decision:
    return Decision(Status.IN_FLIGHT, "delivery.claimed", {"from": str(d.status)})


def _unchanged(audit: str) -> Rule:
    def rule(d: Delivery, detail: Detail, policy: RetryPolicy, now: float) -> Decision:
        return Decision(d.status, audit, changes_state=False)

    return rule


def _delivered(d: Delivery, detail: Detail, policy: RetryPolicy, now: float) -> Decision:
    return _settled(
        Status.DELIVERED,
        Detail(),
        vendor_reference=detail.vendor_reference,
        warning=detail.warning,
        count_attempt=True,
        attempt_outcome="delivered",
    )


def _already_delivered(d: Delivery, detail: Detail, policy: RetryPolicy, now: float) -> Decision:
    return _settled(Status.DELIVERED, Detail(), vendor_reference=detail.vendor_reference)


def _rejected(d: Delivery, detail: Detail, policy: RetryPolicy, now: float) -> Decision:
    return _settled(Status.FAILED, detail, count_attempt=detail.sent, attempt_outcome="failed")


def _invalid(d: Delivery, detail: Detail, policy: RetryPolicy, now: float) -> Decision:
    error = f"payload failed the vendor schema check, not sent: {detail.error}"
    return _settled(Status.FAILED, Detail(error=error))


def _error(d: Delivery, detail: Detail, policy: RetryPolicy, now: float) -> Decision:
    return _settled(Status.FAILED, detail)


def _transient(d: Delivery, detail: Detail, policy: RetryPolicy, now: float) -> Decision:
    attempts = d.attempts + 1
    delay = retry.next_delay(policy, attempts, detail.retry_after, detail.http_status)
    if retry.exhausted(policy, attempts, now + delay - d.retry_since):
        error = f"retry policy exhausted after {attempts} attempts: {detail.error}"
        return _settled(
            Status.FAILED, Detail(error=error), count_attempt=True, attempt_outcome="failed"
        )
    return _settled(
        Status.RETRY_SCHEDULED,
        detail,
        next_attempt_at=now + delay,
        count_attempt=True,
        attempt_outcome="retry",
    )


def _in_doubt(d: Delivery, detail: Detail, policy: RetryPolicy, now: float) -> Decision:
    delay = retry.next_delay(policy, d.attempts + 1)
    return _settled(
        Status.IN_DOUBT,
        detail,
        next_attempt_at=now + delay,
        count_attempt=True,
        attempt_outcome="in_doubt",
    )


def _read_back_failed(d: Delivery, detail: Detail, policy: RetryPolicy, now: float) -> Decision:
    """An in-doubt delivery stays in doubt until the vendor could be asked; a read before a
    plan that did not get an answer is just "try later" (a read changes nothing there)."""
    if d.claimed_from is not Status.IN_DOUBT:
        return _transient(d, detail, policy, now)
    delay = retry.next_delay(policy, d.attempts + 1)
    error = f"read-back failed, still in doubt: {detail.error}"
    return _settled(Status.IN_DOUBT, Detail(error=error), next_attempt_at=now + delay)


def _plan_said(status: Status) -> Rule:
    def rule(d: Delivery, detail: Detail, policy: RetryPolicy, now: float) -> Decision:
        return _settled(status, detail)

    return rule


def _written(d: Delivery, detail: Detail, policy: RetryPolicy, now: float) -> Decision:
    return _settled(
        Status.DELIVERED, Detail(), vendor_reference=detail.vendor_reference, count_attempt=True
    )


def _superseded(d: Delivery, detail: Detail, policy: RetryPolicy, now: float) -> Decision:
    return Decision(
        Status.SUPERSEDED,
        "delivery.superseded",
        {"by_version": detail.by_version},
        last_error=f"superseded by version {detail.by_version}",
    )


def _lease_expired(d: Delivery, detail: Detail, policy: RetryPolicy, now: float) -> Decision:
    """An attempt that started and never finished may have reached the vendor: in doubt."""
    if detail.open_attempt:
        reason = "the gateway stopped while a request may have been on its way to the vendor"
        return Decision(
            Status.IN_DOUBT,
            "delivery.in_doubt",
            {"reason": reason},
            next_attempt_at=now,
            last_error=reason,
            count_attempt=True,
            attempt_outcome="in_doubt",
        )
    status = Status.RETRY_SCHEDULED if d.attempts else Status.QUEUED
    return Decision(
        status,
        "delivery.reclaimed",
        {"status": str(status)},
        next_attempt_at=now,
        last_error=d.last_error,
    )


def _at_risk(d: Delivery, detail: Detail, policy: RetryPolicy, now: float) -> Decision:
    return Decision(
        d.status, "delivery.at_risk", {"cutoff_at": d.cutoff_at}, at_risk=True, changes_state=False
    )


def _operator(event: Event, to: Callable[[Delivery], Status]) -> Rule:
    def rule(d: Delivery, detail: Detail, policy: RetryPolicy, now: float) -> Decision:
        new = to(d)
        audit = {"from": str(d.status), "to": str(new), "reason": detail.error}
        note = f"{event} by {detail.actor}: {detail.error}"
        if event is Event.CANCEL:
            return Decision(new, f"delivery.{event}", audit, last_error=note)
        if event is Event.CONFIRM:
            return Decision(
                new,
                f"delivery.{event}",
                audit,
                last_error=note,
                vendor_reference=detail.vendor_reference,
            )
        # replay or check: due now, with a fresh retry budget
        return Decision(
            new, f"delivery.{event}", audit, next_attempt_at=now, last_error=note, fresh_budget=True
        )

    return rule


def _replayed(d: Delivery) -> Status:
    # a vendor that can be asked is asked first; elsewhere the operator checked by hand
    return Status.IN_DOUBT if d.status is Status.IN_DOUBT and d.reads_back else Status.QUEUED


def _needs_read_back(d: Delivery) -> str | None:
    return None if d.reads_back else "only a vendor that can be asked can be checked"


def _claimable(d: Delivery) -> str | None:
    if d.status is Status.IN_DOUBT and not d.reads_back:
        return "an in-doubt delivery is only claimed to ask a vendor that can be asked"
    return None


_RULES: dict[Event, tuple[frozenset[Status], Rule]] = {
    Event.CLAIMED: (_WAITING | {Status.IN_DOUBT}, _claimed),
    Event.ATTEMPT_STARTED: (_IN_FLIGHT, _unchanged("attempt.started")),
    Event.READ_BACK: (_IN_FLIGHT, _unchanged("delivery.read_back")),
    Event.READ_BACK_FAILED: (_IN_FLIGHT, _read_back_failed),
    Event.DELIVERED: (_IN_FLIGHT, _delivered),
    Event.ALREADY_DELIVERED: (_IN_FLIGHT, _already_delivered),
    # the lines are in the file whatever the row says (a crash may have reclaimed it first)
    Event.WRITTEN: (STORED - {Status.DELIVERED}, _written),
    Event.REJECTED: (_IN_FLIGHT, _rejected),
    Event.INVALID_PAYLOAD: (_IN_FLIGHT, _invalid),
    Event.ERROR: (_IN_FLIGHT, _error),
    Event.TRANSIENT: (_IN_FLIGHT, _transient),
    Event.IN_DOUBT: (_IN_FLIGHT, _in_doubt),
    Event.NOT_APPLICABLE: (_IN_FLIGHT, _plan_said(Status.NOT_APPLICABLE)),
    Event.CORRECTION_REQUIRED: (_IN_FLIGHT, _plan_said(Status.CORRECTION_REQUIRED)),
    # in_flight and in_doubt ones may have reached the vendor: they finish or are reconciled
    Event.SUPERSEDED: (_WAITING | {Status.FAILED}, _superseded),
    Event.LEASE_EXPIRED: (_IN_FLIGHT, _lease_expired),
    Event.AT_RISK: (WATCHED, _at_risk),
    Event.REPLAY: (
        frozenset({Status.IN_DOUBT, Status.FAILED, Status.CANCELLED, Status.RETRY_SCHEDULED}),
        _operator(Event.REPLAY, _replayed),
    ),
    Event.CANCEL: (
        frozenset(
            {
                Status.QUEUED,
                Status.RETRY_SCHEDULED,
                Status.IN_DOUBT,
                Status.CORRECTION_REQUIRED,
                Status.FAILED,
            }
        ),
        _operator(Event.CANCEL, lambda d: Status.CANCELLED),
    ),
    Event.CHECK: (
        frozenset({Status.IN_DOUBT, Status.FAILED, Status.RETRY_SCHEDULED}),
        _operator(Event.CHECK, lambda d: Status.IN_DOUBT),
    ),
    Event.CONFIRM: (
        frozenset({Status.IN_DOUBT}),
        _operator(Event.CONFIRM, lambda d: Status.DELIVERED),
    ),
}
_GUARDS: dict[Event, Callable[[Delivery], str | None]] = {
    Event.CHECK: _needs_read_back,
    Event.CLAIMED: _claimable,
}
assert set(_RULES) == set(Event)


__all__ = [
    "ACTIONS",
    "DONE",
    "Decision",
    "Delivery",
    "Detail",
    "Event",
    "IllegalTransition",
    "NEEDS_OPERATOR",
    "STORED",
    "WATCHED",
    "allowed",
    "blocks_lane",
    "claimable",
    "decide",
    "initial_status",
    "is_at_risk",
    "lane_head",
    "shown_status",
]
