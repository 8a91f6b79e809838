"""A typed client of the fleet's HTTP API, for scripts, ``fleet submit`` and the load
generator.

It never polls. ``wait`` holds each ``GET`` open with ``Prefer: wait`` until the job ends
(at most 60 s a request, the server's cap), and ``stream`` reads the job's Server-Sent
Events: a client that loops on status reads takes the CPU the model needs (on a 2-core
host, polling every job every 25 ms cut the fleet's throughput to 0.37 of the bare
pipeline; docs/BENCHMARKS.md, "Status reads and waiting clients").

Errors: every error answer raises ``FleetAPIError`` with the API's code, message and
field. A ``429`` or ``503`` (the API refused the request and recorded nothing, so sending
it again is safe, a submission included) is sent again up to ``retries`` times, after the
``Retry-After`` it names (1, 2, 4 ... s when it names none); one that asks for longer
than ``max_retry_after_s`` is raised at once. A connection that fails raises requests'
own ``requests.RequestException``.

Imports neither Flask nor torch: the job view is ``tasks.views.JobView``, the model the
API renders its answers from.
"""

from __future__ import annotations

import email.utils
import json
import mimetypes
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import requests

from tasks.jobs import OUTPUT_TYPES
from tasks.settings import ClientSettings
from tasks.storage import EXTENSIONS
from tasks.views import JobView

#: The longest the API holds one request (``app.waiting.MAX_WAIT_S``).
MAX_WAIT_S = 60.0
#: The API sends a keepalive every 15 s on a quiet stream: this long without a byte and
#: the connection is taken for dead.
STREAM_SILENCE_S = 45.0

#: A dropped event stream is opened again this many times in a row (``Last-Event-ID``),
#: after 0.5, 1, 2, 4, 8 s: rides out an API restart or a proxy's idle cut, not an outage.
STREAM_RECONNECTS = 5
STREAM_BACKOFF_S = 0.5

#: Content-Type -> file extension, as the images are stored (``jpeg`` -> ``.jpg``).
_EXTENSIONS = {content_type: EXTENSIONS[output_format] for output_format, content_type in OUTPUT_TYPES.items()}


class FleetAPIError(Exception):
    """An error answer of the API: ``{"error": {"code", "message", "field"}}`` and its
    status; ``retry_after`` (seconds) when the API said when to come back."""

    def __init__(
        self, status: int, code: str, message: str, field: str | None = None, retry_after: float | None = None
    ):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.retry_after = retry_after

    def __str__(self) -> str:
        field = f", field '{self.field}'" if self.field else ""
        return f"{self.message} (HTTP {self.status} {self.code}{field})"

    @classmethod
    def from_response(cls, response: requests.Response) -> FleetAPIError:
        try:
            body = response.json()
        except ValueError:  # not JSON: a proxy's error page
            body = None
        retry_after = _retry_after(response.headers.get("Retry-After"))
        return cls.from_body(response.status_code, body, retry_after, response.text[:200] or response.reason)

    @classmethod
    def from_body(cls, status: int, body: Any, retry_after: float | None = None, fallback: str = "") -> FleetAPIError:
        try:
            error = body["error"]
            return cls(status, str(error["code"]), str(error["message"]), error.get("field"), retry_after)
        except (KeyError, TypeError):
            return cls(status, f"http_{status}", fallback or f"HTTP {status}", None, retry_after)


@dataclass(frozen=True)
class StateEvent:
    """The job changed state (the first event of a stream is its state then)."""

    job: JobView


@dataclass(frozen=True)
class ProgressEvent:
    """The model call the job is in finished denoising step ``step`` of ``total``."""

    job_id: str
    step: int
    total: int


Event = StateEvent | ProgressEvent


