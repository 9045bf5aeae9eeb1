"""``post`` bounds a vendor's answer: at most ``max_reply_bytes`` are read and the whole request
has a total deadline. The request reached the vendor in both cases, so both are in doubt."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from adapters.base import Channel, InDoubt, Payload, VendorSettings, post

MIB = 1024 * 1024
Serve = Callable[..., Awaitable[TestServer]]


def _app() -> web.Application:
    async def trickle(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse()
        await resp.prepare(request)
        for _ in range(40):  # 1 byte every 0.5 s: never silent for long, never done
            await resp.write(b"x")
            await asyncio.sleep(0.5)
        return resp

    async def huge(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=b"x" * (5 * MIB))

    async def huge_chunked(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse()  # no Content-Length: only reading tells
        await resp.prepare(request)
        for _ in range(80):
            await resp.write(b"x" * 65536)
        return resp

    async def small(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=b"x" * 1000)

    app = web.Application()
    app.add_routes(
        [
            web.post("/trickle", trickle),
            web.post("/huge", huge),
            web.post("/chunked", huge_chunked),
            web.post("/small", small),
        ]
    )
    return app


@pytest.fixture
async def vendor(aiohttp_server: Serve) -> TestServer:
    return await aiohttp_server(_app())


async def _post(server: TestServer, path: str, **settings: object) -> bytes:
    vendor = VendorSettings(endpoint=str(server.make_url(path)), connect_timeout=1, read_timeout=2)
    async with aiohttp.ClientSession() as session:
        response = await post(
            Channel(session, replace(vendor, **settings)), Payload(b"<x/>", "text/xml")
        )
    return response.body


async def test_a_vendor_that_trickles_is_in_doubt_at_the_total_deadline(vendor: TestServer) -> None:
    started = time.monotonic()
    with pytest.raises(InDoubt, match="1.5 s in all"):
        await _post(vendor, "/trickle", total_timeout=1.5)
    assert time.monotonic() - started < 3  # the 2 s read timeout alone would never fire


@pytest.mark.parametrize("path", ["/huge", "/chunked"])
async def test_an_answer_over_the_bound_is_in_doubt(vendor: TestServer, path: str) -> None:
    with pytest.raises(InDoubt, match="longer than 1048576 bytes") as caught:
        await _post(vendor, path)  # the default bound: 1 MiB
    assert caught.value.status == 200


async def test_an_answer_within_the_bound_is_read_whole(vendor: TestServer) -> None:
    assert len(await _post(vendor, "/small", max_reply_bytes=1000)) == 1000
    with pytest.raises(InDoubt, match="longer than 999 bytes"):
        await _post(vendor, "/small", max_reply_bytes=999)
    assert len(await _post(vendor, "/chunked", max_reply_bytes=6 * MIB)) == 80 * 65536


def test_the_deadline_defaults_to_connect_plus_read() -> None:
    assert VendorSettings(connect_timeout=5, read_timeout=30).deadline() == 35
    assert VendorSettings(total_timeout=12).deadline() == 12
