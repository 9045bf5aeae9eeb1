"""Logging set-up: one JSON object per line, CPR numbers masked, a correlation id in each.

Fields beyond the message come from a fixed list (``FIELDS``), set with ``extra=`` or, for
everything logged while one delivery is worked on, by :func:`delivery_fields`. Nothing
else of a record is written: an ``extra`` carrying a secret by mistake is dropped.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import IO, Any

from .privacy import mask_cpr

correlation_id: contextvars.ContextVar[str] = contextvars.ContextVar("correlation_id", default="-")
_delivery: contextvars.ContextVar[tuple[tuple[str, Any], ...]] = contextvars.ContextVar(
    "delivery_fields", default=()
)

#: the fields a line may carry besides time, level, logger, message and request_id
FIELDS = (
    "municipality",
    "adapter",
    "delivery_id",
    "source",
    "method",
    "path",
    "status",
    "duration_ms",
    "alert",
    "cause",
    "channel",
)
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


@contextlib.contextmanager
def delivery_fields(
    municipality: str, adapter: str, delivery_id: int, request_id: str | None = None
) -> Iterator[None]:
    """Every line logged inside (in this task) names the delivery it is about, and carries
    as ``request_id`` the one its report version came with (the sender's X-Request-ID)."""
    token = _delivery.set(
        (("municipality", municipality), ("adapter", adapter), ("delivery_id", delivery_id))
    )
    with correlated(request_id):
        try:
            yield
        finally:
            _delivery.reset(token)


@contextlib.contextmanager
def correlated(request_id: str | None) -> Iterator[None]:
    """Lines logged inside (in this task) carry ``request_id`` (None: leave it as it is)."""
    if request_id is None:
        yield
        return
    token = correlation_id.set(request_id)
    try:
        yield
    finally:
        correlation_id.reset(token)


class MaskingFilter(logging.Filter):
    """Masks anything that looks like a CPR number, whatever the message's origin."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = mask_cpr(record.getMessage())
        record.args = None
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = mask_cpr(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        record.correlation_id = correlation_id.get()
        for name, value in _delivery.get():
            if not hasattr(record, name):
                setattr(record, name, value)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record; string fields are CPR-masked again on the way out."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": mask_cpr(record.getMessage()),
            "request_id": getattr(record, "correlation_id", None) or correlation_id.get(),
        }
        for name in FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                line[name] = mask_cpr(value) if isinstance(value, str) else value
        if record.exc_text:
            line["exception"] = mask_cpr(record.exc_text)
        return json.dumps(line, ensure_ascii=False, default=str)


def parse_level(value: str, where: str = "logging.level") -> str:
    """A level name (any case) as logging knows it; ValueError names the allowed ones."""
    level = value.upper() if isinstance(value, str) else ""
    if level not in LEVELS:
        raise ValueError(f"{where}: {value!r} is not a log level ({', '.join(LEVELS)})")
    return level


def configure(level: str = "INFO", stream: IO[str] | None = None) -> logging.Handler:
    """Route every logger to one JSON-lines handler on ``stream`` (stderr by default)."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.addFilter(MaskingFilter())
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(parse_level(level))
    return handler
