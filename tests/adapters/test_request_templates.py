"""The lxml request templates write the envelopes zeep writes (sd-koersel, kmd-absence).

For the golden reports and for many generated ones, the template's envelope is C14N-equal
(in fact byte-equal) to zeep's for the same values; where the template gives up (a value
it cannot write, a payload that fails the XSD), zeep's envelope fails too, so the
adapters' errors are zeep's as before and nothing that fails the schema is ever sent.
"""

from __future__ import annotations

import json
from datetime import date, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lxml import etree

from adapters import kmd_absence, sd_koersel
from adapters.base import DeliveredPart, InvalidPayload, Message, Report, VendorSettings
from adapters.soap import RequestTemplate, ZeepCodec, body_payload, parse_xml, schema_errors

REPORTS = Path(__file__).resolve().parents[1] / "data" / "reports"
SD = sd_koersel.SdKoersel()
KMD = kmd_absence.KmdAbsence()
SD_SETTINGS = VendorSettings(endpoint="https://sd.example.test/x", institution="XY")
KMD_SETTINGS = VendorSettings(options={"senderService": "X"})
SD_TEMPLATE = RequestTemplate(SD._codec, sd_koersel.OPERATION, SD._schema)
SET_TEMPLATE = RequestTemplate(KMD._set, kmd_absence.SET_INTERFACE, KMD._schema)
READ_TEMPLATE = RequestTemplate(KMD._read, kmd_absence.READ_INTERFACE, KMD._schema)


def c14n(xml: bytes) -> str:
    return etree.canonicalize(etree.ElementTree(parse_xml(xml)), rewrite_prefixes=True)


def zeep_body(codec: ZeepCodec, operation: str, values: dict[str, Any]) -> bytes | None:
    """zeep's envelope, or None when zeep cannot build it or it fails the schema."""
    try:
        body, _ = codec.build(operation, **values)
    except Exception:  # zeep's own errors, TypeError, ValueError: all mean "not sendable"
        return None
    schema = SD._schema if codec is SD._codec else KMD._schema
    return None if schema_errors(schema, body_payload(parse_xml(body))) else body


def assert_same(template: RequestTemplate, codec: ZeepCodec, op: str, values: Any) -> bool:
    """The template agrees with zeep; True when the values made a sendable envelope."""
    ours, theirs = template.build(values), zeep_body(codec, op, values)
    assert (ours is None) == (theirs is None), (ours, theirs)
    if ours is None or theirs is None:
        return False
    assert c14n(ours) == c14n(theirs)
    assert ours == theirs  # stronger than asked: the same bytes, prefixes included
    return True


def sd_values(report: Report, settings: VendorSettings = SD_SETTINGS) -> list[dict[str, Any]]:
    plan = SD.plan(report, [], settings)
    return [sd_koersel._request_values(report, m.fields, settings) for m in plan.messages]


# ---------------------------------------------------------------------------------------
# the sample (golden) reports
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(p.name for p in REPORTS.glob("drive-*.json")))
def test_sd_samples_match_zeep(name: str) -> None:
    report = Report.from_dict(json.loads((REPORTS / name).read_text(encoding="utf-8")))
    values = sd_values(report)
    assert values
    assert all(assert_same(SD_TEMPLATE, SD._codec, sd_koersel.OPERATION, v) for v in values)


@pytest.mark.parametrize("name", sorted(p.name for p in REPORTS.glob("vacation-*.json")))
def test_kmd_samples_match_zeep(name: str) -> None:
    report = Report.from_dict(json.loads((REPORTS / name).read_text(encoding="utf-8")))
    messages = list(KMD.plan(report, [], KMD_SETTINGS).messages)
    # a later version modifies and deletes: every operation's shape is covered
    delivered = [DeliveredPart(m.part, 1, {**m.fields, "type": "SO"}) for m in messages]
    messages += KMD.plan(report, delivered, KMD_SETTINGS).messages
    for message in messages:
        values = kmd_absence._set_values(message)
        assert assert_same(SET_TEMPLATE, KMD._set, kmd_absence.SET_INTERFACE, values)
    assert report.start_date and report.end_date
    read = {
        "StartDate": report.start_date.isoformat(),
        "EndDate": report.end_date.isoformat(),
        "PersonnelNumber": report.employee.employment_id,
    }
    assert assert_same(READ_TEMPLATE, KMD._read, kmd_absence.READ_INTERFACE, read)


def test_soap_actions_are_zeeps() -> None:
    for template, codec, op, values in (
        (SD_TEMPLATE, SD._codec, sd_koersel.OPERATION, sd_values(sample("drive-full.json"))[0]),
        (READ_TEMPLATE, KMD._read, kmd_absence.READ_INTERFACE, {"PersonnelNumber": "1"}),
    ):
        assert template.soap_action == codec.build(op, **values)[1]["SOAPAction"]


def sample(name: str) -> Report:
    return Report.from_dict(json.loads((REPORTS / name).read_text(encoding="utf-8")))


# ---------------------------------------------------------------------------------------
# generated reports: text with markup and non-ASCII, boundaries, and values that fail
# ---------------------------------------------------------------------------------------

