"""Hostile input on every endpoint: always a 4xx problem+json, never a 500, never a CPR echoed.

The table is what a hostile tester sent (issue 10) and more: wrong types everywhere, numbers
out of range, NaN, duplicate keys, a BOM, bytes that are not UTF-8, deep nesting, huge texts,
records past the limit, wrong content types and methods, and HTTP that aiohttp cannot parse.
"""

from __future__ import annotations

import asyncio
import io
import json
import threading
import time
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

import pytest

from gateway.jsonbody import MAX_RECORDS
from gateway.settings import Settings
from gateway.store import Settle, Status
from tests.conftest import KEY_746, OPS_TOKEN, Gateway, drive

PROBLEM = "application/problem+json"
CPR = "0101901234"  # the fixture's employee, and the CPR hidden in hostile keys below
OTHER_CPR = "2512881234"
REPORTS, COMPAT = "/v1/reports", "/v1/compat/os2indberetning/drive-reports"
JSON = {"Content-Type": "application/json"}


def dumps(value: Any) -> bytes:
    return json.dumps(value).encode()


def with_employee(**changes: Any) -> bytes:
    report = drive()
    report["employee"].update(changes)
    return dumps(report)


RECORD = {
    "Id": "C-1",
    "CprNumber": CPR,
    "TFCode": "0201",
    "EmploymentId": "00123",
    "DistanceMeters": 12500,
    "DriveDate": "2026-03-29T00:00:00",
    "ApprovedByCpr": "0202802345",
}

# (name, body) posted to /v1/reports
REPORT_BODIES: list[tuple[str, bytes]] = [
    ("distance true", dumps(drive(distance_km=True))),
    ("kind object", dumps(drive(kind={}))),
    ("kind array", dumps(drive(kind=["drive"]))),
    ("kind number", dumps(drive(kind=1))),
    ("5000-digit integer", dumps(drive()).replace(b'"version": 1', b'"version": ' + b"9" * 5000)),
    ("version 2^63", dumps(drive(version=2**63))),
    ("version 2^31", dumps(drive(version=2**31))),
    ("version 0", dumps(drive(version=0))),
    ("version true", dumps(drive(version=True))),
    ("version float", dumps(drive(version=1.5))),
    ("lone surrogate in report_id", dumps(drive(report_id="\ud800"))),
    ("lone surrogate in a key", dumps(drive(**{"\udc00": 1}))),
    ("NUL in wage_code", dumps(drive(wage_code="02\u000001"))),
    ("NaN", dumps(drive()).replace(b"12.5", b"NaN")),
    ("Infinity", dumps(drive()).replace(b"12.5", b"Infinity")),
    ("-Infinity", dumps(drive()).replace(b"12.5", b"-Infinity")),
    ("1e999", dumps(drive()).replace(b"12.5", b"1e999")),
    ("huge exponent string", dumps(drive(distance_km="1e999999"))),
    ("duplicate keys", b'{"kind": "drive", "kind": "vacation"}'),
    ("BOM", b"\xef\xbb\xbf" + dumps(drive())),
    ("not UTF-8", b'{"kind": "dr\xffve"}'),
    ("UTF-16", json.dumps(drive()).encode("utf-16")),
    ("deeply nested arrays", b"[" * 100_000),
    ("deeply nested objects", b'{"a":' * 5000 + b"1" + b"}" * 5000),
    (
        "nested 40 deep but parseable",
        dumps(drive(route={"via": json.loads("[" * 40 + '"x"' + "]" * 40)})),
    ),
    ("huge string", dumps(drive(purpose="x" * 200_000))),
    ("huge key", dumps(drive(**{"k" * 100_000: 1}))),
    ("null", b"null"),
    ("empty", b""),
    ("empty array", b"[]"),
    ("array of reports", dumps([drive()])),
    ("trailing garbage", dumps(drive()) + b" x"),
    ("employee a string", dumps(drive(employee=CPR))),
    ("employee null", dumps(drive(employee=None))),
    ("cpr a number", with_employee(cpr=101901234)),
    ("employment_type 10", with_employee(employment_type=10)),
    ("employment_type 2^64", with_employee(employment_type=2**64)),
    ("drive_date a number", dumps(drive(drive_date=20260329))),
    ("drive_date year 0", dumps(drive(drive_date="0000-01-01"))),
    ("wage_code array", dumps(drive(wage_code=[]))),
    ("route a string", dumps(drive(route="x"))),
    ("via an object", dumps(drive(route={"via": {}}))),
    ("municipality a number", dumps(drive(municipality=746))),
    ("municipality superscripts", dumps(drive(municipality="²²²"))),
    ("cancelled a string", dumps(drive(cancelled="yes"))),
    ("unknown key that is a CPR", dumps(drive(**{CPR: "x"}))),
    ("unknown employee key that is a CPR", with_employee(**{OTHER_CPR: 1})),
    ("unknown key holding a dashed CPR", dumps(drive(**{"x251288-1234": 1}))),
    ("CPR key holding a control character", dumps(drive(**{OTHER_CPR: "\u0007"}))),
    ("reports a string", b'{"reports": "all"}'),
    ("reports empty", b'{"reports": []}'),
    ("reports of junk", b'{"reports": [1, "x", null, [], {}]}'),
    (
        "batch of wrong types",
        dumps({"reports": [drive(report_id=i, version="1") for i in range(3)]}),
    ),
    (f"{MAX_RECORDS + 1} reports", dumps({"reports": [{}] * (MAX_RECORDS + 1)})),
]

