"""A private fleet on free ports — Redis, the S3 server, workers, the API — started as real
processes. The tests and the benchmarks both run on it."""

from __future__ import annotations

from pathlib import Path

import requests

from fleet.local import redis_args
from fleet.processes import BIN, Server, free_port, port_open, wait_for
from tasks.settings import Settings


def settings_from_env(env: dict[str, str]) -> Settings:
    return Settings(**{key.removeprefix("FLEET_").lower(): value for key, value in env.items()})


def start_redis(work_dir: Path) -> tuple[Server, str]:
    port = free_port()
    data = work_dir / f"redis-{port}"
    data.mkdir(parents=True, exist_ok=True)
    server = Server("redis", redis_args(port, data, appendonly=False), log_dir=work_dir).start()
    wait_for(lambda: port_open(port), 10, "redis", server.proc)
    return server, f"redis://127.0.0.1:{port}/0"


def s3_env(work_dir: Path) -> dict[str, str]:
    return {
        "FLEET_S3_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}",
        "FLEET_S3_BUCKET": "fleet-test-images",
        "FLEET_STATE_DIR": str(work_dir / "state"),
    }


def start_s3(work_dir: Path, env: dict[str, str]) -> Server:
    server = Server("s3", [str(BIN / "fleet"), "s3"], env=env, log_dir=work_dir).start()
    wait_for(lambda: "private bucket" in server.log(), 30, "s3", server.proc)
    return server


def start_worker(env: dict[str, str], work_dir: Path, name: str, extra_args: tuple[str, ...] = ()) -> Server:
    """A Celery worker; returns once it answers a ping, i.e. its model is loaded and warm."""
    from tasks.celery import make_celery

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
    app = make_celery(settings_from_env(env))
    try:
        wait_for(
            lambda: any(
                reply_host.startswith(f"{name}@") for reply in app.control.ping(timeout=0.5) for reply_host in reply
            ),
            180,
            name,
            server.proc,
        )
    finally:
        app.close()
    return server


def start_api(env: dict[str, str], work_dir: Path, workers: int = 1) -> tuple[Server, str]:
    server = Server("api", [str(BIN / "fleet"), "web", "--workers", str(workers)], env=env, log_dir=work_dir).start()
    url = f"http://127.0.0.1:{env['FLEET_API_PORT']}"
    wait_for(lambda: requests.get(f"{url}/readyz", timeout=2).status_code == 200, 60, "api", server.proc)
    return server, url
