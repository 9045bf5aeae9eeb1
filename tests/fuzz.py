"""Schemathesis against the app served on loopback: every operation of /openapi.json, with a
tenant key and an operator token, positive and negative cases, all checks.

``tests/test_fuzz.py`` runs a short pass in ``make test``; ``make fuzz`` runs a long one.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import MappingProxyType
from typing import Any

import hypothesis
import requests
import schemathesis
from aiohttp import web
from hypothesis import HealthCheck, Phase
from schemathesis import GenerationMode
from schemathesis.config import SchemathesisConfig

from adapters.base import VendorSettings
from gateway.app import create_app
from gateway.settings import EndpointPolicy, Operator, RetryPolicy, Settings, Tenant, hash_api_key

KEY, TOKEN = "fuzz-key-746", "fuzz-ops-token"
#: a schema-valid report may still break a rule no JSON Schema says: a cross-field rule (end
#: after start, 2 decimals), a text a vendor cannot carry, what the tenant's vendor needs, a
#: route the tenant lacks. Those are 422 by contract (DESIGN.md §3), so 422 is expected too.
#: and too many records is 413 naming the limit (DESIGN.md §3), a rejection like any 4xx.
CHECKS = {
    "positive_data_acceptance": {"expected-statuses": ["2xx", "401", "403", "404", "409", "422"]},
    "negative_data_rejection": {
        "expected-statuses": [
            "400",
            "401",
            "403",
            "404",
            "405",
            "406",
            "409",
            "413",
            "415",
            "422",
            "428",
            "429",
        ]
    },
}


def config(secret: str) -> SchemathesisConfig:
    """Checks as above; the credential given as configured auth, so that schemathesis knows
    it is sent (a negative case never counts on its absence)."""
    return SchemathesisConfig.from_dict(
        {"checks": CHECKS, "headers": {"Authorization": f"Bearer {secret}"}}
    )


def fuzz_settings(tmp: Path) -> Settings:
    vendor = VendorSettings(
        endpoint="http://127.0.0.1:9/none", username="u", password="p", institution="XY"
    )
    policy = EndpointPolicy(opening_hours="always")
    tenant = Tenant(
        municipality="746",
        name="Fuzz 746",
        api_key_hashes=frozenset({hash_api_key(KEY)}),
        routes=MappingProxyType({"drive": "sd-koersel"}),
        vendors=MappingProxyType({"sd-koersel": vendor}),
        retry=MappingProxyType({}),
        endpoints=MappingProxyType({"sd-koersel": policy}),
    )
    return Settings(
        store_url=f"sqlite:///{tmp / 'fuzz.db'}",
        data_dir=tmp,
        workers=1,
        lease_seconds=60,
        poll_seconds=0.05,
        retry=RetryPolicy(
            first_delay=1, multiplier=2, cap=2, jitter=0.0, max_attempts=2, max_age=60
        ),
        max_body_bytes=256 * 1024,
        tenants={"746": tenant},
        operators={"fuzz": Operator("fuzz", hash_api_key(TOKEN))},
        # the fuzzer is one client that sends bad credentials on purpose: the limit
        # on failed authentications (tested in test_auth.py) would turn its valid
        # requests into 429s
        auth_failures_per_minute=1_000_000,
    )


@contextmanager
def served(tmp: Path) -> Iterator[str]:
    """The gateway (no dispatcher: nothing is sent) on a loopback port, in a thread of its own."""
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(create_app(fuzz_settings(tmp), run_dispatcher=False), access_log=None)
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    port = runner.addresses[0][1]
    thread = threading.Thread(target=loop.run_forever, name="fuzzed-gateway", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.run_until_complete(runner.cleanup())
        loop.close()


def fuzz(tmp: Path, max_examples: int) -> dict[str, int]:
    """Run every operation in both generation modes; returns the cases run per operation.
    A 5xx or any check failing raises (schemathesis' own assertion, with the case to reproduce)."""
    counts: dict[str, int] = {}
    with served(tmp) as base, requests.Session() as session:
        doc = session.get(f"{base}/openapi.json", timeout=10).json()
        for secret, ops in ((KEY, False), (TOKEN, True)):
            schema = schemathesis.openapi.from_dict(doc, config=config(secret))
            for result in schema.get_all_operations():
                operation = result.ok()
                if operation.path.startswith("/v1/ops/") != ops:
                    continue
                headers = {"Authorization": f"Bearer {secret}"}
                for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                    label = f"{operation.label} {mode.value}"
                    counts[label] = 0
                    _run(operation, mode, base, session, headers, max_examples, counts, label)
    return counts


def _run(
    operation: Any,
    mode: GenerationMode,
    base: str,
    session: requests.Session,
    headers: dict[str, str],
    max_examples: int,
    counts: dict[str, int],
    label: str,
) -> None:
    @hypothesis.settings(
        max_examples=max_examples,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @hypothesis.given(case=operation.as_strategy(mode))
    def check(case: Any) -> None:
        counts[label] += 1
        case.call_and_validate(base_url=base, session=session, headers=headers, timeout=10)

    try:
        check()
    except hypothesis.errors.Unsatisfiable:
        if mode is GenerationMode.POSITIVE:
            raise
        # nothing to make invalid (no parameters, no body): no negative case exists


if __name__ == "__main__":
    import sys
    import tempfile

    examples = int(sys.argv[1]) if len(sys.argv) > 1 else 100
    with tempfile.TemporaryDirectory() as tmp:
        ran = fuzz(Path(tmp), examples)
    for name, n in sorted(ran.items()):
        print(f"{n:6d}  {name}")
    print(f"{sum(ran.values()):6d}  cases, 0 failures")
