"""Shared fixtures: real simulators on loopback, a real store (SQLite file and PostgreSQL), the real app.

Every test that takes ``settings`` (or ``store_url``) runs on both engines. PostgreSQL tests
get a database of their own, dropped afterwards; without PostgreSQL they are skipped with
the reason, unless ``PAYROLL_GATEWAY_TEST_PG`` is set (CI, ``make test``): then they fail.
A test marked ``sqlite_only`` runs on SQLite alone (it looks at the file itself).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from adapters.base import VendorSettings
from adapters.registry import load_adapters
from gateway.app import create_app
from gateway.keys import APP_DISPATCHER, APP_STORE
from gateway.privacy import DataKeys
from gateway.settings import EndpointPolicy, Operator, RetryPolicy, Settings, Tenant, hash_api_key
from gateway.simulators import SimulatorOptions
from gateway.simulators import sd as sd_sim

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
KEY_746 = "test-key-746"
KEY_840 = "test-key-840"
SD_USER, SD_PASSWORD = "SYtest", "sd-test-password"
OPS_TOKEN = "ops-test-token"
#: the data key every test store seals with (PostgreSQL needs one configured; SQLite would make one)
TEST_KEYS = DataKeys(bytes(range(32)), source="tests")
FAST_RETRY = RetryPolicy(
    first_delay=0.05, multiplier=2, cap=0.2, jitter=0.0, max_attempts=10, max_age=3600
)

DRIVE = {
    "kind": "drive",
    "municipality": "746",
    "report_id": "R-1",
    "version": 1,
    "employee": {"cpr": "0101901234", "employment_id": "00123"},
    "drive_date": "2026-03-29",
    "distance_km": 12.5,
    "wage_code": "0201",
    "approved_by_cpr": "0202802345",
    "license_plate": "AB12345",
}


def drive(**changes: Any) -> dict[str, Any]:
    report = copy.deepcopy(DRIVE)
    report.update(changes)
    return report


@pytest.fixture
async def sd_server(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> TestServer:
    options = SimulatorOptions(username=SD_USER, password=SD_PASSWORD, seed=1)
    return await aiohttp_server(sd_sim.build_app(options))


def tenant(
    municipality: str,
    key: str,
    vendors: dict[str, VendorSettings],
    routes: dict[str, str],
    **endpoint: Any,
) -> Tenant:
    """A tenant whose endpoints answer at any hour (tests run at night too)."""
    policy = EndpointPolicy(**{"opening_hours": "always", **endpoint})
    return Tenant(
        municipality=municipality,
        name=f"Test {municipality}",
        api_key_hashes=frozenset({hash_api_key(key)}),
        routes=MappingProxyType(routes),
        vendors=MappingProxyType(vendors),
        retry=MappingProxyType({}),
        endpoints=MappingProxyType({a: policy for a in {*routes.values(), *vendors}}),
    )


PG_ENV = "PAYROLL_GATEWAY_TEST_PG"
PG_DEFAULT = "postgresql://postgres@127.0.0.1:5432/test"
ENGINES = ("sqlite", "postgresql")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``sqlite_only`` tests are not collected for PostgreSQL (they are not skipped: not applicable)."""
    keep, drop = [], []
    for item in items:
        callspec = getattr(item, "callspec", None)
        engine = callspec.params.get("store_url") if callspec is not None else None
        (
            drop if engine == "postgresql" and item.get_closest_marker("sqlite_only") else keep
        ).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@contextlib.asynccontextmanager
async def fresh_pg_database() -> AsyncIterator[str]:
    """A new, empty PostgreSQL database (its URL), dropped afterwards."""
    required = os.environ.get(PG_ENV)
    admin_url = required or PG_DEFAULT
    try:
        admin = await asyncpg.connect(admin_url, timeout=5)
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        message = f"PostgreSQL is not reachable at {admin_url}: {exc.__class__.__name__}: {exc}"
        if required:
            pytest.fail(f"{message} ({PG_ENV} is set, so the PostgreSQL tests must run)")
        pytest.skip(f"{message} (set {PG_ENV} to require it)")
    name = f"pg_{uuid.uuid4().hex[:16]}"
    try:
        await admin.execute(f"CREATE DATABASE {name}")
        yield admin_url.rsplit("/", 1)[0] + "/" + name
    finally:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.close()


@pytest.fixture(params=ENGINES)
async def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A fresh store on each engine."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'gateway.db'}"
        return
    async with fresh_pg_database() as url:
        yield url


@pytest.fixture
def settings(tmp_path: Path, sd_server: TestServer, store_url: str) -> Settings:
    sd = VendorSettings(
        endpoint=str(sd_server.make_url("/sdws/AnsaettelseKoerselOpret20170501")),
        username=SD_USER,
        password=SD_PASSWORD,
        institution="XY",
        connect_timeout=2,
        read_timeout=2,
    )
    return Settings(
        store_url=store_url,
        data_dir=tmp_path,
        workers=4,
        lease_seconds=30,
        poll_seconds=0.05,
        retry=FAST_RETRY,
        max_body_bytes=256 * 1024,
        tenants={
            "746": tenant("746", KEY_746, {"sd-koersel": sd}, {"drive": "sd-koersel"}),
            "840": tenant("840", KEY_840, {}, {"drive": "sd-koersel"}),
        },
        operators={"ops": Operator("ops", hash_api_key(OPS_TOKEN))},
        data_keys=TEST_KEYS,
    )


