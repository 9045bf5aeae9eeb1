"""Intake and delivery hot paths against their bare ceilings, in one run (issue 12).

- intake: ``CONNECTIONS`` clients post unique single reports for ``SECONDS`` to a gateway on
  SQLite whose SD route is closed (it stores, sends nothing), then the same load to a bare
  aiohttp handler (its own process, like the gateway) that parses the JSON and answers 202;
- end to end: a fresh gateway, SD open, batches of 100 posted and the time until every
  delivery is final, against an aiohttp client posting one prebuilt envelope to the same SD
  simulator (the raw client ceiling);
- the pure pieces, timed in-process: intake validation and the SD/KMD envelope build.

``python -m bench.profile_hotpaths [seconds]``; loopback only, bounded in count and time.
With ``PROFILE_GATEWAY=path`` (intake) or ``PROFILE_E2E=path`` (end to end) that phase's
gateway is sampled by ``py-spy record`` (installed beside this Python or on PATH; as root)
and the raw stacks are written there.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import random
import shutil
import sys
import tempfile
import time
import timeit
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from bench.reliability import (
    HOST,
    KEYS,
    SD_PASSWORD,
    SD_USER,
    GatewayProcess,
    free_port,
    make_reports,
    start_gateway,
    start_simulators,
    wait_settled,
    write_config,
)
from bench.throughput import closed_window

CONNECTIONS = 64
SECONDS = 10.0
E2E_REPORTS = 3000
BATCH = 100


def _body(i: int) -> dict[str, Any]:
    return {
        "kind": "drive",
        "municipality": "746",
        "report_id": f"hp-{i:07d}",
        "version": 1,
        "employee": {"cpr": "0101901234", "employment_id": f"{10000 + i % 500:08d}"},
        "drive_date": f"2026-03-{1 + i % 28:02d}",
        "distance_km": f"{1 + i % 900}.{i % 100:02d}",
        "wage_code": "0201",
        "approved_by_cpr": "0202802345",
        "license_plate": "AB12345",
        "purpose": "Tilsyn hos borger",
    }


async def hammer(url: str, seconds: float, data: Any, headers: dict[str, str]) -> tuple[int, int]:
    """(answers 2xx, other answers) for ``CONNECTIONS`` clients over ``seconds``.

    ``data(i)`` gives the i-th body (bytes), so every request can be unique.
    """
    counter = itertools.count()
    ok = bad = 0
    deadline = time.monotonic() + seconds
    connector = aiohttp.TCPConnector(limit=CONNECTIONS)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            nonlocal ok, bad
            while time.monotonic() < deadline:
                async with session.post(url, data=data(next(counter)), headers=headers) as resp:
                    await resp.read()
                    if 200 <= resp.status < 300:
                        ok += 1
                    else:
                        bad += 1

        await asyncio.gather(*(worker() for _ in range(CONNECTIONS)))
    return ok, bad


def cpu_seconds(pid: int) -> float:
    """User + system CPU a process used so far (Linux ``/proc``; 0 elsewhere).

    CPU per request is steadier than requests per second on a shared, busy machine."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _bare_app() -> web.Application:
    async def handle(request: web.Request) -> web.Response:
        body = json.loads(await request.read())
        return web.json_response({"reports": [{"report_id": body["report_id"]}]}, status=202)

    app = web.Application()
    app.router.add_post("/v1/reports", handle)
    return app


async def _bare_process(port: int) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.profile_hotpaths", "--bare", str(port), cwd=str(Path.cwd())
    )
    for _ in range(200):
        try:
            _, writer = await asyncio.open_connection(HOST, port)
            writer.close()
            return proc
        except OSError:
            await asyncio.sleep(0.05)
    raise RuntimeError("the bare handler did not start")


