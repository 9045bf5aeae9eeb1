"""A local stand-in for SD Løn's ``AnsaettelseKoerselOpret20170501`` endpoint, with fault injection.

Options honoured (``SimulatorOptions``): ``username``/``password`` (HTTP Basic; any
credentials when ``username`` is None), ``latency_ms`` (before every answer), ``fail_rate``
(share of requests answered with a SOAP ``Server`` fault, drawn with ``seed``) and
``fault``, one kind forced on every request:

- ``server``: HTTP 500 ``Server`` fault, nothing stored;
- ``client``: HTTP 500 ``Client`` fault, nothing stored;
- ``closed``: HTTP 200 with "The webservice has failed" (SD outside 06-22);
- ``unavailable``: HTTP 503 with ``Retry-After: 120``; ``throttle``: HTTP 429 with
  ``Retry-After: 61``;
- ``timeout``: no answer until the server shuts down, nothing stored;
- ``drop-after-apply``: stored, then the connection is closed without an answer.

``fault_mix`` (e.g. ``(("server", 0.3), ("timeout", 0.1), ("reset", 0.05))``) draws one
kind per request instead, with one uniform number from the seeded rng (:func:`pick_fault`).
Besides the kinds above it knows ``reset`` (the connection is closed without an answer,
nothing stored), and in a mix ``timeout`` means the worst case for a client: the
registration IS stored, and the answer comes only after a long sleep (``hang_seconds``).

Tests may change ``app[STATE].fault`` at run time, or set ``app[STATE].fail_next = N`` to
answer the next N valid-looking requests with ``Server`` faults and then recover. An
``AnsaettelseIdentifikator`` of ``00000000`` gets SD's "does not exist" ``Client`` fault.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import random
import secrets
import uuid
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal

from aiohttp import web
from lxml import etree

from adapters.base import mask_cpr
from adapters.resources import schema_path
from adapters.soap import (
    SOAP_ENV,
    UnsafeXML,
    body_payload,
    load_schema,
    parse_xml,
    schema_errors,
)
from gateway.simulators import SimulatorOptions, check_fault_mix, pick_fault

SD_NS = "urn:oio:sd:snitflader:2017.05.01"
KOERSEL_NS = "urn:oio:sd:snitflader:2012.02.01"
REQUEST_TAG = f"{{{SD_NS}}}AnsaettelseKoerselOpret"
UNKNOWN_EMPLOYMENT = "00000000"
CLOSED_BODY = b"<html><body><h1>The webservice has failed</h1></body></html>"
FAULTS = frozenset(
    {"server", "client", "closed", "unavailable", "throttle", "timeout", "drop-after-apply"}
)
MIX_KINDS = FAULTS | {"reset"}
APPLIED_KINDS = frozenset(
    {"drop-after-apply", "hang-after-apply"}
)  # stored, then no answer in time
TIMEOUT_SECONDS = 3600.0  # far beyond any client read timeout; shutdown ends it early


@dataclass(frozen=True, slots=True)
class Accepted:
    """One registration the simulator created."""

    registrering_id: str
    employment_id: str
    wage_code: str
    date: date
    km: Decimal
    body: bytes = field(repr=False)


@dataclass(slots=True)
class SdState:
    """What the simulator holds; tests read ``accepted`` and may steer ``fault``/``fail_next``."""

    options: SimulatorOptions
    rng: random.Random
    fault: str | None = None
    fail_next: int = 0
    received: int = 0
    accepted: list[Accepted] = field(default_factory=list)
    closing: asyncio.Event = field(default_factory=asyncio.Event)
    hang_seconds: float = TIMEOUT_SECONDS  # how long a mixed-in "timeout" holds its answer
    injected: dict[str, int] = field(default_factory=dict)  # fault kind -> times drawn from the mix


STATE = web.AppKey("sd_state", SdState)
_SCHEMA = web.AppKey("sd_schema", etree.XMLSchema)


def build_app(options: SimulatorOptions) -> web.Application:
    """The SD simulator: one POST route on any path."""
    if options.fault is not None and options.fault not in FAULTS:
        raise ValueError(f"unknown SD fault {options.fault!r}; choose from {sorted(FAULTS)}")
    check_fault_mix(options.fault_mix, MIX_KINDS)
    app = web.Application()
    app[STATE] = SdState(options=options, rng=random.Random(options.seed), fault=options.fault)
    app[_SCHEMA] = load_schema(schema_path("sd/sd-20170501.xsd"))
    app.router.add_post("/{tail:.*}", _handle)
    app.on_shutdown.append(_wake_sleepers)
    return app


async def _wake_sleepers(app: web.Application) -> None:
    # a "timeout" handler sleeps until this, so shutting the server down is not delayed
    app[STATE].closing.set()


async def _handle(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    state.received += 1
    if not _authorized(request, state.options):
        return web.Response(
            status=401, text="Unauthorized", headers={"WWW-Authenticate": 'Basic realm="SD"'}
        )
    if state.options.latency_ms:
        await asyncio.sleep(state.options.latency_ms / 1000)
    kind = _injected_fault(state)
    if kind is not None and kind not in APPLIED_KINDS:
        return await _injected_answer(kind, state, request)
    checked = _check_request(await request.read(), request.app[_SCHEMA])
    if isinstance(checked, web.Response):
        return checked
    accepted = _accept(state, checked)
    if kind == "drop-after-apply":
        return _drop(request)
    if kind == "hang-after-apply":
        await _hang(state, state.hang_seconds)
    return _soap(200, _response_payload(checked, accepted.registrering_id))


def _authorized(request: web.Request, options: SimulatorOptions) -> bool:
    if options.username is None:
        return True
    login, password = _basic_credentials(request.headers.get("Authorization", ""))
    if login is None:
        return False
    expected = f"{options.username}:{options.password or ''}".encode()
    return secrets.compare_digest(f"{login}:{password}".encode(), expected)


def _basic_credentials(header: str) -> tuple[str | None, str | None]:
    # decoded by hand: aiohttp 3.14 deprecates BasicAuth, decode included
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        return None, None
    try:
        text = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None, None
    login, sep, password = text.partition(":")
    return (login, password) if sep else (None, None)


def _injected_fault(state: SdState) -> str | None:
    if state.fault is not None:
        return state.fault
    if state.fail_next > 0:
        state.fail_next -= 1
        return "server"
    if state.options.fault_mix:
        kind = pick_fault(state.options.fault_mix, state.rng.random())
        if kind is not None:
            state.injected[kind] = state.injected.get(kind, 0) + 1
        return "hang-after-apply" if kind == "timeout" else kind
    if state.options.fail_rate and state.rng.random() < state.options.fail_rate:
        return "server"
    return None


async def _injected_answer(kind: str, state: SdState, request: web.Request) -> web.Response:
    if kind == "reset":
        await request.read()  # the whole request arrived; nothing is stored
        return _drop(request)
    if kind == "client":
        return _fault("Client", "Simulated client fault: the request was refused")
    if kind == "closed":
        return web.Response(status=200, body=CLOSED_BODY, content_type="text/html")
    if kind == "unavailable":
        return web.Response(status=503, text="Service Unavailable", headers={"Retry-After": "120"})
    if kind == "throttle":
        return web.Response(status=429, text="Too Many Requests", headers={"Retry-After": "61"})
    if kind == "timeout":
        await _hang(state, TIMEOUT_SECONDS)
    return _fault("Server", "Simulated server error: the request was not processed")


async def _hang(state: SdState, seconds: float) -> None:
    """Hold the answer for ``seconds``, or until the server shuts down."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(state.closing.wait(), seconds)


