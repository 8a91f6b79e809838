"""JSON log lines: one object per record, with the job and batch ids of the block they were
logged in, the event's own fields, Celery's task id as the job id, and a traceback."""

from __future__ import annotations

import json
import logging
import threading

from tasks import logs
from tasks.logs import JsonFormatter, bind_log_context, log_context, set_process_fields


def line(logger: logging.Logger, *args, **kwargs) -> dict:
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        logger.info(*args, **kwargs)
    finally:
        logger.removeHandler(handler)
    return json.loads(JsonFormatter("worker").format(records[0]))


def test_a_line_carries_its_blocks_ids_and_its_own_fields():
    log = logging.getLogger("test.logs")
    log.setLevel(logging.INFO)
    with log_context(job_id="j1"):
        bind_log_context(batch_id="42-7")
        entry = line(log, "uploaded %d image(s)", 2, extra={"upload_s": 0.5})
    assert entry["message"] == "uploaded 2 image(s)" and entry["level"] == "INFO"
    assert (entry["service"], entry["job_id"], entry["batch_id"], entry["upload_s"]) == ("worker", "j1", "42-7", 0.5)
    assert "job_id" not in line(log, "after the block"), "the block's ids end with it"


def test_other_threads_do_not_see_a_threads_block():
    log = logging.getLogger("test.logs")
    log.setLevel(logging.INFO)
    seen = {}
    with log_context(job_id="mine"):
        thread = threading.Thread(target=lambda: seen.update(line(log, "elsewhere")))
        thread.start()
        thread.join()
    assert "job_id" not in seen


def test_celerys_task_lines_name_the_job_and_a_traceback_stays_on_one_line(monkeypatch):
    monkeypatch.setattr(logs, "_process_fields", {})
    log = logging.getLogger("test.logs")
    log.setLevel(logging.INFO)
    set_process_fields(worker="w1@host")
    received = line(log, "Task %(name)s[%(id)s] received", {"id": "abc", "name": "fleet.generate"})
    assert (received["job_id"], received["task_id"], received["worker"]) == ("abc", "abc", "w1@host")
    hook = line(log, "Task %(name)s[%(id)s] received", {"id": "x", "name": "fleet.webhook"})
    assert hook["task_id"] == "x" and "job_id" not in hook
    try:
        raise ValueError("boom")
    except ValueError:
        failed = line(log, "it failed", exc_info=True)
    assert "ValueError: boom" in failed["exc"]
    assert "\n" not in JsonFormatter().format(logging.makeLogRecord({"msg": "a\nb"}))
