"""The ``Store`` contract, method by method, on every engine (SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from adapters.base import DeliveredPart, Message
from gateway.audit import verify_chain
from gateway.store import (
    AttemptRecord,
    ConflictingReport,
    LeaseLost,
    NewReport,
    PulledRecord,
    PullOutcome,
    Settle,
    Status,
    Store,
    StoreError,
    open_store,
)
from gateway.store.migrations import LATEST
from tests.conftest import TEST_KEYS

SD = "sd-koersel"


def new(
    report_id: str,
    version: int = 1,
    employee: str = "E1",
    content: str = "a",
    adapter: str | None = SD,
) -> NewReport:
    body = {"report_id": report_id, "employee": {"employment_id": employee}, "content": content}
    return NewReport(
        "746",
        report_id,
        version,
        "drive",
        employee,
        body,
        "0101901234",
        "0202802345",
        f"{report_id}-{version}-{content}",
        adapter,
    )


async def claim(
    store: Store,
    now: float | None = None,
    owner: str = "p1",
    lease: float = 30,
    limit: int = 100,
    **kw: Any,
) -> list[Any]:
    return await store.claim_due(now or time.time(), owner, lease, limit, [SD], [], **kw)


async def test_submit_is_idempotent_and_a_conflict_stores_nothing(store: Store) -> None:
    now = time.time()
    first = await store.submit([new("A"), new("B")], now)
    assert [s.created for s in first] == [True, True] and first[0].status == Status.QUEUED
    again = await store.submit([new("A")], now)
    assert again[0].id == first[0].id and not again[0].created
    with pytest.raises(ConflictingReport) as caught:
        await store.submit([new("C"), new("A", content="changed")], now)
    assert caught.value.indexes == (1,)
    assert await store.get_report("746", "C") is None  # the batch is atomic
    view = await store.get_report("746", "A")
    assert view is not None and "cpr" not in str(view["versions"][0]["report"])


async def test_a_newer_version_supersedes_an_unstarted_one(store: Store) -> None:
    now = time.time()
    await store.submit([new("A")], now)
    await store.submit([new("A", version=2, content="b")], now)
    view = await store.get_report("746", "A")
    assert view is not None
    assert [d["status"] for d in view["deliveries"]] == ["superseded", "queued"]
    assert (await store.count_by_status()) == {"superseded": 1, "queued": 1}


async def test_claims_take_only_the_head_of_each_lane(store: Store) -> None:
    now = time.time()
    await store.submit(
        [new("A1", employee="E1"), new("A2", employee="E1"), new("B1", employee="E2")], now
    )
    jobs = await claim(store, now)
    assert sorted(j.report["report_id"] for j in jobs) == ["A1", "B1"]
    assert jobs[0].report["employee"]["cpr"] == "0101901234"  # restored for the vendor
    assert await claim(store, now) == []  # the heads are in flight: the lanes wait
    listed = await store.list_deliveries({"status": "queued"})
    assert listed[0]["status"] == "held" and listed[0]["held_by"]["report_id"] == "A1"
    first = next(j for j in jobs if j.report["report_id"] == "A1")
    await store.settle(
        first.delivery_id, Settle(Status.DELIVERED, vendor_reference="X"), now, "delivery.delivered"
    )
    [nxt] = await claim(store, now)
    assert nxt.report["report_id"] == "A2"
    file_jobs = await claim(store, now, lane_order=False)
    assert file_jobs == []  # everything left is in flight


async def test_concurrent_claimers_never_share_a_lane(store_url: str) -> None:
    """Two stores (on PostgreSQL: two pools, as two processes) claim one backlog at once."""
    stores = [open_store(store_url, keys=TEST_KEYS), open_store(store_url, keys=TEST_KEYS)]
    for s in stores:
        await s.open()
    try:
        now = time.time()
        await stores[0].submit([new(f"R{i}", employee=f"E{i % 10}") for i in range(200)], now)
        in_flight: dict[str, str] = {}
        delivered: list[str] = []

        async def work(s: Store, owner: str) -> None:
            for _ in range(400):
                jobs = await s.claim_due(time.time(), owner, 30, 5, [SD], [])
                if not jobs and len(delivered) == 200:
                    return
                for j in jobs:
                    lane = j.report["employee"]["employment_id"]
                    assert lane not in in_flight, (
                        f"{owner} and {in_flight.get(lane)} both work lane {lane}"
                    )
                    in_flight[lane] = owner
                await asyncio.sleep(0.005)  # the other claimer claims meanwhile
                for j in jobs:
                    del in_flight[j.report["employee"]["employment_id"]]
                    delivered.append(j.report["report_id"])
                    await s.settle(
                        j.delivery_id, Settle(Status.DELIVERED), time.time(), "delivery.delivered"
                    )

        await asyncio.gather(work(stores[0], "p1"), work(stores[1], "p2"))
        assert sorted(delivered) == sorted(f"R{i}" for i in range(200))
        for e in range(10):  # each lane in submission order
            lane = [r for r in delivered if int(r[1:]) % 10 == e]
            assert lane == sorted(lane, key=lambda r: int(r[1:]))
    finally:
        for s in stores:
            await s.aclose()


async def test_reclaim_takes_back_only_expired_leases(store: Store) -> None:
    now = time.time()
    await store.submit([new("A", employee="E1"), new("B", employee="E2")], now)
    jobs = await claim(store, now, lease=10)
    doubtful = next(j for j in jobs if j.report["report_id"] == "B")
    await store.begin_attempt(doubtful.delivery_id, Message("p", "create"), "<body/>", now)
    assert await store.reclaim(now + 5, every_lease=False) == {"requeued": 0, "in_doubt": 0}
    assert await store.reclaim(now + 11, every_lease=False) == {"requeued": 1, "in_doubt": 1}
    statuses = {d["report_id"]: d["status"] for d in await store.list_deliveries({})}
    assert statuses == {"A": "queued", "B": "in_doubt"}


async def test_an_attempt_is_fenced_by_the_lease(store: Store) -> None:
    """Only the lease holder starts an attempt, and only while its lease runs; a refused
    attempt records nothing."""
    now = time.time()
    await store.submit([new("A")], now)
    [job] = await claim(store, now, owner="p1", lease=10)
    message = Message("p", "create")
    with pytest.raises(LeaseLost):
        await store.begin_attempt(
            job.delivery_id, message, "<b/>", now, owner="p2"
        )  # not its lease
    with pytest.raises(LeaseLost):
        await store.begin_attempt(job.delivery_id, message, "<b/>", now + 11, owner="p1")  # expired
    assert isinstance(
        await store.begin_attempt(job.delivery_id, message, "<b/>", now + 1, owner="p1"), int
    )
    # reclaimed (the open attempt makes it in doubt) and no longer p1's: refused
    assert await store.reclaim(now + 11, every_lease=False) == {"requeued": 0, "in_doubt": 1}
    with pytest.raises(LeaseLost):
        await store.begin_attempt(job.delivery_id, message, "<b/>", now + 12, owner="p1")
    # requeued and claimed by another process: p2 may, p1 may not
    await store.submit([new("B", employee="E2")], now)
    [b1] = await claim(store, now, owner="p1", lease=10)
    assert await store.reclaim(now + 11, every_lease=False) == {"requeued": 1, "in_doubt": 0}
    [b2] = await claim(store, now + 12, owner="p2", lease=10)
    assert b2.delivery_id == b1.delivery_id
    with pytest.raises(LeaseLost):
        await store.begin_attempt(b1.delivery_id, message, "<b/>", now + 13, owner="p1")
    await store.begin_attempt(b2.delivery_id, message, "<b/>", now + 13, owner="p2")
    await store.begin_attempt(
        b2.delivery_id, message, "<b/>", now + 13
    )  # no owner: not fenced (old callers)
    view = await store.get_report("746", "B")
    assert view is not None and len(view["deliveries"][0]["attempts"]) == 2


async def test_breaker_openings_are_shared(store_url: str, store: Store) -> None:
    """An opening one process stores is seen by another until it ends; the later end wins."""
    now = time.time()
    assert await store.breakers_open(now) == {}
    await store.open_breaker("746", SD, now + 30)
    await store.open_breaker("746", SD, now + 10)  # an earlier end does not shorten it
    await store.open_breaker("840", SD, now + 5)
    other = open_store(store_url, keys=TEST_KEYS)
    await other.open()
    try:
        assert await other.breakers_open(now) == {("746", SD): now + 30, ("840", SD): now + 5}
        assert await other.breakers_open(now + 6) == {("746", SD): now + 30}
        await other.open_breaker("746", SD, now + 60)
    finally:
        await other.aclose()
    assert await store.breakers_open(now + 31) == {("746", SD): now + 60}
    assert await store.breakers_open(now + 60) == {}


async def test_attempts_parts_and_settle(store: Store) -> None:
    now = time.time()
    await store.submit([new("A")], now)
    [job] = await claim(store, now)
    message = Message("wage_code", "create", {"km": "1.00"})
    attempt = await store.begin_attempt(job.delivery_id, message, "<body/>", now)
    await store.end_attempt(
        attempt,
        job.delivery_id,
        job.report_pk,
        SD,
        job.version,
        AttemptRecord("delivered", 200, 3.0, "<ok/>", vendor_reference="V1"),
        message,
        Settle(Status.DELIVERED, vendor_reference="V1", count_attempt=True),
        now,
    )
    assert await store.delivered_parts(job.report_pk, SD) == [
        DeliveredPart("wage_code", 1, {"km": "1.00"}, "V1")
    ]
    await store.replace_parts(
        job.delivery_id, job.report_pk, SD, [DeliveredPart("x", 1, {}, None)], now
    )
    assert [p.part for p in await store.delivered_parts(job.report_pk, SD)] == ["x"]
    view = await store.get_report("746", "A")
    assert view is not None
    [d] = view["deliveries"]
    assert (d["status"], d["vendor_reference"], d["attempt_count"]) == ("delivered", "V1", 1)
    assert d["attempts"][0]["outcome"] == "delivered"
    assert (await store.deliveries_of([view["versions"][0]["id"]]))[view["versions"][0]["id"]][0][
        "status"
    ] == "delivered"
    events = [e["event"] for e in await store.audit_for(job.delivery_id)]
    assert events[-3:] == ["attempt.delivered", "delivery.delivered", "delivery.read_back"]


async def test_operations_replay_cancel_confirm(store: Store) -> None:
    now = time.time()
    await store.submit([new("A", employee="E1"), new("B", employee="E2")], now)
    jobs = {j.report["report_id"]: j for j in await claim(store, now)}
    await store.settle(
        jobs["A"].delivery_id, Settle(Status.FAILED, last_error="no"), now, "delivery.failed"
    )
    await store.begin_attempt(jobs["B"].delivery_id, Message("p", "create", {"a": 1}), "<b/>", now)
    await store.reclaim(now + 60, every_lease=False)  # B: in doubt
    done = await store.operate("replay", {"ids": [jobs["A"].delivery_id]}, "op", "fixed", now)
    assert done == {"changed": [jobs["A"].delivery_id], "skipped": []}
    done = await store.operate(
        "confirm", {"report_id": "B"}, "op", "found it", now, vendor_reference="V9"
    )
    assert done["changed"] == [jobs["B"].delivery_id]
    assert [p.part for p in await store.delivered_parts(jobs["B"].report_pk, SD)] == ["p"]
    done = await store.operate("cancel", {"municipality": "746"}, "op", "not needed", now)
    assert done == {"changed": [jobs["A"].delivery_id], "skipped": [jobs["B"].delivery_id]}


async def test_pulled_records_and_rejections(store: Store) -> None:
    now = time.time()
    records = [PulledRecord("1", "h1", new("P1")), PulledRecord("2", "h2", None, (("/x", "bad"),))]
    assert await store.take_pulled("746", "os2", records, now) == [
        PullOutcome.CREATED,
        PullOutcome.INVALID,
    ]
    again = [
        PulledRecord("1", "h1", new("P1")),
        PulledRecord("2", "h2", None, (("/x", "bad"),)),
        PulledRecord("1", "h3", new("P1", content="other")),
    ]
    assert await store.take_pulled("746", "os2", again, now + 1) == [
        PullOutcome.DUPLICATE,
        PullOutcome.INVALID,
        PullOutcome.CONFLICT,
    ]
    rejections = await store.list_rejections({"municipality": "746"})
    assert sorted((r["record_id"], r["kind"], r["times_seen"]) for r in rejections) == [
        ("1", "conflict", 1),
        ("2", "invalid", 2),
    ]
    assert rejections[0]["errors"][0]["pointer"] in ("/x", "/Id")


async def test_defer_and_undefer(store: Store) -> None:
    now = time.time()
    await store.submit([new("A")], now)
    assert await store.defer_due("746", SD, now + 3600, now) == 1
    assert await claim(store, now) == []
    [view] = await store.list_deliveries({})
    assert view["waiting_for_opening_at"] == now + 3600
    assert await store.undefer("746", SD, now) == 1
    assert len(await claim(store, now)) == 1


async def test_pauses_at_risk_and_events(store: Store) -> None:
    now = time.time()
    await store.set_paused("746", SD, True, "vendor maintenance", "op", now)
    assert await store.paused_endpoints() == {("746", SD): "vendor maintenance"}
    await store.set_paused("746", SD, False, "done", "op", now)
    assert await store.paused_endpoints() == {}
    late = NewReport(
        **{**{f: getattr(new("A"), f) for f in NewReport.__slots__}, "cutoff_at": now - 1}
    )
    await store.submit([late], now)
    assert [r["report_id"] for r in await store.flag_at_risk(now, 3600)] == ["A"]
    assert await store.count_at_risk() == 1 and await store.flag_at_risk(now, 3600) == []
    await store.record_event("endpoint.breaker_open", {"municipality": "746"}, now)
    events = await store.audit_chain()
    assert verify_chain(events) == (len(events), None)


async def test_file_run_journal(store: Store) -> None:
    now = time.time()
    await store.submit([new("A")], now)
    [job] = await store.claim_due(now, "f", 30, 10, [SD], [], "746", lane_order=False)
    run = {
        "run_id": "r1",
        "municipality": "746",
        "adapter": SD,
        "file": "/x/IND01.txt",
        "offset_before": 0,
        "data": "line\n",
        "first_line": 1,
        "header_lines": 0,
        "deliveries": {
            str(job.delivery_id): {
                "lines": [0],
                "parts": [{"part": "p", "operation": "create", "fields": {"a": 1}}],
            }
        },
    }
    async with store.file_lock("/x/IND01.txt"):
        await store.file_run_begin(run, now)
        assert [r["run_id"] for r in await store.file_runs_unfinished("/x/IND01.txt")] == ["r1"]
        await store.file_run_finish("r1", [7], "written", now)
    assert await store.file_runs_unfinished("/x/IND01.txt") == []
    [view] = await store.list_deliveries({})
    assert (view["status"], view["vendor_reference"]) == ("delivered", "IND01.txt:7")


async def test_the_audit_chain_holds_across_stores(store_url: str, store: Store) -> None:
    other = open_store(store_url, keys=TEST_KEYS)
    await other.open()
    try:
        now = time.time()
        await asyncio.gather(
            *(
                s.submit([new(f"R{i}-{n}")], now)
                for n, s in enumerate((store, other))
                for i in range(20)
            )
        )
        events = await store.audit_chain()
        assert len(events) == 80 and verify_chain(events) == (80, None)
    finally:
        await other.aclose()


async def test_a_closed_store_raises_store_error(store: Store) -> None:
    await store.aclose()
    with pytest.raises(StoreError):
        await store.submit([new("A")], time.time())
    with pytest.raises(StoreError):
        await store.list_deliveries({})


def test_migrate_applies_and_refuses_a_newer_schema(
    store_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from gateway.cli import main

    assert main(["migrate", "--store", store_url]) == 0
    assert main(["migrate", "--store", store_url]) == 0  # idempotent
    store = open_store(store_url, keys=TEST_KEYS)

    async def future() -> None:
        await store.open()
        await store.record_event("x", {}, time.time())
        await store.aclose()

    asyncio.run(future())
    if store_url.startswith("sqlite"):
        import sqlite3

        with sqlite3.connect(store_url.removeprefix("sqlite:///")) as conn:
            conn.execute("INSERT INTO schema_migrations VALUES (?, 'future', 'now')", (LATEST + 1,))
    else:

        async def bump() -> None:
            import asyncpg

            conn = await asyncpg.connect(store_url)
            await conn.execute(
                "INSERT INTO schema_migrations VALUES ($1, 'future', 'now')", LATEST + 1
            )
            await conn.close()

        asyncio.run(bump())
    capsys.readouterr()
    assert main(["migrate", "--store", store_url]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"version {LATEST + 1}" in err and f"version {LATEST}" in err
