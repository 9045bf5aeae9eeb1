"""kmd-ind01: the 55-character record, grouping, guards, and the per-report adapter."""

from __future__ import annotations

from datetime import date
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.base import (
    Adapter,
    DeliveredPart,
    InvalidPayload,
    Plan,
    Rejected,
    Report,
    VendorSettings,
)
from adapters.kmd_ind01 import (
    DEFAULT_ENCODING,
    RECORD_LENGTH,
    FieldOverflow,
    Group,
    KmdInd01,
    check_settings,
    file_encoding,
    format_record,
    group,
    header_line,
    last_day_of_month,
    parse_record,
    records,
    render_file,
)

GOLDEN = Path(__file__).parent / "golden" / "kmd-ind01"
ADAPTER = KmdInd01()
PLAIN = VendorSettings()


def drive(**over: Any) -> Report:
    employee = {
        "cpr": "0101901234",
        "employment_id": "E1",
        "employment_type": 1,
        "extra_number": 0,
        **over.pop("employee", {}),
    }
    data: dict[str, Any] = {
        "kind": "drive",
        "municipality": "851",
        "report_id": "R-1",
        "version": 1,
        "employee": employee,
        "drive_date": "2024-11-27",
        "distance_km": "12.5",
        "wage_code": "6666",
        "approved_by_cpr": "0202801234",
    }
    data.update(over)
    return Report.from_dict(data)


def test_record_matches_the_old_writers_own_test_case() -> None:
    # OS2indberetning's FileRecordTest: municipality 123, type 9, extra 5, 123500 m, 27 Jan 2020
    report = drive(
        municipality="123",
        drive_date="2020-01-27",
        distance_km="123.5",
        employee={"cpr": "8512481230", "employment_type": 9, "extra_number": 5},
    )
    for account, middle in ((None, " " * 13), ("9999999999", "   9999999999")):
        (g,) = group([Report.from_dict({**_as_dict(report), "account": account})])
        assert format_record(g, PLAIN) == f"DA6012398512481230566660123500000000{middle}310120"


def _as_dict(r: Report) -> dict[str, Any]:
    return {
        "kind": "drive",
        "municipality": r.municipality,
        "report_id": r.report_id,
        "employee": {
            "cpr": r.employee.cpr,
            "employment_id": r.employee.employment_id,
            "employment_type": r.employee.employment_type,
            "extra_number": r.employee.extra_number,
        },
        "drive_date": str(r.drive_date),
        "distance_km": str(r.distance_km),
        "wage_code": r.wage_code,
        "approved_by_cpr": r.approved_by_cpr,
    }


def test_group_sums_per_employment_wage_code_account_and_month() -> None:
    reports = [
        drive(report_id="a", drive_date="2024-11-03", distance_km="10.25"),
        drive(report_id="b", drive_date="2024-11-29", distance_km="4.50"),
        drive(report_id="c", drive_date="2024-12-01", distance_km="1"),
        drive(report_id="d", account="1234567890", distance_km="2"),
        drive(report_id="e", wage_code_optional="7777", distance_km="3"),
        drive(report_id="f", cancelled=True, distance_km="99"),
    ]
    got = {
        (g.wage_code, g.account, g.month_end): (g.km, [c[1] for c in g.covers])
        for g in group(reports)
    }
    assert got == {
        ("6666", None, date(2024, 11, 30)): (Decimal("17.75"), ["a", "b", "e"]),
        ("6666", None, date(2024, 12, 31)): (Decimal("1"), ["c"]),
        ("6666", "1234567890", date(2024, 11, 30)): (Decimal("2"), ["d"]),
        ("7777", None, date(2024, 11, 30)): (Decimal("3"), ["e"]),
    }
    assert group(reports)[0].covers[0] == ("851", "a", 1)


