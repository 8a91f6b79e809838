"""FaultProxy against a real echo server on loopback: what passes, when, and what each fault does."""

from __future__ import annotations

import os
import queue
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.partitions.proxy import FaultProxy

TIMEOUT_S = 5.0
RESET = b"!reset"  # asks the echo server to reset its connection


def reset(sock: socket.socket) -> None:
    """Close with a TCP reset instead of a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class EchoServer:
    """Echoes every byte back; tells how each connection ended as the server saw it."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address: tuple[str, int] = self._listener.getsockname()[:2]
        self.ends: queue.Queue[str] = queue.Queue()  # "eof", "reset" or "aborted", one per connection
        self.conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._received = 0
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def received(self) -> int:
        with self._lock:
            return self._received

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self.conns.append(nodelay(conn))
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    def _echo(self, conn: socket.socket) -> None:
        with conn:
            try:
                while data := conn.recv(65536):
                    with self._lock:
                        self._received += len(data)
                    if data == RESET:
                        reset(conn)
                        self.ends.put("aborted")
                        return
                    conn.sendall(data)
            except OSError:
                self.ends.put("reset")
            else:
                self.ends.put("eof")

    def close(self) -> None:
        # shutdown() wakes the accept() blocked in the other thread; close() alone does not.
        self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    server = EchoServer()
    yield server
    server.close()


@pytest.fixture
def proxy(echo: EchoServer, caplog: pytest.LogCaptureFixture) -> Iterator[FaultProxy]:
    started = FaultProxy(echo.address).start()
    yield started
    started.close()
    assert_no_loop_errors(caplog)


def assert_no_loop_errors(caplog: pytest.LogCaptureFixture) -> None:
    # A task or callback that failed unseen in the proxy's loop is only logged, not raised.
    assert [r.getMessage() for r in caplog.records if r.name == "asyncio"] == []


def nodelay(sock: socket.socket) -> socket.socket:
    # As Redis and AMQP clients do: Nagle against delayed ACKs would stretch small writes.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def connect(proxy: FaultProxy) -> socket.socket:
    return nodelay(socket.create_connection(proxy.address, timeout=TIMEOUT_S))


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, f"EOF after {len(data)} of {size} bytes"
        data += chunk
    return bytes(data)


def round_trip(sock: socket.socket, message: bytes) -> None:
    sock.sendall(message)
    assert recv_exactly(sock, len(message)) == message


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def exchange(proxy: FaultProxy, payload: bytes) -> bytes:
    """Send payload and EOF through the proxy while reading the echo back, until the echo's EOF."""
    with connect(proxy) as sock:

        def send() -> None:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)  # the echo server closes once it sees this EOF

        sender = threading.Thread(target=send)
        sender.start()
        received = bytearray()
        while chunk := sock.recv(1 << 20):
            received += chunk
        sender.join()
        return bytes(received)


def assert_ended(sock: socket.socket) -> None:
    sock.settimeout(TIMEOUT_S)
    try:
        assert sock.recv(65536) == b""
    except ConnectionResetError:
        pass


def test_bytes_pass_unchanged_both_ways_over_concurrent_connections(proxy: FaultProxy, echo: EchoServer) -> None:
    """Every byte, binary and multi-MB included, comes back in order, and EOF is passed on both ways."""
    payloads = [
        os.urandom(5 * 1024 * 1024),
        bytes(range(256)) * 4096,
        os.urandom(300_000),
        b"\x00",
        b"*1\r\n$4\r\nPING\r\n",
    ]

    with ThreadPoolExecutor(len(payloads)) as pool:
        results = list(pool.map(lambda payload: exchange(proxy, payload), payloads))
    for sent, got in zip(payloads, results, strict=True):
        assert len(got) == len(sent)
        assert got == sent
    assert [echo.ends.get(timeout=TIMEOUT_S) for _ in payloads] == ["eof"] * len(payloads)
    wait_for(lambda: proxy.connections == 0, "the finished connections to be let go")


def test_delay_applies_each_way_and_pipelines(proxy: FaultProxy) -> None:
    """delay(0.2) makes a round trip take >= 0.4 s, but 50 messages in flight share that wait."""
    with connect(proxy) as sock:
        round_trip(sock, b"warm")
        proxy.delay(0.2)
        started = time.monotonic()
        round_trip(sock, b"ping")
        assert time.monotonic() - started >= 0.38

        messages = [b"%02d;" % i for i in range(50)]
        started = time.monotonic()
        for message in messages:
            sock.sendall(message)
            time.sleep(0.005)  # separate reads at the proxy, so a stop-and-wait proxy would take 50 x 0.4 s
        burst = b"".join(messages)
        assert recv_exactly(sock, len(burst)) == burst
        assert 0.38 <= time.monotonic() - started < 3.0

        payload = os.urandom(1024 * 1024)  # many chunks in flight at once, none reordered
        assert exchange(proxy, payload) == payload

        proxy.heal()
        started = time.monotonic()
        round_trip(sock, b"fast")
        assert time.monotonic() - started < 0.35  # no longer 2 x 0.2 s


