"""The TOML file: validated at start-up, one line naming the bad key, secrets never shown."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gateway.errors import ConfigError
from gateway.settings import hash_api_key, load

REPO = Path(__file__).resolve().parent.parent

BASE = """
[server]
listen = "127.0.0.1:9000"
store = "sqlite:///data/gw.db"

[tenants.746]
api_key_hashes = ["{hash}"]
[tenants.746.routes]
drive = "sd-koersel"
[tenants.746.vendors.sd-koersel]
endpoint = "https://sd.example/x"
username = "SYuser"
password_env = "SD_PW"
institution = "XY"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gw.toml"
    path.write_text(text.replace("{hash}", hash_api_key("k")), encoding="utf-8")
    return path


def test_demo_config_loads() -> None:
    settings = load(REPO / "examples" / "demo.toml")
    assert set(settings.tenants) >= {"746", "840", "851"}
    assert settings.tenant_for_key("demo-key-746").municipality == "746"
    assert settings.tenant_for_key("demo-key-851").municipality == "851"
    assert settings.tenant_for_key("nope") is None


def test_relative_store_path_is_relative_to_the_file(tmp_path: Path) -> None:
    settings = load(write(tmp_path, BASE), env={"SD_PW": "secret"})
    assert settings.store_url == f"sqlite:///{tmp_path.resolve() / 'data' / 'gw.db'}"
    assert (settings.listen_host, settings.listen_port) == ("127.0.0.1", 9000)


def test_secret_from_env_is_never_in_repr(tmp_path: Path) -> None:
    settings = load(write(tmp_path, BASE), env={"SD_PW": "s3cr3t-value"})
    vendor = settings.tenants["746"].vendors["sd-koersel"]
    assert vendor.password == "s3cr3t-value"
    assert "s3cr3t-value" not in repr(settings)


