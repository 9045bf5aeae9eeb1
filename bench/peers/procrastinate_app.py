"""The Procrastinate app and its one task (a module of its own, as Procrastinate advises)."""

from __future__ import annotations

import os
from typing import Any

import aiohttp
import procrastinate

from bench.peers.common import CONCURRENCY, post, renderer, sd_settings

app = procrastinate.App(
    connector=procrastinate.PsycopgConnector(conninfo=os.environ["BENCH_PG_DSN"])
)
_session: list[aiohttp.ClientSession] = []
_render: list[Any] = []


@app.task(queue="sd", name="deliver_report")
async def deliver_report(report: dict[str, Any]) -> None:
    settings = sd_settings()
    if not _session:
        _session.append(aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=CONCURRENCY)))
        _render.append(renderer(settings))
    for payload in _render[0](report):
        await post(_session[0], settings, payload)
