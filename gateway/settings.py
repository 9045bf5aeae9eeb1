"""One TOML file → one frozen dataclass tree, validated at start-up.

Every problem is reported as one line naming the bad key (``tenants.746.routes.drive:
unknown adapter 'x'``). Secrets are read from a file or an environment variable, never
inline, and never appear in a ``repr``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from adapters.base import DEFAULT_MAX_REPLY_BYTES, VendorSettings

from .audit import AuditSettings
from .errors import ConfigError
from .logs import parse_level
from .privacy import DataKeys, parse_key, read_key_file

KINDS = ("drive", "vacation")
_SECRET_KEYS = ("password",)
SOURCES = ("os2indberetning",)
_SOURCE_KEYS = {
    "base_url",
    "api_key_file",
    "api_key_env",
    "interval_seconds",
    "schedule",
    "connect_timeout_seconds",
    "read_timeout_seconds",
}


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    first_delay: float = 10.0
    multiplier: float = 2.0
    cap: float = 3600.0
    jitter: float = 5.0
    max_attempts: int = 200
    max_age: float = 3 * 24 * 3600.0
    retry_after_cap: float = 6 * 3600.0  # a vendor's Retry-After is honoured up to this


@dataclass(frozen=True, slots=True)
class BreakerPolicy:
    """Open when the failure share of the calls in the window reaches ``failure_rate``."""

    window_seconds: float = 60.0
    min_calls: int = 10
    failure_rate: float = 0.5
    open_seconds: float = 30.0


@dataclass(frozen=True, slots=True)
class EndpointPolicy:
    """How the gateway treats one tenant's vendor endpoint (engine side, not the adapter's)."""

    breaker: BreakerPolicy = BreakerPolicy()
    max_in_flight: int = 8
    rate_per_second: float = 0.0  # 0: no rate limit
    opening_hours: str | None = None  # None: the adapter's own default
    cutoff: Mapping[str, Any] | None = None  # the payroll cut-off calendar, as configured


OPERATOR_ROLES = ("viewer", "operator", "admin")  # each may do what the one before may, and more
ALL_MUNICIPALITIES = "*"
ACCOUNT_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


@dataclass(frozen=True, slots=True)
class Operator:
    """Who may use the ops API, with which role, for which municipalities (``"*"``: all).

    The config file always names ``role`` and ``municipalities``; the defaults here are the
    behaviour before roles existed, for code that builds settings directly (tests).
    """

    name: str
    token_hash: str = field(repr=False)
    role: str = "admin"
    municipalities: frozenset[str] = frozenset({ALL_MUNICIPALITIES})

    def may(self, role: str) -> bool:
        """Has at least ``role`` (viewer < operator < admin)."""
        return OPERATOR_ROLES.index(self.role) >= OPERATOR_ROLES.index(role)

    def covers(self, municipality: str) -> bool:
        return ALL_MUNICIPALITIES in self.municipalities or municipality in self.municipalities


@dataclass(frozen=True, slots=True)
class Account:
    """Who may sign in to the console (``[accounts.NAME]``): a password hash (scrypt, see
    ``gateway.console.passwords``) and the same role and municipalities an operator token has."""

    name: str
    password_hash: str = field(repr=False)
    role: str = "viewer"
    municipalities: frozenset[str] = frozenset()

    def operator(self) -> Operator:
        """The account as an operator: the ops API's role and scope rules apply unchanged."""
        return Operator(self.name, "", self.role, self.municipalities)


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A key with a public id: the key is ``pgw_<id>_<secret>``, the config holds the id and hash."""

    id: str
    hash: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class PullSource:
    """A system the gateway pulls reports from (DESIGN.md §3, "Pull sources")."""

    kind: str  # the source's name in the config: "os2indberetning"
    base_url: str  # ends with "/": operation names are appended
    api_key: str = field(repr=False)
    interval_seconds: float | None = None  # either this or schedule
    schedule: str | None = None  # 5-field cron, Europe/Copenhagen
    connect_timeout: float = 5.0
    read_timeout: float = 30.0


@dataclass(frozen=True, slots=True)
class Tenant:
    municipality: str
    name: str
    api_key_hashes: frozenset[str] = field(repr=False)  # keys without an id (before ids existed)
    routes: Mapping[str, str]
    vendors: Mapping[str, VendorSettings]
    retry: Mapping[str, RetryPolicy]  # per adapter; falls back to the global policy
    endpoints: Mapping[str, EndpointPolicy] = field(default_factory=dict)  # per adapter
    sources: Mapping[str, PullSource] = field(default_factory=dict)  # pull sources, by name
    api_keys: tuple[ApiKey, ...] = ()  # keys with an id (payroll-gateway keys create)
    revoked_key_ids: frozenset[str] = frozenset()  # always refused, even if still listed


@dataclass(frozen=True, slots=True)
class SimulatorSettings:
    vendor: str
    port: int
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    fail_rate: float = 0.0
    latency_ms: int = 0
    api_key: str | None = field(
        default=None, repr=False
    )  # a pull source's simulator (os2indberetning)
    records_file: Path | None = None  # the records a source simulator starts with


#: how alert notifications are retried unless ``[alerts.retry]`` says otherwise
ALERT_RETRY = RetryPolicy(
    first_delay=10.0, multiplier=2.0, cap=900.0, jitter=2.0, max_attempts=100, max_age=24 * 3600.0
)


@dataclass(frozen=True, slots=True)
class SmtpSettings:
    """``[alerts.smtp]``: alerts also go out by e-mail."""

    host: str
    port: int = 25
    sender: str = ""  # the config's ``from``
    to: tuple[str, ...] = ()
    starttls: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    timeout: float = 10.0


@dataclass(frozen=True, slots=True)
class AlertSettings:
    """``[alerts]``: where alert notifications go, how they are signed and retried."""

    url: str | None = None  # a JSON POST per notification
    secret: str | None = field(default=None, repr=False)  # HMAC key of the signature header
    no_progress_minutes: float = 60.0
    retry: RetryPolicy = ALERT_RETRY
    smtp: SmtpSettings | None = None
    timeout: float = 10.0  # one POST (or SMTP session)

    @property
    def channels(self) -> tuple[str, ...]:
        """The channels a notification goes out on: ``webhook`` and/or ``email``."""
        return (("webhook",) if self.url else ()) + (("email",) if self.smtp else ())


@dataclass(frozen=True, slots=True)
class Settings:
    listen_host: str = "127.0.0.1"
    listen_port: int = 8080
    store_url: str = "sqlite:///payroll-gateway.db"
    store_pool_size: int = 10  # PostgreSQL: connections per process
    data_dir: Path = Path(".")
    max_body_bytes: int = 4 * 1024 * 1024
    workers: int = 16
    lease_seconds: float = 120.0
    poll_seconds: float = 0.2
    retry: RetryPolicy = RetryPolicy()
    disabled_adapters: frozenset[str] = frozenset()
    tenants: Mapping[str, Tenant] = field(default_factory=dict)
    simulators: tuple[SimulatorSettings, ...] = ()
    operators: Mapping[str, Operator] = field(default_factory=dict)
    alerts: AlertSettings = AlertSettings()
    accounts: Mapping[str, Account] = field(default_factory=dict)  # console sign-in
    session_hours: float = 8.0  # [console]: a console session ends this long after sign-in
    at_risk_check_seconds: float = 30.0
    at_risk_margin_seconds: float = 24 * 3600.0  # waiting for an operator this close to cut-off
    role: str = "all"  # intake | dispatch | all (DESIGN.md §5, serve --role)
    tls_cert_file: Path | None = None  # both set: the listener speaks HTTPS only
    tls_key_file: Path | None = None
    metrics_token_hash: str | None = field(
        default=None, repr=False
    )  # set: /metrics needs the token
    auth_failures_per_minute: int = 10  # per client address, then 429 until the minute is over
    # [privacy]: None = the embedded default (privacy.keys_for: a generated key file, SQLite only)
    data_keys: DataKeys | None = field(default=None, repr=False)
    audit: AuditSettings = AuditSettings()
    keep_months: int = 13  # [retention]: bodies and CPR numbers kept this long after delivery
    log_level: str = "INFO"  # [logging] level

    @property
    def alert_url(self) -> str | None:
        """``[alerts] url`` (kept for callers from before the alert subsystem)."""
        return self.alerts.url

    def operator_for_token(self, token: str) -> Operator | None:
        """Every operator's hash is compared in constant time; none is skipped by an early match."""
        digest = hash_api_key(token)
        found = None
        for candidate in self.operators.values():
            if hmac.compare_digest(candidate.token_hash, digest):
                found = candidate
        return found

    def endpoint(self, municipality: str, adapter: str) -> EndpointPolicy:
        tenant = self.tenants.get(municipality)
        return tenant.endpoints.get(adapter, EndpointPolicy()) if tenant else EndpointPolicy()

    def tenant_for_key(self, api_key: str) -> Tenant | None:
        """The tenant of a key, None for an unknown or revoked one.

        A ``pgw_<id>_<secret>`` key is found by its public id, then its hash is compared in
        constant time (keys made before ids existed may look alike, so a miss falls through). A key without an id is found by a set lookup of its SHA-256 digest:
        the timing of that lookup can only tell an attacker about the digest, which does not
        help to guess a key; the match is then confirmed with a constant-time comparison.
        """
        digest = hash_api_key(api_key)
        key_id = key_id_of(api_key)
        for tenant in self.tenants.values():
            if key_id is not None:
                entry = next((k for k in tenant.api_keys if k.id == key_id), None)
                if entry is not None and hmac.compare_digest(entry.hash, digest):
                    return None if key_id in tenant.revoked_key_ids else tenant
            if digest in tenant.api_key_hashes and any(
                hmac.compare_digest(h, digest) for h in tenant.api_key_hashes
            ):
                return tenant
        return None

    def retry_for(self, municipality: str, adapter: str) -> RetryPolicy:
        tenant = self.tenants.get(municipality)
        return tenant.retry.get(adapter, self.retry) if tenant else self.retry


