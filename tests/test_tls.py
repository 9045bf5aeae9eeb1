"""``serve`` with ``[server] tls_cert_file``/``tls_key_file`` answers over HTTPS only, with the
security headers (issue 10 item 7). A real process, with certificates from gateway.devcerts."""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from gateway.devcerts import ensure_dev_certs
from gateway.settings import hash_api_key
from tests.conftest import DRIVE
from tests.test_cli import _free_port

REPO = Path(__file__).resolve().parent.parent


def _config(tmp_path: Path, port: int) -> Path:
    certs = ensure_dev_certs(tmp_path / "certs")
    path = tmp_path / "gw.toml"
    path.write_text(
        f"""
[server]
listen = "127.0.0.1:{port}"
store = "sqlite:///gw.db"
tls_cert_file = "certs/{certs.server_cert.name}"
tls_key_file = "certs/{certs.server_key.name}"
role = "intake"
[tenants.746]
api_keys = [{{id = "tls12345", hash = "{hash_api_key("pgw_tls12345_secret")}"}}]
[tenants.746.routes]
drive = "sd-koersel"
[tenants.746.vendors.sd-koersel]
endpoint = "http://127.0.0.1:9/unused"
username = "SYx"
password_env = "PGW_TEST_SD_PW"
institution = "XY"
""",
        encoding="utf-8",
    )
    return path


def test_serve_answers_over_https_with_the_security_headers(tmp_path: Path) -> None:
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--config", str(_config(tmp_path, port))],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "PGW_TEST_SD_PW": "x"},
    )
    try:
        assert proc.stdout is not None
        # the banner, after the log lines before it (no data or audit key configured: one is
        # generated and logged)
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if "intake API at" in line or len(seen) > 20:
                break
        assert f"intake API at https://127.0.0.1:{port}/v1/reports" in seen[-1], seen
        context = ssl.create_default_context(cafile=str(tmp_path / "certs" / "ca.pem"))
        base = f"https://127.0.0.1:{port}"
        with urllib.request.urlopen(f"{base}/healthz", context=context, timeout=10) as resp:
            assert resp.status == 200
            assert resp.headers["X-Content-Type-Options"] == "nosniff"
            assert resp.headers["Content-Security-Policy"] == "default-src 'none'"
        report = urllib.request.Request(
            f"{base}/v1/reports",
            data=json.dumps(DRIVE).encode(),
            headers={
                "Authorization": "Bearer pgw_tls12345_secret",
                "Content-Type": "application/json",
            },
        )
        with urllib.request.urlopen(report, context=context, timeout=10) as resp:
            assert resp.status == 202
            assert resp.headers["Cache-Control"] == "no-store"
        with pytest.raises(OSError):  # plain HTTP is not answered (URLError or a closed connection)
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5).close()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        if proc.stdout is not None:
            proc.stdout.close()