COMPAT_BODIES: list[tuple[str, bytes]] = [
    ("object", dumps(RECORD)),
    ("empty array", b"[]"),
    ("array of arrays", b"[[]]"),
    ("array of junk", b'[1, "x", null, true]'),
    ("distance true", dumps([{**RECORD, "DistanceMeters": True}])),
    ("distance NaN string", dumps([{**RECORD, "DistanceMeters": "NaN"}])),
    ("distance huge", dumps([{**RECORD, "DistanceMeters": 1e308}])),
    ("distance 5000 digits", dumps([RECORD]).replace(b"12500", b"1" * 5000)),
    ("employment type superscript", dumps([{**RECORD, "EmploymentType": "²"}])),
    ("employment type arabic digit", dumps([{**RECORD, "EmploymentType": "\u0663"}])),
    ("employment type 2^64", dumps([{**RECORD, "EmploymentType": str(2**64)}])),
    (
        "drive date year 9999 with offset",
        dumps([{**RECORD, "DriveDate": "9999-12-31T23:00:00-05:00", "DistanceMeters": -1}]),
    ),
    (
        "drive date year 1 with offset",
        dumps([{**RECORD, "DriveDate": "0001-01-01T00:30:00+05:00", "DistanceMeters": -1}]),
    ),
    ("drive date object", dumps([{**RECORD, "DriveDate": {}}])),
    ("id surrogate", dumps([{**RECORD, "Id": "\ud800"}])),
    ("id object", dumps([{**RECORD, "Id": {"a": 1}}])),
    ("cpr as key", dumps([{**RECORD, OTHER_CPR: 1, "CprNumber": "x"}])),  # unknown keys are ignored
    ("cpr number", dumps([{**RECORD, "CprNumber": 101901234}])),
    ("duplicate keys", b'[{"Id": "1", "id": "2", "Id": "3"}]'),
    ("NaN", b'[{"DistanceMeters": NaN}]'),
    ("deeply nested", b"[" * 100_000),
    ("not UTF-8", b"[\xff]"),
    ("BOM", b"\xef\xbb\xbf[]"),
    (f"{MAX_RECORDS + 1} records", dumps([{}] * (MAX_RECORDS + 1))),
    ("100,000 records", b"[" + b",".join([b"{}"] * 100_000) + b"]"),
]

