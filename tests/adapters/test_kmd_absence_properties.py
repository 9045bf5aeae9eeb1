"""Property tests for kmd-absence: the part-day split, and any sequence of versions against a ledger."""

from __future__ import annotations

import json
from datetime import date, time, timedelta
from typing import Any

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from lxml import etree

from adapters.base import DeliveredPart, InvalidPayload, Report, VendorSettings
from adapters.kmd_absence import KmdAbsence, span, split
from adapters.soap import body_payload, parse_xml
from gateway.simulators.kmd import KmdLedger

BASE = date(2026, 7, 6)
ADAPTER = KmdAbsence()
SETTINGS = VendorSettings(options={"senderService": "X"})
TYPES = ["regular", "sixth_week", "senior", "care", "optional", "other"]

times = st.none() | st.builds(time, st.integers(0, 23), st.sampled_from([0, 15, 30, 45]))


@st.composite
def vacations(draw: st.DrawFn, version: int = 1) -> Report:
    start = BASE + timedelta(days=draw(st.integers(0, 8)))
    end = start + timedelta(days=draw(st.integers(-1, 5)))
    kind = draw(st.sampled_from(TYPES))
    data: dict[str, Any] = {
        "kind": "vacation",
        "municipality": "746",
        "report_id": "r",
        "version": version,
        "employee": {
            "cpr": "0707850000",
            "employment_id": draw(st.sampled_from(["00012345", "00012345", "7"])),
        },
        "start_date": start.isoformat(),
        "end_date": end.isoformat(),
        "vacation_type": kind,
        "cancelled": draw(st.booleans()) and draw(st.booleans()),
    }
    for name in ("start_time", "end_time"):
        value = draw(times)
        if value is not None:
            data[name] = value.strftime("%H:%M")
    if kind == "care":
        data["child_number"] = draw(st.integers(1, 12))
    return Report.from_dict(data)


def period(report: Report) -> tuple[tuple[int, int], tuple[int, int]]:
    assert report.start_date and report.end_date
    return span(report.start_date, report.end_date, report.start_time, report.end_time)


def valid(report: Report) -> bool:
    start, end = period(report)
    return start < end


# ---------------------------------------------------------------------------------------
# split
# ---------------------------------------------------------------------------------------


@given(vacations())
def test_split_covers_the_period_exactly_without_overlap(report: Report) -> None:
    if not valid(report):
        try:
            split(report)
        except ValueError:
            return
        raise AssertionError("an empty period must not split")
    parts = split(report)
    spans = [p.span for p in parts]
    assert 1 <= len(parts) <= 3
    assert all(s < e for s, e in spans)  # never empty
    assert spans == sorted(spans)
    # contiguous and exact: each part ends where the next begins
    assert spans[0][0] == period(report)[0] and spans[-1][1] == period(report)[1]
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))
    assert len({p.key for p in parts}) == len(parts)
    # a part day is one day; only the whole-days part spans several
    assert all(p.start_date == p.end_date for p in parts if p.start_time or p.end_time)


# ---------------------------------------------------------------------------------------
# versions against a ledger
# ---------------------------------------------------------------------------------------


def request_fields(body: bytes) -> dict[str, str | None]:
    return {etree.QName(c).localname: c.text for c in body_payload(parse_xml(body))}


def expected_holdings(report: Report) -> set[tuple[object, ...]]:
    code = {"regular": "FE", "sixth_week": "6F", "senior": "SO", "care": "OS"}.get(
        report.vacation_type or ""
    )
    if report.cancelled or code is None:
        return set()
    return {
        (report.employee.employment_id, code, a.start_date, a.end_date, a.start_time, a.end_time)
        for a in split(report)
    }


