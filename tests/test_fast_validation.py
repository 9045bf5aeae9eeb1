"""The compiled validator decides like the Python one, and intake's answers are unchanged.

``validate_report`` asks the compiled (Rust) validator first and trusts only its "valid";
anything else goes through the Python ``jsonschema`` path that words the RFC 9457 field
errors. Near-valid reports (mutations of valid ones: values swapped for near misses of the
patterns, wrong types, huge numbers, keys dropped or added) must get:

- the same verdict from both validators, except that Python's ``$`` also matches before a
  final newline (``"0201\\n"``), which the compiled one refuses and intake refuses anyway
  (a control character);
- never "valid" from the compiled validator where the Python one finds an error;
- exactly the error list the Python path alone gives.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gateway import validation
from gateway.errors import FieldError
from gateway.validation import quick_valid, schema_valid, validate_report

REPORTS = Path(__file__).resolve().parent / "data" / "reports"
SAMPLES = [json.loads(p.read_text(encoding="utf-8")) for p in sorted(REPORTS.glob("*.json"))] + [
    {
        "kind": "drive",
        "municipality": "746",
        "report_id": "bench-1",
        "version": 3,
        "employee": {"cpr": "0101901234", "employment_id": "00010001"},
        "drive_date": "2026-03-02",
        "distance_km": 12.5,
        "wage_code": "0201",
        "wage_code_optional": None,
        "account": None,
        "cost_center": "4711",
        "route": {"from": "A", "to": "B", "via": ["C", "D"]},
    },
]

# values that sit just beside what the schemas allow
NEAR_MISSES = st.sampled_from(
    [
        "",
        "0201\n",
        "746\n",
        "\n746",
        "0201 ",
        "١٢٣",  # Arabic-Indic digits: \\d would take them, [0-9] must not
        "２０２６-03-02",
        "2026-02-30",
        "2026-13-01",
        "2026-3-2",
        "12.345",
        "12.",
        ".5",
        "100000",
        "99999.99",
        "-1",
        "1e3",
        "0101901234",
        "010190-1234",
        "x" * 33,
        "x" * 65,
        "x" * 501,
        "care",
        "drive",
        "vacation",
        "DRIVE",
        "24:00",
        "23:59:60",
        "07:30",
        "ABC.12-3",
        "-ABC",
        "a" * 25,
        "😀",
        "\x00",
        "\u2028",
        "\ud800",
    ]
)
JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=2**63 - 2, max_value=2**70),
    st.sampled_from([0, 1, 9, 10, 99, 100, 2147483647, 2147483648, -1, 10**400]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([0.0, -0.0, 1.0, 12.5, 12.005, 99999.99, 99999.991, 1e-320, 5e-324]),
    st.text(max_size=8),
    NEAR_MISSES,
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=5,
)


def paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every location in a JSON value (the value itself included)."""
    found = [prefix]
    items = (
        value.items()
        if isinstance(value, dict)
        else enumerate(value)
        if isinstance(value, list)
        else ()
    )
    for key, item in items:
        found += paths(item, (*prefix, key))
    return found


def schema_at(kind: Any, where: tuple[Any, ...]) -> dict[str, Any] | None:
    """The flat schema's node for a location of a report, if the schema has one."""
    node: Any = validation.REPORT_SCHEMAS.get(kind) if isinstance(kind, str) else None
    for key in where:
        if node is None:
            return None
        node = node.get("items") if isinstance(key, int) else node.get("properties", {}).get(key)
    return node if isinstance(node, dict) else None