def hash_api_key(api_key: str) -> str:
    """API keys are long random strings, so a plain SHA-256 is the right hash."""
    return "sha256:" + hashlib.sha256(api_key.encode()).hexdigest()


KEY_ID = re.compile(r"[a-z0-9]{4,32}")


def key_id_of(api_key: str) -> str | None:
    """The public id of a ``pgw_<id>_<secret>`` key; None for a key without one."""
    prefix, _, rest = api_key.partition("_")
    key_id, sep, secret = rest.partition("_")
    return key_id if prefix == "pgw" and sep and secret and KEY_ID.fullmatch(key_id) else None


# ---------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------


def load(path: Path, env: Mapping[str, str] | None = None) -> Settings:
    """Read and validate the TOML file; raise ConfigError with a one-line message."""
    env = os.environ if env is None else env
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: no such config file") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    return _Reader(path.resolve().parent, env).settings(raw)


_ALLOWED_TOP = {
    "server",
    "dispatcher",
    "retry",
    "adapters",
    "tenants",
    "simulators",
    "operators",
    "accounts",
    "console",
    "alerts",
    "privacy",
    "audit",
    "retention",
    "logging",
}
_RETRY_KEYS = {
    "first_delay_seconds": "first_delay",
    "multiplier": "multiplier",
    "cap_seconds": "cap",
    "jitter_seconds": "jitter",
    "max_attempts": "max_attempts",
    "max_age_hours": "max_age",
    "retry_after_cap_seconds": "retry_after_cap",
}
_VENDOR_KEYS = {
    "endpoint",
    "username",
    "password_file",
    "password_env",
    "institution",
    "connect_timeout_seconds",
    "read_timeout_seconds",
    "cert_file",
    "key_file",
    "ca_file",
    "options",
    "retry",
    "dev_certificates",
    "breaker",
    "max_in_flight",
    "rate_per_second",
    "opening_hours",
    "cutoff",
    "max_reply_bytes",
    "total_timeout_seconds",
}
_BREAKER_KEYS = {"window_seconds", "min_calls", "failure_rate", "open_seconds"}
_ALERT_KEYS = {
    "url",
    "secret_file",
    "secret_env",
    "no_progress_minutes",
    "timeout_seconds",
    "retry",
    "smtp",
}
_SMTP_KEYS = {"host", "port", "from", "to", "starttls", "username", "password_env"}
_MAILBOX = re.compile(r"[^@\s<>]+@[^@\s<>]+")


