"""Prometheus metrics: counters the intake and dispatcher bump, gauges refreshed per scrape.

Each app has its own registry (tests build many apps in one process). The store-derived
gauges are read in the async ``/metrics`` handler and set just before the exposition is
generated: prometheus-client collectors are synchronous and must not block the loop.
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import exposition as text_format
from prometheus_client.openmetrics import exposition as openmetrics

from .alerts import KINDS as ALERT_KINDS
from .endpoints import Endpoint
from .sources import PullerState
from .store import Status, Store

ATTEMPT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The store-derived values of one scrape, read before anything is set."""

    by_state: Mapping[str, int]
    at_risk: int
    oldest_unfinished_at: float | None
    alerts_open: Mapping[str, int] = field(default_factory=dict)  # by kind (gateway.alerts)


class Metrics:
    """The gateway's metric families, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.intake = Counter(
            "payroll_gateway_intake_reports",
            "Reports received, by result (accepted/duplicate count reports; refusals count requests).",
            ["municipality", "result"],
            registry=r,
        )
        self.outcomes = Counter(
            "payroll_gateway_delivery_outcomes",
            "Decisions the dispatcher recorded for deliveries, by the state decided.",
            ["municipality", "adapter", "outcome"],
            registry=r,
        )
        self.attempt_seconds = Histogram(
            "payroll_gateway_attempt_seconds",
            "Duration of one vendor call (one message of a delivery).",
            ["adapter"],
            buckets=ATTEMPT_BUCKETS,
            registry=r,
        )
        self.by_state = Gauge(
            "payroll_gateway_deliveries",
            "Deliveries by the state shown (held: waiting behind an earlier one of the employee).",
            ["state"],
            registry=r,
        )
        self.oldest = Gauge(
            "payroll_gateway_oldest_undelivered_seconds",
            "Age of the oldest delivery not yet in a final state (0 when there is none).",
            registry=r,
        )
        self.at_risk = Gauge(
            "payroll_gateway_at_risk",
            "Undelivered deliveries that will miss their payroll cut-off.",
            registry=r,
        )
        self.breaker_open = Gauge(
            "payroll_gateway_endpoint_open",
            "1 when the endpoint's circuit breaker is open or half-open.",
            ["municipality", "adapter"],
            registry=r,
        )
        self.paused = Gauge(
            "payroll_gateway_endpoint_paused",
            "1 when an operator paused the endpoint.",
            ["municipality", "adapter"],
            registry=r,
        )
        self.source_lag = Gauge(
            "payroll_gateway_pull_source_lag_seconds",
            "Seconds since the pull source's last successful pull (or since start, if none yet).",
            ["municipality", "source"],
            registry=r,
        )
        self.source_failures = Gauge(
            "payroll_gateway_pull_source_failures",
            "Failed pulls in a row of the pull source.",
            ["municipality", "source"],
            registry=r,
        )

        self.alerts_open = Gauge(
            "payroll_gateway_alerts_open",
            "Open alerts (gateway/alerts.py), by the kind of their cause.",
            ["cause"],
            registry=r,
        )

    def count_intake(self, municipality: str, result: str, n: int = 1) -> None:
        if n:
            self.intake.labels(municipality, result).inc(n)

    def count_outcome(self, municipality: str, adapter: str, outcome: str) -> None:
        self.outcomes.labels(municipality, adapter, outcome).inc()

    def observe_attempt(self, adapter: str, seconds: float) -> None:
        self.attempt_seconds.labels(adapter).observe(seconds)

    def refresh(
        self,
        snapshot: Snapshot,
        endpoints: Iterable[Endpoint],
        sources: Iterable[PullerState],
        now: float,
    ) -> None:
        """Set every scrape-time gauge (no I/O, no await: a scrape sees one consistent set)."""
        self.by_state.clear()
        for state in Status:  # every state, 0 included: alerts need no absent() guards
            self.by_state.labels(str(state)).set(snapshot.by_state.get(state, 0))
        oldest = snapshot.oldest_unfinished_at
        self.oldest.set(0.0 if oldest is None else max(0.0, now - oldest))
        self.at_risk.set(snapshot.at_risk)
        self.breaker_open.clear()
        self.paused.clear()
        for endpoint in endpoints:
            self.breaker_open.labels(*endpoint.key).set(int(endpoint.breaker.state != "closed"))
            self.paused.labels(*endpoint.key).set(int(endpoint.paused is not None))
        for kind in ALERT_KINDS:  # every kind, 0 included: no absent() guards
            self.alerts_open.labels(kind).set(snapshot.alerts_open.get(kind, 0))
        self.source_lag.clear()
        self.source_failures.clear()
        for source in sources:
            since = (
                source.last_pulled_at if source.last_pulled_at is not None else source.started_at
            )
            self.source_lag.labels(source.municipality, source.name).set(max(0.0, now - since))
            self.source_failures.labels(source.municipality, source.name).set(source.failures)

    def exposition(self, accept: str) -> tuple[bytes, str]:
        """The registry in OpenMetrics when the scraper asks for it, else the text format."""
        if "application/openmetrics-text" in accept:
            # the openmetrics module is not annotated (the text one is)
            body = openmetrics.generate_latest(self.registry)  # type: ignore[no-untyped-call]
            return body, openmetrics.CONTENT_TYPE_LATEST
        return text_format.generate_latest(self.registry), text_format.CONTENT_TYPE_LATEST


async def snapshot(store: Store) -> Snapshot:
    """The store-derived values, read asynchronously before a scrape is generated."""
    return Snapshot(
        by_state=await store.count_by_shown_status(),
        at_risk=await store.count_at_risk(),
        oldest_unfinished_at=await store.oldest_unfinished_at(),
        alerts_open=Tally(a["kind"] for a in await store.open_alerts()),
    )
