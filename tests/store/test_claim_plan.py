"""A claim costs the same with 100 or 20,000 deliveries waiting (issue 12), on both engines.

The claim reads ``lane_heads`` (migration 12: the first unfinished delivery of each employee
lane, indexed by due time) instead of every due delivery. These tests check that its query
uses that index, that the work it does does not grow with the backlog, and that the table
always says what a full recomputation from ``deliveries`` says, after any sequence of the
store's operations.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
import uuid
from collections.abc import Iterator
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway import deliveries
from gateway.store import BLOCKING, NewReport, Settle, Status, Store, open_store
from gateway.store.common import LANE_HEAD_CANDIDATE, due_heads
from gateway.store.postgres import _q
from tests.conftest import TEST_KEYS

SD = "sd-koersel"
PAST = 1_000_000.0  # everything submitted is due long before "now"


def report(municipality: str, n: int, lane_size: int = 10, version: int = 1) -> NewReport:
    employee = f"E{n // lane_size}"
    body = {"report_id": f"R{n}", "employee": {"employment_id": employee}}
    return NewReport(
        municipality,
        f"R{n}",
        version,
        "drive",
        employee,
        body,
        "0101901234",
        None,
        f"R{n}-{version}",
        SD,
    )


async def fill(store: Store, municipality: str, start: int, stop: int, lane_size: int = 10) -> None:
    for first in range(start, stop, 1000):
        stop_at = min(stop, first + 1000)
        batch = [report(municipality, n, lane_size) for n in range(first, stop_at)]
        await store.submit(batch, PAST)


# -- the pure rules ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lane", "head"),
    [
        ([], None),
        ([(1, "delivered", 1.0), (2, "superseded", 2.0)], None),
        ([(1, "queued", 5.0)], (1, Status.QUEUED, 5.0)),
        ([(1, "delivered", 1.0), (2, "retry_scheduled", 9.0)], (2, Status.RETRY_SCHEDULED, 9.0)),
        ([(3, "queued", 1.0), (2, "failed", 2.0)], (2, Status.FAILED, 2.0)),  # by id, not order
        ([(1, "in_flight", 1.0), (2, "queued", 0.0)], (1, Status.IN_FLIGHT, 1.0)),
        ([(1, "correction_required", 1.0), (2, "in_doubt", 3.0)], (2, Status.IN_DOUBT, 3.0)),
        (
            [(1, "cancelled", 1.0), (2, "not_applicable", 1.0), (3, "queued", 4.0)],
            (3, "queued", 4.0),
        ),
    ],
)
def test_the_head_of_a_lane_is_its_first_delivery_that_blocks_it(
    lane: list[tuple[int, str, float]], head: tuple[int, str, float] | None
) -> None:
    assert deliveries.lane_head(lane) == head


def test_a_claim_takes_waiting_heads_and_in_doubt_ones_only_where_the_vendor_can_be_asked() -> None:
    waiting = {Status.QUEUED, Status.RETRY_SCHEDULED}
    assert deliveries.claimable(reads_back=False) == waiting
    assert deliveries.claimable(reads_back=True) == waiting | {Status.IN_DOUBT}


def test_the_claim_reads_one_bounded_index_range_per_adapter_and_claimable_state() -> None:
    sql, params = due_heads(5.0, 50, [SD, "kmd"], [SD], "746")
    assert sql.count("FROM lane_heads") == 3 + 2
    assert sql.count("LIMIT ?") == 5 + 1 and params[-1] == 50
    assert ["746", SD, "in_doubt", 5.0, 50] == params[:5]


# -- (a) the plan uses the index --------------------------------------------------------


def sqlite_path(url: str) -> str:
    return url.removeprefix("sqlite:///")


def sqlite_plan(path: str, sql: str, params: Any) -> list[str]:
    with sqlite3.connect(path) as conn:
        return [row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}", params)]


def pg_nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from pg_nodes(child)


async def pg_explain(url: str, sql: str, params: Any, analyze: bool = False) -> dict[str, Any]:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("ANALYZE")
        options = "ANALYZE, BUFFERS, FORMAT JSON" if analyze else "FORMAT JSON"
        async with conn.transaction():  # FOR UPDATE: the locks go with the rollback
            text = await conn.fetchval(f"EXPLAIN ({options}) {_q(sql)}", *params)
            raise _Rollback(json.loads(text)[0])
    except _Rollback as done:
        return done.plan
    finally:
        await conn.close()


class _Rollback(Exception):
    def __init__(self, plan: dict[str, Any]) -> None:
        self.plan = plan


async def test_the_claim_query_searches_the_lane_heads_index(store: Store, store_url: str) -> None:
    await fill(store, "746", 0, 3000)
    if store_url.startswith("sqlite"):
        sql, params = due_heads(time.time(), 50, [SD], [SD], "746")
        plan = sqlite_plan(sqlite_path(store_url), sql, params)
        searches = [p for p in plan if "lane_heads" in p]
        assert len(searches) == 3, plan
        assert all("USING COVERING INDEX lane_heads_due" in p for p in searches), plan
        assert not [p for p in plan if p.startswith("SCAN") and "lane_heads" in p], plan
        assert not [p for p in plan if "deliveries" in p], plan
        head = sqlite_plan(sqlite_path(store_url), LANE_HEAD_CANDIDATE, ("746", SD, "E1"))
        assert head == [
            "SEARCH deliveries USING INDEX deliveries_lane_open (municipality=? AND"
            " adapter=? AND employee_key=?)"
        ], head
        return
    sql, params = due_heads(time.time(), 50, [SD], [SD], "746", " FOR UPDATE SKIP LOCKED")
    nodes = list(pg_nodes((await pg_explain(store_url, sql, params))["Plan"]))
    scans = [n for n in nodes if n.get("Relation Name")]
    assert len(scans) == 3 and all(n["Relation Name"] == "lane_heads" for n in scans), scans
    assert {n["Node Type"] for n in scans} <= {"Index Scan", "Index Only Scan"}, scans
    assert {n["Index Name"] for n in scans} == {"lane_heads_due"}, scans
    head = list(
        pg_nodes((await pg_explain(store_url, LANE_HEAD_CANDIDATE, ("746", SD, "E1")))["Plan"])
    )
    assert [n.get("Index Name") for n in head if n.get("Relation Name")] == ["deliveries_lane_open"]


# -- (b) the work does not grow with the backlog ------------------------------------------


async def claim_work(store: Store, store_url: str, municipality: str) -> tuple[int, int]:
    """What one claim of 50 costs: SQLite, the VM steps of the whole claim (every statement
    of it); PostgreSQL, the rows and buffers its read of the heads touched."""
    now = time.time()
    if store_url.startswith("sqlite"):
        steps = 0

        def count() -> int:
            nonlocal steps
            steps += 1
            return 0

        conn = store._wconn  # type: ignore[attr-defined]
        conn.set_progress_handler(count, 1)
        try:
            jobs = await store.claim_due(now, "w", 60, 50, [SD], [], municipality)
        finally:
            conn.set_progress_handler(None, 1)
        assert len(jobs) == 50
        return steps, 0
    sql, params = due_heads(now, 50, [SD], [], municipality, " FOR UPDATE SKIP LOCKED")
    nodes = list(pg_nodes((await pg_explain(store_url, sql, params, analyze=True))["Plan"]))
    scans = [n for n in nodes if n.get("Relation Name")]
    rows = sum(n["Actual Rows"] * n["Actual Loops"] for n in scans)
    buffers = sum(n["Shared Hit Blocks"] + n["Shared Read Blocks"] for n in scans)
    assert nodes[0]["Actual Rows"] == 50
    return rows, buffers


async def test_a_claim_does_the_same_work_with_100_or_20000_waiting(
    store: Store, store_url: str
) -> None:
    await fill(store, "100", 0, 100, lane_size=1)  # 100 lanes, 100 heads
    await fill(store, "20k", 0, 20_000)  # 2,000 lanes of 10
    small = await claim_work(store, store_url, "100")
    large = await claim_work(store, store_url, "20k")
    # the same up to an index level or two: the old query did ~200 times the work here
    assert large[0] <= small[0] * 1.2 + 50, (small, large)
    assert large[1] <= small[1] * 1.5 + 6, (small, large)


# -- (c) the table always says what a recomputation says ----------------------------------

SETTLED_AS = [
    Status.DELIVERED,
    Status.RETRY_SCHEDULED,
    Status.FAILED,
    Status.IN_DOUBT,
    Status.NOT_APPLICABLE,
    Status.CORRECTION_REQUIRED,
]
operations = st.lists(
    st.one_of(
        st.tuples(st.just("submit"), st.integers(0, 5), st.integers(1, 3)),
        st.tuples(st.just("claim"), st.booleans(), st.booleans()),
        st.tuples(st.just("settle"), st.integers(0, 4), st.sampled_from(SETTLED_AS)),
        st.tuples(st.just("reclaim")),
        st.tuples(
            st.just("operate"),
            st.sampled_from(["replay", "cancel", "check", "confirm"]),
            st.integers(0, 5),
        ),
        st.tuples(st.just("defer"), st.booleans()),
    ),
    max_size=30,
)


async def lane_heads_and_truth(
    url: str, municipality: str
) -> tuple[set[tuple[Any, ...]], set[tuple[Any, ...]]]:
    heads_sql = (
        "SELECT adapter, employee_key, delivery_id, status, due_at FROM lane_heads"
        " WHERE municipality = ?"
    )
    rows_sql = (
        "SELECT adapter, employee_key, id, status, next_attempt_at FROM deliveries"
        " WHERE municipality = ? ORDER BY id"
    )
    if url.startswith("sqlite"):
        with sqlite3.connect(sqlite_path(url)) as conn:
            heads = conn.execute(heads_sql, (municipality,)).fetchall()
            rows = conn.execute(rows_sql, (municipality,)).fetchall()
    else:
        conn = await asyncpg.connect(url)
        try:
            heads = await conn.fetch(_q(heads_sql), municipality)
            rows = await conn.fetch(_q(rows_sql), municipality)
        finally:
            await conn.close()
    truth: dict[tuple[str, str], tuple[Any, ...]] = {}
    for adapter, employee, id_, status, due in rows:  # by id: the first that blocks wins
        if status in BLOCKING and (adapter, employee) not in truth:
            truth[(adapter, employee)] = (adapter, employee, id_, status, due)
    return {tuple(h) for h in heads}, set(truth.values())


async def run_operations(url: str, ops: list[tuple[Any, ...]]) -> None:
    municipality = f"m{uuid.uuid4().hex[:8]}"
    store = open_store(url, keys=TEST_KEYS)
    await store.open()
    try:
        held: list[int] = []
        now = time.time()
        for step, op in enumerate(ops):
            now += 1
            if op[0] == "submit":
                n, version = op[1], op[2]
                await store.submit([report(municipality, n, lane_size=3, version=version)], now)
            elif op[0] == "claim":
                jobs = await store.claim_due(
                    now, "p", 30, 2, [SD], [SD] if op[2] else [], municipality, lane_order=op[1]
                )
                held += [j.delivery_id for j in jobs]
            elif op[0] == "settle" and held:
                delivery_id = held.pop(op[1] % len(held))
                settle = Settle(op[2], next_attempt_at=now - 0.5, vendor_reference="ref")
                await store.settle(delivery_id, settle, now, f"delivery.{op[2]}")
            elif op[0] == "reclaim":
                await store.reclaim(now, every_lease=True)
                held.clear()
            elif op[0] == "operate":
                filters = {"municipality": municipality, "report_id": f"R{op[2]}"}
                await store.operate(op[1], filters, "op", "test", now, [SD], "ref")
            elif op[0] == "defer":
                if op[1]:
                    await store.defer_due(municipality, SD, now + 100, now)
                else:
                    await store.undefer(municipality, SD, now)
            heads, truth = await lane_heads_and_truth(url, municipality)
            assert heads == truth, (step, op)
    finally:
        await store.aclose()


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=operations)
def test_lane_heads_always_equal_a_recomputation_from_the_deliveries(
    store_url: str, ops: list[tuple[Any, ...]]
) -> None:
    # each example in its own municipality (its own lanes) of the one database
    asyncio.run(run_operations(store_url, ops))


async def test_migration_12_fills_lane_heads_from_the_deliveries_already_stored(
    store: Store, store_url: str
) -> None:
    await store.submit([report("746", n, lane_size=3) for n in range(9)], PAST)
    [job] = await store.claim_due(time.time(), "p", 30, 1, [SD], [], "746")
    await store.settle(job.delivery_id, Settle(Status.DELIVERED), time.time(), "delivery.delivered")
    await store.aclose()
    emptied = "DELETE FROM lane_heads; DELETE FROM schema_migrations WHERE version = 12;"
    emptied += " DROP INDEX lane_heads_delivery; DROP INDEX lane_heads_due;"
    emptied += " DROP INDEX deliveries_lane_open; DROP TABLE lane_heads"
    if store_url.startswith("sqlite"):
        with sqlite3.connect(sqlite_path(store_url)) as conn:
            conn.executescript(emptied)
    else:
        conn = await asyncpg.connect(store_url)
        try:
            await conn.execute(emptied)
        finally:
            await conn.close()
    again = open_store(store_url, keys=TEST_KEYS)
    await again.open()  # migrates again: the back-fill
    try:
        heads, truth = await lane_heads_and_truth(store_url, "746")
        assert heads == truth and len(heads) == 3
        assert len(await again.claim_due(time.time(), "p", 30, 10, [SD], [], "746")) == 3
    finally:
        await again.aclose()
