"""The pure parts of ``make bench`` (bench/figures.py, bench/perf.py): medians, same-run
ratios, targets, the README table, the results document, the profile's top costs.

``make bench`` itself is not run here (it takes minutes); these catch a broken harness.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import figures, perf


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([3.0, 1.0, 2.0], 2.0),
        ([4.0, 1.0, 2.0, 3.0], 2.5),
        ([None, 5.0, None], 5.0),
        ([], None),
        ([None], None),
    ],
)
def test_median_of_what_was_measured(values: list[float | None], expected: float | None) -> None:
    assert figures.median(values) == expected


@pytest.mark.parametrize(
    ("value", "baseline", "expected"),
    [(50.0, 100.0, 0.5), (None, 100.0, None), (50.0, None, None), (50.0, 0.0, None)],
)
def test_ratio(value: float | None, baseline: float | None, expected: float | None) -> None:
    assert figures.ratio(value, baseline) == expected


SPEC = figures.Spec("x", "X", "s", "gw", "reports/s", "ceil", "ceiling", 0.5)


def test_the_ratio_is_the_median_of_same_run_ratios_not_a_ratio_of_medians() -> None:
    runs = [{"gw": 10.0, "ceil": 100.0}, {"gw": 60.0, "ceil": 100.0}, {"gw": 70.0, "ceil": 1000.0}]
    f = figures.evaluate(SPEC, runs)
    assert f["value"] == 60.0 and f["baseline"] == 100.0
    assert f["ratios"] == [0.1, 0.6, 0.07]
    assert f["ratio"] == pytest.approx(0.1)  # the ratio of medians would be 0.6
    assert f["met"] is False
    assert f["runs"] == [10.0, 60.0, 70.0]


@pytest.mark.parametrize(
    ("spec", "value", "met"),
    [
        (figures.Spec("a", "A", "s", "v", "ms", target=50, target_on="max"), 49.0, True),
        (figures.Spec("a", "A", "s", "v", "ms", target=50, target_on="max"), 51.0, False),
        (figures.Spec("a", "A", "s", "v", "r/s", target=20_000, target_on="min"), 20_000.0, True),
        (figures.Spec("a", "A", "s", "v", "r/s", target=20_000, target_on="min"), 19_999.0, False),
        (figures.Spec("a", "A", "s", "v", "r/s"), 1.0, None),
    ],
)
def test_targets_on_the_value(spec: figures.Spec, value: float, met: bool | None) -> None:
    assert figures.evaluate(spec, [{"v": value}])["met"] is met


def test_a_figure_never_measured_is_neither_met_nor_failed() -> None:
    f = figures.evaluate(SPEC, [{"ceil": 100.0}])
    assert f["value"] is None and f["ratio"] is None and f["met"] is None


def test_target_text() -> None:
    assert figures.target_text(SPEC) == "≥ 0.5×"
    assert figures.target_text(figures.Spec("a", "A", "s", "v", "MB", None, "", 150, "max")) == (
        "≤ 150 MB"
    )
    assert figures.target_text(figures.Spec("a", "A", "s", "v", "ms")) is None


def test_every_target_of_the_issue_has_a_row() -> None:
    targets = {s.key: (s.target, s.target_on) for s in figures.SPECS if s.target is not None}
    assert targets == {
        "intake_single": (0.5, "ratio"),
        "intake_batch": (20_000, "min"),
        "e2e_sd": (0.5, "ratio"),
        "backlog_drain": (0.8, "ratio"),
        "latency_1000_p99": (50, "max"),
        "rss_stored": (150, "max"),
        "rss_draining": (150, "max"),
        "peer_procrastinate": (10, "ratio"),
        "peer_outbox": (2, "ratio"),
    }


def sample_doc() -> dict[str, object]:
    return figures.document(
        date="2026-12-01T0000Z",
        mode="full",
        machine={"cores": 2, "python": "3.11.7", "git_commit": "abc", "cpu": "x"},
        scenarios={
            "intake": [
                {"gateway_single": 900.0, "bare_single": 10_000.0, "gateway_batch": 25_000.0},
                {"gateway_single": 1100.0, "bare_single": 10_000.0, "gateway_batch": 21_000.0},
            ],
            "latency_1000": [{"p50_ms": 5.0, "p95_ms": 20.0, "p99_ms": 40.0}],
        },
        profile={"delivery": {"samples": 10, "top_three": ["f (a.py): 50% of the busy samples"]}},
        seconds=123.4,
        errors=["one"],
        notes=["capped"],
    )


def test_results_document_shape_and_json() -> None:
    doc = sample_doc()
    assert set(doc) == {
        "schema", "date", "mode", "machine", "seconds", "figures", "scenarios", "profile",
        "errors", "notes",
    }  # fmt: skip
    keys = [f["key"] for f in doc["figures"]]  # type: ignore[attr-defined, index]
    # only the scenarios that ran, in table order
    assert keys == [
        "intake_single", "intake_batch", "latency_1000_p50", "latency_1000_p95", "latency_1000_p99",
    ]  # fmt: skip
    for f in doc["figures"]:  # type: ignore[attr-defined]
        assert {
            "value",
            "runs",
            "baseline",
            "baseline_runs",
            "ratio",
            "ratios",
            "target",
            "met",
        } <= set(f)
    assert json.loads(json.dumps(doc)) == doc


def test_table_shows_value_ceiling_ratio_target_and_met() -> None:
    lines = figures.table(sample_doc()).splitlines()
    assert lines[0].startswith("| figure | value | against")
    single = next(line for line in lines if line.startswith("| Durable intake"))
    assert single.split(" | ")[1:] == [
        "1,000 reports/s",
        "bare aiohttp endpoint: 10,000 reports/s",
        "0.10×",
        "≥ 0.5×",
        "**not met** |",
    ]
    batch = next(line for line in lines if line.startswith("| Batch intake"))
    assert "23,000 reports/s" in batch and batch.endswith("| ≥ 20,000 reports/s | met |")
    p99 = next(line for line in lines if "p99 at 1,000" in line)
    assert "| 40.0 ms | — | — | ≤ 50 ms | met |" in p99
    assert figures.not_met(sample_doc()) == ["Durable intake, single reports (wrk, 64 connections)"]


COLLAPSED = """\
main (gateway/cli.py:10);run_forever (asyncio/base_events.py:5);EpollSelector.select (selectors.py:468) 40
main (gateway/cli.py:10);Dispatcher.deliver (gateway/dispatcher.py:270);SQLiteStore._commit (gateway/store/sqlite.py:327) 30
main (gateway/cli.py:10);Dispatcher.deliver (gateway/dispatcher.py:271);parse_xml (adapters/soap.py:40) 20
main (gateway/cli.py:10);Dispatcher.deliver (gateway/dispatcher.py:272);mask_cpr (adapters/base.py:245) 6
main (gateway/cli.py:11);Dispatcher.deliver (gateway/dispatcher.py:273);mask_cpr (adapters/base.py:244) 4
_bootstrap (threading.py:1);_worker (concurrent/futures/thread.py:81) 100
garbage line without a count
"""


def test_top_costs_merge_lines_and_leave_idle_waiting_out() -> None:
    profile = figures.top_costs(COLLAPSED)
    assert profile["samples"] == 200
    assert profile["idle_share"] == pytest.approx(0.7)
    top = [(e["function"], round(e["busy_share"], 3)) for e in profile["self"]]
    assert top == [
        ("SQLiteStore._commit (gateway/store/sqlite.py)", 0.5),
        ("parse_xml (adapters/soap.py)", 0.333),
        ("mask_cpr (adapters/base.py)", 0.167),
    ]
    total = {e["function"]: e["busy_share"] for e in profile["total"]}
    assert total["Dispatcher.deliver (gateway/dispatcher.py)"] == pytest.approx(1.0)
    assert all(not f.startswith("run_forever") for f in total)  # the project's functions only
    assert figures.top_three(profile) == [
        "SQLiteStore._commit (gateway/store/sqlite.py): 50% of the busy samples",
        "parse_xml (adapters/soap.py): 33% of the busy samples",
        "mask_cpr (adapters/base.py): 17% of the busy samples",
    ]
    text = figures.profile_text(profile)
    assert "idle (select, idle pool threads, waits): 70%" in text


@pytest.mark.parametrize(
    ("frame", "name"),
    [
        ("f (gateway/x.py:12)", "f (gateway/x.py)"),
        ("g (/v/lib/python3.11/site-packages/zeep/a.py:3)", "g (zeep/a.py)"),
        ("h (/usr/lib/python3.11/asyncio/events.py:80)", "h (asyncio/events.py)"),
        (f"d ({figures.REPO}/gateway/dispatcher.py:9)", "d (gateway/dispatcher.py)"),
        ("<module> (<string>)", "<module> (<string>)"),
        ("bare", "bare"),
    ],
)
def test_function_name(frame: str, name: str) -> None:
    assert figures.function_name(frame) == name


def test_a_saved_profile_holds_no_path_of_this_machine() -> None:
    raw = (
        f"main ({figures.REPO}/gateway/cli.py:3);send (/opt/venv/lib/python3.11/site-packages/"
        "aiohttp/client.py:9);select (/usr/lib/python3.11/selectors.py:4) 7\n"
    )
    assert figures.relative_paths(raw) == (
        "main (gateway/cli.py:3);send (aiohttp/client.py:9);select (selectors.py:4) 7\n"
    )


@pytest.mark.parametrize(
    ("q", "expected"), [(50, 50.0), (95, 95.0), (99, 99.0), (100, 100.0), (0, 1.0)]
)
def test_percentile_nearest_rank(q: float, expected: float) -> None:
    assert perf.percentile([float(v) for v in range(1, 101)], q) == expected
    assert perf.percentile([], q) is None


async def test_watch_times_windows_and_stops_at_the_cap() -> None:
    clock = iter(range(0, 10_000, 50))  # the count grows by 50 a poll

    async def count() -> int:
        return 1000 + next(clock)

    done = await perf.watch(count, 1000, 10**9, cap=60, windows=2, window_seconds=0.1)
    assert not done.complete and len(done.windows) == 2 and all(w > 0 for w in done.windows)
    capped = await perf.watch(count, 1000, 10**9, cap=0.12)
    assert not capped.complete and capped.count > 0 and capped.seconds >= 0.12
    finished = await perf.watch(count, 1000, 1, cap=60)
    assert finished.complete and finished.count >= 1


def test_readme_table_goes_between_the_markers_only(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n## Performance\n{perf.README_START}\nold\n{perf.README_END}\nafter\n")
    assert perf.write_readme(readme, "| new |\n")
    assert readme.read_text() == (
        f"# x\n## Performance\n{perf.README_START}\n| new |\n{perf.README_END}\nafter\n"
    )
    other = tmp_path / "OTHER.md"
    other.write_text("no markers\n")
    assert not perf.write_readme(other, "| new |\n")
    assert other.read_text() == "no markers\n"


def test_markdown_names_unmet_targets_profile_notes_and_errors() -> None:
    text = perf.markdown(sample_doc())  # type: ignore[arg-type]
    assert "Targets not met in this run: Durable intake" in text
    assert "Top three costs of the delivery path" in text
    assert "1. f (a.py): 50% of the busy samples" in text
    assert "- capped" in text and "- one" in text
