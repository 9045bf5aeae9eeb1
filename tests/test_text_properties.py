"""Property: no text that intake accepts can fail a vendor's schema check later for a character reason.

Reports are built with arbitrary Unicode (control characters, surrogates, non-characters,
trailing newlines after otherwise valid codes) in every text field. Whatever intake
accepts for a route is planned and rendered by that route's adapter; rendering includes
the adapter's own check against our copy of the vendor schema, which must never refuse it.
"""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters.base import Report, VendorSettings
from adapters.registry import load_adapters
from gateway.validation import normalise, validate_report, vendor_fields

ADAPTERS = load_adapters()
VENDOR = {
    "sd-koersel": VendorSettings(
        endpoint="https://sd.invalid/x", username="SYtest", password="pw", institution="XY"
    ),
    "kmd-engangsydelser": VendorSettings(endpoint="https://kmd.invalid/"),
    "kmd-ind01": VendorSettings(),
    "kmd-absence": VendorSettings(
        endpoint="https://kmd.invalid/XISOAPAdapter/MessageServlet",
        options={"senderService": "KMD_LPT_VACAB_Service"},
    ),
}
HOSTILE = st.sampled_from(
    [
        "",
        "\n",
        "\r\n",
        "\x00",
        "\t",
        "\x7f",
        "\x85",
        "\ud800",
        "\udfff",
        "\ufffe",
        "\uffff",
        "\u2028",
        "\u200b",
        "æøå",
        "Ω",
        "😀",
        "<&>",
        "]]>",
        "'\"",
    ]
)
ANY_TEXT = st.text(st.characters(codec=None, exclude_categories=()), max_size=12)


def text(core: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """Valid-looking text with hostile characters before, inside or after it."""
    return st.one_of(
        ANY_TEXT,
        st.builds(lambda a, b, c: a + b + c, HOSTILE, core, HOSTILE),
        st.builds(lambda a, b: a + b, core, HOSTILE),
        core,
    )


CODE = text(st.from_regex(r"[0-9A-Za-z]{1,8}", fullmatch=True))
DIGITS10 = text(st.from_regex(r"[0-9]{10}", fullmatch=True))
CPR = text(st.sampled_from(["0101901234", "6101901235", "3112990000"]))


@st.composite
def employee(draw: Any) -> dict[str, Any]:
    return {
        "cpr": draw(CPR),
        "employment_id": draw(text(st.from_regex(r"[0-9]{1,8}", fullmatch=True))),
        "employment_type": draw(st.integers(0, 9)),
        "extra_number": draw(st.integers(0, 9)),
        **({"institution": draw(text(st.just("XY")))} if draw(st.booleans()) else {}),
    }


@st.composite
def drive(draw: Any) -> dict[str, Any]:
    report = {
        "kind": "drive",
        "municipality": "746",
        "report_id": draw(text(st.just("R-1"))),
        "employee": draw(employee()),
        "drive_date": "2026-03-29",
        "distance_km": draw(st.sampled_from(["0.01", "12.50", "99999.99"])),
        "wage_code": draw(CODE),
        "approved_by_cpr": draw(CPR),
    }
    optional = {
        "wage_code_optional": CODE,
        "account": DIGITS10,
        "license_plate": text(st.just("AB12345")),
        "purpose": ANY_TEXT,
    }
    for key, strategy in optional.items():
        if draw(st.booleans()):
            report[key] = draw(strategy)
    if draw(st.booleans()):
        report["route"] = {
            "from": draw(ANY_TEXT),
            "to": draw(ANY_TEXT),
            "via": draw(st.lists(ANY_TEXT, max_size=2)),
        }
    return report


@st.composite
def vacation(draw: Any) -> dict[str, Any]:
    kind = draw(st.sampled_from(["regular", "sixth_week", "care", "senior"]))
    return {
        "kind": "vacation",
        "municipality": "746",
        "report_id": draw(text(st.just("V-1"))),
        "employee": draw(employee()),
        "start_date": "2026-07-06",
        "end_date": "2026-07-10",
        "vacation_type": kind,
        **({"child_number": 1} if kind == "care" else {}),
    }


def accepted(report: dict[str, Any], adapter: Any) -> bool:
    return not validate_report(report) and not vendor_fields(report, adapter, "")


def render_everything(name: str, report: dict[str, Any]) -> None:
    adapter, vendor = ADAPTERS[name], VENDOR[name]
    typed = Report.from_dict(normalise(report))
    if adapter.file_based:
        _, failures = adapter.render_file([typed], vendor)
        assert not failures, failures
        return
    for message in adapter.plan(typed, [], vendor).messages:
        adapter.render(
            typed, message, vendor
        )  # raises InvalidPayload if our vendor schema refuses it


SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(drive(), st.sampled_from(["sd-koersel", "kmd-engangsydelser", "kmd-ind01"]))
def test_accepted_drive_text_always_renders(report: dict[str, Any], name: str) -> None:
    if accepted(report, ADAPTERS[name]):
        render_everything(name, report)


@SETTINGS
@given(vacation())
def test_accepted_vacation_text_always_renders(report: dict[str, Any]) -> None:
    if accepted(report, ADAPTERS["kmd-absence"]):
        render_everything("kmd-absence", report)


@given(st.sampled_from(["0201\n", "0201\r\n", "0201\x00", "\x000201"]))
def test_a_valid_code_with_a_control_character_is_never_accepted(code: str) -> None:
    report = {
        "kind": "drive",
        "municipality": "746",
        "report_id": "R-1",
        "employee": {"cpr": "0101901234", "employment_id": "1"},
        "drive_date": "2026-03-29",
        "distance_km": "1.00",
        "wage_code": code,
        "approved_by_cpr": "0202802345",
    }
    assert {e.pointer for e in validate_report(report)} == {"/wage_code"}
