"""A private fleet on free ports — Redis, the S3 server, workers, the API — started as real
processes. The tests and the benchmarks both run on it."""

from __future__ import annotations

import json
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import requests

from fleet.local import redis_args
from fleet.processes import BIN, Server, free_port, port_open, wait_for
from tasks.settings import Settings


def settings_from_env(env: dict[str, str]) -> Settings:
    """The settings a process started with ``env`` reads: a field of a complex type (a
    dict, as ``FLEET_QUEUE_POLICIES``) is JSON there, as pydantic-settings reads it."""
    values: dict[str, Any] = {}
    for key, value in env.items():
        name = key.removeprefix("FLEET_").lower()
        field = Settings.model_fields.get(name)
        complex_type = field is not None and typing.get_origin(field.annotation) is dict
        values[name] = json.loads(value) if complex_type else value
    return Settings(**values)


class RedisServer:
    """A Redis of our own, restartable on the same port and data directory."""

    def __init__(self, work_dir: Path, appendonly: bool = False, host: str = "127.0.0.1"):
        self.host = host
        self.port = free_port()
        self.data = work_dir / f"redis-{self.port}"
        self.data.mkdir(parents=True, exist_ok=True)
        self.appendonly = appendonly
        self.work_dir = work_dir
        self.server: Server | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def start(self) -> RedisServer:
        args = redis_args(self.port, self.data, appendonly=self.appendonly, host=self.host)
        self.server = Server(f"redis-{self.port}", args, log_dir=self.work_dir).start()
        wait_for(lambda: port_open(self.port, self.host), 10, "redis", self.server.proc)
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None


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
    env: dict[str, str],
    work_dir: Path,
    name: str,
    extra_args: tuple[str, ...] = (),
    timeout_s: float = 180,
    prefix: Sequence[str] = (),
) -> Server:
    """A Celery worker; returns once it answers a ping, i.e. its model is loaded and warm
    (and compiled: allow minutes for that). ``prefix`` runs it through another command (on
    another simulated host: ``ip netns exec <host>``)."""
    args = [
        *prefix,
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


def start_api(
    env: dict[str, str], work_dir: Path, workers: int = 1, name: str = "api", prefix: Sequence[str] = ()
) -> tuple[Server, str]:
    args = [*prefix, str(BIN / "fleet"), "web", "--workers", str(workers)]
    server = Server(name, args, env=env, log_dir=work_dir).start()
    url = f"http://{env.get('FLEET_API_HOST', '127.0.0.1')}:{env['FLEET_API_PORT']}"
    wait_for(lambda: requests.get(f"{url}/readyz", timeout=2).status_code == 200, 60, "api", server.proc)
    return server, url