class _Reader:
    def __init__(self, base: Path, env: Mapping[str, str]) -> None:
        self.base = base
        self.env = env
        self.data_dir = base

    def settings(self, raw: dict[str, Any]) -> Settings:
        _no_unknown(raw, _ALLOWED_TOP, "")
        server = _table(raw, "server", "")
        _no_unknown(
            server,
            {
                "listen",
                "store",
                "store_pool_size",
                "data_dir",
                "max_body_bytes",
                "role",
                "tls_cert_file",
                "tls_key_file",
                "metrics_token_hash",
                "auth_failures_per_minute",
            },
            "server",
        )
        disp = _table(raw, "dispatcher", "")
        _no_unknown(
            disp,
            {
                "workers",
                "lease_seconds",
                "poll_seconds",
                "at_risk_check_seconds",
                "at_risk_margin_hours",
            },
            "dispatcher",
        )
        host, port = parse_listen(
            _get(server, "listen", str, "server", "127.0.0.1:8080"), "server.listen"
        )
        retry = self.retry(_table(raw, "retry", ""), "retry", RetryPolicy())
        adapters = _table(raw, "adapters", "")
        _no_unknown(adapters, {"disabled"}, "adapters")
        disabled = frozenset(_get(adapters, "disabled", list, "adapters", []))
        data_dir = self.path(_get(server, "data_dir", str, "server", "."))
        self.data_dir = data_dir
        lease = float(_positive(disp, "lease_seconds", (int, float), "dispatcher", 120))
        tenants = self.tenants(_table(raw, "tenants", ""), retry)
        check_deadlines(tenants, lease)
        cert, key = self.tls(server)
        return Settings(
            listen_host=host,
            listen_port=port,
            store_url=resolve_store_url(
                _get(server, "store", str, "server", "sqlite:///payroll-gateway.db"), self.base
            ),
            store_pool_size=_positive(server, "store_pool_size", int, "server", 10),
            data_dir=data_dir,
            max_body_bytes=_positive(server, "max_body_bytes", int, "server", 4 * 1024 * 1024),
            workers=_positive(disp, "workers", int, "dispatcher", 16),
            lease_seconds=lease,
            poll_seconds=float(_positive(disp, "poll_seconds", (int, float), "dispatcher", 0.2)),
            at_risk_check_seconds=float(
                _positive(disp, "at_risk_check_seconds", (int, float), "dispatcher", 30)
            ),
            at_risk_margin_seconds=3600.0
            * _positive(disp, "at_risk_margin_hours", (int, float), "dispatcher", 24),
            retry=retry,
            disabled_adapters=disabled,
            tenants=MappingProxyType(tenants),
            simulators=self.simulators(_table(raw, "simulators", "")),
            operators=MappingProxyType(self.operators(_table(raw, "operators", ""))),
            alerts=self.alerts(_table(raw, "alerts", "")),
            accounts=MappingProxyType(self.accounts(_table(raw, "accounts", ""))),
            session_hours=self.console(_table(raw, "console", "")),
            role=parse_role(_get(server, "role", str, "server", "all"), "server.role"),
            tls_cert_file=cert,
            tls_key_file=key,
            metrics_token_hash=_hash_or_none(server, "metrics_token_hash", "server"),
            auth_failures_per_minute=_positive(
                server, "auth_failures_per_minute", int, "server", 10
            ),
            data_keys=self.privacy(_table(raw, "privacy", "")),
            audit=self.audit(_table(raw, "audit", "")),
            keep_months=self.retention(_table(raw, "retention", "")),
            log_level=self.logging(_table(raw, "logging", "")),
        )

    def logging(self, raw: dict[str, Any]) -> str:
        """``[logging]``: ``level`` (DEBUG, INFO, WARNING, ERROR or CRITICAL; INFO by default)."""
        _no_unknown(raw, {"level"}, "logging")
        try:
            return parse_level(_get(raw, "level", str, "logging", "INFO"))
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc

    def privacy(self, raw: dict[str, Any]) -> DataKeys | None:
        """``[privacy]``: the current data key (``data_key_file`` or ``data_key_env``) and the
        older ones still needed to read what they sealed (``old_data_key_files``)."""
        _no_unknown(raw, {"data_key_file", "data_key_env", "old_data_key_files"}, "privacy")
        if "data_key_file" in raw and "data_key_env" in raw:
            raise ConfigError(
                "privacy.data_key_env: give either data_key_file or data_key_env, not both"
            )
        old = _get(raw, "old_data_key_files", list, "privacy", [])
        older = []
        for i, name in enumerate(old):
            if not isinstance(name, str):
                raise ConfigError(
                    f"privacy.old_data_key_files[{i}]: expected a file name, got {name!r}"
                )
            older.append(read_key_file(self.path(name), f"privacy.old_data_key_files[{i}]"))
        if "data_key_file" in raw:
            path = self.path(_get(raw, "data_key_file", str, "privacy", ""))
            return DataKeys(read_key_file(path, "privacy.data_key_file"), tuple(older), str(path))
        if "data_key_env" in raw:
            variable = _get(raw, "data_key_env", str, "privacy", "")
            if variable not in self.env:
                raise ConfigError(
                    f"privacy.data_key_env: environment variable {variable} is not set"
                )
            return DataKeys(
                parse_key(self.env[variable], "privacy.data_key_env"), tuple(older), f"${variable}"
            )
        if older:
            raise ConfigError(
                "privacy.old_data_key_files: also give the current key (data_key_file or data_key_env)"
            )
        return None

    def audit(self, raw: dict[str, Any]) -> AuditSettings:
        _no_unknown(raw, {"key_file", "key_env", "anchor_file", "anchor_every"}, "audit")
        if "key_file" in raw and "key_env" in raw:
            raise ConfigError("audit.key_file: give key_file or key_env, not both")
        key_file = self.path(_get(raw, "key_file", str, "audit", "")) if "key_file" in raw else None
        anchor = (
            self.path(_get(raw, "anchor_file", str, "audit", "")) if "anchor_file" in raw else None
        )
        return AuditSettings(
            key_file=key_file,
            key_env=_get(raw, "key_env", str, "audit", None),
            anchor_file=anchor,
            anchor_every=_positive(raw, "anchor_every", int, "audit", 1000),
        )

    def retention(self, raw: dict[str, Any]) -> int:
        _no_unknown(raw, {"keep_months"}, "retention")
        return int(_positive(raw, "keep_months", int, "retention", 13))

    def tls(self, server: dict[str, Any]) -> tuple[Path | None, Path | None]:
        """The listener's certificate chain and key: both or neither, and both readable files."""
        files = [
            self.path(_get(server, k, str, "server", "")) if k in server else None
            for k in ("tls_cert_file", "tls_key_file")
        ]
        if (files[0] is None) != (files[1] is None):
            missing = "tls_key_file" if files[1] is None else "tls_cert_file"
            raise ConfigError(
                f"server.{missing}: give both tls_cert_file and tls_key_file (or neither)"
            )
        for name, path in zip(("tls_cert_file", "tls_key_file"), files, strict=True):
            if path is not None and not path.is_file():
                raise ConfigError(f"server.{name}: no such file: {path}")
        return files[0], files[1]

    def operators(self, raw: dict[str, Any]) -> dict[str, Operator]:
        operators = {}
        for name, table in raw.items():
            where = f"operators.{name}"
            if not isinstance(table, dict):
                raise ConfigError(
                    f"{where}: must be a table with token_hash, role and municipalities"
                )
            _no_unknown(table, {"token_hash", "role", "municipalities"}, where)
            digest = _get(table, "token_hash", str, where, "")
            if not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
                raise ConfigError(
                    f"{where}.token_hash: expected 'sha256:<64 hex>' (payroll-gateway keys create)"
                )
            operators[name] = Operator(
                name, digest, _role(table, where), self.municipalities(table, where)
            )
        return operators

    def accounts(self, raw: dict[str, Any]) -> dict[str, Account]:
        from .console.passwords import valid_hash

        accounts = {}
        for name, table in raw.items():
            where = f"accounts.{name}"
            if not isinstance(table, dict):
                raise ConfigError(
                    f"{where}: must be a table with password_hash, role and municipalities"
                )
            if not ACCOUNT_NAME.fullmatch(name):
                raise ConfigError(f"{where}: a name is 1-64 letters, digits, '.', '_' or '-'")
            _no_unknown(table, {"password_hash", "role", "municipalities"}, where)
            digest = _get(table, "password_hash", str, where, "")
            if not valid_hash(digest):
                raise ConfigError(
                    f"{where}.password_hash: expected 'scrypt$...' (payroll-gateway hash-password)"
                )
            accounts[name] = Account(
                name, digest, _role(table, where), self.municipalities(table, where)
            )
        return accounts

    def console(self, raw: dict[str, Any]) -> float:
        _no_unknown(raw, {"session_hours"}, "console")
        return float(_positive(raw, "session_hours", (int, float), "console", 8))

    def municipalities(self, table: dict[str, Any], where: str) -> frozenset[str]:
        listed = _get(table, "municipalities", list, where, None)
        if not listed or not all(
            isinstance(m, str) and re.fullmatch(r"[0-9]{3}|\*", m) for m in listed
        ):
            raise ConfigError(
                f'{where}.municipalities: required, a list of 3-digit codes or ["*"] (all); '
                f"got {listed!r}"
            )
        return frozenset(listed)

    def alerts(self, raw: dict[str, Any]) -> AlertSettings:
        """``[alerts]``: url, secret_file/secret_env, no_progress_minutes, timeout_seconds,
        ``[alerts.retry]`` (the keys of ``[retry]``) and ``[alerts.smtp]``."""
        if "secret" in raw:
            raise ConfigError(
                "alerts.secret: secrets are not accepted inline; use secret_file or secret_env"
            )
        _no_unknown(raw, _ALERT_KEYS, "alerts")
        url: str | None = _get(raw, "url", str, "alerts", None)
        if url is not None and not re.fullmatch(r"https?://[^/\s?#]+(/\S*)?", url):
            raise ConfigError(f"alerts.url: expected an http(s) URL, got {url!r}")
        if "secret_file" in raw and "secret_env" in raw:
            raise ConfigError("alerts.secret_env: give either secret_file or secret_env, not both")
        secret = self.secret(raw, "alerts", "secret")
        if secret is not None and len(secret) < 16:
            given = "secret_file" if "secret_file" in raw else "secret_env"
            raise ConfigError(f"alerts.{given}: the secret must be at least 16 characters")
        smtp = self.smtp(_table(raw, "smtp", "alerts")) if "smtp" in raw else None
        return AlertSettings(
            url=url,
            secret=secret,
            no_progress_minutes=float(
                _positive(raw, "no_progress_minutes", (int, float), "alerts", 60)
            ),
            retry=self.retry(_table(raw, "retry", "alerts"), "alerts.retry", ALERT_RETRY),
            smtp=smtp,
            timeout=float(_positive(raw, "timeout_seconds", (int, float), "alerts", 10)),
        )

    def smtp(self, raw: dict[str, Any]) -> SmtpSettings:
        where = "alerts.smtp"
        if "password" in raw:
            raise ConfigError(
                f"{where}.password: secrets are not accepted inline; use password_env"
            )
        _no_unknown(raw, _SMTP_KEYS, where)
        host = _get(raw, "host", str, where, "")
        if not host:
            raise ConfigError(f"{where}.host: required, the SMTP server's host name")
        port = _positive(raw, "port", int, where, 25)
        if not 0 < port <= 65535:
            raise ConfigError(f"{where}.port: expected 1-65535, got {port!r}")
        sender = _get(raw, "from", str, where, "")
        if not _MAILBOX.fullmatch(sender):
            raise ConfigError(f"{where}.from: expected an e-mail address, got {sender!r}")
        to = _get(raw, "to", list, where, [])
        if not to or not all(isinstance(a, str) and _MAILBOX.fullmatch(a) for a in to):
            raise ConfigError(f"{where}.to: required, a list of e-mail addresses; got {to!r}")
        username = _get(raw, "username", str, where, None)
        password = self.secret(raw, where)
        if (username is None) != (password is None):
            raise ConfigError(f"{where}.username: give both username and password_env (or neither)")
        return SmtpSettings(
            host=host,
            port=port,
            sender=sender,
            to=tuple(to),
            starttls=_get(raw, "starttls", bool, where, False),
            username=username,
            password=password,
        )

    def path(self, value: str) -> Path:
        """Relative paths in the file are relative to the file's folder, never to the cwd."""
        p = Path(value)
        return p if p.is_absolute() else self.base / p

    def retry(self, raw: dict[str, Any], where: str, default: RetryPolicy) -> RetryPolicy:
        _no_unknown(raw, set(_RETRY_KEYS), where)
        values: dict[str, Any] = {}
        for key, attr in _RETRY_KEYS.items():
            if key in raw:
                number = _positive(raw, key, (int, float), where, 0)
                values[attr] = number * 3600.0 if key == "max_age_hours" else number
        policy = RetryPolicy(**{**_asdict(default), **values})
        if policy.first_delay > policy.cap:
            raise ConfigError(f"{where}.first_delay_seconds: larger than cap_seconds")
        return policy

    def tenants(self, raw: dict[str, Any], retry: RetryPolicy) -> dict[str, Tenant]:
        tenants: dict[str, Tenant] = {}
        for municipality, table in raw.items():
            where = f"tenants.{municipality}"
            if not re.fullmatch(r"[0-9]{3}", municipality):
                raise ConfigError(f"{where}: a municipality code is 3 digits (kommunekode)")
            if not isinstance(table, dict):
                raise ConfigError(f"{where}: must be a table")
            tenants[municipality] = self.tenant(municipality, table, where, retry)
        return tenants

    def tenant(
        self, municipality: str, raw: dict[str, Any], where: str, retry: RetryPolicy
    ) -> Tenant:
        _no_unknown(
            raw,
            {
                "name",
                "api_key_hashes",
                "api_keys",
                "revoked_key_ids",
                "routes",
                "vendors",
                "sources",
            },
            where,
        )
        hashes = _get(raw, "api_key_hashes", list, where, [])
        for i, h in enumerate(hashes):
            if not isinstance(h, str) or not re.fullmatch(r"sha256:[0-9a-f]{64}", h):
                raise ConfigError(
                    f"{where}.api_key_hashes[{i}]: expected 'sha256:<64 hex>' "
                    "(make one with: payroll-gateway keys create)"
                )
        routes = _table(raw, "routes", where)
        _no_unknown(routes, set(KINDS), f"{where}.routes")
        for kind, adapter in routes.items():
            if not isinstance(adapter, str):
                raise ConfigError(f"{where}.routes.{kind}: must be an adapter name")
        vendors_raw = _table(raw, "vendors", where)
        vendors, policies, endpoints = {}, {}, {}
        for name, table in vendors_raw.items():
            vwhere = f"{where}.vendors.{name}"
            if not isinstance(table, dict):
                raise ConfigError(f"{vwhere}: must be a table")
            vendors[name] = self.vendor(table, vwhere)
            policies[name] = self.retry(_table(table, "retry", vwhere), f"{vwhere}.retry", retry)
            endpoints[name] = self.endpoint(table, vwhere)
        return Tenant(
            municipality=municipality,
            name=_get(raw, "name", str, where, municipality),
            api_key_hashes=frozenset(hashes),
            routes=MappingProxyType(dict(routes)),
            vendors=MappingProxyType(vendors),
            retry=MappingProxyType(policies),
            endpoints=MappingProxyType(endpoints),
            sources=MappingProxyType(
                self.sources(_table(raw, "sources", where), f"{where}.sources", routes)
            ),
            api_keys=api_keys(raw, where),
            revoked_key_ids=revoked_key_ids(raw, where),
        )

    def sources(
        self, raw: dict[str, Any], where: str, routes: Mapping[str, Any]
    ) -> dict[str, PullSource]:
        sources = {}
        for name, table in raw.items():
            swhere = f"{where}.{name}"
            if name not in SOURCES:
                raise ConfigError(f"{swhere}: unknown pull source (known: {', '.join(SOURCES)})")
            if not isinstance(table, dict):
                raise ConfigError(f"{swhere}: must be a table")
            if "drive" not in routes:
                raise ConfigError(
                    f"{swhere}: the tenant has no route for drive reports (routes.drive)"
                )
            sources[name] = self.source(name, table, swhere)
        return sources

    def source(self, name: str, raw: dict[str, Any], where: str) -> PullSource:
        if "api_key" in raw:
            raise ConfigError(
                f"{where}.api_key: secrets are not accepted inline; use api_key_file or api_key_env"
            )
        _no_unknown(raw, _SOURCE_KEYS, where)
        base_url = _get(raw, "base_url", str, where, "")
        if not re.fullmatch(r"https?://[^/\s?#]+(/[^\s?#]*)?", base_url):
            raise ConfigError(f"{where}.base_url: expected an http(s) URL, got {base_url!r}")
        api_key = self.secret(raw, where, "api_key")
        if not api_key:
            raise ConfigError(f"{where}: give api_key_file or api_key_env (the source's ApiKey)")
        interval = _get(raw, "interval_seconds", (int, float), where, None)
        schedule = _get(raw, "schedule", str, where, None)
        if (interval is None) == (schedule is None):
            raise ConfigError(
                f"{where}.interval_seconds: give either interval_seconds or schedule (one of them)"
            )
        if interval is not None and interval <= 0:
            raise ConfigError(f"{where}.interval_seconds: must be positive, got {interval!r}")
        if schedule is not None and not _valid_cron(schedule):
            raise ConfigError(
                f"{where}.schedule: invalid cron expression {schedule!r}: expected 5 fields, "
                "e.g. '*/5 * * * *'"
            )
        return PullSource(
            kind=name,
            base_url=base_url if base_url.endswith("/") else base_url + "/",
            api_key=api_key,
            interval_seconds=float(interval) if interval is not None else None,
            schedule=schedule,
            connect_timeout=float(
                _positive(raw, "connect_timeout_seconds", (int, float), where, 5)
            ),
            read_timeout=float(_positive(raw, "read_timeout_seconds", (int, float), where, 30)),
        )

    def endpoint(self, raw: dict[str, Any], where: str) -> EndpointPolicy:
        braw = _table(raw, "breaker", where)
        _no_unknown(braw, _BREAKER_KEYS, f"{where}.breaker")
        bwhere = f"{where}.breaker"
        rate = float(_get(braw, "failure_rate", (int, float), bwhere, 0.5))
        if not 0 < rate <= 1:
            raise ConfigError(f"{bwhere}.failure_rate: must be above 0 and at most 1, got {rate}")
        breaker = BreakerPolicy(
            window_seconds=float(_positive(braw, "window_seconds", (int, float), bwhere, 60)),
            min_calls=_positive(braw, "min_calls", int, bwhere, 10),
            failure_rate=rate,
            open_seconds=float(_positive(braw, "open_seconds", (int, float), bwhere, 30)),
        )
        rate_limit = float(_get(raw, "rate_per_second", (int, float), where, 0))
        if rate_limit < 0:
            raise ConfigError(f"{where}.rate_per_second: must be 0 (no limit) or positive")
        cutoff = raw.get("cutoff")
        if cutoff is not None and not isinstance(cutoff, dict):
            raise ConfigError(f"{where}.cutoff: must be a table")
        return EndpointPolicy(
            breaker=breaker,
            max_in_flight=_positive(raw, "max_in_flight", int, where, 8),
            rate_per_second=rate_limit,
            opening_hours=_get(raw, "opening_hours", str, where, None),
            cutoff=MappingProxyType(dict(cutoff)) if cutoff else None,
        )

    def vendor(self, raw: dict[str, Any], where: str) -> VendorSettings:
        if "password" in raw:
            raise ConfigError(
                f"{where}.password: secrets are not accepted inline; use password_file or password_env"
            )
        _no_unknown(raw, _VENDOR_KEYS, where)
        files: dict[str, str] = {
            k: str(self.path(raw[k])) for k in ("cert_file", "key_file", "ca_file") if k in raw
        }
        if _get(raw, "dev_certificates", bool, where, False):
            files = self.dev_certificates(where, files)
        for key, value in files.items():
            if not Path(value).is_file():
                raise ConfigError(f"{where}.{key}: no such file: {value}")
        connect = float(_positive(raw, "connect_timeout_seconds", (int, float), where, 5))
        total = _get(raw, "total_timeout_seconds", (int, float), where, None)
        if total is not None and total <= connect:
            raise ConfigError(
                f"{where}.total_timeout_seconds: must be longer than connect_timeout_seconds "
                f"({connect:g}), got {total!r}"
            )
        return VendorSettings(
            endpoint=_get(raw, "endpoint", str, where, ""),
            username=_get(raw, "username", str, where, None),
            password=self.secret(raw, where),
            institution=_get(raw, "institution", str, where, None),
            connect_timeout=connect,
            read_timeout=float(_positive(raw, "read_timeout_seconds", (int, float), where, 30)),
            options=MappingProxyType(dict(_table(raw, "options", where))),
            max_reply_bytes=_positive(raw, "max_reply_bytes", int, where, DEFAULT_MAX_REPLY_BYTES),
            total_timeout=float(total) if total is not None else None,
            **files,
        )

    def dev_certificates(self, where: str, files: dict[str, str]) -> dict[str, str]:
        """Demo only: the client certificate and CA the built-in simulators trust."""
        if files:
            raise ConfigError(
                f"{where}.dev_certificates: give either dev_certificates or cert_file/key_file/ca_file"
            )
        from .devcerts import ensure_dev_certs

        certs = ensure_dev_certs(self.data_dir / "dev-certs")
        return {
            "cert_file": str(certs.client_cert),
            "key_file": str(certs.client_key),
            "ca_file": str(certs.ca_file),
        }

    def secret(self, raw: dict[str, Any], where: str, name: str = "password") -> str | None:
        """The secret ``name`` from ``<name>_file`` (relative to the config file) or ``<name>_env``."""
        file_key, env_key = f"{name}_file", f"{name}_env"
        if file_key in raw:
            path = self.path(_get(raw, file_key, str, where, ""))
            try:
                return path.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ConfigError(
                    f"{where}.{file_key}: cannot read {path}: {exc.strerror}"
                ) from exc
        if env_key in raw:
            variable = _get(raw, env_key, str, where, "")
            if variable not in self.env:
                raise ConfigError(f"{where}.{env_key}: environment variable {variable} is not set")
            return self.env[variable]
        return None

    def simulators(self, raw: dict[str, Any]) -> tuple[SimulatorSettings, ...]:
        sims = []
        for vendor, table in raw.items():
            where = f"simulators.{vendor}"
            if not isinstance(table, dict):
                raise ConfigError(f"{where}: must be a table")
            _no_unknown(
                table,
                {
                    "port",
                    "username",
                    "password_file",
                    "password_env",
                    "fail_rate",
                    "latency_ms",
                    "api_key_file",
                    "api_key_env",
                    "records",
                },
                where,
            )
            records = _get(table, "records", str, where, None)
            sims.append(
                SimulatorSettings(
                    vendor=vendor,
                    port=_positive(table, "port", int, where, 0),
                    username=_get(table, "username", str, where, None),
                    password=self.secret(table, where),
                    fail_rate=float(_get(table, "fail_rate", (int, float), where, 0.0)),
                    latency_ms=int(_get(table, "latency_ms", int, where, 0)),
                    api_key=self.secret(table, where, "api_key"),
                    records_file=self.path(records) if records is not None else None,
                )
            )
        return tuple(sims)


