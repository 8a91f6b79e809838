"""Waiting for a job without polling: ``Prefer: wait`` and the Server-Sent Events stream.

Both sleep on a queue fed by the process's one job-event subscription
(``tasks.events.EventHub``) and read the job from the store only when an event says it
changed, so a waiting client costs no Redis reads and no CPU while nothing happens.
"""

from __future__ import annotations

import json
import queue
import re
import time
from collections.abc import Callable, Iterator

from app.services import Services
from tasks.cancel import cancel_if_overdue
from tasks.errors import DependencyUnavailable, ValidationFailed
from tasks.events import EventKind, JobEvent
from tasks.jobs import Job, JobState
from tasks.store import JobStore

#: The longest a request may be held (``Prefer: wait=N`` asks for N, at most this).
MAX_WAIT_S = 60
#: A comment line this often keeps proxies from closing a quiet stream, and lets the
#: server notice a client that went away.
KEEPALIVE_S = 15.0
#: A QUEUED job's stream reads its place in line again at most this often, and only when
#: some job changed state since: 100 streams cost at most 100 reads a second, whatever
#: the fleet does.
PLACE_RECHECK_S = 1.0

# ``Prefer`` (RFC 7240) as a pattern the API parses with and the OpenAPI document shows:
# a comma-separated list of preferences in printable ASCII, any of them, except that a
# ``wait`` preference must carry a number of seconds (or none: the longest wait). Written
# without lookarounds, so Hypothesis can generate from it: an item that is not ``wait``
# either starts with another character or leaves the word (or the token) somewhere.
_TEXT = r"[\t !-+\--~]"  # any printable ASCII or blank but the list's comma
_SECONDS = r"[0-9]+(?:\.[0-9]+)?"
_WAIT_ITEM = rf'[\t ]*[Ww][Aa][Ii][Tt][\t ]*(?:=[\t ]*(?:({_SECONDS})|"({_SECONDS})")[\t ]*)?(?:;{_TEXT}*)?'
_OTHER_STARTS = (
    "",
    rf"[!-+\--VX-vx-~]{_TEXT}*",
    rf"[Ww](?:[\t !-+\--@B-`b-~]{_TEXT}*)?",
    rf"[Ww][Aa](?:[\t !-+\--HJ-hj-~]{_TEXT}*)?",
    rf"[Ww][Aa][Ii](?:[\t !-+\--SU-su-~]{_TEXT}*)?",
    rf"[Ww][Aa][Ii][Tt][\t ]*[!-+\--:<>-~]{_TEXT}*",  # "waiting", "wait x": not ours
)
_OTHER_ITEM = rf"[\t ]*(?:{'|'.join(_OTHER_STARTS)})"
_ITEM = f"(?:{_WAIT_ITEM}|{_OTHER_ITEM})"
PREFER_PATTERN = f"^{_ITEM}(?:,{_ITEM})*$"
_PREFER = re.compile(PREFER_PATTERN)
_WAIT = re.compile(_WAIT_ITEM)


def parse_prefer_wait(header: str | None) -> float | None:
    """The ``wait`` preference of a ``Prefer`` header in seconds, to the millisecond and
    capped at ``MAX_WAIT_S``; a bare ``wait`` asks for the most. None when there is none
    (or it is 0). Other preferences are ignored; a malformed header is refused."""
    if header is None:
        return None
    if not _PREFER.fullmatch(header):
        raise ValidationFailed(
            f"'Prefer' must be a list of preferences, its 'wait' a number of seconds (at most {MAX_WAIT_S})", "Prefer"
        )
    for item in header.split(","):
        if match := _WAIT.fullmatch(item):
            seconds = match[1] or match[2]
            if seconds is None:
                return float(MAX_WAIT_S)
            return round(min(float(seconds), float(MAX_WAIT_S)), 3) or None
    return None


