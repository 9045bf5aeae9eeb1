"""The at-risk watch: flags deliveries that will miss their payroll run's cut-off, and says so.

Every flagged delivery is counted (``/metrics``) and written to the audit trail; the
alert subsystem (``gateway/alerts.py``) is nudged, and opens one ``deliveries.at_risk``
alert per endpoint, notified through ``[alerts]``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from .settings import Settings
from .store import Store

log = logging.getLogger(__name__)


class AtRiskWatch:
    def __init__(
        self,
        store: Store,
        settings: Settings,
        clock: Callable[[], float] = time.time,
        on_flagged: Callable[[], None] | None = None,
    ) -> None:
        self.store, self.settings, self.clock = store, settings, clock
        self.on_flagged = on_flagged

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
            if self.on_flagged is not None:
                self.on_flagged()
        return flagged
