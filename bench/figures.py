"""The pure part of ``make bench``: medians, same-run ratios, targets, the results document,
the README table and the profile's top costs. No processes, no I/O (tests/test_bench_harness.py).

A *run* is one dict of measurements taken in one sitting, e.g. ``{"gateway": 5100.0,
"bare": 9800.0}``. A figure names the measurement (``value``) and, when it has one, the
ceiling or peer measured in the same run (``baseline``): its ratio is taken run by run and
the median of those ratios is reported, never a ratio of two medians.
"""

from __future__ import annotations

import re
import statistics
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1


def median(values: Iterable[float | None]) -> float | None:
    """The median of the values that were measured (None when none was)."""
    present = [v for v in values if v is not None]
    return float(statistics.median(present)) if present else None


def ratio(value: float | None, baseline: float | None) -> float | None:
    """``value / baseline``; None when either is missing or the baseline is not positive."""
    if value is None or baseline is None or baseline <= 0:
        return None
    return value / baseline


@dataclass(frozen=True, slots=True)
class Spec:
    """One row of the table: which measurement of which scenario, against what, and the target.

    ``target`` is a ratio (``value / baseline >= target``) when ``target_on`` is "ratio", or a
    bound on the value itself ("min": at least, "max": at most); None: shown, no target.
    """

    key: str
    label: str
    scenario: str
    value: str
    unit: str
    baseline: str | None = None
    baseline_label: str = ""
    target: float | None = None
    target_on: str = "ratio"  # ratio | min | max


SPECS: tuple[Spec, ...] = (
    Spec(
        "intake_single",
        "Durable intake, single reports (wrk, 64 connections)",
        "intake",
        "gateway_single",
        "reports/s",
        "bare_single",
        "bare aiohttp endpoint",
        0.5,
    ),
    Spec(
        "intake_batch",
        "Batch intake (1,000 reports a request)",
        "intake",
        "gateway_batch",
        "reports/s",
        "bare_batch",
        "bare aiohttp endpoint",
        20_000,
        "min",
    ),
    Spec(
        "e2e_sd",
        "End to end to SD (accepted → SD simulator)",
        "e2e_sd",
        "gateway",
        "deliveries/s",
        "ceiling",
        "raw client → simulator",
        0.5,
    ),
    Spec(
        "e2e_kmd",
        "End to end to KMD absence",
        "e2e_kmd",
        "gateway",
        "deliveries/s",
        "ceiling",
        "raw client → simulator",
    ),
    Spec(
        "backlog_drain",
        "Backlog drain, 100,000 waiting (10,000 employees)",
        "backlog",
        "drain",
        "deliveries/s",
        "empty",
        "empty-queue rate",
        0.8,
    ),
    Spec(
        "latency_200_p50",
        "Accepted → delivered p50 at 200 reports/s",
        "latency_200",
        "p50_ms",
        "ms",
    ),
    Spec(
        "latency_200_p95",
        "Accepted → delivered p95 at 200 reports/s",
        "latency_200",
        "p95_ms",
        "ms",
    ),
    Spec(
        "latency_200_p99",
        "Accepted → delivered p99 at 200 reports/s",
        "latency_200",
        "p99_ms",
        "ms",
    ),
    Spec(
        "latency_1000_p50",
        "Accepted → delivered p50 at 1,000 reports/s",
        "latency_1000",
        "p50_ms",
        "ms",
    ),
    Spec(
        "latency_1000_p95",
        "Accepted → delivered p95 at 1,000 reports/s",
        "latency_1000",
        "p95_ms",
        "ms",
    ),
    Spec(
        "latency_1000_p99",
        "Accepted → delivered p99 at 1,000 reports/s",
        "latency_1000",
        "p99_ms",
        "ms",
        target=50,
        target_on="max",
    ),
    Spec(
        "rss_stored",
        "Gateway RSS, 100,000 reports stored",
        "backlog",
        "rss_stored_mb",
        "MB",
        target=150,
        target_on="max",
    ),
    Spec(
        "rss_draining",
        "Gateway RSS while draining them (peak)",
        "backlog",
        "rss_draining_mb",
        "MB",
        target=150,
        target_on="max",
    ),
    Spec(
        "peer_procrastinate",
        "Gateway (PostgreSQL, 1 process) vs Procrastinate",
        "peers",
        "gateway_pg1",
        "deliveries/s",
        "procrastinate",
        "Procrastinate pipeline",
        10,
    ),
    Spec(
        "peer_outbox",
        "Gateway (PostgreSQL, 1 process) vs hand-rolled outbox",
        "peers",
        "gateway_pg1",
        "deliveries/s",
        "outbox",
        "SKIP LOCKED outbox",
        2,
    ),
    Spec(
        "peer_sqlite",
        "Gateway on SQLite vs hand-rolled outbox",
        "peers",
        "gateway_sqlite",
        "deliveries/s",
        "outbox",
        "SKIP LOCKED outbox",
    ),
    Spec(
        "peer_pg2",
        "Gateway on PostgreSQL, 2 processes vs 1",
        "peers",
        "gateway_pg2",
        "deliveries/s",
        "gateway_pg1",
        "gateway, 1 process",
    ),
)


