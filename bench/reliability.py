"""The reliability harness: kill -9 rounds and a fault soak, against the gateway as a black box.

The gateway runs as a subprocess (``python -m gateway serve --config <tmp>.toml``); the SD
and Engangsydelser simulators run inside this process (aiohttp on 127.0.0.1, free ports,
Engangsydelser over mutual TLS with dev certificates), so their state can be read directly.
The store is a SQLite file in the work folder, read read-only after the gateway stopped.

- :func:`kill_rounds`: reports are posted in concurrent batches while the gateway is killed
  with SIGKILL at a random moment, several rounds; then one clean run settles everything.
  Checks: every acknowledged report is stored and delivered or in a named state; nothing
  leased; no SD registration twice; Engangsydelser sums exact; no unfinished attempt; the
  vendors saw each employee's reports in intake order; the audit chain is intact.
- :func:`soak`: one gateway against simulators that fail 45 % of the requests (server 30 %,
  timeout-after-apply 10 %, reset 5 %). Most reports go to ``kmd-engangsydelser``, whose
  in-doubt deliveries the gateway reconciles by reading; the few SD reports only see
  ``server`` faults, because an SD delivery in doubt waits for an operator by design.
  Checks: every delivery ends delivered or failed with a reason, within max_attempts, the
  vendor sums are exact, and the breaker opened and closed again.

Both are usable from tests (short form) and from ``python -m bench.reliability kill|soak``.
Everything is bounded in count and time and uses loopback addresses only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import random
import signal
import socket
import sqlite3
import sys
import tempfile
import time
from collections import Counter, defaultdict, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from gateway.devcerts import DevCerts, ensure_dev_certs
from gateway.settings import hash_api_key
from gateway.simulators import SimulatorOptions
from gateway.simulators import engangsydelser as eng_sim
from gateway.simulators import sd as sd_sim

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
KEYS = {"746": "bench-key-746", "840": "bench-key-840"}
ADAPTER = {"746": "sd-koersel", "840": "kmd-engangsydelser"}
SD_USER, SD_PASSWORD = "SYbench", "bench-sd-password"
MAX_ATTEMPTS = 30
SOAK_MIX = (("server", 0.30), ("timeout", 0.10), ("reset", 0.05))
SOAK_SD_MIX = (("server", 0.30),)  # no in-doubt kinds: SD in doubt waits for an operator
SOAK_SD_SHARE = 0.1
KILL_SD_LATENCY_MS = 25
# The soak's breaker per vendor endpoint. Every Engangsydelser delivery makes two calls (read,
# then update), so ~70 % of the deliveries meet a fault: with failure_rate 0.35 the breaker is
# open nearly all the time (600 reports: 83 s instead of 36 s); 0.5 still opens and closes it.
SOAK_BREAKER = {"window_seconds": 5, "min_calls": 20, "failure_rate": 0.5, "open_seconds": 0.5}
OPERATOR_IN_DOUBT = ("sd-koersel",)  # adapters whose in-doubt deliveries wait for an operator
FINAL = ("delivered", "failed", "not_applicable", "superseded", "cancelled")
POST_CONCURRENCY = 8
START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0


# ---------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Planned:
    """One report the harness will post; ``km`` is unique, so a registration names its report."""

    report_id: str
    municipality: str
    employee: str
    km: Decimal
    index: int

    def body(self) -> dict[str, Any]:
        return {
            "kind": "drive",
            "municipality": self.municipality,
            "report_id": self.report_id,
            "version": 1,
            "employee": {"cpr": "0101901234", "employment_id": self.employee},
            "drive_date": f"2026-03-{1 + self.index % 28:02d}",
            "distance_km": str(self.km),
            "wage_code": "0201",
            "approved_by_cpr": "0202802345",
            "license_plate": "AB12345",
        }


@dataclass(frozen=True, slots=True)
class Batch:
    municipality: str
    reports: tuple[Planned, ...]


def make_reports(count: int, prefix: str, share_840: float, rng: random.Random) -> list[Planned]:
    """``count`` reports over both tenants; employees from a small pool per tenant."""
    pool = max(10, count // 8)
    planned = []
    for i in range(count):
        municipality = "840" if rng.random() < share_840 else "746"
        employee = f"{10000 + rng.randrange(pool):08d}"
        km = (Decimal(100 + i) / 100).quantize(Decimal("0.01"))
        planned.append(Planned(f"{prefix}-{i:05d}", municipality, employee, km, i))
    return planned


def make_batches(
    reports: Sequence[Planned], rng: random.Random, low: int = 10, high: int = 50
) -> list[Batch]:
    """Batches of ``low``..``high`` reports of one tenant each, in a random order."""
    batches = []
    for municipality in sorted({p.municipality for p in reports}):
        mine = [p for p in reports if p.municipality == municipality]
        while mine:
            size = rng.randint(low, high)
            batches.append(Batch(municipality, tuple(mine[:size])))
            mine = mine[size:]
    rng.shuffle(batches)
    return batches


# ---------------------------------------------------------------------------------------
# The simulators (in this process) and the gateway (a subprocess)
# ---------------------------------------------------------------------------------------


@dataclass
class Simulators:
    """SD over plain HTTP with Basic auth; Engangsydelser over mutual TLS."""

    certs: DevCerts
    sd_app: web.Application
    eng_app: web.Application
    runners: list[web.AppRunner] = field(default_factory=list)
    sd_port: int = 0
    eng_port: int = 0

    @property
    def sd(self) -> sd_sim.SdState:
        return self.sd_app[sd_sim.STATE]

    @property
    def eng(self) -> eng_sim.SimState:
        return self.eng_app[eng_sim.STATE]

    async def aclose(self) -> None:
        for runner in self.runners:
            await runner.cleanup()
        self.runners.clear()


async def start_simulators(
    workdir: Path,
    seed: int,
    sd_mix: tuple[tuple[str, float], ...] = (),
    eng_mix: tuple[tuple[str, float], ...] = (),
    sd_latency_ms: int = 0,
) -> Simulators:
    certs = ensure_dev_certs(workdir / "dev-certs")
    sd_opts = SimulatorOptions(
        host=HOST,
        username=SD_USER,
        password=SD_PASSWORD,
        seed=seed,
        fault_mix=sd_mix,
        latency_ms=sd_latency_ms,
    )
    eng_opts = SimulatorOptions(
        host=HOST,
        seed=seed + 1,
        fault_mix=eng_mix,
        cert_file=str(certs.server_cert),
        key_file=str(certs.server_key),
        client_ca_file=str(certs.ca_file),
    )
    sims = Simulators(certs, sd_sim.build_app(sd_opts), eng_sim.build_app(eng_opts))
    sims.sd.hang_seconds = sims.eng.hang_seconds = 30.0
    sims.sd_port = await _serve(sims, sims.sd_app, None)
    sims.eng_port = await _serve(sims, sims.eng_app, eng_sim.ssl_context(eng_opts))
    return sims


async def _serve(sims: Simulators, app: web.Application, ssl_context: Any) -> int:
    runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    sims.runners.append(runner)
    site = web.TCPSite(runner, HOST, 0, ssl_context=ssl_context)
    await site.start()
    server = site._server  # the bound port of port 0
    assert server is not None and server.sockets
    return int(server.sockets[0].getsockname()[1])


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def write_config(
    workdir: Path,
    sims: Simulators,
    port: int,
    *,
    breaker: dict[str, float] | None = None,
    max_in_flight: int = 32,
    workers: int = 32,
    opening_hours: str = "always",
) -> Path:
    """The gateway's TOML: both tenants, fast retries, short timeouts, loopback only."""
    (workdir / "sd-password").write_text(SD_PASSWORD + "\n", encoding="utf-8")
    table = "".join(f"{k} = {v}\n" for k, v in (breaker or {}).items())
    sd_breaker = f"[tenants.746.vendors.sd-koersel.breaker]\n{table}" if table else ""
    eng_breaker = f"[tenants.840.vendors.kmd-engangsydelser.breaker]\n{table}" if table else ""
    common = (
        f"connect_timeout_seconds = 1\nread_timeout_seconds = 1\nmax_in_flight = {max_in_flight}\n"
        f'opening_hours = "{opening_hours}"\n'
    )
    text = f"""# generated by bench/reliability.py
[server]
listen = "{HOST}:{port}"
store = "sqlite:///gateway.db"
data_dir = "."

[dispatcher]
workers = {workers}
lease_seconds = 12
poll_seconds = 0.05

[retry]
first_delay_seconds = 0.05
multiplier = 2
cap_seconds = 1
jitter_seconds = 0.05
max_attempts = {MAX_ATTEMPTS}

[tenants.746]
api_key_hashes = ["{hash_api_key(KEYS["746"])}"]
[tenants.746.routes]
drive = "sd-koersel"
[tenants.746.vendors.sd-koersel]
endpoint = "http://{HOST}:{sims.sd_port}/sdws/AnsaettelseKoerselOpret20170501"
username = "{SD_USER}"
password_file = "sd-password"
institution = "XY"
{common}
{sd_breaker}
[tenants.840]
api_key_hashes = ["{hash_api_key(KEYS["840"])}"]
[tenants.840.routes]
drive = "kmd-engangsydelser"
[tenants.840.vendors.kmd-engangsydelser]
endpoint = "https://{HOST}:{sims.eng_port}/"
cert_file = "{sims.certs.client_cert}"
key_file = "{sims.certs.client_key}"
ca_file = "{sims.certs.ca_file}"
{common}
[tenants.840.vendors.kmd-engangsydelser.options]
client_id = "840"
{eng_breaker}
"""
    path = workdir / "gateway.toml"
    path.write_text(text, encoding="utf-8")
    return path


