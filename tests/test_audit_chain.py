"""The audit trail proves itself: tampering is found by ``audit verify``, a purge and a restart are not.

Each test runs on SQLite and PostgreSQL; the tampering is done with plain SQL, as someone
with write access to the database (but not the key or the anchor file) would.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import sqlite3
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestServer

from gateway import retention
from gateway.audit import (
    UNKEYED,
    Anchor,
    AuditSettings,
    anchor_path,
    event_hmac,
    legacy_hash,
    load_key,
    read_anchors,
)
from gateway.cli import main
from gateway.errors import ConfigError
from gateway.settings import Settings
from gateway.simulators.sd import STATE as SD_STATE

from .conftest import TEST_KEYS, Gateway, drive

MONTH = 31 * 24 * 3600.0


async def sql(url: str, statement: str, *params: Any) -> list[dict[str, Any]]:
    """Run one statement on the store behind the gateway's back (``?`` placeholders)."""
    if url.startswith("sqlite:///"):

        def run() -> list[dict[str, Any]]:
            conn = sqlite3.connect(url.removeprefix("sqlite:///"), isolation_level=None)
            conn.row_factory = sqlite3.Row
            try:
                return [dict(r) for r in conn.execute(statement, params).fetchall()]
            finally:
                conn.close()

        return await asyncio.to_thread(run)
    n = iter(range(1, 1000))
    conn = await asyncpg.connect(url)
    try:
        return [
            dict(r)
            for r in await conn.fetch(re.sub(r"\?", lambda _: f"${next(n)}", statement), *params)
        ]
    finally:
        await conn.close()


async def events(url: str) -> list[dict[str, Any]]:
    return await sql(url, "SELECT * FROM audit_events ORDER BY id")


def write_config(settings: Settings) -> Path:
    """The gateway's config for the CLI: its store, data dir (audit key, anchor) and data key
    (attempts are sealed by what their messages say, so verifying opens them)."""
    cfg = settings.data_dir / "audit.toml"
    (settings.data_dir / "data.key").write_text(TEST_KEYS.current.hex())
    cfg.write_text(
        f'[server]\ndata_dir = "{settings.data_dir}"\nstore = "{settings.store_url}"\n'
        '[privacy]\ndata_key_file = "data.key"\n'
    )
    return cfg


async def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = await asyncio.to_thread(main, list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


async def verify(settings: Settings, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    return await cli(capsys, "audit", "verify", "--config", str(write_config(settings)))


async def anchor(gateway: Gateway, settings: Settings) -> None:
    await Anchor(anchor_path(settings.audit, settings.data_dir), 1, gateway.store.audit_head).check(
        force=True
    )


async def delivered_trail(
    gateway: Gateway, sd_server: TestServer, settings: Settings
) -> list[dict[str, Any]]:
    """Two delivered reports (one after a retry), the head anchored: the trail to tamper with."""
    sd_server.app[SD_STATE].fail_next = 1
    await gateway.post(drive())
    await gateway.wait_for("R-1", {"delivered"})
    await gateway.post(
        drive(report_id="R-2", employee={"cpr": "0303701234", "employment_id": "00456"})
    )
    await gateway.wait_for("R-2", {"delivered"})
    await anchor(gateway, settings)
    return await events(settings.store_url)


async def swap(url: str, a: dict[str, Any], b: dict[str, Any]) -> None:
    cols = (
        "at",
        "actor",
        "event",
        "report_pk",
        "delivery_id",
        "detail",
        "prev_hash",
        "hash",
        "hmac",
    )
    for target, source in ((a, b), (b, a)):
        await sql(
            url,
            f"UPDATE audit_events SET {', '.join(f'{c} = ?' for c in cols)} WHERE id = ?",
            *(source[c] for c in cols),
            target["id"],
        )


async def rechain_without_key(url: str, evs: list[dict[str, Any]]) -> None:
    """What an attacker can do without the key: a fresh chain under a key of their own."""
    prev = ""
    for e in evs:
        detail = e["detail"].replace("sd-koersel", "kmd-absence")
        mac = event_hmac(
            UNKEYED,
            prev,
            e["id"],
            e["at"],
            e["actor"],
            e["event"],
            e["report_pk"],
            e["delivery_id"],
            detail,
        )
        await sql(
            url,
            "UPDATE audit_events SET detail = ?, prev_hash = ?, hmac = ? WHERE id = ?",
            detail,
            prev,
            mac,
            e["id"],
        )
        prev = mac


async def append_forged(url: str, evs: list[dict[str, Any]]) -> None:
    last = evs[-1]
    mac = event_hmac(
        UNKEYED,
        last["hmac"],
        last["id"] + 1,
        time.time(),
        "gateway",
        "delivery.cancelled",
        None,
        None,
        "{}",
    )
    await sql(
        url,
        "INSERT INTO audit_events (id, at, actor, event, report_pk, delivery_id, detail, prev_hash,"
        " hash, hmac) VALUES (?, ?, 'gateway', 'delivery.cancelled', NULL, NULL, '{}', ?, '', ?)",
        last["id"] + 1,
        time.time(),
        last["hmac"],
        mac,
    )


def sealing_event(evs: list[dict[str, Any]], attempt_id: int) -> int:
    return max(
        e["id"] for e in evs if json.loads(e["detail"]).get("attempt", {}).get("id") == attempt_id
    )


Tamper = Callable[[str, list[dict[str, Any]]], Any]
CASES: dict[str, tuple[Tamper, Callable[[list[dict[str, Any]]], int]]] = {
    "edited event": (
        lambda url, evs: sql(
            url, "UPDATE audit_events SET actor = 'someone else' WHERE id = ?", evs[2]["id"]
        ),
        lambda evs: evs[2]["id"],
    ),
    "deleted middle event": (
        lambda url, evs: sql(url, "DELETE FROM audit_events WHERE id = ?", evs[3]["id"]),
        lambda evs: evs[4]["id"],
    ),
    "deleted tail": (
        lambda url, evs: sql(url, "DELETE FROM audit_events WHERE id >= ?", evs[-3]["id"]),
        lambda evs: evs[-3]["id"],
    ),
    "deleted every event": (lambda url, evs: sql(url, "DELETE FROM audit_events"), lambda evs: 1),
    "swapped events": (lambda url, evs: swap(url, evs[2], evs[3]), lambda evs: evs[2]["id"]),
    "chain recomputed without the key": (rechain_without_key, lambda evs: evs[0]["id"]),
    "appended event": (append_forged, lambda evs: evs[-1]["id"] + 1),
    "edited attempt": (
        lambda url, evs: sql(
            url, "UPDATE attempts SET http_status = 200, outcome = 'delivered' WHERE id = 1"
        ),
        lambda evs: sealing_event(evs, 1),
    ),
    "edited attempt body": (
        lambda url, evs: sql(url, "UPDATE attempts SET response_body = 'ok' WHERE id = 2"),
        lambda evs: sealing_event(evs, 2),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
async def test_verify_reports_each_kind_of_tampering(
    case: str,
    gateway: Gateway,
    sd_server: TestServer,
    settings: Settings,
    capsys: pytest.CaptureFixture[str],
) -> None:
    evs = await delivered_trail(gateway, sd_server, settings)
    assert (await verify(settings, capsys))[0] == 0
    tamper, first_bad = CASES[case]
    await tamper(settings.store_url, evs)
    code, out, err = await verify(settings, capsys)
    assert code == 1 and out == "" and err.count("\n") == 1, (case, err)
    assert f"audit trail broken at event {first_bad(evs)}:" in err, (case, err)


async def test_every_state_change_and_attempt_is_in_the_chain(
    gateway: Gateway, sd_server: TestServer, settings: Settings
) -> None:
    evs = await delivered_trail(gateway, sd_server, settings)
    attempts = await sql(settings.store_url, "SELECT id FROM attempts ORDER BY id")
    sealed = {
        json.loads(e["detail"])["attempt"]["id"] for e in evs if e["event"].startswith("attempt.")
    }
    assert sealed == {a["id"] for a in attempts} and len(attempts) == 3
    assert [e["id"] for e in evs] == list(range(1, len(evs) + 1))  # no gaps: the HMAC covers the id


async def test_purge_keeps_the_chain_verifying_and_reports_readable(
    gateway: Gateway,
    sd_server: TestServer,
    settings: Settings,
    make_gateway: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    await delivered_trail(gateway, sd_server, settings)
    later = time.time() + 14 * MONTH
    preview = await retention.purge(gateway.store, settings, later, dry_run=True)
    assert (preview["versions"], preview["cprs"], preview["attempt_bodies"]) == (2, 2, 3)
    assert (
        len(await sql(settings.store_url, "SELECT * FROM report_cprs")) == 2
    )  # a dry run changes nothing
    assert (await retention.purge(gateway.store, settings, time.time()))[
        "versions"
    ] == 0  # not 13 months yet
    done = await retention.purge(gateway.store, settings, later)
    assert (done["versions"], done["cprs"], done["attempt_bodies"]) == (2, 2, 3)
    assert await sql(settings.store_url, "SELECT * FROM report_cprs") == []
    assert (
        await sql(
            settings.store_url,
            "SELECT id FROM attempts WHERE request_body IS NOT NULL OR response_body IS NOT NULL",
        )
        == []
    )
    status, view = await gateway.get("746", "R-1")
    assert status == 200 and view["purged"] is True and view["status"] == "delivered"
    assert view["versions"][0]["purged"] is True and "report" not in view["versions"][0]
    [purge_event] = [
        e for e in await events(settings.store_url) if e["event"] == "retention.purged"
    ]
    assert (
        json.loads(purge_event["detail"])["versions"] == 2 and purge_event["actor"] == "retention"
    )
    await anchor(gateway, settings)
    code, out, err = await verify(settings, capsys)
    assert code == 0 and "intact" in out, err

    await gateway.post(drive(report_id="R-3"))  # the gateway still takes and delivers new reports
    view = await gateway.wait_for("R-3", {"delivered"})
    assert view["purged"] is False and view["versions"][0]["report"]["distance_km"] == "12.50"
    await gateway.client.close()  # a restart: the head is anchored at shutdown
    again = await make_gateway(settings)
    await again.wait_for("R-3", {"delivered"})
    status, view = await again.get("746", "R-2")
    assert status == 200 and view["versions"][0]["purged"] is True
    code, out, err = await verify(settings, capsys)
    assert code == 0 and "intact" in out, err


async def test_a_purged_attempt_body_put_back_wrong_is_found(
    gateway: Gateway, sd_server: TestServer, settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    await delivered_trail(gateway, sd_server, settings)
    await retention.purge(gateway.store, settings, time.time() + 14 * MONTH)
    evs = await events(settings.store_url)
    await sql(settings.store_url, "UPDATE attempts SET response_body = 'forged' WHERE id = 3")
    code, _, err = await verify(settings, capsys)
    assert code == 1 and f"event {sealing_event(evs, 3)}:" in err


async def test_export_round_trips(
    gateway: Gateway, sd_server: TestServer, settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    evs = await delivered_trail(gateway, sd_server, settings)
    out_file = settings.data_dir / "export.jsonl"
    code, _, err = await cli(
        capsys,
        "audit",
        "export",
        "--config",
        str(write_config(settings)),
        "--from",
        "2000-01-01",
        "--to",
        "2100-01-01T00:00:00+01:00",
        "--out",
        str(out_file),
    )
    assert code == 0, err
    rows = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert [r["id"] for r in rows] == [e["id"] for e in evs]
    assert {"id", "time", "event", "actor", "delivery", "detail", "hmac"} <= set(rows[0])
    key = load_key(settings.audit, settings.data_dir, create=False)
    prev = ""
    for r in rows:  # an auditor with the key recomputes every HMAC from the export alone
        detail = json.dumps(r["detail"], sort_keys=True)
        assert r["prev_hmac"] == prev
        assert (
            event_hmac(
                key,
                prev,
                r["id"],
                r["at"],
                r["actor"],
                r["event"],
                r["report"],
                r["delivery"],
                detail,
            )
            == r["hmac"]
        )
        prev = r["hmac"]
    code, out, _ = await cli(
        capsys,
        "audit",
        "export",
        "--config",
        str(write_config(settings)),
        "--from",
        "2000-01-01",
        "--to",
        "2000-01-02",
    )
    assert code == 0 and out == ""
    code, _, err = await cli(
        capsys,
        "audit",
        "export",
        "--config",
        str(write_config(settings)),
        "--from",
        "yesterday",
        "--to",
        "2000-01-02",
    )
    assert code == 1 and "--from" in err


async def test_an_existing_chain_is_rechained_once_at_start(store_url: str, tmp_path: Path) -> None:
    from gateway.store import open_store

    store = open_store(store_url, keys=TEST_KEYS, audit_key=b"k" * 32)
    await store.open()
    await store.record_event("endpoint.paused", {"municipality": "746"}, 1.0)
    await store.record_event("endpoint.resumed", {"municipality": "746"}, 2.0)
    await store.aclose()
    prev = ""  # what a gateway before migration 7 left: an unkeyed chain, no HMAC, re-chain pending
    for e in await events(store_url):
        digest = legacy_hash(prev, e)
        await sql(
            store_url,
            "UPDATE audit_events SET prev_hash = ?, hash = ?, hmac = NULL WHERE id = ?",
            prev,
            digest,
            e["id"],
        )
        prev = digest
    await sql(store_url, "INSERT INTO audit_rechain (pending) VALUES (1)")
    store = open_store(store_url, keys=TEST_KEYS, audit_key=b"k" * 32)
    await store.open()
    await store.record_event("endpoint.paused", {"municipality": "840"}, 3.0)
    await store.aclose()
    store = open_store(store_url, keys=TEST_KEYS, audit_key=b"k" * 32)
    await store.open()  # the second start re-chains nothing
    try:
        chain = await store.audit_chain()
    finally:
        await store.aclose()
    from gateway.audit import verify_chain

    assert [e["event"] for e in chain] == [
        "endpoint.paused",
        "endpoint.resumed",
        "audit.rechained",
        "endpoint.paused",
    ]
    assert json.loads(chain[2]["detail"])["legacy_chain"] == "intact"
    assert verify_chain(chain, b"k" * 32) == (4, None)


def test_the_key_comes_from_env_or_file_or_is_generated_once(tmp_path: Path, caplog: Any) -> None:
    with pytest.raises(ConfigError, match="AUDIT_KEY"):
        load_key(AuditSettings(key_env="AUDIT_KEY"), tmp_path, env={})
    assert (
        load_key(AuditSettings(key_env="AUDIT_KEY"), tmp_path, env={"AUDIT_KEY": "s" * 20})
        == b"s" * 20
    )
    with pytest.raises(ConfigError, match="missing.key"):
        load_key(AuditSettings(key_file=tmp_path / "missing.key"), tmp_path)
    with pytest.raises(ConfigError, match="audit.key"):
        load_key(AuditSettings(), tmp_path, create=False)
    key = load_key(AuditSettings(), tmp_path)
    assert stat.S_IMODE((tmp_path / "audit.key").stat().st_mode) == 0o600
    assert load_key(AuditSettings(), tmp_path) == key
    assert key.decode() not in caplog.text and "generated a new audit key" in caplog.text
    assert hashlib.sha256(key).hexdigest() not in caplog.text


def test_cutoff_counts_calendar_months() -> None:
    from datetime import UTC, datetime

    now = datetime(2026, 3, 31, 12, tzinfo=UTC).timestamp()
    assert datetime.fromtimestamp(retention.cutoff(now, 13), UTC) == datetime(
        2025, 2, 28, 12, tzinfo=UTC
    )
    assert datetime.fromtimestamp(retention.cutoff(now, 1), UTC) == datetime(
        2026, 2, 28, 12, tzinfo=UTC
    )


async def test_rotation_then_purge_keep_reports_readable_and_the_chain_verifying(
    gateway: Gateway, sd_server: TestServer, settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    from gateway.audit import verify as verify_trail
    from gateway.privacy import DataKeys
    from gateway.store import open_store

    await delivered_trail(gateway, sd_server, settings)
    old = gateway.store.keys
    new = DataKeys(b"n" * 32, older=(old.current, *old.older))
    key = load_key(settings.audit, settings.data_dir, create=False)
    rotated = open_store(settings.store_url, keys=new, audit_key=key)
    await rotated.open()
    try:
        counts = await rotated.reseal(rotate=True)
        assert counts["attempts.message"] > 0 and counts["report_cprs"] == 2
        anchors = read_anchors(anchor_path(settings.audit, settings.data_dir))
        assert (
            verify_trail(await rotated.audit_chain(), await rotated.audit_attempts(), key, anchors)
            is None
        )
        view = await rotated.get_report("746", "R-1")
        assert view is not None and view["versions"][0]["report"]["distance_km"] == "12.50"
        await retention.purge(rotated, settings, time.time() + 14 * MONTH)
        assert (
            verify_trail(await rotated.audit_chain(), await rotated.audit_attempts(), key, anchors)
            is None
        )
        view = await rotated.get_report("746", "R-2")
        assert view is not None and view["versions"][0]["purged"] is True
    finally:
        await rotated.aclose()


async def test_a_failed_delivery_is_not_purged_and_can_still_be_replayed(
    gateway: Gateway, sd_server: TestServer, settings: Settings
) -> None:
    sd_server.app[SD_STATE].fault = "client"
    await gateway.post(drive())
    failed = await gateway.wait_for("R-1", {"failed"})
    done = await retention.purge(gateway.store, settings, time.time() + 14 * MONTH)
    assert done["versions"] == 0  # it still waits for an operator, who needs its data
    sd_server.app[SD_STATE].fault = None
    delivery_id = failed["deliveries"][0]["id"]
    status, _ = await gateway.ops(
        "POST", f"deliveries/{delivery_id}/replay", {"reason": "SD fixed"}
    )
    assert status == 200
    await gateway.wait_for("R-1", {"delivered"})
