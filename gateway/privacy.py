"""Personal data: CPR numbers encrypted at rest (AES-GCM, rotating data keys), their keyed
lookup hash, and the one masking function every log line, answer, error and CLI line uses.

A stored value names the key that sealed it (``v1:<key id>:<base64 nonce+ciphertext>``), so
values sealed under an older key stay readable as long as that key is listed; ``payroll-gateway
keys rotate-data-key`` re-seals everything under the current key. Each value is bound to its
row (associated data), so a ciphertext copied into another row does not open there.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import os
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from adapters.base import MASKED_CPR, mask_cpr

from .errors import ConfigError

__all__ = [
    "MASKED_CPR",
    "DataKeys",
    "SealError",
    "birth_date_form",
    "create_key_file",
    "is_sealed",
    "mask_cpr",
    "mask_strings",
    "new_data_key",
    "parse_key",
]

log = logging.getLogger(__name__)

PREFIX = "v1"
KEY_BYTES = 32
NONCE_BYTES = 12
_LOOKUP_INFO = b"payroll-gateway cpr lookup v1"


class SealError(Exception):
    """A sealed value cannot be opened: its key is not listed, or it was altered."""


def new_data_key() -> str:
    """A fresh data key as written to a key file: 32 random bytes, base64."""
    return base64.b64encode(secrets.token_bytes(KEY_BYTES)).decode("ascii")


def parse_key(text: str, where: str) -> bytes:
    """32 bytes from base64 or hex text; a one-line ConfigError naming ``where`` otherwise."""
    text = text.strip()
    raw: bytes | None = None
    if len(text) == 2 * KEY_BYTES:
        try:
            raw = bytes.fromhex(text)
        except ValueError:
            raw = None
    if raw is None:
        try:
            raw = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raw = None
    if raw is None or len(raw) != KEY_BYTES:
        raise ConfigError(
            f"{where}: expected a data key of 32 bytes as base64 or hex "
            "(payroll-gateway keys create-data-key)"
        )
    return raw


def key_id(key: bytes) -> str:
    """A key's public id: the first 8 hex digits of its SHA-256 (never reveals the key)."""
    return hashlib.sha256(b"payroll-gateway data key id\0" + key).hexdigest()[:8]


@dataclass(frozen=True, slots=True)
class DataKeys:
    """The current data key (seals) and the older ones (open only), by key id."""

    current: bytes = field(repr=False)
    older: tuple[bytes, ...] = field(default=(), repr=False)
    source: str = ""  # where the current key came from, for messages (never the key)
    missing: str = ""  # set: no key is configured, and this says so to whatever needs one

    @classmethod
    def generate(cls) -> DataKeys:
        return cls(secrets.token_bytes(KEY_BYTES), source="generated")

    @classmethod
    def absent(cls, reason: str) -> DataKeys:
        """No key: a store can still be migrated and listed, but not seal or open anything."""
        return cls(b"", missing=reason)

    def _require(self) -> None:
        if self.missing:
            raise ConfigError(self.missing)

    @property
    def current_id(self) -> str:
        return key_id(self.current)

    def _by_id(self) -> dict[str, bytes]:
        keys = {key_id(k): k for k in self.older}
        keys[self.current_id] = self.current
        return keys

    # -- sealing -------------------------------------------------------------------------

    def seal(self, plaintext: str, context: str) -> str:
        """``plaintext`` encrypted under the current key, bound to ``context`` (its row)."""
        self._require()
        nonce = secrets.token_bytes(NONCE_BYTES)
        sealed = AESGCM(self.current).encrypt(
            nonce, plaintext.encode("utf-8"), context.encode("utf-8")
        )
        return f"{PREFIX}:{self.current_id}:{base64.b64encode(nonce + sealed).decode('ascii')}"

    def open(self, value: str, context: str) -> str:
        """The plaintext of a sealed value; SealError for an unknown key or altered value."""
        self._require()
        prefix, kid, data = _split(value)
        key = self._by_id().get(kid)
        if key is None:
            raise SealError(
                f"data key {kid} is not configured (list it in [privacy] old_data_key_files)"
            )
        try:
            raw = base64.b64decode(data, validate=True)
            plain = AESGCM(key).decrypt(
                raw[:NONCE_BYTES], raw[NONCE_BYTES:], context.encode("utf-8")
            )
        except (InvalidTag, binascii.Error, ValueError) as exc:
            raise SealError(
                f"a value sealed under data key {kid} was altered or belongs elsewhere"
            ) from exc
        return plain.decode("utf-8")

    def open_or_plain(self, value: str, context: str) -> str:
        """A sealed value's plaintext; a value from before encryption as it is."""
        return self.open(value, context) if is_sealed(value) else value

    def reseal(self, value: str, context: str) -> str | None:
        """The value sealed under the current key; None when it already is (idempotent)."""
        if is_sealed(value) and _split(value)[1] == self.current_id:
            return None
        return self.seal(self.open_or_plain(value, context), context)

    # -- lookups -------------------------------------------------------------------------

    def lookup_hash(self, cpr: str) -> str:
        """A keyed hash of a CPR number for equality lookups: HMAC-SHA256 under a key derived
        from the current data key (a separate key: the hash never helps to open a value).
        Prefixed with the data key id, so a rotation knows which hashes to recompute."""
        self._require()
        digest = hmac.new(
            self._lookup_key(), _digits(cpr).encode("ascii"), hashlib.sha256
        ).hexdigest()
        return f"{self.current_id}:{digest}"

    def _lookup_key(self) -> bytes:
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_LOOKUP_INFO).derive(
            self.current
        )


