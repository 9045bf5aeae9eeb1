"""The audit trail that proves itself: an HMAC chain, attempt seals and an anchored head.

Each event carries ``hmac = HMAC-SHA256(key, previous hmac + "\\n" + canonical event)``
with a key kept outside the database, so an edited, removed, reordered or forged event
breaks the chain. Attempt rows are covered by *seals* (a digest of the row, with the SHA-256
of its bodies rather than the bodies) in the events that finish or change them, so a purge
may drop the bodies and the chain still verifies. The head (event id + HMAC) is appended
to an append-only anchor file; a trail shorter than an anchored head was truncated.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

log = logging.getLogger(__name__)

#: the key of a store opened without one: tests and read-only tools only (the app and the
#: command line always pass the configured key)
UNKEYED = b"payroll-gateway: unkeyed chain (tests only)"
KEY_BYTES = 32
PURGE_EVENT = "retention.purged"


@dataclass(frozen=True, slots=True)
class AuditSettings:
    """``[audit]``: where the HMAC key and the anchor file live."""

    key_file: Path | None = None  # neither file nor env: ``<data_dir>/audit.key``, generated once
    key_env: str | None = None
    anchor_file: Path | None = None  # None: ``<data_dir>/audit-anchor.jsonl``
    anchor_every: int = 1000  # events between two anchors (and one at shutdown)


@dataclass(frozen=True, slots=True)
class Problem:
    """The first thing ``audit verify`` found wrong (``event_id`` None: no event to name)."""

    event_id: int | None
    reason: str

    def __str__(self) -> str:
        where = f"event {self.event_id}" if self.event_id is not None else "the trail"
        return f"audit trail broken at {where}: {self.reason}"


# -- the chain ---------------------------------------------------------------------------


def canonical(
    event_id: int,
    at: float,
    actor: str,
    event: str,
    report_pk: int | None,
    delivery_id: int | None,
    detail: str,
) -> str:
    return _CANONICAL([event_id, at, actor, event, report_pk, delivery_id, detail])


#: ``json.dumps(..., separators=(",", ":"), ensure_ascii=True)`` without building an encoder
#: per call (the same text: ``dumps`` is exactly this)
_CANONICAL = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True).encode


def event_hmac(
    key: bytes,
    prev: str,
    event_id: int,
    at: float,
    actor: str,
    event: str,
    report_pk: int | None,
    delivery_id: int | None,
    detail: str,
) -> str:
    material = prev + "\n" + canonical(event_id, at, actor, event, report_pk, delivery_id, detail)
    return hmac.new(key, material.encode(), hashlib.sha256).hexdigest()


def row_hmac(key: bytes, prev: str, e: Mapping[str, Any]) -> str:
    return event_hmac(
        key,
        prev,
        int(e["id"]),
        e["at"],
        e["actor"],
        e["event"],
        e["report_pk"],
        e["delivery_id"],
        e["detail"],
    )


def legacy_hash(prev_hash: str, e: Mapping[str, Any]) -> str:
    """The unkeyed SHA-256 chain of schema versions before 7 (checked once, when re-chained)."""
    material = (
        f"{prev_hash}|{e['at']!r}|{e['actor']}|{e['event']}|{e['report_pk']}|"
        f"{e['delivery_id']}|{e['detail']}"
    )
    return hashlib.sha256(material.encode()).hexdigest()


def legacy_broken(events: Sequence[Mapping[str, Any]]) -> int | None:
    prev = ""
    for e in events:
        if e["prev_hash"] != prev or e["hash"] != legacy_hash(prev, e):
            return int(e["id"])
        prev = e["hash"]
    return None


def chain_problem(events: Sequence[Mapping[str, Any]], key: bytes) -> Problem | None:
    """The first event whose link or HMAC is wrong."""
    prev, last_id = "", 0
    for e in events:
        if int(e["id"]) <= last_id:
            return Problem(int(e["id"]), "out of order")
        if e["prev_hash"] != prev:
            return Problem(
                int(e["id"]),
                "its link to the previous event is wrong "
                "(an event before it was removed, moved or changed)",
            )
        if not e["hmac"] or not hmac.compare_digest(e["hmac"], row_hmac(key, prev, e)):
            return Problem(
                int(e["id"]), "its HMAC does not match (edited, or written without the key)"
            )
        prev, last_id = e["hmac"], int(e["id"])
    return None


def verify_chain(
    events: Sequence[Mapping[str, Any]], key: bytes = UNKEYED
) -> tuple[int, int | None]:
    """(number of events, id of the first broken one or None): the chain alone."""
    problem = chain_problem(events, key)
    return len(events), None if problem is None else problem.event_id


# -- attempts ----------------------------------------------------------------------------


def body_sha256(body: str | None) -> str | None:
    return None if body is None else hashlib.sha256(body.encode()).hexdigest()


def attempt_digest(
    a: Mapping[str, Any], request_sha256: str | None, response_sha256: str | None
) -> str:
    fields = [
        a["id"],
        a["delivery_id"],
        a["part"],
        a["operation"],
        a["message"],
        a["started_at"],
        a["finished_at"],
        a["outcome"],
        a["http_status"],
        a["latency_ms"],
        a["error"],
        request_sha256,
        response_sha256,
    ]
    return hashlib.sha256(json.dumps(fields, separators=(",", ":")).encode()).hexdigest()


def seal(a: Mapping[str, Any]) -> dict[str, Any]:
    """What an event records of an attempt row: its digest and its bodies' SHA-256."""
    request, response = body_sha256(a["request_body"]), body_sha256(a["response_body"])
    return {
        "id": int(a["id"]),
        "digest": attempt_digest(a, request, response),
        "request_sha256": request,
        "response_sha256": response,
    }


