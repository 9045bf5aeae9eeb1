"""The dispatcher: claim due deliveries under a lease, deliver each, record the outcome.

claim → (read back) → plan → for each message: render (schema check) → mark the attempt
started (committed) → send → record the attempt and the new state (one transaction).
A request that may have left without an answer makes the delivery ``in_doubt``; it is
never resent blindly. Nothing sleeps for a retry: ``next_attempt_at`` is persisted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import cast

from adapters.base import (
    Adapter,
    DeliveredPart,
    DeliveryError,
    InDoubt,
    InvalidPayload,
    Message,
    MessageAdapter,
    Plan,
    ReadsBack,
    Receipt,
    Rejected,
    Report,
    Transient,
)

from .channels import Channels
from .deliveries import Decision, Delivery, Detail, Event, decide
from .endpoints import BreakerState, Endpoints, Key
from .errors import ConfigError
from .logs import delivery_fields
from .metrics import Metrics
from .privacy import mask_cpr
from .settings import Settings
from .store import AttemptRecord, Job, LeaseLost, Status, Store

log = logging.getLogger(__name__)
_BODY_LIMIT = 64 * 1024  # attempt bodies kept in the audit trail, per direction
REFRESH_SECONDS = 2.0  # how often pauses (which the CLI may set) and opening hours are looked at


@dataclass(slots=True)
class _Run:
    """One delivery being worked on."""

    job: Job
    adapter: MessageAdapter
    report: Report

    @property
    def cprs(self) -> tuple[str, ...]:
        return self.report.cprs

    @property
    def facts(self) -> Delivery:
        job = self.job
        return _facts(job, self.adapter.reads_back)


class Dispatcher:
    def __init__(
        self,
        store: Store,
        adapters: Mapping[str, Adapter],
        settings: Settings,
        channels: Channels,
        clock: Callable[[], float] = time.time,
        endpoints: Endpoints | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.store = store
        self.adapters = adapters
        self.settings = settings
        self.channels = channels
        self.clock = clock
        self.endpoints = endpoints if endpoints is not None else build_endpoints(settings, adapters)
        self.metrics = metrics if metrics is not None else Metrics()
        self._refreshed_at = 0.0
        self._reclaimed_at = 0.0
        self._rotation = 0
        self.owner = f"gw-{uuid.uuid4().hex[:12]}"
        self._wake = asyncio.Event()
        self._stopping = False
        self._tasks: set[asyncio.Task[None]] = set()
        # IND01 is written by file runs, not by per-message sends
        self._sendable = tuple(n for n, a in adapters.items() if not a.file_based)
        self._readback = tuple(n for n in self._sendable if adapters[n].reads_back)
        self.on_alarm: Callable[[], None] | None = None  # a failure, a doubt, a breaker opening

    # -- the loop ------------------------------------------------------------------------

    def wake(self) -> None:
        """New work was committed: look now rather than at the next poll."""
        self._wake.set()

    async def run(self) -> None:
        await self._reclaim_at_start()
        await self._replan_openings()
        while not self._stopping:
            free = self.settings.workers - len(self._tasks)
            if free <= 0:
                await asyncio.wait(self._tasks, return_when=asyncio.FIRST_COMPLETED)
                continue
            jobs = await self._claim(free)
            for job in jobs:
                task = asyncio.create_task(self._guarded(job), name=f"delivery-{job.delivery_id}")
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            if not jobs:
                await self._idle()

    async def _reclaim_at_start(self) -> None:
        try:
            every = getattr(self.store, "single_process", False)
            counts = await self.store.reclaim(self.clock(), every_lease=every)
        except Exception:
            log.exception(
                "reclaiming leases at start failed; expired ones are reclaimed as they expire"
            )
            return
        if any(counts.values()):
            log.warning("reclaimed leases at start: %s", counts)

    async def _replan_openings(self) -> None:
        """Opening hours may have changed since work was deferred to an opening: take it back.

        ``_refresh`` defers it again, to the opening the configuration gives now, wherever
        an endpoint is still closed.
        """
        try:
            count = await self.store.undefer(None, None, self.clock())
        except Exception:
            log.exception(
                "re-planning work deferred to an opening failed; it waits for that opening"
            )
            return
        if count:
            log.info("re-planned %d deliveries that waited for an endpoint's opening", count)

    async def _claim(self, free: int) -> list[Job]:
        """Claim due work endpoint by endpoint, within each one's capacity right now."""
        now = self.clock()
        try:
            await self._refresh(now)
            wanted = self._wanted(now, free)
            batches = await asyncio.gather(
                *(
                    self.store.claim_due(
                        now,
                        self.owner,
                        self.settings.lease_seconds,
                        n,
                        [key[1]],
                        self._readback,
                        key[0],
                    )
                    for key, n in wanted
                )
            )
        except Exception:
            log.exception("claiming due deliveries failed; trying again shortly")
            return []
        jobs = []
        for (key, _), batch in zip(wanted, batches, strict=True):
            endpoint = self.endpoints.get(key)
            if endpoint is not None:
                endpoint.started(len(batch))
            jobs.extend(batch)
        return jobs

    def _wanted(self, now: float, free: int) -> list[tuple[Key, int]]:
        """How many to claim per endpoint; the start rotates so no endpoint starves."""
        endpoints = [e for e in self.endpoints if e.key[1] in self._sendable]
        if not endpoints:
            return []
        self._rotation = (self._rotation + 1) % len(endpoints)
        wanted = []
        for endpoint in endpoints[self._rotation :] + endpoints[: self._rotation]:
            n = min(endpoint.capacity(now), free)
            if n > 0:
                wanted.append((endpoint.key, n))
                free -= n
        return wanted

    async def _refresh(self, now: float) -> None:
        """Every few seconds: operators' pauses (they may come from the CLI), closed hours;
        now and then, leases that expired under a task that died with the store."""
        if now - self._refreshed_at < REFRESH_SECONDS:
            return
        self._refreshed_at = now
        if now - self._reclaimed_at >= max(REFRESH_SECONDS, self.settings.lease_seconds / 4):
            self._reclaimed_at = now
            counts = await self.store.reclaim(now, every_lease=False)
            if any(counts.values()):
                log.warning("reclaimed expired leases: %s", counts)
        self.endpoints.set_paused(await self.store.paused_endpoints())
        for key in self.endpoints.apply_openings(await self.store.breakers_open(now), now):
            log.warning("%s/%s: circuit breaker open (opened by another process)", key[0], key[1])
        for endpoint in self.endpoints:
            at = datetime.fromtimestamp(now, UTC)
            if endpoint.key[1] in self._sendable and not endpoint.hours.is_open(at):
                opening = endpoint.hours.next_opening(at).timestamp()
                await self.store.defer_due(endpoint.key[0], endpoint.key[1], opening, now)

    async def _idle(self) -> None:
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), self.settings.poll_seconds)

    async def aclose(self, grace: float = 10.0) -> None:
        """Stop claiming; let in-flight deliveries finish for ``grace`` seconds."""
        self._stopping = True
        self._wake.set()
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=grace)
            for task in pending:
                task.cancel()  # left in_flight: reclaimed (or in_doubt) at the next start
            if pending:
                _, stuck = await asyncio.wait(pending, timeout=grace)
                if stuck:
                    log.error("%d deliveries did not stop once cancelled; left behind", len(stuck))

    async def drain(self) -> None:
        """Wait until every running delivery task is done (for tests and tools)."""
        while self._tasks:
            await asyncio.gather(*set(self._tasks), return_exceptions=True)

    async def _guarded(self, job: Job) -> None:
        try:
            with delivery_fields(job.municipality, job.adapter, job.delivery_id, job.request_id):
                await self.deliver(job)
        except asyncio.CancelledError:
            raise
        except Exception:
            # The store failed mid-delivery: the lease expires and the delivery is
            # reclaimed (in_doubt if a request may have left). Nothing more to do here.
            log.exception("delivery %s: could not record its outcome", job.delivery_id)
        finally:
            self.endpoints.finished((job.municipality, job.adapter))
            self._wake.set()  # its lane's next delivery may be due now: look without waiting

    async def _called(self, run: _Run, ok: bool) -> None:
        """Count one vendor call for the endpoint's breaker (ok: the vendor answered)."""
        key, now = (run.job.municipality, run.job.adapter), self.clock()
        change = self.endpoints.record(key, ok, now)
        if change is None:
            return
        event = (
            "endpoint.breaker_open" if change is BreakerState.OPEN else "endpoint.breaker_closed"
        )
        log.warning("%s/%s: circuit breaker %s", key[0], key[1], change)
        if change is BreakerState.OPEN:
            self._alarm()
        with contextlib.suppress(Exception):
            await self.store.record_event(event, {"municipality": key[0], "adapter": key[1]}, now)
        endpoint = self.endpoints.get(key)
        if change is BreakerState.OPEN and endpoint is not None:
            with contextlib.suppress(Exception):  # the other processes hold back too
                await self.store.open_breaker(key[0], key[1], endpoint.breaker.open_ends)

    # -- one delivery --------------------------------------------------------------------

    async def deliver(self, job: Job) -> None:
        """Deliver one claimed job, recording every attempt and the outcome."""
        adapter = cast(MessageAdapter, self.adapters[job.adapter])  # only sendable ones are claimed
        try:
            report = Report.from_dict(job.report)
        except (KeyError, TypeError, ValueError) as exc:  # stored by an older, laxer version
            error = f"the stored report cannot be read: {exc.__class__.__name__}"
            now = self.clock()
            decision = decide(
                _facts(job, adapter.reads_back),
                Event.ERROR,
                self.settings.retry_for(job.municipality, job.adapter),
                now,
                Detail(error=error),
            )
            await self.store.settle(job.delivery_id, decision.settle(), now, decision.audit)
            self._counted(job, decision)
            return
        await self._deliver(_Run(job, adapter, report))

    async def _deliver(self, run: _Run) -> None:
        job, adapter = run.job, run.adapter
        vendor = self.channels.vendor(job.municipality, job.adapter)
        try:
            delivered = await self._read_back_if_needed(run)
        except DeliveryError as exc:
            await self._read_back_failed(run, exc)
            return
        try:
            plan = adapter.plan(run.report, delivered, vendor)
        except DeliveryError as exc:
            await self._settle_error(run, exc, attempted=False)
            return
        except Exception as exc:
            await self._settle(
                run, Event.ERROR, Detail(error=f"adapter error while planning: {exc!r}")
            )
            return
        await self._execute(run, plan, delivered)

    async def _read_back_if_needed(self, run: _Run) -> tuple[DeliveredPart, ...]:
        job, adapter = run.job, run.adapter
        if not adapter.reads_back:
            return job.delivered
        if not (adapter.reads_before_send or job.previous_status == Status.IN_DOUBT):
            return job.delivered
        channel = self.channels.get(job.municipality, job.adapter)
        try:
            held = tuple(
                await cast(ReadsBack, adapter).read_back(
                    run.report, job.delivered, job.pending, channel
                )
            )
        except (Transient, InDoubt) as exc:
            await self._called(run, ok=False)
            # a read changes nothing at the vendor: no answer to it is just "try later"
            raise Transient(exc.message, status=exc.status, body=exc.body) from exc
        except Rejected:
            await self._called(run, ok=True)
            raise
        await self._called(run, ok=True)
        await self.store.replace_parts(
            job.delivery_id, job.report_pk, job.adapter, held, self.clock()
        )
        return held

    async def _read_back_failed(self, run: _Run, exc: DeliveryError) -> None:
        """An in-doubt delivery stays in doubt until the vendor could be asked."""
        if run.job.previous_status != Status.IN_DOUBT:
            await self._settle_error(run, exc, attempted=False)
            return
        await self._settle(
            run, Event.READ_BACK_FAILED, Detail(error=mask_cpr(exc.message, run.cprs))
        )

    async def _execute(self, run: _Run, plan: Plan, delivered: tuple[DeliveredPart, ...]) -> None:
        if plan.not_applicable:
            await self._settle(run, Event.NOT_APPLICABLE, Detail(error=plan.not_applicable))
            return
        if plan.correction_required:
            await self._settle(
                run, Event.CORRECTION_REQUIRED, Detail(error=plan.correction_required)
            )
            return
        references = {p.part: p.vendor_reference for p in delivered}
        if not plan.messages:
            await self._settle(
                run, Event.ALREADY_DELIVERED, Detail(vendor_reference=_join(references))
            )
            return
        for index, message in enumerate(plan.messages):
            last = index == len(plan.messages) - 1
            ok = await self._send_one(run, message, references, last)
            if not ok:
                return

    async def _send_one(
        self, run: _Run, message: Message, references: dict[str, str | None], last: bool
    ) -> bool:
        job, adapter = run.job, run.adapter
        vendor = self.channels.vendor(job.municipality, job.adapter)
        try:
            payload = adapter.render(run.report, message, vendor)
        except InvalidPayload as exc:
            await self._settle_error(run, exc, attempted=False)
            return False
        request = _text(payload.body, run.cprs)
        try:
            attempt_id = await self.store.begin_attempt(
                job.delivery_id, message, request, self.clock(), owner=self.owner
            )
        except LeaseLost as exc:
            # reclaimed (and perhaps claimed by another process) while this one planned:
            # it is no longer ours to send or to settle; whoever holds it now goes on
            log.warning("delivery %s: abandoned without sending: %s", job.delivery_id, exc)
            return False
        started = time.monotonic()
        try:
            receipt = await adapter.send(payload, self.channels.get(job.municipality, job.adapter))
        except DeliveryError as exc:
            self.metrics.observe_attempt(job.adapter, time.monotonic() - started)
            await self._called(
                run, ok=isinstance(exc, Rejected)
            )  # a refusal is an answer: it is up
            await self._record_failure(run, attempt_id, message, exc, started)
            return False
        except Exception as exc:  # unknown: the request may have left, so never guess "retry"
            self.metrics.observe_attempt(job.adapter, time.monotonic() - started)
            await self._called(run, ok=False)
            doubt = InDoubt(f"unexpected error while sending: {exc!r}")
            await self._record_failure(run, attempt_id, message, doubt, started)
            return False
        self.metrics.observe_attempt(job.adapter, time.monotonic() - started)
        await self._called(run, ok=True)
        await self._record_success(run, attempt_id, message, receipt, started, references, last)
        return True

    async def _record_success(
        self,
        run: _Run,
        attempt_id: int,
        message: Message,
        receipt: Receipt,
        started: float,
        references: dict[str, str | None],
        last: bool,
    ) -> None:
        if message.deletes:
            references.pop(message.part, None)
        else:
            references[message.part] = receipt.vendor_reference
        record = AttemptRecord(
            "delivered",
            receipt.status,
            _ms(started),
            _text(receipt.body, run.cprs),
            vendor_reference=receipt.vendor_reference,
            error=receipt.warning,
        )
        decision = None
        if last:
            detail = Detail(vendor_reference=_join(references), warning=receipt.warning)
            decision = self._decide(run, Event.DELIVERED, detail)
        job = run.job
        await self.store.end_attempt(
            attempt_id,
            job.delivery_id,
            job.report_pk,
            job.adapter,
            job.version,
            record,
            message,
            decision.settle() if decision is not None else None,
            self.clock(),
        )
        if decision is not None:
            self._counted(job, decision)
            log.info("delivery %s %s", job.delivery_id, decision.status)

    async def _record_failure(
        self, run: _Run, attempt_id: int, message: Message, exc: DeliveryError, started: float
    ) -> None:
        decision = self._decide(run, *_event_for(exc, run.cprs, sent=True))
        record = AttemptRecord(
            decision.attempt_outcome or "failed",
            exc.status,
            _ms(started),
            _text(exc.body, run.cprs),
            error=mask_cpr(exc.message, run.cprs),
        )
        job = run.job
        await self.store.end_attempt(
            attempt_id,
            job.delivery_id,
            job.report_pk,
            job.adapter,
            job.version,
            record,
            message,
            decision.settle(),
            self.clock(),
        )
        self._counted(job, decision)
        log.info("delivery %s %s: %s", job.delivery_id, decision.status, record.error)

    def _decide(self, run: _Run, event: Event, detail: Detail) -> Decision:
        policy = self.settings.retry_for(run.job.municipality, run.job.adapter)
        return decide(run.facts, event, policy, self.clock(), detail)

    async def _settle_error(self, run: _Run, exc: DeliveryError, attempted: bool) -> None:
        await self._settle(run, *_event_for(exc, run.cprs, sent=attempted))

    async def _settle(self, run: _Run, event: Event, detail: Detail) -> None:
        decision = self._decide(run, event, detail)
        await self.store.settle(
            run.job.delivery_id, decision.settle(), self.clock(), decision.audit
        )
        self._counted(run.job, decision)

    def _counted(self, job: Job, decision: Decision) -> None:
        """Count a decision once the store has saved it."""
        self.metrics.count_outcome(job.municipality, job.adapter, str(decision.status))
        if decision.status in (Status.FAILED, Status.IN_DOUBT):
            self._alarm()

    def _alarm(self) -> None:
        if self.on_alarm is not None:
            self.on_alarm()


