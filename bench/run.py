"""``make bench``: throughput, then the full-size reliability runs, as one markdown report.

Runs, in one process and one sitting (the machine is noisy: compare ratios within a run):
intake single vs batches of 100 and end-to-end delivery to SD (``bench.throughput``); the
kill -9 rounds (2000 reports, 5 rounds) and the fault soak (5000 reports)
(``bench.reliability``). Exits 1 when an invariant fails or a measurement had errors.

Usage, from the repository root: ``python bench/run.py [--quick]``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import reliability, throughput  # noqa: E402


async def run(quick: bool) -> tuple[str, bool]:
    scale = 0.1 if quick else 1.0
    began = time.monotonic()
    rates = await throughput.measure(scale=scale)
    kill = await reliability.kill_rounds(reports=300 if quick else 2000, rounds=3 if quick else 5)
    soak = await reliability.soak(reports=600 if quick else 5000)
    lines = [
        "# payroll-gateway bench",
        "",
        "## Throughput (one run)",
        "",
        throughput.table(rates),
        "",
    ]
    lines += [f"error: {e}" for e in rates.errors[:10]]
    lines += ["## Reliability", "", "| run | invariants | wall time |", "| --- | --- | ---: |"]
    for result in (kill, soak):
        held = sum(not p for p in result.invariants.values())
        lines.append(
            f"| {result.name} | {held}/{len(result.invariants)} hold | "
            f"{result.timings.get('total', 0):.1f} s |"
        )
    lines += ["", kill.format(), "", soak.format(), "", f"total {time.monotonic() - began:.0f} s"]
    return "\n".join(lines), kill.ok and soak.ok and not rates.errors


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="the short forms (about a minute)")
    args = parser.parse_args()
    reliability.quiet_simulator_logs()
    text, ok = asyncio.run(run(args.quick))
    print(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
