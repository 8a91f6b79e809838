"""The fleet's logs: one line per event, as text or as JSON (``FLEET_LOG_FORMAT``).

In JSON every line is one object with ``ts``, ``level``, ``logger``, ``message``,
``service`` (api, worker, engine, hooks) and whatever the event knows: ``job_id`` and
``batch_id`` above all, so ``jq 'select(.job_id == "...")'`` over the API's and the
workers' logs follows one job from its request to its upload (docs/OBSERVABILITY.md).

Where the fields come from, without threading them through every call:

- ``log_context(job_id=...)`` around a unit of work (the worker's task body) and
  ``bind_log_context(batch_id=...)`` inside it: a context variable, so every line logged
  by that thread meanwhile carries them;
- ``extra={...}`` on one call, for fields of that event alone (timings, counts);
- Celery's own task lines ("received", "succeeded in") carry the task id in their
  arguments: for ``fleet.generate`` that id is the job id (``tasks.celery.publish_job``);
- ``set_process_fields(worker=...)`` for what is true of every line of a process.

Standard library only: the engine process and the webhook worker use it too.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar, Token
from datetime import datetime, timezone
from types import MappingProxyType
from typing import Any

LOG_FORMATS = ("text", "json")

#: The task whose Celery task id is a job id (``tasks.celery.GENERATE_TASK``; not imported
#: from there: that module builds the Celery app at import, and the engine imports this one).
JOB_TASK = "fleet.generate"

#: The WSGI environ key a request's job id travels in, from the API to gunicorn's access
#: line (``app.logs``, ``fleet.web``).
JOB_ID_ENVIRON = "fleet.job_id"

_context: ContextVar[Mapping[str, Any]] = ContextVar("fleet_log_context", default=MappingProxyType({}))
_process_fields: dict[str, Any] = {}

#: A LogRecord's own attributes: everything else on a record came from ``extra=``.
_RECORD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


@contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Every line this thread (or task) logs inside the block carries ``fields``."""
    token = _context.set({**_context.get(), **fields})
    try:
        yield
    finally:
        _context.reset(token)


def bind_log_context(**fields: Any) -> None:
    """Add ``fields`` to the current ``log_context`` block (to its end)."""
    _context.set({**_context.get(), **fields})


def open_log_context(**fields: Any) -> Token[Mapping[str, Any]]:
    """``log_context`` for a block that cannot be a ``with`` (a request, from its before
    hook to its teardown): pass the token to ``close_log_context``."""
    return _context.set(dict(fields))


def close_log_context(token: Token[Mapping[str, Any]]) -> None:
    try:
        _context.reset(token)
    except ValueError:  # closed from another context: that context ends with its own
        pass


def current_log_context() -> dict[str, Any]:
    return dict(_context.get())


def set_process_fields(**fields: Any) -> None:
    """Fields every line of this process carries from now on (e.g. the worker's name)."""
    _process_fields.update(fields)


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (a traceback goes in ``exc``)."""

    def __init__(self, service: str = ""):
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self.service:
            entry["service"] = self.service
        entry["pid"] = record.process
        entry["thread"] = record.threadName
        entry.update(_process_fields)
        entry.update(_celery_task_fields(record))
        entry.update(_context.get())
        entry.update({k: v for k, v in vars(record).items() if k not in _RECORD_ATTRIBUTES and not k.startswith("_")})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exc"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def _celery_task_fields(record: logging.LogRecord) -> dict[str, Any]:
    """Celery logs a task's receipt and end with a dict of its id, name and runtime."""
    args = record.args
    if not isinstance(args, Mapping) or "id" not in args or "name" not in args:
        return {}
    fields = {"task_id": args["id"], "task_name": args["name"]}
    if args["name"] == JOB_TASK:
        fields["job_id"] = args["id"]
    if "runtime" in args:
        fields["runtime_s"] = args["runtime"]
    return fields


def formatter(log_format: str, service: str = "", text_format: str | None = None) -> logging.Formatter:
    if log_format == "json":
        return JsonFormatter(service)
    return logging.Formatter(text_format or f"[%(asctime)s: %(levelname)s/{service or '%(processName)s'}] %(message)s")


def configure_logging(log_format: str, service: str, level: int = logging.INFO, text_format: str | None = None) -> None:
    """The root logger of a process that is not Celery's (the engine, the API's workers):
    one handler to stderr in ``log_format``."""
    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(log_format, service, text_format))
    root.handlers[:] = [handler]
    root.setLevel(level)


def install_celery_logging(log_format: str, service: str) -> None:
    """In a Celery worker: once Celery has set up its loggers (it takes over the root
    logger), give their handlers the JSON formatter. Text keeps Celery's own format."""
    if log_format != "json":
        return
    from celery.signals import after_setup_logger, after_setup_task_logger

    def use_json(logger: logging.Logger | None = None, **_: Any) -> None:
        for handler in (logger or logging.getLogger()).handlers:
            handler.setFormatter(JsonFormatter(service))

    after_setup_logger.connect(use_json, weak=False)
    after_setup_task_logger.connect(use_json, weak=False)
