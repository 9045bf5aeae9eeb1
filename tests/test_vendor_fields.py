"""Intake refuses at the door what the route's vendor cannot carry: 422 with pointers, nothing stored."""

from __future__ import annotations

import json
from typing import Any

import pytest

from adapters.registry import load_adapters
from gateway.compat import to_canonical
from gateway.validation import validate_report, vendor_fields
from tests.conftest import KEY_746, Gateway, drive
from tests.test_compat import PASCAL
from tests.test_file_runs import KEY_851, gw, ind01_settings  # noqa: F401 (fixtures)


def pointers(problem: Any) -> set[str]:
    return {e["pointer"] for e in problem["errors"]}


async def test_ind01_needs_employment_type_and_extra_number(gw: Gateway) -> None:  # noqa: F811
    report = drive(municipality="851", report_id="I-1")
    status, problem = await gw.post(report, key=KEY_851)
    assert status == 422
    assert pointers(problem) == {"/employee/employment_type", "/employee/extra_number"}
    assert all("kmd-ind01" in e["message"] for e in problem["errors"])
    assert (await gw.get("851", "I-1", key=KEY_851))[0] == 404
    report["employee"].update(employment_type=1, extra_number=0)
    assert (await gw.post(report, key=KEY_851))[0] == 202


async def test_a_batch_points_at_the_report_that_lacks_a_field(gw: Gateway) -> None:  # noqa: F811
    good = drive(municipality="851", report_id="I-2")
    good["employee"].update(employment_type=1, extra_number=0)
    bad = drive(municipality="851", report_id="I-3")
    bad["employee"]["employment_type"] = 1
    status, problem = await gw.post({"reports": [good, bad]}, key=KEY_851)
    assert status == 422 and pointers(problem) == {"/reports/1/employee/extra_number"}
    assert (await gw.get("851", "I-2", key=KEY_851))[0] == 404  # atomic: nothing stored


async def test_sd_needs_the_approver(gateway: Gateway) -> None:
    report = drive()
    del report["approved_by_cpr"]
    status, problem = await gateway.post(report)
    assert status == 422 and pointers(problem) == {"/approved_by_cpr"}
    assert "sd-koersel" in problem["errors"][0]["message"]


async def test_compat_points_at_the_senders_key_for_a_vendor_field(gateway: Gateway) -> None:
    record = {**PASCAL, "ApprovedByCpr": None}
    resp = await gateway.client.post(
        "/v1/compat/os2indberetning/drive-reports",
        json=[record],
        headers={"Authorization": f"Bearer {KEY_746}"},
    )
    assert resp.status == 422
    assert pointers(await resp.json()) == {"/0/ApprovedByCpr"}


@pytest.mark.parametrize(
    ("field", "value", "pointer"),
    [
        ("wage_code", "0201\n", "/wage_code"),  # Python's $ matches before a final newline
        ("wage_code_optional", "0202\n", "/wage_code_optional"),
        ("account", "1234567890\n", "/account"),
        ("license_plate", "AB\x0012345", "/license_plate"),
        ("purpose", "møde\x1b[2J", "/purpose"),
        ("report_id", "R-\u00851", "/report_id"),  # C1 NEL
        ("report_id", "R-\ud800", "/report_id"),  # a lone surrogate
        ("purpose", "\ufffe", "/purpose"),
    ],
)
async def test_text_with_control_characters_is_refused(
    gateway: Gateway, field: str, value: str, pointer: str
) -> None:
    status, problem = await gateway.post(drive(**{field: value}))
    assert status == 422
    assert pointer in pointers(problem)
    assert any("U+" in e["message"] for e in problem["errors"])


async def test_a_control_character_in_a_nested_text_is_pointed_at(gateway: Gateway) -> None:
    report = drive(route={"from": "Vejle", "to": "Horsens", "via": ["Juelsminde", "Hed\tensted"]})
    report["employee"]["employment_id"] = "00\n123"
    status, problem = await gateway.post(report)
    assert status == 422
    assert pointers(problem) == {"/route/via/1", "/employee/employment_id"}


def test_compat_mapping_keeps_a_trailing_newline_for_validation_to_refuse() -> None:
    # _text() strips outer blanks, so "0201\n" arrives as "0201"; inner ones stay and are refused
    assert to_canonical({**PASCAL, "TFCode": "02\n01"}, "746")["wage_code"] == "02\n01"


@pytest.mark.parametrize(
    ("adapter", "field", "value"),
    [
        (
            "kmd-engangsydelser",
            "/employee/employment_id",
            "00-123",
        ),  # Medarbejdernummer: letters and digits
        ("kmd-engangsydelser", "/wage_code", "02A1"),  # Loenart: 4 digits
        ("kmd-ind01", "/wage_code", "201"),  # 4 characters in the record
        ("kmd-ind01", "/wage_code_optional", "02011"),
    ],
)
def test_a_format_narrower_than_the_schema_is_refused_for_that_vendor(
    adapter: str, field: str, value: str
) -> None:
    report = drive(
        employee={
            "cpr": "0101901234",
            "employment_id": "00123",
            "employment_type": 1,
            "extra_number": 0,
        }
    )
    target = report["employee"] if field.startswith("/employee/") else report
    target[field.rsplit("/", 1)[1]] = value
    assert not validate_report(report)  # the canonical schema takes it
    [error] = vendor_fields(report, load_adapters()[adapter], "/3")
    assert error.pointer == "/3" + field and adapter in error.message
    assert not vendor_fields(report, load_adapters()["sd-koersel"], "")  # SD takes it as it is


@pytest.mark.parametrize("report_id", ["0101901234", "R-010190-1234", "010190 1234 trip"])
async def test_a_report_id_holding_a_cpr_is_refused(gateway: Gateway, report_id: str) -> None:
    status, problem = await gateway.post(drive(report_id=report_id))
    assert status == 422 and pointers(problem) == {"/report_id"}
    assert "1234" not in json.dumps(problem)