# (name, method, path, body): the operator API
OPS_REQUESTS: list[tuple[str, str, str, Any]] = [
    ("superscript id", "GET", "/v1/ops/deliveries/²/audit", None),
    ("arabic-indic id", "GET", "/v1/ops/deliveries/\u0663/audit", None),
    ("id 2^63", "GET", f"/v1/ops/deliveries/{2**63}/audit", None),
    ("id 0", "GET", "/v1/ops/deliveries/0/audit", None),
    ("id 5000 digits", "GET", f"/v1/ops/deliveries/{'9' * 5000}/audit", None),
    ("replay id 2^63", "POST", f"/v1/ops/deliveries/{2**63}/replay", {"reason": "x"}),
    ("replay id superscript", "POST", "/v1/ops/deliveries/²/replay", {"reason": "x"}),
    ("filter [null]", "POST", "/v1/ops/deliveries/replay", {"reason": "x", "filter": [None]}),
    ("filter a string", "POST", "/v1/ops/deliveries/replay", {"reason": "x", "filter": "all"}),
    (
        "filter value an object",
        "POST",
        "/v1/ops/deliveries/replay",
        {"reason": "x", "filter": {"adapter": {}}},
    ),
    (
        "filter unknown status",
        "POST",
        "/v1/ops/deliveries/replay",
        {"reason": "x", "filter": {"status": "x"}},
    ),
    (
        "filter surrogate",
        "POST",
        "/v1/ops/deliveries/replay",
        {"reason": "x", "filter": {"report_id": "\ud800"}},
    ),
    (
        "filter CPR key",
        "POST",
        "/v1/ops/deliveries/replay",
        {"reason": "x", "filter": {OTHER_CPR: "1"}},
    ),
    (
        "filter since 1e308",
        "POST",
        "/v1/ops/deliveries/replay",
        {"reason": "x", "filter": {"since": 1e308}},
    ),
    (
        "filter since a list",
        "POST",
        "/v1/ops/deliveries/replay",
        {"reason": "x", "filter": {"since": []}},
    ),
    ("ids 2^63", "POST", "/v1/ops/deliveries/replay", {"reason": "x", "ids": [2**63]}),
    ("ids true", "POST", "/v1/ops/deliveries/replay", {"reason": "x", "ids": [True]}),
    ("ids empty", "POST", "/v1/ops/deliveries/replay", {"reason": "x", "ids": []}),
    ("ids a number", "POST", "/v1/ops/deliveries/replay", {"reason": "x", "ids": 1}),
    ("reason surrogate", "POST", "/v1/ops/deliveries/replay", {"reason": "\ud800", "ids": [1]}),
    ("reason a list", "POST", "/v1/ops/deliveries/replay", {"reason": ["x"], "ids": [1]}),
    (
        "vendor_reference surrogate",
        "POST",
        "/v1/ops/deliveries/1/confirm",
        {"reason": "x", "vendor_reference": "\udfff"},
    ),
    ("body a list", "POST", "/v1/ops/deliveries/replay", [1]),
    ("unknown action", "POST", "/v1/ops/deliveries/explode", {"reason": "x", "ids": [1]}),
    (
        "pause reason surrogate",
        "POST",
        "/v1/ops/endpoints/746/sd-koersel/pause",
        {"reason": "\ud800"},
    ),
    ("pause unknown endpoint", "POST", "/v1/ops/endpoints/²/x/pause", {"reason": "x"}),
    ("status unknown", "GET", "/v1/ops/deliveries?status=bogus", None),
    ("status NUL", "GET", "/v1/ops/deliveries?report_id=%00", None),
    ("error NUL", "GET", "/v1/ops/deliveries?error=a%00", None),
    ("since 10^400", "GET", f"/v1/ops/deliveries?since={10**400}", None),
    ("since year 0", "GET", "/v1/ops/deliveries?since=0000-01-01", None),
    ("limit superscript", "GET", "/v1/ops/deliveries?limit=²", None),
    ("limit 5000 digits", "GET", f"/v1/ops/deliveries?limit={'9' * 5000}", None),
    ("unknown query CPR", "GET", f"/v1/ops/deliveries?{OTHER_CPR}=1", None),
    ("rejections unknown CPR", "GET", f"/v1/ops/rejections?{OTHER_CPR}=1", None),
    ("rejections kind", "GET", "/v1/ops/rejections?kind=x", None),
    ("rejections NUL", "GET", "/v1/ops/rejections?record_id=%00", None),
    ("rejections limit", "GET", "/v1/ops/rejections?limit=¹", None),
]


