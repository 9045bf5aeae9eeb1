"""Numbered schema migrations, applied in order at start-up (and by ``payroll-gateway migrate``).

Each migration is plain SQL in the subset SQLite and PostgreSQL share; where a type
differs, :func:`statements` translates it (one place). Times are epoch seconds (double
precision). CPR numbers live only in ``report_cprs`` (sealed with the data key since migration 7,
see ``gateway/privacy.py``); a version's body and an IND01 run's journalled bytes are sealed
too, in their own columns.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

from . import StoreError

MIGRATIONS: tuple[tuple[int, str, str], ...] = (
    (
        1,
        "initial schema",
        """
CREATE TABLE reports (
    id              INTEGER PRIMARY KEY,
    municipality    TEXT NOT NULL,
    report_id       TEXT NOT NULL,
    kind            TEXT NOT NULL,
    employee_key    TEXT NOT NULL,
    latest_version  INTEGER NOT NULL,
    created_at      DOUBLE PRECISION NOT NULL,
    UNIQUE (municipality, report_id)
);
CREATE TABLE report_versions (
    id              INTEGER PRIMARY KEY,
    report_pk       INTEGER NOT NULL REFERENCES reports(id),
    version         INTEGER NOT NULL,
    content_hash    TEXT NOT NULL,
    body            TEXT NOT NULL,
    received_at     DOUBLE PRECISION NOT NULL,
    UNIQUE (report_pk, version)
);
CREATE TABLE report_cprs (
    version_pk      INTEGER PRIMARY KEY REFERENCES report_versions(id),
    employee_cpr    TEXT NOT NULL,
    approved_by_cpr TEXT
);
CREATE TABLE deliveries (
    id              INTEGER PRIMARY KEY,
    version_pk      INTEGER NOT NULL REFERENCES report_versions(id),
    report_pk       INTEGER NOT NULL REFERENCES reports(id),
    municipality    TEXT NOT NULL,
    adapter         TEXT NOT NULL,
    employee_key    TEXT NOT NULL,
    version         INTEGER NOT NULL,
    status          TEXT NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at DOUBLE PRECISION NOT NULL,
    lease_owner     TEXT,
    lease_until     DOUBLE PRECISION,
    last_error      TEXT,
    vendor_reference TEXT,
    warning         TEXT,
    created_at      DOUBLE PRECISION NOT NULL,
    updated_at      DOUBLE PRECISION NOT NULL
);
CREATE INDEX deliveries_due ON deliveries (status, next_attempt_at);
CREATE INDEX deliveries_lane ON deliveries (municipality, adapter, employee_key, id);
CREATE INDEX deliveries_report ON deliveries (report_pk);
CREATE TABLE parts (
    report_pk       INTEGER NOT NULL REFERENCES reports(id),
    adapter         TEXT NOT NULL,
    part            TEXT NOT NULL,
    version         INTEGER NOT NULL,
    fields          TEXT NOT NULL,
    vendor_reference TEXT,
    updated_at      DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (report_pk, adapter, part)
);
CREATE TABLE attempts (
    id              INTEGER PRIMARY KEY,
    delivery_id     INTEGER NOT NULL REFERENCES deliveries(id),
    part            TEXT NOT NULL,
    operation       TEXT NOT NULL,
    message         TEXT NOT NULL,
    started_at      DOUBLE PRECISION NOT NULL,
    finished_at     DOUBLE PRECISION,
    outcome         TEXT,
    http_status     INTEGER,
    latency_ms      DOUBLE PRECISION,
    request_body    TEXT,
    response_body   TEXT,
    error           TEXT
);
CREATE INDEX attempts_delivery ON attempts (delivery_id, id);
CREATE TABLE audit_events (
    id              INTEGER PRIMARY KEY,
    at              DOUBLE PRECISION NOT NULL,
    actor           TEXT NOT NULL,
    event           TEXT NOT NULL,
    report_pk       INTEGER,
    delivery_id     INTEGER,
    detail          TEXT NOT NULL,
    prev_hash       TEXT NOT NULL,
    hash            TEXT NOT NULL
);
CREATE INDEX audit_delivery ON audit_events (delivery_id);
""",
    ),
    (
        2,
        "file runs (IND01): the journal that makes a run idempotent across a crash",
        """