def api_keys(raw: dict[str, Any], where: str) -> tuple[ApiKey, ...]:
    """``api_keys = [{id = "…", hash = "sha256:…"}]``: ids unique within the tenant."""
    entries = _get(raw, "api_keys", list, where, [])
    keys: list[ApiKey] = []
    for i, entry in enumerate(entries):
        at = f"{where}.api_keys[{i}]"
        if not isinstance(entry, dict) or set(entry) != {"id", "hash"}:
            raise ConfigError(
                f'{at}: expected {{id = "…", hash = "sha256:…"}} (payroll-gateway keys create)'
            )
        if not isinstance(entry["id"], str) or not KEY_ID.fullmatch(entry["id"]):
            raise ConfigError(
                f"{at}.id: expected 4-32 lowercase letters or digits, got {entry['id']!r}"
            )
        if not isinstance(entry["hash"], str) or not _HASH.fullmatch(entry["hash"]):
            raise ConfigError(
                f"{at}.hash: expected 'sha256:<64 hex>' (payroll-gateway keys create)"
            )
        if any(k.id == entry["id"] for k in keys):
            raise ConfigError(f"{at}.id: {entry['id']!r} is listed twice")
        keys.append(ApiKey(entry["id"], entry["hash"]))
    return tuple(keys)


