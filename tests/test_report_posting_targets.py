"""account, cost_center and psp_element on a drive report: formats, lengths, and one at most."""

from __future__ import annotations

from typing import Any

import pytest

from adapters.base import Report
from gateway.validation import normalise, validate_report
from tests.conftest import Gateway, drive


def problems(**over: Any) -> list[tuple[str, str]]:
    return [(e.pointer, e.message) for e in validate_report(drive(**over))]


@pytest.mark.parametrize(
    "over",
    [
        {"cost_center": "4711"},
        {"cost_center": "1234567890"},
        {"psp_element": "XG-0000012345-00001"},
        {"psp_element": "A" * 24},
        {"psp_element": "1.2-3"},
        {"account": "1234567890", "cost_center": None},
    ],
)
def test_valid_posting_targets(over: dict[str, Any]) -> None:
    assert problems(**over) == []
    report = Report.from_dict(normalise(drive(**over)))
    assert (report.cost_center, report.psp_element) == (
        over.get("cost_center"),
        over.get("psp_element"),
    )


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("cost_center", ""),
        ("cost_center", "12345678901"),  # KMD's Afv_Omkostningssted holds at most 10 digits
        ("cost_center", "12A4"),
        ("cost_center", "4711\n"),  # Python's $ would match before a trailing newline
        ("psp_element", "A" * 25),  # Afv_PSP_Element holds at most 24 characters
        ("psp_element", "-XG"),
        ("psp_element", "XG 1"),
        ("psp_element", "XG-1\n"),
        ("psp_element", "XG-1\r\n"),
        ("psp_element", 12),
    ],
)
def test_what_kmd_cannot_carry_is_refused(field: str, value: Any) -> None:
    found = problems(**{field: value})
    assert found and {pointer for pointer, *_ in found} == {f"/{field}"}


@pytest.mark.parametrize(
    ("over", "pointers"),
    [
        ({"account": "1234567890", "cost_center": "4711"}, ["/cost_center"]),
        ({"account": "1234567890", "psp_element": "XG-1"}, ["/psp_element"]),
        ({"cost_center": "4711", "psp_element": "XG-1"}, ["/psp_element"]),
        (
            {"account": "1234567890", "cost_center": "4711", "psp_element": "XG-1"},
            ["/cost_center", "/psp_element"],
        ),
    ],
)
def test_never_two_posting_targets(over: dict[str, Any], pointers: list[str]) -> None:
    found = problems(**over)
    assert [p for p, _ in found] == pointers
    assert all("give only one of account, cost_center and psp_element" in m for _, m in found)


async def test_two_posting_targets_are_422_at_intake_with_a_pointer(gateway: Gateway) -> None:
    ok = drive(report_id="ok")
    both = drive(report_id="both", account="1234567890", psp_element="XG-1")
    status, problem = await gateway.post({"reports": [ok, both]})
    assert status == 422
    assert problem["errors"] == [
        {
            "pointer": "/reports/1/psp_element",
            "message": "not allowed together with account: give only one of account, cost_center "
            "and psp_element",
        }
    ]
