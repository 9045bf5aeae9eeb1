"""The dispatcher on a real SQLite store with in-memory fake adapters and a clock the test
moves: retry schedule, in doubt, supersede, holds, at-risk, retry exhaustion. No HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import copy
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from adapters.base import (
    Channel,
    DeliveredPart,
    DeliveryError,
    InDoubt,
    Kind,
    Message,
    Payload,
    Plan,
    Receipt,
    Rejected,
    Report,
    Transient,
    VendorSettings,
)
from gateway.dispatcher import Dispatcher
from gateway.retry import next_delay
from gateway.settings import RetryPolicy, Settings
from gateway.store import NewReport, Status, Store, open_store
from gateway.watch import AtRiskWatch
from tests.conftest import DRIVE, TEST_KEYS, tenant

START = 1_800_000_000.0
POLICY = RetryPolicy(
    first_delay=10, multiplier=2, cap=600, jitter=0, max_attempts=3, max_age=86_400
)
NOTHING = Receipt(None)


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now

    def advance_to(self, at: float) -> None:
        self.now = max(self.now, at)


@dataclass
class FakeAdapter:
    """One message per report; ``send`` answers from the script of its employment id."""

    name: str = "fake"
    kinds: frozenset[Kind] = frozenset({Kind.DRIVE})
    schema_files: tuple[str, ...] = ()
    required_fields: frozenset[str] = frozenset()
    unsupported_fields: frozenset[str] = frozenset()
    field_formats: dict[str, tuple[str, str]] = field(default_factory=dict)
    opening_hours: str | None = None
    file_based: bool = False
    reads_back: bool = False
    reads_before_send: bool = False
    script: dict[str, list[Receipt | DeliveryError]] = field(default_factory=dict)
    not_applicable: set[str] = field(default_factory=set)
    sent: list[tuple[str, str]] = field(default_factory=list)  # (report_id, km)

    def plan(
        self, report: Report, delivered: Sequence[DeliveredPart], settings: VendorSettings
    ) -> Plan:
        if report.report_id in self.not_applicable:
            return Plan(not_applicable="zero km")
        if any(p.part == "km" for p in delivered):
            return Plan()
        return Plan(
            (
                Message(
                    "km", "create", {"report_id": report.report_id, "km": str(report.distance_km)}
                ),
            )
        )

    def render(self, report: Report, message: Message, settings: VendorSettings) -> Payload:
        return Payload(
            f"{message.fields['report_id']}|{message.fields['km']}".encode(), "text/plain"
        )

    async def send(self, payload: Payload, channel: Channel) -> Receipt:
        report_id, km = payload.body.decode().split("|")
        self.sent.append((report_id, km))
        answers = self.script.get(report_id, [])
        answer = answers.pop(0) if answers else Receipt(f"REF-{report_id}-{len(self.sent)}")
        if isinstance(answer, DeliveryError):
            raise answer
        return answer


class FakeChannels:
    """No sessions: the fake adapter never opens a connection."""

    def vendor(self, municipality: str, adapter: str) -> VendorSettings:
        return VendorSettings()

    def get(self, municipality: str, adapter: str) -> Channel:
        return Channel(None, VendorSettings())  # type: ignore[arg-type]


@dataclass
class Rig:
    store: Store
    adapter: FakeAdapter
    clock: Clock
    dispatcher: Dispatcher
    settings: Settings

    async def submit(
        self,
        report_id: str,
        employment: str = "00123",
        version: int = 1,
        km: str = "10.00",
        cutoff_at: float | None = None,
    ) -> None:
        body: dict[str, Any] = copy.deepcopy(DRIVE)
        body.update(report_id=report_id, version=version, distance_km=km)
        body["employee"]["employment_id"] = employment
        cpr = body["employee"].pop("cpr")
        approver = body.pop("approved_by_cpr")
        new = NewReport(
            "746",
            report_id,
            version,
            "drive",
            employment,
            body,
            cpr,
            approver,
            f"{report_id}-{version}-{km}",
            "fake",
            cutoff_at,
        )
        await self.store.submit([new], self.clock())

    async def tick(self) -> int:
        """One round of the dispatcher's loop: claim what is due now and deliver it."""
        self.dispatcher._refreshed_at = -1e12  # look at leases and pauses on every tick
        jobs = await self.dispatcher._claim(self.settings.workers)
        await asyncio.gather(*(self.dispatcher._guarded(job) for job in jobs))
        return len(jobs)

    async def deliveries(self, report_id: str) -> list[dict[str, Any]]:
        """Oldest first (the store lists newest first)."""
        rows = await self.store.list_deliveries({"report_id": report_id})
        return sorted(rows, key=lambda d: d["id"])

    async def latest(self, report_id: str) -> dict[str, Any]:
        return (await self.deliveries(report_id))[-1]


