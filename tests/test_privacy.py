"""Personal data: CPR numbers never written in clear (database, WAL, journal), never shown
(logs, answers, CLI); the crypto and the one mask as tables; rotation; file modes."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import sqlite3
import stat
from dataclasses import replace
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from adapters.base import VendorSettings, mask_cpr
from gateway import privacy
from gateway.cli import main
from gateway.errors import ConfigError
from gateway.keys import APP_FILE_RUNNER
from gateway.privacy import DataKeys, SealError, keys_for
from gateway.settings import Settings, load
from gateway.simulators import kmd as kmd_sim
from gateway.store import NewReport, open_store
from tests.conftest import KEY_746, TEST_KEYS, Gateway, drive, tenant, tls_simulator, tls_vendor

KEY_851 = "test-key-851"
EMPLOYEE, APPROVER, IN_TEXT, IN_HEADER, COMPAT = (
    "0101901234",
    "0202802345",
    "0303851111",
    "0404862222",
    "0505873333",
)
CPRS = (EMPLOYEE, APPROVER, IN_TEXT, IN_HEADER, COMPAT)


def written_forms(cprs: tuple[str, ...] = CPRS) -> list[str]:
    """Every way a CPR number is written: DDMMYYXXXX, DDMMYY-XXXX, DDMMYY XXXX."""
    return [form for c in cprs for form in (c, f"{c[:6]}-{c[6:]}", f"{c[:6]} {c[6:]}")]


def leaks(text: str | bytes) -> list[str]:
    data = text if isinstance(text, bytes) else text.encode("utf-8")
    return [form for form in written_forms() if form.encode() in data]


# -- the scenario ---------------------------------------------------------------------------


@pytest.fixture
async def scenario_settings(
    settings: Settings, tmp_path: Path, aiohttp_server: Any, dev_certs: Any
) -> Settings:
    """746: drive to SD, vacation to KMD (mutual TLS); 851: drive to the IND01 file."""
    kmd = await tls_simulator(aiohttp_server, kmd_sim, dev_certs, seed=5)
    file = VendorSettings(
        options={
            "directory": str(tmp_path / "ind01"),
            "schedule": "0 16 * * *",
            "municipality_name": "Testkommune",
        }
    )
    old = settings.tenants["746"]
    tenants = dict(settings.tenants)
    absence = tls_vendor(str(kmd.make_url(kmd_sim.PATH)), dev_certs, senderService="TEST_SENDER")
    tenants["746"] = tenant(
        "746",
        KEY_746,
        {**old.vendors, "kmd-absence": absence},
        {**old.routes, "vacation": "kmd-absence"},
    )
    tenants["851"] = tenant("851", KEY_851, {"kmd-ind01": file}, {"drive": "kmd-ind01"})
    return replace(settings, tenants=tenants)


def write_config(tmp_path: Path, store_url: str) -> Path:
    (tmp_path / "data-key").write_text(base64.b64encode(TEST_KEYS.current).decode() + "\n")
    config = tmp_path / "gateway.toml"
    config.write_text(f'[server]\nstore = "{store_url}"\n\n[privacy]\ndata_key_file = "data-key"\n')
    return config


async def run_scenario(gw: Gateway, tmp_path: Path) -> list[str]:
    """Intake (drive + vacation, CPRs in free text and in X-Request-ID), an SD delivery, an IND01
    file run, a rejection from compat; the texts the outside world got back."""
    seen: list[str] = []
    free_text = f"visit {IN_TEXT}, {IN_TEXT[:6]}-{IN_TEXT[6:]} and {IN_TEXT[:6]} {IN_TEXT[6:]}"
    sd_report = drive(
        report_id="P-1",
        purpose=free_text,
        employee={"cpr": EMPLOYEE, "employment_id": "00123"},
        approved_by_cpr=APPROVER,
    )
    vacation = {
        "kind": "vacation",
        "municipality": "746",
        "report_id": "V-1",
        "employee": {"cpr": EMPLOYEE, "employment_id": "00123"},
        "start_date": "2026-07-06",
        "end_date": "2026-07-10",
        "vacation_type": "regular",
    }
    status, body = await gw.post(
        {"reports": [sd_report, vacation]}, headers={"X-Request-ID": f"req-{IN_HEADER}"}
    )
    assert status == 202, body
    seen.append(json.dumps(body))
    seen.append(json.dumps(await gw.wait_for("P-1", {"delivered"})))
    seen.append(json.dumps(await gw.wait_for("V-1", {"delivered"})))

    ind01 = drive(
        municipality="851",
        report_id="F-1",
        distance_km="10.00",
        drive_date="2026-03-10",
        account="1234567890",
        employee={
            "cpr": EMPLOYEE,
            "employment_id": "00321",
            "employment_type": 1,
            "extra_number": 0,
        },
    )
    status, body = await gw.post(ind01, key=KEY_851)
    assert status == 202, body
    await gw.app[APP_FILE_RUNNER].run_once("851", "kmd-ind01")
    _, view = await gw.get("851", "F-1", key=KEY_851)
    assert view["status"] == "delivered", view
    seen.append(json.dumps(view))

    record = {
        "Id": 7001,
        "CprNumber": COMPAT,
        "TFCode": "0201",
        "EmploymentId": "00123",
        "DistanceMeters": -5,
        "DriveDate": "2026-03-29T00:00:00",
        "ApprovedByCpr": f"{COMPAT}x",
    }
    resp = await gw.client.post(
        "/v1/compat/os2indberetning/drive-reports",
        json=[record],
        headers={"Authorization": f"Bearer {KEY_746}", "X-Request-ID": IN_HEADER},
    )
    assert resp.status == 422
    seen += [await resp.text(), resp.headers.get("X-Request-ID", "")]
    for path in ("deliveries", "rejections"):
        seen.append(json.dumps((await gw.ops("GET", path))[1]))
    return seen


async def every_text_column(url: str) -> str:
    """What a ``pg_dump`` would show of the text: every text column of every table."""
    conn = await asyncpg.connect(url)
    try:
        columns = await conn.fetch(
            "SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = 'public'"
            " AND data_type IN ('text', 'character varying')"
        )
        parts = []
        for c in columns:
            rows = await conn.fetch(f'SELECT "{c["column_name"]}"::text FROM "{c["table_name"]}"')
            parts += [r[0] or "" for r in rows]
        return "\n".join(parts)
    finally:
        await conn.close()


def raw_bytes(store_url: str) -> bytes:
    path = store_url.removeprefix("sqlite:///")
    return b"".join(
        Path(path + suffix).read_bytes()
        for suffix in ("", "-wal", "-shm")
        if Path(path + suffix).exists()
    )


async def test_no_cpr_number_is_written_or_shown_anywhere(
    make_gateway: Any,
    scenario_settings: Settings,
    store_url: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)
    gw = await make_gateway(scenario_settings)
    seen = await run_scenario(gw, tmp_path)

    stored = (
        raw_bytes(store_url)
        if store_url.startswith("sqlite")
        else (await every_text_column(store_url)).encode()
    )
    assert stored and not leaks(stored), f"in the store: {leaks(stored)}"
    assert not leaks("\n".join(seen)), f"in the API answers: {leaks(chr(10).join(seen))}"
    logged = "\n".join(
        f"{r.getMessage()} {getattr(r, 'correlation_id', '')}" for r in caplog.records
    )
    assert not leaks(logged), f"in the logs: {leaks(logged)}"

    config = write_config(tmp_path, store_url)
    for argv in (
        ["deliveries", "--config", str(config)],
        ["deliveries", "--json", "--config", str(config)],
        ["rejections", "--config", str(config)],
        ["keys", "rotate-data-key", "--config", str(config)],
    ):
        assert await asyncio.to_thread(main, argv) == 0
    out = capsys.readouterr()
    assert not leaks(out.out + out.err), f"in the CLI output: {leaks(out.out + out.err)}"

    # and the gateway still reads what it sealed: the employee's CPR went to SD and the file
    assert EMPLOYEE.encode() in (tmp_path / "ind01" / "IND01_851.txt").read_bytes()


@pytest.mark.sqlite_only
async def test_the_database_its_wal_and_the_ind01_backups_are_private(
    make_gateway: Any,
    scenario_settings: Settings,
    store_url: str,
    tmp_path: Path,
) -> None:
    gw = await make_gateway(replace(scenario_settings, data_keys=None))
    await run_scenario(gw, tmp_path)
    path = store_url.removeprefix("sqlite:///")
    files = [Path(path + s) for s in ("", "-wal", "-shm", ".key")]
    files += list((tmp_path / "ind01" / "backup").iterdir())
    files.append(tmp_path / "ind01" / "IND01_851.txt.lock")
    assert len(files) > 5
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f


@pytest.mark.sqlite_only
def test_an_old_database_is_made_private_on_open(tmp_path: Path) -> None:
    db = tmp_path / "old.db"
    sqlite3.connect(db).close()
    db.chmod(0o644)

    async def open_and_close() -> None:
        store = open_store(f"sqlite:///{db}", keys=TEST_KEYS)
        await store.open()
        await store.aclose()

    asyncio.run(open_and_close())
    assert stat.S_IMODE(db.stat().st_mode) == 0o600


# -- at rest: sealing, the plaintext of older versions, rotation ------------------------------


def new_report(n: int, **changes: Any) -> NewReport:
    body = {
        "kind": "drive",
        "municipality": "746",
        "report_id": f"R-{n}",
        "version": 1,
        "employee": {"employment_id": f"E{n}"},
        "drive_date": "2026-03-10",
        "distance_km": "1.00",
        "wage_code": "0201",
        "purpose": f"free text {IN_TEXT}",
    }
    values = dict(
        municipality="746",
        report_id=f"R-{n}",
        version=1,
        kind="drive",
        employee_key=f"E{n}",
        body=body,
        employee_cpr=EMPLOYEE,
        approved_by_cpr=APPROVER,
        content_hash=f"h{n}",
        adapter="sd-koersel",
    )
    values.update(changes)
    return NewReport(**values)


async def execute(url: str, *statements: str) -> list[Any]:
    """Raw SQL, past the store (what an attacker with the files, or an old gateway, sees)."""
    if url.startswith("sqlite"):
        conn = sqlite3.connect(url.removeprefix("sqlite:///"))
        try:
            results = [conn.execute(s).fetchall() for s in statements]
            conn.commit()
            return results
        finally:
            conn.close()
    pg = await asyncpg.connect(url)
    try:
        return [await pg.fetch(s) for s in statements]
    finally:
        await pg.close()


async def claim_all(url: str, keys: DataKeys) -> dict[str, Any]:
    store = open_store(url, keys=keys)
    await store.open()
    try:
        jobs = await store.claim_due(1e12, "t", 60, 100, ["sd-koersel"], [])
        return {j.report["report_id"]: j.report for j in jobs}
    finally:
        await store.aclose()


async def test_rotation_reseals_everything_and_every_report_stays_deliverable(
    store_url: str,
) -> None:
    old = DataKeys(b"o" * 32)
    store = open_store(store_url, keys=old)
    await store.open()
    await store.submit([new_report(1), new_report(2, approved_by_cpr=None)], 1.0)
    await store.file_run_begin(
        {
            "run_id": "run-1",
            "municipality": "851",
            "adapter": "kmd-ind01",
            "file": "/x/IND01.txt",
            "offset_before": 0,
            "data": f"DA60851100321{EMPLOYEE}0\r\n",
            "first_line": 1,
            "header_lines": 0,
            "deliveries": {},
        },
        1.0,
    )
    await store.aclose()

    new = DataKeys(b"n" * 32, older=(old.current,))
    store = open_store(store_url, keys=new)
    await store.open()
    try:
        counts = await store.reseal(rotate=True)
        assert counts == {
            "report_cprs": 2,
            "report_versions.body": 2,
            "file_runs.data": 1,
            "file_runs.deliveries": 1,
            "parts.fields": 0,
            "attempts.message": 0,
        }
        assert set((await store.reseal(rotate=True)).values()) == {0}
        [run] = await store.file_runs_unfinished("/x/IND01.txt")
        assert EMPLOYEE in run["data"]
    finally:
        await store.aclose()
    cprs, hashes = await execute(
        store_url,
        "SELECT employee_cpr, approved_by_cpr FROM report_cprs",
        "SELECT employee_cpr_hash FROM report_cprs",
    )
    assert all(v is None or v.startswith(f"v1:{new.current_id}:") for row in cprs for v in row)
    assert {h[0] for h in hashes} == {new.lookup_hash(EMPLOYEE)}
    # without the old key: everything still opens, the reports are deliverable as they came
    reports = await claim_all(store_url, DataKeys(new.current))
    assert (
        reports["R-1"]["employee"]["cpr"] == EMPLOYEE
        and reports["R-1"]["approved_by_cpr"] == APPROVER
    )
    assert reports["R-2"]["employee"]["cpr"] == EMPLOYEE and "approved_by_cpr" not in reports["R-2"]
    assert reports["R-1"]["purpose"] == f"free text {IN_TEXT}"


async def test_values_stored_in_clear_are_sealed_at_the_next_start(store_url: str) -> None:
    store = open_store(store_url, keys=TEST_KEYS)
    await store.open()
    await store.submit([new_report(1)], 1.0)
    await store.aclose()
    body = json.dumps(new_report(1).body, sort_keys=True).replace("'", "''")
    await execute(
        store_url,  # as a gateway before migration 7 left them
        f"UPDATE report_cprs SET employee_cpr = '{EMPLOYEE}', approved_by_cpr = '{APPROVER}',"
        " employee_cpr_hash = NULL, approved_cpr_hash = NULL",
        f"UPDATE report_versions SET body = '{body}'",
    )
    reports = await claim_all(store_url, TEST_KEYS)  # opening seals them
    assert reports["R-1"]["employee"]["cpr"] == EMPLOYEE
    [cprs, versions] = await execute(
        store_url,
        "SELECT employee_cpr, approved_by_cpr, employee_cpr_hash FROM report_cprs",
        "SELECT body FROM report_versions",
    )
    assert not leaks(repr(cprs) + repr(versions)) and cprs[0][2] == TEST_KEYS.lookup_hash(EMPLOYEE)


async def test_a_value_moved_to_another_row_does_not_open(store_url: str) -> None:
    store = open_store(store_url, keys=TEST_KEYS)
    await store.open()
    await store.submit([new_report(1), new_report(2, employee_cpr=IN_TEXT)], 1.0)
    await store.aclose()
    await execute(
        store_url,
        "UPDATE report_cprs SET employee_cpr = (SELECT employee_cpr FROM report_cprs"
        " WHERE version_pk = (SELECT MAX(version_pk) FROM report_cprs))",
    )
    with pytest.raises(SealError):
        await claim_all(store_url, TEST_KEYS)


# -- keys: configuration, the default, the CLI -----------------------------------------------


def test_postgresql_without_a_configured_key_refuses_to_start() -> None:
    with pytest.raises(ConfigError, match=r"^privacy.data_key_file: a PostgreSQL store needs"):
        keys_for(None, "postgresql://u@h/db")
    absent = keys_for(None, "postgresql://u@h/db", required=False)  # migrate, list: no sealing
    with pytest.raises(ConfigError, match="needs a configured data key"):
        absent.seal("x", "c")


def test_sqlite_without_a_key_makes_one_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    url = f"sqlite:///{tmp_path / 'gw.db'}"
    first, second = keys_for(None, url), keys_for(None, url)
    assert first.current == second.current
    assert stat.S_IMODE((tmp_path / "gw.db.key").stat().st_mode) == 0o600
    assert [r.getMessage() for r in caplog.records if "generated" in r.getMessage()] != []
    assert len([r for r in caplog.records if "generated" in r.getMessage()]) == 1


@pytest.mark.parametrize(
    ("privacy_table", "env", "error"),
    [
        ('data_key_file = "missing"', {}, "privacy.data_key_file: cannot read"),
        ('data_key_file = "short"', {}, "privacy.data_key_file: expected a data key of 32 bytes"),
        (
            'data_key_env = "PGW_KEY"',
            {},
            "privacy.data_key_env: environment variable PGW_KEY is not set",
        ),
        (
            'data_key_env = "PGW_KEY"',
            {"PGW_KEY": "nope"},
            "privacy.data_key_env: expected a data key",
        ),
        ('data_key_file = "k"\ndata_key_env = "PGW_KEY"', {}, "privacy.data_key_env: give either"),
        ('old_data_key_files = ["k"]', {}, "privacy.old_data_key_files: also give the current key"),
        (
            'old_data_key_files = ["short"]\ndata_key_file = "k"',
            {},
            "privacy.old_data_key_files[0]: expected",
        ),
        ('data_key = "inline"', {}, "privacy.data_key: unknown setting"),
    ],
)
def test_privacy_config_errors_are_one_line_naming_the_key(
    tmp_path: Path,
    privacy_table: str,
    env: dict[str, str],
    error: str,
) -> None:
    (tmp_path / "k").write_text(privacy.new_data_key())
    (tmp_path / "short").write_text(base64.b64encode(b"x" * 16).decode())
    config = tmp_path / "c.toml"
    config.write_text(f"[privacy]\n{privacy_table}\n")
    with pytest.raises(ConfigError) as info:
        load(config, env)
    assert str(info.value).startswith(error) and "\n" not in str(info.value)


def test_keys_in_files_hex_or_base64_with_older_keys(tmp_path: Path) -> None:
    current, old = b"c" * 32, b"o" * 32
    (tmp_path / "now").write_text(current.hex() + "\n")
    (tmp_path / "old").write_text(base64.b64encode(old).decode())
    config = tmp_path / "c.toml"
    config.write_text('[privacy]\ndata_key_file = "now"\nold_data_key_files = ["old"]\n')
    keys = load(config, {}).data_keys
    assert keys is not None and keys.current == current and keys.older == (old,)
    assert "cccc" not in repr(load(config, {})) and current.hex() not in repr(keys)
    assert load(tmp_path / "c.toml", {}).data_keys == keys
    via_env = tmp_path / "e.toml"
    via_env.write_text('[privacy]\ndata_key_env = "K"\n')
    assert (
        load(via_env, {"K": base64.b64encode(current).decode()}).data_keys or old
    ).current == current


def test_create_data_key_prints_a_usable_key(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keys", "create-data-key"]) == 0
    key = capsys.readouterr().out.strip()
    assert len(privacy.parse_key(key, "k")) == 32


# -- the crypto as a table ---------------------------------------------------------------------

A, B = DataKeys(b"a" * 32), DataKeys(b"b" * 32)


def tampered(value: str) -> str:
    prefix, kid, data = value.split(":", 2)
    raw = bytearray(base64.b64decode(data))
    raw[-1] ^= 1
    return f"{prefix}:{kid}:{base64.b64encode(bytes(raw)).decode()}"


@pytest.mark.parametrize(
    ("sealer", "opener", "change", "context", "opens"),
    [
        (A, A, None, "c", True),  # round trip
        (A, B, None, "c", False),  # wrong key: its id is not listed
        (
            A,
            DataKeys(b"b" * 32, older=(b"a" * 32,)),
            None,
            "c",
            True,
        ),  # the key id selects the old key
        (A, A, tampered, "c", False),  # tampering detected
        (A, A, None, "other row", False),  # bound to its row
        (A, A, lambda v: v.replace(A.current_id, B.current_id), "c", False),  # a forged key id
    ],
)
def test_sealing(
    sealer: DataKeys, opener: DataKeys, change: Any, context: str, opens: bool
) -> None:
    value = sealer.seal(EMPLOYEE, "c")
    assert value.startswith(f"v1:{sealer.current_id}:") and EMPLOYEE not in value
    value = change(value) if change else value
    if opens:
        assert opener.open(value, context) == EMPLOYEE
    else:
        with pytest.raises(SealError):
            opener.open(value, context)


def test_each_seal_is_fresh_and_the_lookup_hash_is_keyed() -> None:
    assert A.seal(EMPLOYEE, "c") != A.seal(EMPLOYEE, "c")
    assert A.lookup_hash(EMPLOYEE) == A.lookup_hash(f"{EMPLOYEE[:6]}-{EMPLOYEE[6:]}")
    assert A.lookup_hash(EMPLOYEE) != B.lookup_hash(EMPLOYEE)
    assert A.lookup_hash(EMPLOYEE).startswith(A.current_id + ":") and EMPLOYEE not in A.lookup_hash(
        EMPLOYEE
    )
    assert A.reseal(A.seal(EMPLOYEE, "c"), "c") is None  # already under the current key
    assert A.open(A.reseal(EMPLOYEE, "c") or "", "c") == EMPLOYEE  # in clear: sealed


# -- the one mask --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ("0101901234", "xxxxxx-xxxx"),
        ("010190-1234", "xxxxxx-xxxx"),
        ("010190 1234", "xxxxxx-xxxx"),
        (
            "SD Løn fault Client: BrugerIdentifikator 010190 0000 is not a user",
            "SD Løn fault Client: BrugerIdentifikator xxxxxx-xxxx is not a user",
        ),
        ("req-0404862222", "req-xxxxxx-xxxx"),  # in an id or a header
        ("6101901234 replacement number", "xxxxxx-xxxx replacement number"),
        ("a=0101901234,b=0202802345", "a=xxxxxx-xxxx,b=xxxxxx-xxxx"),
        ("12345678901", "12345678901"),  # eleven digits: not a CPR
        ("3213901234", "3213901234"),  # day 32: not a date
        ("0113901234", "0113901234"),  # month 13
        ("2026-03-29 12:30", "2026-03-29 12:30"),
        ("", ""),
    ],
)
def test_mask(text: str, masked: str) -> None:
    assert mask_cpr(text) == masked
    assert privacy.mask_cpr is mask_cpr  # one function: the adapters' and the gateway's


def test_a_known_cpr_is_masked_however_it_is_written() -> None:
    odd = "9999999999"  # not a date: only known as this report's number
    for written in (odd, "999999-9999", "999999 9999"):
        assert mask_cpr(f"x {written} y", (odd,)) == "x xxxxxx-xxxx y"


def test_the_birth_date_form_and_masked_views() -> None:
    assert privacy.birth_date_form("0101901234") == "010190-****"
    assert privacy.birth_date_form("bad") == "xxxxxx-xxxx"
    view = privacy.mask_strings(
        {
            "purpose": "for 0101901234",
            "account": "0101901234",
            "route": {"via": ["010190 1234"]},
            "distance_km": 3,
        }
    )
    assert view == {
        "purpose": "for xxxxxx-xxxx",
        "account": "0101901234",
        "route": {"via": ["xxxxxx-xxxx"]},
        "distance_km": 3,
    }
