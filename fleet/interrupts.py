"""Signals as ordinary control flow, for commands that wait (``fleet submit``, ``fleet s3``).

Python runs a signal's handler in the main thread between two bytecodes, wherever that
thread happens to be: inside urllib3, tqdm starting its monitor thread, the import system's
weakref callbacks. The default SIGINT handler raises ``KeyboardInterrupt`` there, and at such
a point it can be swallowed ("Exception ignored in" a callback, or replaced by an error of
the cleanup it interrupted, which an ``except Exception`` then catches) or leave a lock
held. ``fleet submit`` lost its Ctrl-C that way and went on following a job that would
never run (issue 22). A handler that takes a lock (``threading.Event.set``) deadlocks the
same way when the code it interrupted holds that lock.

``Interrupts`` installs handlers that only record the signal and write a byte to a pipe:
nothing is raised and no lock is taken. The main thread blocks in ``wait`` (a read of that
pipe) and decides what to do in its own code; other threads ``wake`` it the same way when
their work is done. The pipe is also the wakeup fd (``signal.set_wakeup_fd``): the kernel
delivers a signal to any thread of the process, and when it picks one other than the main
thread, the main thread's blocking read is not interrupted and Python's handler never gets
to run; the C handler writes to the wakeup fd from whichever thread it ran in.
"""

from __future__ import annotations

import os
import select
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

#: What ``signal.signal`` returns: the handler that was there before.
Handler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None


class Interrupts:
    """While entered, the given signals are recorded in ``received`` instead of acting;
    ``on_repeat(signum)`` runs in the handler from the second one on (it may exit the
    process, and must not take locks)."""

    def __init__(self, *signums: int, on_repeat: Callable[[int], None] | None = None):
        self.signums = signums
        self.received: list[int] = []
        self._on_repeat = on_repeat
        self._previous: dict[int, Handler] = {}
        self._previous_wakeup_fd = -1
        # Guards the pipe against a thread's `wake` after `__exit__` closed it (its fd
        # number could already name another file). The handler never takes it: it runs
        # only while the pipe is open.
        self._open = threading.Lock()
        self._read_fd = self._write_fd = -1

    def __enter__(self) -> Interrupts:
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._write_fd, False)
        self._previous_wakeup_fd = signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)
        for signum in self.signums:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        signal.set_wakeup_fd(self._previous_wakeup_fd)
        with self._open:
            os.close(self._read_fd)
            os.close(self._write_fd)
            self._read_fd = self._write_fd = -1

    def wait(self, timeout_s: float | None = None) -> None:
        """Until a signal or a ``wake`` (one since the last ``wait`` counts), or
        ``timeout_s``. It says nothing about which: check the state it guards after it."""
        if timeout_s is not None and not select.select([self._read_fd], [], [], timeout_s)[0]:
            return
        os.read(self._read_fd, 4096)

    def wake(self) -> None:
        """End the main thread's ``wait`` (from any thread)."""
        with self._open:
            if self._write_fd >= 0:
                self._poke()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received.append(signum)
        if len(self.received) > 1 and self._on_repeat is not None:
            self._on_repeat(signum)
        # The wakeup fd's byte may have been read before this handler ran: one more, so a
        # `wait` after a check of `received` that came too early still ends.
        self._poke()

    def _poke(self) -> None:
        try:
            os.write(self._write_fd, b"\0")
        except BlockingIOError:  # the pipe is full of wake-ups already: the reader will see one
            pass