CREATE TABLE file_runs (
    run_id          TEXT PRIMARY KEY,
    municipality    TEXT NOT NULL,
    adapter         TEXT NOT NULL,
    file            TEXT NOT NULL,
    offset_before   INTEGER NOT NULL,
    data            TEXT NOT NULL,
    first_line      INTEGER NOT NULL,
    header_lines    INTEGER NOT NULL,
    deliveries      TEXT NOT NULL,
    started_at      DOUBLE PRECISION NOT NULL,
    finished_at     DOUBLE PRECISION,
    outcome         TEXT
);
CREATE INDEX file_runs_open ON file_runs (file, finished_at);
""",
    ),
    (
        3,
        "delivery engine: endpoint controls, payroll cut-off and at-risk flag, retry clock",
        """
CREATE TABLE endpoint_controls (
    municipality    TEXT NOT NULL,
    adapter         TEXT NOT NULL,
    paused          INTEGER NOT NULL,
    reason          TEXT,
    actor           TEXT NOT NULL,
    updated_at      DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (municipality, adapter)
);
ALTER TABLE deliveries ADD COLUMN cutoff_at DOUBLE PRECISION;
ALTER TABLE deliveries ADD COLUMN at_risk INTEGER NOT NULL DEFAULT 0;
ALTER TABLE deliveries ADD COLUMN retry_since DOUBLE PRECISION;
CREATE INDEX deliveries_at_risk ON deliveries (at_risk, cutoff_at);
""",
    ),
    (
        4,
        "intake rejections: pulled records that were not accepted, recorded once per content",
        """
CREATE TABLE intake_rejections (
    id              INTEGER PRIMARY KEY,
    municipality    TEXT NOT NULL,
    source          TEXT NOT NULL,
    record_id       TEXT NOT NULL,
    content_hash    TEXT NOT NULL,
    kind            TEXT NOT NULL,
    errors          TEXT NOT NULL,
    first_seen_at   DOUBLE PRECISION NOT NULL,
    last_seen_at    DOUBLE PRECISION NOT NULL,
    times_seen      INTEGER NOT NULL DEFAULT 1,
    resolved_at     DOUBLE PRECISION,
    UNIQUE (municipality, source, record_id, content_hash)
);
CREATE INDEX intake_rejections_recent ON intake_rejections (municipality, first_seen_at);
""",
    ),
    (
        5,
        "work deferred to an endpoint's opening remembers when it was due, so it can be re-planned",
        """
ALTER TABLE deliveries ADD COLUMN deferred_from DOUBLE PRECISION;
""",
    ),
    (
        6,
        "circuit breaker openings are shared by every gateway process through the store",
        """
CREATE TABLE endpoint_breakers (
    municipality    TEXT NOT NULL,
    adapter         TEXT NOT NULL,
    open_until      DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (municipality, adapter)
);
""",
    ),
    (
        7,
        "CPR numbers sealed at rest, with a keyed lookup hash next to each (values stored before "
        "are sealed by the first start after this migration)",
        """
ALTER TABLE report_cprs ADD COLUMN employee_cpr_hash TEXT;
ALTER TABLE report_cprs ADD COLUMN approved_cpr_hash TEXT;
CREATE INDEX report_cprs_lookup ON report_cprs (employee_cpr_hash);
""",
    ),
    (
        8,
        "the audit trail proves itself (HMAC chain, re-chained once at start) and retention purges bodies",
        """
ALTER TABLE audit_events ADD COLUMN hmac TEXT;
CREATE TABLE audit_rechain (pending INTEGER NOT NULL);
INSERT INTO audit_rechain (pending) VALUES (1);
ALTER TABLE report_versions ADD COLUMN purged_at DOUBLE PRECISION;
""",
    ),
    (
        9,
        "read models: a delivery's payroll period, the sender's request id per version, indexes"
        " for newest-first lists filtered by municipality, employee, state, period, CPR, time",
        """
ALTER TABLE deliveries ADD COLUMN period TEXT;
ALTER TABLE report_versions ADD COLUMN request_id TEXT;
CREATE INDEX deliveries_municipality_id ON deliveries (municipality, id);
CREATE INDEX deliveries_employee_id ON deliveries (employee_key, id);
CREATE INDEX deliveries_status_id ON deliveries (status, id);
CREATE INDEX deliveries_period_id ON deliveries (period, id);
CREATE INDEX deliveries_version ON deliveries (version_pk);
CREATE INDEX deliveries_created ON deliveries (created_at);
CREATE INDEX attempts_finished ON attempts (finished_at);
""",
    ),
    (
        10,
        "alerts: one open alert per cause, and its notifications, retried like deliveries",
        """
