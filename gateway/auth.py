"""Who is asking: bearer credentials, the failed-attempt limit per client address, and
what an operator's role and municipalities allow (DESIGN.md §3, "Operators").

Keys and tokens are compared in constant time (``Settings.tenant_for_key`` and
``Settings.operator_for_token``); nothing here logs or returns a credential.
"""

from __future__ import annotations

import hmac
import math
import time
from collections import OrderedDict
from collections.abc import Callable

from aiohttp import web

from .errors import Forbidden, TooManyRequests, Unauthorized
from .keys import APP_AUTH_FAILURES, APP_SETTINGS
from .settings import Operator, hash_api_key

WINDOW_SECONDS = 60.0
MAX_ADDRESSES = 10_000  # the table's bound: the oldest address is forgotten first

# what each ops action needs; reading needs "viewer"
ACTION_ROLES = {
    "replay": "operator",
    "cancel": "operator",
    "check": "operator",
    "confirm": "operator",
    "pause": "operator",
    "resume": "operator",
}


class AuthFailures:
    """Failed authentications per client address in a fixed one-minute window, in memory.

    Past ``limit`` failures every attempt from that address is refused with 429 until the
    window ends, a right credential too: otherwise the limit would still answer guesses.
    """

    def __init__(
        self,
        limit: int,
        clock: Callable[[], float] = time.monotonic,
        max_addresses: int = MAX_ADDRESSES,
    ) -> None:
        self.limit = limit
        self.clock = clock
        self.max_addresses = max_addresses
        self._windows: OrderedDict[str, tuple[float, int]] = OrderedDict()

    def check(self, address: str) -> None:
        """Raise TooManyRequests while ``address`` is over the limit."""
        start, count = self._windows.get(address, (0.0, 0))
        left = start + WINDOW_SECONDS - self.clock()
        if count >= self.limit and left > 0:
            raise TooManyRequests(
                f"too many failed authentications from this address; "
                f"try again in {math.ceil(left)} s",
                math.ceil(left),
            )

    def fail(self, address: str) -> None:
        now = self.clock()
        start, count = self._windows.pop(address, (now, 0))
        if now - start >= WINDOW_SECONDS:
            start, count = now, 0
        self._windows[address] = (start, count + 1)
        while len(self._windows) > self.max_addresses:
            self._windows.popitem(last=False)

    def __len__(self) -> int:
        return len(self._windows)


def bearer(request: web.Request, what: str) -> str:
    """The request's bearer credential (after the rate limit's check); 401 when there is none."""
    failures = request.app[APP_AUTH_FAILURES]
    address = client_address(request)
    failures.check(address)
    scheme, _, credential = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not credential.strip():
        failures.fail(address)
        raise Unauthorized(f"send {what} as 'Authorization: Bearer <{what.split()[-1]}>'")
    return credential.strip()


def refuse(request: web.Request, detail: str) -> Unauthorized:
    """Count a wrong credential against the client's address; the 401 to raise."""
    request.app[APP_AUTH_FAILURES].fail(client_address(request))
    return Unauthorized(detail)


def client_address(request: web.Request) -> str:
    """The peer's address. X-Forwarded-For is not trusted: a client could set it freely."""
    return request.remote or "unknown"


def operator(request: web.Request, role: str = "viewer") -> Operator:
    """The operator of the request's token, who must have at least ``role``."""
    token = bearer(request, "an operator token")
    found = request.app[APP_SETTINGS].operator_for_token(token)
    if found is None:
        raise refuse(request, "unknown operator token")
    require_role(found, role)
    return found


def require_role(who: Operator, role: str) -> None:
    if not who.may(role):
        raise Forbidden(
            f"operator {who.name!r} has role {who.role}; this needs role {role}",
            required_role=role,
        )


def require_municipality(who: Operator, municipality: str) -> None:
    if not who.covers(municipality):
        raise Forbidden(
            f"operator {who.name!r} is not allowed for municipality {municipality}",
            municipality=municipality,
        )


def metrics_token(request: web.Request) -> None:
    """``/metrics`` needs the token when ``[server] metrics_token_hash`` is set."""
    expected = request.app[APP_SETTINGS].metrics_token_hash
    if expected is None:
        return
    if not hmac.compare_digest(hash_api_key(bearer(request, "the metrics token")), expected):
        raise refuse(request, "wrong metrics token")