def evaluate(spec: Spec, runs: Sequence[Mapping[str, float | None]]) -> dict[str, Any]:
    """One figure: the median value, the median baseline, the median same-run ratio, met or not."""
    values = [r.get(spec.value) for r in runs]
    baselines = [r.get(spec.baseline) for r in runs] if spec.baseline else []
    ratios = [ratio(r.get(spec.value), r.get(spec.baseline)) for r in runs] if spec.baseline else []
    value, base, rat = median(values), median(baselines), median(ratios)
    met: bool | None = None
    if spec.target is not None:
        judged = rat if spec.target_on == "ratio" else value
        if judged is not None:
            met = judged <= spec.target if spec.target_on == "max" else judged >= spec.target
    return {
        "key": spec.key,
        "label": spec.label,
        "unit": spec.unit,
        "value": value,
        "runs": values,
        "baseline_label": spec.baseline_label or None,
        "baseline": base,
        "baseline_runs": baselines,
        "ratio": rat,
        "ratios": ratios,
        "target": target_text(spec),
        "met": met,
    }


def target_text(spec: Spec) -> str | None:
    if spec.target is None:
        return None
    if spec.target_on == "ratio":
        return f"≥ {spec.target:g}×"
    sign = "≤" if spec.target_on == "max" else "≥"
    return f"{sign} {spec.target:,g} {spec.unit}"


def figures(scenarios: Mapping[str, Sequence[Mapping[str, float | None]]]) -> list[dict[str, Any]]:
    """Every figure whose scenario was run, in table order."""
    return [evaluate(s, scenarios[s.scenario]) for s in SPECS if s.scenario in scenarios]


def document(
    *,
    date: str,
    mode: str,
    machine: Mapping[str, Any],
    scenarios: Mapping[str, Sequence[Mapping[str, float | None]]],
    profile: Mapping[str, Any] | None,
    seconds: float,
    errors: Sequence[str] = (),
    notes: Sequence[str] = (),
) -> dict[str, Any]:
    """The results JSON: every figure with its runs, the raw runs per scenario, the machine."""
    return {
        "schema": SCHEMA_VERSION,
        "date": date,
        "mode": mode,
        "machine": dict(machine),
        "seconds": round(seconds, 1),
        "figures": figures(scenarios),
        "scenarios": {k: [dict(r) for r in v] for k, v in scenarios.items()},
        "profile": dict(profile) if profile else None,
        "errors": list(errors),
        "notes": list(notes),
    }


def number(value: float | None, unit: str = "") -> str:
    if value is None:
        return "—"
    text = f"{value:,.0f}" if abs(value) >= 100 else f"{value:,.1f}"
    return f"{text} {unit}".strip()


def table(doc: Mapping[str, Any]) -> str:
    """The README table: figure, value, ceiling or peer, ratio, target, met."""
    lines = [
        "| figure | value | against (same run) | ratio | target | met |",
        "| --- | ---: | --- | ---: | --- | --- |",
    ]
    for f in doc["figures"]:
        against = (
            f"{f['baseline_label']}: {number(f['baseline'], f['unit'])}"
            if f["baseline_label"]
            else "—"
        )
        rat = "—" if f["ratio"] is None else f"{f['ratio']:.2f}×"
        met = {True: "met", False: "**not met**", None: "—"}[f["met"]]
        lines.append(
            f"| {f['label']} | {number(f['value'], f['unit'])} | {against} | {rat} | "
            f"{f['target'] or '—'} | {met} |"
        )
    return "\n".join(lines)


