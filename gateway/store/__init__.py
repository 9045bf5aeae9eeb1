"""The store: reports, versions, deliveries, parts, attempts and the audit trail.

One interface (:class:`Store`), engines behind it chosen by URL. Nothing engine-specific
leaves this package: callers see the records below and the methods of ``Store``.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from adapters.base import DeliveredPart, Message

if TYPE_CHECKING:
    from ..privacy import DataKeys
    from .alerting import AlertPlan, SendOutcome


class Status(enum.StrEnum):
    """Delivery states (DESIGN.md §6, contract)."""

    QUEUED = "queued"
    IN_FLIGHT = "in_flight"
    RETRY_SCHEDULED = "retry_scheduled"
    HELD = "held"
    IN_DOUBT = "in_doubt"
    CORRECTION_REQUIRED = "correction_required"
    DELIVERED = "delivered"
    FAILED = "failed"
    NOT_APPLICABLE = "not_applicable"
    SUPERSEDED = "superseded"
    CANCELLED = "cancelled"


FINAL = frozenset(
    {Status.DELIVERED, Status.FAILED, Status.NOT_APPLICABLE, Status.SUPERSEDED, Status.CANCELLED}
)
#: states of an earlier delivery that hold back later ones of the same employee
BLOCKING = frozenset(
    {Status.QUEUED, Status.IN_FLIGHT, Status.RETRY_SCHEDULED, Status.IN_DOUBT, Status.FAILED}
)
#: states in which a delivery will not move soon by itself: an answer can be given
SETTLED = FINAL | {Status.CORRECTION_REQUIRED}
#: states an operator must act on (they never move by themselves)
WAITING_FOR_OPERATOR = frozenset({Status.IN_DOUBT, Status.CORRECTION_REQUIRED})


class ConflictingReport(Exception):
    """Same (municipality, report_id, version) as stored, different content."""

    def __init__(self, indexes: Sequence[int]) -> None:
        super().__init__(f"conflicting content at {list(indexes)}")
        self.indexes = tuple(indexes)


class StoreError(Exception):
    """The store could not do what was asked (connection lost, disk full, commit failed)."""


class LeaseLost(StoreError):
    """The caller no longer holds the delivery's lease (it expired, or another claimer took
    it): the caller must not send anything for it."""


@dataclass(frozen=True, slots=True)
class NewReport:
    """One validated, normalised report version as intake hands it to the store."""

    municipality: str
    report_id: str
    version: int
    kind: str
    employee_key: str  # employment id: the ordering lane, never the CPR
    body: Mapping[str, Any]  # canonical JSON without CPR numbers
    employee_cpr: str = field(repr=False)
    approved_by_cpr: str | None = field(repr=False)
    content_hash: str
    adapter: str | None  # the routed adapter, None when the tenant has no route for the kind
    cutoff_at: float | None = None  # the payroll run's cut-off this delivery targets
    period: str | None = None  # "YYYY-MM" of the report's own date (drive_date, start_date)
    request_id: str | None = None  # the sender's X-Request-ID (or one made per pull)


@dataclass(frozen=True, slots=True)
class Submitted:
    id: int
    municipality: str
    report_id: str
    version: int
    status: str
    created: bool  # False when it was already stored with the same content


@dataclass(frozen=True, slots=True)
class PulledRecord:
    """One record a pull source fetched: a validated report, or the reasons it is not one."""

    record_id: str  # the source's id as text (CPR-masked)
    record_hash: str  # SHA-256 of the record as received: a changed record is a new one
    report: NewReport | None  # None when the record is invalid
    errors: tuple[tuple[str, str], ...] = ()  # (pointer, message) in the source's own key names


class PullOutcome(enum.StrEnum):
    """What the store made of a pulled record; only CREATED and DUPLICATE may be acknowledged."""

    CREATED = "created"
    DUPLICATE = "duplicate"  # stored before with the same content (an acknowledgement was lost)
    CONFLICT = "conflict"  # stored before with other content: recorded as a rejection
    INVALID = "invalid"  # recorded as a rejection


@dataclass(frozen=True, slots=True)
class Job:
    """A claimed delivery with everything the dispatcher needs to run it."""

    delivery_id: int
    report_pk: int
    municipality: str
    adapter: str
    version: int
    attempts: int
    created_at: float
    previous_status: str
    report: Mapping[str, Any] = field(repr=False)  # canonical JSON with CPR numbers restored
    delivered: tuple[DeliveredPart, ...] = ()
    pending: tuple[Message, ...] = ()  # messages whose outcome is unknown (in doubt)
    cutoff_at: float | None = None
    request_id: str | None = None  # the correlation id the report version came with


@dataclass(frozen=True, slots=True)
class AttemptRecord:
    outcome: str  # delivered | retry | in_doubt | failed | invalid
    http_status: int | None = None
    latency_ms: float | None = None
    response_body: str | None = None
    error: str | None = None
    vendor_reference: str | None = None


@dataclass(frozen=True, slots=True)
class Settle:
    """A delivery's new state."""

    status: Status
    next_attempt_at: float | None = None
    last_error: str | None = None
    vendor_reference: str | None = None
    warning: str | None = None
    count_attempt: bool = False
    at_risk: bool | None = None  # None: leave the flag as it is