@pytest.fixture
async def rig(tmp_path: Path, store_url: str) -> AsyncIterator[Rig]:
    """The dispatcher on a fake clock and a fake adapter, on each store engine."""
    settings = Settings(
        store_url=store_url,
        data_dir=tmp_path,
        workers=8,
        lease_seconds=30,
        poll_seconds=0.05,
        retry=POLICY,
        max_body_bytes=256 * 1024,
        tenants={"746": tenant("746", "k", {}, {"drive": "fake"})},
    )
    store = open_store(store_url, keys=TEST_KEYS)
    await store.open()
    adapter, clock = FakeAdapter(), Clock()
    dispatcher = Dispatcher(store, {"fake": adapter}, settings, FakeChannels(), clock=clock)  # type: ignore[arg-type]
    try:
        yield Rig(store, adapter, clock, dispatcher, settings)
    finally:
        await store.aclose()


async def test_a_transient_failure_is_retried_on_the_policys_schedule(rig: Rig) -> None:
    rig.adapter.script["R-1"] = [Transient("HTTP 500", status=500)]
    await rig.submit("R-1")
    assert await rig.tick() == 1
    d = await rig.latest("R-1")
    assert (d["status"], d["attempts"], d["last_error"]) == ("retry_scheduled", 1, "HTTP 500")
    assert d["next_attempt_at"] == START + next_delay(POLICY, 1) == START + 10
    rig.clock.advance_to(START + 9)
    assert await rig.tick() == 0  # not due yet: nothing sleeps, nothing is sent
    rig.clock.advance_to(START + 10)
    assert await rig.tick() == 1
    d = await rig.latest("R-1")
    assert (d["status"], d["attempts"], d["last_error"]) == ("delivered", 2, None)
    assert d["vendor_reference"] == "REF-R-1-2"
    assert rig.adapter.sent == [("R-1", "10.00")] * 2


async def test_a_retry_after_is_honoured(rig: Rig) -> None:
    rig.adapter.script["R-1"] = [Transient("slow down", status=429, retry_after=300)]
    await rig.submit("R-1")
    await rig.tick()
    assert (await rig.latest("R-1"))["next_attempt_at"] == START + 300


async def test_in_doubt_is_never_resent_blindly(rig: Rig) -> None:
    rig.adapter.script["R-1"] = [InDoubt("no answer within 30 s after sending")]
    await rig.submit("R-1")
    await rig.tick()
    d = await rig.latest("R-1")
    assert (d["status"], d["attempts"]) == ("in_doubt", 1)
    rig.clock.advance_to(START + 86_400)
    assert await rig.tick() == 0  # the fake vendor cannot be asked: an operator decides
    assert rig.adapter.sent == [("R-1", "10.00")]
    result = await rig.store.operate(
        "confirm",
        {"ids": [d["id"]]},
        "ops",
        "found it at the vendor",
        rig.clock(),
        vendor_reference="SD-7",
    )
    assert result == {"changed": [d["id"]], "skipped": []}
    assert (await rig.latest("R-1"))["status"] == "delivered"


