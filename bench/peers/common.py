"""What both peers share with the gateway's workload: the reports, the SD envelope (rendered
with the gateway's own ``sd-koersel`` adapter, so every system pays for the same payload)
and the POST to the SD simulator."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import aiohttp

from adapters.base import Payload, Report, VendorSettings
from adapters.sd_koersel import SdKoersel
from gateway.validation import normalise

CONCURRENCY = 32  # the gateway's dispatcher workers and max_in_flight in the bench config


def report(prefix: str, i: int, employees: int) -> dict[str, Any]:
    """Report ``i`` of a run: employee ``i % employees``, a distance that names it."""
    return {
        "kind": "drive",
        "municipality": "746",
        "report_id": f"{prefix}-{i:06d}",
        "version": 1,
        "employee": {"cpr": "0101901234", "employment_id": f"{10000 + i % employees:08d}"},
        "drive_date": f"2026-03-{1 + i % 28:02d}",
        "distance_km": f"{1 + i % 400}.{i % 100:02d}",
        "wage_code": "0201",
        "approved_by_cpr": "0202802345",
        "license_plate": "AB12345",
    }


def sd_settings() -> VendorSettings:
    """From the environment the harness sets: BENCH_SD_URL, BENCH_SD_USER, BENCH_SD_PASSWORD."""
    return VendorSettings(
        endpoint=os.environ["BENCH_SD_URL"],
        username=os.environ["BENCH_SD_USER"],
        password=os.environ["BENCH_SD_PASSWORD"],
        institution="XY",
    )


def renderer(settings: VendorSettings) -> Callable[[dict[str, Any]], list[Payload]]:
    adapter = SdKoersel()

    def render(data: dict[str, Any]) -> list[Payload]:
        typed = Report.from_dict(normalise(data))
        plan = adapter.plan(typed, (), settings)
        return [adapter.render(typed, m, settings) for m in plan.messages]

    return render


async def post(session: aiohttp.ClientSession, settings: VendorSettings, payload: Payload) -> None:
    """POST one envelope; raise on anything but 200."""
    headers = {
        "Content-Type": payload.content_type,
        "Authorization": aiohttp.encode_basic_auth(
            settings.username or "", settings.password or ""
        ),
        **payload.headers,
    }
    async with session.post(settings.endpoint, data=payload.body, headers=headers) as resp:
        await resp.read()
        if resp.status != 200:
            raise RuntimeError(f"SD answered {resp.status}")
