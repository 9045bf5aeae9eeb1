"""``serve --role``: an intake process answers the API and sends nothing; a dispatch process
delivers what intake stored and serves only its health and metrics; ``all`` does both."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.settings import Settings
from tests.conftest import DRIVE, OPS_TOKEN, Gateway
from tests.test_cli import _demo_config, _free_port

REPO = Path(__file__).resolve().parent.parent
MakeGateway = Callable[..., Awaitable[Gateway]]


async def _status(gw: Gateway, path: str) -> int:
    resp = await gw.client.get(path, headers={"Authorization": f"Bearer {OPS_TOKEN}"})
    await resp.read()
    return resp.status


async def test_intake_stores_and_sends_nothing_then_dispatch_delivers(
    make_gateway: MakeGateway, settings: Settings
) -> None:
    intake = await make_gateway(settings, role="intake")
    status, _ = await intake.post(DRIVE)
    assert status == 202
    await asyncio.sleep(0.5)  # ten dispatcher polls: none runs in an intake process
    _, view = await intake.get("746", "R-1")
    assert view["status"] == "queued"
    assert {
        p: await _status(intake, p)
        for p in ("/healthz", "/metrics", "/openapi.json", "/v1/ops/deliveries")
    } == {"/healthz": 200, "/metrics": 200, "/openapi.json": 200, "/v1/ops/deliveries": 200}

    dispatch = await make_gateway(settings, role="dispatch")  # the same store, as on PostgreSQL
    await intake.wait_for("R-1", {"delivered"})
    served = {
        p: await _status(dispatch, p)
        for p in (
            "/healthz",
            "/readyz",
            "/metrics",
            "/v1/reports/746/R-1",
            "/openapi.json",
            "/v1/ops/deliveries",
        )
    }
    assert served == {
        "/healthz": 200,
        "/readyz": 200,
        "/metrics": 200,
        "/v1/reports/746/R-1": 404,
        "/openapi.json": 404,
        "/v1/ops/deliveries": 404,
    }
    resp = await dispatch.client.post("/v1/reports", json=DRIVE)
    assert resp.status in (404, 405)


async def test_all_is_the_default_and_does_both(
    make_gateway: MakeGateway, settings: Settings
) -> None:
    assert settings.role == "all"
    gw = await make_gateway(settings)
    assert (await gw.post(DRIVE))[0] == 202
    await gw.wait_for("R-1", {"delivered"})


def test_an_unknown_role_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "g.toml"
    config.write_text('[server]\nrole = "both"\n')
    assert main(["serve", "--config", str(config)]) == 1
    assert (
        capsys.readouterr().err
        == "payroll-gateway: server.role: 'both' is not a role (intake, dispatch or all)\n"
    )
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--config", str(config), "--role", "both"])
    assert exit_.value.code == 1


def test_serve_role_dispatch_answers_health_only(tmp_path: Path) -> None:
    """A real process: ``--role`` on the command line overrides ``[server] role`` of the file."""
    port = _free_port()
    config = _demo_config(tmp_path)
    config.write_text(config.read_text().replace("[server]\n", '[server]\nrole = "intake"\n', 1))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gateway",
            "serve",
            "--config",
            str(config),
            "--role",
            "dispatch",
            "--listen",
            f"127.0.0.1:{port}",
            "--store",
            f"sqlite:///{tmp_path / 'demo.db'}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None
        first = next(
            line for line in proc.stdout if line.startswith("payroll-gateway:") and "role" in line
        )
        assert "health at" in first and "role dispatch" in first, first
        base = f"http://127.0.0.1:{port}"
        with urllib.request.urlopen(f"{base}/healthz", timeout=10) as resp:
            assert resp.status == 200
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"{base}/v1/reports/746/x", timeout=10)
        assert err.value.code == 404
        err.value.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        if proc.stdout is not None:
            proc.stdout.close()
    assert proc.returncode == 0
