"""The embedded store: one SQLite file, WAL, ``synchronous=FULL``, one batching writer.

All writes go through a single writer task that commits the operations queued while the
previous commit ran in one transaction (group commit: TECH-NOTES §6). Each caller awaits
its own operation's result, which is only delivered after the commit returned, so a
caller that got a result knows it is durable. Reads use their own connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

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
    CLAIM_SQLITE,
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
    LANE_HEAD_CANDIDATE,
    LANE_HEAD_DELETE,
    LANE_HEAD_IF_FIRST,
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
    message_context,
    message_seal,
    message_text,
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
Op = Callable[[sqlite3.Connection], Any]
_MAX_BATCH = 512
#: attempts begun and not yet ended whose audit digest is kept (more: opened from the row)
_SAID_LIMIT = 10_000


def store_error(exc: BaseException) -> StoreError | None:
    """The one place SQLite's failures become ``StoreError`` (intake answers 503, not 500):
    a full disk, I/O errors, a lock held too long, a database that cannot be opened."""
    if isinstance(exc, StoreError):
        return exc
    if isinstance(exc, sqlite3.OperationalError | sqlite3.DatabaseError) and not isinstance(
        exc, sqlite3.IntegrityError | sqlite3.ProgrammingError
    ):
        return StoreError(f"the SQLite store failed: {exc}")
    if isinstance(exc, OSError):
        return StoreError(f"the SQLite store failed: {exc}")
    return None


#: the database and SQLite's side files hold personal data: the gateway's user only
PRIVATE_MODE = 0o600
SIDE_FILES = ("", "-wal", "-shm", "-journal")


def _private_files(path: str) -> None:
    """Create the database file 0600 (SQLite gives its -wal and -shm files the database's
    mode), and take group and other access from files an older gateway created."""
    if path == ":memory:" or path.startswith("file:"):
        return
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_MODE))
    for suffix in SIDE_FILES:
        with contextlib.suppress(FileNotFoundError):
            os.chmod(path + suffix, PRIVATE_MODE)


def _connect(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("PRAGMA busy_timeout=30000")
    return conn


class SQLiteStore:
    """Store engine on one SQLite file (one gateway process)."""

    single_process = True

    def __init__(self, path: str, keys: DataKeys, audit_key: bytes = UNKEYED) -> None:
        self.path = path
        self.keys = keys
        self.audit_key = audit_key
        self._queue: asyncio.Queue[tuple[Op, asyncio.Future[Any]]] | None = None
        self._writer_task: asyncio.Task[None] | None = None
        self._wconn: sqlite3.Connection | None = None
        self._rconn: sqlite3.Connection | None = None
        self._wpool = ThreadPoolExecutor(1, thread_name_prefix="sqlite-writer")
        # in an intake batch (writer thread only): its audit events and version ids
        self._events: list[tuple[Any, ...]] | None = None
        self._version_ids: Iterator[int] | None = None
        # the audit trail's head (id, HMAC) as this transaction left it (writer thread only;
        # None: read it): saves re-reading it for every event of a batch
        self._head: dict[str, Any] | None = None
        # attempt id -> message_seal of what begin_attempt sealed (event loop only): its end
        # seals the row without opening the message again; absent (another process, a
        # restart): opened from the row as before
        self._said: dict[int, str] = {}
        self._rpool = ThreadPoolExecutor(1, thread_name_prefix="sqlite-reader")
        self.commits = 0  # write transactions committed (group commit's tests count them)

    # -- life cycle ----------------------------------------------------------------------

    async def open(self) -> None:
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._wpool, _private_files, self.path)
        self._wconn = await loop.run_in_executor(self._wpool, _connect, self.path)
        await loop.run_in_executor(self._wpool, self._migrate)
        await loop.run_in_executor(self._wpool, self._reseal_now, False)
        await loop.run_in_executor(self._wpool, self._backfill_periods)
        await loop.run_in_executor(self._wpool, _private_files, self.path)  # -wal, -shm now exist
        self._rconn = await loop.run_in_executor(self._rpool, _connect, self.path)
        self._queue = asyncio.Queue()
        self._writer_task = asyncio.create_task(self._writer(), name="sqlite-writer")

    async def aclose(self) -> None:
        if self._writer_task is not None:
            self._writer_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer_task
            self._writer_task = None
        self._fail_queued(StoreError("store closed"))
        loop = asyncio.get_running_loop()
        for pool, conn in ((self._wpool, self._wconn), (self._rpool, self._rconn)):
            if conn is not None:
                await loop.run_in_executor(pool, conn.close)
        self._wconn = self._rconn = None
        self._wpool.shutdown(wait=False)
        self._rpool.shutdown(wait=False)

    def _migrate(self) -> None:
        conn = self._wconn
        assert conn is not None
        conn.execute(SCHEMA_TABLE)
        done = {r[0] for r in conn.execute("SELECT version FROM schema_migrations")}
        check_version(max(done, default=None))
        for number, name, sql in pending(done):
            conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in statements(sql, "sqlite"):
                    conn.execute(statement)
                conn.execute(
                    "INSERT INTO schema_migrations VALUES (?, ?, ?)", (number, name, applied_at())
                )
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        conn.execute("BEGIN IMMEDIATE")
        try:
            self._rechain(conn)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def _rechain(self, conn: sqlite3.Connection) -> None:
        """Once, after migration 8: chain the stored events with the key, seal the attempts."""
        if conn.execute("SELECT pending FROM audit_rechain").fetchone() is None:
            return
        events = conn.execute("SELECT * FROM audit_events ORDER BY id").fetchall()
        if events:
            conn.executemany(
                "UPDATE audit_events SET prev_hash = ?, hash = ?, hmac = ? WHERE id = ?",
                rechained(self.audit_key, events),
            )
            attempts = audit_attempt_rows(
                self.keys,
                self.audit_key,
                conn.execute(f"{ATTEMPT_ROW} WHERE finished_at IS NOT NULL ORDER BY id").fetchall(),
            )
            self._audit(conn, time.time(), "audit.rechained", rechain_detail(events, attempts))
        conn.execute("DELETE FROM audit_rechain")

    def _reseal_now(self, rotate: bool) -> dict[str, int]:
        """Seal what is stored in clear (``rotate``: re-seal all under the current key), one
        transaction; the counts of rows changed per table."""
        conn = self._wconn
        assert conn is not None
        conn.execute("BEGIN IMMEDIATE")
        try:
            counts = self._reseal(conn, rotate)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return counts

    def _backfill_periods(self) -> int:
        """Give deliveries stored before migration 9 the period of their report (once: the
        rows that get one are not looked at again)."""
        conn = self._wconn
        assert conn is not None
        conn.execute("BEGIN IMMEDIATE")
        try:
            found = backfilled_periods(self.keys, conn.execute(PERIODLESS_SQL).fetchall())
            conn.executemany(SET_PERIOD_SQL, found)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return len(found)

    def _reseal(self, conn: sqlite3.Connection, rotate: bool) -> dict[str, int]:
        counts = {}
        for table in RESEAL_TABLES:
            updates = [
                u
                for row in conn.execute(reseal_select(table, rotate)).fetchall()
                if (u := resealed(self.keys, table, row, rotate)) is not None
            ]
            conn.executemany(RESEAL_UPDATE[table], updates)
            counts[table] = len(updates)
        return counts

    async def reseal(self, rotate: bool) -> dict[str, int]:
        return await self._write(lambda conn: self._reseal(conn, rotate))

    @contextlib.asynccontextmanager
    async def file_lock(self, key: str) -> AsyncIterator[None]:
        """One process only: the file runner's own lock (and the file's flock) suffice."""
        yield

    # -- the writer ----------------------------------------------------------------------

    async def _write(self, op: Callable[[sqlite3.Connection], T]) -> T:
        if self._queue is None or self._writer_task is None or self._writer_task.done():
            raise StoreError("the store's writer is not running")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((op, future))
        return await future

    async def _writer(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            while len(batch) < _MAX_BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                results = await loop.run_in_executor(
                    self._wpool, self._apply, [op for op, _ in batch]
                )
            except asyncio.CancelledError:
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(StoreError("store closed before commit"))
                raise
            for (_, fut), (ok, value) in zip(batch, results, strict=True):
                if fut.done():
                    continue
                if ok:
                    fut.set_result(value)
                else:
                    fut.set_exception(value)

    def _apply(self, ops: Sequence[Op]) -> list[tuple[bool, Any]]:
        """Run ``ops`` in one transaction, each in its own savepoint; then commit."""
        conn = self._wconn
        assert conn is not None
        results: list[tuple[bool, Any]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            self._head = None  # another process (the CLI) may have appended since
            for op in ops:
                results.append(self._run_one(conn, op))
            self._commit(conn)
            self.commits += 1
        except Exception as exc:  # the commit (or BEGIN) failed: nothing of the batch is durable
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            error = StoreError(f"commit failed: {store_error(exc) or exc}")
            return [(False, error)] * len(ops)
        return results

    def _run_one(self, conn: sqlite3.Connection, op: Op) -> tuple[bool, Any]:
        conn.execute("SAVEPOINT op")
        try:
            value = op(conn)
        except Exception as exc:
            conn.execute("ROLLBACK TO op")
            conn.execute("RELEASE op")
            self._head = None  # its events are gone
            return False, store_error(exc) or exc
        conn.execute("RELEASE op")
        return True, value

    def _commit(self, conn: sqlite3.Connection) -> None:
        conn.execute("COMMIT")

    def _fail_queued(self, error: Exception) -> None:
        while self._queue is not None and not self._queue.empty():
            _, fut = self._queue.get_nowait()
            if not fut.done():
                fut.set_exception(error)

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn = self._rconn
        if conn is None:
            raise StoreError("store is not open")
        try:
            return await asyncio.get_running_loop().run_in_executor(self._rpool, fn, conn)
        except Exception as exc:
            mapped = store_error(exc)
            if mapped is None or mapped is exc:
                raise
            raise mapped from exc

    # -- audit ---------------------------------------------------------------------------

    def _audit(
        self,
        conn: sqlite3.Connection,
        now: float,
        event: str,
        detail: dict[str, Any],
        *,
        actor: str = "gateway",
        report_pk: int | None = None,
        delivery_id: int | None = None,
    ) -> None:
        """Append to the hash-chained audit trail, inside the caller's transaction (or, in an
        intake batch, at its end: :meth:`_batched`)."""
        record = (now, actor, event, report_pk, delivery_id, detail)
        if self._events is not None:
            self._events.append(record)
            return
        # read inside the write transaction (another process, the CLI, may have appended),
        # once: the transaction holds the lock, and its own events move the head on
        head = self._head
        if head is None:
            last = conn.execute(AUDIT_HEAD).fetchone()
            head = {"id": 0, "hmac": ""} if last is None else {"id": last[0], "hmac": last[1]}
        [row] = audit_rows(self.audit_key, head, [record])
        conn.execute(AUDIT_INSERT, row)
        self._head = {"id": row[0], "hmac": row[-1]}

    @contextlib.contextmanager
    def _batched(self, conn: sqlite3.Connection) -> Iterator[None]:
        """An intake batch: its audit events chained and inserted at its end in one go (one
        head read, one ``executemany``), and its versions numbered from one ``MAX(id)``."""
        self._events, self._version_ids, self._head = [], None, None
        try:
            yield
            if self._events:
                head = conn.execute(AUDIT_HEAD).fetchone()
                conn.executemany(AUDIT_INSERT, audit_rows(self.audit_key, head, self._events))
        finally:
            self._events, self._version_ids, self._head = None, None, None

    def _next_version_pk(self, conn: sqlite3.Connection) -> int:
        """The id the next report version gets (the writer's transaction holds the lock)."""
        if self._version_ids is None:
            last = conn.execute("SELECT COALESCE(MAX(id), 0) FROM report_versions").fetchone()[0]
            if self._events is None:  # not in a batch: nothing to remember
                return int(last) + 1
            self._version_ids = itertools.count(int(last) + 1)
        return next(self._version_ids)

    def _seals(
        self, conn: sqlite3.Connection, where: str, *params: Any, known: Mapping[int, str] = {}
    ) -> list[dict[str, Any]]:
        rows = conn.execute(f"{ATTEMPT_ROW} WHERE {where} ORDER BY id", params).fetchall()
        return [seal(a) for a in audit_attempt_rows(self.keys, self.audit_key, rows, known)]

    # -- intake --------------------------------------------------------------------------

    async def ping(self) -> bool:
        return bool(await self._read(lambda c: c.execute("SELECT 1").fetchone()[0]))

    async def submit(self, reports: Sequence[NewReport], now: float) -> list[Submitted]:
        return await self._write(lambda conn: self._submit(conn, reports, now))

    def _submit(
        self, conn: sqlite3.Connection, reports: Sequence[NewReport], now: float
    ) -> list[Submitted]:
        results: list[Submitted] = []
        conflicts: list[int] = []
        with self._batched(conn):
            for index, new in enumerate(reports):
                report = self._stored_report(conn, new)
                if report is not None and report["id"] is not None:  # this version is stored
                    if report["content_hash"] != new.content_hash:
                        conflicts.append(index)
                        continue
                    results.append(self._existing(conn, report["id"], new))
                    continue
                results.append(self._insert(conn, new, now, report))
            if conflicts:
                raise ConflictingReport(conflicts)  # the savepoint rolls the whole batch back
        return results

    def _stored_report(self, conn: sqlite3.Connection, new: NewReport) -> sqlite3.Row | None:
        """The stored report (``report_pk``, ``latest_version``) with this version of it
        (``id``, ``content_hash``; NULL when not stored), or None (a new report)."""
        return conn.execute(  # type: ignore[no-any-return]
            "SELECT r.id AS report_pk, r.latest_version, v.id, v.content_hash FROM reports r"
            " LEFT JOIN report_versions v ON v.report_pk = r.id AND v.version = ?"
            " WHERE r.municipality = ? AND r.report_id = ?",
            (new.version, new.municipality, new.report_id),
        ).fetchone()

    # -- pull sources ----------------------------------------------------------------------

    async def take_pulled(
        self, municipality: str, source: str, records: Sequence[PulledRecord], now: float
    ) -> list[PullOutcome]:
        """Store the valid records and record the rejected ones, all in one transaction."""

        def op(conn: sqlite3.Connection) -> list[PullOutcome]:
            with self._batched(conn):
                return [self._take_one(conn, municipality, source, r, now) for r in records]

        return await self._write(op)

    def _take_one(
        self,
        conn: sqlite3.Connection,
        municipality: str,
        source: str,
        record: PulledRecord,
        now: float,
    ) -> PullOutcome:
        if record.report is None:
            self._reject(
                conn, municipality, source, record, PullOutcome.INVALID, record.errors, now
            )
            return PullOutcome.INVALID
        report = self._stored_report(conn, record.report)
        existing = report if report is not None and report["id"] is not None else None
        if existing is not None and existing["content_hash"] != record.report.content_hash:
            errors = CONFLICT_ERRORS
            self._reject(conn, municipality, source, record, PullOutcome.CONFLICT, errors, now)
            return PullOutcome.CONFLICT
        if existing is None:
            self._insert(conn, record.report, now, report)
        conn.execute(
            "UPDATE intake_rejections SET resolved_at = ? WHERE municipality = ? AND source = ?"
            " AND record_id = ? AND resolved_at IS NULL",
            (now, municipality, source, record.record_id),
        )
        return PullOutcome.CREATED if existing is None else PullOutcome.DUPLICATE

    def _reject(
        self,
        conn: sqlite3.Connection,
        municipality: str,
        source: str,
        record: PulledRecord,
        kind: PullOutcome,
        errors: Sequence[tuple[str, str]],
        now: float,
    ) -> None:
        """Record a rejection once per (record, content); seeing it again only counts."""
        key = (municipality, source, record.record_id, record.record_hash)
        updated = conn.execute(
            "UPDATE intake_rejections SET last_seen_at = ?, times_seen = times_seen + 1, resolved_at = NULL"
            " WHERE municipality = ? AND source = ? AND record_id = ? AND content_hash = ?",
            (now, *key),
        ).rowcount
        if updated:
            return
        listed = [{"pointer": p, "message": m} for p, m in errors]
        conn.execute(
            "INSERT INTO intake_rejections (municipality, source, record_id, content_hash, kind, errors,"
            " first_seen_at, last_seen_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (*key, str(kind), json.dumps(listed), now, now),
        )
        self._audit(
            conn,
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
        rows = await self._read(lambda c: c.execute(sql, (*params, limit)).fetchall())
        return [rejection_view(r) for r in rows]

    def _existing(self, conn: sqlite3.Connection, version_pk: int, new: NewReport) -> Submitted:
        row = conn.execute(
            "SELECT status FROM deliveries WHERE version_pk = ?", (version_pk,)
        ).fetchone()
        return Submitted(
            version_pk,
            new.municipality,
            new.report_id,
            new.version,
            row["status"] if row else "not_routed",
            created=False,
        )

    def _insert(
        self, conn: sqlite3.Connection, new: NewReport, now: float, report: sqlite3.Row | None
    ) -> Submitted:
        """A new version (of a new report when ``report`` is None: see :meth:`_stored_report`)."""
        if report is None:
            report_pk = conn.execute(
                "INSERT INTO reports (municipality, report_id, kind, employee_key, latest_version, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (new.municipality, new.report_id, new.kind, new.employee_key, new.version, now),
            ).lastrowid
            latest = new.version
        else:
            report_pk, latest = report["report_pk"], max(report["latest_version"], new.version)
            if latest != report["latest_version"]:
                conn.execute(
                    "UPDATE reports SET latest_version = ? WHERE id = ?", (latest, report_pk)
                )
        version_pk = self._next_version_pk(conn)  # the body is sealed to its id
        conn.execute(
            "INSERT INTO report_versions (id, report_pk, version, content_hash, body, received_at,"
            " request_id) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                version_pk,
                report_pk,
                new.version,
                new.content_hash,
                sealed_body(self.keys, version_pk, new.body),
                now,
                new.request_id,
            ),
        )
        conn.execute(CPRS_INSERT, (version_pk, *sealed_cprs(self.keys, version_pk, new)))
        self._audit(
            conn,
            now,
            "report.received",
            {"version": new.version, "kind": new.kind},
            report_pk=report_pk,
        )
        assert report_pk is not None and version_pk is not None
        status = "not_routed"
        if new.adapter is not None:
            status = self._add_delivery(
                conn, new, report_pk, version_pk, latest, now, older=report is not None
            )
        return Submitted(
            version_pk, new.municipality, new.report_id, new.version, status, created=True
        )

    def _add_delivery(
        self,
        conn: sqlite3.Connection,
        new: NewReport,
        report_pk: int,
        version_pk: int,
        latest: int,
        now: float,
        older: bool = True,
    ) -> str:
        """``older``: the report may have deliveries of earlier versions (False: the report
        row was created by this call, and reports and deliveries are never deleted)."""
        status = deliveries.initial_status(new.version, latest)
        delivery_id = conn.execute(
            "INSERT INTO deliveries (version_pk, report_pk, municipality, adapter, employee_key, version,"
            " status, next_attempt_at, created_at, updated_at, cutoff_at, period)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                version_pk,
                report_pk,
                new.municipality,
                new.adapter,
                new.employee_key,
                new.version,
                status,
                now,
                now,
                now,
                new.cutoff_at,
                new.period,
            ),
        ).lastrowid
        self._audit(
            conn,
            now,
            f"delivery.{status}",
            {"adapter": new.adapter, "version": new.version},
            report_pk=report_pk,
            delivery_id=delivery_id,
        )
        if deliveries.blocks_lane(status):  # the last of its lane: its head if nothing blocks it
            conn.execute(
                LANE_HEAD_IF_FIRST,
                (new.municipality, new.adapter, new.employee_key, delivery_id, status, now),
            )
        if status == Status.QUEUED and older:
            self._supersede_older(conn, report_pk, new.adapter or "", new.version, now)
        return status

    def _supersede_older(
        self, conn: sqlite3.Connection, report_pk: int, adapter: str, version: int, now: float
    ) -> None:
        """A newer version replaces older ones that have not started (they are never sent)."""
        # which of them may be superseded is the state machine's to say
        rows = conn.execute(
            "SELECT * FROM deliveries WHERE report_pk = ? AND adapter = ? AND version < ? ORDER BY id",
            (report_pk, adapter, version),
        ).fetchall()
        for row in rows:
            delivery = facts(row)
            if deliveries.allowed(delivery, Event.SUPERSEDED):
                decision = deliveries.decide(
                    delivery, Event.SUPERSEDED, None, now, Detail(by_version=version)
                )
                self._record_decision(conn, row["id"], decision, now, report_pk=report_pk)

    # -- reads ---------------------------------------------------------------------------

    async def get_report(self, municipality: str, report_id: str) -> dict[str, Any] | None:
        return await self._read(lambda conn: self._get_report(conn, municipality, report_id))

    def _get_report(
        self, conn: sqlite3.Connection, municipality: str, report_id: str
    ) -> dict[str, Any] | None:
        report = conn.execute(
            "SELECT * FROM reports WHERE municipality = ? AND report_id = ?",
            (municipality, report_id),
        ).fetchone()
        if report is None:
            return None
        versions = [
            version_view(self.keys, v)
            for v in conn.execute(
                "SELECT id, version, received_at, body, purged_at FROM report_versions WHERE report_pk = ?"
                " ORDER BY version",
                (report["id"],),
            )
        ]
        deliveries = [
            self._delivery_view(conn, d)
            for d in conn.execute(
                "SELECT * FROM deliveries WHERE report_pk = ? ORDER BY id", (report["id"],)
            )
        ]
        return {
            "municipality": municipality,
            "report_id": report_id,
            "kind": report["kind"],
            "latest_version": report["latest_version"],
            "versions": versions,
            "deliveries": deliveries,
        }

    def _delivery_view(self, conn: sqlite3.Connection, d: sqlite3.Row) -> dict[str, Any]:
        attempts = conn.execute(
            "SELECT * FROM attempts WHERE delivery_id = ? ORDER BY id", (d["id"],)
        )
        return delivery_view(d, attempts, self._blocker(conn, d))

    def _blocker(self, conn: sqlite3.Connection, d: sqlite3.Row) -> dict[str, Any] | None:
        if not waits_in_lane(d):
            return None
        return blocker_view(
            conn.execute(
                f"SELECT d.id, d.status, r.report_id FROM deliveries d JOIN reports r ON r.id = d.report_pk"
                f" WHERE d.municipality = ? AND d.adapter = ? AND d.employee_key = ? AND d.id < ?"
                f" AND d.status IN ({BLOCKING_SQL}) ORDER BY d.id LIMIT 1",
                (d["municipality"], d["adapter"], d["employee_key"], d["id"]),
            ).fetchone()
        )

    async def count_by_status(self) -> dict[str, int]:
        rows = await self._read(
            lambda c: c.execute(
                "SELECT status, COUNT(*) FROM deliveries GROUP BY status"
            ).fetchall()
        )
        return {r[0]: r[1] for r in rows}

    async def count_by_shown_status(self) -> dict[str, int]:
        return shown_counts(await self._read(lambda c: c.execute(COUNT_SHOWN_SQL).fetchall()))

    async def oldest_unfinished_at(self) -> float | None:
        value = await self._read(lambda c: c.execute(OLDEST_UNFINISHED_SQL).fetchone()[0])
        return None if value is None else float(value)

    async def deliveries_of(self, version_pks: Sequence[int]) -> dict[int, list[dict[str, Any]]]:
        """The deliveries of these report versions (as intake answered them), by version."""
        wanted = list(dict.fromkeys(version_pks))

        def read(conn: sqlite3.Connection) -> dict[int, list[dict[str, Any]]]:
            found: dict[int, list[dict[str, Any]]] = {pk: [] for pk in wanted}
            for start in range(0, len(wanted), 500):
                chunk = wanted[start : start + 500]
                rows = conn.execute(
                    "SELECT id, version_pk, adapter, status, vendor_reference, last_error, warning"
                    f" FROM deliveries WHERE version_pk IN ({','.join('?' * len(chunk))}) ORDER BY id",
                    chunk,
                ).fetchall()
                for row in rows:
                    found[row["version_pk"]].append(
                        {k: row[k] for k in row.keys() if k != "version_pk"}
                    )
            return found

        return await self._read(read)

    # -- dispatcher ----------------------------------------------------------------------

    async def reclaim(self, now: float, every_lease: bool) -> dict[str, int]:
        return await self._write(lambda conn: self._reclaim(conn, now, every_lease))

    def _reclaim(self, conn: sqlite3.Connection, now: float, every_lease: bool) -> dict[str, int]:
        """Take back work whose lease expired (or, at start of the only process, every lease).

        A delivery with an attempt that started but never finished may have reached the
        vendor: it becomes in_doubt. Any other goes back to the queue.
        """
        rows = conn.execute(
            "SELECT * FROM deliveries WHERE status = ?"
            + ("" if every_lease else " AND lease_until < ?"),
            (Status.IN_FLIGHT,) if every_lease else (Status.IN_FLIGHT, now),
        ).fetchall()
        counts = {"requeued": 0, "in_doubt": 0}
        for row in rows:
            open_attempt = conn.execute(
                "SELECT id FROM attempts WHERE delivery_id = ? AND finished_at IS NULL",
                (row["id"],),
            ).fetchone()
            decision = deliveries.decide(
                facts(row),
                Event.LEASE_EXPIRED,
                None,
                now,
                Detail(open_attempt=open_attempt is not None),
            )
            extra = None
            if open_attempt is not None:
                conn.execute(
                    "UPDATE attempts SET finished_at = ?, outcome = ?, error = ? WHERE id = ?",
                    (now, decision.attempt_outcome, decision.last_error, open_attempt["id"]),
                )
                extra = {"attempts_sealed": self._seals(conn, "id = ?", open_attempt["id"])}
            self._record_decision(
                conn, row["id"], decision, now, report_pk=row["report_pk"], extra=extra
            )
            counts["in_doubt" if decision.status is Status.IN_DOUBT else "requeued"] += 1
        return counts

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
        return await self._write(
            lambda conn: self._claim(
                conn,
                now,
                owner,
                lease_seconds,
                limit,
                adapters,
                readback_adapters,
                municipality,
                lane_order,
            )
        )

    def _claim(
        self,
        conn: sqlite3.Connection,
        now: float,
        owner: str,
        lease_seconds: float,
        limit: int,
        adapters: Sequence[str],
        readback_adapters: Sequence[str],
        municipality: str | None,
        lane_order: bool,
    ) -> list[Job]:
        """Due deliveries; with ``lane_order``, only the first unfinished one per employee
        (the lane heads due, by the ``lane_heads_due`` index: as many rows read as claimed)."""
        if not adapters:
            return []
        if lane_order:
            sql, params = due_heads(now, limit, adapters, readback_adapters, municipality)
            ids = [r[0] for r in conn.execute(sql, params)]
            found = {
                r["id"]: r
                for r in conn.execute(
                    f"SELECT * FROM deliveries WHERE id IN ({','.join('?' * len(ids))})", ids
                )
            }
            rows = [found[i] for i in ids if still_claimable(found[i], now, readback_adapters)]
        else:  # a file run takes every due one of its endpoint, in any lane
            marks = ",".join("?" * len(adapters))
            rb_marks = ",".join("?" * len(readback_adapters)) or "''"
            rows = conn.execute(
                f"SELECT d.* FROM deliveries d WHERE d.next_attempt_at <= ? AND d.adapter IN ({marks})"
                f" AND (? IS NULL OR d.municipality = ?)"
                f" AND (d.status IN ('queued', 'retry_scheduled')"
                f"      OR (d.status = 'in_doubt' AND d.adapter IN ({rb_marks})))"
                f" ORDER BY d.next_attempt_at, d.id LIMIT ?",
                (now, *adapters, municipality, municipality, *readback_adapters, limit),
            ).fetchall()
        jobs = []
        for row in rows:
            delivery = facts(row, reads_back=row["adapter"] in readback_adapters)
            decision = deliveries.decide(delivery, Event.CLAIMED, None, now)
            conn.execute(
                "UPDATE deliveries SET status = ?, lease_owner = ?, lease_until = ?, updated_at = ?"
                " WHERE id = ?",
                (decision.status, owner, now + lease_seconds, now, row["id"]),
            )
            # the head stays the head (both states block its lane): only its state changes
            conn.execute(
                "UPDATE lane_heads SET status = ? WHERE delivery_id = ?",
                (decision.status, row["id"]),
            )
            jobs.append(self._job(conn, row))
        return jobs

    def _job(self, conn: sqlite3.Connection, row: sqlite3.Row) -> Job:
        version = conn.execute(
            "SELECT v.id, v.body, v.request_id, c.employee_cpr, c.approved_by_cpr FROM report_versions v"
            " JOIN report_cprs c ON c.version_pk = v.id WHERE v.id = ?",
            (row["version_pk"],),
        ).fetchone()
        parts = conn.execute(
            "SELECT * FROM parts WHERE report_pk = ? AND adapter = ? ORDER BY part",
            (row["report_pk"], row["adapter"]),
        ).fetchall()
        texts: list[str] = []
        if row["status"] == Status.IN_DOUBT:
            texts = [
                a["message"]
                for a in conn.execute(
                    "SELECT message FROM attempts WHERE delivery_id = ?"
                    f" AND outcome IN {PENDING_OUTCOMES!r} ORDER BY id",
                    (row["id"],),
                )
            ]
        return build_job(row, version, parts, texts, self.keys)

    async def begin_attempt(
        self,
        delivery_id: int,
        message: Message,
        request_body: str,
        now: float,
        owner: str | None = None,
    ) -> int:
        # sealed (and its audit digest taken) here, not in the writer thread
        said = message_text(message)
        sealed = self.keys.seal(said, message_context(delivery_id))
        digest = message_seal(self.audit_key, said)

        def op(conn: sqlite3.Connection) -> int:
            if owner is not None:
                lease = conn.execute(
                    "SELECT status, lease_owner, lease_until FROM deliveries WHERE id = ?",
                    (delivery_id,),
                ).fetchone()
                refusal = lease_refusal(lease, owner, now)
                if refusal is not None:
                    raise LeaseLost(f"delivery {delivery_id}: {refusal}")
            cur = conn.execute(
                "INSERT INTO attempts (delivery_id, part, operation, message, started_at, request_body)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (
                    delivery_id,
                    message.part,
                    message.operation,
                    sealed,
                    now,
                    request_body,
                ),
            )
            assert cur.lastrowid is not None
            return cur.lastrowid

        attempt_id = await self._write(op)
        if len(self._said) >= _SAID_LIMIT:  # attempts begun and never ended: forget them
            self._said.clear()
        self._said[attempt_id] = digest  # committed: the id is this row's
        return attempt_id

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
        said = self._said.pop(attempt_id, None)
        known = {} if said is None else {attempt_id: said}
        part = None
        if record.outcome == "delivered" and not message.deletes:
            part = sealed_part(self.keys, report_pk, adapter, message.part, message.fields)

        def op(conn: sqlite3.Connection) -> None:
            # not END_ATTEMPT: SQLite's RETURNING gives values before the column's affinity
            # (3, not the 3.0 stored), and the seal must be of the row as it is stored
            conn.execute(
                "UPDATE attempts SET finished_at = ?, outcome = ?, http_status = ?, latency_ms = ?,"
                " response_body = ?, error = ? WHERE id = ?",
                (
                    now,
                    record.outcome,
                    record.http_status,
                    record.latency_ms,
                    record.response_body,
                    record.error,
                    attempt_id,
                ),
            )
            [sealed] = self._seals(conn, "id = ?", attempt_id, known=known)
            self._audit(
                conn,
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
                self._record_part(conn, report_pk, adapter, version, message, record, now, part)
            if settle is not None:
                self._settle(conn, delivery_id, settle, now, f"delivery.{settle.status}", report_pk)

        await self._write(op)

    def _record_part(
        self,
        conn: sqlite3.Connection,
        report_pk: int,
        adapter: str,
        version: int,
        message: Message,
        record: AttemptRecord,
        now: float,
        sealed: str | None = None,
    ) -> None:
        if message.deletes:
            conn.execute(
                "DELETE FROM parts WHERE report_pk = ? AND adapter = ? AND part = ?",
                (report_pk, adapter, message.part),
            )
            return
        conn.execute(
            "INSERT INTO parts (report_pk, adapter, part, version, fields, vendor_reference, updated_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (report_pk, adapter, part) DO UPDATE SET"
            " version = excluded.version, fields = excluded.fields,"
            " vendor_reference = excluded.vendor_reference, updated_at = excluded.updated_at",
            (
                report_pk,
                adapter,
                message.part,
                version,
                sealed or sealed_part(self.keys, report_pk, adapter, message.part, message.fields),
                record.vendor_reference,
                now,
            ),
        )

    async def settle(self, delivery_id: int, settle: Settle, now: float, event: str) -> None:
        await self._write(lambda conn: self._settle(conn, delivery_id, settle, now, event, None))

    def _settle(
        self,
        conn: sqlite3.Connection,
        delivery_id: int,
        settle: Settle,
        now: float,
        event: str,
        report_pk: int | None,
    ) -> None:
        self._record_decision(conn, delivery_id, settled(settle, event), now, report_pk=report_pk)

    def _record_decision(
        self,
        conn: sqlite3.Connection,
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
            for lane in conn.execute(sql + RETURNING_LANE, params).fetchall():  # run to its end
                self._rehead(conn, tuple(lane))
        else:
            conn.execute(sql, params)
        self._audit(
            conn,
            now,
            decision.audit,
            {**decision_audit(decision), **(extra or {})},
            actor=actor,
            report_pk=report_pk,
            delivery_id=delivery_id,
        )

    def _rehead(self, conn: sqlite3.Connection, lane: tuple[str, ...]) -> None:
        """Bring the lane's head up to date after a change to one of its deliveries."""
        candidate = conn.execute(LANE_HEAD_CANDIDATE, lane).fetchall()
        head = deliveries.lane_head((r[0], r[1], r[2]) for r in candidate)
        if head is None:
            conn.execute(LANE_HEAD_DELETE, lane)
        else:
            conn.execute(LANE_HEAD_UPSERT, (*lane, *head))

    async def replace_parts(
        self,
        delivery_id: int,
        report_pk: int,
        adapter: str,
        parts: Sequence[DeliveredPart],
        now: float,
    ) -> None:
        def op(conn: sqlite3.Connection) -> None:
            conn.execute(
                "DELETE FROM parts WHERE report_pk = ? AND adapter = ?", (report_pk, adapter)
            )
            for p in parts:
                conn.execute(
                    "INSERT INTO parts (report_pk, adapter, part, version, fields, vendor_reference,"
                    " updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        report_pk,
                        adapter,
                        p.part,
                        p.version,
                        sealed_part(self.keys, report_pk, adapter, p.part, p.fields),
                        p.vendor_reference,
                        now,
                    ),
                )
            ids = [
                r[0]
                for r in conn.execute(
                    "SELECT id FROM attempts WHERE delivery_id = ? AND outcome = 'in_doubt'",
                    (delivery_id,),
                )
            ]
            conn.execute(
                "UPDATE attempts SET outcome = 'in_doubt_reconciled' WHERE delivery_id = ?"
                " AND outcome = 'in_doubt'",
                (delivery_id,),
            )
            sealed = self._seals(conn, f"id IN ({','.join('?' * len(ids)) or 'NULL'})", *ids)
            self._audit(
                conn,
                now,
                "delivery.read_back",
                {"parts": [p.part for p in parts], "attempts_sealed": sealed},
                report_pk=report_pk,
                delivery_id=delivery_id,
            )

        await self._write(op)

    async def delivered_parts(self, report_pk: int, adapter: str) -> list[DeliveredPart]:
        rows = await self._read(
            lambda c: c.execute(
                "SELECT * FROM parts WHERE report_pk = ? AND adapter = ? ORDER BY part",
                (report_pk, adapter),
            ).fetchall()
        )
        return [delivered_part(self.keys, r) for r in rows]

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
        await self._write(
            lambda conn: self._audit(conn, now, event, detail, actor=actor, delivery_id=delivery_id)
        )

    # -- endpoints -------------------------------------------------------------------------

    async def paused_endpoints(self) -> dict[tuple[str, str], str]:
        rows = await self._read(
            lambda c: c.execute(
                "SELECT municipality, adapter, reason FROM endpoint_controls WHERE paused = 1"
            ).fetchall()
        )
        return {(r[0], r[1]): r[2] or "" for r in rows}

    async def open_breaker(self, municipality: str, adapter: str, until: float) -> None:
        def op(conn: sqlite3.Connection) -> None:
            conn.execute(OPEN_BREAKER, (municipality, adapter, until))

        await self._write(op)

    async def breakers_open(self, now: float) -> dict[tuple[str, str], float]:
        rows = await self._read(lambda c: c.execute(BREAKERS_OPEN, (now,)).fetchall())
        return {(r[0], r[1]): r[2] for r in rows}

    async def set_paused(
        self, municipality: str, adapter: str, paused: bool, reason: str, actor: str, now: float
    ) -> None:
        def op(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO endpoint_controls (municipality, adapter, paused, reason, actor, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (municipality, adapter) DO UPDATE SET"
                " paused = excluded.paused, reason = excluded.reason, actor = excluded.actor,"
                " updated_at = excluded.updated_at",
                (municipality, adapter, int(paused), reason, actor, now),
            )
            self._audit(
                conn,
                now,
                "endpoint.paused" if paused else "endpoint.resumed",
                {"municipality": municipality, "adapter": adapter, "reason": reason},
                actor=actor,
            )

        await self._write(op)

    async def defer_due(self, municipality: str, adapter: str, until: float, now: float) -> int:
        """Move due deliveries of a closed endpoint to its opening: waiting, not a burned retry."""

        def op(conn: sqlite3.Connection) -> int:
            waiting = (Status.QUEUED, Status.RETRY_SCHEDULED)
            conn.execute(  # the same rows, where they head their lane
                "UPDATE lane_heads SET due_at = ? WHERE municipality = ? AND adapter = ?"
                " AND status IN (?, ?) AND due_at < ?",
                (until, municipality, adapter, *waiting, until),
            )
            return conn.execute(
                "UPDATE deliveries SET deferred_from = COALESCE(deferred_from, next_attempt_at),"
                " next_attempt_at = ?, updated_at = ? WHERE municipality = ?"
                " AND adapter = ? AND status IN (?, ?) AND next_attempt_at < ?",
                (until, now, municipality, adapter, *waiting, until),
            ).rowcount

        return await self._write(op)

    async def undefer(self, municipality: str | None, adapter: str | None, now: float) -> int:
        """Give work deferred to an opening its own due time back (all endpoints, or one).

        Called when the opening hours may have changed (at start) or an endpoint was resumed;
        the dispatcher defers it again if the endpoint is still closed.
        """
        endpoint = ""
        params: list[str] = [Status.QUEUED, Status.RETRY_SCHEDULED]
        if municipality is not None and adapter is not None:
            endpoint = " AND municipality = ? AND adapter = ?"
            params += [municipality, adapter]

        def op(conn: sqlite3.Connection) -> int:
            count = conn.execute(
                "UPDATE deliveries SET next_attempt_at = deferred_from, deferred_from = NULL,"
                f" updated_at = ? WHERE deferred_from IS NOT NULL AND status IN (?, ?){endpoint}",
                (now, *params),
            ).rowcount
            if count:
                conn.execute(UNDEFER_HEADS + endpoint, params)
            return count

        return await self._write(op)

    # -- operations ------------------------------------------------------------------------

    async def list_deliveries(
        self, filters: Mapping[str, Any], limit: int = 200
    ) -> list[dict[str, Any]]:
        """Newest first; ``before_id`` continues a list after its last row (keyset)."""
        where, params = filter_sql(filters)
        sql = LIST_SQL.format(where=where)

        def read(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            rows = conn.execute(sql, (*params, limit)).fetchall()
            return [self._list_view(conn, row) for row in rows]

        return await self._read(read)

    async def count_deliveries(self, filters: Mapping[str, Any]) -> int:
        where, params = filter_sql(count_filters(filters))
        sql = COUNT_SQL.format(where=where)
        return int(await self._read(lambda c: c.execute(sql, params).fetchone()[0]))

    async def overview(self, now: float, day_start: float) -> list[dict[str, Any]]:
        def read(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            counts = conn.execute(OVERVIEW_SQL, (day_start,)).fetchall()
            spent = conn.execute(LATENCIES_SQL, (now - LATENCY_WINDOW, now)).fetchall()
            return overview_rows(counts, spent)

        return await self._read(read)

    async def delivery_detail(self, delivery_id: int) -> dict[str, Any] | None:
        def read(conn: sqlite3.Connection) -> dict[str, Any] | None:
            row = conn.execute(LIST_SQL.format(where="d.id = ?"), (delivery_id, 1)).fetchone()
            if row is None:
                return None
            report = conn.execute(DETAIL_REPORT_SQL, (row["report_pk"],)).fetchone()
            versions = conn.execute(DETAIL_VERSIONS_SQL, (row["report_pk"],)).fetchall()
            attempts = conn.execute(
                "SELECT * FROM attempts WHERE delivery_id = ? ORDER BY id", (delivery_id,)
            ).fetchall()
            return delivery_detail_view(
                self.keys,
                self._list_view(conn, row),
                report,
                versions,
                attempts,
                self._audit_rows(conn, delivery_id),
            )

        return await self._read(read)

    def _list_view(self, conn: sqlite3.Connection, row: sqlite3.Row) -> dict[str, Any]:
        return list_view(row, self._blocker(conn, row))

    async def count_at_risk(self) -> int:
        return int(
            await self._read(
                lambda c: c.execute("SELECT COUNT(*) FROM deliveries WHERE at_risk = 1").fetchone()[
                    0
                ]
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

        def op(conn: sqlite3.Connection) -> dict[str, list[int]]:
            rows = conn.execute(
                f"SELECT d.* FROM deliveries d JOIN reports r ON r.id = d.report_pk"
                f" WHERE {where} ORDER BY d.id",
                params,
            ).fetchall()
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
                        "attempts_sealed": self._confirm_parts(conn, row, vendor_reference, now)
                    }
                self._record_decision(
                    conn,
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

    def _confirm_parts(
        self, conn: sqlite3.Connection, row: sqlite3.Row, vendor_reference: str | None, now: float
    ) -> list[dict[str, Any]]:
        """The operator found the in-doubt sends at the vendor: record them as delivered parts,
        so a later version is planned against them (and never pays them twice)."""
        record = AttemptRecord("delivered", vendor_reference=vendor_reference)
        for a in conn.execute(
            "SELECT id, message FROM attempts WHERE delivery_id = ? AND outcome = 'in_doubt'"
            " ORDER BY id",
            (row["id"],),
        ).fetchall():
            self._record_part(
                conn,
                row["report_pk"],
                row["adapter"],
                row["version"],
                open_message(self.keys, row["id"], a["message"]),
                record,
                now,
            )
            conn.execute(
                "UPDATE attempts SET outcome = 'in_doubt_confirmed' WHERE id = ?", (a["id"],)
            )
        return self._seals(conn, "delivery_id = ? AND outcome = 'in_doubt_confirmed'", row["id"])

    async def flag_at_risk(self, now: float, margin: float) -> list[dict[str, Any]]:
        """Flag undelivered deliveries that will miss their payroll cut-off; return the new ones.

        At risk: its next attempt is after the cut-off; or it waits for an operator (in doubt,
        correction required, failed) and the cut-off is less than ``margin`` seconds away; or
        the cut-off has passed and it is still not delivered.
        """

        def op(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            rows = conn.execute(  # candidates only: the rule is deliveries.is_at_risk
                "SELECT d.*, r.report_id FROM deliveries d JOIN reports r ON r.id = d.report_pk"
                f" WHERE d.at_risk = 0 AND d.cutoff_at IS NOT NULL AND d.status IN ({WATCHED_SQL})"
                " ORDER BY d.id"
            ).fetchall()
            flagged = []
            for row in rows:
                delivery = facts(row)
                if not deliveries.is_at_risk(delivery, now, margin):
                    continue
                decision = deliveries.decide(delivery, Event.AT_RISK, None, now)
                self._record_decision(conn, row["id"], decision, now, report_pk=row["report_pk"])
                flagged.append(at_risk_view(row))
            return flagged

        return await self._write(op)

    async def audit_for(self, delivery_id: int) -> list[dict[str, Any]]:
        return await self._read(lambda c: self._audit_rows(c, delivery_id))

    def _audit_rows(self, conn: sqlite3.Connection, delivery_id: int) -> list[dict[str, Any]]:
        rows = conn.execute(AUDIT_FOR_SQL, (delivery_id,)).fetchall()
        return [audit_view(r) for r in rows]

    # -- file runs (IND01) -----------------------------------------------------------------

    async def file_run_begin(self, run: dict[str, Any], now: float) -> None:
        def op(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO file_runs (run_id, municipality, adapter, file, offset_before, data,"
                " first_line, header_lines, deliveries, started_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
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
                ),
            )
            self._audit(
                conn,
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
            lambda c: c.execute(
                "SELECT * FROM file_runs WHERE file = ? AND finished_at IS NULL ORDER BY started_at",
                (file,),
            ).fetchall()
        )
        return [open_run(self.keys, r) for r in rows]

    async def file_run_finish(
        self, run_id: str, line_numbers: Sequence[int], outcome: str, now: float
    ) -> None:
        """The run's lines are in the file: its deliveries are delivered (one transaction)."""

        def op(conn: sqlite3.Connection) -> None:
            run = conn.execute("SELECT * FROM file_runs WHERE run_id = ?", (run_id,)).fetchone()
            conn.execute(
                "UPDATE file_runs SET finished_at = ?, outcome = ? WHERE run_id = ?",
                (now, outcome, run_id),
            )
            self._audit(conn, now, "file_run.finish", {"run_id": run_id, "outcome": outcome})
            name = Path(run["file"]).name
            for delivery_id, item in open_run_deliveries(
                self.keys, run_id, run["deliveries"]
            ).items():
                refs = [f"{name}:{line_numbers[i]}" for i in item["lines"]]
                self._file_delivered(conn, int(delivery_id), item, refs, now)

        await self._write(op)

    def _file_delivered(
        self,
        conn: sqlite3.Connection,
        delivery_id: int,
        item: dict[str, Any],
        refs: list[str],
        now: float,
    ) -> None:
        d = conn.execute("SELECT * FROM deliveries WHERE id = ?", (delivery_id,)).fetchone()
        reference = ", ".join(refs) or None
        if d is None or not deliveries.allowed(facts(d), Event.WRITTEN):
            return
        decision = deliveries.decide(
            facts(d), Event.WRITTEN, None, now, Detail(vendor_reference=reference)
        )
        for part in item["parts"]:
            message = Message(part["part"], part["operation"], part["fields"])
            self._record_part(
                conn,
                d["report_pk"],
                d["adapter"],
                d["version"],
                message,
                AttemptRecord("delivered", vendor_reference=reference),
                now,
            )
        self._record_decision(conn, delivery_id, decision, now, report_pk=d["report_pk"])

    async def audit_chain(
        self, since: float | None = None, until: float | None = None
    ) -> list[dict[str, Any]]:
        rows = await self._read(
            lambda c: c.execute(
                "SELECT * FROM audit_events WHERE at >= COALESCE(?, at) AND at < COALESCE(?, at + 1)"
                " ORDER BY id",
                (since, until),
            ).fetchall()
        )
        return [dict(r) for r in rows]

    async def audit_attempts(self) -> list[dict[str, Any]]:
        rows = await self._read(lambda c: c.execute(f"{ATTEMPT_ROW} ORDER BY id").fetchall())
        return audit_attempt_rows(self.keys, self.audit_key, rows)

    async def audit_head(self) -> tuple[int, str] | None:
        row = await self._read(lambda c: c.execute(AUDIT_HEAD).fetchone())
        return None if row is None else (int(row["id"]), str(row["hmac"]))

    # -- console sessions ------------------------------------------------------------------

    async def create_session(
        self, token_hash: str, username: str, now: float, expires_at: float
    ) -> None:
        def op(conn: sqlite3.Connection) -> None:
            conn.execute(SESSION_SWEEP, (now,))
            conn.execute(SESSION_INSERT, (token_hash, username, now, expires_at))

        await self._write(op)

    async def session_user(self, token_hash: str, now: float) -> str | None:
        row = await self._read(lambda c: c.execute(SESSION_USER, (token_hash, now)).fetchone())
        return None if row is None else str(row[0])

    async def end_session(self, token_hash: str) -> None:
        await self._write(lambda conn: conn.execute(SESSION_END, (token_hash,)).rowcount)

    async def audit_events(self, before_id: int | None, limit: int) -> list[dict[str, Any]]:
        start = before_id if before_id is not None else 2**63 - 1
        rows = await self._read(lambda c: c.execute(AUDIT_PAGE, (start, limit)).fetchall())
        return [audit_page_row(r) for r in rows]

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
            row = await self._read(lambda c: c.execute(PURGE_PREVIEW, (before,) * 6).fetchone())
            return {**dict(row), **(extra or {})}
        total = {"versions": 0, "cprs": 0, "attempt_bodies": 0}
        while True:
            done = await self._write(
                functools.partial(self._purge_batch, before=before, now=now, extra=extra)
            )
            extra = None  # counted once, in the first event
            for k in total:
                total[k] += done[k]
            if done["versions"] < PURGE_BATCH:
                return total

    def _purge_batch(
        self, conn: sqlite3.Connection, before: float, now: float, extra: Mapping[str, Any] | None
    ) -> dict[str, Any]:
        versions = [
            r[0]
            for r in conn.execute(
                f"{PURGEABLE} ORDER BY v.id LIMIT {PURGE_BATCH}", (before, before)
            )
        ]
        if not versions and not extra:
            return {"versions": 0, "cprs": 0, "attempt_bodies": 0}
        marks = ",".join("?" * len(versions)) or "NULL"
        dids = [
            r[0]
            for r in conn.execute(
                f"SELECT id FROM deliveries WHERE version_pk IN ({marks}) ORDER BY id", versions
            )
        ]
        bodies = conn.execute(
            f"UPDATE attempts SET request_body = NULL, response_body = NULL WHERE delivery_id IN"
            f" ({','.join('?' * len(dids)) or 'NULL'}) AND (request_body IS NOT NULL OR response_body IS NOT NULL)",
            dids,
        ).rowcount
        cprs = conn.execute(
            f"DELETE FROM report_cprs WHERE version_pk IN ({marks})", versions
        ).rowcount
        conn.execute(
            f"UPDATE report_versions SET body = '{{}}', purged_at = ? WHERE id IN ({marks})",
            (now, *versions),
        )
        detail = purge_detail(before, versions, cprs, dids, bodies, extra or {})
        self._audit(conn, now, PURGE_EVENT, detail, actor="retention")
        return detail

    # -- alerts (gateway.alerts decides; the store saves) -------------------------------------

    async def alert_facts(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Deliveries counted per endpoint, state, flag; and the newest ones that need someone."""

        def read(conn: sqlite3.Connection) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
            groups = [dict(r) for r in conn.execute(FACT_GROUPS).fetchall()]
            return groups, [dict(r) for r in conn.execute(FACT_SAMPLES).fetchall()]

        return await self._read(read)

    async def open_alerts(self) -> list[dict[str, Any]]:
        return [
            alert_view(r) for r in await self._read(lambda c: c.execute(OPEN_ALERTS).fetchall())
        ]

    async def apply_alerts(self, plan: AlertPlan, now: float) -> dict[str, list[str]]:
        """Open, refresh and resolve alerts, queue their notifications, audit it: one commit.

        An alert another process opened or resolved first is left as that process left it.
        """

        def op(conn: sqlite3.Connection) -> dict[str, list[str]]:
            done: dict[str, list[str]] = {"opened": [], "resolved": []}
            for new in plan.opened:
                row = conn.execute(
                    INSERT_ALERT,
                    (new.uid, new.cause, new.kind, payload_json(new.payload), now, now),
                ).fetchone()
                if row is not None:
                    done["opened"].append(new.uid)
                    self._notify(conn, row[0], "opened", plan.channels, now)
                    self._audit(conn, now, "alert.opened", opened_event(new))
            for alert_id, payload in plan.updated:
                conn.execute(UPDATE_ALERT, (payload_json(payload), now, alert_id))
            for alert_id in plan.resolved:
                row = conn.execute(RESOLVE_ALERT, (now, now, alert_id)).fetchone()
                if row is not None:
                    done["resolved"].append(row["uid"])
                    if plan.notify_resolved:
                        self._notify(conn, alert_id, "resolved", plan.channels, now)
                    detail = {"alert": row["uid"], "cause": row["cause"], "kind": row["kind"]}
                    self._audit(conn, now, "alert.resolved", detail)
            return done

        return await self._write(op)

    def _notify(
        self,
        conn: sqlite3.Connection,
        alert_id: int,
        notice: str,
        channels: Sequence[str],
        now: float,
    ) -> None:
        conn.executemany(
            INSERT_NOTIFICATION, [(alert_id, notice, channel, now, now) for channel in channels]
        )

    async def claim_alert_notifications(
        self, now: float, owner: str, lease_seconds: float, limit: int
    ) -> list[dict[str, Any]]:
        """Due notifications, leased to ``owner`` (one writer: no two claims overlap)."""

        def op(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            params = (owner, now + lease_seconds, now, now, limit)
            ids = [r[0] for r in conn.execute(CLAIM_SQLITE, params).fetchall()]
            if not ids:
                return []
            sql = CLAIMED.format(ids=",".join("?" * len(ids)))
            return [claimed_view(r) for r in conn.execute(sql, (owner, *ids)).fetchall()]

        return await self._write(op)

    async def finish_alert_notification(
        self, notification_id: int, owner: str, outcome: SendOutcome, now: float
    ) -> bool:
        """Record one send attempt (audited); False when ``owner`` had lost the lease."""

        def op(conn: sqlite3.Connection) -> bool:
            finished = now if outcome.state != "pending" else None
            params = (outcome.state, outcome.next_attempt_at, outcome.error, finished)
            changed = conn.execute(FINISH_NOTIFICATION, (*params, notification_id, owner)).rowcount
            if changed:
                self._audit(conn, now, outcome.event, dict(outcome.detail))
            return bool(changed)

        return await self._write(op)

    async def list_alerts(self, open_only: bool, limit: int = 200) -> list[dict[str, Any]]:
        """Alerts, newest first, each with its notifications."""
        where = "WHERE resolved_at IS NULL" if open_only else ""

        def read(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            alerts = [
                alert_view(r)
                for r in conn.execute(LIST_ALERTS.format(where=where), (limit,)).fetchall()
            ]
            ids = [a["id"] for a in alerts]
            rows = (
                conn.execute(NOTIFICATIONS_OF.format(ids=",".join("?" * len(ids))), ids).fetchall()
                if ids
                else []
            )
            return with_notifications(alerts, rows)

        return await self._read(read)


__all__ = ["SQLiteStore"]
