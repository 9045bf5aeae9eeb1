"""``make bench`` and ``make reliability``.

``python bench/run.py [--quick] [--only SCENARIO ...] [--no-readme]``: the performance
figures (``bench.perf``): results, chart and profile in ``bench/results/``, the table in
README.md's Performance section (full mode only). Exits 1 when a measurement failed.

``python bench/run.py --reliability [--quick]``: the kill -9 rounds (2000 reports, 5 rounds)
and the fault soak (5000 reports) of ``bench.reliability``, as one markdown report. Exits 1
when an invariant fails. Not part of ``make bench``: it takes longer than its 15 minutes allow.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import perf, reliability  # noqa: E402


async def run_reliability(quick: bool) -> tuple[str, bool]:
    began = time.monotonic()
    kill = await reliability.kill_rounds(reports=300 if quick else 2000, rounds=3 if quick else 5)
    soak = await reliability.soak(reports=600 if quick else 5000)
    lines = ["# payroll-gateway reliability", "", "| run | invariants | wall time |"]
    lines.append("| --- | --- | ---: |")
    for result in (kill, soak):
        held = sum(not p for p in result.invariants.values())
        lines.append(
            f"| {result.name} | {held}/{len(result.invariants)} hold | "
            f"{result.timings.get('total', 0):.1f} s |"
        )
    lines += ["", kill.format(), "", soak.format(), "", f"total {time.monotonic() - began:.0f} s"]
    return "\n".join(lines), kill.ok and soak.ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reliability", action="store_true", help="the kill -9 and soak runs")
    parser.add_argument("--quick", action="store_true", help="the short forms")
    args, rest = parser.parse_known_args()
    if args.reliability:
        reliability.quiet_simulator_logs()
        text, ok = asyncio.run(run_reliability(args.quick))
        print(text)
        return 0 if ok else 1
    return perf.main([*rest, *(["--quick"] if args.quick else [])])


if __name__ == "__main__":
    sys.exit(main())
