"""``make bench``: the performance figures of issue 12, each the median of several short runs.

Every system under test is an OS process of its own on 127.0.0.1: the gateway (``python -m
gateway serve``), the SD and KMD simulators (``bench.sim``), the bare aiohttp endpoint
(``bench.bare``), the Procrastinate worker and the hand-rolled outbox worker
(``bench.peers``). This process only drives the load (``wrk`` for single-report intake,
aiohttp otherwise), watches the simulators' counts and reads the results. Each ratio is taken
within one run: the gateway and its ceiling or peer are measured one after the other in the
same sitting, so a noisy machine moves both.

Scenarios (see ``bench.figures.SPECS`` for the table):

- ``intake``: wrk, 64 connections, one report per request, against the gateway (SQLite, the
  SD endpoint paused so nothing is delivered) and the bare endpoint; then a fixed number of
  reports, 1,000 per request, two requests at a time, against both.
- ``e2e_sd`` / ``e2e_kmd``: N reports posted in batches, the time until the simulator holds
  all of them; against a raw aiohttp client posting the same envelopes to the same simulator.
- ``backlog``: the empty-queue rate (a small batch stored while paused, then resumed), then
  100,000 reports for 10,000 employees stored while paused and the delivery rate over
  windows after the resume; the gateway's RSS with all of them stored and while draining.
- ``latency_200`` / ``latency_1000``: single reports offered at a fixed rate (open loop);
  accepted (the 202) → delivered (the delivery's ``updated_at`` in the store).
- ``peers``: the same workload (store N, then deliver them to SD) on Procrastinate, the
  outbox, the gateway on PostgreSQL with 1 and 2 processes and the gateway on SQLite.
- a py-spy profile of the gateway while it drains a stored batch to SD (not timed).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from adapters.base import Payload, Report, VendorSettings
from bench import figures
from bench.peers.common import CONCURRENCY
from bench.peers.common import report as drive_report
from gateway.devcerts import DevCerts, ensure_dev_certs
from gateway.settings import hash_api_key
from gateway.validation import normalise

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
HOST = "127.0.0.1"
KEY = "bench-key-746"
OPS_TOKEN = "bench-ops-token"
SD_USER, SD_PASSWORD = "SYbench", "bench-sd-password"
PG_ADMIN = os.environ.get("BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
WRK_SCRIPT = Path(__file__).resolve().parent / "wrk" / "reports.lua"
POLL = 0.05


@dataclass(frozen=True, slots=True)
class Plan:
    repeats: int
    wrk_seconds: int
    batch_reports: int
    e2e_reports: int
    kmd_reports: int
    empty_reports: int
    backlog: int
    backlog_employees: int
    window_seconds: float
    latency_seconds: float
    peer_reports: int
    profile_reports: int
    cap: float  # seconds one delivery measurement may take; then the rate so far counts


FULL = Plan(3, 5, 10_000, 5000, 2000, 5000, 100_000, 10_000, 8.0, 5.0, 2000, 5000, 12.0)
QUICK = Plan(1, 2, 5000, 1000, 400, 1000, 10_000, 1_000, 4.0, 3.0, 500, 1000, 5.0)


# ---------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def env(**extra: str) -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, **extra}


class Proc:
    """A child process with its output in a log file; started, awaited for a line, stopped."""

    def __init__(self, name: str, args: Sequence[str], log: Path, cwd: Path, **extra: str) -> None:
        self.name, self.args, self.log, self.cwd, self.extra = name, list(args), log, cwd, extra
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def start(self, ready: str | None = None, within: float = 60.0) -> Proc:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(  # noqa: ASYNC220 (returns at once; polled below)
                self.args,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                cwd=self.cwd,
                env=env(**self.extra),
            )
        deadline = time.monotonic() + within
        while ready is not None and ready not in self.text():
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: {self.tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} not ready within {within:g} s: {self.tail()}")
            await asyncio.sleep(0.05)
        return self

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def tail(self, lines: int = 12) -> str:
        return "\n".join(self.text().splitlines()[-lines:])

    async def wait(self, within: float) -> int:
        assert self.proc is not None
        deadline = time.monotonic() + within
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                await self.stop()
                raise RuntimeError(f"{self.name} still running after {within:g} s")
            await asyncio.sleep(0.05)
        return int(self.proc.returncode)

    async def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        for _ in range(200):
            if self.proc.poll() is not None:
                return
            await asyncio.sleep(0.05)
        self.proc.kill()
        self.proc.wait()

    def rss_mb(self) -> float | None:
        return rss_mb(self.pid)


def rss_mb(pid: int) -> float | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
    return int(match.group(1)) / 1024 if match else None


# ---------------------------------------------------------------------------------------
# Simulators, the bare endpoint, PostgreSQL databases
# ---------------------------------------------------------------------------------------


@dataclass
class Sims:
    folder: Path
    certs: DevCerts
    sd: Proc
    kmd: Proc
    sd_port: int
    kmd_port: int
    session: aiohttp.ClientSession | None = None

    @property
    def sd_url(self) -> str:
        return f"http://{HOST}:{self.sd_port}/sdws/AnsaettelseKoerselOpret20170501"

    @property
    def kmd_url(self) -> str:
        return f"https://{HOST}:{self.kmd_port}/XISOAPAdapter/MessageServlet"

    def client_ssl(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.certs.ca_file))
        ctx.load_cert_chain(str(self.certs.client_cert), str(self.certs.client_key))
        ctx.check_hostname = False
        return ctx

    async def count(self, vendor: str) -> int:
        assert self.session is not None
        if vendor == "sd":
            url, ctx = f"http://{HOST}:{self.sd_port}/_bench/count", None
        else:
            url, ctx = f"https://{HOST}:{self.kmd_port}/_bench/count", self.client_ssl()
        async with self.session.get(url, ssl=ctx or False) as resp:
            return int((await resp.json())["accepted"])

    async def aclose(self) -> None:
        if self.session is not None:
            await self.session.close()
        await self.sd.stop()
        await self.kmd.stop()


async def start_sims(folder: Path) -> Sims:
    folder.mkdir(parents=True, exist_ok=True)
    certs = ensure_dev_certs(folder / "dev-certs")
    (folder / "sd-password").write_text(SD_PASSWORD + "\n")
    sd_port, kmd_port = free_port(), free_port()
    sd = Proc(
        "SD simulator",
        [
            PY,
            "-m",
            "bench.sim",
            "sd",
            "--port",
            str(sd_port),
            "--username",
            SD_USER,
            "--password-file",
            str(folder / "sd-password"),
        ],
        folder / "sim-sd.log",
        folder,
    )
    kmd = Proc(
        "KMD simulator",
        [
            PY,
            "-m",
            "bench.sim",
            "kmd",
            "--port",
            str(kmd_port),
            "--tls-dir",
            str(folder / "dev-certs"),
        ],
        folder / "sim-kmd.log",
        folder,
    )
    await asyncio.gather(sd.start("bench simulator"), kmd.start("bench simulator"))
    sims = Sims(folder, certs, sd, kmd, sd_port, kmd_port)
    sims.session = aiohttp.ClientSession()
    for vendor in ("sd", "kmd"):  # listening, not only printed
        for _ in range(100):
            with contextlib.suppress(aiohttp.ClientError):
                await sims.count(vendor)
                break
            await asyncio.sleep(0.05)
    return sims


@contextlib.asynccontextmanager
async def pg_database(name: str) -> Any:
    """A fresh database on the bench's PostgreSQL, dropped afterwards; yields its URL."""
    admin = await asyncpg.connect(PG_ADMIN)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield PG_ADMIN.rsplit("/", 1)[0] + f"/{name}"
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


