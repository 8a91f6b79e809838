"""The ready file Kubernetes' exec probes read (tasks/probes.py): there while a worker
consumes, gone before it starts and once a warm shutdown begins."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fleet.processes import BIN, Server, free_port, wait_for
from fleet.stack import wait_answers
from tasks.probes import clear, mark_ready, ready_file
from tests.stack import start_redis

#: The worker's engine start: sim calls are instant, and it loads no torch model.
SIM_MODEL = "sim:a=0.001,b=0.001"


def test_ready_file_is_named_after_the_node():
    """One file per worker on a host: its node name before the @."""
    assert ready_file(Path("/var/lib/fleet"), "worker0@fleet-worker-7d9f").as_posix() == (
        "/var/lib/fleet/ready/worker0"
    )
    assert ready_file(Path("state"), "hooks@pod").as_posix() == "state/ready/hooks"


def test_mark_and_clear(tmp_path):
    path = ready_file(tmp_path, "worker3@host")
    mark_ready(path)
    assert path.is_file()
    clear(path)
    assert not path.exists()
    clear(path)  # gone already: no error


def test_a_file_that_cannot_be_written_does_not_fail_the_worker(tmp_path, caplog):
    blocker = tmp_path / "state"
    blocker.write_text("a file where the state directory should be")
    mark_ready(ready_file(blocker, "worker0@host"))
    assert "cannot write the ready file" in caplog.text


PROBE_HANDLERS = """
import sys
from celery.signals import celeryd_after_setup, worker_ready, worker_shutting_down
from tasks import probes
from tasks.settings import get_settings
import {module} as worker

def connected():
    return [handler in [r for _, r in signal.receivers] for signal, handler in (
        (celeryd_after_setup, probes._on_setup),
        (worker_ready, probes._on_ready),
        (worker_shutting_down, probes._on_shutting_down),
    )]

print(connected())  # importing the module connects nothing
worker.app  # what `celery -A` asks for
print(connected())
"""


@pytest.mark.parametrize("module", ["workers.celery", "tasks.webhook_worker"])
def test_the_worker_apps_connect_the_probe_handlers_when_made_not_when_imported(module):
    """Both worker apps keep their ready file (the GPU worker and `fleet hooks`), and only
    once made: an import configures nothing."""
    out = subprocess.run(
        [sys.executable, "-c", PROBE_HANDLERS.format(module=module)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[:2] == ["[False, False, False]", "[True, True, True]"]


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    server, url = start_redis(tmp_path_factory.mktemp("probes-redis"))
    yield url
    server.stop()


def _env(tmp_path, redis_url: str, **extra: str) -> dict[str, str]:
    return {
        "FLEET_REDIS_URL": redis_url,
        "FLEET_STATE_DIR": str(tmp_path / "state"),
        "FLEET_S3_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}",  # never reached: no job runs
        "FLEET_WORKER_METRICS_PORT": str(free_port()),
        **extra,
    }


@pytest.mark.e2e
def test_gpu_worker_ready_while_consuming_and_not_after_sigterm(tmp_path, redis_url):
    """`fleet worker` (slot 0, as in a pod): a stale file from a previous container is
    removed at start, the file appears once the worker consumes, and goes on SIGTERM."""
    env = _env(tmp_path, redis_url, FLEET_MODEL=SIM_MODEL)
    path = ready_file(tmp_path / "state", "worker0@host")
    mark_ready(path)
    stale = path.stat().st_mtime_ns
    time.sleep(0.01)
    worker = Server("worker", [str(BIN / "fleet"), "worker"], env=env, log_dir=tmp_path).start()
    try:
        wait_answers(env, "worker0", worker, timeout_s=120)
        wait_for(lambda: path.is_file() and path.stat().st_mtime_ns != stale, 10, "ready file", worker.proc)
        worker.signal(signal.SIGTERM)
        assert worker.proc.wait(60) == 0
        assert not path.exists(), "a stopping worker is not ready"
    finally:
        worker.stop()


@pytest.mark.e2e
def test_worker_whose_engine_cannot_start_is_never_ready(tmp_path, redis_url):
    """Exit status 3 (no engine), and the stale ready file of the last container is gone."""
    env = _env(tmp_path, redis_url, FLEET_MODEL="sim:profile=no-such-profile")  # fails fast, no torch
    path = ready_file(tmp_path / "state", "worker0@host")
    mark_ready(path)
    worker = Server("worker", [str(BIN / "fleet"), "worker"], env=env, log_dir=tmp_path).start()
    try:
        assert worker.proc.wait(120) == 3, worker.log()[-2000:]
        assert not path.exists()
    finally:
        worker.stop()


@pytest.mark.e2e
def test_hooks_worker_ready_while_consuming(tmp_path, redis_url):
    env = _env(tmp_path, redis_url)
    path = ready_file(tmp_path / "state", "hooks@host")
    hooks = Server("hooks", [str(BIN / "fleet"), "hooks"], env=env, log_dir=tmp_path).start()
    try:
        wait_answers(env, "hooks", hooks, timeout_s=60)
        wait_for(path.is_file, 10, "ready file", hooks.proc)
        hooks.signal(signal.SIGTERM)
        assert hooks.proc.wait(30) == 0
        assert not path.exists()
    finally:
        hooks.stop()
