"""Who may do what: keys reach only their municipality on every intake endpoint, operators
only what their role and municipalities allow, failed authentications are limited per client
address, and every answer carries the security headers (DESIGN.md §3, issue 10 items 5, 7)."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest

from gateway.auth import AuthFailures
from gateway.settings import ApiKey, Operator, Settings, hash_api_key
from tests.conftest import DRIVE, KEY_746, KEY_840, OPS_TOKEN, Gateway, drive

REPO = Path(__file__).resolve().parent.parent
MakeGateway = Callable[..., Awaitable[Gateway]]
ID_KEY = "pgw_a1b2c3d4_the-secret-part_with_underscores"
REVOKED_KEY = "pgw_deadbeef_another-secret"
TOKENS = {
    "viewer": "viewer-746-token",
    "operator": "operator-746-token",
    "other": "operator-840-token",
    "admin": "admin-all-token",
}


def _operators() -> dict[str, Operator]:
    return {
        "ops": Operator("ops", hash_api_key(OPS_TOKEN)),
        "viewer": Operator("viewer", hash_api_key(TOKENS["viewer"]), "viewer", frozenset({"746"})),
        "operator": Operator(
            "operator", hash_api_key(TOKENS["operator"]), "operator", frozenset({"746"})
        ),
        "other": Operator("other", hash_api_key(TOKENS["other"]), "operator", frozenset({"840"})),
        "admin": Operator("admin", hash_api_key(TOKENS["admin"]), "admin", frozenset({"*"})),
    }


@pytest.fixture
def secured(settings: Settings) -> Settings:
    t746 = replace(
        settings.tenants["746"],
        api_keys=(
            ApiKey("a1b2c3d4", hash_api_key(ID_KEY)),
            ApiKey("deadbeef", hash_api_key(REVOKED_KEY)),
        ),
        revoked_key_ids=frozenset({"deadbeef"}),
    )
    return replace(
        settings,
        tenants=MappingProxyType({**settings.tenants, "746": t746}),
        operators=MappingProxyType(_operators()),
        auth_failures_per_minute=1000,
    )


# -- API keys ---------------------------------------------------------------------------------


async def test_a_key_reaches_only_its_municipality_on_every_intake_endpoint(
    make_gateway: MakeGateway, secured: Settings
) -> None:
    gw = await make_gateway(secured, run_dispatcher=False)
    assert (await gw.post(DRIVE))[0] == 202
    # POST /v1/reports: a report of another municipality, alone or in a batch (nothing stored)
    status, body = await gw.post(DRIVE, key=KEY_840)
    assert status == 403 and "746" in body["detail"]
    status, _ = await gw.post(
        {"reports": [drive(municipality="840", report_id="B-1"), drive(report_id="B-2")]},
        key=KEY_840,
    )
    assert status == 403
    assert (await gw.get("746", "B-2"))[0] == 404
    # GET /v1/reports/{municipality}/{id}
    assert (await gw.get("746", "R-1", key=KEY_840))[0] == 403
    assert (await gw.get("746", "R-1", key=KEY_746))[0] == 200
    # POST /v1/compat/...: the municipality is the key's, never one the body could name
    records = json.loads((REPO / "examples/os2indberetning-export-746.json").read_text())
    resp = await gw.client.post(
        "/v1/compat/os2indberetning/drive-reports",
        json=records,
        headers={"Authorization": f"Bearer {KEY_840}"},
    )
    assert resp.status == 202, await resp.text()
    assert [r["municipality"] for r in (await resp.json())["reports"]] == ["840"]
    assert (await gw.get("746", "9001"))[0] == 404
    assert (await gw.get("840", "9001", key=KEY_746))[0] == 403
    assert (await gw.get("840", "9001", key=KEY_840))[0] == 200


async def test_keys_with_an_id_work_and_a_revoked_one_is_401(
    make_gateway: MakeGateway, secured: Settings
) -> None:
    gw = await make_gateway(secured, run_dispatcher=False)
    assert (await gw.post(DRIVE, key=ID_KEY))[0] == 202
    assert (await gw.get("746", "R-1", key=ID_KEY))[0] == 200
    for wrong in (REVOKED_KEY, "pgw_a1b2c3d4_wrong-secret", "pgw_zzzz9999_unknown", "", "nope"):
        status, body = await gw.get("746", "R-1", key=wrong)
        assert status == 401, wrong
        assert wrong not in json.dumps(body) or not wrong


def test_key_lookup_is_by_id_then_hash_and_keeps_keys_without_an_id(secured: Settings) -> None:
    assert secured.tenant_for_key(ID_KEY).municipality == "746"  # type: ignore[union-attr]
    assert secured.tenant_for_key(KEY_746).municipality == "746"  # type: ignore[union-attr]
    assert secured.tenant_for_key(REVOKED_KEY) is None
    assert secured.tenant_for_key("pgw_a1b2c3d4_x") is None
    assert "hash" not in repr(secured.tenants["746"].api_keys[0])


# -- operators ---------------------------------------------------------------------------------


async def _ops(gw: Gateway, who: str, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    return await gw.ops(method, path, body, token=TOKENS[who])


async def test_a_viewer_reads_but_may_not_act(make_gateway: MakeGateway, secured: Settings) -> None:
    gw = await make_gateway(secured, run_dispatcher=False)
    await gw.post(DRIVE)
    for path in ("deliveries", "deliveries/1/audit", "rejections", "endpoints"):
        assert (await _ops(gw, "viewer", "GET", path))[0] == 200, path
    reason = {"reason": "test", "ids": [1]}
    for path in (
        "deliveries/replay",
        "deliveries/1/cancel",
        "deliveries/1/check",
        "deliveries/1/confirm",
        "endpoints/746/sd-koersel/pause",
        "endpoints/746/sd-koersel/resume",
    ):
        status, body = await _ops(gw, "viewer", "POST", path, reason)
        assert status == 403, path
        assert body["required_role"] == "operator" and "viewer" in body["detail"]
    # an operator of 746 may
    assert (await _ops(gw, "operator", "POST", "deliveries/1/cancel", {"reason": "test"}))[0] == 200
    assert (await _ops(gw, "operator", "POST", "endpoints/746/sd-koersel/pause", {"reason": "t"}))[
        0
    ] == 200
    assert (await _ops(gw, "admin", "POST", "endpoints/746/sd-koersel/resume", {"reason": "t"}))[
        0
    ] == 200


async def test_an_operator_sees_and_touches_only_its_municipalities(
    make_gateway: MakeGateway, secured: Settings
) -> None:
    gw = await make_gateway(secured, run_dispatcher=False)
    await gw.post(DRIVE)
    await gw.post(drive(municipality="840", report_id="R-840"), key=KEY_840)
    assert [
        d["municipality"] for d in (await _ops(gw, "other", "GET", "deliveries"))[1]["deliveries"]
    ] == ["840"]
    assert [
        d["municipality"] for d in (await _ops(gw, "viewer", "GET", "deliveries"))[1]["deliveries"]
    ] == ["746"]
    assert (await _ops(gw, "admin", "GET", "deliveries"))[1]["count"] == 2
    forbidden = [
        ("GET", "deliveries?municipality=746", None),
        ("GET", "rejections?municipality=746", None),
        ("GET", "deliveries/1/audit", None),
        ("POST", "deliveries/1/cancel", {"reason": "t"}),
        ("POST", "deliveries/cancel", {"reason": "t", "ids": [1, 2]}),
        ("POST", "deliveries/cancel", {"reason": "t", "filter": {"municipality": "746"}}),
        ("POST", "endpoints/746/sd-koersel/pause", {"reason": "t"}),
    ]
    for method, path, body in forbidden:
        status, problem = await _ops(gw, "other", method, path, body)
        assert status == 403, path
        assert problem["municipality"] == "746" and "746" in problem["detail"]
    # a filter without a municipality acts on the operator's own only
    status, result = await _ops(
        gw, "other", "POST", "deliveries/cancel", {"reason": "t", "filter": {"status": "queued"}}
    )
    assert status == 200 and result["changed"] == [2]
    _, view = await gw.get("746", "R-1")
    assert view["status"] == "queued"
    endpoints = (await _ops(gw, "other", "GET", "endpoints"))[1]["endpoints"]
    assert {e["municipality"] for e in endpoints} == {"840"}
    assert {
        e["municipality"] for e in (await _ops(gw, "admin", "GET", "endpoints"))[1]["endpoints"]
    } == {"746", "840"}


async def test_an_api_key_is_no_operator_token_and_the_reverse(gateway: Gateway) -> None:
    assert (await gateway.ops("GET", "deliveries", token=KEY_746))[0] == 401
    assert (await gateway.get("746", "R-1", key=OPS_TOKEN))[0] == 401


# -- failed authentications --------------------------------------------------------------------


async def test_failed_authentications_are_limited_per_address(
    make_gateway: MakeGateway, settings: Settings
) -> None:
    gw = await make_gateway(replace(settings, auth_failures_per_minute=3), run_dispatcher=False)
    for _ in range(3):
        assert (await gw.get("746", "R-1", key="wrong"))[0] == 401
    resp = await gw.client.get(
        "/v1/reports/746/R-1", headers={"Authorization": f"Bearer {KEY_746}"}
    )
    assert resp.status == 429  # the right key too, while the address is over the limit
    assert 0 < int(resp.headers["Retry-After"]) <= 60
    assert resp.content_type == "application/problem+json"
    assert (await gw.ops("GET", "deliveries"))[0] == 429  # the ops API shares the count


async def test_failed_operator_tokens_count_too(
    make_gateway: MakeGateway, settings: Settings
) -> None:
    gw = await make_gateway(replace(settings, auth_failures_per_minute=2), run_dispatcher=False)
    assert (await gw.ops("GET", "deliveries", token="wrong"))[0] == 401
    resp = await gw.client.get("/v1/ops/deliveries")  # no token at all is a failure as well
    assert resp.status == 401
    assert (await gw.ops("GET", "deliveries"))[0] == 429


def test_the_failure_window_ends_and_the_table_is_bounded() -> None:
    now = [1000.0]
    failures = AuthFailures(2, clock=lambda: now[0], max_addresses=3)
    failures.fail("a")
    failures.check("a")
    failures.fail("a")
    with pytest.raises(Exception, match="too many") as caught:
        failures.check("a")
    assert caught.value.headers["Retry-After"] == "60"  # type: ignore[attr-defined]
    now[0] += 59.5
    with pytest.raises(Exception, match="in 1 s"):
        failures.check("a")
    now[0] += 0.5
    failures.check("a")  # a new minute
    failures.fail("a")
    failures.check("a")
    for address in ("b", "c", "d", "e"):
        failures.fail(address)
    assert len(failures) == 3


# -- headers, metrics ---------------------------------------------------------------------------

SECURITY = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": "default-src 'none'",
}


async def test_every_answer_has_the_security_headers_and_report_data_is_not_stored(
    gateway: Gateway,
) -> None:
    await gateway.post(DRIVE)
    auth = {"Authorization": f"Bearer {KEY_746}"}
    ops = {"Authorization": f"Bearer {OPS_TOKEN}"}
    cases = [
        ("/v1/reports/746/R-1", auth, 200, True),
        ("/v1/reports/746/nope", auth, 404, True),
        ("/v1/reports/746/R-1", {}, 401, True),
        ("/v1/ops/deliveries", ops, 200, True),
        ("/v1/ops/rejections", ops, 200, True),
        ("/nowhere", {}, 404, True),
        ("/healthz", {}, 200, False),
        ("/openapi.json", {}, 200, False),
    ]
    for path, headers, status, no_store in cases:
        resp = await gateway.client.get(path, headers=headers)
        await resp.read()
        assert resp.status == status, path
        assert {k: resp.headers.get(k) for k in SECURITY} == SECURITY, path
        assert (resp.headers.get("Cache-Control") == "no-store") is no_store, path
    resp = await gateway.client.post("/v1/reports", json=DRIVE, headers=auth)
    assert resp.status == 200 and resp.headers["Cache-Control"] == "no-store"


async def test_metrics_behind_a_token_when_configured(
    make_gateway: MakeGateway, settings: Settings
) -> None:
    gw = await make_gateway(
        replace(settings, metrics_token_hash=hash_api_key("scrape")), run_dispatcher=False
    )
    assert (await gw.client.get("/metrics")).status == 401
    assert (await gw.client.get("/metrics", headers={"Authorization": "Bearer nope"})).status == 401
    resp = await gw.client.get("/metrics", headers={"Authorization": "Bearer scrape"})
    assert resp.status == 200 and "payroll_gateway_deliveries" in await resp.text()
    assert (await gw.client.get("/healthz")).status == 200