async def test_a_newer_version_supersedes_an_unsent_and_a_retrying_one(rig: Rig) -> None:
    await rig.submit("R-1", km="10.00")
    await rig.submit("R-1", version=2, km="11.00")
    assert [d["status"] for d in await rig.deliveries("R-1")] == ["superseded", "queued"]
    rig.adapter.script["R-2"] = [Transient("HTTP 503", status=503)]
    await rig.submit("R-2", employment="00777", km="5.00")
    await rig.tick()
    assert (await rig.latest("R-2"))["status"] == "retry_scheduled"
    await rig.submit("R-2", employment="00777", version=2, km="6.00")
    old, new = await rig.deliveries("R-2")
    assert (old["status"], old["last_error"]) == ("superseded", "superseded by version 2")
    await rig.tick()
    assert ("R-1", "10.00") not in rig.adapter.sent and (
        "R-2",
        "6.00",
    ) in rig.adapter.sent  # version 1 was never sent
    assert [d["status"] for d in await rig.deliveries("R-1")] == ["superseded", "delivered"]
    assert (await rig.latest("R-2"))["status"] == "delivered"


async def test_a_failed_delivery_holds_that_employee_only(rig: Rig) -> None:
    rig.adapter.script["A-1"] = [Rejected("employment 00999 is unknown")]
    await rig.submit("A-1", employment="00999")
    await rig.submit("A-2", employment="00999")
    await rig.submit("B-1", employment="00555")
    await rig.tick()
    first = await rig.latest("A-1")
    assert first["status"] == "failed"
    assert (await rig.latest("B-1"))["status"] == "delivered"
    held = await rig.latest("A-2")  # the ops list shows why it waits
    assert held["status"] == "held"
    assert held["held_by"]["delivery_id"] == first["id"] and held["held_by"]["status"] == "failed"
    assert await rig.tick() == 0
    assert [r for r, _ in rig.adapter.sent] == ["A-1", "B-1"]
    await rig.store.operate("cancel", {"ids": [first["id"]]}, "ops", "paid by hand", rig.clock())
    assert (await rig.latest("A-2"))["status"] == "queued"
    await rig.tick()
    assert (await rig.latest("A-2"))["status"] == "delivered"


async def test_at_risk_is_flagged_near_the_cutoff_and_cleared_when_delivered(rig: Rig) -> None:
    cutoff = START + 600
    rig.adapter.script["R-1"] = [Transient("busy", status=429, retry_after=3600)]
    await rig.submit("R-1", cutoff_at=cutoff)
    await rig.tick()  # its next attempt is after the cut-off
    flagged = await AtRiskWatch(rig.store, rig.settings, rig.clock).check()
    assert [f["report_id"] for f in flagged] == ["R-1"]
    assert (await rig.latest("R-1"))["at_risk"] is True
    assert await rig.store.count_at_risk() == 1
    assert await AtRiskWatch(rig.store, rig.settings, rig.clock).check() == []  # flagged once
    rig.clock.advance_to(START + 3600)
    await rig.tick()
    d = await rig.latest("R-1")
    assert (d["status"], d["at_risk"]) == ("delivered", False)
    assert await rig.store.count_at_risk() == 0


async def test_at_risk_is_cleared_when_there_is_nothing_to_send(rig: Rig) -> None:
    rig.adapter.not_applicable.add("R-1")
    await rig.submit("R-1", cutoff_at=START - 1)  # the cut-off has passed
    await AtRiskWatch(rig.store, rig.settings, rig.clock).check()
    assert (await rig.latest("R-1"))["at_risk"] is True
    await rig.tick()
    d = await rig.latest("R-1")
    assert (d["status"], d["at_risk"], d["last_error"]) == ("not_applicable", False, "zero km")


async def test_the_retry_policy_runs_out_and_the_reason_is_kept(rig: Rig) -> None:
    rig.adapter.script["R-1"] = [Transient("connect refused")] * 3
    await rig.submit("R-1")
    for _ in range(3):
        rig.clock.advance_to((await rig.latest("R-1"))["next_attempt_at"])
        await rig.tick()
    d = await rig.latest("R-1")
    assert (d["status"], d["attempts"]) == ("failed", 3)
    assert d["last_error"] == "retry policy exhausted after 3 attempts: connect refused"
    rig.clock.advance_to(START + 86_400)
    assert await rig.tick() == 0
    # a replay starts a fresh budget, due now
    await rig.store.operate("replay", {"ids": [d["id"]]}, "ops", "vendor is back", rig.clock())
    await rig.tick()
    d = await rig.latest("R-1")
    assert (d["status"], d["attempts"]) == ("delivered", 1)


