"""Pulling OS2indberetning's payroll export (DESIGN.md §3, "Pull sources").

Each pull: ``GET {base}GetReportsToPayroll`` → map and validate every record on its own,
as the compat endpoint does → store the valid ones and record the rejected ones in one
transaction → only then ``POST {base}AcknowledgeReportsProcessed`` with the ids that are
stored (new, or stored before with the same content: their acknowledgement was lost).
Invalid and conflicting records are never acknowledged, so OS2indberetning keeps them
until they are fixed. A crash between the commit and the acknowledgement only means the
records come again and are answered as duplicates.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import aiohttp

from adapters.base import Adapter

from ..compat import to_new_report
from ..errors import FieldError, GatewayError
from ..intake import cutoffs
from ..logs import correlated
from ..privacy import mask_cpr
from ..settings import PullSource, Tenant
from ..store import PulledRecord, PullOutcome, Store, StoreError
from . import PullError, next_pull_at

if TYPE_CHECKING:
    from ..payroll_calendar import CutoffCalendar

log = logging.getLogger(__name__)
NAME = "os2indberetning"
GET_REPORTS = "GetReportsToPayroll"
ACKNOWLEDGE = "AcknowledgeReportsProcessed"
ACKNOWLEDGED = frozenset({PullOutcome.CREATED, PullOutcome.DUPLICATE})


# -- pure: one record, and what to acknowledge -------------------------------------------


def record_hash(record: Any) -> str:
    """SHA-256 of the record as received (keys sorted): a changed record hashes differently."""
    text = json.dumps(record, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def raw_id(record: Any) -> Any:
    """The record's ``Id`` (keys are case-insensitive), or None."""
    if not isinstance(record, dict):
        return None
    return next((v for k, v in record.items() if str(k).lower() == "id"), None)


def ack_id(record: Any) -> int | None:
    """The integer OS2indberetning acknowledges the record by, or None when it has none."""
    value = raw_id(record)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return None


def read_record(
    tenant: Tenant,
    record: Any,
    cutoff: Callable[[str], float | None],
    adapters: Mapping[str, Adapter] | None = None,
) -> PulledRecord:
    """One export record as the store takes it: a report, or why it is not one (CPR masked)."""
    value = raw_id(record)
    record_id = mask_cpr(str(value).strip()) if value is not None else ""
    digest = record_hash(record)
    try:
        report = to_new_report(tenant, record, cutoff, adapters)
    except GatewayError as exc:
        errors = exc.errors or (FieldError("/", exc.detail),)
        return PulledRecord(
            record_id, digest, None, tuple((e.pointer, mask_cpr(e.message)) for e in errors)
        )
    if ack_id(record) is None:
        return PulledRecord(
            record_id,
            digest,
            None,
            (("/Id", "must be a whole number: OS2indberetning acknowledges records by it"),),
        )
    return PulledRecord(record_id, digest, report)


def to_acknowledge(records: Sequence[Any], outcomes: Sequence[PullOutcome]) -> list[int]:
    """The ids to acknowledge: every record that is stored now with its content, and only those."""
    ids = {
        ack_id(r) for r, outcome in zip(records, outcomes, strict=True) if outcome in ACKNOWLEDGED
    }
    return sorted(i for i in ids if i is not None)


# -- I/O: the two HTTP operations ----------------------------------------------------------


class Os2Client:
    """The drive service's two operations over one ClientSession (connect and read timeouts)."""

    def __init__(self, source: PullSource) -> None:
        self.source = source
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            timeout = aiohttp.ClientTimeout(
                total=None,
                sock_connect=self.source.connect_timeout,
                sock_read=self.source.read_timeout,
            )
            self._session = aiohttp.ClientSession(timeout=timeout)
        return self._session

    async def fetch(self) -> list[Any]:
        body = await self._call("GET", GET_REPORTS, None)
        try:
            data = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise PullError(
                f"{GET_REPORTS}: the answer is not JSON ({exc.__class__.__name__})"
            ) from exc
        if not isinstance(data, list):
            raise PullError(
                f"{GET_REPORTS}: expected a JSON array of records, got a JSON {_json_type(data)}"
            )
        return data

    async def acknowledge(self, ids: Sequence[int]) -> None:
        await self._call("POST", ACKNOWLEDGE, list(ids))

    async def _call(self, method: str, operation: str, payload: Any) -> bytes:
        url = self.source.base_url + operation
        headers = {"ApiKey": self.source.api_key, "Accept": "application/json"}
        try:
            async with self._open().request(method, url, json=payload, headers=headers) as resp:
                body = await resp.read()
                if resp.status >= 300:
                    raise PullError(f"{operation}: HTTP {resp.status} {resp.reason or ''}".rstrip())
                return body
        except TimeoutError as exc:
            raise PullError(
                f"{operation}: no answer in time (connect {self.source.connect_timeout:g} s, "
                f"read {self.source.read_timeout:g} s)"
            ) from exc
        except aiohttp.ClientError as exc:
            text = str(exc).replace(self.source.api_key, "***")
            raise PullError(f"{operation}: {exc.__class__.__name__}: {text}"[:300]) from exc

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