def seals_in(
    events: Iterable[Mapping[str, Any]],
) -> tuple[dict[int, tuple[int, dict[str, Any]]], set[int]]:
    """The latest seal of each attempt (with the id of its event), and the purged deliveries."""
    latest: dict[int, tuple[int, dict[str, Any]]] = {}
    purged: set[int] = set()
    for e in events:
        detail = json.loads(e["detail"]) if isinstance(e["detail"], str) else e["detail"]
        if not isinstance(detail, dict):
            continue
        for s in ([detail["attempt"]] if isinstance(detail.get("attempt"), dict) else []) + list(
            detail.get("attempts_sealed") or []
        ):
            latest[int(s["id"])] = (int(e["id"]), s)
        if e["event"] == PURGE_EVENT:
            purged.update(int(d) for d in detail.get("deliveries", []))
    return latest, purged


def attempt_problem(
    events: Sequence[Mapping[str, Any]], attempts: Sequence[Mapping[str, Any]]
) -> Problem | None:
    """An attempt row that differs from its seal, has none though finished, or is missing."""
    latest, purged = seals_in(events)
    found: list[Problem] = []
    rows = {int(a["id"]): a for a in attempts}
    for attempt_id, (event_id, s) in latest.items():
        a = rows.get(attempt_id)
        if a is None:
            found.append(Problem(event_id, f"attempt {attempt_id} it seals is missing"))
            continue
        request, response = body_sha256(a["request_body"]), body_sha256(a["response_body"])
        if int(a["delivery_id"]) in purged:  # bodies may be gone: the seal keeps their hashes
            request = s["request_sha256"] if a["request_body"] is None else request
            response = s["response_sha256"] if a["response_body"] is None else response
        if attempt_digest(a, request, response) != s["digest"]:
            found.append(Problem(event_id, f"attempt {attempt_id} differs from its seal"))
    for attempt_id, a in rows.items():
        if attempt_id not in latest and a["finished_at"] is not None:
            found.append(Problem(None, f"attempt {attempt_id} is finished but no event seals it"))
    return min(found, key=lambda p: (p.event_id is None, p.event_id or 0), default=None)


# -- the anchor --------------------------------------------------------------------------


def anchor_path(settings: AuditSettings, data_dir: Path) -> Path:
    return settings.anchor_file or data_dir / "audit-anchor.jsonl"


