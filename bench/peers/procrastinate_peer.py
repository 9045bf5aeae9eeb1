"""The Procrastinate peer, written the straightforward way its documentation shows: an
``App`` on a ``PsycopgConnector``, one task per report that POSTs the SD envelope, jobs
deferred with ``batch_defer_async``, a worker with ``run_worker_async``.

``python -m bench.peers.procrastinate_peer schema`` (once per database)
``python -m bench.peers.procrastinate_peer store --count N --prefix P --employees E``
``python -m bench.peers.procrastinate_peer work`` (exits when the queue is empty)
The database is BENCH_PG_DSN, SD is BENCH_SD_URL, BENCH_SD_USER and BENCH_SD_PASSWORD.
"""

from __future__ import annotations

import argparse
import asyncio

from bench.peers.common import CONCURRENCY, report
from bench.peers.procrastinate_app import _session, app, deliver_report


async def store(count: int, prefix: str, employees: int) -> None:
    async with app.open_async():
        for start in range(0, count, 1000):
            await deliver_report.batch_defer_async(
                *(
                    {"report": report(prefix, i, employees)}
                    for i in range(start, min(count, start + 1000))
                )
            )


async def schema() -> None:
    async with app.open_async():
        await app.schema_manager.apply_schema_async()


async def work() -> None:
    async with app.open_async():
        await app.run_worker_async(queues=["sd"], concurrency=CONCURRENCY, wait=False)
    for session in _session:
        await session.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("action", choices=("schema", "store", "work"))
    parser.add_argument("--count", type=int, default=0)
    parser.add_argument("--prefix", default="pc")
    parser.add_argument("--employees", type=int, default=1000)
    args = parser.parse_args()
    if args.action == "schema":
        asyncio.run(schema())
    elif args.action == "store":
        asyncio.run(store(args.count, args.prefix, args.employees))
    else:
        asyncio.run(work())


if __name__ == "__main__":
    main()