def _check_request(data: bytes, schema: etree.XMLSchema) -> etree._Element | web.Response:
    """The valid request payload, or the Client fault SD would answer."""
    try:
        payload = body_payload(parse_xml(data))
    except UnsafeXML as exc:
        return _fault("Client", f"Unreadable request: {exc}")
    if payload.tag != REQUEST_TAG:
        return _fault("Client", f"Unexpected request element {payload.tag}")
    errors = schema_errors(schema, payload)
    if errors:
        return _fault("Client", mask_cpr("Schema validation failed: " + "; ".join(errors)))
    if payload.findtext(f"{{{SD_NS}}}AnsaettelseIdentifikator") == UNKNOWN_EMPLOYMENT:
        return _fault("Client", "The stated EmploymentIdentifier does not exist")
    return payload


def _accept(state: SdState, payload: etree._Element) -> Accepted:
    accepted = Accepted(
        registrering_id=str(uuid.uuid4()),
        employment_id=payload.findtext(f"{{{SD_NS}}}AnsaettelseIdentifikator") or "",
        wage_code=payload.findtext(f"{{{KOERSEL_NS}}}RegistreringTypeIdentifikator") or "",
        date=date.fromisoformat(payload.findtext(f"{{{KOERSEL_NS}}}KoerselDato") or ""),
        km=Decimal(payload.findtext(f"{{{KOERSEL_NS}}}KilometerMaal") or "0"),
        body=etree.tostring(payload.getroottree()),
    )
    state.accepted.append(accepted)
    return accepted


def _drop(request: web.Request) -> web.Response:
    # the client never hears an answer (after "drop-after-apply" the registration is stored)
    if request.transport is not None:
        request.transport.close()
    raise asyncio.CancelledError


def _response_payload(request_payload: etree._Element, registrering_id: str) -> etree._Element:
    now = datetime.now(UTC).isoformat(timespec="seconds")
    root = etree.Element(
        f"{{{SD_NS}}}AnsaettelseKoerselOpret20170501", dannetDatoTid=now, nsmap={"sd": SD_NS}
    )
    echo = etree.SubElement(root, f"{{{SD_NS}}}InddataStruktur")
    echo.extend(etree.fromstring(etree.tostring(child)) for child in request_payload)
    etree.SubElement(root, f"{{{SD_NS}}}RegistreringIdentifikator").text = registrering_id
    return root


def _fault(code: str, text: str) -> web.Response:
    """A SOAP 1.1 fault with the text where SD puts it: ``Fault/detail/string``."""
    fault = etree.Element(f"{{{SOAP_ENV}}}Fault")
    etree.SubElement(fault, "faultcode").text = f"soap:{code}"
    etree.SubElement(fault, "faultstring").text = text
    etree.SubElement(etree.SubElement(fault, "detail"), "string").text = text
    return _soap(500, fault)


def _soap(status: int, payload: etree._Element) -> web.Response:
    envelope = etree.Element(f"{{{SOAP_ENV}}}Envelope", nsmap={"soap": SOAP_ENV})
    etree.SubElement(envelope, f"{{{SOAP_ENV}}}Body").append(payload)
    body = etree.tostring(envelope, xml_declaration=True, encoding="utf-8")
    return web.Response(status=status, body=body, content_type="text/xml", charset="utf-8")