def revoked_key_ids(raw: dict[str, Any], where: str) -> frozenset[str]:
    revoked = _get(raw, "revoked_key_ids", list, where, [])
    for i, key_id in enumerate(revoked):
        if not isinstance(key_id, str) or not KEY_ID.fullmatch(key_id):
            raise ConfigError(f"{where}.revoked_key_ids[{i}]: expected a key id, got {key_id!r}")
    return frozenset(revoked)


def check_deadlines(tenants: Mapping[str, Tenant], lease_seconds: float) -> None:
    """A request that may outlast the lease could be sent twice by two dispatchers."""
    for municipality, tenant in tenants.items():
        for adapter, vendor in tenant.vendors.items():
            if vendor.deadline() >= lease_seconds:
                given = "" if vendor.total_timeout is not None else " (connect + read timeouts)"
                raise ConfigError(
                    f"tenants.{municipality}.vendors.{adapter}.total_timeout_seconds: {vendor.deadline():g} s"
                    f"{given} must be shorter than dispatcher.lease_seconds ({lease_seconds:g})"
                )


def _hash_or_none(raw: Mapping[str, Any], key: str, where: str) -> str | None:
    value: str | None = _get(raw, key, str, where, None)
    if value is not None and not _HASH.fullmatch(value):
        raise ConfigError(
            f"{where}.{key}: expected 'sha256:<64 hex>' (payroll-gateway keys create)"
        )
    return value


