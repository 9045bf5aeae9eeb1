"""The store's read models (the console and the ops API): the newest-first list with its
keyset cursor and filters, its count, the overview per endpoint, one delivery's detail.
Every test runs on both engines (SQLite and PostgreSQL)."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import replace
from typing import Any

import pytest

from adapters.base import Message
from gateway.store import AttemptRecord, NewReport, Settle, Status, Store, open_store
from gateway.store.common import cpr_lookup_hash, percentile, report_period
from tests.conftest import TEST_KEYS

SD = "sd-koersel"
KMD = "kmd-opus"
CPR_A, CPR_B, APPROVER = "0101901234", "1502851111", "0202802345"


def content_hash(report_id: str, version: int, purpose: str) -> str:
    return hashlib.sha256(f"{report_id}/{version}/{purpose}".encode()).hexdigest()


def new(
    report_id: str,
    *,
    employee: str = "E1",
    cpr: str = CPR_A,
    version: int = 1,
    period: str | None = "2026-03",
    municipality: str = "746",
    adapter: str = SD,
    purpose: str = "visit",
) -> NewReport:
    body = {
        "report_id": report_id,
        "employee": {"employment_id": employee},
        # free text a sender may have typed a CPR number into
        "purpose": purpose,
    }
    return NewReport(
        municipality,
        report_id,
        version,
        "drive",
        employee,
        body,
        cpr,
        APPROVER,
        content_hash(report_id, version, purpose),
        adapter,
        period=period,
        request_id=f"req-{report_id}",
    )


async def claim(store: Store, now: float) -> list[Any]:
    return await store.claim_due(now, "p1", 30, 100, [SD], [])


async def attempt(
    store: Store,
    job: Any,
    now: float,
    record: AttemptRecord,
    settle: Settle | None,
    request: str = "<body/>",
) -> int:
    message = Message("wage_code", "create", {"km": "1.00"})
    attempt_id = await store.begin_attempt(job.delivery_id, message, request, now)
    await store.end_attempt(
        attempt_id,
        job.delivery_id,
        job.report_pk,
        job.adapter,
        job.version,
        record,
        message,
        settle,
        now,
    )
    return attempt_id


async def test_pages_of_a_thousand_rows_return_each_once_newest_first(store: Store) -> None:
    now = time.time()
    await store.submit([new(f"R{i}", employee=f"E{i}") for i in range(1000)], now)
    seen: list[int] = []
    cursor: int | None = None
    for _ in range(12):  # 1000 rows at 97 a page: 11 pages and an empty one, never more
        page = await store.list_deliveries({"before_id": cursor}, 97)
        assert len(page) <= 97
        if not page:
            break
        seen += [row["id"] for row in page]
        cursor = page[-1]["id"]
    else:
        raise AssertionError(f"the cursor did not come to an end: {len(seen)} rows read")
    assert len(seen) == 1000 and len(set(seen)) == 1000
    assert seen == sorted(seen, reverse=True)  # newest (highest id) first
    # the count is the whole result, wherever the cursor points
    assert await store.count_deliveries({}) == 1000
    assert await store.count_deliveries({"before_id": seen[500]}) == 1000
    assert len(await store.list_deliveries({"before_id": seen[500]}, 5000)) == 499


async def test_filters_period_employee_status_held_and_count(store: Store) -> None:
    now = time.time()
    await store.submit(
        [
            new("A1", employee="E1", period="2026-03"),
            new("A2", employee="E1", period="2026-04"),  # held behind A1
            new("B1", employee="E2", period="2026-04", municipality="840"),
            new("C1", employee="E3", period=None, adapter=KMD),
        ],
        now,
    )
    by = {r["report_id"]: r for r in await store.list_deliveries({})}
    assert [r["report_id"] for r in await store.list_deliveries({})] == ["C1", "B1", "A2", "A1"]
    assert by["A2"]["period"] == "2026-04" and by["A1"]["employee"] == "E1"
    ids = [r["report_id"] for r in await store.list_deliveries({"period": "2026-04"})]
    assert ids == ["B1", "A2"] and await store.count_deliveries({"period": "2026-04"}) == 2
    assert [r["report_id"] for r in await store.list_deliveries({"employee": "E1"})] == [
        "A2",
        "A1",
    ]
    # held is a state shown (never stored): a waiting delivery behind an earlier one
    assert [r["report_id"] for r in await store.list_deliveries({"status": "held"})] == ["A2"]
    assert await store.count_deliveries({"status": "held"}) == 1
    # a stored state keeps selecting what it stored (actions select by it)
    assert await store.count_deliveries({"status": "queued"}) == 4
    combined = {"period": "2026-04", "municipality": "746", "adapter": SD, "status": "held"}
    assert [r["report_id"] for r in await store.list_deliveries(combined)] == ["A2"]
    assert await store.count_deliveries({"municipality": "840", "period": "2026-03"}) == 0


async def test_the_cpr_filter_finds_by_full_cpr_and_shows_none(store: Store) -> None:
    now = time.time()
    await store.submit(
        [
            new("A1", employee="E1", cpr=CPR_A, purpose=f"met {CPR_B} at the office"),
            new("B1", employee="E2", cpr=CPR_B),
            new("A2", employee="E3", cpr=CPR_A),
        ],
        now,
    )
    wanted = {"cpr_hash": cpr_lookup_hash(TEST_KEYS, CPR_A)}
    found = await store.list_deliveries(wanted)
    assert [r["report_id"] for r in found] == ["A2", "A1"]
    assert await store.count_deliveries(wanted) == 2
    written = cpr_lookup_hash(TEST_KEYS, "150285-1111")  # as an operator may type it
    assert [r["report_id"] for r in await store.list_deliveries({"cpr_hash": written})] == ["B1"]
    assert await store.list_deliveries({"cpr_hash": cpr_lookup_hash(TEST_KEYS, "0101011111")}) == []
    details = [await store.delivery_detail(r["id"]) for r in found]
    text = json.dumps([found, details])
    for cpr in (CPR_A, CPR_B, APPROVER):
        assert cpr not in text and f"{cpr[:6]}-{cpr[6:]}" not in text
    assert "xxxxxx-xxxx" in text  # the one typed into the purpose is masked, not dropped


async def _mixed(store: Store, now: float) -> dict[str, int]:
    """Deliveries in most states on two endpoints; the ids by report."""
    await store.submit(
        [
            new("D1", employee="E1"),  # delivered
            new("F1", employee="E2"),  # failed
            new("F2", employee="E2"),  # held behind F1
            new("U1", employee="E3"),  # in doubt
            new("I1", employee="E4"),  # in flight
            new("Q1", employee="E5", adapter=KMD),  # queued
            new("Q2", employee="E6", municipality="840"),  # queued elsewhere
        ],
        now - 600,
    )
    claimed = await store.claim_due(now, "p1", 30, 100, [SD], [], municipality="746")
    jobs = {j.report["report_id"]: j for j in claimed}
    await attempt(
        store,
        jobs["D1"],
        now - 100,
        AttemptRecord("delivered", 200, 40.0, "<ok/>", vendor_reference="V1"),
        Settle(Status.DELIVERED, vendor_reference="V1", count_attempt=True),
    )
    await attempt(
        store,
        jobs["F1"],
        now - 50,
        AttemptRecord("failed", 400, 100.0, "<refused/>", error="refused"),
        Settle(Status.FAILED, last_error="refused", count_attempt=True),
    )
    await attempt(
        store,
        jobs["U1"],
        now - 7200,  # ended before the last hour: not in the latency
        AttemptRecord("in_doubt", None, 9999.0, None, error="timeout"),
        Settle(Status.IN_DOUBT, last_error="timeout", count_attempt=True),
    )
    assert sorted(jobs) == ["D1", "F1", "I1", "U1"]
    return {r["report_id"]: r["id"] for r in await store.list_deliveries({})}


async def test_the_overview_agrees_with_the_shown_counts(store: Store) -> None:
    now = time.time()
    await _mixed(store, now)
    rows = await store.overview(now, day_start=now - 3600)
    assert [(r["municipality"], r["adapter"]) for r in rows] == [
        ("746", KMD),
        ("746", SD),
        ("840", SD),
    ]
    shown = await store.count_by_shown_status()
    for state in ("queued", "in_flight", "held", "in_doubt", "failed", "correction_required"):
        assert sum(r[state] for r in rows) == shown.get(state, 0), state
    sd = rows[1]
    assert (sd["in_flight"], sd["held"], sd["in_doubt"], sd["failed"], sd["queued"]) == (
        1,
        1,
        1,
        1,
        0,
    )
    assert sd["delivered_today"] == 1
    assert sd["p95_latency_ms_1h"] == 100.0  # 40 and 100 ended in the hour; 9999 did not
    assert sd["oldest_unfinished_at"] == pytest.approx(now - 600)
    assert rows[0]["queued"] == 1 and rows[0]["p95_latency_ms_1h"] is None
    # delivered before the day started: not today's
    later = await store.overview(now, day_start=now + 1)
    assert later[1]["delivered_today"] == 0


async def test_at_risk_and_oldest_per_endpoint(store: Store) -> None:
    now = time.time()
    await store.submit([new("A", employee="E1")], now - 30)
    [row] = await store.overview(now, now - 3600)
    assert row["at_risk"] == 0 and row["oldest_unfinished_at"] == pytest.approx(now - 30)
    [d] = await store.list_deliveries({})
    await store.settle(d["id"], Settle(Status.QUEUED, at_risk=True), now, "delivery.at_risk")
    [row] = await store.overview(now, now - 3600)
    assert row["at_risk"] == (await store.count_at_risk()) == 1


@pytest.mark.parametrize(
    ("values", "expected"),
    [([], None), ([5.0], 5.0), ([1.0, 2.0], 2.0), ([float(i) for i in range(1, 101)], 95.0)],
)
def test_percentile_is_the_nearest_rank(values: list[float], expected: float | None) -> None:
    assert percentile(values, 95) == expected


async def test_the_detail_shows_report_versions_attempts_and_audit(store: Store) -> None:
    now = time.time()
    await store.submit([new("A", employee="E1")], now)
    [job] = await claim(store, now)
    long_answer = "<fault>" + "x" * 3000 + f"{CPR_A}</fault>"
    await attempt(
        store,
        job,
        now,
        AttemptRecord("retry", 503, 12.5, long_answer, error=f"busy for {CPR_A}"),
        Settle(Status.RETRY_SCHEDULED, next_attempt_at=now + 1, count_attempt=True),
        request=f"<cpr>{CPR_A}</cpr>",  # stored as given (the dispatcher masks before)
    )
    detail = await store.delivery_detail(job.delivery_id)
    assert detail is not None
    assert detail["id"] == job.delivery_id and detail["report_id"] == "A"
    assert detail["status"] == "retry_scheduled" and detail["period"] == "2026-03"
    assert detail["report"] == {
        "municipality": "746",
        "report_id": "A",
        "kind": "drive",
        "employee": {"employment_id": "E1", "cpr": "xxxxxx-xxxx"},
    }
    [version] = detail["versions"]
    assert version["version"] == 1 and version["request_id"] == "req-A"
    assert version["body"]["employee"] == {"employment_id": "E1"}
    assert (
        version["content_hash"] == content_hash("A", 1, "visit") and version["received_at"] == now
    )
    [a] = detail["attempts"]
    assert (a["outcome"], a["http_status"], a["latency_ms"], a["version"]) == (
        "retry",
        503,
        12.5,
        1,
    )
    assert a["request_body"] == "<cpr>xxxxxx-xxxx</cpr>"
    assert len(a["response_body"]) == 2000 and a["response_truncated"] is True
    assert a["error"] == "busy for xxxxxx-xxxx" and a["ended_at"] == now
    assert [e["event"] for e in detail["audit"]] == [
        e["event"] for e in await store.audit_for(job.delivery_id)
    ]
    assert "attempt.retry" in [e["event"] for e in detail["audit"]]
    assert CPR_A not in json.dumps(detail)
    assert await store.delivery_detail(job.delivery_id + 1000) is None


async def test_a_purged_version_shows_no_body(store: Store) -> None:
    now = time.time()
    await store.submit([new("A", employee="E1")], now - 100)
    [job] = await claim(store, now - 90)
    await attempt(
        store,
        job,
        now - 80,
        AttemptRecord("delivered", 200, 3.0, "<ok/>", vendor_reference="V"),
        Settle(Status.DELIVERED, vendor_reference="V", count_attempt=True),
    )
    await store.purge(now - 10, now)
    detail = await store.delivery_detail(job.delivery_id)
    assert detail is not None
    [version] = detail["versions"]
    assert version["body"] is None and version["purged_at"] == now
    assert detail["report"]["employee"]["cpr"] is None  # the CPR is gone, nothing to mask
    [a] = detail["attempts"]
    assert a["request_body"] is None and a["response_body"] is None


@pytest.mark.parametrize(
    ("report", "period"),
    [
        ({"kind": "drive", "drive_date": "2026-03-29"}, "2026-03"),
        ({"kind": "vacation", "start_date": "2026-12-30", "end_date": "2027-01-02"}, "2026-12"),
        ({"kind": "drive", "start_date": "2026-12-30"}, None),  # a drive's date is drive_date
        ({"kind": "drive"}, None),
    ],
)
def test_the_period_is_the_month_of_the_reports_own_date(
    report: dict[str, Any], period: str | None
) -> None:
    assert report_period(report) == period


async def test_deliveries_stored_without_a_period_get_it_at_the_next_start(
    store_url: str,
) -> None:
    """Rows from before migration 9 have no period: the next open fills it from the body."""
    now = time.time()
    s = open_store(store_url, keys=TEST_KEYS)
    await s.open()
    dated = replace(new("A"), body={"kind": "drive", "drive_date": "2026-05-31"}, period=None)
    undated = replace(new("B", employee="E2"), period=None)  # nothing to take it from
    await s.submit([dated, undated], now)
    assert await s.count_deliveries({"period": "2026-05"}) == 0
    await s.aclose()
    s = open_store(store_url, keys=TEST_KEYS)
    await s.open()
    try:
        assert [r["report_id"] for r in await s.list_deliveries({"period": "2026-05"})] == ["A"]
        assert {r["report_id"]: r["period"] for r in await s.list_deliveries({})}["B"] is None
    finally:
        await s.aclose()
