"""Local stand-in for KMD Opus "Webservice – Engangsydelser" (read and update one-off payments).

It requires a client certificate (as KMD does), validates requests against our schemas,
keeps what was posted in a ledger so reads return it, and injects faults on demand.

``SimulatorOptions.fault_mix`` draws one kind per request (update or read) with one uniform
number from the seeded rng: ``server`` (HTTP 500, nothing applied), ``timeout`` (applied,
then the answer is held for ``hang_seconds``), ``reset`` (the connection is closed without
an answer, nothing applied) and ``drop-after-apply`` (applied, then the connection is
closed). For a read, "applied" only means the read was answered late or not at all.
"""

from __future__ import annotations

import asyncio
import calendar
import contextlib
import json
import random
import ssl
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

from aiohttp import web
from jsonschema import Draft202012Validator

from adapters.kmd_engangsydelser import SCHEMA_FILES
from adapters.resources import schema_text
from gateway.simulators import SimulatorOptions, check_fault_mix, pick_fault

__all__ = ["STATE", "Ledger", "Posting", "SimState", "build_app", "ssl_context"]

FAULTS = ("server", "timeout", "drop-after-apply")
MIX_KINDS = frozenset({"server", "timeout", "reset", "drop-after-apply"})
DEFAULT_CLIENTS = frozenset({"740", "840", "851", "746"})
LOCKED_TEXT = "Medarbejderen er låst"
CODES = {
    119: "Angiv gyldigt omkostningssted.",
    151: "PSP element er ikke gyldigt.",
    167: "Du må ikke anvende både afv. omkostningssted og afv. PSP-element.",
}


# ---------------------------------------------------------------------------------------
# The ledger: pure bookkeeping of what was posted per employee.
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Posting:
    objekt_id: str
    employee: str
    startdato: date
    loenart: str
    loebenummer: int
    antal: Decimal
    cost_centre: str | None
    psp_element: str | None
    sender: str
    remark: str

    def as_json(self) -> dict[str, Any]:
        """As KMD's read answer shows it (Antal as a JSON number, as KMD sends doubles)."""
        return {
            "Startdato": self.startdato.isoformat(),
            "Objekt_id": self.objekt_id,
            "Loenart": self.loenart,
            "Loebenummer": self.loebenummer,
            "Beloeb": 0.0,
            "Antal": float(self.antal),
            "Afv_Timeloen": 0,
            "Afv_PSP_Element": self.psp_element or "",
            "Indv_Bemaerkning_1": self.sender,
            "Indv_Bemaerkning_2": self.remark,
        }


class Ledger:
    """Postings per employee; no I/O, no clock."""

    def __init__(self) -> None:
        self._postings: dict[str, list[Posting]] = {}
        self._next_id = 1

    def post(self, employee: str, items: Iterable[dict[str, Any]]) -> list[Posting]:
        added = [self._posting(employee, item) for item in items]
        self._postings.setdefault(employee, []).extend(added)
        return added

    def _posting(self, employee: str, item: dict[str, Any]) -> Posting:
        objekt_id = f"{self._next_id:012d}"
        self._next_id += 1
        return Posting(
            objekt_id=objekt_id,
            employee=employee,
            startdato=date.fromisoformat(item["Startdato"][:10]),  # "YYYY-MM-DDT00:00:00Z"
            loenart=item["Loenart"],
            loebenummer=int(item["Loebenummer"]),
            antal=Decimal(item["Antal"]),
            cost_centre=item.get("Afv_Omkostningssted"),
            psp_element=item.get("Afv_PSP_Element"),
            sender=item["Afsendelses_System"],
            remark=item["Indv_Bemaerkning"],
        )

    def read(self, employee: str, first: date, last: date) -> list[Posting]:
        return [p for p in self._postings.get(employee, ()) if first <= p.startdato <= last]

    def sum(self, employee: str, month: str, loenart: str) -> Decimal:
        year, mon = (int(x) for x in month.split("-"))
        first, last = date(year, mon, 1), date(year, mon, calendar.monthrange(year, mon)[1])
        return sum(
            (p.antal for p in self.read(employee, first, last) if p.loenart == loenart),
            Decimal("0.00"),
        )

    def all(self) -> list[Posting]:
        return [p for postings in self._postings.values() for p in postings]


# ---------------------------------------------------------------------------------------
# Simulator state (runtime-changeable by tests and the demo).
# ---------------------------------------------------------------------------------------