def assert_problem(status: int, content_type: str, text: str, what: str) -> dict[str, Any]:
    assert 400 <= status < 500, (what, status, text[:300])
    assert content_type == PROBLEM, (what, content_type)
    assert CPR not in text and OTHER_CPR not in text and "251288-1234" not in text, (
        what,
        text[:300],
    )
    problem: dict[str, Any] = json.loads(text)
    assert problem["status"] == status and problem["detail"], (what, problem)
    return problem


async def send(
    gateway: Gateway,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, str, str]:
    data = None if body is None else io.BytesIO(body)
    resp = await gateway.client.request(method, path, data=data, headers=headers or {})
    return resp.status, resp.content_type, await resp.text()


@pytest.fixture
async def roomy(make_gateway: Callable[..., Awaitable[Gateway]], settings: Settings) -> Gateway:
    """The gateway with the default 4 MB body limit, so that record limits are what stops a body."""
    return await make_gateway(replace(settings, max_body_bytes=4 * 1024 * 1024))


@pytest.mark.parametrize("name,body", REPORT_BODIES, ids=[n for n, _ in REPORT_BODIES])
async def test_hostile_reports_are_4xx_problems(roomy: Gateway, name: str, body: bytes) -> None:
    status, ctype, text = await send(
        roomy, "POST", REPORTS, body, {"Authorization": f"Bearer {KEY_746}", **JSON}
    )
    assert_problem(status, ctype, text, name)


@pytest.mark.parametrize("name,body", COMPAT_BODIES, ids=[n for n, _ in COMPAT_BODIES])
async def test_hostile_compat_records_are_4xx_problems(
    roomy: Gateway, name: str, body: bytes
) -> None:
    status, ctype, text = await send(
        roomy, "POST", COMPAT, body, {"Authorization": f"Bearer {KEY_746}", **JSON}
    )
    assert_problem(status, ctype, text, name)


@pytest.mark.parametrize("name,method,path,body", OPS_REQUESTS, ids=[r[0] for r in OPS_REQUESTS])
async def test_hostile_ops_requests_are_4xx_problems(
    gateway: Gateway, name: str, method: str, path: str, body: Any
) -> None:
    data = None if body is None else dumps(body)
    status, ctype, text = await send(
        gateway, method, path, data, {"Authorization": f"Bearer {OPS_TOKEN}", **JSON}
    )
    assert_problem(status, ctype, text, name)


@pytest.mark.parametrize(
    "path",
    [
        "/v1/reports/746/%ED%A0%80",
        "/v1/reports/746/%00",
        "/v1/reports/²²²/R-1",
        "/v1/reports/746/" + "x" * 65,
        f"/v1/reports/{CPR}/R-1",
        f"/v1/reports/746/{CPR}",
    ],
)
async def test_hostile_report_paths_are_4xx_problems(gateway: Gateway, path: str) -> None:
    status, ctype, text = await send(
        gateway, "GET", path, None, {"Authorization": f"Bearer {KEY_746}"}
    )
    assert_problem(status, ctype, text, path)


async def test_unknown_keys_that_look_like_a_cpr_are_not_echoed(gateway: Gateway) -> None:
    for key in (OTHER_CPR, f"x{OTHER_CPR}x", "251288-1234"):
        status, problem = await gateway.post(drive(**{key: "x"}))
        assert status == 422 and problem["errors"] == [
            {"pointer": "/<unknown key>", "message": "is not a known field"}
        ]
    status, problem = await gateway.post(drive(colour="red"))
    assert problem["errors"] == [{"pointer": "/colour", "message": "is not a known field"}]


async def test_too_many_records_is_413_naming_the_limit(roomy: Gateway) -> None:
    headers = {"Authorization": f"Bearer {KEY_746}", **JSON}
    for path, body in (
        (REPORTS, dumps({"reports": [drive(report_id=f"B{i}") for i in range(MAX_RECORDS + 1)]})),
        (COMPAT, dumps([RECORD] * (MAX_RECORDS + 1))),
    ):
        status, ctype, text = await send(roomy, "POST", path, body, headers)
        problem = assert_problem(status, ctype, text, path)
        assert (
            status == 413
            and problem["limit"] == MAX_RECORDS
            and str(MAX_RECORDS) in problem["detail"]
        )
    # exactly the limit is fine
    status, _, _ = await send(
        roomy,
        "POST",
        COMPAT,
        dumps([{**RECORD, "Id": f"C{i}"} for i in range(MAX_RECORDS)]),
        headers,
    )
    assert status == 202