async def _spy(
    gateway: GatewayProcess, variable: str, seconds: float
) -> asyncio.subprocess.Process | None:
    """``py-spy record`` of the gateway for ``seconds`` when ``variable`` names an output file."""
    flame = os.environ.get(variable)
    spy_bin = shutil.which("py-spy", path=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    if not flame or gateway.proc is None or spy_bin is None:
        return None
    return await asyncio.create_subprocess_exec(
        spy_bin, "record", "-p", str(gateway.proc.pid), "-o", flame,
        "-d", str(int(seconds)), "-f", "raw", "--nonblocking",
    )  # fmt: skip


async def intake(folder: Path, seconds: float) -> dict[str, float]:
    headers = {"Authorization": f"Bearer {KEYS['746']}", "Content-Type": "application/json"}
    sims = await start_simulators(folder, seed=7)
    port = free_port()
    gateway = GatewayProcess(
        write_config(folder, sims, port, opening_hours=closed_window()), folder / "gateway.log"
    )
    spy = None
    try:
        await start_gateway(gateway)
        spy = await _spy(gateway, "PROFILE_GATEWAY", seconds)
        assert gateway.proc is not None
        cpu = cpu_seconds(gateway.proc.pid)
        ok, bad = await hammer(
            f"http://{HOST}:{port}/v1/reports",
            seconds,
            lambda i: json.dumps(_body(i)).encode(),
            headers,
        )
        cpu = cpu_seconds(gateway.proc.pid) - cpu
        if spy is not None:
            await spy.wait()
    finally:
        await gateway.stop()
        await sims.aclose()
    bare_port = free_port()
    bare = await _bare_process(bare_port)
    try:
        bare_cpu = cpu_seconds(bare.pid)
        bok, _ = await hammer(
            f"http://{HOST}:{bare_port}/v1/reports",
            seconds,
            lambda i: json.dumps(_body(i)).encode(),
            headers,
        )
        bare_cpu = cpu_seconds(bare.pid) - bare_cpu
    finally:
        bare.terminate()
        await bare.wait()
    return {
        "intake/s": ok / seconds,
        "intake errors": float(bad),
        "bare/s": bok / seconds,
        "intake / bare": ok / max(bok, 1),
        "intake cpu us/report": cpu / max(ok, 1) * 1e6,
        "bare cpu us/request": bare_cpu / max(bok, 1) * 1e6,
        "bare / intake cpu": (bare_cpu / max(bok, 1)) / max(cpu / max(ok, 1), 1e-9),
    }


async def end_to_end(folder: Path, seconds: float) -> dict[str, float]:
    sims = await start_simulators(folder, seed=8)
    port = free_port()
    gateway = GatewayProcess(write_config(folder, sims, port), folder / "gateway.log")
    reports = make_reports(E2E_REPORTS, "E", 0.0, random.Random(6))
    url = f"http://{HOST}:{port}/v1/reports"
    headers = {"Authorization": f"Bearer {KEYS['746']}", "Content-Type": "application/json"}
    try:
        await start_gateway(gateway)
        spy = await _spy(gateway, "PROFILE_E2E", seconds)
        assert gateway.proc is not None
        cpu = cpu_seconds(gateway.proc.pid)
        started = time.monotonic()
        batches = [
            json.dumps({"reports": [p.body() for p in reports[i : i + BATCH]]}).encode()
            for i in range(0, len(reports), BATCH)
        ]
        async with aiohttp.ClientSession() as session:
            for body in batches:
                async with session.post(url, data=body, headers=headers) as resp:
                    await resp.read()
        settled, _ = await wait_settled(folder / "gateway.db", 300, final_only=True)
        took = time.monotonic() - started
        cpu = cpu_seconds(gateway.proc.pid) - cpu
        if spy is not None:
            await spy.wait()
    finally:
        await gateway.stop()
    try:
        envelope = _prebuilt_envelope()
        auth = aiohttp.encode_basic_auth(SD_USER, SD_PASSWORD)
        sd_url = f"http://{HOST}:{sims.sd_port}/sdws/AnsaettelseKoerselOpret20170501"
        sd_headers = {"Content-Type": "text/xml; charset=utf-8", "Authorization": auth}
        raw_ok, _ = await hammer(sd_url, seconds / 2, lambda i: envelope, sd_headers)
    finally:
        await sims.aclose()
    return {
        "delivered/s": E2E_REPORTS / took if settled else 0.0,
        "raw client/s": raw_ok / (seconds / 2),
        "delivered / raw": (E2E_REPORTS / took) / max(raw_ok / (seconds / 2), 1),
        "e2e cpu us/report": cpu / E2E_REPORTS * 1e6,
    }


def _prebuilt_envelope() -> bytes:
    from adapters.base import Report, VendorSettings
    from adapters.sd_koersel import SdKoersel

    adapter = SdKoersel()
    report = Report.from_dict(_body(1))
    settings = VendorSettings(endpoint="http://x/", institution="XY")
    return adapter.render(report, adapter.plan(report, [], settings).messages[0], settings).body


def pure_pieces() -> dict[str, float]:
    """Microseconds per call, best of 3."""
    from adapters.base import Report, VendorSettings
    from adapters.kmd_absence import KmdAbsence
    from adapters.sd_koersel import SdKoersel
    from gateway.validation import validate_report

    def best(func: Any, number: int) -> float:
        return min(timeit.repeat(func, number=number, repeat=3)) / number * 1e6

    drive = _body(3)
    sd, kmd = SdKoersel(), KmdAbsence()
    settings = VendorSettings(endpoint="http://x/", institution="XY")
    report = Report.from_dict(drive)
    message = sd.plan(report, [], settings).messages[0]
    vacation = Report.from_dict(
        {
            "kind": "vacation",
            "municipality": "746",
            "report_id": "v-1",
            "employee": {"cpr": "0101901234", "employment_id": "00001234"},
            "start_date": "2026-07-06",
            "end_date": "2026-07-10",
            "start_time": "12:00",
            "vacation_type": "regular",
        }
    )
    absence = kmd.plan(vacation, [], settings).messages[0]
    return {
        "validate_report us": best(lambda: validate_report(drive), 2000),
        "sd render us": best(lambda: sd.render(report, message, settings), 1000),
        "kmd render us": best(lambda: kmd.render(vacation, absence, settings), 1000),
    }


async def measure(seconds: float) -> dict[str, float]:
    result = pure_pieces()
    with tempfile.TemporaryDirectory(prefix="pgw-hotpaths-") as tmp:
        for name, phase in (("intake", intake), ("e2e", end_to_end)):
            folder = Path(tmp) / name
            folder.mkdir()
            result.update(await phase(folder, seconds))
    return result


def main() -> int:
    if sys.argv[1:2] == ["--bare"]:
        web.run_app(_bare_app(), host=HOST, port=int(sys.argv[2]), print=None)
        return 0
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else SECONDS
    for name, value in asyncio.run(measure(seconds)).items():
        print(f"{name:24s} {value:10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
