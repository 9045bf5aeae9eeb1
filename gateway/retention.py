"""Retention: payload bodies, CPR numbers and IND01 backups go ``keep_months`` after delivery.

The audit metadata stays and still verifies (the chain covers digests, not bodies); each
purge is itself an audited event with its counts. The dispatch role runs one a day; the
command ``payroll-gateway purge`` runs one now.
"""

from __future__ import annotations

import asyncio
import calendar
import logging
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .settings import Settings
from .store import Store

log = logging.getLogger(__name__)
DAY_SECONDS = 24 * 3600.0
FIRST_RUN_SECONDS = 60.0  # after start: let the dispatcher settle first


def cutoff(now: float, keep_months: int) -> float:
    """``now`` minus ``keep_months`` calendar months (the day clamped to the month's end)."""
    t = datetime.fromtimestamp(now, UTC)
    months = t.year * 12 + t.month - 1 - keep_months
    year, month = divmod(months, 12)
    day = min(t.day, calendar.monthrange(year, month + 1)[1])
    return t.replace(year=year, month=month + 1, day=day).timestamp()


def backup_folders(store: Store, settings: Settings) -> list[Path]:
    """The ``backup`` folder beside each IND01 file the tenants write."""
    from .filerun import FileRunner  # the one place that knows where an IND01 file lives

    runner = FileRunner(store, {}, settings)
    folders = []
    for municipality, tenant in settings.tenants.items():
        for adapter in tenant.vendors:
            if adapter == "kmd-ind01":
                folders.append(runner.path(municipality, adapter).parent / "backup")
    return sorted(set(folders))


def old_backups(folders: Iterable[Path], before: float) -> list[Path]:
    return sorted(
        p
        for folder in folders
        if folder.is_dir()
        for p in folder.iterdir()
        if p.is_file() and p.stat().st_mtime < before
    )


async def purge(
    store: Store, settings: Settings, now: float, *, dry_run: bool = False
) -> dict[str, Any]:
    """One purge: backups first (counted in the store's audited event), then the store."""
    before = cutoff(now, settings.keep_months)
    backups = old_backups(backup_folders(store, settings), before)
    if not dry_run:
        for path in backups:
            await asyncio.to_thread(path.unlink, missing_ok=True)
    counts = await store.purge(
        before, now, dry_run=dry_run, extra={"backups": len(backups)} if backups else None
    )
    return {"before": before, "backups": len(backups), **counts}


async def run_daily(store: Store, settings: Settings, clock: Any) -> None:
    """The dispatch role's daily purge; a failure is logged and tried again the next day."""
    await asyncio.sleep(FIRST_RUN_SECONDS)
    while True:
        try:
            counts = await purge(store, settings, clock())
            log.info("retention purge: %s", {k: v for k, v in counts.items() if k != "deliveries"})
        except Exception as exc:  # noqa: BLE001 - logged; the next day tries again
            log.error("retention purge failed: %s", exc)
        await asyncio.sleep(DAY_SECONDS)
