"""Local stand-ins for the vendors' endpoints, used by the demo, the tests and the benchmarks.

Each simulator module exposes ``build_app(options) -> aiohttp.web.Application`` and keeps
what it accepted on the app (``app[STATE]``) so tests can count deliveries.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class SimulatorOptions:
    host: str = "127.0.0.1"
    port: int = 0
    fail_rate: float = 0.0  # share of requests answered with an injected fault
    latency_ms: int = 0  # added before every answer
    fault: str | None = None  # a named fault kind forced on every request (simulator-specific)
    seed: int | None = None  # for reproducible fault injection
    # a mix of faults drawn per request, e.g. (("server", 0.3), ("timeout", 0.1), ("reset", 0.05))
    fault_mix: tuple[tuple[str, float], ...] = ()
    username: str | None = None  # Basic auth the simulator requires (SD)
    password: str | None = field(default=None, repr=False)
    # TLS (KMD): server certificate and key, and the CA that client certificates must chain to
    cert_file: str | None = None
    key_file: str | None = None
    client_ca_file: str | None = None
    # a source simulator (os2indberetning): the ApiKey it requires, and the records it starts with
    api_key: str | None = field(default=None, repr=False)
    records_file: str | None = None


def pick_fault(mix: tuple[tuple[str, float], ...], draw: float) -> str | None:
    """The kind whose cumulative share first exceeds ``draw`` (uniform in [0, 1)), or None."""
    total = 0.0
    for kind, share in mix:
        total += share
        if draw < total:
            return kind
    return None


def check_fault_mix(mix: tuple[tuple[str, float], ...], known: frozenset[str]) -> None:
    """Raise ValueError for an unknown kind, a share outside [0, 1], or shares above 1 in all."""
    for kind, share in mix:
        if kind not in known:
            raise ValueError(f"unknown fault {kind!r} in fault_mix; choose from {sorted(known)}")
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"fault_mix share of {kind!r} must be between 0 and 1, got {share}")
    if sum(share for _, share in mix) > 1.0 + 1e-9:
        raise ValueError("fault_mix: the shares add up to more than 1")