def test_secret_from_file(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("from-file\n")
    settings = load(write(tmp_path, BASE.replace('password_env = "SD_PW"', 'password_file = "pw"')))
    assert settings.tenants["746"].vendors["sd-koersel"].password == "from-file"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            ('password_env = "SD_PW"', 'password = "x"'),
            "tenants.746.vendors.sd-koersel.password: secrets are not accepted inline",
        ),
        (('listen = "127.0.0.1:9000"', 'listen = "nowhere"'), "server.listen: expected HOST:PORT"),
        (("[tenants.746]", "[tenants.74]"), "tenants.74: a municipality code is 3 digits"),
        (
            ('drive = "sd-koersel"', "drive = 3"),
            "tenants.746.routes.drive: must be an adapter name",
        ),
        (
            ('drive = "sd-koersel"', 'walk = "sd-koersel"'),
            "tenants.746.routes.walk: unknown setting",
        ),
        (
            ('institution = "XY"', 'institution = "XY"\nread_timeout_seconds = -1'),
            "read_timeout_seconds: must be positive",
        ),
        (("[server]", "[server]\nworkers = 3"), "server.workers: unknown setting"),
        (
            ('password_env = "SD_PW"', 'password_env = "NOT_SET"'),
            "password_env: environment variable NOT_SET is not set",
        ),
        (
            ('store = "sqlite:///data/gw.db"', 'store = "mysql://x"'),
            "server.store: unsupported store URL",
        ),
        (("[server]", "[server]\nstore_pool_size = 0"), "server.store_pool_size: must be positive"),
        (("[server]", '[server]\nstore_pool_size = "ten"'), "server.store_pool_size: expected int"),
    ],
)
def test_bad_settings_name_the_key(tmp_path: Path, change: tuple[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load(write(tmp_path, BASE.replace(*change)), env={"SD_PW": "x"})
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_not_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(write(tmp_path, "[server\n"))


def test_bad_api_key_hash(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"tenants.746.api_key_hashes\[0\]: expected 'sha256:<64 hex>'"
    ):
        load(write(tmp_path, BASE.replace("{hash}", "plain-key")), env={"SD_PW": "x"})


def test_bad_opening_hours_stop_the_start_with_the_key(tmp_path: Path) -> None:
    from gateway.app import create_app

    text = BASE.replace('institution = "XY"', 'institution = "XY"\nopening_hours = "6 til 22"')
    settings = load(write(tmp_path, text), env={"SD_PW": "x"})
    with pytest.raises(ConfigError, match=r"^tenants.746.vendors.sd-koersel.opening_hours: "):
        create_app(settings)


def test_every_relative_path_is_relative_to_the_files_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    for name in ("sd-password", "client.pem", "client.key", "ca.pem"):
        (etc / name).write_text("x\n")
    monkeypatch.chdir(tmp_path)  # the cwd is not the file's folder
    text = BASE.replace(
        'store = "sqlite:///data/gw.db"', 'store = "sqlite:///data/gw.db"\ndata_dir = "data"'
    ).replace(
        'password_env = "SD_PW"',
        'password_file = "sd-password"\ncert_file = "client.pem"\nkey_file = "client.key"\nca_file = "ca.pem"',
    )
    path = etc / "gw.toml"
    path.write_text(text.replace("{hash}", hash_api_key("k")), encoding="utf-8")
    settings = load(Path("etc/gw.toml"))
    vendor = settings.tenants["746"].vendors["sd-koersel"]
    assert settings.store_url == f"sqlite:///{etc.resolve() / 'data' / 'gw.db'}"
    assert settings.data_dir == etc.resolve() / "data"
    assert (vendor.password, vendor.cert_file, vendor.key_file, vendor.ca_file) == (
        "x",
        str(etc.resolve() / "client.pem"),
        str(etc.resolve() / "client.key"),
        str(etc.resolve() / "ca.pem"),
    )


def test_a_missing_file_is_named_with_the_folder_it_was_looked_for_in(tmp_path: Path) -> None:
    text = BASE.replace('password_env = "SD_PW"', 'password_file = "nope"')
    with pytest.raises(
        ConfigError, match=re.escape(f"password_file: cannot read {tmp_path.resolve() / 'nope'}: ")
    ):
        load(write(tmp_path, text))


# -- keys with ids, operators, vendor limits, TLS (issue 10) ----------------------------------------

KEYED = BASE.replace(
    'api_key_hashes = ["{hash}"]',
    'api_key_hashes = ["{hash}"]\n'
    'api_keys = [{id = "ab12cd34", hash = "{hash}"}, {id = "ee77ff88", hash = "{hash}"}]\n'
    'revoked_key_ids = ["ee77ff88"]',
)
OPERATOR = '\n[operators.alice]\ntoken_hash = "{hash}"\nrole = "viewer"\nmunicipalities = ["746"]\n'


def test_keys_with_ids_and_revoked_ids(tmp_path: Path) -> None:
    tenant = load(write(tmp_path, KEYED), env={"SD_PW": "x"}).tenants["746"]
    assert [k.id for k in tenant.api_keys] == ["ab12cd34", "ee77ff88"]
    assert tenant.revoked_key_ids == {"ee77ff88"}
    assert hash_api_key("k") not in repr(tenant)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ('id = "ab12cd34"', r"tenants.746.api_keys\[1\].id: 'ab12cd34' is listed twice"),
        (
            'id = "AB_12"',
            r"tenants.746.api_keys\[1\].id: expected 4-32 lowercase letters or digits",
        ),
        ('hash = "plain"', r"tenants.746.api_keys\[1\].hash: expected 'sha256:<64 hex>'"),
    ],
)
def test_bad_key_entries_name_the_key(tmp_path: Path, change: str, message: str) -> None:
    key, _, _ = change.partition(" = ")
    old = 'id = "ee77ff88"' if key == "id" else 'hash = "{hash}"}]'
    new = change if key == "id" else change + "}]"
    with pytest.raises(ConfigError, match=message):
        load(write(tmp_path, KEYED.replace(old, new)), env={"SD_PW": "x"})