class GatewayProcess:
    """``python -m gateway serve`` with its output in a log file (no pipes to drain)."""

    def __init__(self, config: Path, log: Path) -> None:
        self.config = config
        self.log = log
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        """Start, and return once it printed its intake line (bounded)."""
        before = self._starts()
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        }
        with self.log.open("ab") as out:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "gateway",
                "serve",
                "--config",
                str(self.config),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                cwd=str(self.config.parent),
                env=env,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while self._starts() <= before:
            if self.proc.returncode is not None:
                raise RuntimeError(f"the gateway exited with {self.proc.returncode}: {self.tail()}")
            if time.monotonic() > deadline:
                await self.kill()
                raise RuntimeError(
                    f"the gateway did not start within {START_TIMEOUT:g} s: {self.tail()}"
                )
            await asyncio.sleep(0.05)

    def _starts(self) -> int:
        return self.log.read_bytes().count(b"intake API at") if self.log.exists() else 0

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)
            await asyncio.wait_for(self.proc.wait(), STOP_TIMEOUT)

    async def stop(self) -> int:
        """SIGTERM and wait; the exit code (it must be 0)."""
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), STOP_TIMEOUT)
            except TimeoutError:
                await self.kill()
                return -999
        return int(self.proc.returncode or 0)

    def tail(self, lines: int = 15) -> str:
        text = self.log.read_text(encoding="utf-8", errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


async def start_gateway(gateway: GatewayProcess) -> float:
    """Start and wait for the intake line; the seconds it took."""
    started = time.monotonic()
    await gateway.start()
    return time.monotonic() - started


async def audit_verify(config: Path) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway",
        "audit",
        "verify",
        "--config",
        str(config),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=str(config.parent),
    )
    out, _ = await asyncio.wait_for(proc.communicate(), STOP_TIMEOUT)
    return int(proc.returncode or 0), out.decode(errors="replace").strip()


