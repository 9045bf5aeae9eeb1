"""Request bodies read as JSON: strictly (RFC 8259, UTF-8, no NaN, no duplicate keys) and bounded.

``parse`` is a pure function meant to run in a worker thread: a top-level array (or the
``reports`` array of a top-level object) is read one record at a time and refused past the
record limit before the rest is even parsed, so a hostile body costs neither the event loop
nor the time and memory of a million parsed records.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from .errors import BadRequest, PayloadTooLarge

MAX_RECORDS = 1000  # reports per request, batch and compat alike (DESIGN.md §3)
MAX_DEPTH = 32  # a canonical report nests 4 deep; deeper is an attack, not a report
#: a text this short is decoded whole first (C speed, a few hundred µs at worst) and its
#: records counted after; only when that fails does the record-by-record read run, so
#: every error is worded exactly as before
WHOLE_BELOW = 4096

_WS = re.compile(r"[ \t\n\r]*")


class TooManyRecords(PayloadTooLarge):
    def __init__(self, limit: int) -> None:
        super().__init__(f"at most {limit} records per request", limit=limit)


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValueError(
            "an object has the same key twice"
        )  # the key is not echoed: it may be a CPR
    return obj


def _constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("a number is out of range")
    return value


# integers past Python's 4300 digits raise ValueError: a 400 like any other malformed number
_DECODER = json.JSONDecoder(object_pairs_hook=_pairs, parse_constant=_constant, parse_float=_float)


def parse(raw: bytes, max_records: int | None = None) -> Any:
    """The JSON value of a request body, or BadRequest / PayloadTooLarge (limit named).

    With ``max_records``, a top-level array, or the ``reports`` array of a top-level object,
    may hold at most that many items.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest(f"the body is not UTF-8 (invalid byte at position {exc.start})") from exc
    if text.startswith("\ufeff"):
        raise BadRequest("the body starts with a byte order mark: send UTF-8 JSON without one")
    try:
        value = _DECODER.decode(text) if max_records is None else _bounded(text, max_records)
    except RecursionError as exc:
        raise BadRequest("the body is nested too deeply") from exc
    except ValueError as exc:  # JSONDecodeError says where, never what: no value is echoed
        raise BadRequest(f"the body is not valid JSON: {exc}") from exc
    if _too_deep(value):
        raise BadRequest(f"the body is nested more than {MAX_DEPTH} levels deep")
    return value


def _bounded(text: str, limit: int) -> Any:
    """The value of a text whose records are limited (see ``_records``)."""
    if len(text) < WHOLE_BELOW:
        try:
            value = _DECODER.decode(text)
        except (ValueError, RecursionError):
            pass  # the record-by-record read finds the same fault and words it as ever
        else:
            records = value.get("reports") if isinstance(value, dict) else value
            if isinstance(records, list) and len(records) > limit:
                raise TooManyRecords(limit)
            return value
    return _records(text, limit)


def _records(text: str, limit: int) -> Any:
    """A top-level array, or a top-level object's ``reports`` array, read one item at a time."""
    start = _skip(text, 0)
    value: Any
    if text.startswith("[", start):
        value, end = _array(text, start, limit)
    elif text.startswith("{", start):
        value, end = _object(text, start, limit)
    else:
        return _DECODER.decode(text)
    if _skip(text, end) != len(text):
        raise json.JSONDecodeError("Extra data", text, _skip(text, end))
    return value


def _array(text: str, pos: int, limit: int) -> tuple[list[Any], int]:
    items: list[Any] = []
    pos = _skip(text, pos + 1)
    if text.startswith("]", pos):
        return items, pos + 1
    while True:
        if len(items) == limit:
            raise TooManyRecords(limit)
        item, pos = _DECODER.raw_decode(text, pos)
        items.append(item)
        pos = _skip(text, pos)
        if text.startswith("]", pos):
            return items, pos + 1
        if not text.startswith(",", pos):
            raise json.JSONDecodeError("Expecting ',' delimiter", text, pos)
        pos = _skip(text, pos + 1)


def _object(text: str, pos: int, limit: int) -> tuple[dict[str, Any], int]:
    pairs: list[tuple[str, Any]] = []
    pos = _skip(text, pos + 1)
    if text.startswith("}", pos):
        return {}, pos + 1
    while True:
        if not text.startswith('"', pos):
            raise json.JSONDecodeError(
                "Expecting property name enclosed in double quotes", text, pos
            )
        key, pos = _DECODER.raw_decode(text, pos)
        pos = _skip(text, pos)
        if not text.startswith(":", pos):
            raise json.JSONDecodeError("Expecting ':' delimiter", text, pos)
        pos = _skip(text, pos + 1)
        if key == "reports" and text.startswith("[", pos):
            value, pos = _array(text, pos, limit)
        else:
            value, pos = _DECODER.raw_decode(text, pos)
        pairs.append((key, value))
        pos = _skip(text, pos)
        if text.startswith("}", pos):
            return _pairs(pairs), pos + 1
        if not text.startswith(",", pos):
            raise json.JSONDecodeError("Expecting ',' delimiter", text, pos)
        pos = _skip(text, pos + 1)


def _skip(text: str, pos: int) -> int:
    match = _WS.match(text, pos)
    return match.end() if match else pos


def _too_deep(value: Any) -> bool:
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        children = (
            node.values() if isinstance(node, dict) else node if isinstance(node, list) else None
        )
        if children is None:
            continue
        if depth > MAX_DEPTH:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False
