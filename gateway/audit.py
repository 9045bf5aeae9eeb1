"""The audit trail's hash chain: each event's hash covers the previous hash and its content.

A changed, removed or reordered event breaks the chain from that point; ``payroll-gateway
audit verify`` finds the first broken event.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any


def event_hash(prev_hash: str, at: float, actor: str, event: str,
               report_pk: int | None, delivery_id: int | None, detail: str) -> str:
    material = f"{prev_hash}|{at!r}|{actor}|{event}|{report_pk}|{delivery_id}|{detail}"
    return hashlib.sha256(material.encode()).hexdigest()


def verify_chain(events: Sequence[Mapping[str, Any]]) -> tuple[int, int | None]:
    """(number of events, id of the first broken one or None)."""
    prev = ""
    for e in events:
        expected = event_hash(prev, e["at"], e["actor"], e["event"], e["report_pk"],
                              e["delivery_id"], e["detail"])
        if e["prev_hash"] != prev or e["hash"] != expected:
            return len(events), int(e["id"])
        prev = e["hash"]
    return len(events), None
