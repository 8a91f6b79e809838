"""Fixtures that start the real fleet: Redis, the S3 server, a Celery worker with the tiny
pipeline, the API under gunicorn and Flower, each a process on a free port."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import redis
import requests

from tasks.settings import Settings
from tasks.storage import make_storage
from tasks.store import JobStore
from tests.servers import BIN, Server, free_port, port_open, wait_for



def settings_from_env(env: dict[str, str]) -> Settings:
    return Settings(**{key.removeprefix("FLEET_").lower(): value for key, value in env.items()})


@pytest.fixture(scope="session")
def work_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fleet")


@pytest.fixture(scope="session")
def redis_server(work_dir):
    from fleet.local import redis_args

    port = free_port()
    data = work_dir / "redis"
    data.mkdir()
    server = Server("redis", redis_args(port, data, appendonly=False), log_dir=work_dir).start()
    wait_for(lambda: port_open(port), 10, "redis", server.proc)
    yield f"redis://127.0.0.1:{port}/0"
    server.stop()


@pytest.fixture(scope="session")
def s3_env(work_dir) -> dict[str, str]:
    return {
        "FLEET_S3_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}",
        "FLEET_S3_BUCKET": "test-images",
        "FLEET_STATE_DIR": str(work_dir / "state"),
    }


@pytest.fixture(scope="session")
def s3_server(work_dir, s3_env):
    server = Server("s3", [str(BIN / "fleet"), "s3"], env=s3_env, log_dir=work_dir).start()
    wait_for(lambda: "private bucket" in server.log(), 30, "s3", server.proc)
    yield s3_env["FLEET_S3_ENDPOINT_URL"]
    server.stop()


@pytest.fixture(scope="session")
def tiny_model(work_dir) -> Path:
    target = work_dir / "tiny-model"
    subprocess.run([str(BIN / "fleet"), "model", "init", str(target)], check=True, capture_output=True)
    return target


@pytest.fixture(scope="session")
def fleet_env(redis_server, s3_server, s3_env, tiny_model) -> dict[str, str]:
    """The environment every fleet process of the test session runs with."""
    return {
        **s3_env,
        "FLEET_REDIS_URL": redis_server,
        "FLEET_MODEL": str(tiny_model),
        "FLEET_API_PORT": str(free_port()),
        "FLEET_FLOWER_PORT": str(free_port()),
        "FLEET_FLOWER_BASIC_AUTH": "tester:secret-pass",
        "FLEET_WORKER_METRICS_PORT": "0",
    }


@pytest.fixture(scope="session")
def settings(fleet_env) -> Settings:
    return settings_from_env(fleet_env)


@pytest.fixture(scope="session")
def redis_client(settings) -> redis.Redis:
    return redis.Redis.from_url(settings.redis_url)


@pytest.fixture(scope="session")
def store(redis_client, settings) -> JobStore:
    return JobStore(redis_client, ttl_s=settings.job_ttl_s)


@pytest.fixture(scope="session")
def storage(settings):
    return make_storage(settings)


def start_worker(env: dict[str, str], work_dir: Path, name: str, extra_args: tuple[str, ...] = ()) -> Server:
    from tasks.celery import make_celery

    args = [str(BIN / "celery"), "-A", "workers", "worker", "--loglevel", "INFO", "--hostname", f"{name}@%h", *extra_args]
    server = Server(name, args, env=env, log_dir=work_dir).start()
    app = make_celery(settings_from_env(env))
    wait_for(
        lambda: any(name in reply_host for reply in app.control.ping(timeout=0.5) for reply_host in reply),
        120,
        name,
        server.proc,
    )
    return server


@pytest.fixture(scope="session")
def worker_metrics_port() -> int:
    return free_port()


@pytest.fixture(scope="session")
def worker(fleet_env, work_dir, worker_metrics_port):
    env = {**fleet_env, "FLEET_WORKER_METRICS_PORT": str(worker_metrics_port), "FLEET_MAX_WAIT_MS": "200"}
    server = start_worker(env, work_dir, "test-worker")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def api_url(fleet_env, work_dir, worker) -> str:
    server = Server("api", [str(BIN / "fleet"), "web", "--workers", "1"], env=fleet_env, log_dir=work_dir).start()
    url = f"http://127.0.0.1:{fleet_env['FLEET_API_PORT']}"
    wait_for(lambda: requests.get(f"{url}/readyz", timeout=2).status_code == 200, 60, "api", server.proc)
    yield url
    server.stop()
