"""IND01 file runs end to end: HTTP API → store → file run → the file, crash-safe and exact."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from adapters.base import VendorSettings
from gateway.keys import APP_FILE_RUNNER
from gateway.settings import Settings
from tests.conftest import Gateway, drive, tenant

KEY_851 = "test-key-851"


@pytest.fixture
def ind01_settings(settings: Settings, tmp_path: Path) -> Settings:
    vendor = VendorSettings(
        options={
            "directory": str(tmp_path / "ind01"),
            "schedule": "0 16 * * *",
            "municipality_name": "Testkommune",
        }
    )
    tenants = dict(settings.tenants)
    tenants["851"] = tenant("851", KEY_851, {"kmd-ind01": vendor}, {"drive": "kmd-ind01"})
    return replace(settings, tenants=tenants)


@pytest.fixture
async def gw(make_gateway: Any, ind01_settings: Settings) -> Gateway:
    return await make_gateway(ind01_settings)


def report(
    report_id: str, km: str = "10.00", date: str = "2026-03-10", **changes: Any
) -> dict[str, Any]:
    r = drive(
        municipality="851",
        report_id=report_id,
        distance_km=km,
        drive_date=date,
        wage_code="0201",
        account="1234567890",
        **changes,
    )
    r["employee"]["employment_type"] = 1
    r["employee"]["extra_number"] = 0
    return r


async def submit(gw: Gateway, *reports: dict[str, Any]) -> None:
    status, _ = await gw.post({"reports": list(reports)}, key=KEY_851)
    assert status == 202


def file_of(tmp_path: Path) -> Path:
    return tmp_path / "ind01" / "IND01_851.txt"


async def status(gw: Gateway, report_id: str) -> Any:
    _, view = await gw.get("851", report_id, key=KEY_851)
    return view


async def test_a_run_writes_summed_records_and_references(gw: Gateway, tmp_path: Path) -> None:
    await submit(
        gw,
        report("A", "10.00"),
        report("B", "2.55", date="2026-03-31"),
        report("C", "7.00", wage_code_optional="0202"),
        report("Z", "0"),
    )
    summary = await gw.app[APP_FILE_RUNNER].run_once("851", "kmd-ind01")
    lines = file_of(tmp_path).read_text().splitlines()
    assert lines[0] == "851 Testkommune"
    records = lines[1:]
    assert all(len(line) == 55 for line in records)
    # A, B and C share employment, wage code 0201, account and month: one record, km summed
    assert [r[19:29] for r in records] == ["0201001955", "0202000700"]
    assert records[0][49:55] == "310326"  # the month's last day, DDMMYY
    assert summary.written == 2
    a, c = await status(gw, "A"), await status(gw, "C")
    assert (
        a["status"] == "delivered" and a["deliveries"][0]["vendor_reference"] == "IND01_851.txt:2"
    )
    assert set(c["deliveries"][0]["vendor_reference"].split(", ")) == {
        "IND01_851.txt:2",
        "IND01_851.txt:3",
    }
    assert (await status(gw, "Z"))["status"] == "not_applicable"


async def test_a_value_that_does_not_fit_fails_and_writes_nothing(
    gw: Gateway, tmp_path: Path
) -> None:
    await submit(gw, report("BIG", "10000.00"))
    await gw.app[APP_FILE_RUNNER].run_once("851", "kmd-ind01")
    view = await status(gw, "BIG")
    assert view["status"] == "failed" and "km" in view["deliveries"][0]["last_error"]
    assert not file_of(tmp_path).exists()


async def test_concurrent_runs_never_interleave_or_duplicate(gw: Gateway, tmp_path: Path) -> None:
    await submit(
        gw, *(report(f"R{i}", "1.00", date=f"2026-{(i % 12) + 1:02d}-01") for i in range(24))
    )
    runner = gw.app[APP_FILE_RUNNER]
    await asyncio.gather(*(runner.run_once("851", "kmd-ind01") for _ in range(4)))
    records = file_of(tmp_path).read_text().splitlines()[1:]
    assert len(records) == 12 and len(set(records)) == 12
    for i in range(24):
        assert (await status(gw, f"R{i}"))["status"] == "delivered"


async def test_a_new_version_of_a_delivered_report_needs_an_operator(
    gw: Gateway, tmp_path: Path
) -> None:
    await submit(gw, report("A", "10.00"))
    await gw.app[APP_FILE_RUNNER].run_once("851", "kmd-ind01")
    await submit(gw, report("A", "12.00", version=2))
    await gw.app[APP_FILE_RUNNER].run_once("851", "kmd-ind01")
    assert (await status(gw, "A"))["status"] == "correction_required"
    assert len(file_of(tmp_path).read_text().splitlines()) == 2  # nothing appended


async def test_a_crash_between_write_and_commit_loses_and_doubles_nothing(
    make_gateway: Any, ind01_settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = await make_gateway(ind01_settings)
    await submit(first, report("A", "10.00"), report("B", "3.00", date="2026-04-02"))

    async def crash(self: Any, *args: Any) -> None:
        raise RuntimeError("power cut")

    monkeypatch.setattr(type(first.store), "file_run_finish", crash)
    with pytest.raises(RuntimeError):
        await first.app[APP_FILE_RUNNER].run_once("851", "kmd-ind01")
    written = file_of(tmp_path).read_text()
    assert len(written.splitlines()) == 3  # header + 2 records are on disk, the commit is not
    assert (await status(first, "A"))["status"] == "in_flight"
    await first.client.close()
    monkeypatch.undo()

    second = await make_gateway(ind01_settings)  # restart: leases reclaimed
    summary = await second.app[APP_FILE_RUNNER].run_once("851", "kmd-ind01")
    assert summary.recovered == 1 and summary.written == 0
    assert file_of(tmp_path).read_text() == written  # not a line lost, none doubled
    for rid, line in (("A", 2), ("B", 3)):
        view = await status(second, rid)
        assert view["status"] == "delivered"
        assert view["deliveries"][0]["vendor_reference"] == f"IND01_851.txt:{line}"


def test_a_bad_schedule_stops_the_start_with_the_key(ind01_settings: Settings) -> None:
    from gateway.app import create_app
    from gateway.errors import ConfigError

    vendor = VendorSettings(options={"schedule": "every quarter hour"})
    tenants = dict(ind01_settings.tenants)
    tenants["851"] = tenant("851", KEY_851, {"kmd-ind01": vendor}, {"drive": "kmd-ind01"})
    with pytest.raises(
        ConfigError, match=r"tenants.851.vendors.kmd-ind01.options.schedule: invalid cron"
    ):
        create_app(replace(ind01_settings, tenants=tenants))


# -- the file's bytes: CRLF, the configured encoding, and render writing the same -------------

AERO = {"municipality_name": "Ærø Kommune"}


def with_options(settings: Settings, **options: Any) -> Settings:
    vendor = settings.tenants["851"].vendors["kmd-ind01"]
    vendor = replace(vendor, options={**vendor.options, **options})
    tenants = dict(settings.tenants)
    tenants["851"] = tenant("851", KEY_851, {"kmd-ind01": vendor}, {"drive": "kmd-ind01"})
    return replace(settings, tenants=tenants)


async def test_render_writes_exactly_the_bytes_of_a_file_run(
    make_gateway: Any, ind01_settings: Settings, tmp_path: Path
) -> None:
    import json

    from gateway.cli import main

    gw = await make_gateway(with_options(ind01_settings, **AERO))
    reports = [
        report("A", "10.00"),
        report("B", "2.55", date="2026-03-31"),
        report("C", "7.00", wage_code_optional="0202"),
        report("D", "1.00", date="2026-04-01"),
    ]
    await submit(gw, *reports)
    await gw.app[APP_FILE_RUNNER].run_once("851", "kmd-ind01")
    written = file_of(tmp_path).read_bytes()
    assert written.startswith(b"851 \xc6r\xf8 Kommune\r\nDA6")  # ISO-8859-1, CRLF
    assert written.count(b"\r\n") == written.count(b"\n") == 4

    src, cfg, out = tmp_path / "reports.json", tmp_path / "render.toml", tmp_path / "out"
    src.write_text(json.dumps(reports), encoding="utf-8")
    cfg.write_text(
        '[tenants.851.vendors.kmd-ind01.options]\nmunicipality_name = "Ærø Kommune"\n',
        encoding="utf-8",
    )
    code = await asyncio.to_thread(
        main, ["render", "kmd-ind01", str(src), "--config", str(cfg), "--out", str(out)]
    )
    assert code == 0
    assert (out / "ind01.txt").read_bytes() == written


async def test_a_mid_month_change_of_employment_type_gives_two_delivered_lines(
    gw: Gateway, tmp_path: Path
) -> None:
    second = report("B", "3.00", date="2026-03-20")
    second["employee"]["employment_type"] = 2
    await submit(gw, report("A", "10.00"), second)
    summary = await gw.app[APP_FILE_RUNNER].run_once("851", "kmd-ind01")
    records = file_of(tmp_path).read_text(encoding="iso-8859-1").splitlines()[1:]
    assert summary.written == 2 and summary.failed == 0
    assert [(r[7], r[19:29]) for r in records] == [("1", "0201001000"), ("2", "0201000300")]
    for rid, line in (("A", 2), ("B", 3)):
        view = await status(gw, rid)
        assert view["status"] == "delivered"
        assert view["deliveries"][0]["vendor_reference"] == f"IND01_851.txt:{line}"


async def test_a_crash_with_a_non_ascii_header_is_recovered_from_the_journal(
    make_gateway: Any, ind01_settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    aero = with_options(ind01_settings, **AERO)
    first = await make_gateway(aero)
    await submit(first, report("A", "10.00"))

    async def crash(self: Any, *args: Any) -> None:
        raise RuntimeError("power cut")

    monkeypatch.setattr(type(first.store), "file_run_finish", crash)
    with pytest.raises(RuntimeError):
        await first.app[APP_FILE_RUNNER].run_once("851", "kmd-ind01")
    written = file_of(tmp_path).read_bytes()
    await first.client.close()
    monkeypatch.undo()

    second = await make_gateway(aero)
    summary = await second.app[APP_FILE_RUNNER].run_once("851", "kmd-ind01")
    assert summary.recovered == 1 and file_of(tmp_path).read_bytes() == written
    assert (await status(second, "A"))["deliveries"][0]["vendor_reference"] == "IND01_851.txt:2"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"encoding": "ascii", "file_header": "492 Ærø Kommune"},
            r"tenants\.851\.vendors\.kmd-ind01\.options\.file_header: '492 Ærø Kommune' cannot be "
            r"written in ascii",
        ),
        (
            {"encoding": "latin-9x"},
            r"tenants\.851\.vendors\.kmd-ind01\.options\.encoding: unknown encoding 'latin-9x'",
        ),
        (
            {"municipality_name": "Ærø ☃"},
            r"tenants\.851\.vendors\.kmd-ind01\.options\.municipality_name: 'Ærø ☃' cannot be "
            r"written in iso-8859-1",
        ),
    ],
)
def test_a_text_the_file_cannot_hold_stops_the_start_with_the_key(
    ind01_settings: Settings, options: dict[str, Any], message: str
) -> None:
    from gateway.app import create_app
    from gateway.errors import ConfigError

    with pytest.raises(ConfigError, match=message) as err:
        create_app(with_options(ind01_settings, **options))
    assert "\n" not in str(err.value)


async def test_a_file_run_clears_at_risk_when_it_delivers(
    make_gateway: Any, ind01_settings: Settings, tmp_path: Path
) -> None:
    from datetime import datetime, timedelta
    from zoneinfo import ZoneInfo

    cutoff = (datetime.now(ZoneInfo("Europe/Copenhagen")) + timedelta(minutes=2)).replace(
        second=0, microsecond=0
    )
    old = ind01_settings.tenants["851"]
    tenants = dict(ind01_settings.tenants)
    tenants["851"] = tenant(
        "851",
        KEY_851,
        dict(old.vendors),
        dict(old.routes),
        cutoff={"rule": "business day 5 at 12:00", "dates": [cutoff.strftime("%Y-%m-%dT%H:%M")]},
    )
    gw = await make_gateway(replace(ind01_settings, tenants=tenants))
    await submit(gw, report("A", "10.00"), report("Z", "0"))
    flagged = await gw.store.flag_at_risk(
        cutoff.timestamp() + 60, 3600
    )  # as if the cut-off had passed
    assert sorted(f["report_id"] for f in flagged) == ["A", "Z"]
    await gw.app[APP_FILE_RUNNER].run_once("851", "kmd-ind01")
    a, z = (await status(gw, "A"))["deliveries"][0], (await status(gw, "Z"))["deliveries"][0]
    assert (a["status"], a["at_risk"]) == ("delivered", False)
    assert (z["status"], z["at_risk"]) == ("not_applicable", False)
    assert await gw.store.count_at_risk() == 0
