"""Throughput in one run: intake (single POSTs vs batches of 100) and end-to-end delivery to SD.

The gateway runs as a subprocess, the SD simulator inside this process (as in
``bench.reliability``). The machine is noisy, so the ratios that matter are taken from
the same run:

- intake, with the dispatcher idle: the SD route's ``opening_hours`` is a one-minute window
  twelve hours away, so the gateway stores and defers but sends nothing;
- end to end: a fresh store, SD always open and answering normally; the time from the first
  POST until every delivery is ``delivered`` (read from the SQLite file).

Run it alone with ``python -m bench.throughput``; ``make bench`` runs it from ``bench/run.py``.
"""

from __future__ import annotations

import asyncio
import random
import sys
import tempfile
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import aiohttp

from bench.reliability import (
    HOST,
    KEYS,
    GatewayProcess,
    Planned,
    client_session,
    free_port,
    make_reports,
    start_gateway,
    start_simulators,
    wait_settled,
    write_config,
)

SINGLE_REPORTS = 2000
BATCH_REPORTS = 10000
BATCH_SIZE = 100
E2E_REPORTS = 5000
SINGLE_WORKERS = 16
BATCH_WORKERS = 4


@dataclass
class Throughput:
    rates: dict[str, float] = field(default_factory=dict)  # name -> per second
    seconds: dict[str, float] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    @property
    def ratios(self) -> dict[str, float]:
        r = self.rates
        out = {}
        if r.get("intake, single POSTs"):
            out["batch / single intake"] = r["intake, batches of 100"] / r["intake, single POSTs"]
        if r.get("intake, batches of 100"):
            out["delivered / batch intake"] = (
                r["end to end, delivered to SD"] / r["intake, batches of 100"]
            )
        return out


def closed_window(now: datetime | None = None) -> str:
    """A one-minute opening window twelve hours from now (Europe/Copenhagen): closed now."""
    at = (now or datetime.now(ZoneInfo("Europe/Copenhagen"))) + timedelta(hours=12)
    end = at + timedelta(minutes=1)
    return f"{at:%H:%M}-{end:%H:%M}"


async def _post(session: aiohttp.ClientSession, url: str, body: object, errors: list[str]) -> None:
    headers = {"Authorization": f"Bearer {KEYS['746']}"}
    async with session.post(url, json=body, headers=headers) as resp:
        await resp.read()
        if resp.status not in (200, 202):
            errors.append(f"HTTP {resp.status}")


async def post_bodies(url: str, bodies: Sequence[object], workers: int, errors: list[str]) -> float:
    """Post every body with ``workers`` concurrent clients; the seconds it took."""
    pending = deque(bodies)
    async with client_session() as session:

        async def worker() -> None:
            while pending:
                await _post(session, url, pending.popleft(), errors)

        started = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(workers)))
        return time.monotonic() - started


def _batches(reports: Sequence[Planned]) -> list[object]:
    return [
        {"reports": [p.body() for p in reports[i : i + BATCH_SIZE]]}
        for i in range(0, len(reports), BATCH_SIZE)
    ]


async def _phase(folder: Path, opening_hours: str, work: object) -> None:
    """Start simulators and a gateway in ``folder`` (it exists), run ``work(url, db)``, stop both."""
    sims = await start_simulators(folder, seed=7)
    port = free_port()
    gateway = GatewayProcess(
        write_config(folder, sims, port, opening_hours=opening_hours), folder / "gateway.log"
    )
    try:
        await start_gateway(gateway)
        await work(f"http://{HOST}:{port}/v1/reports", folder / "gateway.db")  # type: ignore[operator]
    finally:
        await gateway.stop()
        await sims.aclose()


async def measure(workdir: Path | None = None, scale: float = 1.0) -> Throughput:
    """Intake single vs batch (dispatcher idle), then end to end to SD; ``scale`` shrinks it."""
    result = Throughput()
    n_single, n_batch, n_e2e = (
        max(BATCH_SIZE, int(n * scale)) for n in (SINGLE_REPORTS, BATCH_REPORTS, E2E_REPORTS)
    )
    with tempfile.TemporaryDirectory(prefix="pgw-throughput-") as tmp:
        base = Path(workdir or tmp)
        for name in ("intake", "e2e"):
            (base / name).mkdir(parents=True, exist_ok=True)
        reports = make_reports(n_single + n_batch, "T", 0.0, random.Random(5))
        single, batched = reports[:n_single], reports[n_single:]

        async def intake(url: str, db: Path) -> None:
            s = await post_bodies(url, [p.body() for p in single], SINGLE_WORKERS, result.errors)
            b = await post_bodies(url, _batches(batched), BATCH_WORKERS, result.errors)
            result.seconds.update({"intake, single POSTs": s, "intake, batches of 100": b})
            result.rates.update(
                {"intake, single POSTs": n_single / s, "intake, batches of 100": n_batch / b}
            )

        await _phase(base / "intake", closed_window(), intake)
        e2e = make_reports(n_e2e, "E", 0.0, random.Random(6))

        async def end_to_end(url: str, db: Path) -> None:
            started = time.monotonic()
            await post_bodies(url, _batches(e2e), BATCH_WORKERS, result.errors)
            settled, _ = await wait_settled(db, 300, final_only=True)
            took = time.monotonic() - started
            if not settled:
                result.errors.append("end to end: not every delivery final within 300 s")
            result.seconds["end to end, delivered to SD"] = took
            result.rates["end to end, delivered to SD"] = n_e2e / took

        await _phase(base / "e2e", "always", end_to_end)
    return result


def table(result: Throughput) -> str:
    lines = ["| measure | per second | seconds |", "| --- | ---: | ---: |"]
    lines += [
        f"| {name} | {rate:.0f} reports/s | {result.seconds[name]:.2f} |"
        for name, rate in result.rates.items()
    ]
    lines += [f"| ratio: {name} | {value:.2f}x | |" for name, value in result.ratios.items()]
    return "\n".join(lines)


def main() -> int:
    result = asyncio.run(measure())
    print(table(result))
    for error in result.errors[:10]:
        print(f"error: {error}")
    return 1 if result.errors else 0


if __name__ == "__main__":
    sys.exit(main())