# ---------------------------------------------------------------------------------------
# The gateway
# ---------------------------------------------------------------------------------------


#: the data key and audit key of every gateway process of this bench run
SHARED_KEYS = (os.urandom(32), os.urandom(32))


def gateway_config(folder: Path, sims: Sims, port: int, store: str) -> Path:
    """Both vendors always open, 32 workers and 32 in flight per endpoint, an ops token."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sd-password").write_text(SD_PASSWORD + "\n")
    privacy = ""
    if not store.startswith("sqlite"):
        # every process on one database needs the same data key and audit key
        (folder / "data-key").write_text(base64.b64encode(SHARED_KEYS[0]).decode() + "\n")
        (folder / "audit-key").write_text(SHARED_KEYS[1].hex() + "\n")
        privacy = '[privacy]\ndata_key_file = "data-key"\n\n[audit]\nkey_file = "audit-key"\n'
    c = sims.certs
    text = f"""# generated by bench/perf.py
[server]
listen = "{HOST}:{port}"
store = "{store}"
store_pool_size = 10
data_dir = "."

[dispatcher]
workers = {CONCURRENCY}
lease_seconds = 60

[retry]
first_delay_seconds = 0.5
cap_seconds = 5

[tenants.746]
api_key_hashes = ["{hash_api_key(KEY)}"]
[tenants.746.routes]
drive = "sd-koersel"
vacation = "kmd-absence"
[tenants.746.vendors.sd-koersel]
endpoint = "{sims.sd_url}"
username = "{SD_USER}"
password_file = "sd-password"
institution = "XY"
opening_hours = "always"
max_in_flight = {CONCURRENCY}
[tenants.746.vendors.kmd-absence]
endpoint = "{sims.kmd_url}"
cert_file = "{c.client_cert}"
key_file = "{c.client_key}"
ca_file = "{c.ca_file}"
max_in_flight = {CONCURRENCY}
[tenants.746.vendors.kmd-absence.options]
senderService = "BENCH_746_VACAB"

[operators.bench]
token_hash = "{hash_api_key(OPS_TOKEN)}"
role = "operator"
municipalities = ["746"]