def not_met(doc: Mapping[str, Any]) -> list[str]:
    return [f["label"] for f in doc["figures"] if f["met"] is False]


# -- the profile (py-spy ``--format raw``: collapsed stacks, ``frame;frame;frame count``) --


def parse_collapsed(text: str) -> list[tuple[list[str], int]]:
    stacks = []
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks.append((stack.split(";"), int(count)))
    return stacks


REPO = Path(__file__).resolve().parent.parent
# where a frame's file lives on this machine: the checkout, a site-packages, the standard library
_MACHINE_PREFIX = re.compile(
    "|".join((re.escape(f"{REPO}/"), r"/[^ ;()]*/site-packages/", r"/[^ ;()]*/lib/python3\.\d+/"))
)


def relative_paths(text: str) -> str:
    """Frames named by their path inside the repository or the Python installation, so that a
    saved profile holds no path of the machine it was taken on."""
    return _MACHINE_PREFIX.sub("", text)


def function_name(frame: str) -> str:
    """``handle (gateway/dispatcher.py:120)`` → ``handle (gateway/dispatcher.py)``: lines merged."""
    name, _, where = relative_paths(frame).partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    return f"{name} ({path})" if path else name


# waiting, not working: the event loop's select, idle pool threads, locks and queues
IDLE = frozenset(
    {
        ("select", "selectors.py"),
        ("_worker", "concurrent/futures/thread.py"),
        ("wait", "threading.py"),
        ("get", "queue.py"),
    }
)


PROJECT = ("gateway/", "adapters/")


def is_idle(function: str) -> bool:
    """``EpollSelector.select (selectors.py)`` and the like: a thread waiting for work."""
    name, _, path = function.partition(" (")
    return (name.rsplit(".", 1)[-1], path.rstrip(")")) in IDLE


def top_costs(text: str, n: int = 10) -> dict[str, Any]:
    """Self and total shares of the samples by function (all threads, wall clock); the
    self list leaves idle waiting out, and its ``busy_share`` is of the non-idle samples."""
    stacks = parse_collapsed(text)
    total = sum(c for _, c in stacks) or 1
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    idle = 0
    for frames, count in stacks:
        names = [function_name(f) for f in frames]
        leaf = names[-1] if names else "?"
        if is_idle(leaf):
            idle += count
            continue
        own[leaf] += count
        for name in set(names):
            inclusive[name] += count
    busy = total - idle or 1
    return {
        "samples": total,
        "idle_share": idle / total,
        "self": [
            {"function": f, "share": c / total, "busy_share": c / busy}
            for f, c in own.most_common(n)
        ],
        "total": [  # the project's own functions: where the time goes, callees included
            {"function": f, "share": c / total, "busy_share": c / busy}
            for f, c in inclusive.most_common()
            if f.partition(" (")[2].startswith(PROJECT)
        ][:n],
    }


def top_three(profile: Mapping[str, Any]) -> list[str]:
    """The three costliest functions by self time (idle waiting is not in the list)."""
    return [
        f"{e['function']}: {e['busy_share']:.0%} of the busy samples"
        for e in profile.get("self", [])[:3]
    ]


def profile_text(profile: Mapping[str, Any]) -> str:
    lines = [
        f"py-spy samples (all threads, wall clock): {profile['samples']}; idle (select, "
        f"idle pool threads, waits): {profile['idle_share']:.0%}",
        "",
        "top functions by self time (share of the busy samples):",
    ]
    lines += [f"  {e['busy_share']:6.1%}  {e['function']}" for e in profile["self"]]
    lines += ["", "top functions by total time, callees included (share of the busy samples):"]
    lines += [f"  {e['busy_share']:6.1%}  {e['function']}" for e in profile["total"]]
    return "\n".join(lines) + "\n"
