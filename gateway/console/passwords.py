"""Operator passwords for the console: scrypt (memory-hard, in the standard library).

A stored hash reads ``scrypt$<n>$<r>$<p>$<salt, base64>$<hash, base64>``; its own
parameters are used to verify it, so stronger ones can be chosen later without breaking
the hashes already written.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import os
import re

N, R, P = 2**14, 8, 1  # 16 MiB of memory per hash (128 * n * r bytes)
SALT_BYTES = 16
HASH_BYTES = 32
MIN_LENGTH = 12  # what hash-password accepts
MAX_MEMORY = 64 * 1024 * 1024  # a configured n or r asking for more is refused
PATTERN = re.compile(
    r"scrypt\$(?P<n>[0-9]{1,8})\$(?P<r>[0-9]{1,3})\$(?P<p>[0-9]{1,3})"
    r"\$(?P<salt>[A-Za-z0-9+/=]{16,64})\$(?P<hash>[A-Za-z0-9+/=]{32,128})"
)


def hash_password(password: str, salt: bytes | None = None) -> str:
    """A new hash of ``password`` with a random salt (``salt``: for tests only)."""
    salt = os.urandom(SALT_BYTES) if salt is None else salt
    digest = _scrypt(password, salt, N, R, P, HASH_BYTES)
    return "$".join(("scrypt", str(N), str(R), str(P), _b64(salt), _b64(digest)))


def valid_hash(stored: str) -> bool:
    """``stored`` is a hash this module can verify (the config is checked with this at start)."""
    match = PATTERN.fullmatch(stored)
    if match is None:
        return False
    n, r, p = int(match["n"]), int(match["r"]), int(match["p"])
    return n > 1 and n & (n - 1) == 0 and 0 < r and 0 < p and 128 * n * r <= MAX_MEMORY


def verify_password(password: str, stored: str) -> bool:
    """Does ``password`` match ``stored``? Compared in constant time; False for a bad hash."""
    match = PATTERN.fullmatch(stored)
    if match is None or not valid_hash(stored):
        return False
    expected = base64.b64decode(match["hash"])
    digest = _scrypt(
        password,
        base64.b64decode(match["salt"]),
        int(match["n"]),
        int(match["r"]),
        int(match["p"]),
        len(expected),
    )
    return hmac.compare_digest(digest, expected)


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int, length: int) -> bytes:
    return hashlib.scrypt(
        password.encode("utf-8"),
        salt=salt,
        n=n,
        r=r,
        p=p,
        dklen=length,
        maxmem=MAX_MEMORY + 1024 * 1024,
    )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@functools.cache
def dummy_hash() -> str:
    """Verified against when the user name is unknown, so that the answer takes as long."""
    return hash_password("not a password", b"\0" * SALT_BYTES)