def _json_type(value: Any) -> str:
    return {dict: "object", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number"
    )


# -- the loop ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PullSummary:
    received: int = 0
    created: int = 0
    duplicates: int = 0
    rejected: int = 0
    acknowledged: int = 0


class Os2Indberetning:
    """Pulls one tenant's OS2indberetning export on its interval or schedule, forever."""

    name = NAME

    def __init__(
        self,
        tenant: Tenant,
        source: PullSource,
        store: Store,
        calendars: Mapping[tuple[str, str], CutoffCalendar],
        wake: Callable[[], None],
        adapters: Mapping[str, Adapter] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.tenant, self.source, self.store, self.adapters = tenant, source, store, adapters
        self.calendars, self.wake, self.clock = calendars, wake, clock
        self.client = Os2Client(source)
        self.failures = 0  # failed pulls in a row
        self.pulls = 0  # pulls that worked
        self.started_at = clock()
        self.last_pulled_at: float | None = None  # when a pull last worked (metrics: lag)

    @property
    def municipality(self) -> str:
        return self.tenant.municipality

    async def run(self) -> None:
        """Pull now, then on the schedule; a failure only moves the next pull (backoff)."""
        due = self.clock()
        while True:
            await asyncio.sleep(max(0.0, due - self.clock()))
            await self.pull_safely()
            due = next_pull_at(self.source, self.clock(), self.failures)

    async def pull_safely(self) -> PullSummary | None:
        """One pull; every failure is logged and audited, never raised. The pull has an id
        of its own: every line it logs carries it, and every report it stores keeps it."""
        with correlated(f"pull-{uuid.uuid4().hex}"):
            return await self._pull_safely()

    async def _pull_safely(self) -> PullSummary | None:
        try:
            summary = await self.pull_once()
        except PullError as exc:
            await self._failed(str(exc))
            return None
        except StoreError as exc:
            await self._failed(f"store: {exc}")
            return None
        except Exception as exc:  # a bug: keep pulling, say so masked
            log.exception("%s pull for %s failed unexpectedly", NAME, self.municipality)
            await self._failed(f"internal error: {exc.__class__.__name__}")
            return None
        if self.failures:
            log.info(
                "%s pull for %s works again after %d failure(s)",
                NAME,
                self.municipality,
                self.failures,
            )
        self.failures = 0
        self.pulls += 1
        self.last_pulled_at = self.clock()
        return summary

    async def pull_once(self) -> PullSummary:
        records = await self.client.fetch()
        if not records:
            return PullSummary()
        now = self.clock()
        cutoff = cutoffs(self.calendars, self.tenant, datetime.fromtimestamp(now, UTC))
        pulled = [read_record(self.tenant, r, cutoff, self.adapters) for r in records]
        outcomes = await self.store.take_pulled(self.municipality, NAME, pulled, now)
        if PullOutcome.CREATED in outcomes:
            self.wake()
        ids = to_acknowledge(records, outcomes)
        if ids:  # only after the commit above: an id acknowledged is an id stored
            await self.client.acknowledge(ids)
        summary = PullSummary(
            received=len(records),
            created=outcomes.count(PullOutcome.CREATED),
            duplicates=outcomes.count(PullOutcome.DUPLICATE),
            rejected=len(outcomes)
            - outcomes.count(PullOutcome.CREATED)
            - outcomes.count(PullOutcome.DUPLICATE),
            acknowledged=len(ids),
        )
        if summary.created or summary.acknowledged:  # a pull that changed nothing is not news
            await self.store.record_event(
                "source.pulled",
                {
                    "municipality": self.municipality,
                    "source": NAME,
                    "received": summary.received,
                    "created": summary.created,
                    "duplicates": summary.duplicates,
                    "rejected": summary.rejected,
                    "acknowledged": summary.acknowledged,
                },
                self.clock(),
            )
        return summary

    async def _failed(self, error: str) -> None:
        self.failures += 1
        error = mask_cpr(error.replace(self.source.api_key, "***"))
        wait = next_pull_at(self.source, self.clock(), self.failures) - self.clock()
        log.warning(
            "%s pull for %s failed (%d in a row; next in %.1f s): %s",
            NAME,
            self.municipality,
            self.failures,
            wait,
            error,
        )
        detail = {
            "municipality": self.municipality,
            "source": NAME,
            "error": error,
            "failures_in_a_row": self.failures,
            "next_pull_in_seconds": round(wait, 3),
        }
        try:
            await self.store.record_event("source.pull_failed", detail, self.clock())
        except StoreError:
            log.warning(
                "%s pull failure for %s could not be audited: the store is unavailable",
                NAME,
                self.municipality,
            )

    async def aclose(self) -> None:
        await self.client.aclose()