def plausible(node: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Values at and just beyond the edges of what a schema node allows: strings made from
    its pattern (Python's reading of it, trailing newline included), numbers around its
    bounds, texts around its length limit, its enum's members."""
    if "oneOf" in node:
        return st.one_of([plausible(branch) for branch in node["oneOf"]])
    if "pattern" in node:
        return st.from_regex(node["pattern"])
    if "enum" in node or "const" in node:
        return st.sampled_from([*node.get("enum", [node.get("const")]), "other"])
    low, high = node.get("minimum"), node.get("maximum")
    if low is not None and high is not None:
        return st.integers(int(low) - 1, int(high) + 1) | st.floats(low - 1, high + 1)
    if "maxLength" in node:
        return st.text(max_size=node["maxLength"] + 1)
    return JSON_VALUES


@st.composite
def near_valid(draw: st.DrawFn) -> dict[str, Any]:
    report = copy.deepcopy(draw(st.sampled_from(SAMPLES)))
    for _ in range(draw(st.integers(1, 3))):
        places = paths(report)[1:]
        where = draw(st.sampled_from(places))
        parent = report
        for key in where[:-1]:
            parent = parent[key]
        action = draw(st.sampled_from(["reshape", "reshape", "reshape", "replace", "drop", "add"]))
        node = schema_at(report.get("kind"), where)
        if action == "reshape" and node is not None:
            parent[where[-1]] = draw(plausible(node))
        elif action == "drop" and isinstance(parent, dict):
            parent.pop(where[-1], None)
        elif action == "add" and isinstance(parent, dict):
            parent[draw(st.sampled_from(["extra", "kind", "cpr", "via", "0101901234"]))] = draw(
                JSON_VALUES
            )
        else:
            parent[where[-1]] = draw(JSON_VALUES)
    return report


@contextmanager
def python_only() -> Iterator[None]:
    """The validation as it was: the compiled validator never says "valid"."""
    fast: Callable[[str, Any], bool] = validation.schema_valid
    validation.schema_valid = lambda kind, data: False
    try:
        yield
    finally:
        validation.schema_valid = fast


def python_valid(data: dict[str, Any]) -> bool:
    return validation._VALIDATORS[data["kind"]].is_valid(data)


def slow_errors(data: Any) -> list[FieldError]:
    with python_only():
        return validate_report(data)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(report=near_valid())
@example(report={**SAMPLES[0], "municipality": "746\n"})
@example(report={**SAMPLES[0], "version": 10**400})
def test_near_valid_reports_get_the_same_verdict_and_errors(report: dict[str, Any]) -> None:
    assert validate_report(report) == slow_errors(report)
    kind = report.get("kind")
    if kind not in ("drive", "vacation"):
        return
    fast, python = schema_valid(kind, report), python_valid(report)
    assert not (fast and not python)  # never a "valid" the Python validator refuses
    if python and not fast:  # the one known difference: "$" before a final newline
        assert "\n" in "".join(validation._texts(report, []))
    if quick_valid(report):  # what intake may validate on the event loop: no error to word
        assert python and validation.readable_text("".join(validation._texts(report, [])))


@pytest.mark.parametrize("report", SAMPLES, ids=lambda r: str(r["report_id"]))
def test_valid_samples_are_valid_for_both(report: dict[str, Any]) -> None:
    assert schema_valid(report["kind"], report)
    assert python_valid(report)
    assert validate_report(report) == slow_errors(report) == []


def test_a_value_it_cannot_convert_goes_to_the_python_path() -> None:
    report = {**SAMPLES[0], "purpose": "\ud800"}  # a lone surrogate is no UTF-8
    errors = validate_report(report)
    assert [e.pointer for e in errors] == ["/purpose"]
    assert "U+D800" in errors[0].message


def test_errors_are_still_worded_by_the_python_path() -> None:
    report = {**SAMPLES[-1], "wage_code": "0201\n", "version": 0, "extra": 1}
    assert [(e.pointer, e.message) for e in validate_report(report)] == [
        ("/extra", "is not a known field"),
        ("/version", "must be at least 1"),
        (
            "/wage_code",
            "must not contain U+000A (at character 5): control characters, lone "
            "surrogates and non-characters cannot reach a vendor",
        ),
    ]


@pytest.mark.parametrize(
    ("report", "expected"),
    [
        (SAMPLES[0], True),
        (SAMPLES[-1], True),
        ({**SAMPLES[-1], "wage_code": "0201\n"}, False),
        ({**SAMPLES[-1], "purpose": "a\x00"}, False),
        ({**SAMPLES[-1], "purpose": "\ud800"}, False),
        ({**SAMPLES[-1], "extra": 1}, False),
        ({**SAMPLES[-1], "kind": "other"}, False),
        ({**SAMPLES[-1], "kind": ["drive"]}, False),
        ([SAMPLES[-1]], False),
        ("drive", False),
    ],
)
def test_quick_valid(report: Any, expected: bool) -> None:
    assert quick_valid(report) is expected