@dataclass
class SimState:
    options: SimulatorOptions
    ledger: Ledger = field(default_factory=Ledger)
    allowed_clients: set[str] = field(default_factory=lambda: set(DEFAULT_CLIENTS))
    locked: set[str] = field(default_factory=set)
    invalid_cost_centres: set[str] = field(default_factory=lambda: {"9999999999"})
    invalid_psp_elements: set[str] = field(default_factory=lambda: {"XG-9999999999-99999"})
    received: list[dict[str, Any]] = field(default_factory=list)  # every update processed
    refused: list[Any] = field(default_factory=list)  # update requests answered 400 or 403
    reads: list[dict[str, Any]] = field(default_factory=list)
    fault: str | None = None
    fail_next: int = 0  # answer the next N requests with fail_status
    fail_status: int = 500
    retry_after: int | None = None  # Retry-After sent with injected 429/503
    drop_next: int = 0  # apply the next N updates, then drop the connection
    hang_seconds: float = 60.0  # how long a "timeout" fault keeps the request open
    rng: random.Random = field(default_factory=random.Random)
    injected: dict[str, int] = field(default_factory=dict)  # fault kind -> times drawn from the mix
    closing: asyncio.Event = field(default_factory=asyncio.Event)  # set at shutdown: hangs end

    def sum(self, employee: str, month: str, loenart: str) -> Decimal:
        """Net ``Antal`` posted for one employee, month ("YYYY-MM") and Loenart."""
        return self.ledger.sum(employee, month, loenart)


STATE = web.AppKey("engangsydelser_state", SimState)


def _validator(name: str) -> Draft202012Validator:
    return Draft202012Validator(json.loads(schema_text(name)))


_UPDATE = _validator(SCHEMA_FILES[0])
_READ = _validator(SCHEMA_FILES[2])


def _schema_errors(validator: Draft202012Validator, doc: Any) -> list[str]:
    return [
        f"/{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)
    ]


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _bad_request(errors: Sequence[str]) -> web.Response:
    return web.json_response({"error": "Bad Request", "details": list(errors)[:20]}, status=400)


# ---------------------------------------------------------------------------------------
# Business rules for an update (pure).
# ---------------------------------------------------------------------------------------


def _looks_invalid(value: str | None, known_bad: set[str]) -> bool:
    # "9999999999"-like values (only nines, separators aside) stand for KMD's invalid ones.
    if not value:
        return False
    digits = "".join(ch for ch in value if ch.isalnum())
    return value in known_bad or (digits.isdigit() and set(digits) == {"9"})


def _item_codes(item: dict[str, Any], state: SimState) -> list[int]:
    cost, psp = item.get("Afv_Omkostningssted"), item.get("Afv_PSP_Element")
    if cost and psp:
        return [167]
    codes = []
    if _looks_invalid(cost, state.invalid_cost_centres):
        codes.append(119)
    if _looks_invalid(psp, state.invalid_psp_elements):
        codes.append(151)
    return codes


def _meddelelse(seq: int, kode: int, text: str, kind: str = "E") -> dict[str, Any]:
    return {
        "Timestamp": _now(),
        "Kode": kode,
        "Type": kind,
        "Tekst": f"Engangsydelse Nr. {seq:03d} {text}",
    }


def update_messages(doc: dict[str, Any], state: SimState) -> list[dict[str, Any]]:
    """KMD's error messages for an update (empty when it would be applied)."""
    employee = doc["Medarbejder"]["Medarbejdernummer"]
    if employee in state.locked:
        return [_meddelelse(0, 138, LOCKED_TEXT)]
    found = []
    for item in doc["Engangsydelser"]:
        seq = int(item["Sekvensnummer"])
        found += [_meddelelse(seq, code, CODES[code]) for code in _item_codes(item, state)]
    return found


# ---------------------------------------------------------------------------------------
# HTTP handlers.
# ---------------------------------------------------------------------------------------


async def _read_json(request: web.Request) -> Any:
    try:
        return json.loads(await request.read())
    except ValueError:
        return None


def _client_allowed(doc: Any, state: SimState) -> bool:
    header = doc.get("Header") if isinstance(doc, dict) else None
    return isinstance(header, dict) and header.get("ClientID") in state.allowed_clients


def _forbidden() -> web.Response:
    return web.json_response(
        {"error": "Forbidden", "message": "ClientID not allowed for current client certificate"},
        status=403,
    )


def _mixed_fault(state: SimState) -> str | None:
    """One draw from ``fault_mix`` per request (None: no mix, or no fault this time)."""
    if not state.options.fault_mix:
        return None
    kind = pick_fault(state.options.fault_mix, state.rng.random())
    if kind is not None:
        state.injected[kind] = state.injected.get(kind, 0) + 1
    return kind