class FleetClient:
    """One API, one ``requests.Session`` (its connections are reused; not for sharing
    between threads: give each thread a client of its own)."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        timeout_s: float = 30.0,
        retries: int = 3,
        max_retry_after_s: float = 60.0,
    ):
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self.retries = retries
        self.max_retry_after_s = max_retry_after_s
        # Only on the API's requests: a presigned download URL carries its own signature,
        # and S3 refuses a request that is signed twice.
        self._auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._session = requests.Session()

    @classmethod
    def from_env(cls, **kwargs: Any) -> FleetClient:
        """``FLEET_API_URL`` (else ``http://FLEET_API_HOST:FLEET_API_PORT``) and ``FLEET_API_KEY``."""
        settings = ClientSettings()
        return cls(settings.base_url, api_key=settings.api_key or None, **kwargs)

    def __enter__(self) -> FleetClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._session.close()

    # -- jobs ------------------------------------------------------------------------------
    def submit(
        self,
        prompt: str,
        *,
        model: str | None = None,
        loras: dict[str, float] | None = None,
        negative_prompt: str | None = None,
        width: int | None = None,
        height: int | None = None,
        steps: int | None = None,
        scheduler: str | None = None,
        guidance_scale: float | None = None,
        seed: int | None = None,
        num_images: int | None = None,
        deadline_ms: int | None = None,
        output_format: Literal["png", "webp", "jpeg"] | None = None,
        output_quality: int | None = None,
        service_class: Literal["interactive", "batch"] | None = None,
        priority: int | None = None,
        webhook: str | None = None,
        webhook_events: list[str] | None = None,
        wait_s: float | None = None,
        idempotency_key: str | None = None,
        cancel_after: float | None = None,
    ) -> JobView:
        """Submit a job; fields left None take the API's defaults (they are not sent, so an
        API older than a field still takes the rest). ``wait_s``: return once the job
        ends or that many seconds pass, the first 60 of them in the submitting request
        itself (``Prefer: wait``), the rest in ``wait``. ``idempotency_key``: the same
        request sent again with it (after a timeout, say) answers with the job it made
        instead of making a second. ``cancel_after``: seconds after which the API cancels
        the job if no model call has started it. ``loras``: the model's LoRA adapters to
        apply, by name, with their scales."""
        fields = {
            "model": model,
            "loras": [{"name": name, "scale": scale} for name, scale in loras.items()] if loras else None,
            "negative_prompt": negative_prompt,
            "width": width,
            "height": height,
            "steps": steps,
            "scheduler": scheduler,
            "guidance_scale": guidance_scale,
            "seed": seed,
            "num_images": num_images,
            "deadline_ms": deadline_ms,
            "output_format": output_format,
            "output_quality": output_quality,
            "service_class": service_class,
            "priority": priority,
            "webhook": webhook,
            "webhook_events": webhook_events,
        }
        body = {"prompt": prompt} | {name: value for name, value in fields.items() if value is not None}
        headers = {}
        if idempotency_key is not None:
            headers["Idempotency-Key"] = idempotency_key
        if cancel_after is not None:
            headers["Cancel-After"] = f"{cancel_after:g}"
        started = time.monotonic()
        job = self._job(
            "POST", "/v1/jobs", body=body, headers=headers, wait_s=min(wait_s, MAX_WAIT_S) if wait_s else None
        )
        if wait_s and wait_s > MAX_WAIT_S and not job.state.terminal:
            job = self.wait(job.id, timeout_s=max(0.0, wait_s - (time.monotonic() - started)))
        return job

    def get(self, job_id: str, wait_s: float | None = None) -> JobView:
        """The job now, or (``wait_s``, at most 60) once it ends if that comes first."""
        return self._job("GET", f"/v1/jobs/{job_id}", wait_s=min(wait_s, MAX_WAIT_S) if wait_s else None)

    def wait(self, job_id: str, timeout_s: float | None = None) -> JobView:
        """The job once it has ended, or as it is after ``timeout_s`` (None: however long
        it takes). Each request is held by the API until the job ends or up to 60 s."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            left = MAX_WAIT_S if deadline is None else min(MAX_WAIT_S, deadline - time.monotonic())
            job = self.get(job_id, wait_s=left if left > 0 else None)
            if job.state.terminal or (deadline is not None and time.monotonic() >= deadline):
                return job

    def stream(self, job_id: str, timeout_s: float | None = None) -> Iterator[Event]:
        """The job's events as they happen: a ``StateEvent`` first and on every change of
        state (and of its place in line while it is queued), a ``ProgressEvent`` at every
        denoising step; it ends after the job's last state. ``timeout_s``: stop after that
        long anyway (noticed at the next event or keepalive, so up to 15 s late).

        A connection that drops (or a server that closes the stream before the job ended)
        is opened again, up to ``STREAM_RECONNECTS`` times in a row with a growing pause,
        sending the last event's id as ``Last-Event-ID``: the API then starts with the
        job's current state, so nothing is missed and the end never comes twice. Steps
        made while it was away are not replayed (the state event carries the latest).
        Past the attempts, the connection's error is raised."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        last_event_id: str | None = None
        failures = 0
        while True:
            headers = {"Accept": "text/event-stream"}
            if last_event_id is not None:
                headers["Last-Event-ID"] = last_event_id
            dropped: requests.RequestException | None = None
            try:
                response = self._request(
                    "GET", f"/v1/jobs/{job_id}/events", headers=headers, read_timeout_s=STREAM_SILENCE_S, stream=True
                )
                with response:
                    # chunk_size None: each chunk as it arrives (requests' annotation says int).
                    lines = response.iter_lines(chunk_size=None)  # type: ignore[call-overload]
                    for name, data, event_id in _server_sent_events(lines):
                        last_event_id = event_id or last_event_id
                        failures = 0
                        if name == "state":
                            state = StateEvent(JobView.model_validate_json(data))
                            yield state
                            if state.job.state.terminal:
                                return
                        elif name == "progress":
                            progress = json.loads(data)
                            yield ProgressEvent(progress["id"], progress["step"], progress["total"])
                        elif name == "error":  # the API lost its job store mid-stream
                            raise FleetAPIError.from_body(503, json.loads(data))
                        if deadline is not None and time.monotonic() >= deadline:
                            return
            except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as exc:
                dropped = exc
            if failures >= STREAM_RECONNECTS or (deadline is not None and time.monotonic() >= deadline):
                if dropped is not None:
                    raise dropped
                return
            time.sleep(min(STREAM_BACKOFF_S * 2**failures, 8.0))
            failures += 1

    def cancel(self, job_id: str) -> JobView:
        """Cancel the job: its view, now CANCELED. ``FleetAPIError`` 409 if it had already
        ended otherwise."""
        return self._job("POST", f"/v1/jobs/{job_id}/cancel")

    def download(self, job: JobView, directory: Path | str) -> list[Path]:
        """Save the job's images as ``<job id>-<index>.<ext>`` (ext from the answer's
        Content-Type) under ``directory``; the presigned URLs expire, so pass a job view
        read lately (``get`` signs new ones)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        paths = []
        for index, image in enumerate(job.images):
            with self._session.get(image.url, stream=True, timeout=self.timeout_s) as response:
                if not response.ok:
                    raise FleetAPIError(
                        response.status_code,
                        "download_failed",
                        f"image {index} of job {job.id}: the storage answered {response.status_code} "
                        "(a link expires: read the job again for new ones)",
                    )
                path = directory / f"{job.id}-{index}.{_extension(response.headers.get('Content-Type'))}"
                partial = path.with_name(path.name + ".part")
                with open(partial, "wb") as out:
                    for chunk in response.iter_content(chunk_size=1 << 16):
                        out.write(chunk)
                partial.replace(path)  # never a half-written image under the final name
            paths.append(path)
        return paths

    # -- HTTP ------------------------------------------------------------------------------
    def _job(
        self,
        method: str,
        path: str,
        body: dict | None = None,
        headers: dict[str, str] | None = None,
        wait_s: float | None = None,
    ) -> JobView:
        headers = dict(headers or {})
        wait_s = round(wait_s or 0, 3)  # what the header says: 0 asks for no wait
        if wait_s:
            headers["Prefer"] = f"wait={wait_s:g}"
        started = time.monotonic()
        response = self._request(method, path, body=body, headers=headers, read_timeout_s=self.timeout_s + wait_s)
        job = JobView.model_validate_json(response.content)
        # An API (or a proxy before it) that ignores the preference would answer at once,
        # and `wait` would turn into the tight polling loop it exists to avoid.
        if wait_s and not job.state.terminal and "Preference-Applied" not in response.headers:
            if time.monotonic() - started < wait_s / 2:
                raise FleetAPIError(
                    response.status_code, "wait_unsupported", f"{self.base_url} did not honour 'Prefer: wait'"
                )
        return job

    def _request(
        self,
        method: str,
        path: str,
        body: dict | None = None,
        headers: dict[str, str] | None = None,
        read_timeout_s: float | None = None,
        stream: bool = False,
    ) -> requests.Response:
        attempt = 0
        while True:
            response = self._session.request(
                method,
                self.base_url + path,
                json=body,
                headers=self._auth | (headers or {}),
                timeout=(self.timeout_s, read_timeout_s or self.timeout_s),
                stream=stream,
            )
            if response.ok:
                return response
            error = FleetAPIError.from_response(response)
            response.close()
            pause = error.retry_after if error.retry_after is not None else float(2**attempt)
            if response.status_code not in (429, 503) or attempt == self.retries or pause > self.max_retry_after_s:
                raise error
            time.sleep(pause)
            attempt += 1


def _server_sent_events(lines: Iterator[bytes]) -> Iterator[tuple[str, str, str | None]]:
    """``(event name, data, id)`` of each event of a ``text/event-stream``, as it arrives
    (id: the event's own, else None); comments (keepalives) and ``retry:`` lines are skipped."""
    name, data, event_id = "message", list[str](), None
    for raw in lines:
        line = raw.decode("utf-8")
        if not line:
            if data:
                yield name, "\n".join(data), event_id
            name, data, event_id = "message", list[str](), None
        elif line.startswith(":"):
            continue
        else:
            key, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if key == "event":
                name = value
            elif key == "data":
                data.append(value)
            elif key == "id":
                event_id = value


def _retry_after(value: str | None) -> float | None:
    """``Retry-After`` in seconds: a number of seconds or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _extension(content_type: str | None) -> str:
    kind = (content_type or "").split(";")[0].strip().lower()
    return _EXTENSIONS.get(kind) or (mimetypes.guess_extension(kind) or ".bin").lstrip(".")