class Store(Protocol):
    keys: DataKeys  # seals personal data; ``common.cpr_lookup_hash(store.keys, cpr)`` for a filter

    async def open(self) -> None: ...
    async def aclose(self) -> None: ...
    async def ping(self) -> bool: ...
    async def submit(self, reports: Sequence[NewReport], now: float) -> list[Submitted]: ...
    async def get_report(self, municipality: str, report_id: str) -> dict[str, Any] | None: ...
    async def reclaim(self, now: float, every_lease: bool) -> dict[str, int]: ...
    async def claim_due(
        self,
        now: float,
        owner: str,
        lease_seconds: float,
        limit: int,
        adapters: Sequence[str],
        readback_adapters: Sequence[str],
        municipality: str | None = None,
        lane_order: bool = True,
    ) -> list[Job]: ...
    # with ``owner``: raises LeaseLost unless ``owner`` still holds an unexpired lease on it
    async def begin_attempt(
        self,
        delivery_id: int,
        message: Message,
        request_body: str,
        now: float,
        owner: str | None = None,
    ) -> int: ...
    async def end_attempt(
        self,
        attempt_id: int,
        delivery_id: int,
        report_pk: int,
        adapter: str,
        version: int,
        record: AttemptRecord,
        message: Message,
        settle: Settle | None,
        now: float,
    ) -> None: ...
    async def settle(self, delivery_id: int, settle: Settle, now: float, event: str) -> None: ...
    async def replace_parts(
        self,
        delivery_id: int,
        report_pk: int,
        adapter: str,
        parts: Sequence[DeliveredPart],
        now: float,
    ) -> None: ...
    async def count_by_status(self) -> dict[str, int]: ...
    # by the state shown: waiting deliveries behind an earlier unfinished one count as held
    async def count_by_shown_status(self) -> dict[str, int]: ...
    # when the oldest delivery not yet in a final state was created (None: there is none)
    async def oldest_unfinished_at(self) -> float | None: ...
    async def deliveries_of(
        self, version_pks: Sequence[int]
    ) -> dict[int, list[dict[str, Any]]]: ...
    async def delivered_parts(self, report_pk: int, adapter: str) -> list[DeliveredPart]: ...
    # the audit trail (``since``/``until``: epoch seconds, for an export), its attempt rows, its head
    async def audit_chain(
        self, since: float | None = None, until: float | None = None
    ) -> list[dict[str, Any]]: ...
    async def audit_attempts(self) -> list[dict[str, Any]]: ...
    async def audit_head(self) -> tuple[int, str] | None: ...
    # retention: bodies and CPR numbers of versions finished before ``before`` (audited)
    async def purge(
        self,
        before: float,
        now: float,
        *,
        dry_run: bool = False,
        extra: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]: ...
    async def record_event(
        self,
        event: str,
        detail: dict[str, Any],
        now: float,
        *,
        actor: str = "gateway",
        delivery_id: int | None = None,
    ) -> None: ...
    # endpoints and operations
    async def paused_endpoints(self) -> dict[tuple[str, str], str]: ...
    # a breaker opened by one process holds the endpoint back in every process until ``until``
    async def open_breaker(self, municipality: str, adapter: str, until: float) -> None: ...
    async def breakers_open(self, now: float) -> dict[tuple[str, str], float]: ...
    async def set_paused(
        self, municipality: str, adapter: str, paused: bool, reason: str, actor: str, now: float
    ) -> None: ...
    async def defer_due(self, municipality: str, adapter: str, until: float, now: float) -> int: ...
    async def undefer(self, municipality: str | None, adapter: str | None, now: float) -> int: ...
    # newest first (``before_id``: the rows after a page's last one); filters: ``ids``,
    # ``municipality``, ``adapter``, ``status`` (as shown: ``held`` included), ``report_id``,
    # ``since``/``until`` (created), ``error`` (substring), ``at_risk``, ``period`` ("YYYY-MM" of
    # the report's own date), ``employee`` (employment id), ``cpr_hash`` (``cpr_lookup_hash``)
    async def list_deliveries(
        self, filters: Mapping[str, Any], limit: int = 200
    ) -> list[dict[str, Any]]: ...
    # the number of deliveries the filters select (the whole list: ``before_id`` ignored)
    async def count_deliveries(self, filters: Mapping[str, Any]) -> int: ...
    # one row per endpoint with deliveries: counts by state shown, delivered since
    # ``day_start``, at risk, the oldest unfinished, p95 latency of the last hour's attempts
    async def overview(self, now: float, day_start: float) -> list[dict[str, Any]]: ...
    # one delivery with its report (CPR masked), versions, attempts and audit (None: no such)
    async def delivery_detail(self, delivery_id: int) -> dict[str, Any] | None: ...
    async def count_at_risk(self) -> int: ...
    async def operate(
        self,
        action: str,
        filters: Mapping[str, Any],
        actor: str,
        reason: str,
        now: float,
        readback_adapters: Sequence[str] = (),
        vendor_reference: str | None = None,
    ) -> dict[str, list[int]]: ...
    async def flag_at_risk(self, now: float, margin: float) -> list[dict[str, Any]]: ...
    async def audit_for(self, delivery_id: int) -> list[dict[str, Any]]: ...
    # the file-run journal (IND01): begin is committed before the first byte is written
    async def file_run_begin(self, run: dict[str, Any], now: float) -> None: ...
    async def file_runs_unfinished(self, file: str) -> list[dict[str, Any]]: ...
    async def file_run_finish(
        self, run_id: str, line_numbers: Sequence[int], outcome: str, now: float
    ) -> None: ...
    # pull sources: stored reports and rejections of one pull, in one transaction
    async def take_pulled(
        self, municipality: str, source: str, records: Sequence[PulledRecord], now: float
    ) -> list[PullOutcome]: ...
    async def list_rejections(
        self, filters: Mapping[str, Any], limit: int = 200
    ) -> list[dict[str, Any]]: ...
    # several processes: only one writes a file (IND01) at a time
    def file_lock(self, key: str) -> AbstractAsyncContextManager[None]: ...
    # the console (gateway/console): sessions by the SHA-256 of their random token
    async def create_session(
        self, token_hash: str, username: str, now: float, expires_at: float
    ) -> None: ...
    # the session's operator name; None when unknown or expired
    async def session_user(self, token_hash: str, now: float) -> str | None: ...
    async def end_session(self, token_hash: str) -> None: ...
    # audit events newest first, each with the municipality of its delivery or report (if any)
    async def audit_events(self, before_id: int | None, limit: int) -> list[dict[str, Any]]: ...
    # personal data: seal values stored in clear (done at open), or (``rotate``) re-seal every
    # value under the current data key; the rows changed per table (idempotent)
    async def reseal(self, rotate: bool) -> dict[str, int]: ...
    # alerts (gateway.alerts): the facts the causes are computed from, then what was decided
    async def alert_facts(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]: ...
    async def open_alerts(self) -> list[dict[str, Any]]: ...
    async def apply_alerts(self, plan: AlertPlan, now: float) -> dict[str, list[str]]: ...
    async def claim_alert_notifications(
        self, now: float, owner: str, lease_seconds: float, limit: int
    ) -> list[dict[str, Any]]: ...
    async def finish_alert_notification(
        self, notification_id: int, owner: str, outcome: SendOutcome, now: float
    ) -> bool: ...
    async def list_alerts(self, open_only: bool, limit: int = 200) -> list[dict[str, Any]]: ...


