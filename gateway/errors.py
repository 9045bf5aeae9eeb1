"""The gateway's own errors, and how each reaches a user.

HTTP-facing errors become RFC 9457 ``application/problem+json`` responses; CLI-facing
errors become one line on stderr and exit code 1. Delivery errors (what the dispatcher
does with a vendor failure) live in ``adapters/base.py``::

    DeliveryError
    ├── Transient       → retry_scheduled (next_attempt_at from the retry policy)
    ├── InDoubt         → in_doubt (reconciled by read-back, or an operator decides)
    ├── Rejected        → failed (the vendor's reason is kept)
    └── InvalidPayload  → failed, never sent, never retried
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


class ConfigError(Exception):
    """A bad setting: the message is one line naming the key."""


@dataclass(frozen=True, slots=True)
class FieldError:
    pointer: str  # RFC 6901 JSON pointer into the request body
    message: str

    def as_json(self) -> dict[str, str]:
        return {"pointer": self.pointer, "message": self.message}


class GatewayError(Exception):
    """An error answered as problem+json."""

    status = 500
    title = "Internal error"
    type_ = "about:blank"

    def __init__(self, detail: str, errors: Sequence[FieldError] = (), **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.errors = tuple(errors)
        self.extra = extra
        self.headers: dict[str, str] = {}

    def problem(self, instance: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "type": self.type_,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
        }
        if instance:
            body["instance"] = instance
        if self.errors:
            body["errors"] = [e.as_json() for e in self.errors]
        body.update(self.extra)
        return body


class BadRequest(GatewayError):
    status, title = 400, "Bad request"


class Unauthorized(GatewayError):
    status, title = 401, "Unauthorized"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.headers["WWW-Authenticate"] = 'Bearer realm="payroll-gateway"'


class Forbidden(GatewayError):
    status, title = 403, "Forbidden"


class NotFound(GatewayError):
    status, title = 404, "Not found"


class Conflict(GatewayError):
    status, title = 409, "Conflict"


class PayloadTooLarge(GatewayError):
    status, title = 413, "Payload too large"


class UnsupportedMediaType(GatewayError):
    status, title = 415, "Unsupported media type"


class InvalidReport(GatewayError):
    status, title = 422, "Invalid report"


class StoreUnavailable(GatewayError):
    """The store could not commit: nothing was acknowledged."""

    status, title = 503, "Store unavailable"
