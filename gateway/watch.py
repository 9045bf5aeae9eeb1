"""The at-risk watch: flags deliveries that will miss their payroll run's cut-off, and says so.

Every flagged delivery is counted (``/metrics``), written to the audit trail, and, when
``[alerts] url`` is set, announced with one JSON POST per check to that URL.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import aiohttp

from .settings import Settings
from .store import Store

log = logging.getLogger(__name__)


class AtRiskWatch:
    def __init__(
        self, store: Store, settings: Settings, clock: Callable[[], float] = time.time
    ) -> None:
        self.store, self.settings, self.clock = store, settings, clock

    async def run(self) -> None:
        while True:
            try:
                await self.check()
            except Exception:
                log.exception("the at-risk check failed; trying again at the next interval")
            await asyncio.sleep(self.settings.at_risk_check_seconds)

    async def check(self) -> list[dict[str, Any]]:
        flagged = await self.store.flag_at_risk(self.clock(), self.settings.at_risk_margin_seconds)
        if flagged:
            log.warning("%d deliveries are at risk of missing their payroll cut-off", len(flagged))
            if self.settings.alert_url:
                await self.alert(flagged)
        return flagged

    async def alert(self, flagged: list[dict[str, Any]]) -> None:
        """POST the flagged deliveries (no CPR: ids, report ids, states and times only)."""
        body = {"event": "deliveries.at_risk", "count": len(flagged), "deliveries": flagged}
        url = self.settings.alert_url
        assert url is not None
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
                async with session.post(url, json=body) as resp:
                    ok = resp.status < 300
        except (aiohttp.ClientError, TimeoutError) as exc:
            ok = False
            log.error("the at-risk alert to the configured URL failed: %s", exc.__class__.__name__)
        event = "alert.sent" if ok else "alert.failed"
        await self.store.record_event(
            event, {"deliveries": [d["id"] for d in flagged]}, self.clock()
        )
