"""The console on the real app and a real store seeded through real intake and the SD simulator:
one delivered report and one failed report in 746 (employee with a known CPR), one in 840."""

from __future__ import annotations

import functools
import re
from collections.abc import Awaitable, Callable
from dataclasses import replace
from types import MappingProxyType
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from gateway.console.passwords import hash_password
from gateway.settings import Account, Settings
from gateway.simulators.sd import STATE
from tests.conftest import KEY_840, Gateway, drive

#: in a report of the seeded store; it must never be in any page
KNOWN_CPR = "1112851234"
OTHER_CPR = "0101901234"  # the other reports' (tests.conftest.DRIVE)
APPROVER_CPR = "0202802345"
ACCOUNTS = {  # name: (role, municipalities)
    "anne-admin": ("admin", ("*",)),
    "ole-operator": ("operator", ("746", "840")),
    "søren-746": ("operator", ("746",)),
    "vera-viewer": ("viewer", ("746",)),
}


def password(name: str) -> str:
    return f"{name}-password"


@functools.cache
def _hashes() -> dict[str, str]:
    return {name: hash_password(password(name)) for name in ACCOUNTS}


@pytest.fixture
def console_settings(settings: Settings) -> Settings:
    accounts = {
        name: Account(name, _hashes()[name], role, frozenset(m))
        for name, (role, m) in ACCOUNTS.items()
    }
    # Danish letters in what the pages print: a tenant's name, account names, reasons
    tenants = {**settings.tenants, "746": replace(settings.tenants["746"], name="Ærø Kommune")}
    return replace(settings, accounts=MappingProxyType(accounts), tenants=MappingProxyType(tenants))


async def seed(gw: Gateway, sd_server: TestServer) -> dict[str, Any]:
    """One delivered (R-OK) and one failed (R-FAIL) drive report in 746, one in 840."""
    ok = drive(report_id="R-OK")
    assert (await gw.post(ok))[0] == 202
    await gw.wait_for("R-OK", {"delivered"})
    sd_server.app[STATE].fault = "client"  # SD refuses: a permanent failure
    failing = drive(report_id="R-FAIL", employee={"cpr": KNOWN_CPR, "employment_id": "00777"})
    assert (await gw.post(failing))[0] == 202
    view = await gw.wait_for("R-FAIL", {"failed"})
    sd_server.app[STATE].fault = None
    other = drive(report_id="R-840", municipality="840")
    assert (await gw.post(other, key=KEY_840))[0] == 202
    delivered = (await gw.get("746", "R-OK"))[1]["deliveries"][-1]["id"]
    rows = await gw.store.list_deliveries({"municipality": "840"}, 10)
    return {"OK": delivered, "FAIL": view["deliveries"][-1]["id"], "840": rows[0]["id"]}


@pytest.fixture
async def seeded(
    make_gateway: Callable[..., Awaitable[Gateway]],
    console_settings: Settings,
    sd_server: TestServer,
) -> tuple[Gateway, dict[str, Any]]:
    gw = await make_gateway(console_settings)
    return gw, await seed(gw, sd_server)


CSRF = re.compile(r'name="csrf" value="([0-9a-f]{64})"')


def csrf_of(html: str) -> str:
    match = CSRF.search(html)
    assert match, "no CSRF token in the page"
    return match.group(1)


async def sign_in(client: TestClient, name: str, secret: str | None = None) -> str:
    """Sign in through the form; the CSRF token of the session's pages."""
    form = await client.get("/ui/signin")
    token = csrf_of(await form.text())
    resp = await client.post(
        "/ui/signin",
        data={"username": name, "password": secret or password(name), "csrf": token},
        allow_redirects=False,
    )
    assert resp.status == 303, await resp.text()
    page = await client.get("/ui/")
    assert page.status == 200
    return csrf_of(await page.text())
