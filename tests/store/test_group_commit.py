"""Group commit on every engine: the attempts and settles of concurrent deliveries share
transactions, each caller returns once its own row is committed, and one failing member
of a group reaches only its own caller."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from adapters.base import Message
from gateway.audit import attempt_problem, verify_chain
from gateway.store import AttemptRecord, LeaseLost, Settle, Status, Store, open_store
from tests.conftest import TEST_KEYS
from tests.store.test_contract import SD, claim, new

N = 20


def commits(store: Store) -> int:
    return int(getattr(store, "commits"))  # noqa: B009 - engine attribute, not the protocol


async def claimed(store: Store, now: float, prefix: str = "R") -> list[Any]:
    await store.submit([new(f"{prefix}{i}", employee=f"{prefix}E{i}") for i in range(N)], now)
    jobs = await claim(store, now, owner="p1", lease=60)
    assert len(jobs) == N
    return sorted(jobs, key=lambda j: j.delivery_id)


def end(store: Store, job: Any, attempt: int, message: Message, now: float) -> Any:
    return store.end_attempt(
        attempt,
        job.delivery_id,
        job.report_pk,
        SD,
        job.version,
        AttemptRecord("delivered", 200, 1, "<ok/>", vendor_reference=f"V{job.delivery_id}"),
        message,
        Settle(Status.DELIVERED, vendor_reference=f"V{job.delivery_id}", count_attempt=True),
        now,
    )


async def statuses(store: Store) -> dict[str, str]:
    return {d["report_id"]: d["status"] for d in await store.list_deliveries({})}


async def test_concurrent_attempts_and_settles_share_commits(store_url: str, store: Store) -> None:
    now = time.time()
    jobs = await claimed(store, now)
    message = Message("wage_code", "create", {"km": "1.00"})
    before = commits(store)
    attempts = await asyncio.gather(
        *(store.begin_attempt(j.delivery_id, message, "<b/>", now, owner="p1") for j in jobs)
    )
    began = commits(store) - before
    assert 1 <= began < N and len(set(attempts)) == N
    # each started attempt is committed: another connection sees it (it makes a reclaim
    # after the lease call the delivery in doubt rather than resend it)
    other = open_store(store_url, keys=TEST_KEYS)
    await other.open()
    try:
        assert await other.reclaim(now + 61, every_lease=False) == {"requeued": 0, "in_doubt": N}
    finally:
        await other.aclose()
    jobs = await claimed(store, now + 62, prefix="S")
    attempts = await asyncio.gather(
        *(store.begin_attempt(j.delivery_id, message, "<b/>", now + 62, owner="p1") for j in jobs)
    )
    before = commits(store)
    await asyncio.gather(
        *(end(store, j, a, message, now + 63) for j, a in zip(jobs, attempts, strict=True))
    )
    ended = commits(store) - before
    assert 1 <= ended < N
    shown = await statuses(store)
    assert {shown[j.report["report_id"]] for j in jobs} == {"delivered"}
    events = await store.audit_chain()
    assert verify_chain(events) == (len(events), None)
    # each seal is of the attempt as stored (an int latency is stored as a float)
    assert attempt_problem(events, await store.audit_attempts()) is None
    delivered = [e for e in events if e["event"] == "delivery.delivered"]
    assert sorted(e["delivery_id"] for e in delivered) == [j.delivery_id for j in jobs]


async def test_a_failing_member_reaches_only_its_caller(store: Store) -> None:
    now = time.time()
    jobs = await claimed(store, now)
    message = Message("wage_code", "create", {"km": "1.00"})
    lost = jobs[N // 2]
    results = await asyncio.gather(
        *(
            store.begin_attempt(
                j.delivery_id, message, "<b/>", now, owner="p2" if j is lost else "p1"
            )
            for j in jobs
        ),
        return_exceptions=True,
    )
    assert isinstance(results[N // 2], LeaseLost)
    attempts = [r for r in results if not isinstance(r, BaseException)]
    assert len(attempts) == N - 1 and all(isinstance(a, int) for a in attempts)
    others = [j for j in jobs if j is not lost]
    for j in (lost, others[0], others[-1]):
        view = await store.get_report("746", j.report["report_id"])
        assert view is not None
        assert len(view["deliveries"][0]["attempts"]) == (0 if j is lost else 1)
    # one end_attempt of the group names an attempt that does not exist: it fails, the
    # others settle, and the chain stays whole
    bad = others[3]
    ends = await asyncio.gather(
        *(
            end(store, j, -1 if j is bad else a, message, now + 1)
            for j, a in zip(others, attempts, strict=True)
        ),
        return_exceptions=True,
    )
    failed = [i for i, r in enumerate(ends) if isinstance(r, BaseException)]
    assert failed == [3]
    shown = await statuses(store)
    assert shown.pop(bad.report["report_id"]) == "in_flight"
    assert shown.pop(lost.report["report_id"]) == "in_flight"
    assert set(shown.values()) == {"delivered"} and len(shown) == N - 2
    events = await store.audit_chain()
    assert verify_chain(events) == (len(events), None)
    assert bad.delivery_id not in {
        e["delivery_id"] for e in events if e["event"].startswith("attempt.")
    }
