"""The OS2indberetning pull source: stored before acknowledged, invalid never acknowledged,
nothing delivered twice; against the real simulators, a real SQLite file and the real app."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from bench.reliability import GatewayProcess, free_port
from gateway.cli import main
from gateway.errors import ConfigError
from gateway.keys import APP_SOURCES
from gateway.settings import PullSource, Settings, load
from gateway.simulators import SimulatorOptions
from gateway.simulators import os2indberetning as os2_sim
from gateway.simulators.sd import STATE as SD_STATE
from gateway.sources import BACKOFF_CAP_SECONDS, next_pull_at
from tests.conftest import SD_PASSWORD, SD_USER, drive

REPO = Path(__file__).resolve().parent.parent
OS2_KEY = "os2-test-api-key-5f1c"
CPR = re.compile(r"(?<!\d)\d{10}(?!\d)")


def record(i: int, **changes: Any) -> dict[str, Any]:
    """An export record whose distance (1 km + i × 10 m) names it at the SD simulator."""
    base = {
        "Id": i,
        "CprNumber": "0101901234",
        "TFCode": "0201",
        "TFCodeOptional": None,
        "AccountNumber": "",
        "EmploymentId": f"1{i % 40:04d}",
        "DistanceMeters": 1000 + 10 * i,
        "DriveDate": "2026-03-29T00:00:00",
        "ExtraNumber": 0,
        "EmploymentType": 1,
        "InstituteCode": "XY",
        "ApprovedByCpr": "0202802345",
        "LicensePlate": "AB12345",
    }
    return {**base, **changes}


def km(i: int) -> str:
    return f"{(1000 + 10 * i) / 1000:.2f}"


async def wait_until(check: Callable[[], Any], within: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within} s: {what}")
        await asyncio.sleep(0.02)


@pytest.fixture
async def os2_server(aiohttp_server: Any) -> TestServer:
    server = await aiohttp_server(os2_sim.build_app(SimulatorOptions(api_key=OS2_KEY)))
    server.app[os2_sim.STATE].hang_seconds = 30.0
    return server


def os2(server: TestServer) -> os2_sim.Os2State:
    return server.app[os2_sim.STATE]


def with_source(settings: Settings, server: TestServer, **kw: Any) -> Settings:
    source = PullSource(
        **{
            "kind": "os2indberetning",
            "base_url": str(server.make_url("/api/")),
            "api_key": OS2_KEY,
            "interval_seconds": 0.05,
            "connect_timeout": 1.0,
            "read_timeout": 0.5,
            **kw,
        }
    )
    tenants = dict(settings.tenants)
    tenants["746"] = replace(tenants["746"], sources={"os2indberetning": source})
    return replace(settings, tenants=tenants)


async def audited(gw: Any, event: str, at_least: int, within: float = 5.0) -> list[dict[str, Any]]:
    """The audit events named ``event``, once there are at least ``at_least`` of them."""
    deadline = time.monotonic() + within
    while True:
        events = [e for e in await gw.store.audit_chain() if e["event"] == event]
        if len(events) >= at_least or time.monotonic() > deadline:
            assert len(events) >= at_least, f"{len(events)} {event} events"
            return events
        await asyncio.sleep(0.02)


def sd_kms(sd_server: TestServer) -> Counter[str]:
    return Counter(str(a.km) for a in sd_server.app[SD_STATE].accepted)


# -- integration ---------------------------------------------------------------------------


async def test_a_thousand_records_over_several_pulls_are_delivered_exactly_once(
    make_gateway: Any, settings: Settings, os2_server: TestServer, sd_server: TestServer
) -> None:
    state = os2(os2_server)
    state.page_size = 150
    state.add(record(i) for i in range(1, 601))
    await make_gateway(with_source(settings, os2_server))
    await wait_until(lambda: len(state.processed) == 600, 30, "the first 600 acknowledged")
    state.add(record(i) for i in range(601, 1001))
    await wait_until(lambda: len(state.processed) == 1000, 30, "all 1000 acknowledged")
    await wait_until(lambda: len(sd_server.app[SD_STATE].accepted) >= 1000, 90, "1000 at SD")
    await asyncio.sleep(0.3)
    assert sd_kms(sd_server) == Counter({km(i): 1 for i in range(1, 1001)})
    assert set(state.served.values()) == {1} and set(state.acked.values()) == {1}
    assert state.gets >= 8  # 150 per GET: several pulls


async def test_an_invalid_record_is_never_acknowledged_and_listed_once(
    make_gateway: Any,
    settings: Settings,
    os2_server: TestServer,
    sd_server: TestServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    state = os2(os2_server)
    state.add([record(1), record(2, DistanceMeters="far", TFCode="")])
    gw = await make_gateway(with_source(settings, os2_server))
    await wait_until(lambda: state.served[2] >= 4, 10, "record 2 pulled several times")
    assert state.processed == {1} and 2 not in state.acked
    status, body = await gw.ops("GET", "rejections?municipality=746")
    assert status == 200 and body["count"] == 1
    rejection = body["rejections"][0]
    assert rejection["record_id"] == "2" and rejection["kind"] == "invalid"
    assert rejection["source"] == "os2indberetning" and rejection["resolved_at"] is None
    assert {e["pointer"] for e in rejection["errors"]} == {"/DistanceMeters", "/TFCode"}
    assert rejection["times_seen"] >= 3 and rejection["first_seen_at"] <= rejection["last_seen_at"]
    assert not CPR.search(json.dumps(body))

    # changed but still invalid: validated again, listed again; then fixed: stored and acknowledged
    state.add([record(2, DistanceMeters="far")])
    await wait_until(lambda: state.served[2] >= 6, 10, "the changed record pulled")
    status, body = await gw.ops("GET", "rejections")
    assert (
        body["count"] == 2
        and [r["errors"][0]["pointer"] for r in body["rejections"]][0] == "/DistanceMeters"
    )
    state.add([record(2)])
    await wait_until(lambda: 2 in state.processed, 10, "the fixed record acknowledged")
    await gw.wait_for("2", {"delivered"})
    status, body = await gw.ops("GET", "rejections?unresolved=true")
    assert body["count"] == 0
    status, body = await gw.ops("GET", "rejections")
    assert body["count"] == 2 and all(r["resolved_at"] for r in body["rejections"])
    audit = [e for e in await gw.store.audit_chain() if e["event"] == "intake.rejected"]
    assert len(audit) == 2 and not CPR.search(json.dumps([e["detail"] for e in audit]))

    cfg = tmp_path / "cli.toml"
    cfg.write_text("")
    code = await asyncio.to_thread(
        main, ["rejections", "--config", str(cfg), "--store", settings.store_url]
    )
    out = capsys.readouterr().out
    assert code == 0 and "2 rejections" in out and "/DistanceMeters" in out and not CPR.search(out)


async def test_a_record_the_routes_vendor_cannot_take_is_a_rejection_with_its_reason(
    make_gateway: Any, settings: Settings, os2_server: TestServer, sd_server: TestServer
) -> None:
    state = os2(os2_server)
    state.add([record(1), record(2, ApprovedByCpr=None), record(3, TFCode="02\x0001")])
    gw = await make_gateway(with_source(settings, os2_server))
    await wait_until(lambda: state.served[3] >= 2, 10, "records pulled twice")
    assert state.processed == {1}
    _, body = await gw.ops("GET", "rejections?municipality=746")
    reasons = {r["record_id"]: r["errors"] for r in body["rejections"]}
    assert reasons["2"] == [{"pointer": "/ApprovedByCpr", "message": reasons["2"][0]["message"]}]
    assert "sd-koersel" in reasons["2"][0]["message"]
    assert [e["pointer"] for e in reasons["3"]] == ["/TFCode"] and "U+0000" in reasons["3"][0][
        "message"
    ]


async def test_a_changed_record_under_a_stored_id_is_a_conflict_not_acknowledged(
    make_gateway: Any, settings: Settings, os2_server: TestServer, sd_server: TestServer
) -> None:
    state = os2(os2_server)
    state.add([record(5)])
    gw = await make_gateway(with_source(settings, os2_server))
    await gw.wait_for("5", {"delivered"})
    # the first content's acknowledgement must have arrived, or it would mark the changed one processed
    await wait_until(lambda: 5 in state.processed, 10, "the first content acknowledged")
    state.add([record(5, DistanceMeters=99000)])
    await wait_until(lambda: state.served[5] >= 4, 10, "the changed record pulled again")
    status, body = await gw.ops("GET", "rejections?kind=conflict")
    assert body["count"] == 1 and body["rejections"][0]["errors"][0]["pointer"] == "/Id"
    assert state.acked[5] == 1 and 5 not in state.processed
    assert sd_kms(sd_server) == Counter({km(5): 1})


async def test_a_lost_acknowledgement_brings_duplicates_that_are_acknowledged_not_delivered_again(
    make_gateway: Any, settings: Settings, os2_server: TestServer, sd_server: TestServer
) -> None:
    state = os2(os2_server)
    state.fault = "ack-lost"
    state.add(record(i) for i in range(1, 21))
    gw = await make_gateway(with_source(settings, os2_server))
    await wait_until(lambda: state.ack_requests >= 2, 10, "acknowledgements tried")
    assert not state.processed
    await wait_until(lambda: len(sd_server.app[SD_STATE].accepted) >= 20, 20, "20 at SD")
    state.fault = None
    await wait_until(lambda: len(state.processed) == 20, 10, "all acknowledged in the end")
    await asyncio.sleep(0.3)
    assert sd_kms(sd_server) == Counter({km(i): 1 for i in range(1, 21)})
    assert min(state.served.values()) >= 2 and set(state.acked.values()) == {1}
    rows = await gw.store.list_deliveries({"municipality": "746"}, 100)
    assert len(rows) == 20 and {r["status"] for r in rows} == {"delivered"}
    failed = await audited(gw, "source.pull_failed", 1)
    assert all("AcknowledgeReportsProcessed" in e["detail"] for e in failed)
    assert (await gw.ops("GET", "rejections"))[1]["count"] == 0


@pytest.mark.parametrize("fault", ["server", "bad-json", "not-array", "timeout", "wrong-key"])
async def test_pull_failures_are_audited_and_retried_while_other_work_goes_on(
    fault: str, make_gateway: Any, settings: Settings, os2_server: TestServer, sd_server: TestServer
) -> None:
    state = os2(os2_server)
    state.add([record(1), record(2)])
    if fault == "wrong-key":
        state.api_key = "another-key"
    else:
        state.fault = fault
    gw = await make_gateway(with_source(settings, os2_server))
    assert (await gw.post(drive(report_id="pushed")))[0] == 202
    await gw.wait_for("pushed", {"delivered"})
    puller = gw.app[APP_SOURCES][0]
    await wait_until(lambda: puller.failures >= 2, 10, "two failed pulls")
    events = await audited(gw, "source.pull_failed", 2)
    assert "GetReportsToPayroll" in events[0]["detail"]
    assert OS2_KEY not in json.dumps(events, default=str)
    assert not state.processed
    state.fault, state.api_key = None, OS2_KEY
    await wait_until(lambda: state.processed == {1, 2}, 10, "pulled once the source recovered")
    await wait_until(lambda: puller.failures == 0, 5, "the failure count reset")


# -- settings -------------------------------------------------------------------------------


BASE = """
[tenants.746]
api_key_hashes = []
[tenants.746.routes]
drive = "sd-koersel"
[tenants.746.sources.os2indberetning]
"""


@pytest.mark.parametrize(
    ("lines", "error"),
    [
        (
            'base_url = "https://os2.example.dk/api/"\napi_key = "x"\ninterval_seconds = 60',
            "tenants.746.sources.os2indberetning.api_key: secrets are not accepted inline",
        ),
        (
            'base_url = "https://os2.example.dk/api/"\napi_key_file = "key"\ninterval_seconds = 60\nschedule = "* * * * *"',
            "tenants.746.sources.os2indberetning.interval_seconds: give either interval_seconds or schedule",
        ),
        (
            'base_url = "https://os2.example.dk/api/"\napi_key_file = "key"',
            "tenants.746.sources.os2indberetning.interval_seconds: give either interval_seconds or schedule",
        ),
        (
            'base_url = "os2.example.dk/api"\napi_key_file = "key"\ninterval_seconds = 60',
            "tenants.746.sources.os2indberetning.base_url: expected an http(s) URL",
        ),
        (
            'base_url = "https://os2.example.dk/api/"\napi_key_file = "key"\nschedule = "every minute"',
            "tenants.746.sources.os2indberetning.schedule: invalid cron expression",
        ),
        (
            'base_url = "https://os2.example.dk/api/"\napi_key_file = "missing"\ninterval_seconds = 60',
            "tenants.746.sources.os2indberetning.api_key_file: cannot read /",
        ),
        (
            'base_url = "https://os2.example.dk/api/"\napi_key_env = "NOPE_KEY"\ninterval_seconds = 60',
            "tenants.746.sources.os2indberetning.api_key_env: environment variable NOPE_KEY is not set",
        ),
        (
            'base_url = "https://os2.example.dk/api/"\napi_key_file = "key"\ninterval_seconds = 0',
            "tenants.746.sources.os2indberetning.interval_seconds: must be positive",
        ),
    ],
)
def test_source_settings_errors_are_one_line_naming_the_key(
    lines: str, error: str, tmp_path: Path
) -> None:
    (tmp_path / "key").write_text("k-123\n")
    cfg = tmp_path / "gw.toml"
    cfg.write_text(BASE + lines + "\n")
    with pytest.raises(ConfigError) as exc:
        load(cfg, env={})
    assert str(exc.value).startswith(error) and "\n" not in str(exc.value)
    assert "k-123" not in str(exc.value)


def test_source_settings_read_the_key_relative_to_the_file_and_never_show_it(
    tmp_path: Path,
) -> None:
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "os2-api-key").write_text("k-secret-789\n")
    cfg = tmp_path / "gw.toml"
    cfg.write_text(
        BASE + 'base_url = "https://os2.example.dk/api"\napi_key_file = "secrets/os2-api-key"\n'
        'schedule = "*/5 * * * *"\n'
    )
    source = load(cfg, env={}).tenants["746"].sources["os2indberetning"]
    assert source.api_key == "k-secret-789" and source.base_url == "https://os2.example.dk/api/"
    assert source.schedule == "*/5 * * * *" and source.interval_seconds is None
    assert "k-secret-789" not in repr(load(cfg, env={}))


def test_a_source_needs_a_drive_route(tmp_path: Path) -> None:
    cfg = tmp_path / "gw.toml"
    cfg.write_text(
        '[tenants.746.sources.os2indberetning]\nbase_url = "https://x.dk/"\napi_key_env = "K"\n'
        "interval_seconds = 60\n"
    )
    with pytest.raises(
        ConfigError, match=r"^tenants\.746\.sources\.os2indberetning: the tenant has no route"
    ):
        load(cfg, env={"K": "k"})


# -- the schedule (pure) ----------------------------------------------------------------------


def test_backoff_starts_at_the_interval_doubles_and_is_capped() -> None:
    source = PullSource("os2indberetning", "https://x.dk/", "k", interval_seconds=60)
    waits = [next_pull_at(source, 1000.0, n) - 1000.0 for n in range(12)]
    assert waits[:5] == [60, 60, 120, 240, 480]
    assert waits == sorted(waits[1:2] + waits[1:]) and max(waits) == BACKOFF_CAP_SECONDS
    slow = PullSource("os2indberetning", "https://x.dk/", "k", interval_seconds=3600)
    assert next_pull_at(slow, 0.0, 5) == 3600  # the cap never shortens a long interval


def test_a_cron_source_skips_ticks_while_backing_off() -> None:
    source = PullSource("os2indberetning", "https://x.dk/", "k", schedule="*/5 * * * *")
    now = 1_774_778_400.0 + 30  # 2026-03-29 10:00:30 UTC (12:00:30 in Copenhagen)
    assert next_pull_at(source, now, 0) == 1_774_778_400.0 + 300
    assert next_pull_at(source, now, 4) == 1_774_778_400.0 + 600  # backoff 480 s: the tick after it


# -- kill -9 between the commit and the acknowledgement -----------------------------------------


def _config(tmp_path: Path, sd: TestServer, os2_server: TestServer) -> Path:
    (tmp_path / "sd-password").write_text(SD_PASSWORD)
    (tmp_path / "os2-key").write_text(OS2_KEY)
    cfg = tmp_path / "gateway.toml"
    cfg.write_text(f"""