class Gateway:
    """The real app behind a real HTTP client, with helpers the tests share."""

    def __init__(self, client: TestClient, app: web.Application) -> None:
        self.client = client
        self.app = app

    @property
    def store(self) -> Any:
        return self.app[APP_STORE]

    @property
    def dispatcher(self) -> Any:
        return self.app[APP_DISPATCHER]

    async def post(self, body: Any, key: str = KEY_746, **kw: Any) -> tuple[int, Any]:
        data = body if isinstance(body, (bytes, str)) else json.dumps(body)
        headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        headers.update(kw.pop("headers", {}))
        resp = await self.client.post("/v1/reports", data=data, headers=headers, **kw)
        return resp.status, await _json(resp)

    async def get(self, municipality: str, report_id: str, key: str = KEY_746) -> tuple[int, Any]:
        resp = await self.client.get(
            f"/v1/reports/{municipality}/{report_id}", headers={"Authorization": f"Bearer {key}"}
        )
        return resp.status, await _json(resp)

    async def ops(
        self, method: str, path: str, body: Any = None, token: str = OPS_TOKEN
    ) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}"}
        resp = await self.client.request(method, f"/v1/ops/{path}", json=body, headers=headers)
        return resp.status, await _json(resp)

    async def wait_for(
        self,
        report_id: str,
        statuses: set[str],
        within: float = 5.0,
        municipality: str = "746",
        key: str = KEY_746,
    ) -> Any:
        """Poll the API until the report's latest delivery is in one of ``statuses``."""
        deadline = time.monotonic() + within
        view: Any = None
        while time.monotonic() < deadline:
            status, view = await self.get(municipality, report_id, key)
            if status == 200 and view["status"] in statuses:
                return view
            await asyncio.sleep(0.02)
        raise AssertionError(f"{report_id} never reached {statuses}: {view}")


async def _json(resp: Any) -> Any:
    text = await resp.text()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


@pytest.fixture
def make_gateway(request: pytest.FixtureRequest) -> Callable[..., Awaitable[Gateway]]:
    if "store_url" in request.fixturenames:  # set up first, so the database outlives the apps
        request.getfixturevalue("store_url")
    aiohttp_client: Callable[..., Awaitable[TestClient]] = request.getfixturevalue("aiohttp_client")

    async def make(settings: Settings, **kw: Any) -> Gateway:
        adapters = kw.pop("adapters", None) or load_adapters()
        app = create_app(settings, adapters=adapters, **kw)
        client = await aiohttp_client(app)
        return Gateway(client, app)

    return make


@pytest.fixture
async def gateway(make_gateway: Callable[..., Awaitable[Gateway]], settings: Settings) -> Gateway:
    return await make_gateway(settings)


def with_retry(settings: Settings, policy: RetryPolicy) -> Settings:
    return replace(settings, retry=policy)


# Every SOAP body any test renders is checked against the vendor's own schema at teardown
# (skipped, with the reason, when ../shared/vendor-reference is not laid out).
_VENDOR_WSDL = {
    "sd-koersel": "sd/AnsaettelseKoerselOpret20170501",
    "kmd-absence": "kmd/SetAbsenceAttendance_OS_SI",
}


@functools.cache
def _registered() -> Any:
    return load_adapters()


@pytest.fixture(autouse=True)
def vendor_conformance(monkeypatch: pytest.MonkeyPatch) -> Any:
    rendered: list[tuple[str, bytes]] = []
    for name, adapter in _registered().items():
        if name not in _VENDOR_WSDL:
            continue
        cls = type(adapter)
        original = cls.render

        def recording(
            self: Any, report: Any, message: Any, settings: Any, _o: Any = original, _n: str = name
        ) -> Any:
            payload = _o(self, report, message, settings)
            rendered.append((_n, payload.body))
            return payload

        monkeypatch.setattr(cls, "render", recording)
    yield rendered
    if rendered and (SHARED / "vendor-reference").is_dir():
        from tests.conformance.vendor_schemas import vendor_validator

        for name, body in rendered:
            errors = vendor_validator(_VENDOR_WSDL[name])(body)
            assert not errors, f"{name} rendered a body the vendor schema rejects: {errors}"


# -- mutual TLS (the KMD simulators) ----------------------------------------------------


@pytest.fixture
def dev_certs(tmp_path: Path) -> Any:
    from gateway.devcerts import ensure_dev_certs

    return ensure_dev_certs(tmp_path / "certs")


async def tls_simulator(aiohttp_server: Any, module: Any, certs: Any, seed: int) -> TestServer:
    """A simulator module's app served over HTTPS that requires our test client certificate."""
    options = SimulatorOptions(
        cert_file=str(certs.server_cert),
        key_file=str(certs.server_key),
        client_ca_file=str(certs.ca_file),
        seed=seed,
    )
    return await aiohttp_server(module.build_app(options), ssl=module.ssl_context(options))


def tls_vendor(url: str, certs: Any, **options: Any) -> VendorSettings:
    """Vendor settings that present the test client certificate and trust the test CA."""
    return VendorSettings(
        endpoint=url,
        cert_file=str(certs.client_cert),
        key_file=str(certs.client_key),
        ca_file=str(certs.ca_file),
        connect_timeout=2,
        read_timeout=2,
        options=options,
    )
