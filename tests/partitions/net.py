"""Simulated hosts for the partition suite: each host a network namespace, joined by a veth
pair to the root namespace, where Redis, RabbitMQ and the S3 server listen on an address of
their own (``Network.service_ip``, on the loopback device). A test cuts, slows or makes
lossy one host's link while the others go on.

A cut drops packets silently (an nftables rule inside the host), as most real partitions
look: taking the link down instead answers "no route to host" at once, which every client
handles. Delay and half-open connections come from ``tests.partitions.proxy`` (the kernel
here has no netem).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from collections.abc import Sequence

NFT_TABLE = "partition"


def unavailable() -> str | None:
    """Why this machine cannot make hosts, or None when it can."""
    if os.geteuid() != 0:
        return "network namespaces need root (CI runs as root)"
    for tool in ("ip", "nft", "tc"):
        if shutil.which(tool) is None:
            return f"'{tool}' is not installed (apt-get install iproute2 nftables)"
    return None


def run(*args: str, stdin: str | None = None) -> None:
    result = subprocess.run(args, input=stdin, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {result.stderr.strip()}")


class Network:
    """The hosts of one test session; ``close`` removes every namespace, link and address."""

    def __init__(self) -> None:
        self.tag = os.getpid() % 100_000
        # 10.x.0.0/16, x from the process id: two sessions on one machine do not collide.
        self.prefix = f"10.{100 + self.tag % 100}"
        self.service_ip = f"{self.prefix}.255.1"
        self.hosts: list[Host] = []
        self._lock = threading.Lock()  # hosts are made from several threads at once
        run("ip", "addr", "add", f"{self.service_ip}/32", "dev", "lo")

    def host(self) -> Host:
        with self._lock:
            host = Host(self, len(self.hosts) + 1)
            self.hosts.append(host)
        return host

    def close(self) -> None:
        for host in self.hosts:
            host.remove()
        subprocess.run(["ip", "addr", "del", f"{self.service_ip}/32", "dev", "lo"], capture_output=True)


class Host:
    """One simulated machine. ``command`` wraps a command line to run on it."""

    def __init__(self, network: Network, index: int):
        self.network = network
        self.ns = f"fleet-{network.tag}-{index}"
        self.outside = f"fv{network.tag}h{index}"
        self.inside = f"fv{network.tag}n{index}"
        self.gateway = f"{network.prefix}.{index}.1"
        self.ip = f"{network.prefix}.{index}.2"
        run("ip", "netns", "add", self.ns)
        run("ip", "link", "add", self.outside, "type", "veth", "peer", "name", self.inside)
        run("ip", "link", "set", self.inside, "netns", self.ns)
        run("ip", "addr", "add", f"{self.gateway}/24", "dev", self.outside)
        run("ip", "link", "set", self.outside, "up")
        self._in_ns("ip", "addr", "add", f"{self.ip}/24", "dev", self.inside)
        self._in_ns("ip", "link", "set", self.inside, "up")
        self._in_ns("ip", "link", "set", "lo", "up")
        self._in_ns("ip", "route", "add", "default", "via", self.gateway)
        self._nft(
            f"table inet {NFT_TABLE} {{\n"
            "  chain out { type filter hook output priority 0; }\n"
            "  chain in { type filter hook input priority 0; }\n"
            "}\n"
        )

    def command(self, args: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns, *args]

    # -- faults ----------------------------------------------------------------------------
    def cut(self, *ports: int) -> None:
        """Drop every packet between this host and the services (or only those of
        ``ports``), in both directions: connections stall, nobody is told."""
        self._drop("drop", ports)

    def lose(self, percent: int, *ports: int) -> None:
        """Drop ``percent`` of the packets each way, at random (TCP retransmits them)."""
        self._drop(f"numgen random mod 100 < {percent} drop", ports)

    def slow(self, kbit: int) -> None:
        """Limit the link to ``kbit`` kbit/s each way (a token bucket, so bursts queue)."""
        for device, wrap in ((self.inside, self._in_ns), (self.outside, run)):
            wrap("tc", "qdisc", "replace", "dev", device, "root", "tbf",
                 "rate", f"{kbit}kbit", "burst", "32kbit", "latency", "500ms")  # fmt: skip

    def heal(self) -> None:
        self._nft(f"flush chain inet {NFT_TABLE} out\nflush chain inet {NFT_TABLE} in\n")
        for device, wrap in ((self.inside, self._in_ns), (self.outside, run)):
            try:
                wrap("tc", "qdisc", "del", "dev", device, "root")
            except RuntimeError:
                pass  # no limit was set

    def remove(self) -> None:
        subprocess.run(["ip", "link", "del", self.outside], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True)

    # -- plumbing --------------------------------------------------------------------------
    def _drop(self, verdict: str, ports: Sequence[int]) -> None:
        service = self.network.service_ip
        outgoing = [f"ip daddr {service} tcp dport {port}" for port in ports] or [f"ip daddr {service}"]
        incoming = [f"ip saddr {service} tcp sport {port}" for port in ports] or [f"ip saddr {service}"]
        rules = [f"add rule inet {NFT_TABLE} out {match} {verdict}" for match in outgoing]
        rules += [f"add rule inet {NFT_TABLE} in {match} {verdict}" for match in incoming]
        self._nft("\n".join(rules) + "\n")

    def _in_ns(self, *args: str) -> None:
        run(*self.command(args))

    def _nft(self, script: str) -> None:
        run(*self.command(["nft", "-f", "-"]), stdin=script)