_HASH = re.compile(r"sha256:[0-9a-f]{64}")


def _valid_cron(expression: str) -> bool:
    from croniter import croniter

    return len(expression.split()) == 5 and bool(croniter.is_valid(expression))


def _asdict(policy: RetryPolicy) -> dict[str, Any]:
    return {name: getattr(policy, name) for name in policy.__slots__}


def _no_unknown(raw: Mapping[str, Any], allowed: set[str], where: str) -> None:
    for key in raw:
        if key not in allowed:
            prefix = f"{where}." if where else ""
            raise ConfigError(
                f"{prefix}{key}: unknown setting (allowed: {', '.join(sorted(allowed))})"
            )


def _table(raw: Mapping[str, Any], key: str, where: str) -> dict[str, Any]:
    value = raw.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{where + '.' if where else ''}{key}: must be a table")
    return value


def _role(table: dict[str, Any], where: str) -> str:
    """An operator's or an account's role. No default: a table written before roles existed
    must not silently become admin for all."""
    role = _get(table, "role", str, where, None)
    if role not in OPERATOR_ROLES:
        raise ConfigError(
            f"{where}.role: required, one of {', '.join(OPERATOR_ROLES)}; got {role!r}"
        )
    return str(role)


def _get(raw: Mapping[str, Any], key: str, kind: Any, where: str, default: Any) -> Any:
    if key not in raw:
        return default
    value = raw[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        names = " or ".join(k.__name__ for k in kind) if isinstance(kind, tuple) else kind.__name__
        raise ConfigError(f"{where + '.' if where else ''}{key}: expected {names}, got {value!r}")
    return value


def _positive(raw: Mapping[str, Any], key: str, kind: Any, where: str, default: Any) -> Any:
    value = _get(raw, key, kind, where, default)
    if value < 0 or (value == 0 and key not in ("port", "jitter_seconds")):
        raise ConfigError(f"{where + '.' if where else ''}{key}: must be positive, got {value!r}")
    return value


ROLES = ("intake", "dispatch", "all")


def parse_role(value: str, where: str) -> str:
    """One of :data:`ROLES`: what a ``serve`` process does (DESIGN.md §5)."""
    if value not in ROLES:
        raise ConfigError(f"{where}: {value!r} is not a role (intake, dispatch or all)")
    return value


def parse_listen(value: str, where: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{where}: expected HOST:PORT, got {value!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def resolve_store_url(url: str, base: Path) -> str:
    """Make a relative ``sqlite:///file.db`` relative to the config file's folder."""
    if url.startswith("sqlite:////") or not url.startswith("sqlite:///"):
        if not url.startswith(("sqlite:", "postgresql:", "postgres:")):
            raise ConfigError(
                f"server.store: unsupported store URL {url!r} (sqlite:/// or postgresql://)"
            )
        return url
    rel = url.removeprefix("sqlite:///")
    return "sqlite:///" + str((base / rel).resolve()) if rel != ":memory:" else url
