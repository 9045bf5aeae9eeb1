"""A local stand-in for OS2indberetning's drive service, the source the gateway pulls from.

Two routes under any base path: ``GET …GetReportsToPayroll`` serves the records not yet
processed (at most ``page_size`` per call when set), and ``POST …AcknowledgeReportsProcessed``
takes a JSON array of integer ids and marks those records processed. Both need the header
``ApiKey`` (401 otherwise) when the simulator has a key.

``fault`` (option, or ``app[STATE].fault`` at run time), one kind on every request:

- ``server``: HTTP 500 on both routes, nothing applied;
- ``bad-json``: the GET answers 200 with a truncated JSON body;
- ``not-array``: the GET answers 200 with a JSON object around the records;
- ``timeout``: the GET gets no answer until the server shuts down (or ``hang_seconds``);
- ``ack-lost``: the acknowledgement is read, NOT applied, and the connection is closed
  without an answer, so the records come again;
- ``ack-hang``: the acknowledgement is NOT applied and gets no answer (kill tests).

Tests use :class:`Os2State`: ``add(records)``, ``processed``, ``served`` and ``acked``
(times per id), ``ack_requests`` and ``ack_seen`` (set when an acknowledgement arrives).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from gateway.simulators import SimulatorOptions

FAULTS = frozenset({"server", "bad-json", "not-array", "timeout", "ack-lost", "ack-hang"})
HANG_SECONDS = 3600.0


@dataclass(slots=True)
class Os2State:
    """The records the service holds, and what happened to them."""

    api_key: str | None
    fault: str | None = None
    page_size: int | None = None  # at most this many records per GET
    records: dict[int, dict[str, Any]] = field(default_factory=dict)  # by Id, in the order added
    processed: set[int] = field(default_factory=set)
    served: Counter[int] = field(default_factory=Counter)  # times each id was served
    acked: Counter[int] = field(default_factory=Counter)  # times each id was acknowledged (applied)
    gets: int = 0
    ack_requests: int = 0
    unauthorized: int = 0
    ack_seen: asyncio.Event = field(default_factory=asyncio.Event)
    closing: asyncio.Event = field(default_factory=asyncio.Event)
    hang_seconds: float = HANG_SECONDS

    def add(self, records: Iterable[dict[str, Any]]) -> None:
        """Add (or replace, unprocessed again) records; each needs an integer ``Id``."""
        for record in records:
            rid = int(_id(record))
            self.records[rid] = dict(record)
            self.processed.discard(rid)

    def unprocessed(self) -> list[dict[str, Any]]:
        return [r for rid, r in self.records.items() if rid not in self.processed]


STATE = web.AppKey("os2_state", Os2State)


def _id(record: dict[str, Any]) -> Any:
    return next(v for k, v in record.items() if k.lower() == "id")


def load_records(path: str | Path) -> list[dict[str, Any]]:
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise ValueError(f"{path}: expected a JSON array of records")
    return data


def build_app(options: SimulatorOptions) -> web.Application:
    if options.fault is not None and options.fault not in FAULTS:
        raise ValueError(
            f"unknown os2indberetning fault {options.fault!r}; choose from {sorted(FAULTS)}"
        )
    app = web.Application()
    state = Os2State(api_key=options.api_key, fault=options.fault)
    if options.records_file:
        state.add(load_records(options.records_file))
    app[STATE] = state
    app.router.add_get("/{base:.*}GetReportsToPayroll", _get_reports)
    app.router.add_post("/{base:.*}AcknowledgeReportsProcessed", _acknowledge)
    app.on_shutdown.append(_wake_sleepers)
    return app


async def _wake_sleepers(app: web.Application) -> None:
    app[STATE].closing.set()


def _authorized(request: web.Request, state: Os2State) -> bool:
    if state.api_key is None:
        return True
    given = request.headers.get("ApiKey", "")
    ok = secrets.compare_digest(given.encode(), state.api_key.encode())
    state.unauthorized += not ok
    return ok


async def _hang(state: Os2State) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(state.closing.wait(), state.hang_seconds)


async def _get_reports(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    if not _authorized(request, state):
        return web.Response(status=401, text="Unauthorized: send the header ApiKey")
    state.gets += 1
    if state.fault == "server":
        return web.Response(status=500, text="Simulated server error")
    if state.fault == "timeout":
        await _hang(state)
        return web.Response(status=504, text="Simulated timeout")
    records = state.unprocessed()[: state.page_size]
    for record in records:
        state.served[int(_id(record))] += 1
    if state.fault == "bad-json":
        return web.Response(
            status=200, text=json.dumps(records)[:-1] + ",", content_type="application/json"
        )
    if state.fault == "not-array":
        return web.json_response({"records": records})
    return web.json_response(records)


async def _acknowledge(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    if not _authorized(request, state):
        return web.Response(status=401, text="Unauthorized: send the header ApiKey")
    state.ack_requests += 1
    state.ack_seen.set()
    try:
        ids = json.loads(await request.read())
    except (UnicodeDecodeError, json.JSONDecodeError):
        return web.Response(status=400, text="expected a JSON array of integer ids")
    if not isinstance(ids, list) or not all(
        isinstance(i, int) and not isinstance(i, bool) for i in ids
    ):
        return web.Response(status=400, text="expected a JSON array of integer ids")
    if state.fault == "server":
        return web.Response(status=500, text="Simulated server error")
    if state.fault == "ack-hang":
        await _hang(state)
        return web.Response(status=504, text="Simulated timeout")
    if state.fault == "ack-lost":
        if request.transport is not None:
            request.transport.close()
        raise asyncio.CancelledError
    for rid in ids:
        if rid in state.records:
            state.processed.add(rid)
            state.acked[rid] += 1
    return web.json_response({"acknowledged": len(ids)})
