"""The command line: dry runs, keys, one-line errors with exit code 1, and the demo end to end."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from gateway.cli import main
from gateway.settings import hash_api_key
from tests.conftest import TEST_KEYS, drive

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "examples" / "report-drive-746.json"


def test_render_writes_numbered_payloads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = json.loads(SAMPLE.read_text())
    report["wage_code_optional"] = "0202"
    report["employee"]["institution"] = "XY"
    src = tmp_path / "r.json"
    src.write_text(json.dumps([report]))
    assert main(["render", "sd-koersel", str(src), "--out", str(tmp_path / "out")]) == 0
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == ["0001.xml", "0002.xml"]
    first = (tmp_path / "out" / "0001.xml").read_text()
    assert (
        "<ns0:KoerselDato>2026-10-25</ns0:KoerselDato>" in first.replace("ns1:", "ns0:")
        or "2026-10-25" in first
    )
    assert "42.30" in first


def test_render_with_config_takes_the_tenants_institution(tmp_path: Path) -> None:
    assert (
        main(
            [
                "render",
                "sd-koersel",
                str(SAMPLE),
                "--config",
                str(REPO / "examples/demo.toml"),
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    assert "XY" in (tmp_path / "0001.xml").read_text()


def test_render_bad_input_is_one_line_and_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = json.loads(SAMPLE.read_text())
    report["distance_km"] = "1.234"
    src = tmp_path / "bad.json"
    src.write_text(json.dumps(report))
    assert main(["render", "sd-koersel", str(src)]) == 1
    err = capsys.readouterr().err
    assert (
        err.count("\n") == 1
        and "/distance_km: does not have the required format: a decimal number with at most 2 decimals"
        in err
    )
    assert "0101900000" not in err


def test_render_without_institution_fails_clearly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["render", "sd-koersel", str(SAMPLE), "--out", str(tmp_path)]) == 1
    assert "nstitution" in capsys.readouterr().err


def test_render_unknown_adapter_and_missing_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["render", "nope", str(SAMPLE)]) == 1
    assert "unknown adapter 'nope'" in capsys.readouterr().err
    assert main(["render", "sd-koersel", "does-not-exist.json"]) == 1
    assert "No such file" in capsys.readouterr().err


def test_keys_create_prints_a_key_and_its_hash(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keys", "create"]) == 0
    out = capsys.readouterr().out
    key = out.split("): ")[1].split()[0]
    assert hash_api_key(key) in out


def test_serve_with_a_bad_config_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "gw.toml"
    cfg.write_text('[tenants.746.routes]\ndrive = "sd"\n')
    assert main(["serve", "--config", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(
        "payroll-gateway: tenants.746.routes.drive: unknown or disabled adapter 'sd'"
    )
    assert err.count("\n") == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _request(
    url: str,
    data: bytes | None = None,
    key: str = "demo-key-746",
    headers: dict[str, str] | None = None,
) -> tuple[int, dict]:
    req = urllib.request.Request(
        url,
        data=data,
        headers={
            "Authorization": f"Bearer {key}",
            "Content-Type": "application/json",
            **(headers or {}),
        },
    )
    with urllib.request.urlopen(req, timeout=15) as resp:
        body = json.loads(resp.read())
        if headers:
            body["_headers"] = dict(resp.headers)
        return resp.status, body


def _demo_config(tmp_path: Path) -> Path:
    """examples/demo.toml with free simulator ports, so a running demo does not collide."""
    text = (REPO / "examples/demo.toml").read_text()
    for fixed in ("8701", "8702", "8703", "8704"):
        text = text.replace(fixed, str(_free_port()))
    text = text.replace('"secrets/', f'"{REPO / "examples" / "secrets"}/').replace(
        '"../.demo', f'"{tmp_path}'
    )
    text = text.replace('"os2indberetning-', f'"{REPO / "examples"}/os2indberetning-')
    path = tmp_path / "demo.toml"
    path.write_text(text)
    return path


@contextlib.contextmanager
def running_demo(tmp_path: Path) -> Iterator[tuple[int, str]]:
    """The demo as `make run` starts it (free ports, store in tmp_path): yields its port and
    store URL once it listens; stopped with SIGTERM afterwards, which must exit 0."""
    port, store = _free_port(), f"sqlite:///{tmp_path / 'demo.db'}"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gateway",
            "serve",
            "--config",
            str(_demo_config(tmp_path)),
            "--listen",
            f"127.0.0.1:{port}",
            "--store",
            store,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if "intake API at" in line:
                break
        yield port, store
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=15)
        if proc.stdout is not None:
            proc.stdout.close()
    assert code == 0


def test_demo_serves_and_delivers_within_two_seconds(tmp_path: Path) -> None:
    """What `make run` starts: the printed curl gets 202, then `delivered` within 2 s."""
    with running_demo(tmp_path) as (port, _):
        status, body = _request(f"http://127.0.0.1:{port}/v1/reports", SAMPLE.read_bytes())
        assert status == 202 and body["reports"][0]["status"] == "queued"
        deadline = time.monotonic() + 2
        while True:
            _, view = _request(f"http://127.0.0.1:{port}/v1/reports/746/demo-746-1")
            if view["status"] == "delivered" or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert view["status"] == "delivered"
        assert len(view["deliveries"][0]["vendor_reference"]) >= 32
        # the approver can wait for SD's answer: Prefer: wait=10 answers with it
        second = json.loads(SAMPLE.read_bytes())
        second["report_id"] = "demo-746-wait"
        status, body = _request(
            f"http://127.0.0.1:{port}/v1/reports",
            json.dumps(second).encode(),
            headers={"Prefer": "wait=10"},
        )
        [item] = body["reports"]
        assert status == 202 and item["status"] == "delivered"
        assert body["_headers"]["Preference-Applied"] == "wait=10"
        [delivery] = item["deliveries"]
        assert delivery["adapter"] == "sd-koersel" and len(delivery["vendor_reference"]) >= 32


CONFIG = """
[tenants.746]
api_key_hashes = []
[tenants.746.routes]
drive = "sd-koersel"
"""


async def test_operations_from_the_command_line(
    make_gateway: Any,
    settings: Any,
    sd_server: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from gateway.simulators.sd import STATE

    sd_server.app[STATE].fault = "client"
    gw = await make_gateway(settings)
    other = drive(report_id="C-2")
    other["employee"]["employment_id"] = "00124"
    await gw.post({"reports": [drive(report_id="C-1"), other]})
    await gw.wait_for("C-1", {"failed"})
    await gw.wait_for("C-2", {"failed"})
    await gw.client.close()
    cfg = tmp_path / "ops.toml"
    (tmp_path / "data.key").write_text(TEST_KEYS.current.hex())  # the gateway's own data key
    cfg.write_text(
        CONFIG
        + f'[server]\ndata_dir = "{settings.data_dir}"\n[privacy]\ndata_key_file = "data.key"\n'
    )
    base = ["--config", str(cfg), "--store", settings.store_url]

    def run(*argv: str) -> tuple[int, str, str]:
        code = main([*argv[:1], *base, *argv[1:]])
        out = capsys.readouterr()
        return code, out.out, out.err

    code, out, _ = await asyncio.to_thread(run, "deliveries", "--status", "failed")
    assert code == 0 and "C-1" in out and "C-2" in out and "2 deliveries" in out
    with pytest.raises(SystemExit) as exit_:
        await asyncio.to_thread(run, "replay", "--status", "failed")
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and err.count("\n") == 1 and "--reason" in err
    code, out, _ = await asyncio.to_thread(
        run, "cancel", "--report-id", "C-2", "--reason", "sent by hand", "--operator", "alice"
    )
    assert code == 0 and "1 changed" in out
    code, out, _ = await asyncio.to_thread(
        run, "replay", "--status", "failed", "--reason", "SD fixed"
    )
    assert code == 0 and "1 changed" in out
    code, out, _ = await asyncio.to_thread(run, "deliveries", "--json")
    rows = {json.loads(line)["report_id"]: json.loads(line) for line in out.splitlines()}
    assert rows["C-1"]["status"] == "queued" and rows["C-2"]["status"] == "cancelled"
    assert "alice" in rows["C-2"]["last_error"] and "sent by hand" in rows["C-2"]["last_error"]
    code, out, _ = await asyncio.to_thread(
        run,
        "pause",
        "--municipality",
        "746",
        "--adapter",
        "sd-koersel",
        "--reason",
        "SD maintenance",
    )
    assert code == 0 and "paused" in out
    code, _, err = await asyncio.to_thread(
        run, "pause", "--municipality", "999", "--adapter", "x", "--reason", "r"
    )
    assert code == 1 and "no route 999" in err
    code = await asyncio.to_thread(main, ["audit", "verify", *base])
    out = capsys.readouterr().out
    assert code == 0 and "intact" in out


def test_render_ind01_writes_one_file_and_the_console_masks_cpr(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sample = REPO / "examples" / "report-drive-851.json"
    assert main(["render", "kmd-ind01", str(sample), "--out", str(tmp_path)]) == 0
    lines = (tmp_path / "ind01.txt").read_text().splitlines()
    assert len(lines) == 2 and len(lines[1]) == 55 and lines[1].startswith("DA60851")
    assert (
        main(["render", "sd-koersel", str(SAMPLE), "--config", str(REPO / "examples/demo.toml")])
        == 0
    )
    out = capsys.readouterr().out
    assert "xxxxxx-xxxx" in out and "0202800000" not in out


def test_render_refuses_a_kind_the_adapter_does_not_deliver(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["render", "kmd-absence", str(SAMPLE)]) == 1
    assert "delivers vacation reports only" in capsys.readouterr().err


@pytest.mark.parametrize(
    "case", ["minimal", "full", "optional-wage-code", "dst-spring", "dst-autumn"]
)
def test_render_command_writes_the_golden_payloads(case: str, tmp_path: Path) -> None:
    """`payroll-gateway render` writes, file by file, the bodies the SD golden files hold."""
    from adapters.soap import body_payload, parse_xml
    from tests.adapters.test_sd_koersel import CASES, ENDPOINT, GOLDEN, REPORTS, canonical

    cfg = tmp_path / "render.toml"
    cfg.write_text(
        f'[tenants.746.vendors.sd-koersel]\nendpoint = "{ENDPOINT}"\ninstitution = "XY"\n'
    )
    out = tmp_path / "out"
    assert (
        main(
            [
                "render",
                "sd-koersel",
                str(REPORTS / CASES[case]),
                "--config",
                str(cfg),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    written = sorted(out.iterdir())
    goldens = sorted((GOLDEN / case).glob("*.xml"))
    assert [w.name for w in written] == [g.name for g in goldens]
    for w, g in zip(written, goldens, strict=True):
        payload = etree.tostring(body_payload(parse_xml(w.read_bytes())))
        assert canonical(payload) == canonical(g.read_bytes())


def test_store_from_the_file_is_relative_to_it_and_store_flag_to_the_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "run").mkdir()
    cfg = tmp_path / "etc" / "gw.toml"
    cfg.write_text('[server]\nstore = "sqlite:///from-file.db"\n' + CONFIG)
    monkeypatch.chdir(tmp_path / "run")
    assert main(["migrate", "--config", "../etc/gw.toml"]) == 0
    assert main(["migrate", "--config", "../etc/gw.toml", "--store", "sqlite:///from-flag.db"]) == 0
    assert sorted(p.name for p in tmp_path.rglob("*.db")) == ["from-file.db", "from-flag.db"]
    assert (tmp_path / "etc" / "from-file.db").is_file() and (
        tmp_path / "run" / "from-flag.db"
    ).is_file()


def test_keys_create_prints_a_key_with_its_id(capsys: pytest.CaptureFixture[str]) -> None:
    from gateway.settings import key_id_of

    assert main(["keys", "create"]) == 0
    out = capsys.readouterr().out
    key = out.split("): ")[1].split()[0]
    key_id = key_id_of(key)
    assert key_id is not None
    assert f'api_keys = [{{id = "{key_id}", hash = "{hash_api_key(key)}"}}]' in out


def test_keys_list_and_revoke_show_ids_never_secrets(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _demo_config(tmp_path)
    secret = "pgw_0a0b0c0d_the-secret"
    text = cfg.read_text().replace(
        'name = "Demo Kommune 840"',
        'name = "Demo Kommune 840"\n'
        f'api_keys = [{{id = "0a0b0c0d", hash = "{hash_api_key(secret)}"}}]',
    )
    cfg.write_text(text)
    assert main(["keys", "list", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "0a0b0c0d     active" in out and "operator demo: operator for 746, 840, 851" in out
    assert (
        hash_api_key(secret) not in out
        and hash_api_key("demo-key-746") not in out
        and secret not in out
    )
    assert main(["keys", "revoke", "--config", str(cfg), "--id", "0a0b0c0d"]) == 0
    out = capsys.readouterr().out
    assert "In [tenants.840]" in out and 'revoked_key_ids = ["0a0b0c0d"]' in out
    cfg.write_text(text.replace("api_keys = [", 'revoked_key_ids = ["0a0b0c0d"]\napi_keys = ['))
    assert main(["keys", "list", "--config", str(cfg)]) == 0
    assert "0a0b0c0d     revoked" in capsys.readouterr().out
    assert main(["keys", "revoke", "--config", str(cfg), "--id", "ffffffff"]) == 1
    assert "no municipality" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "port"),
    [
        ([], 8080),  # the demo config's
        (["--port", "9123"], 9123),
        (["--listen", "127.0.0.1:9000", "--port", "9124"], 9124),  # the port wins; host kept
    ],
)
def test_serve_takes_a_port(argv: list[str], port: int) -> None:
    """`make run PORT=...` passes --port; the host stays as configured."""
    from gateway.cli import _settings, build_parser

    args = build_parser().parse_args(["serve", "--config", str(REPO / "examples/demo.toml"), *argv])
    settings = _settings(args)
    assert (settings.listen_host, settings.listen_port) == ("127.0.0.1", port)


@pytest.mark.parametrize("bad", ["0", "65536", "http", "-1"])
def test_serve_refuses_a_bad_port(bad: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["serve", "--config", str(REPO / "examples/demo.toml"), "--port", bad])
    assert "--port" in capsys.readouterr().err