def test_stall_holds_data_both_ways_until_heal(proxy: FaultProxy, echo: EchoServer) -> None:
    """stall() forwards nothing either way and holds new connections; heal() delivers it all in order."""
    with connect(proxy) as sock:
        round_trip(sock, b"before;")
        proxy.stall()
        sock.sendall(b"one;")
        sock.sendall(b"two;")
        echo.conns[0].sendall(b"push;")  # the server speaks first: held on the way back too
        sock.settimeout(0.5)
        with pytest.raises(TimeoutError):
            sock.recv(1)
        assert echo.received == len(b"before;")

        with connect(proxy) as late:
            late.sendall(b"late")
            late.settimeout(0.2)
            with pytest.raises(TimeoutError):
                late.recv(1)
            assert proxy.connections == 1  # the late one is held, not connected upstream
            assert len(echo.conns) == 1

            proxy.heal()
            sock.settimeout(TIMEOUT_S)
            assert recv_exactly(sock, 13) == b"push;one;two;"
            late.settimeout(TIMEOUT_S)
            assert recv_exactly(late, 4) == b"late"
            assert proxy.connections == 2


def test_half_open_leaves_the_client_talking_to_a_mute_peer(proxy: FaultProxy, echo: EchoServer) -> None:
    """half_open(): the server sees EOF, the client sees neither EOF nor reset, only silence; new connections work."""
    with connect(proxy) as sock:
        round_trip(sock, b"hello")
        proxy.half_open()
        assert echo.ends.get(timeout=TIMEOUT_S) == "eof"
        assert proxy.connections == 0

        sock.sendall(b"anyone there?")
        sock.settimeout(0.5)
        with pytest.raises(TimeoutError):
            sock.recv(1)

        with connect(proxy) as fresh:
            round_trip(fresh, b"again")
            assert proxy.connections == 1
        sock.settimeout(0.1)
        with pytest.raises(TimeoutError):  # still mute after the proxy served others
            sock.recv(1)


def test_refused_upstream_closes_the_client(caplog: pytest.LogCaptureFixture) -> None:
    """A target that refuses the connection ends the client's connection instead of hanging it."""
    with socket.create_server(("127.0.0.1", 0)) as placeholder:
        nowhere = placeholder.getsockname()[:2]
    proxy = FaultProxy(nowhere).start()
    try:
        with connect(proxy) as sock:
            assert_ended(sock)
        assert proxy.connections == 0
    finally:
        proxy.close()
    assert_no_loop_errors(caplog)


def test_close_ends_every_connection_and_thread(echo: EchoServer, caplog: pytest.LogCaptureFixture) -> None:
    """close() ends forwarding, half-opened and held connections alike, and stops the proxy's thread."""
    baseline = set(threading.enumerate())  # threads of earlier tests may still be ending: no count
    proxy = FaultProxy(echo.address).start()
    dead = connect(proxy)
    round_trip(dead, b"x")
    proxy.half_open()
    live = [connect(proxy) for _ in range(3)]
    for sock in live:
        round_trip(sock, b"y")
    proxy.stall()
    held = connect(proxy)
    held.sendall(b"z")
    wait_for(lambda: proxy.connections == 3, "the live connections")

    proxy.close()
    for sock in [dead, *live, held]:
        with sock:
            assert_ended(sock)
    wait_for(lambda: set(threading.enumerate()) <= baseline, "the proxy's and echo server's threads to end")
    assert proxy.connections == 0
    proxy.close()  # a second close is harmless
    assert_no_loop_errors(caplog)


def test_a_reset_on_either_side_ends_the_other(proxy: FaultProxy, echo: EchoServer) -> None:
    """A reset from the server or the client ends that link's other side; the proxy carries on."""
    with connect(proxy) as sock:
        round_trip(sock, b"hi")
        sock.sendall(RESET)
        assert_ended(sock)
    assert echo.ends.get(timeout=TIMEOUT_S) == "aborted"

    sock = connect(proxy)
    round_trip(sock, b"hi")
    reset(sock)
    assert echo.ends.get(timeout=TIMEOUT_S) in ("eof", "reset")

    wait_for(lambda: proxy.connections == 0, "the reset links to be let go")
    with connect(proxy) as sock:
        round_trip(sock, b"still serving")


def test_stall_pushes_back_on_a_large_upload_and_loses_nothing(proxy: FaultProxy, echo: EchoServer) -> None:
    """More than the proxy holds per direction, sent into a stall, arrives whole and in order after heal()."""
    payload = os.urandom(12 * 1024 * 1024)
    with connect(proxy) as sock:
        round_trip(sock, b"open")
        proxy.stall()
        sender = threading.Thread(target=sock.sendall, args=(payload,))
        sender.start()
        time.sleep(0.3)  # time for the proxy to fill up and stop reading
        assert echo.received == len(b"open")
        proxy.heal()
        assert recv_exactly(sock, len(payload)) == payload
        sender.join()
