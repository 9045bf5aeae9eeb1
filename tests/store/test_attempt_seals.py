"""An attempt's audit seal and the audit chain stay exact when the store skips work: the
message's digest taken when it was sealed (not by opening it again), the chain's head kept
for the rest of a write transaction (not read again per event). Both engines."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from adapters.base import Message
from gateway.audit import verify
from gateway.store import AttemptRecord, Settle, Status, Store, open_store
from gateway.store.common import audit_attempt_rows, message_seal, message_text
from tests.conftest import TEST_KEYS
from tests.store.test_contract import SD, claim, new

KEY = b"a" * 32


@pytest.fixture
async def store(store_url: str) -> AsyncIterator[Store]:
    s = open_store(store_url, keys=TEST_KEYS, audit_key=KEY)
    await s.open()
    yield s
    await s.aclose()


@pytest.mark.parametrize(
    "message",
    [
        Message("wage_code", "create", {"km": "1.00"}),
        Message("p", "delete", {}, deletes=True),
        Message("p", "create", {10: {"æ": ("x", True)}, 9: [1.5, None]}),  # not JSON-stable
    ],
)
def test_the_digest_of_a_sealed_message_is_the_one_opening_it_gives(message: Message) -> None:
    sealed = TEST_KEYS.seal(message_text(message), "message:7")
    row = {"id": 1, "delivery_id": 7, "message": sealed}
    [opened] = audit_attempt_rows(TEST_KEYS, KEY, [row])
    assert message_seal(KEY, message_text(message)) == opened["message"]


async def test_attempts_ended_together_leave_a_chain_and_seals_that_verify(store: Store) -> None:
    now = time.time()
    await store.submit([new(f"R{i}", employee=f"E{i}") for i in range(40)], now)
    jobs = await claim(store, now)
    outcomes = ["delivered", "retry", "failed", "in_doubt"]

    async def deliver(i: int, job: object) -> None:
        message = Message("wage_code", "create", {"km": f"{i}.00", "purpose": "0101901234"})
        attempt = await store.begin_attempt(job.delivery_id, message, f"<b>{i}</b>", now, "p1")  # type: ignore[attr-defined]
        outcome = outcomes[i % 4]
        await store.end_attempt(
            attempt,
            job.delivery_id,  # type: ignore[attr-defined]
            job.report_pk,  # type: ignore[attr-defined]
            SD,
            job.version,  # type: ignore[attr-defined]
            AttemptRecord(outcome, 200, 1.5 + i, f"<ok>{i}</ok>", vendor_reference=f"V{i}"),
            message,
            Settle(Status.DELIVERED, vendor_reference=f"V{i}", count_attempt=True)
            if outcome == "delivered"
            else None,
            now + 1,
        )

    # concurrent: the writer groups many begins and ends (and their events) per transaction
    await asyncio.gather(*(deliver(i, j) for i, j in enumerate(jobs)))
    chain, attempts = await store.audit_chain(), await store.audit_attempts()
    assert len(attempts) == 40
    assert verify(chain, attempts, KEY, []) is None
    ids = [e["id"] for e in chain]
    assert ids == list(range(1, len(ids) + 1))
    sealed = sum(1 for e in chain if e["event"].startswith("attempt."))
    assert sealed == 40


async def test_an_operation_rolled_back_after_auditing_does_not_move_the_chain_on(
    tmp_path: Path,
) -> None:
    """SQLite: one transaction runs a batch of operations, each in a savepoint; one that
    audits then fails is rolled back, and the events after it chain onto the head before it."""
    from gateway.store.sqlite import SQLiteStore

    store = SQLiteStore(str(tmp_path / "g.db"), TEST_KEYS, KEY)
    await store.open()
    try:
        now = time.time()

        def audited(i: int, fail: bool) -> Callable[[Any], int]:
            def op(conn: Any) -> int:
                store._audit(conn, now, f"test.{i}", {"i": i})
                if fail:
                    raise RuntimeError("after auditing")
                return i

            return op

        results = await asyncio.gather(
            *(store._write(audited(i, fail=i % 3 == 1)) for i in range(9)),
            return_exceptions=True,
        )
        assert store.commits == 1  # all nine in one transaction
        assert [isinstance(r, RuntimeError) for r in results] == [i % 3 == 1 for i in range(9)]
        chain = await store.audit_chain()
        assert [e["event"] for e in chain] == [f"test.{i}" for i in range(9) if i % 3 != 1]
        assert verify(chain, [], KEY, []) is None
    finally:
        await store.aclose()
