"""Logging of every moeserve process: level, text or JSON lines, request ids, quiet third parties.

`setup_logging` reads `MOESERVE_LOG_LEVEL` (default info), `MOESERVE_LOG_FORMAT` (text | json)
and `MOESERVE_LOG_REQUESTS` (1: one line per finished request, on the `moeserve.requests` logger);
command-line options write these variables first, so child processes (rank processes, instances
of `moeserve up`) log the same way. Below debug, third-party logs are quiet: the HTTP/gRPC
libraries' here, Mooncake's glog in `services.kv.transfer` (errors only, benign start-up lines gone).

A request's id travels in `REQUEST_ID` (a context variable: asyncio tasks and the thread that
serves a call set it) and appears in every record logged on its behalf (`request_id` in JSON).
"""

from __future__ import annotations

import contextvars
import datetime as dt
import json
import logging
import os

LEVEL_ENV, FORMAT_ENV, REQUESTS_ENV = "MOESERVE_LOG_LEVEL", "MOESERVE_LOG_FORMAT", "MOESERVE_LOG_REQUESTS"
LEVELS = ("debug", "info", "warning", "error")
FORMATS = ("text", "json")
QUIET = ("grpc", "httpx", "httpcore", "urllib3", "asyncio", "uvicorn.access", "filelock", "torch")
"""Python loggers of libraries, at warning unless the level is debug."""

REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
requests = logging.getLogger("moeserve.requests")
"""One line per finished request, when asked for (`--log-requests`)."""


class _WithRequestId(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = REQUEST_ID.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, pid, request id, exception."""

    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        request_id = getattr(record, "request_id", None)  # set by `_WithRequestId`
        if request_id:
            line["request_id"] = request_id
        fields = getattr(record, "fields", None)  # structured extras: log.info(..., extra={"fields": {...}})
        if isinstance(fields, dict):
            line.update(fields)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        rid = getattr(record, "request_id", None)
        return f"{text} [request {rid}]" if rid and rid not in record.getMessage() else text


def setup_logging(level: str | None = None, fmt: str | None = None, log_requests: bool | None = None) -> None:
    """Configure this process (and, through the environment, its children); None keeps the env's."""
    if level is not None:
        os.environ[LEVEL_ENV] = level
    if fmt is not None:
        os.environ[FORMAT_ENV] = fmt
    if log_requests is not None:
        os.environ[REQUESTS_ENV] = "1" if log_requests else "0"
    level = os.environ.get(LEVEL_ENV, "info").lower()
    fmt = os.environ.get(FORMAT_ENV, "text").lower()
    if level not in LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LEVELS)}; got {level!r}")
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}; got {fmt!r}")
    debug = level == "debug"
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(_WithRequestId())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in QUIET:
        logging.getLogger(name).setLevel(logging.DEBUG if debug else logging.WARNING)
    wanted = os.environ.get(REQUESTS_ENV, "0") == "1"
    requests.setLevel(logging.INFO if wanted else logging.WARNING)