def test_operators_have_a_role_and_municipalities(tmp_path: Path) -> None:
    alice = load(write(tmp_path, BASE + OPERATOR), env={"SD_PW": "x"}).operators["alice"]
    assert (alice.role, alice.municipalities) == ("viewer", {"746"})
    assert (
        alice.may("viewer")
        and not alice.may("operator")
        and alice.covers("746")
        and not alice.covers("840")
    )
    assert hash_api_key("k") not in repr(alice)
    with pytest.raises(
        ConfigError, match=r"^operators.alice.role: required, one of viewer, operator, admin"
    ):
        load(write(tmp_path, BASE + OPERATOR.replace('role = "viewer"\n', "")), env={"SD_PW": "x"})
    with pytest.raises(ConfigError, match=r"^operators.alice.role: .*'root'"):
        load(write(tmp_path, BASE + OPERATOR.replace('"viewer"', '"root"')), env={"SD_PW": "x"})
    with pytest.raises(ConfigError, match=r"^operators.alice.municipalities: required"):
        load(write(tmp_path, BASE + OPERATOR.replace('["746"]', '["all"]')), env={"SD_PW": "x"})
    everyone = load(
        write(tmp_path, BASE + OPERATOR.replace('["746"]', '["*"]')), env={"SD_PW": "x"}
    )
    assert everyone.operators["alice"].covers("999")


def test_the_demo_has_the_ops_token_as_an_operator_of_every_demo_municipality() -> None:
    settings = load(REPO / "examples" / "demo.toml")
    demo = settings.operator_for_token("demo-ops-token")
    assert demo is not None and demo.role == "operator"
    assert all(demo.covers(m) for m in settings.tenants)


def test_vendor_limits_and_the_deadline_against_the_lease(tmp_path: Path) -> None:
    limits = 'institution = "XY"\nmax_reply_bytes = 65536\ntotal_timeout_seconds = 50'
    vendor = (
        load(write(tmp_path, BASE.replace('institution = "XY"', limits)), env={"SD_PW": "x"})
        .tenants["746"]
        .vendors["sd-koersel"]
    )
    assert (vendor.max_reply_bytes, vendor.total_timeout, vendor.deadline()) == (65536, 50.0, 50.0)
    defaults = load(write(tmp_path, BASE), env={"SD_PW": "x"}).tenants["746"].vendors["sd-koersel"]
    assert (defaults.max_reply_bytes, defaults.deadline()) == (1024 * 1024, 35.0)
    short = BASE + "[dispatcher]\nlease_seconds = 40\n"
    with pytest.raises(
        ConfigError,
        match=r"^tenants.746.vendors.sd-koersel.total_timeout_seconds: 50 s must be "
        r"shorter than dispatcher.lease_seconds \(40\)$",
    ):
        load(write(tmp_path, short.replace('institution = "XY"', limits)), env={"SD_PW": "x"})
    with pytest.raises(
        ConfigError, match=r"total_timeout_seconds: 35 s \(connect \+ read timeouts\) must be"
    ):
        load(write(tmp_path, BASE + "[dispatcher]\nlease_seconds = 30\n"), env={"SD_PW": "x"})
    with pytest.raises(
        ConfigError, match=r"total_timeout_seconds: must be longer than connect_timeout_seconds"
    ):
        load(
            write(
                tmp_path,
                BASE.replace('institution = "XY"', 'institution = "XY"\ntotal_timeout_seconds = 2'),
            ),
            env={"SD_PW": "x"},
        )


def test_tls_needs_both_files(tmp_path: Path) -> None:
    (tmp_path / "cert.pem").write_text("x")
    (tmp_path / "key.pem").write_text("x")
    both = BASE.replace(
        'store = "sqlite:///data/gw.db"',
        'store = "sqlite:///data/gw.db"\ntls_cert_file = "cert.pem"\ntls_key_file = "key.pem"',
    )
    settings = load(write(tmp_path, both), env={"SD_PW": "x"})
    assert settings.tls_cert_file == tmp_path / "cert.pem"
    with pytest.raises(ConfigError, match=r"^server.tls_key_file: give both"):
        load(write(tmp_path, both.replace('tls_key_file = "key.pem"', "")), env={"SD_PW": "x"})
    with pytest.raises(ConfigError, match=r"^server.tls_cert_file: no such file"):
        load(write(tmp_path, both.replace('"cert.pem"', '"missing.pem"')), env={"SD_PW": "x"})
    with pytest.raises(
        ConfigError, match=r"^server.metrics_token_hash: expected 'sha256:<64 hex>'"
    ):
        load(
            write(
                tmp_path,
                both.replace(
                    'tls_key_file = "key.pem"',
                    'tls_key_file = "key.pem"\nmetrics_token_hash = "plain"',
                ),
            ),
            env={"SD_PW": "x"},
        )
