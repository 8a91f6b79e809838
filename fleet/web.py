"""gunicorn's side of ``fleet web``: its config module (``--config python:fleet.web``) and
loggers (``--logger-class``).

Loaded by gunicorn's master before it forks the API's workers, so it imports nothing but
gunicorn and the standard library (``tasks.logs``): a master that imported boto3 or urllib3
before the gevent worker monkey-patches ssl breaks TLS in every worker (RecursionError).

- Logs: ``TextLogger`` keeps gunicorn's formats and adds the app's lines from INFO up;
  ``JsonLogger`` (``FLEET_LOG_FORMAT=json``) makes every line JSON, the access line with the
  request's method, path, status, duration and job id (``app.logs`` puts it in the environ).
- Metrics: each worker process writes its counts to ``PROMETHEUS_MULTIPROC_DIR`` (``fleet
  web`` sets it, ``app.metrics`` adds them up); when one exits its live gauges (requests in
  progress) are dropped, while its counters stay in the sums.
"""

from __future__ import annotations

import os
from typing import Any

from gunicorn.glogging import Logger

from tasks.logs import JOB_ID_ENVIRON, JsonFormatter, configure_logging


def child_exit(server, worker) -> None:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess  # here, not at import: see the docstring

        multiprocess.mark_process_dead(worker.pid)


class TextLogger(Logger):
    def setup(self, cfg) -> None:
        super().setup(cfg)
        configure_logging("text", "api")


class JsonLogger(Logger):
    def setup(self, cfg) -> None:
        super().setup(cfg)
        for log in (self.error_log, self.access_log):
            for handler in log.handlers:
                handler.setFormatter(JsonFormatter("api"))
        configure_logging("json", "api")

    def access(self, resp, req, environ, request_time) -> None:
        if not self.access_log_enabled:
            return
        method, path = environ.get("REQUEST_METHOD", ""), environ.get("PATH_INFO", "")
        status = getattr(resp, "status_code", None) or int(str(resp.status).split()[0])
        fields: dict[str, Any] = {
            "method": method,
            "path": path,
            "status": status,
            "duration_s": round(request_time.total_seconds(), 6),
            "remote_addr": environ.get("REMOTE_ADDR", ""),
            "bytes": getattr(resp, "sent", None),
            "user_agent": environ.get("HTTP_USER_AGENT", ""),
        }
        if environ.get(JOB_ID_ENVIRON):
            fields["job_id"] = environ[JOB_ID_ENVIRON]
        self.access_log.info("%s %s %s", method, path, status, extra=fields)