async def _hang(state: SimState) -> None:
    """Hold the answer for ``hang_seconds``, or until the server shuts down."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(state.closing.wait(), state.hang_seconds)


async def _wake_sleepers(app: web.Application) -> None:
    app[STATE].closing.set()


async def _injected(
    request: web.Request, state: SimState, mixed: str | None = None
) -> web.StreamResponse | None:
    """A fault response, or None to answer normally."""
    opts = state.options
    if opts.latency_ms:
        await asyncio.sleep(opts.latency_ms / 1000)
    if state.fault == "timeout":
        await _hang(state)
    if mixed == "server":
        return web.json_response({"error": "injected fault"}, status=500)
    if mixed == "reset":
        await request.read()  # the whole request arrived; nothing is applied
        _drop(request)
        return web.Response(status=204)  # never reaches the client
    forced = state.fault == "server" or (opts.fail_rate and state.rng.random() < opts.fail_rate)
    if state.fail_next > 0 or forced:
        status = state.fail_status if state.fail_next > 0 else 500
        state.fail_next = max(0, state.fail_next - 1)
        headers = {"Retry-After": str(state.retry_after)} if state.retry_after else None
        return web.json_response({"error": "injected fault"}, status=status, headers=headers)
    return None


async def update(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    mixed = _mixed_fault(state)
    injected = await _injected(request, state, mixed)
    if injected is not None:
        return injected
    doc = await _read_json(request)
    refusal = _refusal(doc, state)
    if refusal is not None:
        state.refused.append(doc)
        return refusal
    state.received.append(doc)
    response = _apply(request, doc, state, drop=mixed == "drop-after-apply")
    if mixed == "timeout":
        await _hang(state)
    return response


def _refusal(doc: Any, state: SimState) -> web.Response | None:
    """The gateway-level answer (403 or 400) for an update KMD would not process."""
    if not _client_allowed(doc, state):
        return _forbidden()
    items = doc.get("Engangsydelser")
    if isinstance(items, list) and len(items) > 999:
        return _bad_request([f"at most 999 Engangsydelser per call, got {len(items)}"])
    errors = _schema_errors(_UPDATE, doc)
    return _bad_request(errors) if errors else None


def _apply(
    request: web.Request, doc: dict[str, Any], state: SimState, drop: bool = False
) -> web.StreamResponse:
    header = {"Timestamp": _now(), "OpdateringsID": doc["Header"]["OpdateringsID"]}
    messages = update_messages(doc, state)
    if messages:
        return web.json_response(
            {
                "Header": {**header, "Status": "Error"},
                "Medarbejder": doc["Medarbejder"],
                "Meddelelse": messages,
            }
        )
    if doc["Header"].get("Kun_Valider") != "1":  # "1" validates only; absent posts
        state.ledger.post(doc["Medarbejder"]["Medarbejdernummer"], doc["Engangsydelser"])
    if drop or state.fault == "drop-after-apply" or state.drop_next > 0:
        state.drop_next = max(0, state.drop_next - (not drop))
        _drop(request)
        return web.Response(status=204)  # never reaches the client
    return web.json_response(
        {"Header": {**header, "Status": "OK"}, "Medarbejder": doc["Medarbejder"], "Meddelelse": []}
    )


def _drop(request: web.Request) -> None:
    """Close the socket before answering: the client cannot know the update was applied."""
    if request.transport is not None:
        request.transport.abort()


async def read(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    mixed = _mixed_fault(state)
    injected = await _injected(request, state, mixed)
    if injected is not None:
        return injected
    doc = await _read_json(request)
    if not _client_allowed(doc, state):
        return _forbidden()
    errors = _schema_errors(_READ, doc)
    if errors:
        return _bad_request(errors)
    state.reads.append(doc)
    answer = web.json_response(read_answer(doc, state.ledger))
    if mixed == "timeout":
        await _hang(state)
    elif mixed == "drop-after-apply":
        _drop(request)
    return answer


def read_answer(doc: dict[str, Any], ledger: Ledger) -> dict[str, Any]:
    """The read response for a validated request (pure)."""
    flt = doc["VirkningFilter"]
    first = datetime.fromisoformat(flt["FraDatoTid"].replace("Z", "+00:00")).date()
    last = datetime.fromisoformat(flt["TilDatoTid"].replace("Z", "+00:00")).date()
    found = ledger.read(doc["Medarbejder"]["Medarbejdernummer"], first, last)
    header = {"Status": 0, "Tekst": "OK"} if found else {"Status": 1, "Tekst": "Data ikke fundet."}
    return {
        "Header": header,
        "Medarbejder": doc["Medarbejder"],
        "Engangsydelser": [p.as_json() for p in found],
    }


def build_app(options: SimulatorOptions) -> web.Application:
    """The simulator app (serve it with :func:`ssl_context` for mutual TLS)."""
    if options.fault is not None and options.fault not in FAULTS:
        raise ValueError(f"unknown fault {options.fault!r}; expected one of {', '.join(FAULTS)}")
    check_fault_mix(options.fault_mix, MIX_KINDS)
    app = web.Application(client_max_size=8 * 1024 * 1024)
    app[STATE] = SimState(options=options, fault=options.fault, rng=random.Random(options.seed))
    app.on_shutdown.append(_wake_sleepers)
    app.router.add_post("/lpe/update-onetime-payments", update)
    app.router.add_post("/lpe/read-onetime-payments", read)
    return app


def ssl_context(options: SimulatorOptions) -> ssl.SSLContext:
    """TLS server context that requires a client certificate chaining to client_ca_file."""
    missing = [n for n in ("cert_file", "key_file", "client_ca_file") if not getattr(options, n)]
    if missing:
        raise ValueError(f"the Engangsydelser simulator needs {', '.join(missing)} (mutual TLS)")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=options.client_ca_file)
    ctx.load_cert_chain(str(options.cert_file), str(options.key_file))
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx
