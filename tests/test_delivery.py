"""End to end through the real HTTP API, the real SQLite store and the real SD simulator."""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import time
from decimal import Decimal
from typing import Any

import pytest
from aiohttp.test_utils import TestServer

from gateway.audit import verify_chain
from gateway.settings import RetryPolicy, Settings
from gateway.simulators.sd import STATE as SD_STATE
from gateway.store.sqlite import SQLiteStore
from tests.conftest import KEY_840, Gateway, drive, with_retry


def dead_lease(settings: Settings) -> float:
    """A dead process's lease: SQLite (one process) takes every lease back at start;
    PostgreSQL (several) only expired ones."""
    return 600 if settings.store_url.startswith("sqlite") else 0.2


def accepted(sd_server: TestServer) -> list[Any]:
    return sd_server.app[SD_STATE].accepted


async def test_happy_path_delivers_with_the_vendor_reference(
    gateway: Gateway, sd_server: TestServer
) -> None:
    status, _ = await gateway.post(drive())
    assert status == 202
    view = await gateway.wait_for("R-1", {"delivered"}, within=2)
    [registration] = accepted(sd_server)
    delivery = view["deliveries"][0]
    assert delivery["vendor_reference"] == registration.registrering_id
    assert registration.date.isoformat() == "2026-03-29"  # the DST Sunday, as written
    assert registration.km == Decimal("12.50") and registration.wage_code == "0201"
    [attempt] = delivery["attempts"]
    assert attempt["outcome"] == "delivered" and attempt["http_status"] == 200
    assert "0101901234" not in json.dumps(view) and "0202802345" not in json.dumps(view)


async def test_approver_cpr_is_sent_as_bruger(gateway: Gateway, sd_server: TestServer) -> None:
    await gateway.post(drive())
    await gateway.wait_for("R-1", {"delivered"})
    body = accepted(sd_server)[0].body.decode()
    assert "<ns0:BrugerIdentifikator>0202802345<" in body or ">0202802345</" in body
    assert "0101901234" not in body  # the employee's CPR is not part of SD's payload


async def test_idempotent_repost_delivers_once(gateway: Gateway, sd_server: TestServer) -> None:
    assert (await gateway.post(drive()))[0] == 202
    assert (await gateway.post(drive()))[0] == 200
    await gateway.wait_for("R-1", {"delivered"})
    assert (await gateway.post(drive()))[0] == 200
    assert len(accepted(sd_server)) == 1


async def test_optional_wage_code_is_a_second_call(gateway: Gateway, sd_server: TestServer) -> None:
    await gateway.post(drive(wage_code_optional="0202"))
    view = await gateway.wait_for("R-1", {"delivered"})
    codes = sorted(a.wage_code for a in accepted(sd_server))
    assert codes == ["0201", "0202"]
    refs = {a.registrering_id for a in accepted(sd_server)}
    assert set(view["deliveries"][0]["vendor_reference"].split(", ")) == refs


async def test_server_fault_is_retried_then_delivered(
    gateway: Gateway, sd_server: TestServer
) -> None:
    sd_server.app[SD_STATE].fail_next = 2
    await gateway.post(drive())
    view = await gateway.wait_for("R-1", {"delivered"}, within=5)
    outcomes = [a["outcome"] for a in view["deliveries"][0]["attempts"]]
    assert outcomes == ["retry", "retry", "delivered"]
    assert len(accepted(sd_server)) == 1


async def test_client_fault_fails_with_the_vendor_text(
    gateway: Gateway, sd_server: TestServer
) -> None:
    report = drive()
    report["employee"]["employment_id"] = "00000000"
    await gateway.post(report)
    view = await gateway.wait_for("R-1", {"failed"})
    delivery = view["deliveries"][0]
    assert "does not exist" in delivery["last_error"]
    assert [a["outcome"] for a in delivery["attempts"]] == ["failed"]
    assert accepted(sd_server) == []


async def test_invalid_payload_is_failed_and_never_sent(
    make_gateway: Any, settings: Settings, sd_server: TestServer
) -> None:
    # tenant 840 has no SD institution configured and the report names none
    gw = await make_gateway(settings)
    await gw.post(drive(municipality="840"), key=KEY_840)
    view = await gw.wait_for("R-1", {"failed"}, municipality="840", key=KEY_840)
    delivery = view["deliveries"][0]
    assert "not sent" in delivery["last_error"] and "nstitution" in delivery["last_error"]
    assert delivery["attempts"] == []
    assert sd_server.app[SD_STATE].received == 0


async def test_retry_policy_runs_out(
    make_gateway: Any, settings: Settings, sd_server: TestServer
) -> None:
    policy = RetryPolicy(
        first_delay=0.01, multiplier=1, cap=0.01, jitter=0, max_attempts=3, max_age=60
    )
    gw = await make_gateway(with_retry(settings, policy))
    sd_server.app[SD_STATE].fault = "server"
    await gw.post(drive())
    view = await gw.wait_for("R-1", {"failed"})
    delivery = view["deliveries"][0]
    assert len(delivery["attempts"]) == 3
    assert "retry policy exhausted after 3 attempts" in delivery["last_error"]


