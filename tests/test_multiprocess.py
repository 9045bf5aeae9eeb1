"""Three ``payroll-gateway serve`` processes on one PostgreSQL database, one of them killed.

10,000 reports for 100 employees are posted in batches of 1,000, in turn to each process;
one process is killed with SIGKILL mid-run. Then: every report reached SD exactly once,
each employee's reports reached SD in posting order, and no two attempts of one lane
(municipality, adapter, employee) overlapped in time, so no lane was worked by two
processes at once. Deliveries the killed process left in doubt are settled the way an
operator does: confirmed when SD has them, replayed when it does not.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections import Counter, defaultdict
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from bench.reliability import KEYS, GatewayProcess, free_port, start_simulators, write_config
from gateway.store import open_store
from tests.conftest import TEST_KEYS, fresh_pg_database

REPORTS, EMPLOYEES, BATCH = 10_000, 100, 1_000
LEASE_SECONDS = 4


def report(i: int) -> dict[str, Any]:
    """Report ``i``: employee ``i % 100``; its km (``i / 100 + 1``) names it at the vendor."""
    return {
        "kind": "drive",
        "municipality": "746",
        "report_id": f"MP-{i:05d}",
        "version": 1,
        "employee": {"cpr": "0101901234", "employment_id": f"{10000 + i % EMPLOYEES:08d}"},
        "drive_date": f"2026-03-{1 + i % 28:02d}",
        "distance_km": km(i),
        "wage_code": "0201",
        "approved_by_cpr": "0202802345",
    }


def km(i: int) -> str:
    return str((Decimal(100 + i) / 100).quantize(Decimal("0.01")))


def configure(folder: Path, sims: Any, url: str, port: int) -> Path:
    path = write_config(folder, sims, port, workers=16)
    text = path.read_text().replace(
        'store = "sqlite:///gateway.db"', f'store = "{url}"\nstore_pool_size = 4'
    )
    (folder / "data-key").write_text(base64.b64encode(TEST_KEYS.current).decode() + "\n")
    text += '\n[privacy]\ndata_key_file = "data-key"\n'
    path.write_text(text.replace("lease_seconds = 12", f"lease_seconds = {LEASE_SECONDS}"))
    return path


async def count_open(conn: asyncpg.Connection) -> int:
    return int(
        await conn.fetchval(
            "SELECT COUNT(*) FROM deliveries WHERE status IN ('queued', 'retry_scheduled', 'in_flight')"
        )
    )


async def wait_quiet(conn: asyncpg.Connection, url: str, sims: Any, within: float) -> None:
    """Until nothing is open; in-doubt deliveries (they hold their lanes) settled meanwhile."""
    deadline = time.monotonic() + within
    while await count_open(conn):
        assert time.monotonic() < deadline, f"{await count_open(conn)} deliveries still open"
        await settle_in_doubt(url, sims)
        await asyncio.sleep(0.5)


async def test_three_processes_one_killed_deliver_everything_once_in_order(tmp_path: Path) -> None:
    started = time.monotonic()
    sims = await start_simulators(tmp_path, seed=7)
    procs: list[GatewayProcess] = []
    async with fresh_pg_database() as url:
        try:
            ports = [free_port() for _ in range(3)]
            for n, port in enumerate(ports):
                folder = tmp_path / f"gw{n}"
                folder.mkdir()
                procs.append(
                    GatewayProcess(configure(folder, sims, url, port), folder / "gateway.log")
                )
            await asyncio.gather(*(p.start() for p in procs))
            await post_all(ports, procs)
            conn = await asyncpg.connect(url)
            try:
                await wait_quiet(conn, url, sims, 240)
                await check(conn, sims)
            finally:
                await conn.close()
        finally:
            for p in procs:
                await p.stop()
            await sims.aclose()
    print(f"multi-process run: {time.monotonic() - started:.1f} s")


async def post_all(ports: list[int], procs: list[GatewayProcess]) -> None:
    """Batches in posting order, each to the next live process; one process killed mid-run."""
    live = list(range(3))
    headers = {"Authorization": f"Bearer {KEYS['746']}"}
    async with aiohttp.ClientSession() as session:
        for b, start in enumerate(range(0, REPORTS, BATCH)):
            if b == REPORTS // BATCH // 2:
                await procs[1].kill()  # SIGKILL, with deliveries in flight
                live.remove(1)
            port = ports[live[b % len(live)]]
            body = {"reports": [report(i) for i in range(start, start + BATCH)]}
            async with session.post(
                f"http://127.0.0.1:{port}/v1/reports",
                json=body,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=60),
            ) as resp:
                assert resp.status == 202, await resp.text()


async def settle_in_doubt(url: str, sims: Any) -> None:
    """What an operator does with SD deliveries left in doubt: confirm or replay each."""
    store = open_store(url, pool_size=1, keys=TEST_KEYS)
    await store.open()
    try:
        seen = {str(a.km) for a in sims.sd.accepted}
        for row in await store.list_deliveries({"status": "in_doubt"}, limit=REPORTS):
            action = "confirm" if km(int(row["report_id"][3:])) in seen else "replay"
            await store.operate(action, {"ids": [row["id"]]}, "test", "after the kill", time.time())
    finally:
        await store.aclose()


async def check(conn: asyncpg.Connection, sims: Any) -> None:
    statuses = dict(await conn.fetch("SELECT status, COUNT(*) FROM deliveries GROUP BY status"))
    assert statuses == {"delivered": REPORTS}, statuses
    seen = Counter(str(a.km) for a in sims.sd.accepted)
    assert sorted(seen) == sorted(km(i) for i in range(REPORTS))
    assert max(seen.values()) == 1, [k for k, n in seen.items() if n > 1][:10]
    by_employee: dict[str, list[Decimal]] = defaultdict(list)
    for a in sims.sd.accepted:
        by_employee[a.employment_id].append(a.km)
    assert len(by_employee) == EMPLOYEES
    assert all(kms == sorted(kms) for kms in by_employee.values()), (
        "an employee's reports out of order"
    )
    attempts = await conn.fetch(
        "SELECT d.employee_key, a.started_at, COALESCE(a.finished_at, 'infinity'::float8) AS finished_at"
        " FROM attempts a JOIN deliveries d ON d.id = a.delivery_id ORDER BY d.employee_key, a.started_at"
    )
    lanes: dict[str, list[Any]] = defaultdict(list)
    for a in attempts:
        lanes[a["employee_key"]].append(a)
    overlaps = [
        (lane, x["started_at"])
        for lane, rows in lanes.items()
        for x, y in zip(rows, rows[1:], strict=False)
        if y["started_at"] < x["finished_at"]
    ]
    assert not overlaps, f"attempts of one lane overlapped: {overlaps[:5]}"