{privacy}"""
    path = folder / "gateway.toml"
    path.write_text(text)
    return path


@dataclass
class Gateway:
    """One or more ``payroll-gateway serve`` processes on one store."""

    folder: Path
    procs: list[Proc] = field(default_factory=list)
    ports: list[int] = field(default_factory=list)
    session: aiohttp.ClientSession | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.ports[0]}/v1/reports"

    async def control(self, action: str, adapter: str = "sd-koersel") -> None:
        """Pause or resume the endpoint in every process (each keeps its own view)."""
        assert self.session is not None
        for port in self.ports:
            url = f"http://{HOST}:{port}/v1/ops/endpoints/746/{adapter}/{action}"
            headers = {"Authorization": f"Bearer {OPS_TOKEN}"}
            async with self.session.post(url, json={"reason": "bench"}, headers=headers) as r:
                if r.status != 200:
                    raise RuntimeError(f"{action}: HTTP {r.status}: {await r.text()}")

    def rss_mb(self) -> float:
        return sum(p.rss_mb() or 0.0 for p in self.procs)

    async def aclose(self) -> None:
        if self.session is not None:
            await self.session.close()
        await asyncio.gather(*(p.stop() for p in self.procs))


async def start_gateway(
    folder: Path, sims: Sims, store: str = "sqlite:///gateway.db", processes: int = 1
) -> Gateway:
    gw = Gateway(folder)
    for i in range(processes):
        port = free_port()
        config = gateway_config(folder, sims, port, store)
        if processes > 1:
            config = config.rename(folder / f"gateway-{i}.toml")
        proc = Proc(
            f"gateway {i}",
            [PY, "-m", "gateway", "serve", "--config", str(config)],
            folder / f"gateway-{i}.log",
            folder,
        )
        await proc.start("intake API at")
        gw.procs.append(proc)
        gw.ports.append(port)
    gw.session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=64), timeout=aiohttp.ClientTimeout(total=120)
    )
    return gw


# ---------------------------------------------------------------------------------------
# Load
# ---------------------------------------------------------------------------------------


def vacation_report(prefix: str, i: int) -> dict[str, Any]:
    return {
        "kind": "vacation",
        "municipality": "746",
        "report_id": f"{prefix}-{i:06d}",
        "version": 1,
        "employee": {"cpr": "0101900000", "employment_id": f"{i:08d}"},
        "start_date": "2026-07-06",
        "end_date": "2026-07-10",
        "vacation_type": "regular",
    }


def batch_bodies(reports: Sequence[dict[str, Any]], size: int = 1000) -> list[bytes]:
    return [
        json.dumps({"reports": list(reports[i : i + size])}).encode()
        for i in range(0, len(reports), size)
    ]


async def post_bodies(
    session: aiohttp.ClientSession,
    urls: Sequence[str],
    bodies: Sequence[bytes],
    workers: int = 4,
) -> None:
    """Post every body (spread over ``urls``); raise on an answer that is not 202/200."""
    pending = list(enumerate(bodies))
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}

    async def worker() -> None:
        while pending:
            i, body = pending.pop(0)
            async with session.post(urls[i % len(urls)], data=body, headers=headers) as resp:
                text = await resp.read()
                if resp.status not in (200, 202):
                    raise RuntimeError(f"intake answered {resp.status}: {text[:300]!r}")

    await asyncio.gather(*(worker() for _ in range(workers)))


@dataclass
class Delivered:
    """What a simulator's count did while watched."""

    seconds: float  # from the start of watching to the end
    count: int  # delivered in that time
    rate: float  # deliveries/s, from the first one seen to the end
    complete: bool  # everything expected arrived (not stopped by the cap)
    windows: list[float] = field(default_factory=list)  # deliveries/s per time window


async def watch(
    count: Callable[[], Awaitable[int]],
    base: int,
    expected: int,
    *,
    cap: float,
    windows: int = 0,
    window_seconds: float = 0.0,
    on_tick: Callable[[], None] | None = None,
) -> Delivered:
    """Poll ``count`` until ``base + expected`` arrived or ``cap`` seconds passed; with
    ``windows``, until that many windows of ``window_seconds`` were timed after the first
    delivery seen (then ``cap`` bounds the whole)."""
    started = time.monotonic()
    marks: list[tuple[float, int]] = []
    while True:
        now, n = time.monotonic(), await count() - base
        if on_tick is not None:
            on_tick()
        if n > 0 and not marks:
            marks.append((now, n))
        if windows and marks and now - marks[-1][0] >= window_seconds:
            marks.append((now, n))
        done = n >= expected or now - started >= cap or (windows and len(marks) > windows)
        if done:
            t0, n0 = marks[0] if marks else (started, 0)
            rate = (n - n0) / (now - t0) if now > t0 and n > n0 else n / max(now - started, 1e-9)
            rates = [(b[1] - a[1]) / (b[0] - a[0]) for a, b in itertools.pairwise(marks)]
            return Delivered(now - started, n, rate, n >= expected, rates if windows else [])
        await asyncio.sleep(POLL)


def sd_payloads(reports: Sequence[dict[str, Any]], sims: Sims) -> list[tuple[str, Payload]]:
    from bench.peers.common import renderer

    settings = VendorSettings(
        endpoint=sims.sd_url, username=SD_USER, password=SD_PASSWORD, institution="XY"
    )
    render = renderer(settings)
    return [(sims.sd_url, payload) for data in reports for payload in render(data)]


def kmd_payloads(reports: Sequence[dict[str, Any]], sims: Sims) -> list[tuple[str, Payload]]:
    from adapters.kmd_absence import SET_INTERFACE, KmdAbsence, endpoint_url

    adapter = KmdAbsence()
    settings = VendorSettings(endpoint=sims.kmd_url, options={"senderService": "BENCH_746_VACAB"})
    url = endpoint_url(settings, SET_INTERFACE)
    out = []
    for data in reports:
        typed = Report.from_dict(normalise(data))
        for message in adapter.plan(typed, (), settings).messages:
            out.append((url, adapter.render(typed, message, settings)))
    return out