def append_anchor(path: Path, event_id: int, mac: str, now: float | None = None) -> None:
    """Append one head to the anchor file (opened for appending only, synced)."""
    line = json.dumps({"at": time.time() if now is None else now, "id": event_id, "hmac": mac})
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, (line + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    log.info("audit head anchored: event %d hmac %s", event_id, mac)


def read_anchors(path: Path) -> list[tuple[int, str]]:
    if not path.exists():
        return []
    anchors = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            anchors.append((int(entry["id"]), str(entry["hmac"])))
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{path}: line {n} is not an audit anchor") from exc
    return anchors


def anchor_problem(
    events: Sequence[Mapping[str, Any]], anchors: Sequence[tuple[int, str]]
) -> Problem | None:
    """An anchored head the trail no longer holds: truncated, or rewritten."""
    macs = {int(e["id"]): e["hmac"] for e in events}
    last = max(macs, default=0)
    for event_id, mac in sorted(anchors):
        if event_id > last:
            return Problem(
                last + 1,
                f"truncated: the anchored head is event {event_id}, "
                f"the trail ends at {last or 'nothing'}",
            )
        if macs.get(event_id) != mac:
            return Problem(event_id, "differs from the anchored head (removed or rewritten)")
    return None


def verify(
    events: Sequence[Mapping[str, Any]],
    attempts: Sequence[Mapping[str, Any]],
    key: bytes,
    anchors: Sequence[tuple[int, str]],
) -> Problem | None:
    """The first problem of the trail: chain, then anchor, then attempts."""
    return (
        chain_problem(events, key)
        or anchor_problem(events, anchors)
        or attempt_problem(events, attempts)
    )


# -- the key -----------------------------------------------------------------------------


@dataclass(slots=True)
class _Generated:
    paths: set[Path] = field(default_factory=set)


_generated = _Generated()


def load_key(
    settings: AuditSettings,
    data_dir: Path,
    env: Mapping[str, str] | None = None,
    *,
    create: bool = True,
) -> bytes:
    """The HMAC key: from ``key_env``, ``key_file``, or ``<data_dir>/audit.key`` (generated
    with mode 0600 when absent and ``create``). Never logged."""
    env = os.environ if env is None else env
    if settings.key_env is not None:
        value = env.get(settings.key_env, "")
        if len(value) < 16:
            raise ConfigError(
                f"audit.key_env: the environment variable {settings.key_env} is not set "
                "(or shorter than 16 characters)"
            )
        return value.encode()
    path = settings.key_file or data_dir / "audit.key"
    if settings.key_file is None and create and not path.exists():
        _generate(path)
    try:
        key = path.read_bytes().strip()
    except OSError as exc:
        raise ConfigError(
            f"audit.key_file: cannot read the audit key {path}: {exc.strerror}"
        ) from exc
    if len(key) < 16:
        raise ConfigError(f"audit.key_file: the audit key {path} is shorter than 16 bytes")
    return key


def _generate(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process made it first: use theirs
        return
    try:
        os.write(fd, os.urandom(KEY_BYTES).hex().encode() + b"\n")
    finally:
        os.close(fd)
    if path not in _generated.paths:
        _generated.paths.add(path)
        log.warning(
            "generated a new audit key at %s (mode 0600): keep it outside the database "
            "and back it up; set [audit] key_file or key_env in production",
            path,
        )


class Anchor:
    """Appends the trail's head to the anchor file every ``every`` events, and when asked
    (at start and at shutdown); ``head`` reads the store's (id, HMAC) of the last event."""

    def __init__(
        self, path: Path, every: int, head: Callable[[], Awaitable[tuple[int, str] | None]]
    ) -> None:
        self.path, self.every, self.head = path, every, head
        anchors = read_anchors(path)
        self.last = anchors[-1][0] if anchors else 0

    async def check(self, *, force: bool = False) -> None:
        head = await self.head()
        if head is None or head[0] == self.last or (not force and head[0] - self.last < self.every):
            return
        await asyncio.to_thread(append_anchor, self.path, head[0], head[1])
        self.last = head[0]

    async def run(self, interval: float = 5.0) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.check()
            except Exception as exc:  # noqa: BLE001 - logged; the next round tries again
                log.error("could not anchor the audit head: %s", exc)
