"""Logging of the `wan-vace` processes: the API (with uvicorn's own loggers) and each worker.

`configure(settings)` sets up the root logger once per process, at `settings.log_level`, in
`settings.log_format`: "text" (lines for a person at a terminal) or "json" (one object a line
for a log pipeline: `time` in RFC 3339 UTC, `level`, `logger`, `message`, `job_id` while a job
is known, `worker` in a worker process, `exc_info` with a traceback, and the request's method,
path and status on uvicorn's access lines).

The job id travels in a context variable, not in each call: the worker binds it around the job
it runs (`job_context`), an API route that acts on one job binds it for its request
(`bind_job`), and every record logged meanwhile, by any module, carries it. A context variable
follows the request or the job into the functions and tasks it calls and no further, so two
requests served side by side never see each other's id.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import IO, Any

from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter

from server.settings import Settings

JOB_ID: ContextVar[str | None] = ContextVar("wan_vace_job_id", default=None)

TEXT_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"
_ACCESS_LOGGER = "uvicorn.access"
# uvicorn's records carry a coloured copy of their message for its own terminal formatter; a
# JSON line would repeat it with escape codes.
_SKIPPED = (*RESERVED_ATTRS, "color_message")


def bind_job(job_id: str) -> None:
    """Carry `job_id` on every record logged for the rest of this request (an API route's
    context is its own: the id ends with the request)."""
    JOB_ID.set(job_id)


@contextmanager
def job_context(job_id: str) -> Iterator[None]:
    """Carry `job_id` on every record logged inside the block (a worker, around one job)."""
    token = JOB_ID.set(job_id)
    try:
        yield
    finally:
        JOB_ID.reset(token)


class _Context(logging.Filter):
    """Adds what the JSON line says beyond the record itself. On the handler, not a logger, so
    records propagated from every logger (uvicorn's, the libraries') pass through it."""

    def __init__(self, worker: str | None):
        super().__init__()
        self.worker = worker

    def filter(self, record: logging.LogRecord) -> bool:
        job_id = JOB_ID.get()
        if job_id is not None and not hasattr(record, "job_id"):
            record.job_id = job_id
        if self.worker is not None:
            record.worker = self.worker
        if record.name == _ACCESS_LOGGER and isinstance(record.args, tuple) and len(record.args) == 5:
            # uvicorn's access line: (client, method, path, HTTP version, status).
            client, record.method, record.path, _, record.status = record.args
            record.client = client
        return True


def handler(
    settings: Settings, *, worker: str | None = None, stream: IO[str] | None = None
) -> logging.Handler:
    """A stream handler (stderr unless `stream`) formatting as `settings.log_format` says."""
    h = logging.StreamHandler(stream or sys.stderr)
    if settings.log_format == "json":
        h.setFormatter(
            JsonFormatter(
                "{levelname}{name}{message}",
                style="{",
                rename_fields={"levelname": "level", "name": "logger"},
                reserved_attrs=_SKIPPED,
                timestamp="time",
                json_ensure_ascii=False,
            )
        )
        h.addFilter(_Context(worker))
    else:
        prefix = f"worker[{worker}] " if worker else ""
        h.setFormatter(logging.Formatter(TEXT_FORMAT.replace("%(name)s", prefix + "%(name)s", 1)))
    return h


def configure(settings: Settings, *, worker: str | None = None) -> None:
    """Set up this process's root logger, unless something did already: a test runner calling
    the CLI in its own process keeps its capture handlers and levels."""
    if logging.getLogger().handlers:
        return
    logging.basicConfig(level=settings.log_level.upper(), handlers=[handler(settings, worker=worker)])
    # Python's warnings go to stderr as bare text otherwise: one line a pipeline cannot parse.
    logging.captureWarnings(settings.log_format == "json")


def uvicorn_log_config(settings: Settings) -> dict[str, Any] | None:
    """The `log_config` for `uvicorn.run`. JSON: none, so uvicorn's loggers propagate to the
    root handler and its access lines come out as JSON too. Text: uvicorn's own default."""
    if settings.log_format == "json":
        return None
    from uvicorn.config import LOGGING_CONFIG

    return LOGGING_CONFIG
