"""The operations API's read side: the newest-first list with its cursor, count and filters
(a bad value is 400 naming the field), one delivery's detail, the overview per endpoint,
times in ISO 8601, and no CPR number in any answer. Both engines."""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pytest

from gateway.ops import day_start, decode_cursor, encode_cursor
from gateway.settings import Operator, Settings, hash_api_key
from tests.conftest import OPS_TOKEN, Gateway, drive

CPR, OTHER_CPR, APPROVER = "0101901234", "1502851111", "0202802345"
ISO = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}\+00:00$")
VIEWER_746 = "viewer-746-token"


@pytest.fixture
async def gw(make_gateway: Callable[..., Awaitable[Gateway]], settings: Settings) -> Gateway:
    """The app without its dispatcher: what is listed stays as it was stored."""
    operators = {
        **settings.operators,
        "v746": Operator("v746", hash_api_key(VIEWER_746), "viewer", frozenset({"746"})),
    }
    return await make_gateway(replace(settings, operators=operators), run_dispatcher=False)


def _times(node: Any, path: str = "") -> list[tuple[str, Any]]:
    """Every (path, value) of a key that names a time (``*_at`` or ``at``)."""
    if isinstance(node, dict):
        found = []
        for k, v in node.items():
            if (k.endswith("_at") or k == "at") and v is not None:
                found.append((f"{path}/{k}", v))
            found += _times(v, f"{path}/{k}")
        return found
    if isinstance(node, list):
        return [t for i, v in enumerate(node) for t in _times(v, f"{path}/{i}")]
    return []


def assert_iso_and_no_cpr(answer: Any) -> None:
    for where, value in _times(answer):
        assert isinstance(value, str) and ISO.match(value), (where, value)
    text = json.dumps(answer)
    for cpr in (CPR, OTHER_CPR, APPROVER):
        assert cpr not in text and f"{cpr[:6]}-{cpr[6:]}" not in text


async def submit(gw: Gateway, reports: list[dict[str, Any]], key: str | None = None) -> None:
    status, body = await (
        gw.post({"reports": reports}) if key is None else gw.post({"reports": reports}, key=key)
    )
    assert status == 202, body


async def test_pages_follow_the_cursor_newest_first_and_count_everything(gw: Gateway) -> None:
    await submit(
        gw,
        [
            drive(report_id=f"R-{i}", employee={"cpr": CPR, "employment_id": f"E{i}"})
            for i in range(25)
        ],
    )
    seen: list[int] = []
    cursor: str | None = None
    pages = 0
    for _ in range(4):  # 25 rows at 10 a page: 3 pages, never more
        query = "deliveries?limit=10" + (f"&cursor={cursor}" if cursor else "")
        status, body = await gw.ops("GET", query)
        assert status == 200, body
        assert body["count"] == 25  # the whole result, on every page
        assert_iso_and_no_cpr(body)
        seen += [d["id"] for d in body["deliveries"]]
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            break
    else:
        raise AssertionError(f"next_cursor did not come to an end: {len(seen)} rows read")
    assert pages == 3 and len(seen) == 25 == len(set(seen))
    assert seen == sorted(seen, reverse=True)
    status, body = await gw.ops("GET", "deliveries?limit=25")
    assert len(body["deliveries"]) == 25 and body["next_cursor"] is None


@pytest.mark.parametrize(
    ("query", "pointer"),
    [
        ("status=stuck", "/status"),
        ("municipality=74", "/municipality"),
        ("municipality=abc", "/municipality"),
        ("adapter=nope", "/adapter"),
        ("period=2026-13", "/period"),
        ("period=2026-3", "/period"),
        ("at_risk=maybe", "/at_risk"),
        ("cpr=01019012345", "/cpr"),
        ("cpr=0101", "/cpr"),
        ("since=yesterday", "/since"),
        ("cursor=zz", "/cursor"),
        ("cursor=", "/cursor"),
        ("cursor=8000000000000000", "/cursor"),  # past the largest id
        ("color=red", "/color"),
    ],
)
async def test_a_bad_filter_value_is_400_naming_the_field(
    gw: Gateway, query: str, pointer: str
) -> None:
    resp = await gw.client.get(
        f"/v1/ops/deliveries?{query}", headers={"Authorization": f"Bearer {OPS_TOKEN}"}
    )
    body = await resp.json()
    assert resp.status == 400 and resp.content_type == "application/problem+json", body
    assert [e["pointer"] for e in body["errors"]] == [pointer]
    assert "01019012345" not in json.dumps(body)  # a typed CPR is never echoed


async def test_filters_by_period_employee_held_and_full_cpr(gw: Gateway) -> None:
    await submit(
        gw,
        [
            drive(report_id="A-1", drive_date="2026-03-02"),
            drive(report_id="A-2", drive_date="2026-04-02"),  # same employee: held behind A-1
            drive(
                report_id="B-1",
                drive_date="2026-04-09",
                employee={"cpr": OTHER_CPR, "employment_id": "00999"},
                purpose=f"med {CPR} i bilen",
            ),
        ],
    )

    async def ids(query: str) -> list[str]:
        status, body = await gw.ops("GET", f"deliveries?{query}")
        assert status == 200, body
        assert_iso_and_no_cpr(body)
        assert body["count"] == len(body["deliveries"])
        return [d["report_id"] for d in body["deliveries"]]

    assert await ids("period=2026-04") == ["B-1", "A-2"]
    assert await ids("employee=00123") == ["A-2", "A-1"]
    assert await ids("status=held") == ["A-2"]
    assert await ids(f"cpr={CPR}") == ["A-2", "A-1"]  # the employee's CPR, not one in a text
    assert await ids(f"cpr={OTHER_CPR[:6]}-{OTHER_CPR[6:]}") == ["B-1"]
    assert await ids("cpr=3112991234") == []
    assert await ids("adapter=kmd-absence") == []  # known, not routed here: nothing, not 400
    assert await ids("municipality=746&period=2026-03&adapter=sd-koersel") == ["A-1"]