async def test_a_lease_that_expires_mid_send_is_in_doubt(rig: Rig) -> None:
    await rig.submit("R-1")
    (job,) = await rig.store.claim_due(rig.clock(), "gone", 30, 10, ["fake"], [])
    await rig.store.begin_attempt(
        job.delivery_id, Message("km", "create"), "R-1|10.00", rig.clock()
    )
    rig.clock.advance_to(START + 31)
    await rig.tick()  # reclaims the expired lease; the request may have left: never resent
    d = await rig.latest("R-1")
    assert (d["status"], d["attempts"]) == ("in_doubt", 1)
    assert rig.adapter.sent == []


async def test_a_claimer_whose_lease_was_taken_over_abandons_without_sending(rig: Rig) -> None:
    await rig.submit("R-1")
    (job,) = await rig.dispatcher._claim(rig.settings.workers)
    rig.clock.advance_to(START + 31)  # this process stalled past its lease: another one takes over
    assert await rig.store.reclaim(rig.clock(), every_lease=False) == {"requeued": 1, "in_doubt": 0}
    (other,) = await rig.store.claim_due(rig.clock(), "other", 30, 10, ["fake"], [])
    await rig.dispatcher._guarded(job)  # the stalled process wakes up
    assert rig.adapter.sent == []
    d = await rig.latest("R-1")
    assert (d["status"], d["attempts"]) == ("in_flight", 0)  # still the other process's to deliver
    view = await rig.store.get_report("746", "R-1")
    assert view is not None and view["deliveries"][0]["attempts"] == []


async def test_a_breaker_opened_by_another_process_holds_deliveries_back(rig: Rig) -> None:
    await rig.store.open_breaker("746", "fake", START + 60)  # another dispatcher's breaker opened
    await rig.submit("R-1")
    assert await rig.tick() == 0
    rig.clock.advance_to(START + 60)
    assert await rig.tick() == 1  # the probe
    assert (await rig.latest("R-1"))["status"] == "delivered"


async def test_operators_get_a_conflict_for_a_state_without_that_action(rig: Rig) -> None:
    await rig.submit("R-1")
    await rig.tick()
    d = await rig.latest("R-1")
    for action in ("replay", "cancel", "confirm", "check"):
        result = await rig.store.operate(
            action, {"ids": [d["id"]]}, "ops", "why", rig.clock(), ["fake"]
        )
        assert result == {"changed": [], "skipped": [d["id"]]}


def test_the_fake_adapter_is_an_adapter() -> None:
    from adapters.base import Adapter

    assert isinstance(FakeAdapter(), Adapter)
    assert replace(FakeAdapter(), name="other").name == "other"
    assert Status.DELIVERED == "delivered"


async def test_a_finished_delivery_lets_its_lanes_next_one_go_without_waiting_for_the_poll(
    rig: Rig,
) -> None:
    """One employee's three reports go one after another, each as soon as the one before it is
    settled: the loop does not sit out its poll interval (30 s here) between them."""
    rig.dispatcher.settings = replace(rig.settings, poll_seconds=30)
    for n in (1, 2, 3):
        await rig.submit(f"L-{n}", km=f"{n}.00")
    loop = asyncio.create_task(rig.dispatcher.run())
    try:
        for _ in range(1000):  # 10 s at most, a third of one poll interval
            if len(rig.adapter.sent) == 3:
                break
            await asyncio.sleep(0.01)
    finally:
        await rig.dispatcher.aclose()
        loop.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loop
    assert [r for r, _ in rig.adapter.sent] == ["L-1", "L-2", "L-3"]