def _facts(job: Job, reads_back: bool) -> Delivery:
    """A claimed job as the state machine sees it."""
    return Delivery(
        Status.IN_FLIGHT,
        attempts=job.attempts,
        retry_since=job.created_at,
        claimed_from=Status(job.previous_status),
        reads_back=reads_back,
        cutoff_at=job.cutoff_at,
    )


def _event_for(exc: DeliveryError, cprs: tuple[str, ...], sent: bool) -> tuple[Event, Detail]:
    """The error tree (adapters/base.py) as events of the state machine."""
    detail = Detail(error=mask_cpr(exc.message, cprs), sent=sent)
    if isinstance(exc, InvalidPayload):
        return Event.INVALID_PAYLOAD, detail
    if isinstance(exc, Rejected):
        return Event.REJECTED, detail
    if isinstance(exc, InDoubt):
        return Event.IN_DOUBT, detail
    assert isinstance(exc, Transient)
    return Event.TRANSIENT, Detail(
        error=detail.error, retry_after=exc.retry_after, http_status=exc.status, sent=sent
    )


def build_endpoints(settings: Settings, adapters: Mapping[str, Adapter]) -> Endpoints:
    """One endpoint per configured route; adapters declare their vendor's opening hours."""
    keys = {(m, a) for m, t in settings.tenants.items() for a in t.routes.values() if a in adapters}
    policies = {key: settings.endpoint(*key) for key in sorted(keys)}
    defaults = {name: a.opening_hours for name, a in adapters.items()}
    try:
        return Endpoints(policies, defaults)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def _join(references: Mapping[str, str | None]) -> str | None:
    refs = [r for _, r in sorted(references.items()) if r]
    return ", ".join(refs) or None


def _text(body: bytes, cprs: tuple[str, ...]) -> str:
    """A body as stored in the audit trail: decoded, CPR-masked, bounded."""
    text = body[:_BODY_LIMIT].decode("utf-8", errors="replace")
    return mask_cpr(text, cprs)


def _ms(started: float) -> float:
    return round((time.monotonic() - started) * 1000, 2)