async def test_an_operator_counts_and_sees_only_its_municipalities(gw: Gateway) -> None:
    await submit(gw, [drive(report_id="A-1")])
    from tests.conftest import KEY_840

    await submit(gw, [drive(report_id="C-1", municipality="840")], key=KEY_840)
    status, body = await gw.ops("GET", "deliveries", token=VIEWER_746)
    assert status == 200 and body["count"] == 1
    assert [d["municipality"] for d in body["deliveries"]] == ["746"]
    status, _ = await gw.ops("GET", "deliveries?municipality=840", token=VIEWER_746)
    assert status == 403
    status, everything = await gw.ops("GET", "deliveries")
    assert everything["count"] == 2
    c1 = next(d["id"] for d in everything["deliveries"] if d["report_id"] == "C-1")
    assert (await gw.ops("GET", f"deliveries/{c1}", token=VIEWER_746))[0] == 403
    status, rows = await gw.ops("GET", "overview", token=VIEWER_746)
    assert status == 200 and {r["municipality"] for r in rows["endpoints"]} == {"746"}


async def test_the_detail_of_one_delivery(gw: Gateway) -> None:
    await submit(gw, [drive(report_id="A-1", purpose=f"kørsel for {CPR}")])
    _, listed = await gw.ops("GET", "deliveries")
    [row] = listed["deliveries"]
    status, detail = await gw.ops("GET", f"deliveries/{row['id']}")
    assert status == 200, detail
    assert_iso_and_no_cpr(detail)
    # the list's row (its attempt count as attempt_count), and more
    assert {k: detail[k] for k in row if k != "attempts"} == {
        k: v for k, v in row.items() if k != "attempts"
    }
    assert detail["attempt_count"] == row["attempts"] == 0
    assert detail["report"]["employee"] == {"employment_id": "00123", "cpr": "xxxxxx-xxxx"}
    [version] = detail["versions"]
    assert version["body"]["purpose"] == "kørsel for xxxxxx-xxxx"
    assert detail["attempts"] == [] and detail["audit"][0]["event"] == "delivery.queued"
    assert (await gw.ops("GET", f"deliveries/{row['id'] + 100}"))[0] == 404
    assert (await gw.ops("GET", "deliveries/0"))[0] == 404
    status, audit = await gw.ops("GET", f"deliveries/{row['id']}/audit")
    assert status == 200 and audit["events"] and all(ISO.match(e["at"]) for e in audit["events"])


async def test_the_overview_joins_the_endpoint_and_counts_by_state(gw: Gateway) -> None:
    await submit(gw, [drive(report_id="A-1"), drive(report_id="A-2")])
    status, body = await gw.ops("GET", "overview")
    assert status == 200, body
    assert_iso_and_no_cpr(body)
    rows = {(r["municipality"], r["adapter"]): r for r in body["endpoints"]}
    sd = rows[("746", "sd-koersel")]
    assert (sd["queued"], sd["held"], sd["delivered_today"], sd["p95_latency_ms_1h"]) == (
        1,
        1,
        0,
        None,
    )
    assert sd["endpoint"]["breaker"] == "closed" and sd["endpoint"]["paused"] is False
    shown = await gw.store.count_by_shown_status()
    assert sum(r["queued"] for r in body["endpoints"]) == shown["queued"]
    # an endpoint with no deliveries yet is listed with zeros
    assert rows[("840", "sd-koersel")]["queued"] == 0
    status, _ = await gw.ops("POST", "endpoints/746/sd-koersel/pause", {"reason": "vendor down"})
    assert status == 200
    _, body = await gw.ops("GET", "overview")
    [sd] = [r for r in body["endpoints"] if r["municipality"] == "746"]
    assert sd["endpoint"]["paused"] is True and sd["endpoint"]["pause_reason"] == "vendor down"
    start = datetime.fromisoformat(body["day_start_at"])
    assert start <= datetime.now(UTC) and (datetime.now(UTC) - start).total_seconds() < 86400


@pytest.mark.parametrize(
    ("now", "midnight"),
    [
        ("2026-01-15T12:00:00+00:00", "2026-01-14T23:00:00+00:00"),  # winter: UTC+1
        ("2026-07-01T12:00:00+00:00", "2026-06-30T22:00:00+00:00"),  # summer: UTC+2
        ("2026-03-29T22:30:00+00:00", "2026-03-29T22:00:00+00:00"),  # 00:30 after the change
        ("2026-03-29T21:59:00+00:00", "2026-03-28T23:00:00+00:00"),  # 23:59 on the day of it
        ("2026-10-25T12:00:00+00:00", "2026-10-24T22:00:00+00:00"),  # back to winter that day
    ],
)
def test_the_day_starts_at_midnight_in_copenhagen(now: str, midnight: str) -> None:
    assert day_start(datetime.fromisoformat(now).timestamp()) == (
        datetime.fromisoformat(midnight).timestamp()
    )


@pytest.mark.parametrize("last_id", [1, 15, 16, 2**40, 2**59, 2**63 - 1])
def test_a_cursor_gives_back_its_id(last_id: int) -> None:
    assert decode_cursor(encode_cursor(last_id)) == last_id
