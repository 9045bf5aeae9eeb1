"""OS2indberetning's export format, accepted as it is, delivered with dates as written."""

from __future__ import annotations

from typing import Any

from aiohttp.test_utils import TestServer

from gateway.simulators.sd import STATE as SD_STATE
from tests.conftest import KEY_746, Gateway

PASCAL = {
    "Id": 5001,
    "CprNumber": "0101901234",
    "TFCode": "0201",
    "TFCodeOptional": None,
    "AccountNumber": "",
    "EmploymentId": "00123",
    "DistanceMeters": 12345.0,
    "DriveDate": "2026-03-29T00:00:00",
    "ExtraNumber": 0,
    "EmploymentType": 1,
    "InstituteCode": "XY",
    "ApprovedByCpr": "0202802345",
    "LicensePlate": "AB12345",
}


def camel(record: dict[str, Any]) -> dict[str, Any]:
    return {k[0].lower() + k[1:]: v for k, v in record.items()}


async def post(gateway: Gateway, records: Any) -> tuple[int, Any]:
    resp = await gateway.client.post(
        "/v1/compat/os2indberetning/drive-reports",
        json=records,
        headers={"Authorization": f"Bearer {KEY_746}"},
    )
    return resp.status, await resp.json(content_type=None)


async def test_pascal_and_camel_case_records_are_delivered(
    gateway: Gateway, sd_server: TestServer
) -> None:
    records = [PASCAL, camel({**PASCAL, "Id": 5002, "TFCodeOptional": "0202"})]
    status, body = await post(gateway, records)
    assert status == 202
    assert [r["report_id"] for r in body["reports"]] == ["5001", "5002"]
    await gateway.wait_for("5001", {"delivered"})
    await gateway.wait_for("5002", {"delivered"})
    got = sorted((a.wage_code, str(a.km)) for a in sd_server.app[SD_STATE].accepted)
    assert got == [("0201", "12.35"), ("0201", "12.35"), ("0202", "12.35")]


async def test_drive_date_on_dst_sundays_arrives_as_written(
    gateway: Gateway, sd_server: TestServer
) -> None:
    records = [
        {**PASCAL, "Id": 1, "DriveDate": "2026-03-29T00:00:00"},  # last Sunday of March
        {**PASCAL, "Id": 2, "DriveDate": "2026-10-25T00:00:00+02:00"},  # last Sunday of October
        {**PASCAL, "Id": 3, "DriveDate": "2026-10-25T23:30:00+01:00"},
    ]
    assert (await post(gateway, records))[0] == 202
    for rid in ("1", "2", "3"):
        await gateway.wait_for(rid, {"delivered"})
    dates = sorted(a.date.isoformat() for a in sd_server.app[SD_STATE].accepted)
    assert dates == ["2026-03-29", "2026-10-25", "2026-10-25"]


async def test_drive_date_with_an_offset_is_the_danish_date(
    gateway: Gateway, sd_server: TestServer
) -> None:
    records = {
        "11": "2026-10-31T23:00:00+00:00",  # a UTC host's midnight of 1 November
        "12": "2026-03-28T23:30:00Z",  # summer time has begun: 29 March in Denmark
        "13": "2026-10-25T00:00:00",  # no offset: the date as written
    }
    body = [{**PASCAL, "Id": int(rid), "DriveDate": when} for rid, when in records.items()]
    assert (await post(gateway, body))[0] == 202
    for rid in records:
        await gateway.wait_for(rid, {"delivered"})
    got = {a.date.isoformat() for a in sd_server.app[SD_STATE].accepted}
    assert got == {"2026-11-01", "2026-03-29", "2026-10-25"}
    stored = await (
        await gateway.client.get(
            "/v1/reports/746/11", headers={"Authorization": f"Bearer {KEY_746}"}
        )
    ).json()
    assert stored["versions"][0]["report"]["drive_date"] == "2026-11-01"


async def test_errors_point_at_the_senders_keys(gateway: Gateway) -> None:
    status, problem = await post(
        gateway, [PASCAL, {**PASCAL, "Id": 7, "CprNumber": "123", "DistanceMeters": "far"}]
    )
    assert status == 422
    pointers = {e["pointer"] for e in problem["errors"]}
    assert pointers == {"/1/CprNumber", "/1/DistanceMeters"}
    assert "123" not in str([e["message"] for e in problem["errors"]])


async def test_not_an_array_is_422(gateway: Gateway) -> None:
    status, problem = await post(gateway, {"Id": 1})
    assert status == 422 and problem["errors"][0]["pointer"] == "/"