async def test_body_over_the_size_limit_is_413_naming_it(gateway: Gateway) -> None:
    status, ctype, text = await send(
        gateway,
        "POST",
        REPORTS,
        b" " * (300 * 1024),
        {"Authorization": f"Bearer {KEY_746}", **JSON},
    )
    problem = assert_problem(status, ctype, text, "big")
    assert status == 413 and problem["limit"] == 256 * 1024


@pytest.mark.parametrize(
    "content_type,expected",
    [
        ("text/plain", 415),
        ("application/x-www-form-urlencoded", 415),
        ("application/xml", 415),
        ("multipart/form-data; boundary=x", 415),
        ("application/json; charset=latin-1", 415),
        ("application/json", 202),
        ("application/json; charset=UTF-8", 202),
        ("application/merge-patch+json", 202),
        (None, 202),  # no Content-Type at all: read as JSON (documented in the README)
    ],
)
async def test_content_types(gateway: Gateway, content_type: str | None, expected: int) -> None:
    headers = {"Authorization": f"Bearer {KEY_746}"}
    if content_type is not None:
        headers["Content-Type"] = content_type
    resp = await gateway.client.post(
        REPORTS, data=dumps(drive()), headers=headers, skip_auto_headers=["Content-Type"]
    )
    assert resp.status == expected, await resp.text()
    if expected == 415:
        assert_problem(resp.status, resp.content_type, await resp.text(), content_type or "")
    for path in (COMPAT, "/v1/ops/deliveries/replay"):
        resp = await gateway.client.post(
            path,
            data=b"[]",
            headers={**headers, "Authorization": "Bearer x"},
            skip_auto_headers=["Content-Type"],
        )
        assert resp.status in (401, 415)


async def test_malformed_json_with_a_json_type_is_400(gateway: Gateway) -> None:
    status, problem = await gateway.post(b'{"kind": ')
    assert status == 400 and "not valid JSON" in problem["detail"]


@pytest.mark.parametrize(
    "method,path,allowed",
    [
        ("PUT", REPORTS, "POST"),
        ("DELETE", REPORTS, "POST"),
        ("GET", COMPAT, "POST"),
        ("POST", "/healthz", "GET"),
        ("PATCH", "/v1/ops/deliveries", "GET"),
        ("POST", "/openapi.json", "GET"),
    ],
)
async def test_wrong_method_is_405_with_allow(
    gateway: Gateway, method: str, path: str, allowed: str
) -> None:
    resp = await gateway.client.request(
        method, path, headers={"Authorization": f"Bearer {KEY_746}"}
    )
    assert_problem(resp.status, resp.content_type, await resp.text(), path)
    assert resp.status == 405 and allowed in resp.headers["Allow"]


