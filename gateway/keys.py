"""Typed application keys shared by the app's modules."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from aiohttp import web

from adapters.base import Adapter

from .settings import Settings
from .store import Store

if TYPE_CHECKING:
    from .alerts import Alerts
    from .auth import AuthFailures
    from .dispatcher import Dispatcher
    from .endpoints import Endpoints
    from .filerun import FileRunner
    from .metrics import Metrics
    from .payroll_calendar import CutoffCalendar
    from .sources.os2indberetning import Os2Indberetning
    from .watch import AtRiskWatch

APP_SETTINGS = web.AppKey("settings", Settings)
APP_STORE = web.AppKey("store", Store)
APP_ADAPTERS = web.AppKey("adapters", Mapping[str, Adapter])
APP_DISPATCHER: web.AppKey[Dispatcher] = web.AppKey("dispatcher")
APP_FILE_RUNNER: web.AppKey[FileRunner] = web.AppKey("file_runner")
APP_WATCH: web.AppKey[AtRiskWatch] = web.AppKey("at_risk_watch")
APP_CALENDARS: web.AppKey[Mapping[tuple[str, str], CutoffCalendar]] = web.AppKey("calendars")
APP_ENDPOINTS: web.AppKey[Endpoints] = web.AppKey("endpoints")
APP_SOURCES: web.AppKey[list[Os2Indberetning]] = web.AppKey("sources")
APP_AUTH_FAILURES: web.AppKey[AuthFailures] = web.AppKey("auth_failures")
APP_METRICS: web.AppKey[Metrics] = web.AppKey("metrics")
APP_ALERTS: web.AppKey[Alerts] = web.AppKey("alerts")
