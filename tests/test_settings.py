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
        (('password_env = "SD_PW"', 'password = "x"'), "tenants.746.vendors.sd-koersel.password: secrets are not accepted inline"),
        (('listen = "127.0.0.1:9000"', 'listen = "nowhere"'), "server.listen: expected HOST:PORT"),
        (('[tenants.746]', '[tenants.74]'), "tenants.74: a municipality code is 3 digits"),
        (('drive = "sd-koersel"', 'drive = 3'), "tenants.746.routes.drive: must be an adapter name"),
        (('drive = "sd-koersel"', 'walk = "sd-koersel"'), "tenants.746.routes.walk: unknown setting"),
        (('institution = "XY"', 'institution = "XY"\nread_timeout_seconds = -1'), "read_timeout_seconds: must be positive"),
        (('[server]', '[server]\nworkers = 3'), "server.workers: unknown setting"),
        (('password_env = "SD_PW"', 'password_env = "NOT_SET"'), "password_env: environment variable NOT_SET is not set"),
        (('store = "sqlite:///data/gw.db"', 'store = "mysql://x"'), "server.store: unsupported store URL"),
        (('[server]', '[server]\nstore_pool_size = 0'), "server.store_pool_size: must be positive"),
        (('[server]', '[server]\nstore_pool_size = "ten"'), "server.store_pool_size: expected int"),
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
    with pytest.raises(ConfigError, match=r"tenants.746.api_key_hashes\[0\]: expected 'sha256:<64 hex>'"):
        load(write(tmp_path, BASE.replace("{hash}", "plain-key")), env={"SD_PW": "x"})


def test_bad_opening_hours_stop_the_start_with_the_key(tmp_path: Path) -> None:
    from gateway.app import create_app

    text = BASE.replace('institution = "XY"', 'institution = "XY"\nopening_hours = "6 til 22"')
    settings = load(write(tmp_path, text), env={"SD_PW": "x"})
    with pytest.raises(ConfigError, match=r"^tenants.746.vendors.sd-koersel.opening_hours: "):
        create_app(settings)


def test_every_relative_path_is_relative_to_the_files_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    for name in ("sd-password", "client.pem", "client.key", "ca.pem"):
        (etc / name).write_text("x\n")
    monkeypatch.chdir(tmp_path)  # the cwd is not the file's folder
    text = BASE.replace('store = "sqlite:///data/gw.db"', 'store = "sqlite:///data/gw.db"\ndata_dir = "data"').replace(
        'password_env = "SD_PW"',
        'password_file = "sd-password"\ncert_file = "client.pem"\nkey_file = "client.key"\nca_file = "ca.pem"')
    path = etc / "gw.toml"
    path.write_text(text.replace("{hash}", hash_api_key("k")), encoding="utf-8")
    settings = load(Path("etc/gw.toml"))
    vendor = settings.tenants["746"].vendors["sd-koersel"]
    assert settings.store_url == f"sqlite:///{etc.resolve() / 'data' / 'gw.db'}"
    assert settings.data_dir == etc.resolve() / "data"
    assert (vendor.password, vendor.cert_file, vendor.key_file, vendor.ca_file) == (
        "x", str(etc.resolve() / "client.pem"), str(etc.resolve() / "client.key"), str(etc.resolve() / "ca.pem"))


def test_a_missing_file_is_named_with_the_folder_it_was_looked_for_in(tmp_path: Path) -> None:
    text = BASE.replace('password_env = "SD_PW"', 'password_file = "nope"')
    with pytest.raises(ConfigError, match=re.escape(f"password_file: cannot read {tmp_path.resolve() / 'nope'}: ")):
        load(write(tmp_path, text))
