"""File runs: the scheduled appends that deliver file-based adapters' deliveries (IND01).

A run for one tenant: finish any run a crash left unfinished (from the journal in the
store and the file itself), claim the tenant's due deliveries, plan them, write their
records under the file lock, and mark them delivered with "file:line" references in the
same transaction that closes the run. Because the journal entry is committed before the
first byte is written, a crash at any point neither loses nor duplicates a line.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar, cast
from zoneinfo import ZoneInfo

from adapters import kmd_ind01
from adapters.base import Adapter, DeliveryError, FileAdapter, Report, VendorSettings

from .deliveries import Delivery, Detail, Event, decide
from .errors import ConfigError
from .ind01_file import AppendResult, FileConflict, FileRun, JournalEntry, next_run
from .privacy import mask_cpr
from .settings import Settings
from .store import Job, Status, Store

log = logging.getLogger(__name__)
T = TypeVar("T")
COPENHAGEN = ZoneInfo("Europe/Copenhagen")
DEFAULT_SCHEDULE = "*/15 * * * *"


@dataclass(slots=True)
class RunSummary:
    written: int = 0
    recovered: int = 0
    failed: int = 0
    skipped: int = 0
    references: dict[int, list[str]] = field(default_factory=dict)


class StoreJournal:
    """The journal FileRun needs, kept in the store; called from FileRun's worker thread."""

    def __init__(
        self,
        store: Store,
        loop: asyncio.AbstractEventLoop,
        municipality: str,
        adapter: str,
        deliveries: Mapping[str, Any],
        clock: Callable[[], float],
    ) -> None:
        self.store, self.loop, self.clock = store, loop, clock
        self.municipality, self.adapter, self.deliveries = municipality, adapter, deliveries

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def begin(self, entry: JournalEntry) -> None:
        run = {
            "run_id": entry.run_id,
            "municipality": self.municipality,
            "adapter": self.adapter,
            "file": entry.file,
            "offset_before": entry.offset_before,
            "data": _text(entry.data),
            "first_line": entry.first_line,
            "header_lines": entry.header_lines,
            "deliveries": self.deliveries,
        }
        self._call(self.store.file_run_begin(run, self.clock()))

    def unfinished(self, file: str) -> Sequence[JournalEntry]:
        return [_entry(r) for r in self._call(self.store.file_runs_unfinished(file))]

    def finish(self, entry: JournalEntry, result: AppendResult) -> None:
        self._call(
            self.store.file_run_finish(
                entry.run_id, list(result.line_numbers), str(result.outcome), self.clock()
            )
        )


# The journal keeps a run's bytes as text: Latin-1 maps every byte to one character and back,
# whatever the file's encoding (and ASCII-only runs journalled before it read the same).
def _text(data: bytes) -> str:
    return data.decode("latin-1")


def _entry(row: Mapping[str, Any]) -> JournalEntry:
    return JournalEntry(
        row["run_id"],
        row["file"],
        row["offset_before"],
        row["data"].encode("latin-1"),
        row["first_line"],
        row["header_lines"],
    )