@pytest.mark.parametrize(
    ("over", "options", "reason"),
    [
        ({"distance_km": "10000"}, {}, "km x 100"),
        ({"wage_code": "123"}, {}, "wage code"),
        ({"wage_code": "12345"}, {}, "wage code"),
        ({}, {"kmd_municipality": "12345"}, "municipality"),
    ],
)
def test_values_that_do_not_fit_fail_the_group(
    over: dict[str, Any], options: dict[str, Any], reason: str
) -> None:
    (g,) = group([drive(**over)])
    with pytest.raises(FieldOverflow, match=reason) as err:
        format_record(g, VendorSettings(options=options))
    assert "0101901234" not in str(err.value) and "0101901234" not in repr(g)


def test_bad_cpr_and_account_fail_with_the_cpr_masked() -> None:
    (g,) = group([drive()])
    for bad in (
        Group(**{**_fields(g), "cpr": "01019012345"}),
        Group(**{**_fields(g), "cpr": "010190123X"}),
        Group(**{**_fields(g), "account": "12345"}),
    ):
        with pytest.raises(FieldOverflow) as err:
            format_record(bad, PLAIN)
        assert "0101901234" not in err.value.message and "010190123X" not in err.value.message


def _fields(g: Group) -> dict[str, Any]:
    return {name: getattr(g, name) for name in Group.__slots__}


def test_conflicting_people_in_one_group_fail() -> None:
    reports = [drive(report_id="a"), drive(report_id="b", employee={"cpr": "0202901234"})]
    written, failures = records(reports, PLAIN)
    assert written == [] and "disagree" in failures[0].reason


def test_render_file_golden_with_header_zero_km_skipped_and_failures() -> None:
    reports = [
        drive(report_id="a", drive_date="2024-11-03", distance_km="10.25"),
        drive(report_id="b", account="1234567890", wage_code_optional="7777"),
        drive(report_id="z", employee={"employment_id": "E2"}, distance_km="0"),
        drive(report_id="x", employee={"employment_id": "E3"}, wage_code="12"),
    ]
    settings_ = VendorSettings(
        options={"kmd_municipality": "0851", "municipality_name": "Test Kommune"}
    )
    body, failures = render_file(reports, settings_)
    assert body == (GOLDEN / "ind01.txt").read_bytes()  # CRLF, header included
    assert [(f.group.covers, "wage code" in f.reason) for f in failures] == [
        ((("851", "x", 1),), True)
    ]
    lines = body.split(b"\r\n")
    assert lines[-1] == b"" and b"\n" not in b"".join(lines)  # every line, header too, ends CRLF
    assert all(len(line) == RECORD_LENGTH for line in lines[1:-1])


def test_header_line_is_configurable() -> None:
    assert header_line(PLAIN, "851") == "851 Kommune"
    assert header_line(VendorSettings(options={"file_header": "026 Test Kommune"}), "851") == (
        "026 Test Kommune"
    )
    with pytest.raises(ValueError):
        header_line(VendorSettings(options={"file_header": "a\nb"}), "851")


@pytest.mark.parametrize(
    ("day", "last"),
    [
        ("2024-02-10", "2024-02-29"),
        ("2023-02-28", "2023-02-28"),
        ("2024-12-31", "2024-12-31"),
        ("2024-04-01", "2024-04-30"),
    ],
)
def test_last_day_of_month(day: str, last: str) -> None:
    assert last_day_of_month(date.fromisoformat(day)) == date.fromisoformat(last)


# -- property: every line is 55 chars with every field in place, or the group fails ---------

digits = st.text("0123456789", min_size=0, max_size=12)


