"""/metrics through the real app and the SD simulator: both exposition formats parse, the
values agree with the store, and the alert rules and dashboard name only metrics that exist."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families as text_families

from tests.conftest import REPO, Gateway, drive

OPENMETRICS = "application/openmetrics-text; version=1.0.0"


def of(employment: str, report_id: str, **changes: Any) -> dict[str, Any]:
    report = drive(report_id=report_id, **changes)
    report["employee"]["employment_id"] = employment
    return report


async def scrape(gateway: Gateway, accept: str = "text/plain") -> str:
    resp = await gateway.client.get("/metrics", headers={"Accept": accept})
    assert resp.status == 200
    return await resp.text()


def samples(text: str, openmetrics: bool = False) -> dict[tuple[str, frozenset[Any]], float]:
    families = openmetrics_families(text) if openmetrics else text_families(text)
    return {(s.name, frozenset(s.labels.items())): s.value for f in families for s in f.samples}


def value(found: dict[tuple[str, frozenset[Any]], float], name: str, **labels: str) -> float:
    return found.get((name, frozenset(labels.items())), 0.0)


async def test_metrics_agree_with_the_store_in_both_formats(gateway: Gateway) -> None:
    # SD does not know employment 00000000: A-1 fails and holds A-2 back; B-1 is delivered
    status, _ = await gateway.post(
        {"reports": [of("00000000", "A-1"), of("00000000", "A-2"), of("00555", "B-1")]}
    )
    assert status == 202
    assert (await gateway.post(of("00555", "B-1")))[0] == 200  # the same again: a duplicate
    assert (await gateway.post({"kind": "drive"}))[0] == 422
    await gateway.wait_for("A-1", {"failed"})
    await gateway.wait_for("B-1", {"delivered"})
    await gateway.dispatcher.drain()

    text = await scrape(gateway)
    om = await scrape(gateway, OPENMETRICS)
    assert om.rstrip().endswith("# EOF")
    found, found_om = samples(text), samples(om, openmetrics=True)

    shown = await gateway.store.count_by_shown_status()
    assert shown == {"failed": 1, "held": 1, "delivered": 1}
    for found_here in (found, found_om):
        for state in ("failed", "held", "delivered", "queued", "in_doubt"):
            got = value(found_here, "payroll_gateway_deliveries", state=state)
            assert got == shown.get(state, 0), state
        assert value(found_here, "payroll_gateway_at_risk") == await gateway.store.count_at_risk()
        intake = "payroll_gateway_intake_reports_total"
        assert value(found_here, intake, municipality="746", result="accepted") == 3
        assert value(found_here, intake, municipality="746", result="duplicate") == 1
        assert value(found_here, intake, municipality="746", result="invalid") == 1
        outcomes = "payroll_gateway_delivery_outcomes_total"
        labels = {"municipality": "746", "adapter": "sd-koersel"}
        assert value(found_here, outcomes, **labels, outcome="delivered") == 1
        assert value(found_here, outcomes, **labels, outcome="failed") == 1
        assert value(found_here, "payroll_gateway_attempt_seconds_count", adapter="sd-koersel") == 2
        assert value(found_here, "payroll_gateway_endpoint_open", **labels) == 0
        # A-2 waits behind the failed A-1: it is the oldest unfinished one
        assert 0 < value(found_here, "payroll_gateway_oldest_undelivered_seconds") < 60


async def test_an_empty_gateway_exposes_every_state_and_no_age(gateway: Gateway) -> None:
    found = samples(await scrape(gateway))
    assert value(found, "payroll_gateway_deliveries", state="held") == 0
    assert ("payroll_gateway_deliveries", frozenset({("state", "held")})) in found
    assert value(found, "payroll_gateway_oldest_undelivered_seconds") == 0


# -- docs/alerts.yml and docs/grafana-dashboard.json ----------------------------------

DOCS = REPO / "docs"
METRIC = re.compile(r"\bpayroll_gateway_[a-z_]+")


def exposed_names(text: str) -> set[str]:
    """Every sample name in the exposition, and each family's own name."""
    names = set()
    for family in text_families(text):
        names.add(family.name)
        names.update(s.name for s in family.samples)
    return names


def alert_expressions(path: Path) -> list[str]:
    try:
        import yaml
    except ImportError:  # without PyYAML: every expr line of the file
        return re.findall(r"^\s*expr:\s*(.+)$", path.read_text(), re.MULTILINE)
    rules = yaml.safe_load(path.read_text())
    return [r["expr"] for group in rules["groups"] for r in group["rules"]]


def dashboard_expressions(path: Path) -> list[str]:
    board = json.loads(path.read_text())
    return [t["expr"] for panel in board["panels"] for t in panel.get("targets", [])]


async def test_alerts_and_dashboard_use_only_exposed_metrics(gateway: Gateway) -> None:
    exposed = exposed_names(await scrape(gateway))
    alerts = alert_expressions(DOCS / "alerts.yml")
    panels = dashboard_expressions(DOCS / "grafana-dashboard.json")
    assert len(alerts) >= 6 and len(panels) >= 4
    used = {name for expr in alerts + panels for name in METRIC.findall(expr)}
    # counters and histograms show their samples only once counted: their families are there
    missing = {
        n for n in used - exposed if re.sub(r"_(total|bucket|count|sum)$", "", n) not in exposed
    }
    assert not missing, f"not exposed: {sorted(missing)}"
