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
from tests.conftest import Gateway, drive

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
