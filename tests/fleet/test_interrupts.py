"""``fleet.interrupts``: signals recorded and turned into a wake-up of the main thread,
never raised into whatever code it was running, and never lost."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from fleet.interrupts import Interrupts


def send_later(signum: int, after_s: float) -> None:
    threading.Timer(after_s, os.kill, (os.getpid(), signum)).start()


def test_a_signal_ends_the_wait_and_is_recorded_without_raising():
    """A signal during ``wait`` ends it, and is only recorded: no exception anywhere."""
    with Interrupts(signal.SIGINT) as interrupts:
        send_later(signal.SIGINT, 0.1)
        started = time.monotonic()
        while not interrupts.received:
            interrupts.wait(timeout_s=10)
        assert time.monotonic() - started < 5
    assert interrupts.received == [signal.SIGINT]


def test_a_signal_before_the_wait_is_not_lost():
    """A signal that comes before the ``wait`` ends it at once: checking, then waiting
    is not a race."""
    with Interrupts(signal.SIGUSR1) as interrupts:
        os.kill(os.getpid(), signal.SIGUSR1)
        started = time.monotonic()
        interrupts.wait(timeout_s=10)
        assert time.monotonic() - started < 5


def test_a_signal_delivered_to_another_thread_still_ends_the_wait():
    """The kernel gives a process's signal to any of its threads: one that lands on a thread
    other than the main one still ends the main thread's ``wait``, and is recorded."""

    def signal_this_thread() -> None:
        signal.pthread_kill(threading.get_ident(), signal.SIGUSR1)

    with Interrupts(signal.SIGUSR1) as interrupts:
        threading.Timer(0.2, signal_this_thread).start()  # once the main thread is blocked
        started = time.monotonic()
        while not interrupts.received and time.monotonic() - started < 10:
            interrupts.wait(timeout_s=10)
        assert time.monotonic() - started < 5
    assert interrupts.received == [signal.SIGUSR1]


def test_another_thread_wakes_the_wait_and_a_late_wake_is_harmless():
    """``wake`` from a thread ends the wait; one after the exit (a thread finishing late)
    does nothing, and the previous handler is back."""
    previous = signal.getsignal(signal.SIGUSR1)
    with Interrupts(signal.SIGUSR1) as interrupts:
        threading.Timer(0.1, interrupts.wake).start()
        started = time.monotonic()
        interrupts.wait(timeout_s=10)
        assert time.monotonic() - started < 5 and not interrupts.received
    interrupts.wake()
    assert signal.getsignal(signal.SIGUSR1) is previous


#: Another process, so that a signal can come while the handler of the last one runs (a
#: thread of this process would need the GIL, which the handler holds).
STORM = """
import os, signal, sys
for _ in range(300):
    os.kill(int(sys.argv[1]), signal.SIGUSR1)
    os.kill(int(sys.argv[1]), signal.SIGUSR2)
"""


@pytest.mark.timeout(60)  # a deadlocked handler never returns: fail, not hang
def test_a_storm_of_two_signals_never_deadlocks_the_handler():
    """Signals from another process as fast as it can send them, two kinds at once (a Ctrl-C
    of ``fleet up`` brings SIGINT and SIGTERM together): the wait ends and the process goes
    on. A handler that set a threading.Event deadlocked on this in about one run in three."""
    with Interrupts(signal.SIGUSR1, signal.SIGUSR2, on_repeat=lambda _: None) as interrupts:
        sender = subprocess.Popen([sys.executable, "-c", STORM, str(os.getpid())])
        try:
            while not interrupts.received:
                interrupts.wait(timeout_s=1)
            assert sender.wait(30) == 0
        finally:
            sender.kill()
            sender.wait()
    assert set(interrupts.received) == {signal.SIGUSR1, signal.SIGUSR2}


def test_on_repeat_runs_from_the_second_signal_on():
    """``on_repeat`` (``fleet submit``'s quit-at-once) runs for the second signal, not the first."""
    repeats = []
    with Interrupts(signal.SIGUSR1, on_repeat=repeats.append) as interrupts:
        os.kill(os.getpid(), signal.SIGUSR1)
        interrupts.wait(timeout_s=10)
        assert repeats == []
        os.kill(os.getpid(), signal.SIGUSR1)
        interrupts.wait(timeout_s=10)
    assert repeats == [signal.SIGUSR1]
