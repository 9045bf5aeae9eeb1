"""Console sessions and CSRF: random tokens in cookies, only their hashes in the store.

A signed-in browser holds a random token in an HttpOnly, SameSite=Strict cookie; the store
keeps its SHA-256 with the operator's name and an expiry, so a copy of the database signs
no one in, and every gateway process (PostgreSQL) knows every session. A form's CSRF token
is an HMAC of the session token: it needs no storage, and only that browser can know it.
The sign-in form, before any session, is protected the same way by a short-lived cookie.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
from dataclasses import dataclass
from urllib.parse import urlsplit

from aiohttp import web

from ..settings import Operator, Settings

COOKIE = "pgw_session"
SIGNIN_COOKIE = "pgw_signin"  # before a session: the sign-in form's CSRF token is tied to it
SIGNIN_SECONDS = 30 * 60
TOKEN_BYTES = 32


@dataclass(frozen=True, slots=True)
class Session:
    """The signed-in operator of a request (role and municipalities from the config file)."""

    who: Operator
    token_hash: str = ""
    csrf: str = ""


def new_token() -> str:
    return secrets.token_urlsafe(TOKEN_BYTES)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def csrf_for(token: str) -> str:
    """The CSRF token of the forms a browser with this cookie token is shown."""
    return hmac.new(token.encode("utf-8"), b"payroll-gateway console csrf", "sha256").hexdigest()


def csrf_ok(token: str | None, given: object) -> bool:
    if not token or not isinstance(given, str) or not given:
        return False
    return hmac.compare_digest(csrf_for(token), given)


def secure_cookies(settings: Settings) -> bool:
    """Cookies are ``Secure`` unless the gateway itself speaks plain HTTP on a loopback address
    (the demo and the tests). Behind a TLS proxy (plain HTTP on another address) they stay
    ``Secure``: the browser sees HTTPS."""
    if settings.tls_cert_file is not None:
        return True
    return not is_loopback(settings.listen_host)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def set_cookie(
    response: web.StreamResponse, name: str, value: str, max_age: int, secure: bool
) -> None:
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        path="/ui/",
        secure=secure,
        httponly=True,
        samesite="Strict",
    )


def clear_cookie(response: web.StreamResponse, name: str, secure: bool) -> None:
    set_cookie(response, name, "", 0, secure)


def same_origin(request: web.Request) -> bool:
    """A POST whose ``Origin`` (or, without one, ``Referer``) names another host is refused.

    Browsers send ``Origin`` with every form POST; a client that sends neither is not a
    browser another site could drive, and still needs the CSRF token. Hosts are compared,
    not schemes: behind a TLS proxy the gateway itself is asked over plain HTTP.
    """
    given = request.headers.get("Origin") or request.headers.get("Referer")
    if given is None:
        return True
    return urlsplit(given).netloc.lower() == request.host.lower()
