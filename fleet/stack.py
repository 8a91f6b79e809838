"""A private fleet on free ports — Redis, the S3 server, workers, the API — started as real
processes. The tests and the benchmarks both run on it."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import requests

from fleet.local import redis_args
from fleet.processes import BIN, Server, free_port, port_open, wait_for
from tasks.settings import Settings


def settings_from_env(env: dict[str, str]) -> Settings:
    values: dict[str, Any] = {key.removeprefix("FLEET_").lower(): value for key, value in env.items()}
    return Settings(**values)


class RedisServer:
    """A Redis of our own, restartable on the same port and data directory."""

    def __init__(self, work_dir: Path, appendonly: bool = False):
        self.port = free_port()
        self.data = work_dir / f"redis-{self.port}"
        self.data.mkdir(parents=True, exist_ok=True)
        self.appendonly = appendonly
        self.work_dir = work_dir
        self.server: Server | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        args = redis_args(self.port, self.data, appendonly=self.appendonly)
        self.server = Server(f"redis-{self.port}", args, log_dir=self.work_dir).start()
        wait_for(lambda: port_open(self.port), 10, "redis", self.server.proc)
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None


def start_redis(work_dir: Path) -> tuple[RedisServer, str]:
    server = RedisServer(work_dir).start()
    return server, server.url


def s3_env(work_dir: Path) -> dict[str, str]:
    return {
        "FLEET_S3_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}",
        "FLEET_S3_BUCKET": "fleet-test-images",
        "FLEET_STATE_DIR": str(work_dir / "state"),
    }


class S3Server:
    """moto's S3 server with the bucket created, restartable on the same port. It keeps
    objects in memory: a restart empties it (and ``fleet s3`` creates the bucket again)."""

    def __init__(self, work_dir: Path, env: dict[str, str]):
        self.work_dir = work_dir
        self.env = env
        self.server: Server | None = None

    def start(self) -> S3Server:
        log = self.work_dir / "s3.log"
        marks = log.read_text().count("private bucket") if log.exists() else 0
        server = self.server = Server("s3", [str(BIN / "fleet"), "s3"], env=self.env, log_dir=self.work_dir).start()
        wait_for(lambda: server.log().count("private bucket") > marks, 30, "s3", server.proc)
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None


def start_s3(work_dir: Path, env: dict[str, str]) -> S3Server:
    return S3Server(work_dir, env).start()


def wait_answers(env: dict[str, str], name: str, server: Server, timeout_s: float = 180) -> None:
    """Until the worker ``name@...`` answers a Celery ping (it consumes from then on)."""
    from tasks.celery import make_celery

    app = make_celery(settings_from_env(env))
    try:
        wait_for(
            lambda: any(
                reply_host.startswith(f"{name}@")
                for reply in app.control.ping(timeout=0.5) or []
                for reply_host in reply
            ),
            timeout_s,
            name,
            server.proc,
        )
    finally:
        app.close()


def start_worker(
    env: dict[str, str], work_dir: Path, name: str, extra_args: tuple[str, ...] = (), timeout_s: float = 180
) -> Server:
    """A Celery worker; returns once it answers a ping, i.e. its model is loaded and warm
    (and compiled: allow minutes for that)."""
    args = [
        str(BIN / "celery"),
        "-A",
        "workers",
        "worker",
        "--loglevel",
        "INFO",
        "--hostname",
        f"{name}@%h",
        *extra_args,
    ]
    server = Server(name, args, env=env, log_dir=work_dir).start()
    wait_answers(env, name, server, timeout_s)
    return server


def start_slot_worker(env: dict[str, str], work_dir: Path, label: str) -> tuple[Server, str]:
    """``fleet worker``, as a user runs it: returns the worker and the name it chose."""
    server = Server(label, [str(BIN / "fleet"), "worker"], env=env, log_dir=work_dir).start()
    found: list[str] = []

    def named() -> bool:
        found[:] = re.findall(r"worker (\S+)@\S+: model .* ready", server.log())
        return bool(found)

    wait_for(named, 180, label, server.proc)
    wait_answers(env, found[0], server)
    return server, found[0]


def start_hooks(env: dict[str, str], work_dir: Path, name: str = "hooks") -> Server:
    """``fleet hooks``, named ``name@host``; returns once it answers a ping (it consumes)."""
    args = [str(BIN / "fleet"), "hooks", "--", "--hostname", f"{name}@%h"]
    server = Server(name, args, env=env, log_dir=work_dir).start()
    wait_answers(env, name, server, timeout_s=60)
    return server


def start_api(env: dict[str, str], work_dir: Path, workers: int = 1, name: str = "api") -> tuple[Server, str]:
    server = Server(name, [str(BIN / "fleet"), "web", "--workers", str(workers)], env=env, log_dir=work_dir).start()
    url = f"http://127.0.0.1:{env['FLEET_API_PORT']}"
    wait_for(lambda: requests.get(f"{url}/readyz", timeout=2).status_code == 200, 60, "api", server.proc)
    return server, url


RABBITMQ_SERVER = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")


def rabbitmq_available() -> bool:
    return RABBITMQ_SERVER.exists()


class RabbitMQ:
    """A RabbitMQ node of our own (Debian's ``rabbitmq-server``), restartable on the same
    port and data directory, so durable quorum queues survive a restart."""

    def __init__(self, work_dir: Path, consumer_timeout_s: int = 1800):
        self.port = free_port()
        self.base = work_dir / f"rabbitmq-{self.port}"
        self.base.mkdir(parents=True, exist_ok=True)
        (self.base / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.port}\n"
            f"consumer_timeout = {consumer_timeout_s * 1000}\n"
            "log.console = true\nlog.file = false\n"
        )
        (self.base / "enabled_plugins").write_text("[].\n")
        self.env = {
            "RABBITMQ_NODENAME": f"fleet{self.port}@localhost",
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(free_port()),
            "RABBITMQ_CONFIG_FILE": str(self.base / "rabbitmq"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.base / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(self.base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.base / "log"),
            "RABBITMQ_PID_FILE": str(self.base / "pid"),
        }
        self.server: Server | None = None
        self.work_dir = work_dir

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    def start(self) -> RabbitMQ:
        self.server = Server(f"rabbitmq-{self.port}", [str(RABBITMQ_SERVER)], env=self.env, log_dir=self.work_dir)
        self.server.start()
        wait_for(lambda: port_open(self.port), 90, "rabbitmq", self.server.proc)
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop(timeout_s=60)
            self.server = None
