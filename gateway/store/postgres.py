"""The scale-out store: PostgreSQL through an asyncpg pool, shared by several gateway processes.

Each operation is one transaction. Writes that append to the audit trail take one
transaction-level advisory lock first, so the hash chain stays a chain across processes
(and ids are handed out in commit order); claims lock due rows with ``FOR UPDATE SKIP
LOCKED`` and only ever take the first unfinished delivery of a lane. As in ``SQLiteStore``,
SQL only fetches candidates: :mod:`gateway.deliveries` decides each delivery's next state,
and :func:`_record_decision` writes it (the SQL of both engines' writer is in ``common``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import asyncpg

from adapters.base import DeliveredPart, Message

from .. import deliveries
from ..audit import PURGE_EVENT, UNKEYED, seal
from ..deliveries import Decision, Detail, Event, IllegalTransition
from ..privacy import DataKeys
from . import (
    AttemptRecord,
    ConflictingReport,
    Job,
    LeaseLost,
    NewReport,
    PulledRecord,
    PullOutcome,
    Settle,
    Status,
    StoreError,
    Submitted,
)
from .alerting import (
    CLAIM_POSTGRES,
    CLAIMED,
    FACT_GROUPS,
    FACT_SAMPLES,
    FINISH_NOTIFICATION,
    INSERT_ALERT,
    INSERT_NOTIFICATION,
    LIST_ALERTS,
    NOTIFICATIONS_OF,
    OPEN_ALERTS,
    RESOLVE_ALERT,
    UPDATE_ALERT,
    AlertPlan,
    SendOutcome,
    alert_view,
    claimed_view,
    opened_event,
    payload_json,
    with_notifications,
)
from .common import (
    ATTEMPT_ROW,
    AUDIT_FOR_SQL,
    AUDIT_HEAD,
    AUDIT_INSERT,
    AUDIT_PAGE,
    BLOCKING_SQL,
    BREAKERS_OPEN,
    CONFLICT_ERRORS,
    COUNT_SHOWN_SQL,
    COUNT_SQL,
    CPRS_INSERT,
    DETAIL_REPORT_SQL,
    DETAIL_VERSIONS_SQL,
    END_ATTEMPT,
    LANE_HEAD_CANDIDATE,
    LANE_HEAD_DELETE,
    LANE_HEAD_UPSERT,
    LATENCIES_SQL,
    LATENCY_WINDOW,
    LIST_SQL,
    OLDEST_UNFINISHED_SQL,
    OPEN_BREAKER,
    OVERVIEW_SQL,
    PENDING_OUTCOMES,
    PERIODLESS_SQL,
    PURGE_BATCH,
    PURGE_PREVIEW,
    PURGEABLE,
    RESEAL_TABLES,
    RESEAL_UPDATE,
    RETURNING_LANE,
    SESSION_END,
    SESSION_INSERT,
    SESSION_SWEEP,
    SESSION_USER,
    SET_PERIOD_SQL,
    UNDEFER_HEADS,
    WATCHED_SQL,
    at_risk_view,
    audit_attempt_rows,
    audit_page_row,
    audit_rows,
    audit_view,
    backfilled_periods,
    blocker_view,
    count_filters,
    decision_audit,
    decision_update,
    delivered_part,
    delivery_detail_view,
    delivery_view,
    due_heads,
    facts,
    filter_sql,
    lease_refusal,
    list_view,
    open_message,
    open_run,
    open_run_deliveries,
    overview_rows,
    purge_detail,
    rechain_detail,
    rechained,
    rejection_view,
    reseal_select,
    resealed,
    sealed_body,
    sealed_cprs,
    sealed_message,
    sealed_part,
    sealed_run_data,
    sealed_run_deliveries,
    settled,
    shown_counts,
    still_claimable,
    version_view,
    waits_in_lane,
)
from .common import job as build_job
from .migrations import SCHEMA_TABLE, applied_at, check_version, pending, statements

T = TypeVar("T")
log = logging.getLogger(__name__)
AuditEvent = tuple[float, str, str, int | None, int | None, dict[str, Any]]
Lane = tuple[str, str, str]  # (municipality, adapter, employee_key)
_WRITE_LOCK = 0x5047_5731  # advisory lock key: writers that append to the audit trail
_MIGRATE_LOCK = 0x5047_5732
_FILE_LOCK_SPACE = 0x5047  # two-key advisory locks: (space, hash of the file key)
_MAX_GROUP = 256  # operations one group commit takes at most
_RETRYABLE_STATES = (
    "08",
    "40",
    "53",
    "57",
    "58",
)  # connection, rollback, resources, operator, system


def store_error(exc: BaseException) -> StoreError | None:
    """The one place PostgreSQL's failures become ``StoreError`` (intake answers 503, not 500):
    lost or refused connections, a closed pool, serialization failures and deadlocks, a full
    disk, a server shutting down. Anything else is a bug and stays what it is."""
    if isinstance(exc, StoreError):
        return exc
    if isinstance(exc, asyncpg.PostgresError):
        state = str(getattr(exc, "sqlstate", "") or "")
        if state.startswith(_RETRYABLE_STATES):
            return StoreError(f"the PostgreSQL store failed: {exc.__class__.__name__}: {exc}")
        return None
    if isinstance(
        exc,
        asyncpg.InterfaceError
        | asyncpg.exceptions.ConnectionDoesNotExistError
        | OSError
        | TimeoutError,
    ):
        return StoreError(f"the PostgreSQL store failed: {exc.__class__.__name__}: {exc}")
    return None


@functools.lru_cache(maxsize=512)
def _q(sql: str) -> str:
    """``?`` placeholders (the SQL both engines share) as PostgreSQL's ``$1, $2, …``."""
    counter = iter(range(1, 10_000))
    return re.sub(r"\?", lambda _: f"${next(counter)}", sql)


def _answer(fut: asyncio.Future[Any], result: Any = None, error: Exception | None = None) -> None:
    """Hand a group commit's caller its result (unless it stopped waiting)."""
    if fut.done():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)


def _count(status: str) -> int:
    """Rows touched, from asyncpg's command tag ("UPDATE 3")."""
    return int(status.rsplit(" ", 1)[-1]) if status and status[-1].isdigit() else 0


class _Tx:
    """One connection (in a transaction, when writing), ``?`` SQL, and the audit events
    the transaction appends: chained and inserted in one go just before the commit."""

    def __init__(
        self, conn: asyncpg.Connection, keys: DataKeys, audit_key: bytes = UNKEYED
    ) -> None:
        self.conn = conn
        self.keys = keys  # seal and open personal data (gateway.privacy)
        self.audit_key = audit_key
        self.events: list[AuditEvent] = []
        self.lanes: set[Lane] = set()  # lanes whose head may have changed
        self.locked = False  # this transaction holds the writers' lock

    async def execute(self, sql: str, *args: Any) -> int:
        return _count(await self.conn.execute(_q(sql), *args))

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        if rows:
            await self.conn.executemany(_q(sql), rows)

    async def fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        return list(await self.conn.fetch(_q(sql), *args))

    async def fetchrow(self, sql: str, *args: Any) -> asyncpg.Record | None:
        return await self.conn.fetchrow(_q(sql), *args)

    async def fetchval(self, sql: str, *args: Any) -> Any:
        return await self.conn.fetchval(_q(sql), *args)

    def audit(
        self,
        now: float,
        event: str,
        detail: dict[str, Any],
        *,
        actor: str = "gateway",
        report_pk: int | None = None,
        delivery_id: int | None = None,
    ) -> None:
        self.events.append((now, actor, event, report_pk, delivery_id, detail))

    def touch(self, lane: Lane) -> None:
        """A delivery of ``lane`` changed state: its head is brought up to date at commit."""
        self.lanes.add(lane)

    async def flush_lanes(self) -> None:
        """The heads of the touched lanes, from their deliveries, in three statements.

        The head deliveries are locked (``FOR UPDATE``) before they are read: a claim that
        holds one commits first, so its new state is what is written here.
        """
        if not self.lanes:
            return
        lanes = sorted(self.lanes)
        heads: dict[Lane, list[tuple[int, str, float]]] = {}
        self.lanes.clear()
        if len(lanes) == 1:  # a settle: the plain query plans faster
            found = [
                (*lanes[0], *r)
                for r in await self.fetch(LANE_HEAD_CANDIDATE + " FOR UPDATE", *lanes[0])
            ]
        else:
            found = await self.fetch(
                "SELECT k.m, k.a, k.e, h.id, h.status, h.next_attempt_at"
                " FROM unnest(?::text[], ?::text[], ?::text[]) AS k(m, a, e)"
                " CROSS JOIN LATERAL (SELECT d.id, d.status, d.next_attempt_at FROM deliveries d"
                "   WHERE d.municipality = k.m AND d.adapter = k.a AND d.employee_key = k.e"
                f"  AND d.status IN ({BLOCKING_SQL}) ORDER BY d.id LIMIT 1 FOR UPDATE) h",
                *map(list, zip(*lanes, strict=True)),
            )
        for m, a, e, delivery_id, status, due in found:
            heads.setdefault((m, a, e), []).append((delivery_id, status, due))
        upserts, gone = [], []
        for lane in lanes:
            head = deliveries.lane_head(heads.get(lane, []))
            if head is None:
                gone.append(lane)
            else:
                upserts.append((*lane, head[0], str(head[1]), head[2]))
        for sql, rows in ((LANE_HEAD_DELETE, gone), (LANE_HEAD_UPSERT, upserts)):
            if len(rows) == 1:
                await self.execute(sql, *rows[0])
            else:
                await self.executemany(sql, rows)

    async def flush_audit(self) -> None:
        if not self.events:
            return
        # ids and links are taken under the writer lock (held to the commit once taken)
        if not self.locked:
            await self.execute("SELECT pg_advisory_xact_lock(?)", _WRITE_LOCK)
            self.locked = True
        head = await self.fetchrow(AUDIT_HEAD)
        await self.executemany(AUDIT_INSERT, audit_rows(self.audit_key, head, self.events))
        self.events.clear()