[server]
listen = "127.0.0.1:{free_port()}"
store = "sqlite:///gateway.db"
[dispatcher]
poll_seconds = 0.05
lease_seconds = 15
[retry]
first_delay_seconds = 0.05
cap_seconds = 0.5
jitter_seconds = 0
[tenants.746]
api_key_hashes = []
[tenants.746.routes]
drive = "sd-koersel"
[tenants.746.vendors.sd-koersel]
endpoint = "{sd.make_url("/sdws/AnsaettelseKoerselOpret20170501")}"
username = "{SD_USER}"
password_file = "sd-password"
institution = "XY"
connect_timeout_seconds = 1
read_timeout_seconds = 2
opening_hours = "always"
[tenants.746.sources.os2indberetning]
base_url = "{os2_server.make_url("/api/")}"
api_key_file = "os2-key"
interval_seconds = 0.1
read_timeout_seconds = 1
""")
    return cfg


def _stored(db: Path) -> tuple[int, int]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        reports = conn.execute("SELECT COUNT(*) FROM reports").fetchone()[0]
        delivered = conn.execute(
            "SELECT COUNT(*) FROM deliveries WHERE status = 'delivered'"
        ).fetchone()[0]
    return int(reports), int(delivered)


async def test_killed_between_commit_and_acknowledgement_nothing_is_delivered_twice(
    tmp_path: Path, os2_server: TestServer, sd_server: TestServer
) -> None:
    state = os2(os2_server)
    state.fault = "ack-hang"  # the commit happened; the acknowledgement never comes back
    state.add(record(i) for i in range(1, 51))
    gateway = GatewayProcess(_config(tmp_path, sd_server, os2_server), tmp_path / "gateway.log")
    await gateway.start()
    try:
        await asyncio.wait_for(state.ack_seen.wait(), 20)
        assert (
            _stored(tmp_path / "gateway.db")[0] == 50
        )  # committed before the acknowledgement was sent
        # delivered while the acknowledgement hangs: nothing is in flight when it is killed
        await wait_until(
            lambda: _stored(tmp_path / "gateway.db") == (50, 50), 30, "50 stored and delivered"
        )
        await gateway.kill()
        assert not state.processed and state.ack_requests == 1
        state.fault = None
        await gateway.start()
        await wait_until(
            lambda: len(state.processed) == 50, 20, "all acknowledged after the restart"
        )
        await asyncio.sleep(0.5)
        assert await gateway.stop() == 0
    finally:
        await gateway.kill()
    assert sd_kms(sd_server) == Counter({km(i): 1 for i in range(1, 51)})
    assert min(state.served.values()) == 2 and set(state.acked.values()) == {1}
    assert _stored(tmp_path / "gateway.db") == (50, 50)
    assert OS2_KEY not in (tmp_path / "gateway.log").read_text()


# -- the demo and the simulator's command line ---------------------------------------------------


def test_the_demo_pulls_746_from_its_built_in_simulator(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.test_cli import _request, running_demo

    with running_demo(tmp_path) as (port, store):
        deadline = time.monotonic() + 10
        views: dict[str, Any] = {}
        while time.monotonic() < deadline and len(views) < 3:
            for rid in ("7461", "7462", "7463"):
                try:
                    _, view = _request(f"http://127.0.0.1:{port}/v1/reports/746/{rid}")
                except urllib.error.HTTPError:
                    continue
                if view["status"] == "delivered":
                    views[rid] = view
            time.sleep(0.1)
        assert sorted(views) == ["7461", "7462", "7463"]
    assert main(["rejections", "--config", str(tmp_path / "demo.toml"), "--store", store]) == 0
    out = capsys.readouterr().out
    assert (
        "1 rejections" in out and "7464" in out and "/DistanceMeters" in out and not CPR.search(out)
    )


def test_simulate_os2indberetning_serves_with_the_api_key_only(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text("sim-key\n")
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gateway",
            "simulate",
            "os2indberetning",
            "--port",
            str(port),
            "--api-key-file",
            str(key),
            "--records",
            str(REPO / "examples" / "os2indberetning-pull-746.json"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
    )
    base = f"http://127.0.0.1:{port}/api/"
    try:
        assert proc.stdout is not None and "simulator os2indberetning" in proc.stdout.readline()

        def call(op: str, data: Any = None, api_key: str = "sim-key") -> tuple[int, Any]:
            body = None if data is None else json.dumps(data).encode()
            req = urllib.request.Request(base + op, data=body, headers={"ApiKey": api_key})
            for _ in range(50):
                try:
                    with urllib.request.urlopen(req, timeout=5) as resp:
                        return resp.status, json.loads(resp.read())
                except urllib.error.HTTPError as exc:
                    return exc.code, None
                except urllib.error.URLError:
                    time.sleep(0.1)  # not listening yet
            raise AssertionError("the simulator did not answer")

        assert call("GetReportsToPayroll", api_key="wrong")[0] == 401
        status, records = call("GetReportsToPayroll")
        assert status == 200 and len(records) == 4
        assert call("AcknowledgeReportsProcessed", [7461, 7463])[0] == 200
        assert [r.get("Id", r.get("id")) for r in call("GetReportsToPayroll")[1]] == [7462, 7464]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=15)
        if proc.stdout is not None:
            proc.stdout.close()


async def test_simulator_faults_apply_nothing(os2_server: TestServer) -> None:
    state = os2(os2_server)
    state.add([record(1)])
    async with aiohttp.ClientSession(headers={"ApiKey": OS2_KEY}) as http:
        base = str(os2_server.make_url("/api/"))
        state.fault = "server"
        async with http.post(base + "AcknowledgeReportsProcessed", json=[1]) as resp:
            assert resp.status == 500
        state.fault = "ack-lost"
        with pytest.raises(aiohttp.ServerDisconnectedError):
            async with http.post(base + "AcknowledgeReportsProcessed", json=[1]) as resp:
                await resp.read()
        assert not state.processed
        state.fault = "not-array"
        async with http.get(base + "GetReportsToPayroll") as resp:
            assert isinstance(await resp.json(), dict)
        state.fault = None
        async with http.post(base + "AcknowledgeReportsProcessed", json=["1"]) as resp:
            assert resp.status == 400
        async with http.post(base + "AcknowledgeReportsProcessed", json=[1]) as resp:
            assert resp.status == 200 and state.processed == {1}


async def test_pulled_reports_keep_the_id_of_their_pull(
    make_gateway: Any, settings: Settings, os2_server: TestServer, sd_server: TestServer
) -> None:
    """A pull has a correlation id of its own (no sender's X-Request-ID): stored with each
    report it took, and carried by the log lines of their deliveries."""
    state = os2(os2_server)
    state.page_size = 2
    state.add(record(i) for i in range(1, 5))
    gw = await make_gateway(with_source(settings, os2_server))
    await wait_until(lambda: len(state.processed) == 4, 10, "all 4 acknowledged")
    rows = await gw.store.list_deliveries({"municipality": "746"}, 10)
    pulls = []
    for row in rows:
        detail = await gw.store.delivery_detail(row["id"])
        pulls.append(detail["versions"][0]["request_id"])
    assert len(pulls) == 4 and all(re.fullmatch(r"pull-[0-9a-f]{32}", p) for p in pulls)
    assert len(set(pulls)) == 2  # two records per GET: two pulls, one id each
