"""Logs through the configured handler: JSON lines, a request id in each, delivery fields on
delivery lines, no CPR number anywhere; the level comes from [logging] in the config."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway import logs
from gateway.errors import ConfigError
from gateway.settings import load
from tests.conftest import KEY_746, KEY_840, OPS_TOKEN, SD_PASSWORD, Gateway, drive

# a 10-digit word (not digits inside a made-up hex request id)
CPR = re.compile(r"\b\d{10}\b")


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """The root logger routed to a buffer through ``logs.configure``; put back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    buffer = io.StringIO()
    logs.configure("INFO", stream=buffer)
    yield buffer
    root.handlers[:] = handlers
    root.setLevel(level)


async def test_a_small_scenario_logs_json_lines_without_cpr(
    gateway: Gateway, captured: io.StringIO
) -> None:
    ok = drive(report_id="L-1")
    status, _ = await gateway.post(ok, headers={"X-Request-ID": "req-ok-1"})
    assert status == 202
    failing = drive(report_id="L-2", version=1)
    failing["employee"]["employment_id"] = "00000000"  # SD answers "does not exist": failed
    assert (await gateway.post(failing))[0] == 202
    bad = drive(report_id="L-3")
    bad["distance_km"] = "far, says 0101901234"
    status, _ = await gateway.post(bad, headers={"X-Request-ID": "req-0101901234"})
    assert status == 422
    await gateway.wait_for("L-1", {"delivered"})
    await gateway.wait_for("L-2", {"failed"})
    await gateway.client.get("/v1/reports/746/L-1?x=0101901234", headers={"X-Request-ID": "q"})
    await gateway.dispatcher.drain()

    text = captured.getvalue()
    lines = [json.loads(line) for line in text.splitlines()]  # every line is one JSON object
    assert lines and all(
        {"time", "level", "logger", "message", "request_id"} <= set(x) for x in lines
    )
    assert not CPR.search(text), CPR.findall(text)
    assert "0101901234" not in text and "0202802345" not in text  # the scenario's CPRs

    access = [x for x in lines if x["logger"] == "gateway.access"]
    posted = [x for x in access if x["request_id"] == "req-ok-1"]
    assert posted and posted[0]["method"] == "POST" and posted[0]["path"] == "/v1/reports"
    assert posted[0]["status"] == 202 and posted[0]["duration_ms"] >= 0
    assert any(x["status"] == 422 for x in access)
    assert all("?" not in x["path"] for x in access)  # the query is never logged

    deliveries = [x for x in lines if x["logger"] == "gateway.dispatcher"]
    assert {x["message"].split()[-1] for x in deliveries} >= {"delivered"}
    assert any("failed" in x["message"] for x in deliveries)
    for line in deliveries:
        assert line["municipality"] == "746" and line["adapter"] == "sd-koersel"
        assert isinstance(line["delivery_id"], int)


def test_the_level_comes_from_the_config(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text('[logging]\nlevel = "warning"\n')
    assert load(config).log_level == "WARNING"
    config.write_text("")
    assert load(config).log_level == "INFO"
    config.write_text('[logging]\nlevel = "LOUD"\n')
    with pytest.raises(ConfigError) as info:
        load(config)
    assert str(info.value) == (
        "logging.level: 'LOUD' is not a log level (DEBUG, INFO, WARNING, ERROR, CRITICAL)"
    )
    assert "\n" not in str(info.value)


def test_extras_outside_the_field_list_are_not_written(captured: io.StringIO) -> None:
    logging.getLogger("gateway.test").warning(
        "pulled for %s", "0101901234", extra={"password": "hunter2", "municipality": "746"}
    )
    line = json.loads(captured.getvalue())
    assert line["municipality"] == "746" and "password" not in line
    assert "hunter2" not in captured.getvalue() and "0101901234" not in captured.getvalue()


async def test_a_full_scenario_carries_the_senders_request_id_and_no_secret(
    gateway: Gateway, captured: io.StringIO
) -> None:
    """Intake with X-Request-ID, a 422, a 409, a pause and resume through the ops API, a
    delivery to the SD simulator and a failure: every line JSON; each delivery's lines carry
    the request id its report came with; no CPR and no configured secret in the logs or in
    any answer of the ops API."""
    answers: list[str] = []
    status, paused = await gateway.ops("POST", "endpoints/746/sd-koersel/pause", {"reason": "x"})
    assert status == 200
    answers.append(json.dumps(paused))
    ok = drive(report_id="S-1")
    assert (await gateway.post(ok, headers={"X-Request-ID": "req-sender-ok"}))[0] == 202
    failing = drive(report_id="S-2")
    failing["employee"]["employment_id"] = "00000000"  # SD: "does not exist": failed
    assert (await gateway.post(failing, headers={"X-Request-ID": "req-sender-fail"}))[0] == 202
    bad = drive(report_id="S-3", distance_km="far")
    assert (await gateway.post(bad, headers={"X-Request-ID": "req-422"}))[0] == 422
    changed = drive(report_id="S-1", distance_km=99)
    assert (await gateway.post(changed, headers={"X-Request-ID": "req-409"}))[0] == 409
    status, resumed = await gateway.ops("POST", "endpoints/746/sd-koersel/resume", {"reason": "y"})
    assert status == 200
    answers.append(json.dumps(resumed))
    await gateway.wait_for("S-1", {"delivered"})
    await gateway.wait_for("S-2", {"failed"})
    await gateway.dispatcher.drain()

    status, listed = await gateway.ops("GET", "deliveries")
    assert status == 200
    ids = {d["report_id"]: d["id"] for d in listed["deliveries"]}
    answers.append(json.dumps(listed))
    for path in (
        f"deliveries/{ids['S-1']}",
        f"deliveries/{ids['S-2']}",
        f"deliveries/{ids['S-2']}/audit",
        "overview",
        "endpoints",
        "rejections",
    ):
        status, body = await gateway.ops("GET", path)
        assert status == 200, (path, body)
        answers.append(json.dumps(body))
    _, detail = await gateway.ops("GET", f"deliveries/{ids['S-1']}")
    assert detail["versions"][0]["request_id"] == "req-sender-ok"

    text = captured.getvalue()
    lines = [json.loads(line) for line in text.splitlines()]  # every line is one JSON object
    by_delivery: dict[int, set[str]] = {}
    for line in lines:
        if "delivery_id" in line:
            by_delivery.setdefault(line["delivery_id"], set()).add(line["request_id"])
    assert by_delivery[ids["S-1"]] == {"req-sender-ok"}
    assert by_delivery[ids["S-2"]] == {"req-sender-fail"}
    assert any(x.get("status") == 409 and x["request_id"] == "req-409" for x in lines)
    secrets = (KEY_746, KEY_840, OPS_TOKEN, SD_PASSWORD)
    for where, written in (("logs", text), *(("ops answer", a) for a in answers)):
        for cpr in ("0101901234", "0202802345"):  # the report's and the approver's
            assert cpr not in written and f"{cpr[:6]}-{cpr[6:]}" not in written, where
        assert not CPR.search(written), (where, CPR.findall(written))
        for secret in secrets:
            assert secret not in written, where