async def raw_ceiling(sims: Sims, vendor: str, payloads: Sequence[tuple[str, Payload]]) -> float:
    """The raw client: pre-rendered envelopes POSTed with the gateway's concurrency; per second."""
    ctx: ssl.SSLContext | bool = sims.client_ssl() if vendor == "kmd" else False
    auth = aiohttp.encode_basic_auth(SD_USER, SD_PASSWORD) if vendor == "sd" else None
    pending = list(payloads)
    connector = aiohttp.TCPConnector(limit=CONCURRENCY, ssl=ctx)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            while pending:
                url, p = pending.pop()
                headers = {"Content-Type": p.content_type, **p.headers}
                if auth:
                    headers["Authorization"] = auth
                async with session.post(url, data=p.body, headers=headers) as resp:
                    await resp.read()
                    if resp.status != 200:
                        raise RuntimeError(f"raw client: {vendor} answered {resp.status}")

        started = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
        return len(payloads) / (time.monotonic() - started)


async def run_wrk(
    url: str, seconds: int, connections: int, prefix: str, batch: int
) -> dict[str, Any]:
    """wrk against ``url``; reports/s counting only 2xx answers."""
    proc = await asyncio.create_subprocess_exec(
        wrk_binary(),
        "-t2",
        f"-c{connections}",
        f"-d{seconds}s",
        "--timeout",
        "30s",
        "-s",
        str(WRK_SCRIPT),
        url,
        "--",
        prefix,
        str(batch),
        KEY,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    text = out.decode(errors="replace")
    line = next((ln for ln in text.splitlines() if ln.startswith("WRKJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no summary: {text[-500:]}")
    summary = json.loads(line.removeprefix("WRKJSON "))
    ok = summary["requests"] - summary["non2xx"]
    errors = sum(summary[k] for k in ("connect_errors", "read_errors", "write_errors", "timeouts"))
    summary["rate"] = ok * max(batch, 1) / (summary["duration_us"] / 1e6)
    summary["errors"] = errors + summary["non2xx"]
    return summary


def wrk_binary() -> str:
    found = shutil.which("wrk")
    if found is None:
        raise RuntimeError("wrk is not installed (make bench installs it with apt-get)")
    return found


# ---------------------------------------------------------------------------------------
# Scenarios
# ---------------------------------------------------------------------------------------


@dataclass
class Bench:
    plan: Plan
    root: Path
    scenarios: dict[str, list[dict[str, float | None]]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    profiles: dict[str, dict[str, Any]] = field(default_factory=dict)  # delivery, intake
    profile_raw: dict[str, str] = field(default_factory=dict)  # py-spy's collapsed stacks
    log: Callable[[str], None] = print

    def say(self, text: str) -> None:
        self.log(f"[bench {time.strftime('%H:%M:%S')}] {text}")

    async def intake(self) -> None:
        p = self.plan
        folder = self.root / "intake"
        sims = await start_sims(folder / "sims")
        bare_port = free_port()
        bare = Proc(
            "bare endpoint",
            [PY, "-m", "bench.bare", "--port", str(bare_port)],
            folder / "bare.log",
            folder,
        )
        gw = await start_gateway(folder / "gateway", sims)
        try:
            await bare.start("bench bare endpoint")
            await gw.control("pause")  # stored, not delivered: intake alone
            bare_url = f"http://{HOST}:{bare_port}/v1/reports"
            runs = []
            for r in range(p.repeats):
                run: dict[str, float | None] = {}
                for name, url in (("gateway_single", gw.url), ("bare_single", bare_url)):
                    s = await run_wrk(url, p.wrk_seconds, 64, f"i{r}{name[0]}", 0)
                    run[name] = s["rate"]
                    if s["errors"]:
                        self.errors.append(f"intake {name} run {r}: {s['errors']} errors")
                # batches: a fixed number of reports, 1,000 a request, 2 posting at a time
                reports = [drive_report(f"ib{r}", i, 1000) for i in range(p.batch_reports)]
                bodies = batch_bodies(reports)
                for name, url in (("gateway_batch", gw.url), ("bare_batch", bare_url)):
                    started = time.monotonic()
                    await post_bodies(gw.session, [url], bodies, workers=2)  # type: ignore[arg-type]
                    run[name] = len(reports) / (time.monotonic() - started)
                self.say(f"intake run {r}: {rates(run)}")
                runs.append(run)
            self.scenarios["intake"] = runs
        finally:
            await gw.aclose()
            await bare.stop()
            await sims.aclose()

    async def e2e(self, vendor: str) -> None:
        """Per run: a fresh gateway, N reports posted in batches, the time until the simulator
        has them (or the cap: then the deliveries so far); then the raw client's ceiling."""
        p = self.plan
        n = p.e2e_reports if vendor == "sd" else p.kmd_reports
        folder = self.root / f"e2e-{vendor}"
        sims = await start_sims(folder / "sims")
        try:
            runs: list[dict[str, float | None]] = []
            for r in range(p.repeats):
                if vendor == "sd":
                    reports = [drive_report(f"e{r}", i, 1000) for i in range(n)]
                    payloads = sd_payloads([drive_report(f"c{r}", i, 1000) for i in range(n)], sims)
                else:
                    reports = [vacation_report(f"k{r}", i + 2 * r * n) for i in range(n)]
                    payloads = kmd_payloads(
                        [vacation_report(f"c{r}", i + (2 * r + 1) * n) for i in range(n)], sims
                    )
                gw = await start_gateway(folder / f"gateway-{r}", sims)
                try:
                    base = await sims.count(vendor)
                    started = time.monotonic()
                    assert gw.session is not None
                    poster = asyncio.create_task(
                        post_bodies(gw.session, [gw.url], batch_bodies(reports))
                    )
                    done = await watch(lambda: sims.count(vendor), base, len(payloads), cap=p.cap)
                    await poster
                    gateway_rate = done.count / (time.monotonic() - started)
                finally:
                    await gw.aclose()
                if not done.complete:
                    self.notes.append(
                        f"e2e {vendor} run {r}: {done.count} of {n} delivered within the {p.cap:g} s cap"
                    )
                ceiling = await raw_ceiling(sims, vendor, payloads)
                runs.append({"gateway": gateway_rate, "ceiling": ceiling})
                self.say(f"e2e {vendor} run {r}: {rates(runs[-1])}")
            self.scenarios[f"e2e_{vendor}"] = runs
        finally:
            await sims.aclose()

    async def store_paused(
        self, gw: Gateway, reports: Sequence[dict[str, Any]], workers: int = 4
    ) -> float:
        """Post ``reports`` in batches of 1,000 (spread over the gateway's processes); per second."""
        urls = [f"http://{HOST}:{port}/v1/reports" for port in gw.ports]
        started = time.monotonic()
        assert gw.session is not None
        await post_bodies(gw.session, urls, batch_bodies(reports), workers)
        return len(reports) / (time.monotonic() - started)

    async def drain(self, gw: Gateway, sims: Sims, n: int, **how: Any) -> Delivered:
        """Resume SD on a gateway that stored ``n`` reports while paused; watch them arrive."""
        base = await sims.count("sd")
        await gw.control("resume")
        return await watch(lambda: sims.count("sd"), base, n, **how)

    async def backlog(self) -> None:
        """The empty-queue rate (fresh gateways, a small stored batch resumed), then one gateway
        with the backlog stored: its RSS, and the drain rate over time windows after resuming."""
        p = self.plan
        folder = self.root / "backlog"
        sims = await start_sims(folder / "sims")
        try:
            empties = []
            for r in range(p.repeats):
                gw = await start_gateway(folder / f"empty-{r}", sims)
                try:
                    await gw.control("pause")
                    reports = [
                        drive_report(f"q{r}", i, p.backlog_employees)
                        for i in range(p.empty_reports)
                    ]
                    await self.store_paused(gw, reports)
                    empties.append((await self.drain(gw, sims, len(reports), cap=p.cap)).rate)
                finally:
                    await gw.aclose()
                self.say(f"backlog: empty-queue run {r}: {empties[-1]:,.0f}/s")
            gw = await start_gateway(folder / "backlog", sims)
            try:
                await gw.control("pause")
                reports = [drive_report("b", i, p.backlog_employees) for i in range(p.backlog)]
                stored_rate = await self.store_paused(gw, reports)
                await asyncio.sleep(2.0)  # the writer idle again
                rss_stored = gw.rss_mb()
                self.say(
                    f"backlog: {p.backlog:,} stored at {stored_rate:,.0f}/s; RSS {rss_stored:.0f} MB"
                )
                peak = [rss_stored]
                done = await self.drain(
                    gw,
                    sims,
                    p.backlog,
                    cap=p.window_seconds * (p.repeats + 2) + 60,
                    windows=p.repeats,
                    window_seconds=p.window_seconds,
                    on_tick=lambda: peak.append(gw.rss_mb()),
                )
            finally:
                await gw.aclose()
            self.say("backlog: drain windows " + ", ".join(f"{w:,.0f}/s" for w in done.windows))
            self.scenarios["backlog"] = [
                {
                    "empty": e,
                    "drain": d,
                    "rss_stored_mb": rss_stored,
                    "rss_draining_mb": max(peak),
                    "stored_per_s": stored_rate,
                    "waiting_at_start": float(p.backlog),
                }
                for e, d in zip(empties, done.windows, strict=False)
            ]
        finally:
            await sims.aclose()

    async def latency(self, rate: int) -> None:
        """Open loop at ``rate`` single reports/s; accepted (the 202) → delivered (the store)."""
        p = self.plan
        folder = self.root / f"latency-{rate}"
        sims = await start_sims(folder / "sims")
        try:
            runs = []
            for r in range(p.repeats):
                gw = await start_gateway(folder / f"gateway-{r}", sims)
                prefix = f"l{rate}r{r}"
                n = int(rate * p.latency_seconds)
                try:
                    base = await sims.count("sd")
                    reports = [drive_report(prefix, i, 5000) for i in range(n)]
                    sent_at = time.time()
                    accepted = await offer(gw, reports, rate)
                    achieved = len(accepted) / max(
                        max(accepted.values(), default=0) - sent_at, 1e-9
                    )
                    await watch(lambda: sims.count("sd"), base, len(accepted), cap=p.cap)  # noqa: B023
                    found = delivered_times(gw.folder / "gateway.db", prefix)
                    now = time.time()
                finally:
                    await gw.aclose()
                late = [rid for rid in accepted if rid not in found]
                # not delivered yet: counted with the time waited so far (a lower bound)
                lat = sorted((found.get(rid, now) - at) * 1000 for rid, at in accepted.items())
                run: dict[str, float | None] = {
                    f"p{q}_ms": percentile(lat, q) for q in (50, 95, 99)
                }
                run["offered_per_s"] = float(rate)
                run["accepted_per_s"] = achieved  # below the offer when intake cannot keep up
                run["undelivered"] = float(len(late))
                run["refused"] = float(n - len(accepted))
                if late:
                    self.notes.append(
                        f"latency {rate}/s run {r}: {len(late)} of {n} not delivered within "
                        f"{p.cap:g} s after the last was offered (counted as a lower bound)"
                    )
                runs.append(run)
                self.say(f"latency {rate}/s run {r}: {rates(run)}")
            self.scenarios[f"latency_{rate}"] = runs
        finally:
            await sims.aclose()

    async def peers(self) -> None:
        """Per run and system, on fresh databases: store N, deliver them to the same SD simulator."""
        p = self.plan
        folder = self.root / "peers"
        sims = await start_sims(folder / "sims")
        runs: list[dict[str, float | None]] = []
        try:
            for r in range(p.repeats):
                run: dict[str, float | None] = {}
                for system in ("outbox", "procrastinate"):
                    run[system] = await self.peer(system, r, sims, folder)
                for system, store, processes in (
                    ("gateway_sqlite", "sqlite", 1),
                    ("gateway_pg1", "pg", 1),
                    ("gateway_pg2", "pg", 2),
                ):
                    run[system] = await self.gateway_peer(system, r, sims, folder, store, processes)
                runs.append(run)
                self.say(f"peers run {r}: {rates(run)}")
            self.scenarios["peers"] = runs
        finally:
            await sims.aclose()

    async def peer(self, system: str, r: int, sims: Sims, folder: Path) -> float:
        p = self.plan
        module = {
            "outbox": "bench.peers.outbox",
            "procrastinate": "bench.peers.procrastinate_peer",
        }[system]
        log = folder / f"{system}.log"
        async with pg_database(f"bench_{os.getpid()}_{system}") as url:
            extra = {
                "BENCH_SD_URL": sims.sd_url,
                "BENCH_SD_USER": SD_USER,
                "BENCH_SD_PASSWORD": SD_PASSWORD,
                "BENCH_PG_DSN": url,
            }
            dsn = ["--dsn", url] if system == "outbox" else []
            steps = [["schema"]] if system == "procrastinate" else []
            steps.append(
                ["store", *dsn, "--count", str(p.peer_reports), "--prefix", f"{system}{r}"]
            )
            for step in steps:
                proc = await Proc(
                    f"{system} {step[0]}", [PY, "-m", module, *step], log, folder, **extra
                ).start()
                if await proc.wait(300) != 0:
                    raise RuntimeError(f"{system} {step[0]} failed: {proc.tail()}")
            base = await sims.count("sd")
            worker = await Proc(
                f"{system} worker", [PY, "-m", module, "work", *dsn], log, folder, **extra
            ).start()
            try:
                done = await watch(lambda: sims.count("sd"), base, p.peer_reports, cap=p.cap)
            finally:
                await worker.stop()
        if not done.complete:
            self.notes.append(
                f"peers run {r}: {system} delivered {done.count} of {p.peer_reports} within the {p.cap:g} s cap"
            )
        return done.rate

    async def gateway_peer(
        self, system: str, r: int, sims: Sims, folder: Path, store: str, processes: int
    ) -> float:
        p = self.plan
        reports = [drive_report(f"{system}{r}", i, 1000) for i in range(p.peer_reports)]
        async with contextlib.AsyncExitStack() as stack:
            url = "sqlite:///gateway.db"
            if store == "pg":
                url = await stack.enter_async_context(pg_database(f"bench_{os.getpid()}_{system}"))
            gw = await start_gateway(folder / f"{system}-{r}", sims, url, processes)
            stack.push_async_callback(gw.aclose)
            await gw.control("pause")
            await self.store_paused(gw, reports)
            done = await self.drain(gw, sims, len(reports), cap=p.cap)
        if not done.complete:
            self.notes.append(
                f"peers run {r}: {system} delivered {done.count} of {p.peer_reports} within the {p.cap:g} s cap"
            )
        return done.rate

    async def profile(self) -> None:
        """py-spy on the gateway, not in a timed run: while it delivers a stored batch to SD
        (the delivery path), and while wrk and batch posts load its intake (SD paused)."""
        p = self.plan
        folder = self.root / "profile"
        sims = await start_sims(folder / "sims")
        try:
            gw = await start_gateway(folder / "delivery", sims)
            try:
                await gw.control("pause")
                reports = [drive_report("p", i, 1000) for i in range(p.profile_reports)]
                await self.store_paused(gw, reports)
                async with self.spy("delivery", gw, folder):
                    await self.drain(gw, sims, p.profile_reports, cap=p.cap)
            finally:
                await gw.aclose()
            gw = await start_gateway(folder / "intake", sims)
            try:
                await gw.control("pause")
                reports = [drive_report("pb", i, 1000) for i in range(p.batch_reports // 2)]
                async with self.spy("intake", gw, folder):
                    await run_wrk(gw.url, p.wrk_seconds, 64, "pi", 0)
                    await self.store_paused(gw, reports, workers=2)
            finally:
                await gw.aclose()
        finally:
            await sims.aclose()

    @contextlib.asynccontextmanager
    async def spy(self, name: str, gw: Gateway, folder: Path) -> Any:
        """Record the gateway's process with py-spy (all threads, 200 Hz) around the block."""
        spy = shutil.which("py-spy") or str(Path(PY).parent / "py-spy")
        if not Path(spy).exists():
            raise RuntimeError("py-spy is not installed (make bench installs the bench extra)")
        raw = folder / f"{name}.collapsed"
        args = ["record", "--pid", str(gw.procs[0].pid), "--rate", "200", "--format", "raw"]
        recorder = await Proc(
            "py-spy",
            [spy, *args, "--output", str(raw), "--nonblocking"],
            folder / f"py-spy-{name}.log",
            folder,
        ).start()
        await asyncio.sleep(1.0)  # attached
        yield
        assert recorder.proc is not None
        recorder.proc.send_signal(signal.SIGINT)
        await recorder.wait(60)
        text = raw.read_text() if raw.exists() else ""
        if not text:
            raise RuntimeError(f"py-spy wrote nothing: {recorder.tail()}")
        self.profile_raw[name] = text
        self.profiles[name] = costs = figures.top_costs(text, 15)
        costs["top_three"] = figures.top_three(costs)
        self.say(f"profile of {name}: " + "; ".join(costs["top_three"]))


def rates(run: dict[str, float | None]) -> str:
    return ", ".join(f"{k} {v:,.1f}" for k, v in run.items() if v is not None)


async def offer(gw: Gateway, reports: Sequence[dict[str, Any]], rate: int) -> dict[str, float]:
    """Open loop: report i is sent at ``i / rate`` s; the wall-clock time of each 202."""
    accepted: dict[str, float] = {}
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    bodies = [(r["report_id"], json.dumps(r).encode()) for r in reports]
    assert gw.session is not None
    session = gw.session

    async def send(rid: str, body: bytes) -> None:
        async with session.post(gw.url, data=body, headers=headers) as resp:
            await resp.read()
            if resp.status in (200, 202):
                accepted[rid] = time.time()

    tasks = []
    started = time.monotonic()
    for i, (rid, body) in enumerate(bodies):
        delay = started + i / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(send(rid, body)))
    await asyncio.gather(*tasks)
    return accepted


def delivered_times(db: Path, prefix: str) -> dict[str, float]:
    """report_id → when its delivery became delivered (the gateway's SQLite, read-only)."""
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)) as conn:
        rows = conn.execute(
            "SELECT r.report_id, d.updated_at FROM deliveries d JOIN reports r ON d.report_pk = r.id"
            " WHERE d.status = 'delivered' AND r.report_id LIKE ?",
            (f"{prefix}-%",),
        ).fetchall()
    return {rid: at for rid, at in rows}


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile of sorted ``values``."""
    if not values:
        return None
    k = max(0, min(len(values) - 1, math.ceil(q / 100 * len(values)) - 1))
    return float(values[k])


# ---------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    def git(*args: str) -> str:
        try:
            return subprocess.run(
                ["git", *args], cwd=REPO, capture_output=True, text=True, check=True
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return "unknown"

    cpu = "unknown"
    with contextlib.suppress(OSError):
        cpu = next(
            (
                ln.split(":", 1)[1].strip()
                for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")
            ),
            "unknown",
        )
    return {
        "cores": os.cpu_count(),
        "cpu": cpu,
        "load_average": os.getloadavg(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
    }


def chart(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs = {f["key"]: f for f in doc["figures"]}
    fig, axes = plt.subplots(1, 3, figsize=(16, 6), gridspec_kw={"width_ratios": [3, 2, 1]})
    ax = axes[0]
    rows = [f for f in doc["figures"] if f["baseline_label"] and f["unit"].endswith("/s")]
    labels = [f["key"] for f in rows]
    ys = range(len(rows))
    ax.barh([y + 0.2 for y in ys], [f["value"] or 0 for f in rows], 0.4, label="gateway")
    ax.barh(
        [y - 0.2 for y in ys],
        [f["baseline"] or 0 for f in rows],
        0.4,
        label="ceiling / peer (same run)",
    )
    ax.set_yticks(
        list(ys),
        [
            f"{k}\n({f['ratio']:.2f}×)" if f["ratio"] else k
            for k, f in zip(labels, rows, strict=True)
        ],
        fontsize=8,
    )
    ax.set_xscale("log")
    ax.set_xlabel("per second (median of runs, log scale)")
    ax.legend(fontsize=8)
    ax.set_title("Throughput against ceiling and peers")
    ax = axes[1]
    lat = [k for k in figs if k.startswith("latency_")]
    ax.bar(range(len(lat)), [figs[k]["value"] or 0 for k in lat])
    ax.set_xticks(
        range(len(lat)), [k.removeprefix("latency_").replace("_", "\n") for k in lat], fontsize=8
    )
    ax.axhline(50, color="red", linestyle="--", label="target p99 at 1,000/s")
    ax.set_yscale("log")
    ax.set_ylabel("ms, accepted → delivered (log scale)")
    ax.legend(fontsize=8)
    ax.set_title("Latency")
    ax = axes[2]
    rss = [k for k in figs if k.startswith("rss_")]
    ax.bar(range(len(rss)), [figs[k]["value"] or 0 for k in rss])
    ax.set_xticks(range(len(rss)), [k.removeprefix("rss_") for k in rss], fontsize=8)
    ax.axhline(150, color="red", linestyle="--", label="target")
    ax.set_ylabel("MB")
    ax.legend(fontsize=8)
    ax.set_title("RSS")
    fig.suptitle(
        f"payroll-gateway make bench, {doc['date']} ({doc['mode']}, "
        f"{doc['machine']['cores']} cores, {doc['machine']['git_commit'][:10]})"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


README_START = "<!-- bench-table:start -->"
README_END = "<!-- bench-table:end -->"


def markdown(doc: dict[str, Any]) -> str:
    m = doc["machine"]
    lines = [
        f"Measured {doc['date']} ({doc['mode']} mode, {doc['seconds']:.0f} s) on {m['cores']} cores "
        f"({m['cpu']}), Python {m['python']}, commit `{m['git_commit'][:10]}`; each figure is the "
        "median of the runs in `bench/results/" + doc["date"] + ".json`, each ratio the median of "
        "ratios taken within one run.",
        "",
        figures.table(doc),
        "",
    ]
    for name, costs in (doc["profile"] or {}).items():
        what = {"delivery": "the delivery path", "intake": "intake"}.get(name, name)
        lines.append(
            f"Top three costs of {what} (py-spy, self time, "
            f"`bench/results/{doc['date']}-profile.txt`):"
        )
        lines += [f"{i}. {t}" for i, t in enumerate(costs.get("top_three", []), 1)]
        lines.append("")
    missed = figures.not_met(doc)
    if missed:
        lines.append("Targets not met in this run: " + "; ".join(missed) + ".")
    if doc["notes"]:
        lines += ["", "Measurements cut short by their time cap (rates are of what arrived):"]
        lines += [f"- {n}" for n in doc["notes"][:20]]
        if len(doc["notes"]) > 20:
            lines.append(f"- and {len(doc['notes']) - 20} more in the results JSON")
    if doc["errors"]:
        lines += ["", "Errors during the run:"]
        lines += [f"- {e}" for e in doc["errors"][:20]]
    return "\n".join(lines).rstrip() + "\n"


def write_readme(readme: Path, text: str) -> bool:
    """Replace what is between the bench markers; False when the markers are not there."""
    content = readme.read_text()
    if README_START not in content or README_END not in content:
        return False
    head, rest = content.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    readme.write_text(f"{head}{README_START}\n{text}{README_END}{tail}")
    return True


async def run(
    quick: bool, only: Sequence[str], out: Path, readme: bool, log: Callable[[str], None] = print
) -> dict[str, Any]:
    plan = QUICK if quick else FULL
    began = time.monotonic()
    date = datetime.now(UTC).strftime("%Y-%m-%dT%H%MZ")
    host = machine()  # the commit measured: taken before anything runs
    with tempfile.TemporaryDirectory(prefix="pgw-bench-") as tmp:
        bench = Bench(plan, Path(tmp), log=log)
        steps: list[tuple[str, Callable[[], Awaitable[None]]]] = [
            ("intake", bench.intake),
            ("e2e_sd", lambda: bench.e2e("sd")),
            ("e2e_kmd", lambda: bench.e2e("kmd")),
            ("backlog", bench.backlog),
            ("latency", lambda: _both_latencies(bench)),
            ("peers", bench.peers),
            ("profile", bench.profile),
        ]
        for name, step in steps:
            if only and name not in only:
                continue
            bench.say(f"{name} ...")
            try:
                await step()
            except Exception as exc:  # one broken scenario must not lose the others
                bench.errors.append(f"{name}: {exc.__class__.__name__}: {exc}")
                bench.say(f"{name} FAILED: {exc}")
        doc = figures.document(
            date=date,
            mode="quick" if quick else "full",
            machine=host,
            scenarios=bench.scenarios,
            profile=bench.profiles,
            seconds=time.monotonic() - began,
            errors=bench.errors,
            notes=bench.notes,
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{date}.json").write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    if bench.profiles:
        (out / f"{date}-profile.txt").write_text(
            "\n".join(f"## {k}\n\n{figures.profile_text(v)}" for k, v in bench.profiles.items())
        )
    for name, raw in bench.profile_raw.items():
        (out / f"{date}-profile-{name}.collapsed").write_text(figures.relative_paths(raw))
    text = markdown(doc)
    (out / f"{date}.md").write_text(text)
    try:
        chart(doc, out / f"{date}.png")
    except Exception as exc:  # the chart is an extra: the figures are in the JSON and table
        doc["errors"].append(f"chart: {exc}")
    if readme and not write_readme(REPO / "README.md", text):
        log("README.md has no bench markers: table not written there")
    log(text)
    return doc


async def _both_latencies(bench: Bench) -> None:
    await bench.latency(200)
    await bench.latency(1000)


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="one short run of each (about 2 minutes)"
    )
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        help="run only this scenario (intake, e2e_sd, e2e_kmd, backlog, latency, peers, profile)",
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument(
        "--no-readme", action="store_true", help="do not write the table into README.md"
    )
    args = parser.parse_args(argv)
    doc = asyncio.run(
        run(
            args.quick,
            args.only,
            args.out,
            readme=not args.no_readme and not args.quick and not args.only,
        )
    )
    return 1 if doc["errors"] else 0


if __name__ == "__main__":
    random.seed(12)
    sys.exit(main())
