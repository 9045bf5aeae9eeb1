"""The wheel, as the README installs it: built from a copy of the checkout, installed with the
pinned dependencies into a fresh venv, and run from a folder with no checkout in reach.

Marked ``wheel`` (``pytest -m "not wheel"`` leaves it out); about 10 s with a warm pip cache.
It is skipped only when pip cannot reach a package index (setuptools for the build, or the
pinned dependencies), and the skip says so; any other failure to build, install or run fails.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import Any

import pytest

from adapters.resources import schema_path
from adapters.soap import body_payload, load_schema, parse_xml, schema_errors

pytestmark = [pytest.mark.wheel, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "examples" / "report-drive-746.json"
API_KEY = "wheel-test-key-746"
# what pip prints when no package index can be reached: the only reason to skip
OFFLINE = (
    "Failed to establish a new connection",
    "NewConnectionError",
    "Network is unreachable",
    "Temporary failure in name resolution",
    "Name or service not known",
    "ConnectTimeoutError",
    "ProxyError",
)
# what a checkout may hold that is not the project: never copied into the build
NOT_SOURCE = (
    ".git",
    ".venv",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    ".demo",
    ".pytest_cache",
    ".hypothesis",
    ".ruff_cache",
    "*.db",
    "*.db-*",
)


def _pip(*args: str, cwd: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pip", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=240,
        env=_clean_env(),
    )
    if done.returncode == 0:
        return
    output = done.stdout + done.stderr
    if any(marker in output for marker in OFFLINE):
        pytest.skip(
            f"no package index reachable for `pip {args[0]}`: {output.strip().splitlines()[-1]}"
        )
    pytest.fail(f"pip {' '.join(args)} failed:\n{output}")


def _clean_env() -> dict[str, str]:
    """The environment without anything that would put the checkout on the import path."""
    env = {
        k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")
    }
    return {**env, "PYTHONNOUSERSITE": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel, built from a copy of this checkout."""
    base = tmp_path_factory.mktemp("wheel")
    # a copy, so a stale build/ or egg-info in the checkout can neither add nor hide files
    source = base / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(*NOT_SOURCE))
    _pip("wheel", "--no-deps", "--wheel-dir", str(base / "dist"), str(source), cwd=base)
    wheels = list((base / "dist").glob("payroll_gateway-*.whl"))
    assert len(wheels) == 1, wheels
    shutil.rmtree(source)
    return wheels[0]