# ---------------------------------------------------------------------------------------
# Posting
# ---------------------------------------------------------------------------------------


@dataclass
class Posted:
    """What happened to the batches of one run of the gateway."""

    acked: list[tuple[Batch, int]] = field(default_factory=list)  # (batch, 200|202)
    unknown: list[Batch] = field(default_factory=list)  # in flight when the gateway died
    unsent: list[Batch] = field(default_factory=list)  # refused, or never tried
    unexpected: list[str] = field(default_factory=list)  # any other answer

    @property
    def acked_reports(self) -> int:
        return sum(len(b.reports) for b, _ in self.acked)


async def post_batch(session: aiohttp.ClientSession, url: str, batch: Batch) -> int | str:
    """The HTTP status, or "refused" (not sent) / "unknown" (may have been stored)."""
    body = {"reports": [p.body() for p in batch.reports]}
    headers = {"Authorization": f"Bearer {KEYS[batch.municipality]}"}
    try:
        async with session.post(url, json=body, headers=headers) as resp:
            await resp.read()
            return resp.status
    except aiohttp.ClientConnectorError:
        return "refused"
    except (aiohttp.ClientError, TimeoutError):
        return "unknown"


async def post_all(
    session: aiohttp.ClientSession,
    url: str,
    batches: Sequence[Batch],
    kill_after: int | None = None,
    on_kill: Any = None,
) -> Posted:
    """Post with a few concurrent workers; after ``kill_after`` acks call ``on_kill`` once."""
    pending: deque[Batch] = deque(batches)
    posted = Posted()
    dead = asyncio.Event()
    kill_task: list[asyncio.Task[None]] = []

    async def kill() -> None:
        await on_kill()
        dead.set()

    async def worker() -> None:
        while pending and not dead.is_set():
            batch = pending.popleft()
            _record(posted, batch, await post_batch(session, url, batch))
            if kill_after is not None and not kill_task and len(posted.acked) >= kill_after:
                kill_task.append(asyncio.create_task(kill()))

    await asyncio.gather(*(worker() for _ in range(POST_CONCURRENCY)))
    if kill_after is not None and not kill_task:
        kill_task.append(asyncio.create_task(kill()))
    for task in kill_task:
        await task
    posted.unsent.extend(pending)
    return posted


def _record(posted: Posted, batch: Batch, outcome: int | str) -> None:
    if outcome in (200, 202):
        posted.acked.append((batch, int(outcome)))
    elif outcome == "unknown":
        posted.unknown.append(batch)
    elif outcome == "refused" or outcome == 503:
        posted.unsent.append(batch)
    else:
        posted.unexpected.append(f"{batch.reports[0].report_id}..: HTTP {outcome}")


