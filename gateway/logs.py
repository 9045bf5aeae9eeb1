"""Logging set-up: one line per event, CPR numbers masked in every record, a correlation id."""

from __future__ import annotations

import contextvars
import logging

from .privacy import mask_cpr

correlation_id: contextvars.ContextVar[str] = contextvars.ContextVar("correlation_id", default="-")


class MaskingFilter(logging.Filter):
    """Masks anything that looks like a CPR number, whatever the message's origin."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = mask_cpr(record.getMessage())
        record.args = None
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = mask_cpr(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        record.correlation_id = correlation_id.get()
        return True


def configure(level: str = "INFO") -> None:
    handler = logging.StreamHandler()
    handler.addFilter(MaskingFilter())
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(correlation_id)s] %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
