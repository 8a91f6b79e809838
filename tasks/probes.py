"""Readiness a kubelet can read from a Celery worker: a file that exists while it consumes.

A Celery worker serves no API to ask. The GPU worker's metrics port answers from the
moment it binds, before its model is loaded, so it says the process lives, not that the
worker takes jobs. The ready file says that: it appears when the consumer starts (for the
GPU worker, after the engine's model is loaded and warm: ``workers.celery`` blocks in
``celeryd_after_setup`` until then) and goes when a warm shutdown begins. It is also
removed as the worker sets up, before anything else: a container restarted in the same
pod finds its predecessor's files in the pod's volume.

The file is ``$FLEET_STATE_DIR/ready/<name>``, where ``name`` is the worker's node name up
to the ``@`` (``worker0`` for ``fleet worker`` in slot 0, ``hooks`` for ``fleet hooks``);
a Kubernetes exec probe runs ``test -f`` on it (docs/KUBERNETES.md). As Cog's
``probes.py`` does for its predictor, nothing here can fail the worker: a file that
cannot be written is logged, and the probe then keeps the pod out of service.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from celery.signals import celeryd_after_setup, worker_ready, worker_shutting_down

from tasks.settings import get_settings

log = logging.getLogger(__name__)

READY_DIR = "ready"


def ready_file(state_dir: Path, nodename: str) -> Path:
    """Where the worker ``nodename`` (``worker0@host``) keeps its ready file."""
    return state_dir / READY_DIR / nodename.partition("@")[0]


def mark_ready(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    except OSError as exc:
        log.error("cannot write the ready file %s: %s (a readiness probe will fail)", path, exc)


def clear(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        log.error("cannot remove the ready file %s: %s", path, exc)


def _path(nodename: str) -> Path:
    return ready_file(get_settings().state_dir, nodename)


def _on_setup(sender: str = "", **_: Any) -> None:
    clear(_path(sender))


def _on_ready(sender: Any = None, **_: Any) -> None:
    mark_ready(_path(sender.hostname))


def _on_shutting_down(sender: str = "", **_: Any) -> None:
    clear(_path(sender))


def connect() -> None:
    """Keep this process's worker's ready file (the worker apps' factories call it)."""
    celeryd_after_setup.connect(_on_setup, weak=False, dispatch_uid="fleet-probes-setup")
    worker_ready.connect(_on_ready, weak=False, dispatch_uid="fleet-probes-ready")
    worker_shutting_down.connect(_on_shutting_down, weak=False, dispatch_uid="fleet-probes-stopping")