class PostgresStore:
    """Store engine on PostgreSQL (any number of gateway processes)."""

    single_process = False  # never reclaim every lease at start: other processes hold some

    def __init__(
        self, dsn: str, keys: DataKeys, pool_size: int = 10, audit_key: bytes = UNKEYED
    ) -> None:
        self.dsn = dsn
        self.keys = keys
        self.audit_key = audit_key
        self.pool_size = pool_size
        self._pool: asyncpg.Pool | None = None
        # group commit (:meth:`_grouped`): queued operations and the task committing them,
        # one of each for audited writes (under the writers' lock) and for the others
        self._queued: dict[bool, list[tuple[Callable[[_Tx], Awaitable[Any]], asyncio.Future[Any]]]]
        self._queued = {True: [], False: []}
        self._committers: dict[bool, asyncio.Task[None]] = {}
        self.commits = 0  # write transactions committed (group commit's tests count them)

    # -- life cycle ----------------------------------------------------------------------

    async def open(self) -> None:
        try:
            self._pool = await asyncpg.create_pool(self.dsn, min_size=1, max_size=self.pool_size)
        except Exception as exc:
            raise (
                store_error(exc) or StoreError(f"cannot open the PostgreSQL store: {exc}")
            ) from exc
        try:
            await self._guard(self._migrate())
            if not self.keys.missing:  # values stored in clear before migration 7
                await self.reseal(rotate=False)
                await self._write(self._backfill_periods, audited=False)
        except BaseException:
            await self.aclose()  # a refused schema leaves no connection behind
            raise

    async def aclose(self, within: float = 30.0) -> None:
        # what callers queued is committed (or fails) before the connections go; a connection
        # still held after ``within`` seconds (a task that never released it) is cut
        if self._committers:
            await asyncio.wait(set(self._committers.values()), timeout=within)
        if self._pool is not None:
            pool, self._pool = self._pool, None
            try:
                await asyncio.wait_for(pool.close(), within)
            except TimeoutError:
                log.error("PostgreSQL connections still in use %.0f s after closing: cut", within)
                pool.terminate()

    async def _migrate(self) -> None:
        async with self._acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATE_LOCK)
            await conn.execute(SCHEMA_TABLE)
            done = {r[0] for r in await conn.fetch("SELECT version FROM schema_migrations")}
            check_version(max(done, default=None))
            for number, name, sql in pending(done):
                for statement in statements(sql, "postgresql"):
                    await conn.execute(statement)
                await conn.execute(
                    "INSERT INTO schema_migrations VALUES ($1, $2, $3)", number, name, applied_at()
                )
        await self._write(self._rechain)

    async def _rechain(self, tx: _Tx) -> None:
        """Once, after migration 8: chain the stored events with the key, seal the attempts."""
        if await tx.fetchval("SELECT pending FROM audit_rechain FOR UPDATE") is None:
            return
        events = await tx.fetch("SELECT * FROM audit_events ORDER BY id")
        if events:
            await tx.executemany(
                "UPDATE audit_events SET prev_hash = ?, hash = ?, hmac = ? WHERE id = ?",
                rechained(self.audit_key, events),
            )
            attempts = audit_attempt_rows(
                self.keys,
                self.audit_key,
                await tx.fetch(f"{ATTEMPT_ROW} WHERE finished_at IS NOT NULL ORDER BY id"),
            )
            tx.audit(time.time(), "audit.rechained", rechain_detail(events, attempts))
        await tx.execute("DELETE FROM audit_rechain")

    async def _backfill_periods(self, tx: _Tx) -> int:
        """Give deliveries stored before migration 9 the period of their report (once: the
        rows that get one are not looked at again; several processes may do it at once)."""
        found = backfilled_periods(self.keys, await tx.fetch(PERIODLESS_SQL))
        await tx.executemany(SET_PERIOD_SQL, found)
        return len(found)

    async def reseal(self, rotate: bool) -> dict[str, int]:
        """Seal what is stored in clear (``rotate``: re-seal all under the current key), in one
        transaction; the counts of rows changed per table."""

        async def op(tx: _Tx) -> dict[str, int]:
            counts = {}
            for table in RESEAL_TABLES:
                rows = await tx.fetch(reseal_select(table, rotate) + " FOR UPDATE")
                updates = [
                    u for row in rows if (u := resealed(self.keys, table, row, rotate)) is not None
                ]
                await tx.executemany(RESEAL_UPDATE[table], updates)
                counts[table] = len(updates)
            return counts

        return await self._write(op, audited=False)

    @contextlib.asynccontextmanager
    async def _acquire(self) -> AsyncIterator[asyncpg.Connection]:
        if self._pool is None:
            raise StoreError("store is not open")
        async with self._pool.acquire() as conn:
            yield conn

    async def _guard(self, work: Awaitable[T]) -> T:
        try:
            return await work
        except Exception as exc:
            mapped = store_error(exc)
            if mapped is None or mapped is exc:
                raise
            raise mapped from exc

    async def _write(self, fn: Callable[[_Tx], Awaitable[T]], *, audited: bool = True) -> T:
        """``fn`` in one transaction, committed before this returns."""

        async def run() -> T:
            async with self._acquire() as conn, conn.transaction():
                if audited:
                    await conn.execute("SELECT pg_advisory_xact_lock($1)", _WRITE_LOCK)
                tx = _Tx(conn, self.keys, self.audit_key)
                tx.locked = audited
                result = await fn(tx)
                await tx.flush_lanes()
                await tx.flush_audit()
            self.commits += 1
            return result

        return await self._guard(run())

    async def _grouped(self, fn: Callable[[_Tx], Awaitable[T]], *, audited: bool = True) -> T:
        """``fn`` committed before this returns, as :meth:`_write`, but in a group commit:
        the operations concurrent callers queue run in one transaction (one writers' lock,
        one lane-heads flush, one audit append, one commit) in the order they were queued.

        If any of them fails, nothing of the group is committed and each runs again in a
        transaction of its own, so one failure reaches only its own caller.
        """
        if self._pool is None:
            raise StoreError("store is not open")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queued[audited].append((fn, future))
        if audited not in self._committers:
            task = asyncio.create_task(self._commit_queued(audited), name="pg-group-commit")
            self._committers[audited] = task
        return await future

    async def _commit_queued(self, audited: bool) -> None:
        queued = self._queued[audited]
        group: list[tuple[Callable[[_Tx], Awaitable[Any]], asyncio.Future[Any]]] = []
        try:
            while queued:
                group = queued[:_MAX_GROUP]
                del queued[:_MAX_GROUP]
                await self._commit_group(group, audited)
        except BaseException:  # cancelled (the loop ends): no caller waits forever
            group.extend(queued)
            queued.clear()
            for _, fut in group:
                if not fut.done():
                    fut.set_exception(StoreError("store closed before commit"))
            raise
        finally:
            del self._committers[audited]

    async def _commit_group(
        self,
        group: Sequence[tuple[Callable[[_Tx], Awaitable[Any]], asyncio.Future[Any]]],
        audited: bool,
    ) -> None:
        live = [(fn, fut) for fn, fut in group if not fut.done()]  # a cancelled caller: skip
        if len(live) > 1 and await self._all_in_one(live, audited):
            return
        for fn, fut in live:  # alone, or a member failed and the group rolled back
            try:
                _answer(fut, await self._write(fn, audited=audited))
            except Exception as exc:
                _answer(fut, error=exc)

    async def _all_in_one(
        self,
        live: Sequence[tuple[Callable[[_Tx], Awaitable[Any]], asyncio.Future[Any]]],
        audited: bool,
    ) -> bool:
        """The group in one transaction; False if a member failed (nothing committed)."""
        committing = False

        async def all_of(tx: _Tx) -> list[Any]:
            nonlocal committing
            results = [await fn(tx) for fn, _ in live]
            await tx.flush_lanes()
            await tx.flush_audit()
            committing = True
            return results

        try:
            results = await self._write(all_of, audited=audited)
        except Exception as exc:
            if not committing:
                return False
            for _, fut in live:  # the commit failed: it may have committed, so never redo
                _answer(fut, error=exc)
            return True
        for (_, fut), result in zip(live, results, strict=True):
            _answer(fut, result)
        return True

    async def _read(self, fn: Callable[[_Tx], Awaitable[T]]) -> T:
        async def run() -> T:
            async with self._acquire() as conn:
                return await fn(_Tx(conn, self.keys, self.audit_key))

        return await self._guard(run())

    @contextlib.asynccontextmanager
    async def file_lock(self, key: str) -> AsyncIterator[None]:
        """Only one process at a time writes the file ``key`` (a session advisory lock)."""
        async with contextlib.AsyncExitStack() as stack:
            conn = await stack.enter_async_context(self._acquire())
            await self._guard(
                conn.execute("SELECT pg_advisory_lock($1, hashtext($2))", _FILE_LOCK_SPACE, key)
            )
            try:
                yield
            finally:
                with contextlib.suppress(Exception):
                    await conn.execute(
                        "SELECT pg_advisory_unlock($1, hashtext($2))", _FILE_LOCK_SPACE, key
                    )

    # -- intake --------------------------------------------------------------------------

    async def ping(self) -> bool:
        try:
            return bool(await self._read(lambda tx: tx.fetchval("SELECT 1")))
        except StoreError:
            return False

    async def submit(self, reports: Sequence[NewReport], now: float) -> list[Submitted]:
        async def op(tx: _Tx) -> list[Submitted]:
            batch = await _Intake.load(tx, reports, now, self.keys)
            results, conflicts = [], []
            for index, new in enumerate(reports):
                existing = batch.stored_version(new)
                if existing is not None and existing[1] != new.content_hash:
                    conflicts.append(index)
                elif existing is not None:
                    results.append(batch.existing(existing[0], new))
                else:
                    results.append(batch.insert(new))
            if conflicts:
                raise ConflictingReport(conflicts)  # the transaction rolls the whole batch back
            await batch.flush()
            return results

        return await self._write(op)

    async def take_pulled(
        self, municipality: str, source: str, records: Sequence[PulledRecord], now: float
    ) -> list[PullOutcome]:
        """Store the valid records and record the rejected ones, all in one transaction."""

        async def op(tx: _Tx) -> list[PullOutcome]:
            batch = await _Intake.load(
                tx, [r.report for r in records if r.report is not None], now, self.keys
            )
            outcomes, resolved = [], []
            for record in records:
                if record.report is None:
                    await _reject(
                        tx, municipality, source, record, PullOutcome.INVALID, record.errors, now
                    )
                    outcomes.append(PullOutcome.INVALID)
                    continue
                existing = batch.stored_version(record.report)
                if existing is not None and existing[1] != record.report.content_hash:
                    await _reject(
                        tx, municipality, source, record, PullOutcome.CONFLICT, CONFLICT_ERRORS, now
                    )
                    outcomes.append(PullOutcome.CONFLICT)
                    continue
                if existing is None:
                    batch.insert(record.report)
                resolved.append((now, municipality, source, record.record_id))
                outcomes.append(PullOutcome.CREATED if existing is None else PullOutcome.DUPLICATE)
            await batch.flush()
            await tx.executemany(
                "UPDATE intake_rejections SET resolved_at = ? WHERE municipality = ? AND source = ?"
                " AND record_id = ? AND resolved_at IS NULL",
                resolved,
            )
            return outcomes

        return await self._write(op)

    async def list_rejections(
        self, filters: Mapping[str, Any], limit: int = 200
    ) -> list[dict[str, Any]]:
        clauses, params = ["1 = 1"], []
        for key in ("municipality", "source", "kind", "record_id"):
            if filters.get(key) is not None:
                clauses.append(f"{key} = ?")
                params.append(filters[key])
        if filters.get("unresolved"):
            clauses.append("resolved_at IS NULL")
        sql = (
            f"SELECT * FROM intake_rejections WHERE {' AND '.join(clauses)}"
            " ORDER BY first_seen_at DESC, id DESC LIMIT ?"
        )
        rows = await self._read(lambda tx: tx.fetch(sql, *params, limit))
        return [rejection_view(r) for r in rows]

    # -- reads ---------------------------------------------------------------------------

    async def get_report(self, municipality: str, report_id: str) -> dict[str, Any] | None:
        async def read(tx: _Tx) -> dict[str, Any] | None:
            report = await tx.fetchrow(
                "SELECT * FROM reports WHERE municipality = ? AND report_id = ?",
                municipality,
                report_id,
            )
            if report is None:
                return None
            versions = [
                version_view(self.keys, v)
                for v in await tx.fetch(
                    "SELECT id, version, received_at, body, purged_at FROM"
                    " report_versions WHERE report_pk = ? ORDER BY version",
                    report["id"],
                )
            ]
            deliveries = []
            for d in await tx.fetch(
                "SELECT * FROM deliveries WHERE report_pk = ? ORDER BY id", report["id"]
            ):
                attempts = await tx.fetch(
                    "SELECT * FROM attempts WHERE delivery_id = ? ORDER BY id", d["id"]
                )
                deliveries.append(delivery_view(d, attempts, await _blocker(tx, d)))
            return {
                "municipality": municipality,
                "report_id": report_id,
                "kind": report["kind"],
                "latest_version": report["latest_version"],
                "versions": versions,
                "deliveries": deliveries,
            }

        return await self._read(read)

    async def count_by_status(self) -> dict[str, int]:
        rows = await self._read(
            lambda tx: tx.fetch("SELECT status, COUNT(*) FROM deliveries GROUP BY status")
        )
        return {r[0]: r[1] for r in rows}

    async def count_by_shown_status(self) -> dict[str, int]:
        return shown_counts(await self._read(lambda tx: tx.fetch(COUNT_SHOWN_SQL)))

    async def oldest_unfinished_at(self) -> float | None:
        value = await self._read(lambda tx: tx.fetchval(OLDEST_UNFINISHED_SQL))
        return None if value is None else float(value)

    async def deliveries_of(self, version_pks: Sequence[int]) -> dict[int, list[dict[str, Any]]]:
        """The deliveries of these report versions (as intake answered them), by version."""
        wanted = list(dict.fromkeys(version_pks))
        rows = await self._read(
            lambda tx: tx.fetch(
                "SELECT id, version_pk, adapter, status, vendor_reference, last_error, warning"
                " FROM deliveries WHERE version_pk = ANY(?::bigint[]) ORDER BY id",
                wanted,
            )
        )
        found: dict[int, list[dict[str, Any]]] = {pk: [] for pk in wanted}
        for row in rows:
            found[row["version_pk"]].append({k: row[k] for k in row.keys() if k != "version_pk"})
        return found

    async def delivered_parts(self, report_pk: int, adapter: str) -> list[DeliveredPart]:
        rows = await self._read(
            lambda tx: tx.fetch(
                "SELECT * FROM parts WHERE report_pk = ? AND adapter = ? ORDER BY part",
                report_pk,
                adapter,
            )
        )
        return [delivered_part(self.keys, r) for r in rows]

    async def audit_chain(
        self, since: float | None = None, until: float | None = None
    ) -> list[dict[str, Any]]:
        rows = await self._read(
            lambda tx: tx.fetch(
                "SELECT * FROM audit_events WHERE at >= COALESCE(?::float8, at) AND at < COALESCE(?::float8, at + 1)"
                " ORDER BY id",
                since,
                until,
            )
        )
        return [dict(r) for r in rows]

    async def audit_attempts(self) -> list[dict[str, Any]]:
        rows = await self._read(lambda tx: tx.fetch(f"{ATTEMPT_ROW} ORDER BY id"))
        return audit_attempt_rows(self.keys, self.audit_key, rows)

    async def audit_head(self) -> tuple[int, str] | None:
        row = await self._read(lambda tx: tx.fetchrow(AUDIT_HEAD))
        return None if row is None else (int(row["id"]), str(row["hmac"]))

    # -- retention -------------------------------------------------------------------------

    async def purge(
        self,
        before: float,
        now: float,
        *,
        dry_run: bool = False,
        extra: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Drop the bodies and CPR numbers of versions finished before ``before``, in batches,
        each one audited (``extra``: counts done outside the store, e.g. backup files)."""
        if dry_run:
            row = await self._read(lambda tx: tx.fetchrow(PURGE_PREVIEW, *(before,) * 6))
            assert row is not None
            return {**dict(row), **(extra or {})}
        total = {"versions": 0, "cprs": 0, "attempt_bodies": 0}
        while True:
            done = await self._write(
                functools.partial(_purge_batch, before=before, now=now, extra=extra)
            )
            extra = None  # counted once, in the first event
            for k in total:
                total[k] += done[k]
            if done["versions"] < PURGE_BATCH:
                return total

    async def create_session(
        self, token_hash: str, username: str, now: float, expires_at: float
    ) -> None:
        async def op(tx: _Tx) -> None:
            await tx.execute(SESSION_SWEEP, now)
            await tx.execute(SESSION_INSERT, token_hash, username, now, expires_at)

        await self._write(op, audited=False)

    async def session_user(self, token_hash: str, now: float) -> str | None:
        value = await self._read(lambda tx: tx.fetchval(SESSION_USER, token_hash, now))
        return None if value is None else str(value)

    async def end_session(self, token_hash: str) -> None:
        await self._write(lambda tx: tx.execute(SESSION_END, token_hash), audited=False)

    async def audit_events(self, before_id: int | None, limit: int) -> list[dict[str, Any]]:
        start = before_id if before_id is not None else 2**63 - 1
        rows = await self._read(lambda tx: tx.fetch(AUDIT_PAGE, start, limit))
        return [audit_page_row(r) for r in rows]

    async def audit_for(self, delivery_id: int) -> list[dict[str, Any]]:
        rows = await self._read(lambda tx: tx.fetch(AUDIT_FOR_SQL, delivery_id))
        return [audit_view(r) for r in rows]

    async def record_event(
        self,
        event: str,
        detail: dict[str, Any],
        now: float,
        *,
        actor: str = "gateway",
        delivery_id: int | None = None,
    ) -> None:
        """An audit event that changes no delivery (breaker transitions, pauses, alerts)."""

        async def op(tx: _Tx) -> None:
            tx.audit(now, event, detail, actor=actor, delivery_id=delivery_id)

        await self._write(op)

    # -- dispatcher ----------------------------------------------------------------------

    async def reclaim(self, now: float, every_lease: bool) -> dict[str, int]:
        """Take back work whose lease expired (``every_lease``: only for a single process).

        A delivery with an attempt that started but never finished may have reached the
        vendor: it becomes in_doubt. Any other goes back to the queue.
        """

        async def op(tx: _Tx) -> dict[str, int]:
            rows = await tx.fetch(
                "SELECT * FROM deliveries WHERE status = ?"
                + ("" if every_lease else " AND lease_until < ?")
                + " ORDER BY id FOR UPDATE SKIP LOCKED",
                *((Status.IN_FLIGHT,) if every_lease else (Status.IN_FLIGHT, now)),
            )
            counts = {"requeued": 0, "in_doubt": 0}
            for row in rows:
                open_attempt = await tx.fetchval(
                    "SELECT id FROM attempts WHERE delivery_id = ? AND finished_at IS NULL",
                    row["id"],
                )
                decision = deliveries.decide(
                    facts(row),
                    Event.LEASE_EXPIRED,
                    None,
                    now,
                    Detail(open_attempt=open_attempt is not None),
                )
                extra = None
                if open_attempt is not None:
                    await tx.execute(
                        "UPDATE attempts SET finished_at = ?, outcome = ?, error = ? WHERE id = ?",
                        now,
                        decision.attempt_outcome,
                        decision.last_error,
                        open_attempt,
                    )
                    extra = {"attempts_sealed": await _seals(tx, "id = ?", open_attempt)}
                await _record_decision(
                    tx, row["id"], decision, now, report_pk=row["report_pk"], extra=extra
                )
                counts["in_doubt" if decision.status is Status.IN_DOUBT else "requeued"] += 1
            return counts

        return await self._write(op)

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
    ) -> list[Job]:
        """Due deliveries; with ``lane_order``, only the first unfinished one per employee.

        In lane order, the due rows of ``lane_heads`` are read by its index and locked with
        ``SKIP LOCKED`` (one row per lane: two processes never claim in one lane), then their
        deliveries (:meth:`_due_heads`); a file run locks due deliveries of any lane.
        """
        if not adapters:
            return []

        async def op(tx: _Tx) -> list[Job]:
            if lane_order:
                rows = await self._due_heads(
                    tx, now, limit, adapters, readback_adapters, municipality
                )
            else:  # a file run takes every due one of its endpoint, in any lane
                rows = await tx.fetch(
                    "SELECT d.* FROM deliveries d WHERE d.next_attempt_at <= ?"
                    " AND d.adapter = ANY(?::text[]) AND (?::text IS NULL OR d.municipality = ?::text)"
                    " AND (d.status IN ('queued', 'retry_scheduled')"
                    "      OR (d.status = 'in_doubt' AND d.adapter = ANY(?::text[])))"
                    " ORDER BY d.next_attempt_at, d.id LIMIT ? FOR UPDATE OF d SKIP LOCKED",
                    now,
                    list(adapters),
                    municipality,
                    municipality,
                    list(readback_adapters),
                    limit,
                )
            if not rows:
                return []
            claimed = [
                deliveries.decide(
                    facts(r, r["adapter"] in readback_adapters), Event.CLAIMED, None, now
                )
                for r in rows
            ]
            await tx.executemany(
                "UPDATE deliveries SET status = ?, lease_owner = ?, lease_until = ?, updated_at = ? WHERE id = ?",
                [
                    (str(d.status), owner, now + lease_seconds, now, r["id"])
                    for d, r in zip(claimed, rows, strict=True)
                ],
            )
            # a head stays its lane's head (both states block the lane): only its state changes
            by_status: dict[str, list[int]] = {}
            for d, r in zip(claimed, rows, strict=True):
                by_status.setdefault(str(d.status), []).append(r["id"])
            for status, ids in by_status.items():  # one status: in_flight
                await tx.execute(
                    "UPDATE lane_heads SET status = ? WHERE delivery_id = ANY(?::bigint[])",
                    status,
                    ids,
                )
            return await _jobs(tx, rows, self.keys)

        return await self._write(op, audited=False)

    @staticmethod
    async def _due_heads(
        tx: _Tx,
        now: float,
        limit: int,
        adapters: Sequence[str],
        readback_adapters: Sequence[str],
        municipality: str | None,
    ) -> list[asyncpg.Record]:
        """The due heads' deliveries, oldest due first. The ``lane_heads`` rows are locked
        (``SKIP LOCKED``: another process claims from that lane, or a writer changes its head),
        so two processes never claim in one lane; the deliveries are then read in a fresh
        snapshot, and only those still waiting and due are taken."""
        sql, params = due_heads(
            now, limit, adapters, readback_adapters, municipality, " FOR UPDATE SKIP LOCKED"
        )
        ids = [r[0] for r in await tx.fetch(sql, *params)]
        if not ids:
            return []
        found = {
            r["id"]: r
            for r in await tx.fetch(
                "SELECT * FROM deliveries WHERE id = ANY(?::bigint[]) FOR UPDATE SKIP LOCKED", ids
            )
        }
        return [
            found[i]
            for i in ids
            if i in found and still_claimable(found[i], now, readback_adapters)
        ]

    async def begin_attempt(
        self,
        delivery_id: int,
        message: Message,
        request_body: str,
        now: float,
        owner: str | None = None,
    ) -> int:
        async def op(tx: _Tx) -> int:
            if owner is not None:  # the row lock orders this against a reclaim or a claim
                lease = await tx.fetchrow(
                    "SELECT status, lease_owner, lease_until FROM deliveries"
                    " WHERE id = ? FOR UPDATE",
                    delivery_id,
                )
                refusal = lease_refusal(lease, owner, now)
                if refusal is not None:
                    raise LeaseLost(f"delivery {delivery_id}: {refusal}")
            return int(
                await tx.fetchval(
                    "INSERT INTO attempts (delivery_id, part, operation, message, started_at, request_body)"
                    " VALUES (?, ?, ?, ?, ?, ?) RETURNING id",
                    delivery_id,
                    message.part,
                    message.operation,
                    sealed_message(self.keys, delivery_id, message),
                    now,
                    request_body,
                )
            )

        return await self._grouped(op, audited=False)

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
    ) -> None:
        async def op(tx: _Tx) -> None:
            ended = await tx.fetch(
                END_ATTEMPT,
                now,
                record.outcome,
                record.http_status,
                record.latency_ms,
                record.response_body,
                record.error,
                attempt_id,
            )
            [sealed] = [seal(a) for a in audit_attempt_rows(tx.keys, tx.audit_key, ended)]
            tx.audit(
                now,
                f"attempt.{record.outcome}",
                {
                    "part": message.part,
                    "operation": message.operation,
                    "http_status": record.http_status,
                    "error": record.error,
                    "attempt": sealed,
                },
                report_pk=report_pk,
                delivery_id=delivery_id,
            )
            if record.outcome == "delivered":
                await _record_part(tx, report_pk, adapter, version, message, record, now)
            if settle is not None:
                await _settle(tx, delivery_id, settle, now, f"delivery.{settle.status}", report_pk)

        await self._grouped(op)

    async def settle(self, delivery_id: int, settle: Settle, now: float, event: str) -> None:
        await self._grouped(lambda tx: _settle(tx, delivery_id, settle, now, event, None))

    async def replace_parts(
        self,
        delivery_id: int,
        report_pk: int,
        adapter: str,
        parts: Sequence[DeliveredPart],
        now: float,
    ) -> None:
        async def op(tx: _Tx) -> None:
            await tx.execute(
                "DELETE FROM parts WHERE report_pk = ? AND adapter = ?", report_pk, adapter
            )
            await tx.executemany(
                "INSERT INTO parts (report_pk, adapter, part, version, fields, vendor_reference,"
                " updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        report_pk,
                        adapter,
                        p.part,
                        p.version,
                        sealed_part(self.keys, report_pk, adapter, p.part, p.fields),
                        p.vendor_reference,
                        now,
                    )
                    for p in parts
                ],
            )
            ids = [
                r["id"]
                for r in await tx.fetch(
                    "UPDATE attempts SET outcome = 'in_doubt_reconciled'"
                    " WHERE delivery_id = ? AND outcome = 'in_doubt' RETURNING id",
                    delivery_id,
                )
            ]
            sealed = await _seals(tx, "id = ANY(?::bigint[])", ids)
            tx.audit(
                now,
                "delivery.read_back",
                {"parts": [p.part for p in parts], "attempts_sealed": sealed},
                report_pk=report_pk,
                delivery_id=delivery_id,
            )

        await self._write(op)

    # -- endpoints -------------------------------------------------------------------------

    async def paused_endpoints(self) -> dict[tuple[str, str], str]:
        rows = await self._read(
            lambda tx: tx.fetch(
                "SELECT municipality, adapter, reason FROM endpoint_controls WHERE paused = 1"
            )
        )
        return {(r[0], r[1]): r[2] or "" for r in rows}

    async def open_breaker(self, municipality: str, adapter: str, until: float) -> None:
        await self._write(
            lambda tx: tx.execute(OPEN_BREAKER, municipality, adapter, until), audited=False
        )

    async def breakers_open(self, now: float) -> dict[tuple[str, str], float]:
        rows = await self._read(lambda tx: tx.fetch(BREAKERS_OPEN, now))
        return {(r[0], r[1]): r[2] for r in rows}

    async def set_paused(
        self, municipality: str, adapter: str, paused: bool, reason: str, actor: str, now: float
    ) -> None:
        async def op(tx: _Tx) -> None:
            await tx.execute(
                "INSERT INTO endpoint_controls (municipality, adapter, paused, reason, actor, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (municipality, adapter) DO UPDATE SET"
                " paused = excluded.paused, reason = excluded.reason, actor = excluded.actor,"
                " updated_at = excluded.updated_at",
                municipality,
                adapter,
                int(paused),
                reason,
                actor,
                now,
            )
            tx.audit(
                now,
                "endpoint.paused" if paused else "endpoint.resumed",
                {"municipality": municipality, "adapter": adapter, "reason": reason},
                actor=actor,
            )

        await self._write(op)

    async def defer_due(self, municipality: str, adapter: str, until: float, now: float) -> int:
        """Move due deliveries of a closed endpoint to its opening: waiting, not a burned retry.

        Under the writers' lock (no audit event): writers lock a lane's head delivery
        before its ``lane_heads`` row, and this one would take them the other way round."""
        waiting = (Status.QUEUED, Status.RETRY_SCHEDULED)

        async def op(tx: _Tx) -> int:
            count = await tx.execute(
                "UPDATE deliveries SET deferred_from = COALESCE(deferred_from, next_attempt_at),"
                " next_attempt_at = ?, updated_at = ? WHERE municipality = ?"
                " AND adapter = ? AND status IN (?, ?) AND next_attempt_at < ?",
                until,
                now,
                municipality,
                adapter,
                *waiting,
                until,
            )
            await tx.execute(  # the same rows, where they head their lane
                "UPDATE lane_heads SET due_at = ? WHERE municipality = ? AND adapter = ?"
                " AND status IN (?, ?) AND due_at < ?",
                until,
                municipality,
                adapter,
                *waiting,
                until,
            )
            return count

        return await self._write(op)

    async def undefer(self, municipality: str | None, adapter: str | None, now: float) -> int:
        """Give work deferred to an opening its own due time back (all endpoints, or one)."""
        endpoint = ""
        params: list[str] = [Status.QUEUED, Status.RETRY_SCHEDULED]
        if municipality is not None and adapter is not None:
            endpoint = " AND municipality = ? AND adapter = ?"
            params += [municipality, adapter]

        async def op(tx: _Tx) -> int:
            count = await tx.execute(
                "UPDATE deliveries SET next_attempt_at = deferred_from, deferred_from = NULL,"
                f" updated_at = ? WHERE deferred_from IS NOT NULL AND status IN (?, ?){endpoint}",
                now,
                *params,
            )
            if count:
                await tx.execute(UNDEFER_HEADS + endpoint, *params)
            return count

        return await self._write(op)

    # -- operations ------------------------------------------------------------------------

    async def list_deliveries(
        self, filters: Mapping[str, Any], limit: int = 200
    ) -> list[dict[str, Any]]:
        """Newest first; ``before_id`` continues a list after its last row (keyset)."""
        where, params = filter_sql(filters)

        async def read(tx: _Tx) -> list[dict[str, Any]]:
            rows = await tx.fetch(LIST_SQL.format(where=where), *params, limit)
            return [list_view(row, await _blocker(tx, row)) for row in rows]

        return await self._read(read)

    async def count_deliveries(self, filters: Mapping[str, Any]) -> int:
        where, params = filter_sql(count_filters(filters))
        sql = COUNT_SQL.format(where=where)
        return int(await self._read(lambda tx: tx.fetchval(sql, *params)))

    async def overview(self, now: float, day_start: float) -> list[dict[str, Any]]:
        async def read(tx: _Tx) -> list[dict[str, Any]]:
            counts = await tx.fetch(OVERVIEW_SQL, day_start)
            spent = await tx.fetch(LATENCIES_SQL, now - LATENCY_WINDOW, now)
            return overview_rows(counts, spent)

        return await self._read(read)

    async def delivery_detail(self, delivery_id: int) -> dict[str, Any] | None:
        async def read(tx: _Tx) -> dict[str, Any] | None:
            row = await tx.fetchrow(LIST_SQL.format(where="d.id = ?"), delivery_id, 1)
            if row is None:
                return None
            report = await tx.fetchrow(DETAIL_REPORT_SQL, row["report_pk"])
            assert report is not None
            versions = await tx.fetch(DETAIL_VERSIONS_SQL, row["report_pk"])
            attempts = await tx.fetch(
                "SELECT * FROM attempts WHERE delivery_id = ? ORDER BY id", delivery_id
            )
            audit = [audit_view(r) for r in await tx.fetch(AUDIT_FOR_SQL, delivery_id)]
            return delivery_detail_view(
                self.keys,
                list_view(row, await _blocker(tx, row)),
                report,
                versions,
                attempts,
                audit,
            )

        return await self._read(read)

    async def count_at_risk(self) -> int:
        return int(
            await self._read(
                lambda tx: tx.fetchval("SELECT COUNT(*) FROM deliveries WHERE at_risk = 1")
            )
        )

    async def operate(
        self,
        action: str,
        filters: Mapping[str, Any],
        actor: str,
        reason: str,
        now: float,
        readback_adapters: Sequence[str] = (),
        vendor_reference: str | None = None,
    ) -> dict[str, list[int]]:
        """Replay, cancel, check or confirm the selected deliveries; each change audited."""
        where, params = filter_sql(filters)
        event = deliveries.ACTIONS[action]
        detail = Detail(error=reason, actor=actor, vendor_reference=vendor_reference)

        async def op(tx: _Tx) -> dict[str, list[int]]:
            rows = await tx.fetch(
                f"SELECT d.* FROM deliveries d JOIN reports r ON r.id = d.report_pk"
                f" WHERE {where} ORDER BY d.id FOR UPDATE OF d",
                *params,
            )
            done: dict[str, list[int]] = {"changed": [], "skipped": []}
            for row in rows:
                try:
                    decision = deliveries.decide(
                        facts(row, row["adapter"] in readback_adapters), event, None, now, detail
                    )
                except IllegalTransition:
                    done["skipped"].append(row["id"])
                    continue
                extra = None
                if event is Event.CONFIRM:
                    extra = {
                        "attempts_sealed": await _confirm_parts(tx, row, vendor_reference, now)
                    }
                await _record_decision(
                    tx,
                    row["id"],
                    decision,
                    now,
                    report_pk=row["report_pk"],
                    actor=actor,
                    extra=extra,
                )
                done["changed"].append(row["id"])
            return done

        return await self._write(op)

    async def flag_at_risk(self, now: float, margin: float) -> list[dict[str, Any]]:
        """Flag undelivered deliveries that will miss their payroll cut-off; return the new ones."""

        async def op(tx: _Tx) -> list[dict[str, Any]]:
            rows = await tx.fetch(  # candidates only: the rule is deliveries.is_at_risk
                "SELECT d.*, r.report_id FROM deliveries d JOIN reports r ON r.id = d.report_pk"
                f" WHERE d.at_risk = 0 AND d.cutoff_at IS NOT NULL AND d.status IN ({WATCHED_SQL})"
                " ORDER BY d.id FOR UPDATE OF d"
            )
            flagged = []
            for row in rows:
                delivery = facts(row)
                if not deliveries.is_at_risk(delivery, now, margin):
                    continue
                decision = deliveries.decide(delivery, Event.AT_RISK, None, now)
                await _record_decision(tx, row["id"], decision, now, report_pk=row["report_pk"])
                flagged.append(at_risk_view(row))
            return flagged

        return await self._write(op)

    # -- file runs (IND01) -----------------------------------------------------------------

    async def file_run_begin(self, run: dict[str, Any], now: float) -> None:
        async def op(tx: _Tx) -> None:
            await tx.execute(
                "INSERT INTO file_runs (run_id, municipality, adapter, file, offset_before, data,"
                " first_line, header_lines, deliveries, started_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                run["run_id"],
                run["municipality"],
                run["adapter"],
                run["file"],
                run["offset_before"],
                sealed_run_data(self.keys, run["run_id"], run["data"]),
                run["first_line"],
                run["header_lines"],
                sealed_run_deliveries(self.keys, run["run_id"], run["deliveries"]),
                now,
            )
            tx.audit(
                now,
                "file_run.begin",
                {
                    "run_id": run["run_id"],
                    "file": run["file"],
                    "deliveries": len(run["deliveries"]),
                },
            )

        await self._write(op)

    async def file_runs_unfinished(self, file: str) -> list[dict[str, Any]]:
        rows = await self._read(
            lambda tx: tx.fetch(
                "SELECT * FROM file_runs WHERE file = ? AND finished_at IS NULL ORDER BY started_at",
                file,
            )
        )
        return [open_run(self.keys, r) for r in rows]

    async def file_run_finish(
        self, run_id: str, line_numbers: Sequence[int], outcome: str, now: float
    ) -> None:
        """The run's lines are in the file: its deliveries are delivered (one transaction)."""

        async def op(tx: _Tx) -> None:
            run = await tx.fetchrow("SELECT * FROM file_runs WHERE run_id = ?", run_id)
            assert run is not None
            await tx.execute(
                "UPDATE file_runs SET finished_at = ?, outcome = ? WHERE run_id = ?",
                now,
                outcome,
                run_id,
            )
            tx.audit(now, "file_run.finish", {"run_id": run_id, "outcome": outcome})
            name = Path(run["file"]).name
            for delivery_id, item in open_run_deliveries(
                self.keys, run_id, run["deliveries"]
            ).items():
                refs = [f"{name}:{line_numbers[i]}" for i in item["lines"]]
                await _file_delivered(tx, int(delivery_id), item, refs, now)

        await self._write(op)

    # -- alerts (gateway.alerts decides; the store saves) -------------------------------------

    async def alert_facts(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Deliveries counted per endpoint, state, flag; and the newest ones that need someone."""

        async def read(tx: _Tx) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
            groups = [dict(r) for r in await tx.fetch(FACT_GROUPS)]
            return groups, [dict(r) for r in await tx.fetch(FACT_SAMPLES)]

        return await self._read(read)

    async def open_alerts(self) -> list[dict[str, Any]]:
        return [alert_view(r) for r in await self._read(lambda tx: tx.fetch(OPEN_ALERTS))]

    async def apply_alerts(self, plan: AlertPlan, now: float) -> dict[str, list[str]]:
        """Open, refresh and resolve alerts, queue their notifications, audit it: one commit.

        An alert another process opened or resolved first is left as that process left it
        (the partial unique index keeps one open alert per cause).
        """

        async def op(tx: _Tx) -> dict[str, list[str]]:
            done: dict[str, list[str]] = {"opened": [], "resolved": []}
            for new in plan.opened:
                row = await tx.fetchrow(
                    INSERT_ALERT, new.uid, new.cause, new.kind, payload_json(new.payload), now, now
                )
                if row is not None:
                    done["opened"].append(new.uid)
                    await _notify(tx, row[0], "opened", plan.channels, now)
                    tx.audit(now, "alert.opened", opened_event(new))
            for alert_id, payload in plan.updated:
                await tx.execute(UPDATE_ALERT, payload_json(payload), now, alert_id)
            for alert_id in plan.resolved:
                row = await tx.fetchrow(RESOLVE_ALERT, now, now, alert_id)
                if row is not None:
                    done["resolved"].append(row["uid"])
                    if plan.notify_resolved:
                        await _notify(tx, alert_id, "resolved", plan.channels, now)
                    detail = {"alert": row["uid"], "cause": row["cause"], "kind": row["kind"]}
                    tx.audit(now, "alert.resolved", detail)
            return done

        return await self._write(op)

    async def claim_alert_notifications(
        self, now: float, owner: str, lease_seconds: float, limit: int
    ) -> list[dict[str, Any]]:
        """Due notifications, leased to ``owner``; rows another process is claiming are skipped."""

        async def op(tx: _Tx) -> list[dict[str, Any]]:
            rows = await tx.fetch(CLAIM_POSTGRES, owner, now + lease_seconds, now, now, limit)
            ids = [r[0] for r in rows]
            if not ids:
                return []
            sql = CLAIMED.format(ids=",".join("?" * len(ids)))
            return [claimed_view(r) for r in await tx.fetch(sql, owner, *ids)]

        return await self._write(op, audited=False)

    async def finish_alert_notification(
        self, notification_id: int, owner: str, outcome: SendOutcome, now: float
    ) -> bool:
        """Record one send attempt (audited); False when ``owner`` had lost the lease."""

        async def op(tx: _Tx) -> bool:
            finished = now if outcome.state != "pending" else None
            changed = await tx.execute(
                FINISH_NOTIFICATION,
                outcome.state,
                outcome.next_attempt_at,
                outcome.error,
                finished,
                notification_id,
                owner,
            )
            if changed:
                tx.audit(now, outcome.event, dict(outcome.detail))
            return bool(changed)

        return await self._write(op)

    async def list_alerts(self, open_only: bool, limit: int = 200) -> list[dict[str, Any]]:
        """Alerts, newest first, each with its notifications."""
        where = "WHERE resolved_at IS NULL" if open_only else ""

        async def read(tx: _Tx) -> list[dict[str, Any]]:
            alerts = [alert_view(r) for r in await tx.fetch(LIST_ALERTS.format(where=where), limit)]
            ids = [a["id"] for a in alerts]
            rows = (
                await tx.fetch(NOTIFICATIONS_OF.format(ids=",".join("?" * len(ids))), *ids)
                if ids
                else []
            )
            return with_notifications(alerts, rows)

        return await self._read(read)


# -- the pieces of a transaction ------------------------------------------------------------


async def _notify(tx: _Tx, alert_id: int, notice: str, channels: Sequence[str], now: float) -> None:
    await tx.executemany(
        INSERT_NOTIFICATION, [(alert_id, notice, channel, now, now) for channel in channels]
    )


async def _blocker(tx: _Tx, d: Mapping[str, Any]) -> dict[str, Any] | None:
    if not waits_in_lane(d):
        return None
    return blocker_view(
        await tx.fetchrow(
            f"SELECT d.id, d.status, r.report_id FROM deliveries d JOIN reports r ON r.id = d.report_pk"
            f" WHERE d.municipality = ? AND d.adapter = ? AND d.employee_key = ? AND d.id < ?"
            f" AND d.status IN ({BLOCKING_SQL}) ORDER BY d.id LIMIT 1",
            d["municipality"],
            d["adapter"],
            d["employee_key"],
            d["id"],
        )
    )


async def _jobs(tx: _Tx, rows: Sequence[asyncpg.Record], keys: DataKeys) -> list[Job]:
    """The claimed rows as jobs, with three queries for all of them."""
    versions = {
        v["id"]: v
        for v in await tx.fetch(
            "SELECT v.id, v.body, v.request_id, c.employee_cpr, c.approved_by_cpr FROM report_versions v"
            " JOIN report_cprs c ON c.version_pk = v.id WHERE v.id = ANY(?::bigint[])",
            [r["version_pk"] for r in rows],
        )
    }
    parts: dict[tuple[int, str], list[asyncpg.Record]] = {}
    for p in await tx.fetch(
        "SELECT * FROM parts WHERE report_pk = ANY(?::bigint[]) ORDER BY part",
        list({r["report_pk"] for r in rows}),
    ):
        parts.setdefault((p["report_pk"], p["adapter"]), []).append(p)
    texts: dict[int, list[str]] = {}
    doubtful = [r["id"] for r in rows if r["status"] == Status.IN_DOUBT]
    if doubtful:
        for a in await tx.fetch(
            "SELECT delivery_id, message FROM attempts WHERE delivery_id = ANY(?::bigint[])"
            " AND outcome = ANY(?::text[]) ORDER BY id",
            doubtful,
            list(PENDING_OUTCOMES),
        ):
            texts.setdefault(a["delivery_id"], []).append(a["message"])
    return [
        build_job(
            r,
            versions[r["version_pk"]],
            parts.get((r["report_pk"], r["adapter"]), []),
            texts.get(r["id"], []),
            keys,
        )
        for r in rows
    ]


async def _record_part(
    tx: _Tx,
    report_pk: int,
    adapter: str,
    version: int,
    msg: Message,
    record: AttemptRecord,
    now: float,
) -> None:
    if msg.deletes:
        await tx.execute(
            "DELETE FROM parts WHERE report_pk = ? AND adapter = ? AND part = ?",
            report_pk,
            adapter,
            msg.part,
        )
        return
    await tx.execute(
        "INSERT INTO parts (report_pk, adapter, part, version, fields, vendor_reference, updated_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (report_pk, adapter, part) DO UPDATE SET"
        " version = excluded.version, fields = excluded.fields,"
        " vendor_reference = excluded.vendor_reference, updated_at = excluded.updated_at",
        report_pk,
        adapter,
        msg.part,
        version,
        sealed_part(tx.keys, report_pk, adapter, msg.part, msg.fields),
        record.vendor_reference,
        now,
    )


async def _settle(
    tx: _Tx, delivery_id: int, settle: Settle, now: float, event: str, report_pk: int | None
) -> None:
    await _record_decision(tx, delivery_id, settled(settle, event), now, report_pk=report_pk)


async def _record_decision(
    tx: _Tx,
    delivery_id: int,
    decision: Decision,
    now: float,
    *,
    report_pk: int | None = None,
    actor: str = "gateway",
    extra: dict[str, Any] | None = None,
) -> None:
    """Persist what the state machine decided, and audit it (no deciding here)."""
    sql, params = decision_update(delivery_id, decision, now)
    if decision.changes_state:
        lane = await tx.fetchrow(sql + RETURNING_LANE, *params)
        if lane is not None:
            tx.touch((lane[0], lane[1], lane[2]))
    else:
        await tx.execute(sql, *params)
    tx.audit(
        now,
        decision.audit,
        {**decision_audit(decision), **(extra or {})},
        actor=actor,
        report_pk=report_pk,
        delivery_id=delivery_id,
    )


async def _seals(tx: _Tx, where: str, *params: Any) -> list[dict[str, Any]]:
    rows = await tx.fetch(f"{ATTEMPT_ROW} WHERE {where} ORDER BY id", *params)
    return [seal(a) for a in audit_attempt_rows(tx.keys, tx.audit_key, rows)]


async def _purge_batch(
    tx: _Tx, before: float, now: float, extra: Mapping[str, Any] | None
) -> dict[str, Any]:
    versions = [
        r["id"]
        for r in await tx.fetch(
            f"{PURGEABLE} ORDER BY v.id LIMIT {PURGE_BATCH} FOR UPDATE OF v", before, before
        )
    ]
    if not versions and not extra:
        return {"versions": 0, "cprs": 0, "attempt_bodies": 0}
    dids = [
        r["id"]
        for r in await tx.fetch(
            "SELECT id FROM deliveries WHERE version_pk = ANY(?::bigint[]) ORDER BY id", versions
        )
    ]
    bodies = await tx.execute(
        "UPDATE attempts SET request_body = NULL, response_body = NULL WHERE delivery_id"
        " = ANY(?::bigint[]) AND (request_body IS NOT NULL OR response_body IS NOT NULL)",
        dids,
    )
    cprs = await tx.execute("DELETE FROM report_cprs WHERE version_pk = ANY(?::bigint[])", versions)
    await tx.execute(
        "UPDATE report_versions SET body = '{}', purged_at = ? WHERE id = ANY(?::bigint[])",
        now,
        versions,
    )
    detail = purge_detail(before, versions, cprs, dids, bodies, extra or {})
    tx.audit(now, PURGE_EVENT, detail, actor="retention")
    return detail


async def _confirm_parts(
    tx: _Tx, row: asyncpg.Record, vendor_reference: str | None, now: float
) -> list[dict[str, Any]]:
    """The operator found the in-doubt sends at the vendor: record them as delivered parts,
    so a later version is planned against them (and never pays them twice)."""
    record = AttemptRecord("delivered", vendor_reference=vendor_reference)
    for a in await tx.fetch(
        "SELECT id, message FROM attempts WHERE delivery_id = ? AND outcome = 'in_doubt'"
        " ORDER BY id",
        row["id"],
    ):
        await _record_part(
            tx,
            row["report_pk"],
            row["adapter"],
            row["version"],
            open_message(tx.keys, row["id"], a["message"]),
            record,
            now,
        )
        await tx.execute("UPDATE attempts SET outcome = 'in_doubt_confirmed' WHERE id = ?", a["id"])
    return await _seals(tx, "delivery_id = ? AND outcome = 'in_doubt_confirmed'", row["id"])


async def _file_delivered(
    tx: _Tx, delivery_id: int, item: dict[str, Any], refs: list[str], now: float
) -> None:
    d = await tx.fetchrow("SELECT * FROM deliveries WHERE id = ? FOR UPDATE", delivery_id)
    reference = ", ".join(refs) or None
    if d is None or not deliveries.allowed(facts(d), Event.WRITTEN):
        return
    decision = deliveries.decide(
        facts(d), Event.WRITTEN, None, now, Detail(vendor_reference=reference)
    )
    for part in item["parts"]:
        await _record_part(
            tx,
            d["report_pk"],
            d["adapter"],
            d["version"],
            Message(part["part"], part["operation"], part["fields"]),
            AttemptRecord("delivered", vendor_reference=reference),
            now,
        )
    await _record_decision(tx, delivery_id, decision, now, report_pk=d["report_pk"])


async def _reject(
    tx: _Tx,
    municipality: str,
    source: str,
    record: PulledRecord,
    kind: PullOutcome,
    errors: Sequence[tuple[str, str]],
    now: float,
) -> None:
    """Record a rejection once per (record, content); seeing it again only counts."""
    key = (municipality, source, record.record_id, record.record_hash)
    updated = await tx.execute(
        "UPDATE intake_rejections SET last_seen_at = ?, times_seen = times_seen + 1, resolved_at = NULL"
        " WHERE municipality = ? AND source = ? AND record_id = ? AND content_hash = ?",
        now,
        *key,
    )
    if updated:
        return
    listed = [{"pointer": p, "message": m} for p, m in errors]
    await tx.execute(
        "INSERT INTO intake_rejections (municipality, source, record_id, content_hash, kind, errors,"
        " first_seen_at, last_seen_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        *key,
        str(kind),
        json.dumps(listed),
        now,
        now,
    )
    tx.audit(
        now,
        "intake.rejected",
        {
            "municipality": municipality,
            "source": source,
            "record_id": record.record_id,
            "kind": str(kind),
            "errors": listed,
        },
    )


class _Intake:
    """A batch of new report versions, decided row by row in Python exactly as ``SQLiteStore``
    does it, on rows fetched up front, then written with a handful of statements."""

    def __init__(self, tx: _Tx, now: float, ids: dict[str, list[int]], keys: DataKeys) -> None:
        self.tx, self.now, self.ids, self.keys = tx, now, ids, keys
        self.reports: dict[tuple[str, str], dict[str, Any]] = {}
        self.versions: dict[
            tuple[int, int], tuple[int, str]
        ] = {}  # (report_pk, version) -> (pk, hash)
        self.deliveries: list[dict[str, Any]] = []
        self.new_reports: list[dict[str, Any]] = []
        self.new_versions: list[tuple[Any, ...]] = []
        self.new_cprs: list[tuple[Any, ...]] = []
        self.new_deliveries: list[dict[str, Any]] = []
        self.superseded: list[tuple[int, Decision]] = []  # stored deliveries: (id, decision)

    @classmethod
    async def load(
        cls, tx: _Tx, news: Sequence[NewReport], now: float, data_keys: DataKeys
    ) -> _Intake:
        n = len(news)
        ids = (
            await tx.fetchrow(
                "SELECT ARRAY(SELECT nextval(pg_get_serial_sequence('reports', 'id')) FROM generate_series(1, ?::int)) r,"
                " ARRAY(SELECT nextval(pg_get_serial_sequence('report_versions', 'id')) FROM generate_series(1, ?::int)) v,"
                " ARRAY(SELECT nextval(pg_get_serial_sequence('deliveries', 'id')) FROM generate_series(1, ?::int)) d",
                n,
                n,
                n,
            )
            if n
            else {"r": [], "v": [], "d": []}
        )
        assert ids is not None
        batch = cls(
            tx, now, {"r": list(ids["r"]), "v": list(ids["v"]), "d": list(ids["d"])}, data_keys
        )
        keys = list({(new.municipality, new.report_id) for new in news})
        if not keys:
            return batch
        for r in await tx.fetch(
            "SELECT r.id, r.municipality, r.report_id, r.latest_version FROM reports r"
            " JOIN unnest(?::text[], ?::text[]) k(m, rid) ON r.municipality = k.m AND r.report_id = k.rid",
            [k[0] for k in keys],
            [k[1] for k in keys],
        ):
            batch.reports[(r["municipality"], r["report_id"])] = {
                "id": r["id"],
                "latest": r["latest_version"],
            }
        pks = [r["id"] for r in batch.reports.values()]
        for v in await tx.fetch(
            "SELECT id, report_pk, version, content_hash FROM report_versions"
            " WHERE report_pk = ANY(?::bigint[])",
            pks,
        ):
            batch.versions[(v["report_pk"], v["version"])] = (v["id"], v["content_hash"])
        batch.deliveries = [
            dict(d)
            for d in await tx.fetch(
                "SELECT * FROM deliveries WHERE report_pk = ANY(?::bigint[]) ORDER BY id FOR UPDATE",
                pks,
            )
        ]
        return batch

    def stored_version(self, new: NewReport) -> tuple[int, str] | None:
        report = self.reports.get((new.municipality, new.report_id))
        return None if report is None else self.versions.get((report["id"], new.version))

    def existing(self, version_pk: int, new: NewReport) -> Submitted:
        status = next(
            (d["status"] for d in self.deliveries if d["version_pk"] == version_pk), "not_routed"
        )
        return Submitted(
            version_pk, new.municipality, new.report_id, new.version, status, created=False
        )

    def insert(self, new: NewReport) -> Submitted:
        now, report = self.now, self.reports.get((new.municipality, new.report_id))
        if report is None:
            report = {"id": self.ids["r"].pop(0), "latest": new.version}
            self.reports[(new.municipality, new.report_id)] = report
            self.new_reports.append(
                {
                    "row": (
                        report["id"],
                        new.municipality,
                        new.report_id,
                        new.kind,
                        new.employee_key,
                        now,
                    ),
                    "report": report,
                }
            )
        else:
            report["latest"] = max(report["latest"], new.version)
            report["changed"] = True
        version_pk = self.ids["v"].pop(0)
        self.versions[(report["id"], new.version)] = (version_pk, new.content_hash)
        self.new_versions.append(
            (
                version_pk,
                report["id"],
                new.version,
                new.content_hash,
                sealed_body(self.keys, version_pk, new.body),
                now,
                new.request_id,
            )
        )
        self.new_cprs.append((version_pk, *sealed_cprs(self.keys, version_pk, new)))
        self.tx.audit(
            now,
            "report.received",
            {"version": new.version, "kind": new.kind},
            report_pk=report["id"],
        )
        status = "not_routed"
        if new.adapter is not None:
            status = self._add_delivery(new, report, version_pk)
        return Submitted(
            version_pk, new.municipality, new.report_id, new.version, status, created=True
        )

    def _add_delivery(self, new: NewReport, report: dict[str, Any], version_pk: int) -> str:
        status = deliveries.initial_status(new.version, report["latest"])
        d = {
            "id": self.ids["d"].pop(0),
            "version_pk": version_pk,
            "report_pk": report["id"],
            "adapter": new.adapter,
            "version": new.version,
            "status": status,
            "new": new,
            "last_error": None,
        }
        self.tx.audit(
            self.now,
            f"delivery.{status}",
            {"adapter": new.adapter, "version": new.version},
            report_pk=report["id"],
            delivery_id=d["id"],
        )
        if status == Status.QUEUED:
            self._supersede_older(report["id"], new.adapter or "", new.version)
        self.deliveries.append(d)
        self.new_deliveries.append(d)
        return status

    def _supersede_older(self, report_pk: int, adapter: str, version: int) -> None:
        """A newer version replaces older ones that have not started (they are never sent)."""
        # which of them may be superseded is the state machine's to say
        for d in self.deliveries:
            if d["report_pk"] != report_pk or d["adapter"] != adapter or d["version"] >= version:
                continue
            delivery = facts(d)
            if not deliveries.allowed(delivery, Event.SUPERSEDED):
                continue
            decision = deliveries.decide(
                delivery, Event.SUPERSEDED, None, self.now, Detail(by_version=version)
            )
            d.update(status=decision.status, last_error=decision.last_error)
            if (
                "new" not in d
            ):  # a stored one is written by the writer at flush; a new one is inserted so
                self.superseded.append((d["id"], decision))
                self.tx.touch((d["municipality"], d["adapter"], d["employee_key"]))
            self.tx.audit(
                self.now,
                decision.audit,
                decision_audit(decision),
                report_pk=report_pk,
                delivery_id=d["id"],
            )

    async def flush(self) -> None:
        tx, now = self.tx, self.now
        await tx.executemany(
            "INSERT INTO reports (id, municipality, report_id, kind, employee_key, latest_version, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            [(*r["row"][:5], r["report"]["latest"], r["row"][5]) for r in self.new_reports],
        )
        await tx.executemany(
            "UPDATE reports SET latest_version = ? WHERE id = ?",
            [(r["latest"], r["id"]) for r in self.reports.values() if r.get("changed")],
        )
        await tx.executemany(
            "INSERT INTO report_versions (id, report_pk, version, content_hash, body,"
            " received_at, request_id) VALUES (?, ?, ?, ?, ?, ?, ?)",
            self.new_versions,
        )
        await tx.executemany(CPRS_INSERT, self.new_cprs)
        await tx.executemany(
            "INSERT INTO deliveries (id, version_pk, report_pk, municipality, adapter, employee_key, version,"
            " status, next_attempt_at, created_at, updated_at, cutoff_at, last_error, period)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    d["id"],
                    d["version_pk"],
                    d["report_pk"],
                    d["new"].municipality,
                    d["adapter"],
                    d["new"].employee_key,
                    d["version"],
                    d["status"],
                    now,
                    now,
                    now,
                    d["new"].cutoff_at,
                    d["last_error"],
                    d["new"].period,
                )
                for d in self.new_deliveries
            ],
        )
        for delivery_id, decision in self.superseded:
            sql, params = decision_update(delivery_id, decision, now)
            await tx.execute(sql, *params)
        for d in self.new_deliveries:
            if deliveries.blocks_lane(d["status"]):
                tx.touch((d["new"].municipality, d["adapter"], d["new"].employee_key))


__all__ = ["PostgresStore", "store_error"]