def open_store(
    url: str, pool_size: int = 10, keys: DataKeys | None = None, audit_key: bytes | None = None
) -> Store:
    """The store engine for a SQLAlchemy-style URL (``pool_size``: PostgreSQL connections).

    ``keys`` seal the personal data it stores (``gateway.privacy``); without, SQLite uses the
    embedded default (a key file next to the database, made on first use), and a PostgreSQL
    store opens, migrates and lists, but refuses (ConfigError) to seal or open personal data:
    ``serve`` requires a configured key there (``privacy.keys_for``). ``audit_key`` is the
    audit trail's HMAC key, which the app and the CLI always give; a store without one signs
    with :data:`gateway.audit.UNKEYED`, for tests only.
    """
    from ..audit import UNKEYED
    from ..privacy import keys_for

    keys = keys_for(keys, url, required=False)
    key = UNKEYED if audit_key is None else audit_key
    if url.startswith("sqlite:///"):
        from .sqlite import SQLiteStore

        return SQLiteStore(url.removeprefix("sqlite:///"), keys, key)
    if url.startswith(("postgresql://", "postgres://")):
        from .postgres import PostgresStore

        return PostgresStore(url, keys, pool_size, key)
    raise StoreError(f"unsupported store URL scheme: {url.split(':', 1)[0]}")


__all__ = [
    "AttemptRecord",
    "BLOCKING",
    "WAITING_FOR_OPERATOR",
    "SETTLED",
    "ConflictingReport",
    "FINAL",
    "Job",
    "NewReport",
    "PullOutcome",
    "PulledRecord",
    "Settle",
    "Status",
    "Store",
    "StoreError",
    "Submitted",
    "open_store",
]
