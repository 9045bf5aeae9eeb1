"""Request bodies read as JSON: strictly (RFC 8259, UTF-8, no NaN, no duplicate keys) and bounded.

``parse`` is a pure function meant to run in a worker thread: a top-level array is read one
record at a time and refused past the record limit before the rest is even parsed, so a
hostile body costs neither the event loop nor the memory of a million parsed records.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from .errors import BadRequest, PayloadTooLarge

MAX_RECORDS = 1000  # reports per request, batch and compat alike (DESIGN.md §3)
MAX_DEPTH = 32  # a canonical report nests 4 deep; deeper is an attack, not a report

_WS = re.compile(r"[ \t\n\r]*")


class TooManyRecords(PayloadTooLarge):
    def __init__(self, limit: int) -> None:
        super().__init__(f"at most {limit} records per request", limit=limit)


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValueError("an object has the same key twice")  # the key is not echoed: it may be a CPR
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
        value = _records(text, max_records) if max_records is not None else _DECODER.decode(text)
    except RecursionError as exc:
        raise BadRequest("the body is nested too deeply") from exc
    except ValueError as exc:  # JSONDecodeError says where, never what: no value is echoed
        raise BadRequest(f"the body is not valid JSON: {exc}") from exc
    if _too_deep(value):
        raise BadRequest(f"the body is nested more than {MAX_DEPTH} levels deep")
    return value


def _records(text: str, limit: int) -> Any:
    start = _skip(text, 0)
    if not text.startswith("[", start):
        value = _DECODER.decode(text)
        reports = value.get("reports") if isinstance(value, dict) else None
        if isinstance(reports, list) and len(reports) > limit:
            raise TooManyRecords(limit)
        return value
    items: list[Any] = []
    pos = _skip(text, start + 1)
    if text.startswith("]", pos):
        return _end(text, pos, items)
    while True:
        if len(items) == limit:
            raise TooManyRecords(limit)
        item, pos = _DECODER.raw_decode(text, pos)
        items.append(item)
        pos = _skip(text, pos)
        if text.startswith("]", pos):
            return _end(text, pos, items)
        if not text.startswith(",", pos):
            raise json.JSONDecodeError("Expecting ',' delimiter", text, pos)
        pos = _skip(text, pos + 1)


def _skip(text: str, pos: int) -> int:
    match = _WS.match(text, pos)
    return match.end() if match else pos


def _end(text: str, pos: int, items: list[Any]) -> list[Any]:
    end = _skip(text, pos + 1)
    if end != len(text):
        raise json.JSONDecodeError("Extra data", text, end)
    return items


def _too_deep(value: Any) -> bool:
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else None
        if children is None:
            continue
        if depth > MAX_DEPTH:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False