async def test_read_timeout_after_sending_is_in_doubt_not_retried(
    gateway: Gateway, sd_server: TestServer
) -> None:
    sd_server.app[SD_STATE].fault = "drop-after-apply"
    await gateway.post(drive())
    view = await gateway.wait_for("R-1", {"in_doubt"})
    assert len(accepted(sd_server)) == 1
    await gateway.dispatcher.drain()
    sd_server.app[SD_STATE].fault = None
    await asyncio.sleep(0.2)
    status, view = await gateway.get("746", "R-1")
    assert view["status"] == "in_doubt"  # SD cannot be asked: an operator decides, no blind resend
    assert len(accepted(sd_server)) == 1


async def test_restart_with_a_claimed_unfinished_delivery_delivers_once(
    make_gateway: Any, settings: Settings, sd_server: TestServer
) -> None:
    first = await make_gateway(settings, run_dispatcher=False)
    await first.post(drive())
    # a dispatcher claimed it and died before sending (its lease is still valid)
    jobs = await first.store.claim_due(
        time.time(), "dead-process", dead_lease(settings), 10, ["sd-koersel"], []
    )
    assert len(jobs) == 1
    await first.client.close()
    await asyncio.sleep(0.3)  # PostgreSQL: the dead process's lease has expired
    second = await make_gateway(settings)
    view = await second.wait_for("R-1", {"delivered"})
    assert len(accepted(sd_server)) == 1
    assert [a["outcome"] for a in view["deliveries"][0]["attempts"]] == ["delivered"]


async def test_restart_after_a_request_may_have_left_is_in_doubt(
    make_gateway: Any, settings: Settings, sd_server: TestServer
) -> None:
    from adapters.base import Message

    first = await make_gateway(settings, run_dispatcher=False)
    await first.post(drive())
    [job] = await first.store.claim_due(
        time.time(), "dead-process", dead_lease(settings), 10, ["sd-koersel"], []
    )
    await first.store.begin_attempt(
        job.delivery_id, Message("wage_code", "create"), "<masked/>", time.time()
    )
    await first.client.close()
    await asyncio.sleep(0.3)  # PostgreSQL: the dead process's lease has expired
    second = await make_gateway(settings)
    view = await second.wait_for("R-1", {"in_doubt"})
    assert "may have been on its way" in view["deliveries"][0]["last_error"]
    assert accepted(sd_server) == []  # never resent blindly


@pytest.mark.sqlite_only
async def test_a_failed_commit_never_answers_202(
    gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(self: SQLiteStore, conn: sqlite3.Connection) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(SQLiteStore, "_commit", refuse)
    status, problem = await gateway.post(drive())
    assert status == 503 and "nothing was accepted" in problem["detail"]
    monkeypatch.undo()
    assert (await gateway.get("746", "R-1"))[0] == 404  # rolled back: not stored


@pytest.mark.sqlite_only
async def test_a_stopped_writer_never_answers_202(gateway: Gateway) -> None:
    writer = gateway.store._writer_task
    writer.cancel()
    status, _ = await gateway.post(drive())
    assert status == 503


async def test_audit_trail_records_every_change_and_verifies(
    gateway: Gateway, sd_server: TestServer
) -> None:
    sd_server.app[SD_STATE].fail_next = 1
    await gateway.post(drive())
    await gateway.wait_for("R-1", {"delivered"})
    events = await gateway.store.audit_chain()
    names = [e["event"] for e in events]
    for expected in (
        "report.received",
        "delivery.queued",
        "attempt.retry",
        "delivery.retry_scheduled",
        "attempt.delivered",
        "delivery.delivered",
    ):
        assert expected in names
    key = gateway.store.audit_key
    assert verify_chain(events, key) == (len(events), None)
    assert verify_chain(events)[1] == events[0]["id"]  # another key does not verify
    tampered = [dict(e) for e in events]
    tampered[1]["detail"] = tampered[1]["detail"].replace("1", "2")
    assert verify_chain(tampered, key)[1] == tampered[1]["id"]


@pytest.mark.sqlite_only
async def test_no_cpr_in_logs_or_stored_attempts(
    gateway: Gateway, sd_server: TestServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    sd_server.app[SD_STATE].fault = "client"
    await gateway.post(drive())
    view = await gateway.wait_for("R-1", {"failed"})
    assert "0202802345" not in json.dumps(view)
    conn = sqlite3.connect(gateway.store.path)
    dump = "\n".join(conn.iterdump())
    conn.close()
    assert "0202802345" not in dump  # sealed in report_cprs (gateway.privacy)
    assert "0202802345" not in caplog.text


async def test_an_expired_lease_is_reclaimed_while_running(
    make_gateway: Any, settings: Settings, sd_server: TestServer
) -> None:
    """A task that died with the store leaves its lease; it is taken back once it expires."""
    from dataclasses import replace

    gw = await make_gateway(replace(settings, lease_seconds=4))
    await gw.ops("POST", "endpoints/746/sd-koersel/pause", {"reason": "hold still"})
    await gw.post(drive())
    [job] = await gw.store.claim_due(time.time(), "a-task-that-died", 0.01, 10, ["sd-koersel"], [])
    await gw.ops("POST", "endpoints/746/sd-koersel/resume", {"reason": "go"})
    view = await gw.wait_for("R-1", {"delivered"}, within=8)
    assert [a["outcome"] for a in view["deliveries"][0]["attempts"]] == ["delivered"]
    assert len(accepted(sd_server)) == 1
    events = [e["event"] for e in await gw.store.audit_chain()]
    assert "delivery.reclaimed" in events
