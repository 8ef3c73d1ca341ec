"""Log lines: the text and JSON formats, and the request id every line of a request carries.

``Logging.Format`` picks the format of every process's log lines (the CLI's and each uvicorn
worker's, through :func:`app.cli.log_config`): ``text`` is ``LEVEL logger: message``; ``json``
is one JSON object a line with ``time`` (UTC, ISO 8601), ``level``, ``logger``, ``message``,
``pid``, ``request_id`` (when the line was logged while serving a request) and ``exception``
(a traceback, when there is one).

The request id is set by the server's middleware (:class:`app.server.middleware.RequestId`) in
:data:`REQUEST_ID`, a context variable, so lines logged by the request's task, and by the worker
threads it hands work to through anyio, name it.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import json
import logging
import os

REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id",
                                                                        default=None)
"""The id of the request being served in this context, or None."""

TEXT_FORMAT = "%(levelname)s %(name)s: %(message)s"
"""The text format of the app's log lines."""


class RequestIdFilter(logging.Filter):
    """Adds ``request_id`` (or None) to every record (handlers' filter)."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Always keeps the record."""
        record.request_id = REQUEST_ID.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object a line (see the module docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as one line of JSON."""
        line = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": os.getpid(),
            "request_id": getattr(record, "request_id", None) or REQUEST_ID.get(),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)
