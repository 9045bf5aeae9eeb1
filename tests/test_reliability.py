"""The reliability harness in its short form (``bench/reliability.py``; the full form is ``make bench``).

The gateway runs as a subprocess and is killed with SIGKILL mid-traffic, then restarted;
and it runs against simulators that fail 45 % of the requests. Every invariant the
harness checks must hold: see the module docstring of ``bench.reliability``.
"""

from __future__ import annotations

from pathlib import Path

from bench.reliability import kill_rounds, soak


async def test_kill_rounds_keep_every_invariant(tmp_path: Path) -> None:
    result = await kill_rounds(reports=300, rounds=3, seed=11, workdir=tmp_path, settle_within=40)
    assert result.ok, result.format()
    counts = result.counts
    assert counts["acknowledged"] == 300 and counts["stored without an acknowledgement"] == 0
    assert counts["states"].get("delivered", 0) > 0
    # the kills landed while deliveries were claimed: they were taken back at the next start
    assert counts["reclaimed at start"] + counts["in doubt"] > 0, result.format()


async def test_fault_soak_ends_every_delivery_delivered_or_failed(tmp_path: Path) -> None:
    result = await soak(reports=600, seed=12, workdir=tmp_path, settle_within=75)
    assert result.ok, result.format()
    assert set(result.counts["injected (Engangsydelser)"]) == {"server", "timeout", "reset"}
    assert sum(result.counts["states"].values()) == 600