CREATE TABLE alerts (
    id              INTEGER PRIMARY KEY,
    uid             TEXT NOT NULL UNIQUE,
    cause           TEXT NOT NULL,
    kind            TEXT NOT NULL,
    payload         TEXT NOT NULL,
    opened_at       DOUBLE PRECISION NOT NULL,
    updated_at      DOUBLE PRECISION NOT NULL,
    resolved_at     DOUBLE PRECISION
);
CREATE UNIQUE INDEX alerts_one_open ON alerts (cause) WHERE resolved_at IS NULL;
CREATE TABLE alert_notifications (
    id              INTEGER PRIMARY KEY,
    alert_id        INTEGER NOT NULL REFERENCES alerts(id),
    notice          TEXT NOT NULL,
    channel         TEXT NOT NULL,
    state           TEXT NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    created_at      DOUBLE PRECISION NOT NULL,
    next_attempt_at DOUBLE PRECISION NOT NULL,
    lease_owner     TEXT,
    lease_until     DOUBLE PRECISION,
    last_error      TEXT,
    finished_at     DOUBLE PRECISION,
    UNIQUE (alert_id, notice, channel)
);
CREATE INDEX alert_notifications_due ON alert_notifications (state, next_attempt_at);
""",
    ),
    (
        11,
        "console sessions: a hash of each signed-in browser's random token, its operator and expiry",
        """
CREATE TABLE console_sessions (
    token_hash      TEXT PRIMARY KEY,
    username        TEXT NOT NULL,
    created_at      DOUBLE PRECISION NOT NULL,
    expires_at      DOUBLE PRECISION NOT NULL
);
CREATE INDEX console_sessions_expiry ON console_sessions (expires_at);
""",
    ),
    (
        12,
        "lane heads: the first unfinished delivery of each employee lane, indexed by due time, "
        "so a claim reads as many rows as it claims whatever the backlog",
        """
CREATE TABLE lane_heads (
    municipality    TEXT NOT NULL,
    adapter         TEXT NOT NULL,
    employee_key    TEXT NOT NULL,
    delivery_id     INTEGER NOT NULL,
    status          TEXT NOT NULL,
    due_at          DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (municipality, adapter, employee_key)
);
CREATE UNIQUE INDEX lane_heads_delivery ON lane_heads (delivery_id);
CREATE INDEX lane_heads_due ON lane_heads (municipality, adapter, status, due_at, delivery_id);
CREATE INDEX deliveries_lane_open ON deliveries (municipality, adapter, employee_key, id)
    WHERE status IN ('failed','in_doubt','in_flight','queued','retry_scheduled');
INSERT INTO lane_heads (municipality, adapter, employee_key, delivery_id, status, due_at)
SELECT d.municipality, d.adapter, d.employee_key, d.id, d.status, d.next_attempt_at
FROM deliveries d WHERE d.id IN (
    SELECT MIN(e.id) FROM deliveries e
    WHERE e.status IN ('failed','in_doubt','in_flight','queued','retry_scheduled')
    GROUP BY e.municipality, e.adapter, e.employee_key
);
""",
    ),
)

LATEST = max(number for number, _, _ in MIGRATIONS)
SCHEMA_TABLE = (
    "CREATE TABLE IF NOT EXISTS schema_migrations "
    "(version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"
)


class SchemaTooNew(StoreError):
    """The database was migrated by a newer gateway: this one must not write to it."""


def check_version(found: int | None) -> None:
    """Refuse a database whose schema is newer than this code knows."""
    if found is not None and found > LATEST:
        raise SchemaTooNew(
            f"the store's schema is at version {found}, newer than this gateway's "
            f"version {LATEST}: run the newer payroll-gateway (a downgrade is not supported)"
        )


def pending(done: set[int]) -> list[tuple[int, str, str]]:
    """Not yet applied, by number (branches may list theirs out of order)."""
    return sorted(m for m in MIGRATIONS if m[0] not in done)


def applied_at() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S")


def statements(sql: str, engine: str) -> list[str]:
    """The statements of one migration, in the engine's dialect (``sqlite`` or ``postgresql``).

    PostgreSQL: an ``id INTEGER PRIMARY KEY`` is an identity column, and every integer is
    64-bit as in SQLite.
    """
    parts = [p.strip() for p in sql.split(";") if p.strip()]
    if engine == "sqlite":
        return parts
    return [
        _POSTGRES_INT.sub(
            "BIGINT",
            _POSTGRES_ID.sub(r"id\1BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY", p),
        )
        for p in parts
    ]


_POSTGRES_ID = re.compile(r"\bid(\s+)INTEGER PRIMARY KEY\b")
_POSTGRES_INT = re.compile(r"\bINTEGER\b")
