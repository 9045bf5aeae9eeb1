"""What kmd-absence renders, and what the KMD simulator answers, against KMD's own WSDL schemas."""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from adapters.base import Report, VendorSettings
from adapters.kmd_absence import KmdAbsence
from adapters.soap import parse_xml
from gateway.simulators import SimulatorOptions
from gateway.simulators.kmd import PATH, build_app
from tests.conformance.kmd_vendor_schema import kmd_read_vendor_validator, kmd_vendor_validator

TESTS = Path(__file__).resolve().parents[1]
GOLDEN = sorted((TESTS / "adapters" / "golden" / "kmd-absence").glob("*/*.xml"))
REPORTS = sorted((TESTS / "data" / "reports").glob("vacation-*.json"))
SETTINGS = VendorSettings(options={"senderService": "KMD_LPT_VACAB_Service"})
ADAPTER = KmdAbsence()


def test_there_is_something_to_check() -> None:
    assert len(GOLDEN) >= 10 and len(REPORTS) >= 5


@pytest.mark.parametrize("path", GOLDEN, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_golden_body_is_valid_for_kmd(path: Path) -> None:
    validate = kmd_vendor_validator()
    assert validate(path.read_bytes()) == []


def rendered(path: Path) -> list[bytes]:
    report = Report.from_dict(json.loads(path.read_text()))
    plan = ADAPTER.plan(report, [], SETTINGS)
    return [ADAPTER.render(report, m, SETTINGS).body for m in plan.messages]


@pytest.mark.parametrize("path", REPORTS, ids=lambda p: p.stem)
def test_rendered_body_is_valid_for_kmd(path: Path) -> None:
    validate = kmd_vendor_validator()
    for body in rendered(path):
        assert validate(body) == []


def test_vendor_schema_does_catch_a_wrong_order() -> None:
    validate = kmd_vendor_validator()
    [body] = rendered(TESTS / "data" / "reports" / "vacation-regular.json")
    swapped = body.replace(b"<StartDate>", b"<X>").replace(b"</StartDate>", b"</X>")
    assert validate(swapped)  # an unknown element first: the vendor schema must object


def test_read_request_is_valid_for_kmd() -> None:
    report = Report.from_dict(json.loads(REPORTS[0].read_text()))
    payload = ADAPTER.render_read(report, date(2026, 1, 1), date(2026, 12, 31), SETTINGS)
    assert kmd_read_vendor_validator()(payload.body) == []


async def test_simulator_answers_are_valid_for_kmd(aiohttp_client: Any) -> None:
    client: TestClient = await aiohttp_client(build_app(SimulatorOptions()))
    query = (
        "?senderParty=&senderService=S&receiverParty=&receiverService="
        "&interfaceNamespace=urn%3Akmd.dk%3ALPT%3AVACAB%3Aexternal&interface="
    )
    report = Report.from_dict(
        json.loads((TESTS / "data" / "reports" / "vacation-care.json").read_text())
    )
    [body] = rendered(TESTS / "data" / "reports" / "vacation-care.json")
    resp = await client.post(PATH + query + "SetAbsenceAttendance_OS_SI", data=body)
    assert resp.status == 200
    assert kmd_vendor_validator()(await resp.read()) == []
    read = ADAPTER.render_read(report, date(2026, 1, 1), date(2026, 12, 31), SETTINGS)
    resp = await client.post(PATH + query + "GetAbsenceAttendanceByPeriod_OS_SI", data=read.body)
    answer = await resp.read()
    assert kmd_read_vendor_validator()(answer) == []
    assert len(parse_xml(answer).findall(".//AbsenceAttendance/item")) == 1
