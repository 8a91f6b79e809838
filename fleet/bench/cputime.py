"""CPU seconds a process, a thread or a process tree has used, read from ``/proc``
(Linux only): what the fleet's own work takes from the cores the model runs on."""

from __future__ import annotations

import os
import time
from pathlib import Path

HZ = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int, tid: int | None = None) -> float:
    """User + system CPU seconds of a process (all its threads) or of one of its threads."""
    path = f"/proc/{pid}/task/{tid}/stat" if tid else f"/proc/{pid}/stat"
    fields = Path(path).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / HZ


def tree_cpu_s(pid: int) -> float:
    """A process and its live descendants (gunicorn's arbiter and its workers)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return cpu_s(pid) + sum(tree_cpu_s(int(child)) for child in children)


def fleet_cpu_s(pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds so far of a fleet's API (``pids["api"]`` and its workers) and Redis,
    and of this process (the load generator's client); empty where there is no /proc."""
    if not Path("/proc/self/stat").exists():
        return {}
    return {"api": tree_cpu_s(pids["api"]), "redis": cpu_s(pids["redis"]), "client": time.process_time()}
