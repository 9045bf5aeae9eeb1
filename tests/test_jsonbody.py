"""``jsonbody.parse``: a short body decoded whole gives what the record-by-record read gives.

The same value, or the same refusal (class, status and words), for valid JSON, JSON just
beside valid (cut, doubled keys, stray characters) and bodies around the record limit.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gateway import jsonbody
from gateway.errors import GatewayError
from gateway.jsonbody import TooManyRecords, parse

LIMIT = 5
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=7) | st.dictionaries(st.text(max_size=4), inner, max_size=4)
    ),
    max_leaves=20,
)
BODIES = st.one_of(
    JSON,
    st.lists(JSON, max_size=8),
    st.fixed_dictionaries({"reports": st.lists(JSON, max_size=8)}, optional={"x": JSON}),
).map(json.dumps)


@st.composite
def near_json(draw: st.DrawFn) -> str:
    text = draw(BODIES)
    edit = draw(st.sampled_from(["none", "cut", "insert", "double", "space"]))
    at = draw(st.integers(0, len(text)))
    if edit == "cut":
        return text[:at]
    if edit == "insert":
        return (
            text[:at]
            + draw(st.sampled_from([",", "]", "}", "[", '"', "x", "NaN", "1e999", "\\ud800"]))
            + text[at:]
        )
    if edit == "double" and text.startswith("{"):
        return '{"reports": [], ' + text[1:]
    if edit == "space":
        return f" \n{text}\t "
    return text


@contextmanager
def record_by_record() -> Iterator[None]:
    """The parse as it was: nothing is decoded whole."""
    before = jsonbody.WHOLE_BELOW
    jsonbody.WHOLE_BELOW = 0
    try:
        yield
    finally:
        jsonbody.WHOLE_BELOW = before


def outcome(raw: bytes, limit: int | None) -> tuple[str, Any]:
    try:
        return "value", parse(raw, limit)
    except GatewayError as exc:
        return type(exc).__name__, (exc.status, str(exc), exc.problem("/x"))


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=near_json(), limit=st.sampled_from([None, LIMIT, 0, 1]))
@example(text='{"reports": [1, 2, 3, 4, 5, 6]}', limit=LIMIT)
@example(text="[1, 2, 3, 4, 5, 6, ", limit=LIMIT)
@example(text='{"a": 1, "a": 2}', limit=LIMIT)
@example(text="[" * 3000 + "]" * 3000, limit=LIMIT)
def test_whole_decoding_changes_no_outcome(text: str, limit: int | None) -> None:
    raw = text.encode("utf-8", "surrogatepass")
    fast = outcome(raw, limit)
    with record_by_record():
        assert fast == outcome(raw, limit)


@pytest.mark.parametrize(
    "text",
    [
        "[1, 2, 3, 4, 5, 6]",
        '{"reports": [1, 2, 3, 4, 5, 6]}',
        '{"reports": [' + "1," * 2000 + "1]}",
    ],
)
def test_too_many_records_either_way(text: str) -> None:
    with pytest.raises(TooManyRecords):
        parse(text.encode(), LIMIT)


def test_within_the_limit_is_the_value() -> None:
    assert parse(b'{"reports": [1, 2, 3, 4, 5]}', LIMIT) == {"reports": [1, 2, 3, 4, 5]}
