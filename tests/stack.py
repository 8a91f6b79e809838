"""Test-only pieces of the fleet stack (``fleet.stack`` holds what benchmarks share with
the tests): a RabbitMQ node of our own, ``fleet worker`` and ``fleet hooks`` started as a
user starts them, and a Redis started in one call."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from fleet.processes import BIN, Server, free_port, port_open, wait_for
from fleet.stack import RedisServer, wait_answers


def start_redis(work_dir: Path) -> tuple[RedisServer, str]:
    server = RedisServer(work_dir).start()
    return server, server.url


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


def start_hooks(env: dict[str, str], work_dir: Path, name: str = "hooks", prefix: Sequence[str] = ()) -> Server:
    """``fleet hooks``, named ``name@host``; returns once it answers a ping (it consumes)."""
    args = [*prefix, str(BIN / "fleet"), "hooks", "--", "--hostname", f"{name}@%h"]
    server = Server(name, args, env=env, log_dir=work_dir).start()
    wait_answers(env, name, server, timeout_s=60)
    return server


RABBITMQ_SERVER = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")


def rabbitmq_available() -> bool:
    return RABBITMQ_SERVER.exists()


class RabbitMQ:
    """A RabbitMQ node of our own (Debian's ``rabbitmq-server``), restartable on the same
    port and data directory, so durable quorum queues survive a restart."""

    def __init__(self, work_dir: Path, consumer_timeout_s: int = 1800, host: str = "127.0.0.1"):
        self.host = host
        self.port = free_port()
        self.base = work_dir / f"rabbitmq-{self.port}"
        self.base.mkdir(parents=True, exist_ok=True)
        (self.base / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = {host}:{self.port}\n"
            f"consumer_timeout = {consumer_timeout_s * 1000}\n"
            "log.console = true\nlog.file = false\n"
            # guest may log in from other hosts than this one (the partition suite's).
            "loopback_users = none\n"
        )
        (self.base / "enabled_plugins").write_text("[].\n")
        self.env = {
            "RABBITMQ_NODENAME": f"fleet{self.port}@localhost",
            "RABBITMQ_NODE_IP_ADDRESS": host,
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
        return f"amqp://guest:guest@{self.host}:{self.port}//"

    def start(self) -> RabbitMQ:
        self.server = Server(f"rabbitmq-{self.port}", [str(RABBITMQ_SERVER)], env=self.env, log_dir=self.work_dir)
        self.server.start()
        wait_for(lambda: port_open(self.port, self.host), 90, "rabbitmq", self.server.proc)
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop(timeout_s=60)
            self.server = None