def wait_until_done(store: JobStore, job: Job, events: queue.Queue, wait_s: float) -> Job:
    """The job once it has ended, or as it is after ``wait_s`` seconds."""
    deadline = time.monotonic() + wait_s
    job = store.get(job.id) or job  # it may have ended before we subscribed
    while not job.state.terminal:
        timeout = _timeout(job, deadline - time.monotonic())
        if timeout <= 0:
            break
        try:
            event: JobEvent = events.get(timeout=timeout)
        except queue.Empty:
            job = cancel_if_overdue(store, job)  # its Cancel-After deadline may have come
            continue
        if event.kind is not EventKind.PROGRESS:
            job = store.get(job.id) or job
    return job


def event_stream(
    svc: Services, job: Job, render: Callable[[Job], dict], last_event_id: str | None = None
) -> Iterator[str]:
    """``state`` events (the whole job, as ``GET`` shows it) on every change of state, and
    while it is QUEUED on every change of its place in line; ``progress`` events
    (``{"id", "step", "total"}``) at every step, until the job ends.

    Each event's ``id`` is how far the job had got (``event_id``). A client that reconnects
    with one as ``Last-Event-ID`` gets the job's current state first (no step is replayed:
    the state carries the latest), or, if that id says it saw the job end, an empty stream.

    A queued job's place changes when other jobs of its queue start or end; their events
    are not sent to this stream (a waiter per job would get the whole fleet's). The hub's
    change count says whether any job changed state, and the place is read again at most
    once every ``PLACE_RECHECK_S``, only if it did."""
    yield f"retry: {int(KEEPALIVE_S * 1000)}\n\n"
    try:
        with svc.events.watch(job.id) as events:
            current = svc.store.get(job.id) or job
            if current.state.terminal and (last_event_id or "").partition(".")[0] == current.state.value:
                return  # it saw the end already: sending it again would be a second end
            view = render(current)
            yield _event("state", view, event_id(current))
            changes, quiet_since = svc.events.changes, time.monotonic()
            while not current.state.terminal:
                queued = current.state is JobState.QUEUED
                limit = KEEPALIVE_S - (time.monotonic() - quiet_since)
                try:
                    event: JobEvent = events.get(
                        timeout=_timeout(current, min(limit, PLACE_RECHECK_S) if queued else limit)
                    )
                except queue.Empty:
                    latest = cancel_if_overdue(svc.store, current)
                    if latest.state is not current.state:
                        current, view = latest, render(latest)
                        yield _event("state", view, event_id(current))
                        quiet_since = time.monotonic()
                    elif queued and svc.events.changes != changes:
                        changes = svc.events.changes
                        moved = render(current)
                        if _position(moved) not in (None, _position(view)):
                            view = moved
                            yield _event("state", view, event_id(current))
                            quiet_since = time.monotonic()
                    if time.monotonic() - quiet_since >= KEEPALIVE_S:
                        yield ": keepalive\n\n"
                        quiet_since = time.monotonic()
                    continue
                if event.kind is EventKind.PROGRESS:
                    progress = {"id": job.id, "step": event.step, "total": event.total}
                    yield _event("progress", progress, f"{JobState.RUNNING.value}.{event.step}")
                    quiet_since = time.monotonic()
                    continue
                stored = svc.store.get(job.id)
                if stored is None:
                    return  # expired
                if event.kind is EventKind.STATE or stored.state is not current.state:
                    current, view = stored, render(stored)
                    yield _event("state", view, event_id(current))
                    quiet_since = time.monotonic()
    except DependencyUnavailable as exc:
        yield _event("error", exc.to_dict())


def event_id(job: Job) -> str:
    """An event's ``id``: the job's state and the step its model call had reached
    (``RUNNING.12``; ``QUEUED.0``)."""
    return f"{job.state.value}.{job.step}"


def _position(view: dict) -> int | None:
    place = view.get("place_in_line")
    return place["position"] if place else None


def _timeout(job: Job, limit: float) -> float:
    """How long to sleep: ``limit``, or less if a QUEUED job's ``Cancel-After`` comes first."""
    if job.cancel_at is None or job.state is not JobState.QUEUED:
        return limit
    return max(0.0, min(limit, job.cancel_at - time.time() + 0.01))


def _event(name: str, data: dict, event_id: str | None = None) -> str:
    id_line = f"id: {event_id}\n" if event_id is not None else ""
    return f"event: {name}\n{id_line}data: {json.dumps(data, separators=(',', ':'))}\n\n"
