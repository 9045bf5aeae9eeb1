"""The gateway's one error tree: every error it raises, and where each one leads.

The tree is shaped by what happens next, not by where the error arose::

    Exception
    ├── GatewayError            an HTTP request fails → RFC 9457 problem+json (app.problems)
    │   ├── BadRequest          400  the request cannot be read
    │   ├── Unauthorized        401  no or unknown key/token (WWW-Authenticate: Bearer)
    │   ├── Forbidden           403  the key or operator may not act for that municipality,
    │   │                            or the operator's role may not do that
    │   ├── NotFound            404
    │   ├── Conflict            409  same report version, other content (nothing stored)
    │   ├── PayloadTooLarge     413  body or record count over the limit
    │   ├── UnsupportedMediaType 415 not JSON
    │   ├── InvalidReport       422  fails the schema or a vendor rule; ``errors`` point at it
    │   ├── TooManyRequests     429  too many failed authentications from one address (Retry-After)
    │   └── StoreUnavailable    503  the store could not commit: nothing was acknowledged
    ├── DeliveryError           adapters.base: a vendor call fails → the dispatcher decides
    │   ├── Transient           → retry_scheduled (next_attempt_at from the retry policy,
    │   │                         never before the vendor's Retry-After)
    │   ├── InDoubt             → in_doubt (never resent blindly: reconciled by read-back
    │   │                         where the adapter ``reads_back``, or an operator decides)
    │   ├── Rejected            → failed, permanent (the vendor's reason is kept)
    │   └── InvalidPayload      → failed, never sent, never retried (render or schema check)
    ├── ConfigError             a bad setting → one line naming the key, exit 1 (serve refuses
    │                             to start)
    ├── RegistryError           adapters.registry: an adapter cannot be registered → one line
    │                             naming it, exit 1
    ├── CliError                cli: a user error → one line on stderr, exit 1
    ├── StoreError              store: connection lost, disk full, commit failed → StoreUnavailable
    │                             at intake, a retried loop in the dispatcher
    └── PullError               sources: a pull or acknowledgement failed → retried with backoff

Foreign exceptions are translated where they enter, once, and chained (``raise … from exc``):

- aiohttp (vendor calls) → Transient before the request left, InDoubt after: ``adapters.base.post``;
- HTTP status codes of vendor answers → Transient / Rejected: ``adapters.base.classify_status``
  (each adapter adds only its vendor's body-level rules: SOAP faults, status fields);
- lxml / zeep (vendor XML) → ``adapters.soap.UnsafeXML`` (a ValueError) and InvalidPayload;
- sqlite3 / the PostgreSQL driver → StoreError: the store engines (``gateway/store/``);
- anything unexpected in a request → a logged, masked 500: the ``problems`` middleware.

The delivery errors are defined in ``adapters/base.py`` (the plug-in API, which never imports
the gateway) and re-exported here, so that gateway code imports every error from this module.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from adapters.base import DeliveryError, InDoubt, InvalidPayload, Rejected, Transient

__all__ = [
    "BadRequest",
    "ConfigError",
    "Conflict",
    "DeliveryError",
    "FieldError",
    "Forbidden",
    "GatewayError",
    "InDoubt",
    "InvalidPayload",
    "InvalidReport",
    "NotFound",
    "PayloadTooLarge",
    "Rejected",
    "StoreUnavailable",
    "TooManyRequests",
    "Transient",
    "Unauthorized",
    "UnsupportedMediaType",
]


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


class TooManyRequests(GatewayError):
    status, title = 429, "Too many requests"

    def __init__(self, detail: str, retry_after: int) -> None:
        super().__init__(detail)
        self.headers["Retry-After"] = str(retry_after)


class StoreUnavailable(GatewayError):
    """The store could not commit: nothing was acknowledged."""

    status, title = 503, "Store unavailable"
