"""``fleet submit`` as a user runs it: the images saved and their paths printed, a refused
job's error and exit status, and Ctrl-C canceling the job it waits on, at whatever moment
it comes."""

from __future__ import annotations

import contextlib
import ctypes
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest
from PIL import Image

from fleet.processes import BIN
from fleet.submit import CANCEL_TIMEOUT_S, STREAM_END_GRACE_S
from tests.helpers import Lines, http

pytestmark = pytest.mark.e2e


def fleet_submit(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "fleet"), "submit", *args], capture_output=True, text=True, timeout=180, env={**os.environ, **env}
    )


def test_it_saves_the_images_prints_their_paths_and_exits_0(api_url, tmp_path):
    result = fleet_submit(
        "a lighthouse at dusk", "-n", "2", "--steps", "4", "--seed", "7", "-o", str(tmp_path), "--api", api_url
    )
    assert result.returncode == 0, result.stderr
    paths = result.stdout.split()
    assert len(paths) == 2 and all(p.startswith(str(tmp_path)) and p.endswith(".png") for p in paths)
    for path in paths:
        with Image.open(path) as image:
            assert image.format == "PNG"


def test_the_api_url_comes_from_the_environment_and_a_refusal_exits_1(api_url):
    result = fleet_submit("a kettle", "--width", "7", FLEET_API_URL=api_url)
    assert result.returncode == 1
    assert "width" in result.stderr and "422" in result.stderr and not result.stdout


def test_lora_flags_are_sent_as_the_request_s_loras_and_a_bad_scale_is_a_usage_error(api_url):
    """The session's model has no adapters: the API's 422 names ``loras``, so the flag was
    sent as that field; a scale that is not a number never leaves the command line."""
    refused = fleet_submit("a kettle", "--lora", "noise", "--lora", "other=0.5", "--api", api_url)
    assert refused.returncode == 1 and "loras" in refused.stderr and "422" in refused.stderr
    usage = fleet_submit("a kettle", "--lora", "noise=strong", "--api", api_url)
    assert usage.returncode == 2 and "NAME=SCALE" in usage.stderr


def test_no_wait_prints_the_job_id(idle_api):
    result = fleet_submit("later", "--no-wait", "--api", idle_api)
    assert result.returncode == 0, result.stderr
    job_id = result.stdout.strip()
    assert http.get(f"{idle_api}/v1/jobs/{job_id}", timeout=10).json()["state"] == "QUEUED"
    http.post(f"{idle_api}/v1/jobs/{job_id}/cancel", timeout=10)


#: Ctrl-C to exit: the cancel's connect and read timeouts, the stream's grace, and slack for a
#: loaded host. A ``fleet submit`` that lost its Ctrl-C never exits at all.
EXIT_BOUND_S = 2 * CANCEL_TIMEOUT_S + STREAM_END_GRACE_S + 5
#: A second Ctrl-C quits without waiting for anything.
AT_ONCE_S = 5


def start_submit(api: str, output: Path) -> tuple[subprocess.Popen, Lines]:
    process = subprocess.Popen(
        [str(BIN / "fleet"), "submit", "never run", "--api", api, "-o", str(output)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        # SIGABRT then writes every thread's stack to stderr: a hang says where it hung.
        env={**os.environ, "PYTHONFAULTHANDLER": "1"},
    )
    return process, Lines(process.stderr)


def exited(process: subprocess.Popen, lines: Lines, bound_s: float) -> tuple[int, str]:
    """Its exit status and all it said on stderr, once it exits within ``bound_s``."""
    try:
        process.wait(bound_s)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGABRT)
        process.wait(10)
        raise AssertionError(f"fleet submit still running {bound_s} s after Ctrl-C, here:\n{lines.rest(10)}") from None
    return process.returncode, lines.rest(10)


@pytest.mark.parametrize("pause_s", [0, 0.02, 0.2, 1.0])
def test_ctrl_c_while_it_waits_cancels_the_job_and_exits_130(idle_api, tmp_path, pause_s):
    """Ctrl-C at any moment once the job is submitted (as it starts following the job, or
    well into its event stream) cancels the job and exits 130, within a bound."""
    process, lines = start_submit(idle_api, tmp_path)
    try:
        first = lines.next(60, "'job <id> submitted'")  # it follows the job from now on
        job_id = first.split()[1]
        assert first.strip() == f"job {job_id} submitted"
        time.sleep(pause_s)
        process.send_signal(signal.SIGINT)
        status, stderr = exited(process, lines, EXIT_BOUND_S)
    finally:
        process.kill()
        process.wait()
    assert_interrupted_and_canceled(idle_api, job_id, status, stderr)
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(sys.platform != "linux", reason="tgkill: a signal aimed at one thread of another process")
def test_a_ctrl_c_the_kernel_hands_to_another_thread_still_cancels_the_job(idle_api, tmp_path):
    """The kernel delivers a process's SIGINT to any of its threads: one that lands on the
    thread that follows the job, not on the main one, still cancels it and exits 130."""
    process, lines = start_submit(idle_api, tmp_path)
    try:
        job_id = lines.next(60, "'job <id> submitted'").split()[1]
        # The lowest id after the main thread's is the first thread it started: the one
        # that follows the job (tqdm's monitor comes after it).
        threads = sorted(int(tid) for tid in os.listdir(f"/proc/{process.pid}/task") if int(tid) != process.pid)
        assert threads, "fleet submit follows the job in a thread of its own"
        libc = ctypes.CDLL(None, use_errno=True)
        assert libc.tgkill(process.pid, threads[0], signal.SIGINT) == 0, os.strerror(ctypes.get_errno())
        status, stderr = exited(process, lines, EXIT_BOUND_S)
    finally:
        process.kill()
        process.wait()
    assert_interrupted_and_canceled(idle_api, job_id, status, stderr)


