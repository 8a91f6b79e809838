"""A fault-injecting TCP proxy for the partition tests.

The kernel on our machines has no `tc netem`, so latency, a black hole and half-open
connections are made by a proxy on the path (packet loss and cuts are nftables' job).
It sits in front of Redis, RabbitMQ and the S3 server for long-running workers, so it
forwards any bytes, in order, for many connections at once. One asyncio loop on its own
thread serves every connection; the public methods are called from other threads.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")

_CHUNK = 64 * 1024
# Bytes held per direction: reading stops beyond this, so a stalled or slow peer pushes
# back on the sender through TCP instead of growing the proxy's memory. Counted in bytes,
# not chunks, so that many small frames in flight under a delay do not throttle it.
_MAX_HELD = 4 * 1024 * 1024
_CALL_TIMEOUT_S = 5.0


@dataclass(eq=False)
class _Link:
    """One client connection and, once connected, its upstream connection."""

    client: asyncio.StreamWriter
    task: asyncio.Task[None]
    upstream: asyncio.StreamWriter | None = None
    forwarding: bool = False  # connected upstream and neither direction failed nor ended both


class _Pipe:
    """One direction of a link: chunks in read order, each with the time it is due."""

    def __init__(self) -> None:
        self.chunks: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()  # b"": end of stream
        self.held = 0
        self.room = asyncio.Event()
        self.room.set()


def _retrieve(task: asyncio.Task[None]) -> None:
    # A pipe's error ends its link; reading it here keeps asyncio from logging it as lost.
    if not task.cancelled():
        task.exception()


def _nodelay(writer: asyncio.StreamWriter) -> None:
    # RESP and AMQP exchange small frames: Nagle would add latency we did not ask for.
    writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class FaultProxy:
    """Forwards TCP connections from (listen_host, listen_port) to (target_host, target_port)."""

    def __init__(self, target: tuple[str, int], listen_host: str = "127.0.0.1", listen_port: int = 0) -> None:
        self._target = target
        self._address = (listen_host, listen_port)
        self._delay = 0.0
        self._links: set[_Link] = set()  # every connection until its handler ends, bar half-opened ones
        self._flowing = asyncio.Event()  # cleared while stalled: chunks and new links wait on it
        self._flowing.set()
        self._stop = asyncio.Event()
        # Client sockets of half-opened connections: held, untouched, until close().
        self._dead: list[socket.socket] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        """Where clients connect: the real port once started, so listen_port=0 is usable."""
        return self._address

    def start(self) -> FaultProxy:
        """Listen and serve on a thread of its own; returns once connections are accepted."""
        if self._thread is not None:
            raise RuntimeError("a FaultProxy starts once")  # its events belong to its first loop
        started: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._thread = threading.Thread(
            target=asyncio.run, args=(self._main(started),), name=f"FaultProxy->{self._target}", daemon=True
        )
        self._thread.start()
        started.result(_CALL_TIMEOUT_S)
        return self

    def close(self) -> None:
        """Close every socket, held ones included, and join the thread: nothing outlives a test."""
        if self._loop is None or self._thread is None:
            return
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(_CALL_TIMEOUT_S)
        if self._thread.is_alive():
            raise RuntimeError("FaultProxy's thread did not stop")
        self._loop = None

    def delay(self, seconds: float) -> None:
        """Forward each chunk `seconds` after it was read, both ways, without limiting throughput."""
        if seconds < 0:
            raise ValueError("delay must be >= 0")
        # A float store is atomic; the loop reads it when it stamps each chunk it reads.
        self._delay = seconds

    def stall(self) -> None:
        """Black hole: connections stay open, nothing is forwarded, new ones are held unconnected."""
        self._call(lambda: self._flowing.clear())

    def half_open(self) -> None:
        """Drop the upstream side of every open connection and leave its client side mute.

        The server sees its client go away; the client sees a peer alive at TCP level that
        never answers, as after a crash behind a silent network. New connections forward.
        """

        def cut() -> None:
            for link in list(self._links):
                # A duplicate descriptor keeps the client's TCP connection open after the
                # transport is gone, so nothing is read, written or closed on it until close().
                if not link.client.transport.is_closing():
                    self._dead.append(link.client.get_extra_info("socket").dup())
                self._drop(link)

        self._call(cut)

    def heal(self) -> None:
        """Forward normally again: no delay, held data delivered in order; half-opened stay dead.

        Chunks read under a delay keep the time they were due: the delay they were sent into.
        """
        self._delay = 0.0
        self._call(lambda: self._flowing.set())

    @property
    def connections(self) -> int:
        """Connections forwarding now: connected upstream, not ended, not half-opened."""
        if self._loop is None:
            return 0
        return self._call(lambda: sum(link.forwarding for link in self._links))

    def _call(self, fn: Callable[[], T]) -> T:
        # asyncio objects belong to the loop's thread; running there also makes each fault
        # take effect before the method returns, so tests need no sleeps.
        if self._loop is None:
            raise RuntimeError("FaultProxy is not started")

        async def run() -> T:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(_CALL_TIMEOUT_S)

    async def _main(self, started: concurrent.futures.Future[None]) -> None:
        try:
            server = await asyncio.start_server(self._serve, *self._address, reuse_address=True)
        except OSError as exc:
            started.set_exception(exc)
            return
        self._address = server.sockets[0].getsockname()[:2]
        self._loop = asyncio.get_running_loop()
        started.set_result(None)
        await self._stop.wait()
        server.close()
        links = list(self._links)
        for link in links:
            self._drop(link)
        await asyncio.gather(*(link.task for link in links), return_exceptions=True)
        for sock in self._dead:
            sock.close()
        await server.wait_closed()

    def _drop(self, link: _Link) -> None:
        # abort(), not close(): a dropped connection must not flush what it still buffers.
        self._links.discard(link)
        for writer in (link.client, link.upstream):
            if writer is not None:
                writer.transport.abort()
        link.task.cancel()

    async def _serve(self, client_reader: asyncio.StreamReader, client: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if self._stop.is_set():  # accepted just before close(): nothing would drop it later
            client.close()
            return
        link = _Link(client, task)
        self._links.add(link)
        try:
            await self._forward(link, client_reader)
        except (OSError, asyncio.CancelledError):
            # Upstream refused, a reset, or the proxy dropped this link. Returning normally
            # keeps asyncio (3.12) from reporting the handler's cancellation as an error.
            pass
        finally:
            self._links.discard(link)
            for writer in (client, link.upstream):
                if writer is not None:
                    writer.transport.abort()  # a no-op unless it failed: then the failure goes both ways

    async def _forward(self, link: _Link, client_reader: asyncio.StreamReader) -> None:
        await self._flowing.wait()  # a stalled proxy accepts but does not connect upstream
        upstream_reader, upstream = await asyncio.open_connection(*self._target)
        link.upstream = upstream
        link.forwarding = True
        _nodelay(link.client)
        _nodelay(upstream)
        up, down = _Pipe(), _Pipe()
        pipes = [
            asyncio.create_task(coro)
            for coro in (
                self._pull(client_reader, up),
                self._push(up, upstream),
                self._pull(upstream_reader, down),
                self._push(down, link.client),
            )
        ]
        for pipe in pipes:
            pipe.add_done_callback(_retrieve)
        try:
            # Both directions ended (EOF passed on), or one failed: then the whole link goes.
            done, pending = await asyncio.wait(pipes, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            for pipe in pipes:
                pipe.cancel()
        if pending or any(pipe.exception() for pipe in done):
            raise ConnectionResetError
        link.forwarding = False
        # Stays a link while its last bytes flush, so that close() can still abort it.
        for writer in (link.client, upstream):
            writer.close()
        for writer in (link.client, upstream):
            await writer.wait_closed()

    async def _pull(self, reader: asyncio.StreamReader, pipe: _Pipe) -> None:
        loop = asyncio.get_running_loop()
        while True:
            data = await reader.read(_CHUNK)
            # Stamped on reading, so a delay is a pipeline: chunks wait side by side.
            pipe.chunks.put_nowait((loop.time() + self._delay, data))
            if not data:
                return
            pipe.held += len(data)
            if pipe.held >= _MAX_HELD:
                pipe.room.clear()
                await pipe.room.wait()

    async def _push(self, pipe: _Pipe, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due, data = await pipe.chunks.get()
            await asyncio.sleep(due - loop.time())
            await self._flowing.wait()  # stalled: the chunk is held here, in order
            if not data:
                # Half-close, as the peer did: the other direction may still be sending.
                writer.write_eof()
                return
            writer.write(data)
            pipe.held -= len(data)
            if pipe.held < _MAX_HELD:
                pipe.room.set()
            await writer.drain()