def client_session() -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(limit=POST_CONCURRENCY * 2)
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60))


# ---------------------------------------------------------------------------------------
# Reading the store (read-only)
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Row:
    municipality: str
    report_id: str
    delivery_id: int | None
    adapter: str | None
    employee: str | None
    status: str | None
    attempts: int
    last_error: str | None
    leased: bool


@dataclass
class Snapshot:
    rows: dict[tuple[str, str], Row]
    attempt_rows: dict[int, int]  # delivery id -> attempt rows
    unfinished_attempts: int
    events: Counter[str]


def _connect_ro(db: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    conn.row_factory = sqlite3.Row
    return conn


def snapshot(db: Path) -> Snapshot:
    with contextlib.closing(_connect_ro(db)) as conn:
        rows = {}
        for r in conn.execute(
            "SELECT r.municipality, r.report_id, d.id, d.adapter, d.employee_key, d.status,"
            " d.attempts, d.last_error, d.lease_owner, d.lease_until"
            " FROM reports r LEFT JOIN deliveries d ON d.report_pk = r.id ORDER BY d.id"
        ):
            leased = r["lease_owner"] is not None or r["lease_until"] is not None
            rows[(r[0], r[1])] = Row(r[0], r[1], r[2], r[3], r[4], r[5], r[6] or 0, r[7], leased)
        attempt_rows = {
            r[0]: r[1]
            for r in conn.execute("SELECT delivery_id, COUNT(*) FROM attempts GROUP BY delivery_id")
        }
        unfinished = conn.execute(
            "SELECT COUNT(*) FROM attempts WHERE finished_at IS NULL"
        ).fetchone()[0]
        events = Counter(
            {
                r[0]: r[1]
                for r in conn.execute("SELECT event, COUNT(*) FROM audit_events GROUP BY event")
            }
        )
    return Snapshot(rows, attempt_rows, unfinished, events)


_ACTIVE_SQL = """
SELECT COUNT(*) FROM deliveries d WHERE d.status = 'in_flight'
 OR (d.status = 'in_doubt' AND d.adapter NOT IN ({stuck}))
 OR (d.status IN ('queued', 'retry_scheduled') AND NOT EXISTS (
     SELECT 1 FROM deliveries e WHERE e.municipality = d.municipality AND e.adapter = d.adapter
     AND e.employee_key = d.employee_key AND e.id < d.id AND e.status = 'in_doubt'
     AND e.adapter IN ({stuck})))
"""


def active_count(db: Path, final_only: bool = False) -> int:
    """Deliveries that can still move (or, with ``final_only``, every one not final)."""
    stuck = ",".join(f"'{a}'" for a in OPERATOR_IN_DOUBT)
    sql = (
        f"SELECT COUNT(*) FROM deliveries WHERE status NOT IN ({','.join(repr(s) for s in FINAL)})"
        if final_only
        else _ACTIVE_SQL.format(stuck=stuck)
    )
    try:
        with contextlib.closing(_connect_ro(db)) as conn:
            return int(conn.execute(sql).fetchone()[0])
    except sqlite3.OperationalError:
        return -1  # not created yet, or busy: ask again


async def wait_settled(db: Path, within: float, final_only: bool = False) -> tuple[bool, float]:
    started = time.monotonic()
    while time.monotonic() - started < within:
        if active_count(db, final_only) == 0:
            return True, time.monotonic() - started
        await asyncio.sleep(0.25)
    return False, time.monotonic() - started


# ---------------------------------------------------------------------------------------
# Checks shared by both runs
# ---------------------------------------------------------------------------------------


def held_behind_in_doubt(snap: Snapshot) -> set[int]:
    """Deliveries queued behind an earlier same-employee delivery that waits for an operator."""
    lanes: dict[tuple[str, str, str], list[Row]] = defaultdict(list)
    for row in snap.rows.values():
        if row.delivery_id is not None and row.adapter and row.employee:
            lanes[(row.municipality, row.adapter, row.employee)].append(row)
    held = set()
    for (_, adapter, _), rows in lanes.items():
        blocked = False
        for row in sorted(rows, key=lambda r: r.delivery_id or 0):
            if blocked and row.status in ("queued", "retry_scheduled"):
                held.add(row.delivery_id or 0)
            blocked = blocked or (row.status == "in_doubt" and adapter in OPERATOR_IN_DOUBT)
    return held


def state_of(row: Row, held: set[int]) -> str:
    if row.delivery_id in held:
        return "held (behind an SD delivery in doubt)"
    return row.status or "no delivery"


def check_leases(snap: Snapshot) -> list[str]:
    problems = [f"{r.report_id}: still leased ({r.status})" for r in snap.rows.values() if r.leased]
    problems += [f"{r.report_id}: in_flight" for r in snap.rows.values() if r.status == "in_flight"]
    if snap.unfinished_attempts:
        problems.append(f"{snap.unfinished_attempts} attempt(s) never finished (finished_at NULL)")
    return problems[:20]


def sd_registrations(
    sims: Simulators, by_km: dict[Decimal, Planned]
) -> tuple[Counter[str], list[str]]:
    counts: Counter[str] = Counter()
    problems = []
    for accepted in sims.sd.accepted:
        planned = by_km.get(accepted.km)
        if planned is None or planned.municipality != "746":
            problems.append(f"SD registration for an unknown report: km {accepted.km}")
            continue
        counts[planned.report_id] += 1
    return counts, problems


def eng_sums(sims: Simulators) -> dict[str, Decimal]:
    sums: dict[str, Decimal] = defaultdict(Decimal)
    for posting in sims.eng.ledger.all():
        sums[posting.remark] += posting.antal
    return sums


def check_vendor(
    planned: Iterable[Planned], snap: Snapshot, sims: Simulators, held: set[int]
) -> list[str]:
    """No report registered twice at SD; the Engangsydelser sums equal the km exactly."""
    plan = list(planned)
    by_km = {p.km: p for p in plan}
    sd_counts, problems = sd_registrations(sims, by_km)
    sums = eng_sums(sims)
    for p in plan:
        row = snap.rows.get((p.municipality, p.report_id))
        status = row.status if row else None
        if p.municipality == "746":
            problems += _check_sd(p, status, sd_counts[p.report_id])
        else:
            problems += _check_eng(p, status, sums.get(p.report_id, Decimal(0)))
    unknown = set(sums) - {p.report_id for p in plan}
    problems += [f"Engangsydelser posting for an unknown report {r}" for r in sorted(unknown)]
    return problems


def _check_sd(p: Planned, status: str | None, registered: int) -> list[str]:
    if registered > 1:
        return [f"{p.report_id}: registered {registered} times at SD ({status})"]
    if status == "delivered" and registered != 1:
        return [f"{p.report_id}: delivered but SD has no registration"]
    if status not in ("delivered", "in_doubt") and registered:
        return [f"{p.report_id}: SD has a registration, but the delivery is {status}"]
    return []


def _check_eng(p: Planned, status: str | None, total: Decimal) -> list[str]:
    allowed = {"delivered": {p.km}, "in_doubt": {Decimal(0), p.km}}.get(status or "", {Decimal(0)})
    if total not in allowed:
        return [f"{p.report_id}: Engangsydelser holds {total} for {p.km} km ({status})"]
    return []


def check_order(planned: Iterable[Planned], snap: Snapshot, sims: Simulators) -> list[str]:
    """Each vendor saw each employee's reports in intake order (delivery id order)."""
    plan = {p.report_id: p for p in planned}
    ids = {r.report_id: r.delivery_id or 0 for r in snap.rows.values()}
    by_km = {p.km: p for p in plan.values()}
    seen: dict[tuple[str, str], list[int]] = defaultdict(list)
    for accepted in sims.sd.accepted:
        if accepted.km in by_km:
            p = by_km[accepted.km]
            seen[("sd", p.employee)].append(ids.get(p.report_id, 0))
    for posting in sims.eng.ledger.all():
        if posting.remark in plan and posting.antal > 0:
            seen[("eng", posting.employee)].append(ids.get(posting.remark, 0))
    return [
        f"{vendor} employee {emp}: deliveries reached the vendor in the order {order}"
        for (vendor, emp), order in seen.items()
        if order != sorted(order)
    ][:10]


# ---------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------


@dataclass
class Result:
    """Invariants by name (an empty list: it holds), counts, timings and notes."""

    name: str
    invariants: dict[str, list[str]] = field(default_factory=dict)
    counts: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(self.invariants.values())

    def failures(self) -> list[str]:
        return [f"{name}: {p}" for name, problems in self.invariants.items() for p in problems]

    def format(self) -> str:
        lines = [f"## {self.name}: {'all invariants hold' if self.ok else 'INVARIANTS FAILED'}"]
        for name, problems in self.invariants.items():
            lines.append(f"- [{'x' if not problems else ' '}] {name}")
            lines += [f"    - {p}" for p in problems[:10]]
            if len(problems) > 10:
                lines.append(f"    - ... and {len(problems) - 10} more")
        lines.append("- counts: " + json.dumps(self.counts, sort_keys=True, default=str))
        lines.append("- timings (s): " + ", ".join(f"{k} {v:.2f}" for k, v in self.timings.items()))
        lines += [f"- note: {n}" for n in self.notes]
        return "\n".join(lines)


KillReport = Result
SoakReport = Result


# ---------------------------------------------------------------------------------------
# kill -9 rounds
# ---------------------------------------------------------------------------------------


@dataclass
class KillRun:
    """State carried across the rounds."""

    url: str
    gateway: GatewayProcess
    rng: random.Random
    acked: dict[str, int] = field(default_factory=dict)  # report_id -> first 200/202
    carry: list[Batch] = field(default_factory=list)
    in_flight_at_kill: list[Batch] = field(default_factory=list)
    repost_status: Counter[str] = field(default_factory=Counter)
    unexpected: list[str] = field(default_factory=list)
    kill_after_s: list[float] = field(default_factory=list)
    start_s: list[float] = field(default_factory=list)


async def _kill_round(
    run: KillRun, session: aiohttp.ClientSession, batches: list[Batch], kill: bool
) -> None:
    run.start_s.append(await start_gateway(run.gateway))
    started = time.monotonic()
    kill_after = max(1, math.ceil(len(batches) * run.rng.uniform(0.2, 0.9))) if kill else None

    async def on_kill() -> None:
        await asyncio.sleep(run.rng.uniform(0, 0.05))
        run.kill_after_s.append(time.monotonic() - started)
        await run.gateway.kill()

    unknown_before = {id(b) for b in run.in_flight_at_kill}
    posted = await post_all(session, run.url, batches, kill_after, on_kill if kill else None)
    for batch, status in posted.acked:
        for p in batch.reports:
            run.acked.setdefault(p.report_id, status)
        if id(batch) in unknown_before:  # re-posted after being in flight at a kill
            run.repost_status[f"re-posted after kill: HTTP {status}"] += 1
    run.in_flight_at_kill.extend(posted.unknown)
    run.unexpected += posted.unexpected
    run.carry = posted.unknown + posted.unsent


async def kill_rounds(
    reports: int = 2000,
    rounds: int = 5,
    seed: int = 1,
    workdir: Path | None = None,
    settle_within: float = 60.0,
) -> KillReport:
    """Post ``reports`` over ``rounds`` runs of the gateway, each killed with SIGKILL."""
    with _workdir(workdir, "kill") as folder:
        rng = random.Random(seed)
        planned = make_reports(reports, f"K{seed}", 0.5, rng)
        # SD answers within ms; 25 ms of latency lets a kill land while a request is out
        sims = await start_simulators(folder, seed, sd_latency_ms=KILL_SD_LATENCY_MS)
        try:
            return await _kill_rounds(folder, sims, planned, rounds, rng, settle_within)
        finally:
            await sims.aclose()


async def _kill_rounds(
    folder: Path,
    sims: Simulators,
    planned: list[Planned],
    rounds: int,
    rng: random.Random,
    settle_within: float,
) -> KillReport:
    port = free_port()
    config = write_config(folder, sims, port)
    gateway = GatewayProcess(config, folder / "gateway.log")
    run = KillRun(f"http://{HOST}:{port}/v1/reports", gateway, rng)
    share = math.ceil(len(planned) / max(1, rounds))
    began = time.monotonic()
    async with client_session() as session:
        for n in range(rounds):
            batches = run.carry + make_batches(planned[n * share : (n + 1) * share], rng)
            await _kill_round(run, session, batches, kill=True)
        await _kill_round(run, session, run.carry, kill=False)
    settled, settle_s = await wait_settled(folder / "gateway.db", settle_within)
    exit_code = await gateway.stop()
    audit_rc, audit_text = await audit_verify(config)
    result = _kill_result(run, planned, snapshot(folder / "gateway.db"), sims)
    result.invariants["the gateway settled and stopped cleanly (SIGTERM, exit 0)"] = (
        [] if settled else [f"deliveries still moving after {settle_within:g} s"]
    ) + ([] if exit_code == 0 else [f"exit code {exit_code}: {gateway.tail(5)}"])
    result.invariants["the audit trail's hash chain is intact"] = (
        [] if audit_rc == 0 else [audit_text]
    )
    result.timings.update(
        total=time.monotonic() - began,
        settle=settle_s,
        mean_start=sum(run.start_s) / len(run.start_s),
    )
    result.notes.append(
        f"killed after {', '.join(f'{s:.2f}' for s in run.kill_after_s)} s "
        f"of posting in the {rounds} rounds; {audit_text}"
    )
    return result


def _kill_result(
    run: KillRun, planned: list[Planned], snap: Snapshot, sims: Simulators
) -> KillReport:
    result = KillReport("kill -9 rounds")
    held = held_behind_in_doubt(snap)
    states: Counter[str] = Counter()
    stored = []
    for p in planned:
        row = snap.rows.get((p.municipality, p.report_id))
        if p.report_id in run.acked:
            stored += _check_acked(p, row, held, states)
    result.invariants["every acknowledged report is stored, delivered or in a named state"] = (
        stored + run.unexpected
    )
    result.invariants["nothing stays leased, no attempt unfinished"] = check_leases(snap)
    vendor = check_vendor(planned, snap, sims, held)
    result.invariants["SD: no report registered twice; Engangsydelser sums exact"] = vendor
    result.invariants["each employee's reports reached the vendor in intake order"] = check_order(
        planned, snap, sims
    )
    not_acked = [p.report_id for p in planned if p.report_id not in run.acked]
    stored_not_acked = [r for r in not_acked if any(k[1] == r for k in snap.rows)]
    result.counts = {
        "reports": len(planned),
        "acknowledged": len(run.acked),
        "never acknowledged": len(not_acked),
        "stored without an acknowledgement": len(stored_not_acked),
        "states": dict(states),
        "SD registrations": len(sims.sd.accepted),
        "Engangsydelser postings": len(sims.eng.ledger.all()),
        "batches in flight at a kill": len(run.in_flight_at_kill),
        "reports in flight at a kill": sum(len(b.reports) for b in run.in_flight_at_kill),
        **run.repost_status,
        "reclaimed at start": snap.events.get("delivery.reclaimed", 0),
        "in doubt": snap.events.get("delivery.in_doubt", 0),
    }
    result.notes.append(
        "a batch in flight at a kill was re-posted in the next run: HTTP 200 means "
        "it had been committed before the kill, 202 that it had not"
    )
    return result


def _check_acked(p: Planned, row: Row | None, held: set[int], states: Counter[str]) -> list[str]:
    if row is None:
        return [f"{p.report_id}: acknowledged but not stored"]
    state = state_of(row, held)
    states[state] += 1
    if state == "delivered" or state.startswith("held"):
        return []
    if state == "in_doubt" and row.adapter in OPERATOR_IN_DOUBT:
        return []
    if state == "failed" and row.last_error:
        return []
    return [f"{p.report_id}: left {state} ({row.adapter}; {row.last_error})"]


# ---------------------------------------------------------------------------------------
# The fault soak
# ---------------------------------------------------------------------------------------


async def soak(
    reports: int = 5000,
    seed: int = 2,
    workdir: Path | None = None,
    settle_within: float = 600.0,
    breaker: dict[str, float] | None = None,
) -> SoakReport:
    """One gateway against simulators failing 45 % of the requests; everything must end final."""
    breaker = dict(SOAK_BREAKER if breaker is None else breaker)
    with _workdir(workdir, "soak") as folder:
        rng = random.Random(seed)
        planned = make_reports(reports, f"S{seed}", 1 - SOAK_SD_SHARE, rng)
        sims = await start_simulators(folder, seed, sd_mix=SOAK_SD_MIX, eng_mix=SOAK_MIX)
        try:
            result = await _soak(folder, sims, planned, rng, settle_within, breaker)
        finally:
            await sims.aclose()
    result.notes.append(
        f"breaker per endpoint: {breaker}; fault mix Engangsydelser {SOAK_MIX}, SD {SOAK_SD_MIX}"
    )
    return result


async def _soak(
    folder: Path,
    sims: Simulators,
    planned: list[Planned],
    rng: random.Random,
    settle_within: float,
    breaker: dict[str, float],
) -> SoakReport:
    port = free_port()
    config = write_config(folder, sims, port, breaker=breaker)
    gateway = GatewayProcess(config, folder / "gateway.log")
    began = time.monotonic()
    start_s = await start_gateway(gateway)
    try:
        async with client_session() as session:
            posted = await post_all(
                session, f"http://{HOST}:{port}/v1/reports", make_batches(planned, rng)
            )
        post_s = time.monotonic() - began - start_s
        settled, settle_s = await wait_settled(
            folder / "gateway.db", settle_within, final_only=True
        )
    finally:
        exit_code = await gateway.stop()
    result = _soak_result(planned, posted, snapshot(folder / "gateway.db"), sims)
    result.invariants["every delivery final (delivered, or failed with a reason); clean stop"] = (
        result.invariants["every delivery final (delivered, or failed with a reason); clean stop"]
        + ([] if settled else [f"not all final after {settle_within:g} s"])
        + ([] if exit_code == 0 else [f"exit code {exit_code}: {gateway.tail(5)}"])
    )
    delivered = result.counts["states"].get("delivered", 0)
    result.timings.update(
        start=start_s, post=post_s, until_all_final=settle_s, total=time.monotonic() - began
    )
    result.counts["intake reports/s"] = round(len(planned) / post_s, 1) if post_s else None
    result.counts["delivered/s (post start to all final)"] = (
        round(delivered / (post_s + settle_s), 1) if post_s + settle_s else None
    )
    return result


def _soak_result(
    planned: list[Planned], posted: Posted, snap: Snapshot, sims: Simulators
) -> SoakReport:
    result = SoakReport("fault soak")
    states: Counter[str] = Counter()
    final = [
        f"batch not acknowledged: {b.reports[0].report_id}.."
        for b in posted.unknown + posted.unsent
    ]
    final += posted.unexpected
    over = []
    for p in planned:
        row = snap.rows.get((p.municipality, p.report_id))
        final += _check_final(p, row, states)
        if row is not None and row.delivery_id is not None:
            rows = snap.attempt_rows.get(row.delivery_id, 0)
            if max(row.attempts, rows) > MAX_ATTEMPTS:
                over.append(f"{p.report_id}: {row.attempts} attempts counted, {rows} attempt rows")
    result.invariants["every delivery final (delivered, or failed with a reason); clean stop"] = (
        final
    )
    result.invariants[f"attempts per delivery <= max_attempts ({MAX_ATTEMPTS})"] = over
    result.invariants["nothing stays leased, no attempt unfinished"] = check_leases(snap)
    result.invariants["vendor sums exact (delivered: km, failed: 0); nothing twice"] = check_vendor(
        planned, snap, sims, set()
    )
    result.invariants["the breaker opened and closed again (audit events)"] = _check_breaker(snap)
    attempts = [snap.attempt_rows.get(r.delivery_id or 0, 0) for r in snap.rows.values()]
    result.counts = {
        "reports": len(planned),
        "to kmd-engangsydelser": sum(p.municipality == "840" for p in planned),
        "to sd-koersel": sum(p.municipality == "746" for p in planned),
        "states": dict(states),
        "attempt rows": sum(attempts),
        "max attempt rows per delivery": max(attempts, default=0),
        "injected (Engangsydelser)": dict(sims.eng.injected),
        "injected (SD)": dict(sims.sd.injected),
        "breaker events": {k: v for k, v in snap.events.items() if k.startswith("endpoint.")},
        "in doubt (events)": snap.events.get("delivery.in_doubt", 0),
        "read back (events)": snap.events.get("delivery.read_back", 0),
    }
    return result


def _check_final(p: Planned, row: Row | None, states: Counter[str]) -> list[str]:
    if row is None:
        return [f"{p.report_id}: not stored"]
    states[row.status or "none"] += 1
    if row.status == "delivered" or (row.status == "failed" and row.last_error):
        return []
    return [f"{p.report_id}: {row.status} ({row.last_error})"]


def _check_breaker(snap: Snapshot) -> list[str]:
    opened = snap.events.get("endpoint.breaker_open", 0)
    closed = snap.events.get("endpoint.breaker_closed", 0)
    problems = []
    if not opened:
        problems.append(
            "no 'endpoint.breaker_open' audit event (does the gateway audit breaker changes?)"
        )
    if not closed:
        problems.append("no 'endpoint.breaker_closed' audit event")
    return problems


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------


def quiet_simulator_logs() -> None:
    """A killed gateway leaves half-read requests: the simulators' server log says so, loudly."""
    logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)