@pytest.fixture(scope="module")
def venv(wheel: Path) -> Path:
    """A fresh venv with the wheel and the pinned dependencies."""
    env = wheel.parent.parent / "venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(env)], check=True, timeout=60
    )
    _pip(
        "--python",
        str(env / "bin" / "python"),
        "install",
        "-c",
        str(REPO / "requirements.lock"),
        str(wheel),
        cwd=wheel.parent,
    )
    return env


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A folder outside the checkout, with no ``gateway``, ``adapters`` or ``schemas`` in reach."""
    assert not any((tmp_path / name).exists() for name in ("gateway", "adapters", "schemas"))
    return tmp_path


def _run(venv: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(venv / "bin" / "payroll-gateway"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        env=_clean_env(),
    )


def test_every_package_on_disk_is_listed_in_pyproject() -> None:
    listed = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"][
        "setuptools"
    ]["packages"]
    on_disk = {
        ".".join(init.parent.relative_to(REPO).parts)
        for top in ("gateway", "adapters", "schemas")
        for init in (REPO / top).rglob("__init__.py")
    }
    assert sorted(listed) == sorted(on_disk)


def test_the_wheel_carries_every_source_and_schema_file(wheel: Path) -> None:
    wanted = {
        p.relative_to(REPO).as_posix()
        for top in ("gateway", "adapters", "schemas")
        for p in (REPO / top).rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and not p.name.startswith(".")
    }
    with zipfile.ZipFile(wheel) as archive:
        assert wanted - set(archive.namelist()) == set()


def test_the_installed_packages_come_from_site_packages(venv: Path, workdir: Path) -> None:
    code = (
        "import json, sysconfig, gateway, adapters, schemas; "
        "print(json.dumps([sysconfig.get_path('purelib'), gateway.__file__, adapters.__file__, "
        "schemas.__file__]))"
    )
    done = subprocess.run(
        [str(venv / "bin" / "python"), "-c", code],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=60,
        env=_clean_env(),
        check=True,
    )
    purelib, *modules = (Path(p) for p in json.loads(done.stdout))
    assert purelib.is_relative_to(venv)
    for module in modules:
        assert module.is_relative_to(purelib), module


def test_render_writes_valid_payloads(venv: Path, workdir: Path) -> None:
    report = json.loads(SAMPLE.read_text(encoding="utf-8"))
    report["employee"]["institution"] = "XY"
    (workdir / "report.json").write_text(json.dumps(report), encoding="utf-8")
    done = _run(venv, workdir, "render", "sd-koersel", "report.json", "--out", "out/")
    assert done.returncode == 0, done.stderr
    written = sorted((workdir / "out").iterdir())
    assert [p.name for p in written] == ["0001.xml"]
    xsd = load_schema(schema_path("sd/sd-20170501.xsd"))
    assert schema_errors(xsd, body_payload(parse_xml(written[0].read_bytes()))) == []


def test_serve_delivers_a_report_to_the_built_in_simulator(venv: Path, workdir: Path) -> None:
    port, sd_port = _free_port(), _free_port()
    (workdir / "secrets").mkdir()
    (workdir / "secrets" / "sd-password").write_text("wheel-test\n", encoding="utf-8")
    (workdir / "gateway.toml").write_text(_config(port, sd_port), encoding="utf-8")
    log = workdir / "serve.log"
    with log.open("w", encoding="utf-8") as out:
        proc = subprocess.Popen(
            [str(venv / "bin" / "payroll-gateway"), "serve", "--config", "gateway.toml"],
            cwd=workdir,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=_clean_env(),
        )
        try:
            base = f"http://127.0.0.1:{port}"
            _wait_until_up(base, proc, log)
            status, body = _request(f"{base}/v1/reports", SAMPLE.read_bytes())
            assert status == 202, body
            view = _poll_delivered(f"{base}/v1/reports/746/demo-746-1")
            assert view["status"] == "delivered", (view, log.read_text())
            # the console's templates and static files come from the installed wheel
            with urllib.request.urlopen(f"{base}/ui/signin", timeout=5) as page:
                assert 'name="username"' in page.read().decode("utf-8")
            with urllib.request.urlopen(f"{base}/ui/static/console.css", timeout=5) as css:
                assert css.status == 200
        finally:
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=30)
    assert code == 0, log.read_text()
    assert (
        workdir / "data" / "gateway.db"
    ).is_file()  # the relative store URL, from the config's folder


def _config(port: int, sd_port: int) -> str:
    key_hash = "sha256:" + hashlib.sha256(API_KEY.encode()).hexdigest()
    return f"""
[server]
listen = "127.0.0.1:{port}"
store = "sqlite:///data/gateway.db"
data_dir = "data"

[dispatcher]
poll_seconds = 0.1

[simulators.sd]
port = {sd_port}
username = "SYwheel"
password_file = "secrets/sd-password"

[tenants.746]
name = "Wheel Kommune"
api_key_hashes = ["{key_hash}"]

[tenants.746.routes]
drive = "sd-koersel"

[tenants.746.vendors.sd-koersel]
endpoint = "http://127.0.0.1:{sd_port}/sdws/services/AnsaettelseKoerselOpret20170501"
username = "SYwheel"
password_file = "secrets/sd-password"
institution = "XY"
opening_hours = "always"
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _request(url: str, data: bytes | None = None) -> tuple[int, Any]:
    req = urllib.request.Request(
        url,
        data=data,
        headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=5) as resp:
        return resp.status, json.loads(resp.read())


def _wait_until_up(base: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"serve exited with {proc.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(f"{base}/healthz", timeout=2):
                return
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.1)
    pytest.fail(f"serve did not answer within 60 s:\n{log.read_text()}")


def _poll_delivered(url: str) -> Any:
    deadline = time.monotonic() + 15
    while True:
        _, view = _request(url)
        if view["status"] == "delivered" or time.monotonic() > deadline:
            return view
        time.sleep(0.1)