def is_sealed(value: str | None) -> bool:
    return value is not None and value.startswith(PREFIX + ":") and value.count(":") >= 2


def _split(value: str) -> tuple[str, str, str]:
    prefix, kid, data = (value.split(":", 2) + ["", ""])[:3]
    if prefix != PREFIX or not kid or not data:
        raise SealError("not a sealed value")
    return prefix, kid, data


def _digits(cpr: str) -> str:
    return "".join(ch for ch in cpr if ch.isdigit())


# ---------------------------------------------------------------------------------------
# Masking (the implementation is adapters.base.mask_cpr: adapters may import only that module)
# ---------------------------------------------------------------------------------------


def birth_date_form(cpr: str) -> str:
    """``DDMMYY-****``: only where an operator needs the birth date to tell people apart."""
    digits = _digits(cpr)
    return f"{digits[:6]}-****" if len(digits) == 10 else MASKED_CPR


#: report fields that hold structured values a mask would corrupt (never free text)
_STRUCTURED = frozenset({"account", "employment_id", "wage_code", "wage_code_optional"})


def mask_strings(value: Any, cprs: Iterable[str] = ()) -> Any:
    """A JSON value with every free-text string CPR-masked (for views of a stored report)."""
    known = tuple(cprs)
    if isinstance(value, Mapping):
        return {k: v if k in _STRUCTURED else mask_strings(v, known) for k, v in value.items()}
    if isinstance(value, list):
        return [mask_strings(v, known) for v in value]
    return mask_cpr(value, known) if isinstance(value, str) else value


# ---------------------------------------------------------------------------------------
# Key files
# ---------------------------------------------------------------------------------------


def read_key_file(path: Path, where: str) -> bytes:
    try:
        text = path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not ASCII text"
        raise ConfigError(f"{where}: cannot read {path}: {reason}") from exc
    return parse_key(text, where)


def create_key_file(path: Path) -> bool:
    """Write a new key to ``path`` (mode 0600) unless it exists; True when it was created."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(new_data_key() + "\n")
        f.flush()
        os.fsync(f.fileno())
    return True


def embedded_keys(path: Path) -> DataKeys:
    """The embedded default without a configured key: the key file ``path``, made on first
    use (mode 0600) and logged once. Back it up with the database: without it, the stored CPR
    numbers cannot be read."""
    if create_key_file(path):
        log.warning(
            "no [privacy] data key configured: generated %s (mode 0600); back it up, "
            "without it the stored CPR numbers cannot be read",
            path,
        )
    return DataKeys(read_key_file(path, f"privacy (default key file {path})"), source=str(path))


NO_KEY = (
    "privacy.data_key_file: a PostgreSQL store needs a configured data key "
    "([privacy] data_key_file or data_key_env; payroll-gateway keys create-data-key)"
)


def keys_for(configured: DataKeys | None, store_url: str, *, required: bool = True) -> DataKeys:
    """The data keys a store opens with: the configured ones; without, for SQLite the embedded
    default ``<database file>.key`` (a database in memory: a key for this process).

    PostgreSQL is shared by several processes, often on several hosts: a key generated by one
    of them would lock the others out, so there a configured key is ``required`` (ConfigError);
    a command that only migrates or lists gets keys that refuse to seal or open anything.
    """
    if configured is not None:
        return configured
    if not store_url.startswith("sqlite:///"):
        if required:
            raise ConfigError(NO_KEY)
        return DataKeys.absent(NO_KEY)
    database = store_url.removeprefix("sqlite:///")
    if database == ":memory:":
        return DataKeys.generate()
    return embedded_keys(Path(database + ".key"))
