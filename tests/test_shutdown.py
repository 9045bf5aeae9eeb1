"""Shutting down never hangs: background tasks get a bounded time to end once cancelled."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from gateway.app import stop_tasks


async def test_a_task_that_swallows_its_cancellation_is_left_behind_and_named(
    caplog: pytest.LogCaptureFixture,
) -> None:
    release = asyncio.Event()

    async def stubborn() -> None:
        while not release.is_set():
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                continue  # a bug of this kind must not hang the gateway's shutdown

    async def polite() -> None:
        await asyncio.sleep(10)

    tasks = [
        asyncio.create_task(stubborn(), name="stubborn"),
        asyncio.create_task(polite(), name="polite"),
    ]
    await asyncio.sleep(0)
    started = time.monotonic()
    with caplog.at_level(logging.ERROR, logger="gateway.app"):
        await stop_tasks(tasks, within=0.2)
    assert time.monotonic() - started < 2
    assert tasks[1].cancelled()
    assert "stubborn did not stop within 0 s" in caplog.text
    assert "polite" not in caplog.text
    release.set()
    tasks[0].cancel()
    await asyncio.wait({tasks[0]}, timeout=1)
