"""Console passwords (scrypt), accounts in the config, and ``payroll-gateway hash-password``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gateway.console.passwords import hash_password, valid_hash, verify_password
from gateway.errors import ConfigError
from gateway.settings import load

REPO = Path(__file__).resolve().parents[2]


def test_a_hash_verifies_its_password_only() -> None:
    stored = hash_password("rødgrød med fløde")
    assert stored.startswith("scrypt$16384$8$1$") and valid_hash(stored)
    assert verify_password("rødgrød med fløde", stored)
    assert not verify_password("rødgrød med flöde", stored)
    assert not verify_password("", stored)
    assert hash_password("same") != hash_password("same")  # a random salt each time


@pytest.mark.parametrize(
    "stored",
    [
        "",
        "sha256:" + "0" * 64,
        "scrypt$16383$8$1$AAAAAAAAAAAAAAAAAAAAAA==$" + "A" * 44,  # n not a power of two
        "scrypt$1048576$8$1$AAAAAAAAAAAAAAAAAAAAAA==$" + "A" * 44,  # 1 GiB of memory
        "scrypt$16384$8$1$short$" + "A" * 44,
    ],
)
def test_a_malformed_or_too_costly_hash_never_verifies(stored: str) -> None:
    assert not valid_hash(stored)
    assert not verify_password("anything", stored)


def test_the_demo_accounts_sign_in_with_their_documented_passwords() -> None:
    settings = load(REPO / "examples" / "demo.toml")
    accounts = settings.accounts
    assert sorted(accounts) == ["demo-admin", "demo-operator", "demo-viewer"]
    for name, account in accounts.items():
        assert verify_password(f"{name}-password", account.password_hash)
    assert accounts["demo-viewer"].municipalities == {"746"}
    assert accounts["demo-operator"].operator().may("operator")
    assert not accounts["demo-viewer"].operator().may("operator")
    assert accounts["demo-admin"].municipalities == {"746", "840", "851"}


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ('password_hash = "plain"\nrole = "viewer"\nmunicipalities = ["746"]', "password_hash"),
        ('password_hash = "{h}"\nmunicipalities = ["746"]', "role"),
        ('password_hash = "{h}"\nrole = "root"\nmunicipalities = ["746"]', "role"),
        ('password_hash = "{h}"\nrole = "viewer"', "municipalities"),
        ('password_hash = "{h}"\nrole = "viewer"\nmunicipalities = ["746"]\nx = 1', "x"),
    ],
)
def test_a_bad_account_is_refused_naming_the_key(tmp_path: Path, table: str, message: str) -> None:
    config = tmp_path / "gw.toml"
    config.write_text("[accounts.ann]\n" + table.replace("{h}", hash_password("pw")))
    with pytest.raises(ConfigError, match=rf"accounts\.ann.*{message}"):
        load(config)


def test_hash_password_reads_stdin_and_never_takes_the_password_as_an_argument() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "gateway", "hash-password"],
        input="kødpålæg-og-æbler\n",
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    printed = run.stdout.strip()
    assert verify_password("kødpålæg-og-æbler", printed) and "kødpålæg" not in run.stdout
    refused = subprocess.run(
        [sys.executable, "-m", "gateway", "hash-password", "secret-password-here"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode != 0  # no positional password
    short = subprocess.run(
        [sys.executable, "-m", "gateway", "hash-password"],
        input="short\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert short.returncode == 1 and "at least 12" in short.stderr