@settings(max_examples=300, deadline=None)
@given(
    municipality=st.text("0123456789", min_size=1, max_size=5),
    cpr=digits,
    wage_code=st.text("0123456789AB", min_size=2, max_size=5),
    km=st.decimals(0, 20000, places=3),
    account=st.none() | digits,
    employment_type=st.none() | st.integers(0, 12),
    extra_number=st.none() | st.integers(0, 12),
    day=st.dates(date(2000, 1, 1), date(2099, 12, 31)),
)
def test_every_record_parses_back_or_fails_with_a_reason(
    municipality: str,
    cpr: str,
    wage_code: str,
    km: Decimal,
    account: str | None,
    employment_type: int | None,
    extra_number: int | None,
    day: date,
) -> None:
    g = Group(
        municipality,
        "E1",
        cpr,
        employment_type,
        extra_number,
        wage_code,
        account,
        last_day_of_month(day),
        km,
        (("851", "r", 1),),
    )
    try:
        line = format_record(g, PLAIN)
    except FieldOverflow as exc:
        assert exc.message and (len(cpr) < 6 or cpr not in exc.message)
        return
    rec = parse_record(line)
    assert len(line) == RECORD_LENGTH
    assert rec.municipality == municipality.zfill(4) and rec.cpr == cpr
    assert rec.employment_type == (employment_type or 0)
    assert rec.extra_number == (extra_number or 0)
    assert rec.wage_code == wage_code and rec.account == account
    assert rec.centikm == int(km * 100) and rec.month_end == g.month_end
    assert line[29:36] == "0000000" and line[:3] == "DA6"


# -- the per-report adapter ---------------------------------------------------------------


def test_adapter_protocol_and_plan() -> None:
    assert isinstance(ADAPTER, Adapter)
    plan = ADAPTER.plan(drive(wage_code_optional="7777", account="1234567890"), [], PLAIN)
    assert [(m.part, m.fields["wage_code"], m.fields["km"]) for m in plan.messages] == [
        ("wage_code", "6666", "12.50"),
        ("wage_code_optional", "7777", "12.50"),
    ]
    assert plan.messages[0].fields["month"] == "2024-11"


@pytest.mark.parametrize(
    ("report", "delivered", "expected"),
    [
        (drive(distance_km="0"), [], Plan(not_applicable="zero distance")),
        (drive(cancelled=True), [], Plan(not_applicable="cancelled before delivery")),
    ],
)
def test_plan_not_applicable(report: Report, delivered: list[Any], expected: Plan) -> None:
    assert ADAPTER.plan(report, delivered, PLAIN) == expected


def test_new_version_of_delivered_report_needs_correction() -> None:
    (msg,) = ADAPTER.plan(drive(), [], PLAIN).messages
    delivered = [DeliveredPart(msg.part, 1, msg.fields)]
    assert ADAPTER.plan(drive(version=2), delivered, PLAIN) == Plan()  # unchanged
    for changed in (
        drive(version=2, distance_km="13"),
        drive(version=2, cancelled=True),
        drive(version=2, distance_km="0"),
    ):
        assert ADAPTER.plan(changed, delivered, PLAIN).correction_required


def test_render_is_one_line_and_send_is_refused() -> None:
    report = drive()
    payload = ADAPTER.render(report, ADAPTER.plan(report, [], PLAIN).messages[0], PLAIN)
    assert payload.content_type == "text/plain"
    assert payload.body == b"DA6085110101901234066660012500000000             301124\r\n"


async def test_send_is_refused() -> None:
    with pytest.raises(Rejected, match="file runs"):
        await ADAPTER.send(
            ADAPTER.render(drive(), ADAPTER.plan(drive(), [], PLAIN).messages[0], PLAIN), None
        )  # type: ignore[arg-type]


# -- one record per employment form; what IND01 cannot carry ---------------------------------


def test_a_mid_month_change_of_employment_type_or_extra_number_gives_two_records() -> None:
    reports = [
        drive(report_id="a", drive_date="2024-11-03", distance_km="10"),
        drive(
            report_id="b", drive_date="2024-11-20", distance_km="4", employee={"employment_type": 2}
        ),
        drive(
            report_id="c", drive_date="2024-11-21", distance_km="1", employee={"extra_number": 3}
        ),
        drive(report_id="d", drive_date="2024-11-29", distance_km="2"),
    ]
    written, failures = records(reports, PLAIN)
    assert failures == []
    got = [(line[7], line[18], line[23:29], [c[1] for c in g.covers]) for g, line in written]
    assert got == [
        ("1", "0", "001200", ["a", "d"]),
        ("2", "0", "000400", ["b"]),
        ("1", "3", "000100", ["c"]),
    ]