def ledger_holdings(ledger: KmdLedger) -> set[tuple[object, ...]]:
    return {
        (r.personnel_number, r.type, r.start_date, r.end_date, r.start_time, r.end_time)
        for person in ("00012345", "7")
        for r in ledger.holdings(person)
    }


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(vacations(), min_size=1, max_size=5))
def test_any_sequence_of_versions_leaves_exactly_the_latest(drafts: list[Report]) -> None:
    assume(all(valid(d) for d in drafts))
    ledger, delivered = KmdLedger(), dict[str, DeliveredPart]()
    for version, draft in enumerate(drafts, 1):
        report = Report.from_dict({**_as_dict(draft), "version": version})
        plan = ADAPTER.plan(report, list(delivered.values()), SETTINGS)
        for message in plan.messages:
            if message.operation == "MOD":  # SAP keys a record by type: MOD never changes it
                assert message.fields["type"] == message.fields["original"]["type"], message
            status = ledger.apply(request_fields(ADAPTER.render(report, message, SETTINGS).body))
            assert status.type == "S", (message, status)
            if message.deletes:
                delivered.pop(message.part)
            else:  # recorded as the gateway does: Message.fields, through JSON
                fields = json.loads(json.dumps(message.fields))
                delivered[message.part] = DeliveredPart(message.part, version, fields)
        assert ledger_holdings(ledger) == expected_holdings(report)
        # planning the same version again sends nothing: delivered parts are never resent
        assert ADAPTER.plan(report, list(delivered.values()), SETTINGS).messages == ()


def _as_dict(report: Report) -> dict[str, Any]:
    data: dict[str, Any] = {
        "kind": "vacation",
        "municipality": report.municipality,
        "report_id": report.report_id,
        "employee": {"cpr": report.employee.cpr, "employment_id": report.employee.employment_id},
        "start_date": str(report.start_date),
        "end_date": str(report.end_date),
        "vacation_type": report.vacation_type,
        "cancelled": report.cancelled,
    }
    for name in ("start_time", "end_time"):
        value = getattr(report, name)
        if value is not None:
            data[name] = value.isoformat()
    if report.child_number is not None:
        data["child_number"] = report.child_number
    return data


def test_invalid_period_plans_nothing_but_raises() -> None:
    report = Report.from_dict(
        {
            "kind": "vacation",
            "municipality": "746",
            "report_id": "r",
            "employee": {"cpr": "0707850000", "employment_id": "1"},
            "start_date": "2026-07-06",
            "end_date": "2026-07-06",
            "end_time": "00:00",
            "vacation_type": "regular",
        }
    )
    try:
        ADAPTER.plan(report, [], SETTINGS)
    except InvalidPayload as exc:
        assert "empty" in exc.message
    else:
        raise AssertionError("an absence ending at 00:00 on its only day is empty")


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    vacations(),
    st.lists(st.sampled_from(["regular", "sixth_week", "senior", "care"]), min_size=1, max_size=4),
    st.data(),
)
def test_type_changes_are_delete_and_insert_and_the_ledger_ends_with_the_latest(
    first: Report, kinds: list[str], data: st.DataObject
) -> None:
    """Versions that change the type (and perhaps the period) of a delivered absence."""
    assume(valid(first) and not first.cancelled)
    ledger, delivered = KmdLedger(), dict[str, DeliveredPart]()
    drafts = [
        first,
        *(
            Report.from_dict(
                {
                    **_as_dict(first),
                    "vacation_type": k,
                    "child_number": 1,
                    "end_date": str(first.end_date + timedelta(days=data.draw(st.integers(0, 2)))),
                }
            )
            for k in kinds
        ),
    ]
    for version, draft in enumerate(drafts, 1):
        report = Report.from_dict({**_as_dict(draft), "version": version})
        before = {p.part: p.fields["type"] for p in delivered.values()}
        for message in ADAPTER.plan(report, list(delivered.values()), SETTINGS).messages:
            if message.operation == "MOD":
                assert before[message.part] == message.fields["type"], message
            status = ledger.apply(request_fields(ADAPTER.render(report, message, SETTINGS).body))
            assert status.type == "S", (message, status)
            if message.deletes:
                delivered.pop(message.part)
            else:
                delivered[message.part] = DeliveredPart(
                    message.part, version, json.loads(json.dumps(message.fields))
                )
        assert ledger_holdings(ledger) == expected_holdings(report)