class FileRunner:
    """Runs each tenant's file-based routes on their cron schedule (Europe/Copenhagen)."""

    def __init__(
        self,
        store: Store,
        adapters: Mapping[str, Adapter],
        settings: Settings,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store, self.adapters, self.settings, self.clock = store, adapters, settings, clock
        self.owner = f"filerun-{uuid.uuid4().hex[:8]}"
        self._locks: dict[str, asyncio.Lock] = {}

    def routes(self) -> list[tuple[str, str]]:
        """(municipality, adapter) pairs that deliver through file runs."""
        return [
            (m, a)
            for m, t in self.settings.tenants.items()
            for a in set(t.routes.values())
            if a in self.adapters and self.adapters[a].file_based
        ]

    def vendor(self, municipality: str, adapter: str) -> VendorSettings:
        return self.settings.tenants[municipality].vendors.get(adapter, VendorSettings())

    async def run(self) -> None:
        """Forever: sleep until the next scheduled run of any route, then run it."""
        routes = self.routes()
        if not routes:
            return
        due = {r: self._next(r) for r in routes}
        while True:
            route = min(due, key=lambda r: due[r])
            await asyncio.sleep(max(0.0, due[route] - self.clock()))
            try:
                await self.run_once(*route)
            except Exception:
                log.exception("file run for %s/%s failed; next run as scheduled", *route)
            due[route] = self._next(route)

    def check_schedules(self) -> None:
        """At start-up: every file route's cron schedule must parse, and the adapter's file
        options (encoding, header texts) must be writable; one line naming the key."""
        for route in self.routes():
            where = f"tenants.{route[0]}.vendors.{route[1]}.options"
            try:
                self._next(route)
            except ValueError as exc:
                raise ConfigError(f"{where}.schedule: {exc}") from exc
            adapter = self.adapters[route[1]]
            problems = (
                cast(FileAdapter, adapter).check_settings(self.vendor(*route), route[0])
                if adapter.file_based
                else []
            )
            if problems:
                key, problem = problems[0]
                raise ConfigError(f"{where}.{key}: {problem}")

    def _next(self, route: tuple[str, str]) -> float:
        cron = str(self.vendor(*route).options.get("schedule", DEFAULT_SCHEDULE))
        now = datetime.fromtimestamp(self.clock(), UTC).astimezone(COPENHAGEN)
        return next_run(cron, now).timestamp()

    def path(self, municipality: str, adapter: str) -> Path:
        options = self.vendor(municipality, adapter).options
        folder = Path(
            str(options.get("directory", self.settings.data_dir / "ind01" / municipality))
        )
        if not folder.is_absolute():
            folder = self.settings.data_dir / folder
        return folder / str(options.get("file_name", f"IND01_{municipality}.txt"))

    async def run_once(self, municipality: str, adapter: str) -> RunSummary:
        """One run now (also what the schedule calls). Runs of one file never overlap."""
        path = self.path(municipality, adapter)
        async with (
            self._locks.setdefault(str(path), asyncio.Lock()),
            self.store.file_lock(str(path)),
        ):
            path.parent.mkdir(parents=True, exist_ok=True)
            summary = RunSummary()
            summary.recovered = await self._recover(municipality, adapter, path)
            jobs = await self.store.claim_due(
                self.clock(),
                self.owner,
                self.settings.lease_seconds,
                100_000,
                [adapter],
                [],
                municipality,
                lane_order=False,
            )
            if jobs:
                await self._write(municipality, adapter, path, jobs, summary)
            return summary

    async def _recover(self, municipality: str, adapter: str, path: Path) -> int:
        """Finish runs a crash interrupted, before anything new is claimed."""
        rows = await self.store.file_runs_unfinished(str(path))
        for row in rows:
            runner = FileRun(path, self._journal(municipality, adapter, row["deliveries"]))
            try:
                await asyncio.to_thread(runner.recover, _entry(row))
            except FileConflict as exc:
                log.error("file run %s cannot be recovered: %s", row["run_id"], exc)
                raise
        return len(rows)

    def _journal(
        self, municipality: str, adapter: str, deliveries: Mapping[str, Any]
    ) -> StoreJournal:
        return StoreJournal(
            self.store, asyncio.get_running_loop(), municipality, adapter, deliveries, self.clock
        )

    async def _write(
        self, municipality: str, adapter_name: str, path: Path, jobs: list[Job], summary: RunSummary
    ) -> None:
        adapter, vendor = self.adapters[adapter_name], self.vendor(municipality, adapter_name)
        writable = await self._plan(adapter, vendor, jobs, summary)
        lines, deliveries = await self._lines(writable, vendor, summary)
        if not lines:
            return
        run_id = f"{municipality}-{datetime.now(UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"
        journal = self._journal(municipality, adapter_name, deliveries)
        header = kmd_ind01.header_line(vendor, municipality)
        runner = FileRun(
            path,
            journal,
            header=header,
            encoding=kmd_ind01.file_encoding(vendor),
            line_end=kmd_ind01.LINE_END,
        )
        await asyncio.to_thread(runner.append, run_id, lines)
        summary.written = len(lines)

    async def _plan(
        self, adapter: Any, vendor: VendorSettings, jobs: list[Job], summary: RunSummary
    ) -> list[tuple[Job, Report, Any]]:
        writable = []
        for job in jobs:
            report = Report.from_dict(job.report)
            try:
                plan = adapter.plan(report, job.delivered, vendor)
            except DeliveryError as exc:
                await self._settle(
                    job, Event.ERROR, Detail(error=mask_cpr(exc.message, report.cprs))
                )
                summary.failed += 1
                continue
            if plan.not_applicable:
                await self._settle(job, Event.NOT_APPLICABLE, Detail(error=plan.not_applicable))
            elif plan.correction_required:
                await self._settle(
                    job, Event.CORRECTION_REQUIRED, Detail(error=plan.correction_required)
                )
            elif not plan.messages:
                await self._settle(job, Event.ALREADY_DELIVERED, Detail())
            else:
                writable.append((job, report, plan))
                continue
            summary.skipped += 1
        return writable

    async def _lines(
        self, writable: list[tuple[Job, Report, Any]], vendor: VendorSettings, summary: RunSummary
    ) -> tuple[list[str], dict[str, Any]]:
        """The lines to append, and per delivery which of them are its records."""
        by_covers = {
            (r.municipality, r.report_id, r.version): (job, plan) for job, r, plan in writable
        }
        written, failures = kmd_ind01.records([r for _, r, _ in writable], vendor)
        failed: set[int] = set()
        for failure in failures:
            for job in {
                by_covers[c][0].delivery_id: by_covers[c][0] for c in failure.group.covers
            }.values():
                if job.delivery_id not in failed:
                    failed.add(job.delivery_id)
                    await self._settle(job, Event.ERROR, Detail(error=failure.reason))
        summary.failed += len(failed)
        lines: list[str] = []
        deliveries: dict[str, Any] = {}
        for grp, line in written:
            for job, plan in (by_covers[c] for c in grp.covers):
                parts = [
                    {"part": m.part, "operation": m.operation, "fields": dict(m.fields)}
                    for m in plan.messages
                ]
                item = deliveries.setdefault(str(job.delivery_id), {"lines": [], "parts": parts})
                item["lines"].append(len(lines))
            lines.append(line)
        return lines, deliveries

    async def _settle(self, job: Job, event: Event, detail: Detail) -> None:
        """Record what the state machine decides (file runs never retry: no policy needed)."""
        now = self.clock()
        facts = Delivery(
            Status.IN_FLIGHT,
            attempts=job.attempts,
            retry_since=job.created_at,
            claimed_from=Status(job.previous_status),
            cutoff_at=job.cutoff_at,
        )
        policy = self.settings.retry_for(job.municipality, job.adapter)
        decision = decide(facts, event, policy, now, detail)
        await self.store.settle(job.delivery_id, decision.settle(), now, decision.audit)
