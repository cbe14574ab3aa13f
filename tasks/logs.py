"""Logging of every Trifecta process (API, workers, `trifecta up`): plain text or JSON lines.

With LOG_FORMAT=json, one JSON object per line for a log pipeline (Loki, Elasticsearch, Cloud Logging).

A JSON line always has `time`, `level`, `logger` and `message`, and `job_id`, `model`,
`tenant`, `worker`, `device` and `trace_id` where they are known:

- a process binds what holds for all its lines once (`bind_process(worker=..., model=...)`);
- a block binds what holds inside it (`with log_context(job_id=..., tenant=...)`: a contextvar,
  so it follows asyncio tasks and stays in its thread);
- a line passes its own (`log.info(..., extra={"job_id": ..., "status": ...})`);
- `trace_id` comes from the current OpenTelemetry span when tracing is on (tasks/tracing.py).

The lines of this code base name their job as `job=<id>` in the message; the JSON field is
lifted from there when a line did not pass it, so every line about a job carries `job_id`.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from tasks import tracing

FIELDS = ("job_id", "model", "tenant", "worker", "device", "trace_id")
_process: dict[str, str] = {}
_context: ContextVar[dict[str, Any] | None] = ContextVar("trifecta_log_context", default=None)
_JOB = re.compile(r"\bjob=([0-9a-f]{32})\b")
_MODEL = re.compile(r"\bmodel=([a-z0-9_]+)\b")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


def bind_process(**fields: Any) -> None:
    """Fields every later line of this process carries (a worker's id, model and device)."""
    _process.update({k: str(v) for k, v in fields.items() if v is not None})


@contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Fields every line logged inside the block carries."""
    token = _context.set({**(_context.get() or {}), **{k: v for k, v in fields.items() if v is not None}})
    try:
        yield
    finally:
        _context.reset(token)


class ContextFilter(logging.Filter):
    """Adds the known context fields to each record (a field the line passed itself wins)."""

    def filter(self, record: logging.LogRecord) -> bool:
        d = record.__dict__
        for k, v in _process.items():
            d.setdefault(k, v)
        for k, v in (_context.get() or {}).items():
            d.setdefault(k, v)
        if "job_id" not in d or "model" not in d:
            msg = record.getMessage()
            if "job_id" not in d and (m := _JOB.search(msg)):
                d["job_id"] = m.group(1)
            if "model" not in d and (m := _MODEL.search(msg)):
                d["model"] = m.group(1)
        if "trace_id" not in d and tracing.ON and (t := tracing.trace_id()):
            d["trace_id"] = t
        return True


def json_formatter() -> logging.Formatter:
    # python-json-logger's orjson formatter: every extra field of a record becomes a key, an
    # exception's traceback becomes the `exc_info` string, so one record is always one line
    from pythonjsonlogger.core import RESERVED_ATTRS
    from pythonjsonlogger.orjson import OrjsonFormatter

    return OrjsonFormatter(
        "{levelname}{name}{message}",
        style="{",
        reserved_attrs=[*RESERVED_ATTRS, "color_message"],  # uvicorn's ANSI-coloured copy of its message
        rename_fields={"levelname": "level", "name": "logger"},
        timestamp="time",  # ISO 8601 in UTC, from the record's creation time
    )


_installed: list[logging.Handler] = []
_format: list[str] = []


def setup(level: str | int = "INFO", fmt: str | None = None, force: bool = False) -> None:
    """Configure the root logger once per process (later calls change nothing unless `force`).
    `fmt`: "text" or "json"; default LOG_FORMAT."""
    root = logging.getLogger()
    if _format and not force:
        return
    if fmt is None:
        # LOG_FORMAT (tasks.settings documents and validates it) read straight from the
        # environment: every CLI command sets up logging first, and the client commands
        # (submit, status, cancel) would otherwise pay for loading the settings class
        fmt = next((v for k, v in os.environ.items() if k.upper() == "LOG_FORMAT"), "text").strip().lower()
        fmt = fmt if fmt in ("text", "json") else "text"
    if fmt != "json" and root.handlers and not _installed:  # as logging.basicConfig: keep a handler set up before
        root.setLevel(level.upper() if isinstance(level, str) else level)
        _format[:] = [fmt]
        return
    handler = logging.StreamHandler()  # stderr, as logging.basicConfig
    handler.setFormatter(json_formatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    handler.addFilter(ContextFilter())
    for h in _installed:
        root.removeHandler(h)
    _installed[:] = [handler]
    _format[:] = [fmt]
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    if fmt == "json":
        for h in list(root.handlers):  # a handler someone set up before (basicConfig) would write text lines
            if h is not handler:
                root.removeHandler(h)
        logging.captureWarnings(True)  # warnings.warn lines, too, become JSON records


def is_json() -> bool:
    """Whether this process writes JSON lines (its other output, such as banners, should too)."""
    return _format == ["json"]