@pytest.mark.parametrize(
    "raw",
    [
        f"GET /v1/reports/746/{CPR} HTTP/1.1\r\nHost: x\r\nBad Header {CPR}\r\n\r\n".encode(),
        f"G\x00T /{CPR} HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
        f"GET /{CPR} HTTP/9.9\r\nHost: x\r\n\r\n".encode(),
        f"GET /{CPR} HTTP/1.1\r\nHost: x\r\nX-Long: {'a' * 20_000}\r\n\r\n".encode(),
        f"GET /{CPR}{'a' * 20_000} HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
        f"POST /v1/reports HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\nX: {CPR}\r\n\r\n".encode(),
        f"POST /v1/reports HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz{CPR}\r\n".encode(),
    ],
)
async def test_unparseable_http_is_a_problem_without_the_request_line(
    gateway: Gateway, raw: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    server = gateway.client.server
    reader, writer = await asyncio.open_connection(server.host, server.port)
    writer.write(raw)
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    await writer.wait_closed()
    head, _, body = answer.partition(b"\r\n\r\n")
    status = int(head.split()[1])
    content_type = next(
        line.split(b":", 1)[1].strip().decode()
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-type:")
    )
    assert_problem(status, content_type.split(";")[0], body.decode(), raw[:40].decode())
    assert CPR not in caplog.text


async def test_error_filter_is_a_substring_not_a_pattern(gateway: Gateway) -> None:
    for i in range(2):
        assert (await gateway.post(drive(report_id=f"E-{i}")))[0] == 202
    first, second = sorted(
        d["id"] for d in await gateway.store.list_deliveries({"municipality": "746"})
    )
    for delivery_id, error in ((first, "rejected: 100% wrong"), (second, "rejected: wrong_code")):
        await gateway.store.settle(
            delivery_id, Settle(Status.FAILED, last_error=error), time.time(), "test.failed"
        )
    ids = await _error_filter(gateway, "%")
    assert len(ids) == 1
    assert await _error_filter(gateway, "_") == await _error_filter(gateway, "wrong_code")
    assert len(await _error_filter(gateway, "_")) == 1
    assert await _error_filter(gateway, "\\") == [] and await _error_filter(gateway, "wrong%") == []
    assert len(await _error_filter(gateway, "rejected")) == 2
    status, result = await gateway.ops(
        "POST", "deliveries/cancel", {"reason": "test", "filter": {"error": "%%"}}
    )
    assert status == 200 and result["changed"] == []


async def _error_filter(gateway: Gateway, text: str) -> list[int]:
    resp = await gateway.client.get(
        "/v1/ops/deliveries",
        params={"error": text},
        headers={"Authorization": f"Bearer {OPS_TOKEN}"},
    )
    assert resp.status == 200, await resp.text()
    return [d["id"] for d in (await resp.json())["deliveries"]]


async def test_healthz_answers_within_100ms_while_a_huge_body_is_refused(roomy: Gateway) -> None:
    """Parsing and validating happen off the event loop: probes stay fast under a maximal body."""
    headers = {"Authorization": f"Bearer {KEY_746}", **JSON}
    bodies = [
        b"[" + b",".join([b"{}"] * 100_000) + b"]",  # 100,000 compat records
        b'{"reports": [' + b",".join([b"{}"] * 1_300_000) + b"]}",  # 3.9 MB: the whole body parses
        dumps(
            {"reports": [drive(report_id=f"V{i}", wage_code="x" * 9) for i in range(MAX_RECORDS)]}
        ),
    ]
    for path, body in ((COMPAT, bodies[0]), (REPORTS, bodies[1]), (REPORTS, bodies[2])):
        status, took, probes = await _post_while_probing(roomy, path, body, headers)
        print(
            f"\n{path} {len(body)} bytes -> {status} in {took * 1000:.0f} ms; "
            f"{len(probes)} probes, slowest {max(probes) * 1000:.1f} ms"
        )
        assert status in (413, 422), (path, status)
        assert took < (1.0 if status == 413 else 5.0), (path, took)
        assert max(probes) < 0.1, (path, sorted(probes)[-3:])


async def _post_while_probing(
    gateway: Gateway, path: str, body: bytes, headers: dict[str, str]
) -> tuple[int, float, list[float]]:
    """POST ``body`` while GET /healthz is probed again and again (at least 20 times) from
    another thread, as a load balancer would: a blocked event loop shows in its latency."""
    probes: list[float] = []
    posted = threading.Event()
    url = f"http://{gateway.client.server.host}:{gateway.client.server.port}/healthz"

    def probe() -> None:
        while len(probes) < 20 or not posted.is_set():
            started = time.perf_counter()
            with urllib.request.urlopen(url, timeout=5) as resp:
                resp.read()
            probes.append(time.perf_counter() - started)
            time.sleep(0.002)

    async def post() -> tuple[int, float]:
        await asyncio.sleep(0.05)  # the prober is running
        started = time.perf_counter()
        try:
            resp = await gateway.client.post(path, data=io.BytesIO(body), headers=headers)
            await resp.read()
        finally:
            posted.set()
        return resp.status, time.perf_counter() - started

    (status, took), _ = await asyncio.gather(post(), asyncio.to_thread(probe))
    return status, took, probes
