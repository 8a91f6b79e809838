"""The model calls of a fleet run, read back from its workers' logs: when each batch of
jobs finished and how far apart consecutive calls ended. At saturation the gap between the
ends of consecutive full calls is the time one call costs the fleet, gaps included, so
``images per call / mean gap`` is its steady-state throughput.

    python docs/bench/call_gaps.py docs/bench/gpu/fleet-logs.tgz

Jobs that finish within ``--within`` seconds of each other count as one call (a call's
jobs finish together, up to their uploads). Used for the GPU rows of docs/BENCHMARKS.md,
taken before `fleet bench` counted steady state in whole calls itself.
"""

from __future__ import annotations

import argparse
import re
import statistics
import tarfile
from datetime import datetime
from pathlib import Path

SUCCEEDED = re.compile(r"\[(\S+ \S+): INFO/MainProcess\] Task fleet\.generate\[.*\] succeeded in")


def worker_logs(source: Path) -> dict[str, str]:
    if source.suffix in (".tgz", ".gz"):
        with tarfile.open(source) as tar:
            return {
                Path(m.name).name: tar.extractfile(m).read().decode(errors="replace")
                for m in tar.getmembers()
                if m.isfile() and "-bench" in m.name
            }
    return {p.name: p.read_text(errors="replace") for p in sorted(source.glob("*-bench*.log"))}


def calls(log: str, within: float) -> list[tuple[float, int]]:
    """(end, jobs) of each call, in order."""
    ends = sorted(
        datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S,%f").timestamp() for m in map(SUCCEEDED.match, log.splitlines()) if m
    )
    groups: list[list[float]] = []
    for end in ends:
        if groups and end - groups[-1][-1] < within:
            groups[-1].append(end)
        else:
            groups.append([end])
    return [(group[-1], len(group)) for group in groups]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="FLEET_BENCH_LOGS directory or its .tgz")
    parser.add_argument("--within", type=float, default=0.15)
    args = parser.parse_args()
    print("| fleet (worker log) | calls (jobs each) | full calls | mean gap between full calls | images/s |")
    print("|---|---|---|---|---|")
    for name, log in sorted(worker_logs(args.source).items()):
        found = calls(log, args.within)
        if not found:
            continue
        full = max(jobs for _, jobs in found)
        gaps = [b[0] - a[0] for a, b in zip(found, found[1:], strict=False) if a[1] == full and b[1] == full]
        sizes = ", ".join(str(jobs) for _, jobs in found)
        if gaps:
            mean = statistics.fmean(gaps)
            print(f"| {name} | {sizes} | {full} | {mean * 1000:.0f} ms (n={len(gaps)}) | {full / mean:.2f} |")
        else:
            print(f"| {name} | {sizes} | {full} | – | – |")


if __name__ == "__main__":
    main()
