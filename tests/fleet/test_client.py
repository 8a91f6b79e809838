"""The API client: submit, wait, stream, cancel and download against the real API and
worker; its error, retry and event-stream handling against a scripted server."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests
from PIL import Image

from fleet.client import FleetAPIError, FleetClient, ProgressEvent, StateEvent, _server_sent_events
from tasks.jobs import GenerationSpec, JobState
from tasks.keys import DEV_KEY
from tasks.views import JobView


def test_importing_the_client_loads_neither_flask_nor_torch():
    code = (
        "import sys, fleet.client; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'flask', 'werkzeug', 'gevent', 'torch', 'diffusers'}))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"


def test_server_sent_events_are_parsed_as_they_are_framed():
    lines = [b"retry: 15000", b"", b"event: state", b"id: QUEUED.0", b'data: {"a":', b"data: 1}", b"", b": keepalive"]
    lines += [b"", b"event: progress", b'data: {"step": 2}', b""]
    assert list(_server_sent_events(iter(lines))) == [
        ("state", '{"a":\n1}', "QUEUED.0"),
        ("progress", '{"step": 2}', None),
    ]


# -- against the real fleet ----------------------------------------------------------------


@pytest.fixture
def client(api_url) -> Iterator[FleetClient]:
    with FleetClient(api_url, api_key=DEV_KEY) as client:
        yield client


@pytest.mark.e2e
def test_submit_then_wait_gives_the_finished_job(client):
    job = client.submit("a kettle", steps=4, seed=3)
    assert job.state in (JobState.QUEUED, JobState.RUNNING) and job.request.seed == 3
    done = client.wait(job.id, timeout_s=120)
    assert done.state is JobState.SUCCEEDED and len(done.images) == 1
    with pytest.raises(FleetAPIError) as refused:
        client.cancel(done.id)
    assert refused.value.status == 409 and refused.value.code == "conflict"


@pytest.mark.e2e
def test_submit_can_hold_the_request_until_the_job_ends(client):
    job = client.submit("a held kettle", steps=4, wait_s=60)
    assert job.state is JobState.SUCCEEDED and job.images


@pytest.mark.e2e
def test_the_stream_yields_every_step_then_the_final_state(client):
    job = client.submit("a stream", steps=6)
    events = list(client.stream(job.id))  # returns: the server ends the stream with the job
    assert isinstance(events[0], StateEvent) and isinstance(events[-1], StateEvent)
    assert events[-1].job.state is JobState.SUCCEEDED and events[-1].job.images
    steps = [e.step for e in events if isinstance(e, ProgressEvent)]
    assert steps == sorted(steps) and steps[-1] == 6
    assert all(e.job_id == job.id and e.total == 6 for e in events if isinstance(e, ProgressEvent))
    last_progress = max(i for i, e in enumerate(events) if isinstance(e, ProgressEvent))
    assert last_progress < len(events) - 1


@pytest.mark.e2e
def test_download_writes_the_images_named_by_job_and_index(client, tmp_path):
    job = client.submit("two lighthouses", steps=4, num_images=2, wait_s=60)
    paths = client.download(job, tmp_path / "out")
    assert [p.name for p in paths] == [f"{job.id}-0.png", f"{job.id}-1.png"]
    for path in paths:
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size == (job.request.width, job.request.height)
    assert not list((tmp_path / "out").glob("*.part"))
    webp = client.submit("a webp lighthouse", steps=4, output_format="webp", wait_s=60)
    (path,) = client.download(webp, tmp_path / "out")
    assert path.name == f"{webp.id}-0.webp"
    with Image.open(path) as image:
        assert image.format == "WEBP"


@pytest.mark.e2e
def test_an_api_error_names_its_field(client):
    with pytest.raises(FleetAPIError) as invalid:
        client.submit("a kettle", width=7)
    assert (invalid.value.status, invalid.value.code, invalid.value.field) == (422, "invalid", "width")
    assert "width" in str(invalid.value)
    with pytest.raises(FleetAPIError) as unknown:
        client.get("0" * 32)
    assert (unknown.value.status, unknown.value.field) == (404, "job_id")


@pytest.mark.e2e
def test_a_canceled_job_is_what_wait_returns(idle_api):
    with FleetClient(idle_api, api_key=DEV_KEY) as client:
        job = client.submit("never run")
        assert client.wait(job.id, timeout_s=0.5).state is JobState.QUEUED  # as it stands when time runs out
        canceled = client.cancel(job.id)
        assert canceled.state is JobState.CANCELED
        assert client.wait(job.id, timeout_s=30).state is JobState.CANCELED
        assert client.cancel(job.id).state is JobState.CANCELED  # canceling twice is harmless


# -- against a scripted server -------------------------------------------------------------


def job_view(state: JobState = JobState.SUCCEEDED) -> dict:
    spec = GenerationSpec(
        prompt="p", negative_prompt=None, width=64, height=64, steps=4, guidance_scale=7.5, seed=1, num_images=1
    )
    return JobView(id="a" * 32, state=state, request=spec, created_at=datetime.now(timezone.utc)).model_dump(
        mode="json"
    )


class Scripted:
    """An HTTP server that answers each request with the next scripted answer and records
    what it was sent."""

    def __init__(self, answers: list[tuple[int, dict[str, str], dict]]):
        self.answers = answers
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        scripted = self

        class Handler(BaseHTTPRequestHandler):
            def answer(self):
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                scripted.requests.append((self.command, self.path, dict(self.headers)))
                status, headers, body = scripted.answers.pop(0)
                data = json.dumps(body).encode()
                self.send_response(status)
                for name, value in {"Content-Type": "application/json", **headers}.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = answer

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def scripted() -> Iterator[Callable[[list], Scripted]]:
    servers: list[Scripted] = []

    def start(answers):
        servers.append(Scripted(answers))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


BUSY = {"error": {"code": "unavailable", "message": "job store is unavailable", "field": None}}


def test_429_and_503_are_sent_again_after_their_retry_after(scripted):
    server = scripted([(503, {"Retry-After": "0"}, BUSY), (429, {"Retry-After": "0"}, BUSY), (202, {}, job_view())])
    with FleetClient(server.url, api_key="k", retries=2) as client:
        assert client.submit("p", idempotency_key="key-1", cancel_after=30).state is JobState.SUCCEEDED
    assert [(method, path) for method, path, _ in server.requests] == [("POST", "/v1/jobs")] * 3
    headers = server.requests[-1][2]
    assert headers["Authorization"] == "Bearer k" and headers["Idempotency-Key"] == "key-1"
    assert headers["Cancel-After"] == "30"


def test_retries_are_bounded_and_a_long_retry_after_is_not_waited_out(scripted):
    server = scripted([(503, {"Retry-After": "0"}, BUSY)] * 2)
    with FleetClient(server.url, retries=1) as client, pytest.raises(FleetAPIError) as exhausted:
        client.get("a" * 32)
    assert exhausted.value.status == 503 and exhausted.value.retry_after == 0 and len(server.requests) == 2

    server = scripted([(429, {"Retry-After": "3600"}, BUSY)])
    started = time.monotonic()
    with FleetClient(server.url, retries=3, max_retry_after_s=60) as client, pytest.raises(FleetAPIError) as later:
        client.get("a" * 32)
    assert later.value.retry_after == 3600 and len(server.requests) == 1 and time.monotonic() - started < 30


def test_an_error_that_is_not_the_apis_shape_still_raises_with_its_status(scripted):
    server = scripted([(502, {}, {"message": "bad gateway"})])
    with FleetClient(server.url) as client, pytest.raises(FleetAPIError) as error:
        client.get("a" * 32)
    assert (error.value.status, error.value.code) == (502, "http_502")


def test_wait_refuses_to_poll_a_server_that_ignores_prefer_wait(scripted):
    server = scripted([(200, {}, job_view(JobState.QUEUED))])
    with FleetClient(server.url) as client, pytest.raises(FleetAPIError) as error:
        client.wait("a" * 32)
    assert error.value.code == "wait_unsupported" and len(server.requests) == 1
    assert server.requests[0][2]["Prefer"] == "wait=60"


class CuttableProxy:
    """A TCP proxy to a local port whose open connections the test cuts at will (it keeps
    listening, so the client can connect again); it records what clients sent."""

    def __init__(self, port: int):
        self.port = port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.sent: list[bytes] = []
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.port))
            self.sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, from_client: bool) -> None:
        try:
            while data := source.recv(65536):
                if from_client:
                    self.sent.append(data)
                sink.sendall(data)
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def cut(self) -> None:
        for sock in self.sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        self.sockets = []

    def close(self) -> None:
        self.cut()
        self.listener.close()


@pytest.mark.e2e
def test_a_dropped_stream_resumes_with_last_event_id_and_ends_with_the_job(idle_api):
    """A stream whose connection is cut reconnects with Last-Event-ID and ends with the job's final state, once."""
    proxy = CuttableProxy(int(idle_api.rsplit(":", 1)[1]))
    try:
        with FleetClient(idle_api, api_key=DEV_KEY) as direct, FleetClient(proxy.url, api_key=DEV_KEY) as client:
            job = direct.submit("cut off")
            events = []
            for event in client.stream(job.id):
                events.append(event)
                if len(events) == 1:
                    proxy.cut()  # mid-stream: the job has not ended
                    direct.cancel(job.id)
    finally:
        proxy.close()
    assert [type(e) for e in events] == [StateEvent, StateEvent]
    assert [e.job.state for e in events] == [JobState.QUEUED, JobState.CANCELED]
    requests_sent = [data for data in proxy.sent if data.startswith(b"GET ")]
    assert len(requests_sent) == 2 and b"Last-Event-ID: QUEUED.0" in requests_sent[1]


def test_a_stream_that_keeps_dropping_gives_up_after_its_reconnects(monkeypatch):
    """Reconnects are bounded: past them the connection's error is raised."""
    monkeypatch.setattr("fleet.client.STREAM_BACKOFF_S", 0.0)
    with socket.create_server(("127.0.0.1", 0)) as closed:
        url = f"http://127.0.0.1:{closed.getsockname()[1]}"  # nothing listens there once closed
    with FleetClient(url) as client, pytest.raises(requests.ConnectionError):
        list(client.stream("a" * 32))