# mostly writable text (markup characters, several scripts, astral characters), and now and
# then a character XML cannot carry (the template gives up, zeep refuses: both unsendable)
writable = st.text(
    alphabet=st.sampled_from("aZ09 &<>\"'æøåÆØÅé€😀.-/")
    | st.characters(exclude_categories=("Cs", "Cc", "Co", "Cn")),
    max_size=30,
)
hostile = st.text(
    alphabet=st.sampled_from("a\t\r\n\x00\x1f\ufffe") | st.characters(codec="utf-8"),
    max_size=40,
)
texts = st.one_of(writable, writable, writable, hostile)
codes = st.one_of(st.from_regex(r"\A[0-9A-Za-z]{1,8}\Z"), st.from_regex(r"\A[0-9]{4}\Z"), texts)
dates = st.one_of(st.dates(date(1990, 1, 1), date(2099, 12, 31)), st.dates())


@st.composite
def drives(draw: st.DrawFn) -> Report:
    optional = {
        "wage_code_optional": codes,
        "account": st.from_regex(r"\A[0-9]{10}\Z") | st.from_regex(r"\A[0-9]{10}\Z") | texts,
        "license_plate": texts,
        "purpose": texts,
    }
    data: dict[str, Any] = {
        "kind": "drive",
        "municipality": "746",
        "report_id": "r",
        "employee": {
            "cpr": "0101901234",
            "employment_id": draw(st.from_regex(r"\A[0-9]{8}\Z") | texts.filter(bool)),
            "institution": draw(st.none() | st.from_regex(r"\A[A-Z]{2}\Z") | texts),
        },
        "drive_date": draw(dates).isoformat(),
        "distance_km": str(
            draw(st.decimals(0, Decimal("99999.999"), places=draw(st.sampled_from([2, 2, 0, 3]))))
        ),
        "wage_code": draw(codes.filter(bool)),
        "approved_by_cpr": "0202802345",
        "sixty_days_rule": draw(st.booleans()),
    }
    for key, strategy in optional.items():
        if draw(st.booleans()):
            data[key] = draw(strategy)
    if draw(st.booleans()):
        data["route"] = {
            "from": draw(texts),
            "to": draw(texts),
            "via": draw(st.lists(texts, max_size=3)),
        }
    return Report.from_dict(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(report=drives(), checked=st.booleans(), external=st.booleans())
def test_generated_drives_match_zeep(report: Report, checked: bool, external: bool) -> None:
    options = {"kontrolleret_indikator": checked, "dokumentation_ekstern_indikator": external}
    s = VendorSettings(endpoint="", institution="XY", options=options)
    for values in sd_values(report, s):
        assert_same(SD_TEMPLATE, SD._codec, sd_koersel.OPERATION, values)


states = st.fixed_dictionaries(
    {
        "personnel_number": st.from_regex(r"\A[0-9]{8}\Z") | texts,
        "type": st.sampled_from(["FE", "6F", "SO", "OS", "fe", "TOOLONG"]),
        "start_date": dates.map(date.isoformat) | texts,
        "end_date": dates.map(date.isoformat),
    },
    optional={
        "start_time": st.from_regex(r"\A([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9]\Z") | texts,
        "end_time": st.from_regex(r"\A([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9]\Z"),
        "additional_data": st.from_regex(r"\A[0-9]{2}\Z") | texts,
    },
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(state=states, original=states, operation=st.sampled_from(["INS", "MOD", "DEL"]))
def test_generated_absences_match_zeep(
    state: dict[str, Any], original: dict[str, Any], operation: str
) -> None:
    fields = {**state, "original": original} if operation == "MOD" else state
    values = kmd_absence._set_values(Message("absence:1", operation, fields))
    assert_same(SET_TEMPLATE, KMD._set, kmd_absence.SET_INTERFACE, values)


# ---------------------------------------------------------------------------------------
# the adapters: the template's envelope is what render returns; failures keep zeep's words
# ---------------------------------------------------------------------------------------


def test_sd_render_returns_the_template_envelope() -> None:
    report = sample("drive-full.json")
    (message,) = SD.plan(report, [], SD_SETTINGS).messages
    values = sd_koersel._request_values(report, message.fields, SD_SETTINGS)
    assert SD.render(report, message, SD_SETTINGS).body == SD_TEMPLATE.build(values)


def test_sd_render_of_what_the_template_refuses_is_zeeps_error() -> None:
    report = sample("drive-minimal.json")
    (message,) = SD.plan(report, [], SD_SETTINGS).messages
    bad = Message(message.part, message.operation, {**message.fields, "purpose": "a\x00b"})
    with pytest.raises(InvalidPayload, match="cannot build the SD request: All strings must"):
        SD.render(report, bad, SD_SETTINGS)


def test_kmd_render_of_a_bad_type_names_the_element() -> None:
    report = sample("vacation-regular.json")
    message = KMD.plan(report, [], KMD_SETTINGS).messages[0]
    bad = Message(message.part, message.operation, {**message.fields, "type": "fe"})
    with pytest.raises(InvalidPayload, match="AbsenceAttendanceType"):
        KMD.render(report, bad, KMD_SETTINGS)


def test_template_writes_no_value_it_does_not_know() -> None:
    values = sd_values(sample("drive-minimal.json"))[0]
    assert SD_TEMPLATE.build({**values, "Unknown": "x"}) is None
    start = date(2026, 7, 6)
    assert READ_TEMPLATE.build({"StartDate": (start + timedelta(1)).isoformat()}) is not None
