"""The intake API through real HTTP: auth, validation, idempotency, batches, limits."""

from __future__ import annotations

import json

from tests.conftest import KEY_746, KEY_840, Gateway, drive

PROBLEM = "application/problem+json"


async def test_single_report_is_accepted_with_202(gateway: Gateway) -> None:
    status, body = await gateway.post(drive())
    assert status == 202
    [item] = body["reports"]
    assert item["municipality"] == "746" and item["report_id"] == "R-1" and item["version"] == 1
    assert item["status"] == "queued" and isinstance(item["id"], int)


async def test_same_report_again_is_200_with_the_same_id(gateway: Gateway) -> None:
    _, first = await gateway.post(drive())
    # the same content written differently (string distance, defaults spelled out) is the same
    status, again = await gateway.post(
        drive(distance_km="12.50", cancelled=False, sixty_days_rule=False)
    )
    assert status == 200
    assert again["reports"][0]["id"] == first["reports"][0]["id"]


async def test_same_version_with_other_content_is_409(gateway: Gateway) -> None:
    await gateway.post(drive())
    resp = await gateway.client.post(
        "/v1/reports", json=drive(distance_km=13), headers={"Authorization": f"Bearer {KEY_746}"}
    )
    assert resp.status == 409
    assert resp.content_type == PROBLEM
    problem = await resp.json()
    assert problem["errors"] == [
        {"pointer": "/version", "message": problem["errors"][0]["message"]}
    ]


async def test_invalid_report_is_422_with_pointers_and_nothing_stored(gateway: Gateway) -> None:
    bad = drive(distance_km="12.345", drive_date="2026-03-29T22:00:00Z")
    del bad["wage_code"]
    resp = await gateway.client.post(
        "/v1/reports",
        json={"reports": [drive(report_id="ok"), bad]},
        headers={"Authorization": f"Bearer {KEY_746}"},
    )
    assert resp.status == 422
    assert resp.content_type == PROBLEM
    problem = await resp.json()
    pointers = {e["pointer"] for e in problem["errors"]}
    assert pointers == {"/reports/1/distance_km", "/reports/1/drive_date", "/reports/1/wage_code"}
    # a batch is atomic: the valid first report was not stored either
    assert (await gateway.get("746", "ok"))[0] == 404


async def test_cpr_is_never_echoed_in_errors(gateway: Gateway) -> None:
    bad = drive()
    bad["employee"]["cpr"] = "3213901234"  # day 32: invalid
    status, problem = await gateway.post(bad)
    assert status == 422
    assert "3213901234" not in json.dumps(problem)
    assert problem["errors"][0]["pointer"] == "/employee/cpr"


async def test_replacement_cpr_numbers_are_accepted(gateway: Gateway) -> None:
    report = drive()
    report["employee"]["cpr"] = "6101901235"  # day 61: replacement number, no modulus-11
    assert (await gateway.post(report))[0] == 202


async def test_batch_is_stored_atomically(gateway: Gateway) -> None:
    batch = {"reports": [drive(report_id=f"B-{i}") for i in range(3)]}
    status, body = await gateway.post(batch)
    assert status == 202 and len(body["reports"]) == 3
    # one conflicting member rolls back the whole new batch
    batch2 = {"reports": [drive(report_id="B-new"), drive(report_id="B-1", distance_km=99)]}
    status, problem = await gateway.post(batch2)
    assert status == 409
    assert problem["errors"][0]["pointer"] == "/reports/1/version"
    assert (await gateway.get("746", "B-new"))[0] == 404


async def test_auth(gateway: Gateway) -> None:
    resp = await gateway.client.post("/v1/reports", json=drive())
    assert resp.status == 401 and resp.content_type == PROBLEM
    assert (await gateway.post(drive(), key="nope"))[0] == 401
    status, problem = await gateway.post(drive(), key=KEY_840)  # a key of 840 posting for 746
    assert status == 403 and "746" in problem["detail"]
    assert (await gateway.get("746", "R-1", key=KEY_840))[0] == 403


async def test_body_too_large_is_413(gateway: Gateway) -> None:
    big = {"reports": [drive(report_id=f"L-{i}", purpose="x" * 400) for i in range(1000)]}
    status, problem = await gateway.post(big)
    assert status == 413 and problem["status"] == 413


async def test_not_json_is_400_problem(gateway: Gateway) -> None:
    status, problem = await gateway.post(b"{not json")
    assert status == 400 and "not valid JSON" in problem["detail"]


async def test_get_masks_cpr_and_lists_versions(gateway: Gateway) -> None:
    await gateway.post(drive())
    status, view = await gateway.get("746", "R-1")
    assert status == 200
    text = json.dumps(view)
    assert "0101901234" not in text and "0202802345" not in text
    assert view["versions"][0]["report"]["employee"]["cpr"] == "xxxxxx-xxxx"
    assert view["deliveries"][0]["adapter"] == "sd-koersel"


async def test_health_ready_metrics_openapi(gateway: Gateway) -> None:
    assert (await gateway.client.get("/healthz")).status == 200
    assert (await gateway.client.get("/readyz")).status == 200
    await gateway.post(drive())
    metrics = await (await gateway.client.get("/metrics")).text()
    assert "payroll_gateway_deliveries{" in metrics
    spec = await (await gateway.client.get("/openapi.json")).json()
    assert spec["openapi"].startswith("3.1") and "/v1/reports" in spec["paths"]
    unknown = await gateway.client.get("/nope")
    assert unknown.status == 404 and unknown.content_type == PROBLEM


async def test_odd_bodies_get_clear_problems_never_a_500(gateway: Gateway) -> None:
    odd = [
        b"[" * 100_000,
        b'{"reports": [1, "x", null]}',
        b'{"reports": "all"}',
        b"42",
        b'"text"',
        b'{"kind": "drive", "employee": "0101901234"}',
        "\udcff".encode("utf-8", "surrogatepass"),
        b'{"kind": "vacation", "municipality": "746", "report_id": "V", "employee": {"cpr": "0101901234",'
        b' "employment_id": "1"}, "start_date": "2026-02-30", "end_date": "2026-01-01", "vacation_type": "x"}',
    ]
    for body in odd:
        status, problem = await gateway.post(body)
        assert 400 <= status < 500, (body[:40], status, problem)
        assert problem["status"] == status and problem["detail"]
        assert "0101901234" not in str(problem)


async def test_a_date_that_is_not_in_the_calendar_is_422(gateway: Gateway) -> None:
    status, problem = await gateway.post(drive(drive_date="2026-02-30"))
    assert status == 422 and problem["errors"] == [
        {"pointer": "/drive_date", "message": "is not a date in the calendar"}
    ]
