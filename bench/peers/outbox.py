"""The hand-rolled outbox peer: a table, ``FOR UPDATE SKIP LOCKED`` batch claims, POST, mark done.

``python -m bench.peers.outbox store --dsn DSN --count N --prefix P --employees E``
``python -m bench.peers.outbox work --dsn DSN`` (SD from BENCH_SD_*; exits when nothing is left)

Written the way one would by hand with asyncpg: a few workers, each claiming a batch in one
statement (the claim commits), posting the batch's envelopes concurrently, then marking the
batch done (or back to pending when a POST failed).
"""

from __future__ import annotations

import argparse
import asyncio
import json

import aiohttp
import asyncpg

from bench.peers.common import CONCURRENCY, post, renderer, report, sd_settings

WORKERS = 4
BATCH = CONCURRENCY // WORKERS

SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id         BIGSERIAL PRIMARY KEY,
    report     JSONB NOT NULL,
    status     TEXT NOT NULL DEFAULT 'pending',
    attempts   INTEGER NOT NULL DEFAULT 0,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    done_at    TIMESTAMPTZ
);
CREATE INDEX IF NOT EXISTS outbox_pending ON outbox (id) WHERE status = 'pending';
"""

CLAIM = """
UPDATE outbox SET status = 'sending', attempts = attempts + 1
WHERE id IN (
    SELECT id FROM outbox WHERE status = 'pending' ORDER BY id
    FOR UPDATE SKIP LOCKED LIMIT $1
)
RETURNING id, report
"""


async def store(dsn: str, count: int, prefix: str, employees: int) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(SCHEMA)
        rows = [(json.dumps(report(prefix, i, employees)),) for i in range(count)]
        await conn.executemany("INSERT INTO outbox (report) VALUES ($1::jsonb)", rows)
    finally:
        await conn.close()


async def work(dsn: str) -> None:
    settings = sd_settings()
    render = renderer(settings)
    pool = await asyncpg.create_pool(dsn, min_size=WORKERS, max_size=WORKERS)
    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def deliver(row: asyncpg.Record) -> bool:
            try:
                for payload in render(json.loads(row["report"])):
                    await post(session, settings, payload)
                return True
            except Exception:
                return False

        async def worker() -> None:
            while True:
                async with pool.acquire() as conn:
                    claimed = await conn.fetch(CLAIM, BATCH)
                if not claimed:
                    return
                outcomes = await asyncio.gather(*(deliver(r) for r in claimed))
                done = [r["id"] for r, ok in zip(claimed, outcomes, strict=True) if ok]
                failed = [r["id"] for r, ok in zip(claimed, outcomes, strict=True) if not ok]
                async with pool.acquire() as conn:
                    if done:
                        await conn.execute(
                            "UPDATE outbox SET status = 'done', done_at = now() WHERE id = ANY($1)",
                            done,
                        )
                    if failed:
                        await conn.execute(
                            "UPDATE outbox SET status = 'pending' WHERE id = ANY($1)", failed
                        )

        await asyncio.gather(*(worker() for _ in range(WORKERS)))
    await pool.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("action", choices=("store", "work"))
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--count", type=int, default=0)
    parser.add_argument("--prefix", default="ob")
    parser.add_argument("--employees", type=int, default=1000)
    args = parser.parse_args()
    if args.action == "store":
        asyncio.run(store(args.dsn, args.count, args.prefix, args.employees))
    else:
        asyncio.run(work(args.dsn))


if __name__ == "__main__":
    main()
