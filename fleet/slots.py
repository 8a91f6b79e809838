"""One worker per GPU on a host: each ``fleet worker`` claims a slot.

A slot is a lock file under ``FLEET_STATE_DIR/worker-slots``, held (``flock``) for the
worker's whole life, so a second copy of the same command on the same host takes the next
free slot instead of colliding: slot ``N`` names the worker ``workerN@host``, serves its
metrics on ``FLEET_WORKER_METRICS_PORT + N`` and pins its engine to the host's ``N``-th
GPU. The lock dies with the process, so a crashed worker frees its slot at once.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

MAX_SLOTS = 64


class SlotTaken(Exception):
    pass


def claim_slot(directory: Path, wanted: int | None = None) -> tuple[int, int]:
    """Lock ``wanted`` (or the lowest free slot); returns the slot and the locked file
    descriptor, inheritable so the lock survives ``exec`` into Celery."""
    directory.mkdir(parents=True, exist_ok=True)
    for slot in [wanted] if wanted is not None else range(MAX_SLOTS):
        fd = os.open(directory / f"slot-{slot}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        os.set_inheritable(fd, True)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return slot, fd
    if wanted is not None:
        raise SlotTaken(f"slot {wanted} is taken by another worker on this host (lock: {directory})")
    raise SlotTaken(f"all {MAX_SLOTS} worker slots on this host are taken (locks: {directory})")