def assert_interrupted_and_canceled(api: str, job_id: str, status: int, stderr: str) -> None:
    assert status == 130, stderr
    assert f"canceled job {job_id}" in stderr
    assert http.get(f"{api}/v1/jobs/{job_id}", timeout=10).json()["state"] == "CANCELED"


def test_ctrl_c_before_the_api_answers_the_submission_cancels_the_job_it_makes(idle_api, tmp_path):
    """Ctrl-C while the submission is unanswered: once the API answers, the job it made is
    canceled, and the command exits 130."""
    with HeldAnswers(idle_api) as api:
        process, lines = start_submit(api.url, tmp_path)
        try:
            assert api.request_seen.wait(60), "fleet submit sent no request"
            process.send_signal(signal.SIGINT)
            assert "canceled once the API has answered" in lines.next(EXIT_BOUND_S, "the notice of the Ctrl-C")
            api.released.set()
            status, stderr = exited(process, lines, EXIT_BOUND_S)
        finally:
            process.kill()
            process.wait()
    assert_interrupted_and_canceled(idle_api, api.job_id(), status, stderr)


def test_a_second_ctrl_c_quits_at_once(idle_api, tmp_path):
    """A second Ctrl-C exits 130 at once, even while the first still waits on the API (here
    for the answer to the submission), and says the job may still run."""
    with HeldAnswers(idle_api) as api:
        process, lines = start_submit(api.url, tmp_path)
        try:
            assert api.request_seen.wait(60), "fleet submit sent no request"
            process.send_signal(signal.SIGINT)
            lines.next(EXIT_BOUND_S, "the notice of the Ctrl-C")
            process.send_signal(signal.SIGINT)
            status, stderr = exited(process, lines, AT_ONCE_S)
        finally:
            process.kill()
            process.wait()
        # It may have quit before it sent the whole submission (headers and body are two
        # writes): then the API makes no job. Either way it closes the connection.
        api.closed.wait(30)
    assert status == 130, stderr
    assert "interrupted again: quitting; the job may still run" in stderr
    if api.job_id():
        http.post(f"{idle_api}/v1/jobs/{api.job_id()}/cancel", timeout=10)


class HeldAnswers:
    """A TCP proxy in front of the API: requests go through at once, answers only once
    ``released`` is set, so a request stays in flight for as long as a test needs."""

    def __init__(self, upstream: str):
        url = urlparse(upstream)
        self._upstream = (url.hostname, url.port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self.request_seen = threading.Event()
        self.released = threading.Event()
        self.closed = threading.Event()  # the API closed a connection
        self.answers = bytearray()  # all the API answered, sent on or not
        self._sockets = [self._listener]

    def __enter__(self) -> HeldAnswers:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.released.set()
        for sock in self._sockets:
            sock.close()

    def job_id(self) -> str | None:
        found = re.search(rb'"id"\s*:\s*"([0-9a-f]{32})"', bytes(self.answers))
        return found and found.group(1).decode()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:  # closed
                return
            upstream = socket.create_connection(self._upstream)
            self._sockets += [client, upstream]
            threading.Thread(target=self._forward, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._answer, args=(upstream, client), daemon=True).start()

    def _forward(self, client: socket.socket, upstream: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := client.recv(1 << 16):
                self.request_seen.set()
                upstream.sendall(data)
            upstream.shutdown(socket.SHUT_WR)  # the client is gone: the API sees it go

    def _answer(self, upstream: socket.socket, client: socket.socket) -> None:
        # Read on while holding, so that `answers` has the whole answer (headers and body
        # may come in two reads) before it is sent on.
        held: queue.Queue[bytes] = queue.Queue()
        threading.Thread(target=self._send_when_released, args=(held, client), daemon=True).start()
        with contextlib.suppress(OSError):
            while data := upstream.recv(1 << 16):
                self.answers += data
                held.put(data)
        held.put(b"")
        self.closed.set()

    def _send_when_released(self, held: queue.Queue[bytes], client: socket.socket) -> None:
        self.released.wait()
        with contextlib.suppress(OSError):
            while data := held.get():
                client.sendall(data)