def test_reports_of_one_employment_with_two_cprs_still_fail() -> None:
    reports = [drive(report_id="a"), drive(report_id="b", employee={"cpr": "0202901234"})]
    _, (failure,) = records(reports, PLAIN)
    assert "CPR" in failure.reason and "0202901234" not in failure.reason


@pytest.mark.parametrize("field", ["cost_center", "psp_element"])
def test_cost_center_and_psp_element_are_refused_with_a_reason(field: str) -> None:
    assert "/" + field in KmdInd01.unsupported_fields
    report = drive(**{field: "12345"})
    with pytest.raises(InvalidPayload, match=f"cannot carry {field}.*10-digit account"):
        ADAPTER.plan(report, [], PLAIN)
    message = ADAPTER.plan(drive(), [], PLAIN).messages[0]
    with pytest.raises(InvalidPayload, match=f"cannot carry {field}"):
        ADAPTER.render(report, message, PLAIN)
    # in a file only that report's group fails; the others are written
    written, failures = records(
        [drive(report_id="ok"), drive(report_id="no", **{field: "1"})], PLAIN
    )
    assert [g.covers for g, _ in written] == [(("851", "ok", 1),)]
    assert [(f.group.covers, field in f.reason) for f in failures] == [((("851", "no", 1),), True)]


# -- encoding --------------------------------------------------------------------------------


def test_the_file_is_iso_8859_1_by_default_and_the_encoding_is_a_setting() -> None:
    name = {"municipality_name": "Ærø Kommune"}
    body, _ = render_file([drive()], VendorSettings(options=name))
    assert file_encoding(PLAIN) == DEFAULT_ENCODING == "iso-8859-1"
    assert body.startswith("851 Ærø Kommune\r\nDA6".encode("iso-8859-1"))
    assert body.startswith(b"851 \xc6r\xf8 Kommune\r\n")
    utf8, _ = render_file([drive()], VendorSettings(options={**name, "encoding": "utf-8"}))
    assert utf8.startswith("851 Ærø Kommune\r\n".encode())


@pytest.mark.parametrize(
    ("options", "key", "message"),
    [
        ({"encoding": "no-such-codec"}, "encoding", "unknown encoding 'no-such-codec'"),
        ({"encoding": "utf-16"}, "encoding", "does not write ASCII text as ASCII bytes"),
        (
            {"encoding": "ascii", "file_header": "492 Ærø Kommune"},
            "file_header",
            "'492 Ærø Kommune' cannot be written in ascii",
        ),
        (
            {"municipality_name": "Ærø Kommune ☃"},
            "municipality_name",
            "cannot be written in iso-8859-1",
        ),
        ({"file_header": "two\nlines"}, "file_header", "must be a single line"),
        ({"kmd_municipality": "12345"}, "kmd_municipality", "is not 1-4 digits"),
    ],
)
def test_check_settings_names_the_option_that_cannot_be_written(
    options: dict[str, Any], key: str, message: str
) -> None:
    problems = check_settings(VendorSettings(options=options), "851")
    assert [p[0] for p in problems] == [key] and message in problems[0][1]


def test_check_settings_accepts_what_the_file_can_hold() -> None:
    for options in (
        {},
        {"municipality_name": "Ærø Kommune"},
        {"encoding": "cp1252", "file_header": "492 Ærø Kommune", "kmd_municipality": "0492"},
        {"encoding": "UTF-8", "municipality_name": "Ærø Kommune ☃"},
    ):
        assert check_settings(VendorSettings(options=options), "851") == []
