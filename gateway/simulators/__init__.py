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