@contextlib.contextmanager
def _workdir(workdir: Path | None, name: str) -> Any:
    if workdir is not None:
        folder = Path(workdir) / name
        folder.mkdir(parents=True, exist_ok=True)
        yield folder
        return
    with tempfile.TemporaryDirectory(prefix=f"pgw-{name}-") as tmp:
        yield Path(tmp)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.reliability",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    kill = sub.add_parser("kill", help="kill -9 rounds")
    kill.add_argument("--reports", type=int, default=2000)
    kill.add_argument("--rounds", type=int, default=5)
    kill.add_argument("--seed", type=int, default=1)
    soak_p = sub.add_parser("soak", help="the fault soak")
    soak_p.add_argument("--reports", type=int, default=5000)
    soak_p.add_argument("--seed", type=int, default=2)
    soak_p.add_argument("--breaker-rate", type=float, default=SOAK_BREAKER["failure_rate"])
    soak_p.add_argument("--breaker-open", type=float, default=SOAK_BREAKER["open_seconds"])
    for p in (kill, soak_p):
        p.add_argument("--workdir", type=Path, help="keep the store and logs here")
    args = parser.parse_args(argv)
    quiet_simulator_logs()
    if args.command == "kill":
        result = asyncio.run(kill_rounds(args.reports, args.rounds, args.seed, args.workdir))
    else:
        breaker = {
            **SOAK_BREAKER,
            "failure_rate": args.breaker_rate,
            "open_seconds": args.breaker_open,
        }
        result = asyncio.run(soak(args.reports, args.seed, args.workdir, breaker=breaker))
    print(result.format())
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
