"""Every error the server can report, and the one place each kind is mapped to its wire form.

Two families, because WaveSpeed reports failures at two levels:
- `ApiError`: the HTTP request itself is refused (bad input, auth, unknown id, queue full). It
  becomes a non-2xx response in the envelope `{code, message, error, data}` (contract §5).
- `TaskError`: an accepted job fails. It becomes `status: "failed"` with a task `code` from the
  contract's table (1400-1405, 5000...) and `error` text on an HTTP 200 poll (contract §4).

This module has no heavy imports: the worker, the media fetcher and `pipelines/` raise TaskError
subclasses and the worker maps them with `task_error_of`.

Messages of deterministic failures must not contain "HTTP 5", "429", "timeout" or "connection":
WaveSpeed SDKs with `max_retries>0` re-submit (paid) tasks whose error text contains those markers
(contract §5). Only genuinely transient failures may use them.
"""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    """An HTTP-level refusal; `status` is both the HTTP status and the envelope's `code`."""

    def __init__(self, status: int, message: str, *, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def bad_request(message: str) -> ApiError:
    return ApiError(400, message)


def envelope_for_error(status: int, message: str) -> dict[str, Any]:
    """The error body every non-2xx answer carries: clients read `message` (MCP, CLI, desktop),
    `error` (ComfyUI on GETs, base64 doc), or `code` (code-checking clients); `data` is null."""
    return {"code": status, "message": message, "error": message, "data": None}


# Task error codes from WaveSpeed's error-code table (contract §4).
CODE_OK = 0
CODE_MISSING_PARAMETER = 1400
CODE_INVALID_PARAMETER = 1401
CODE_MEDIA_ACCESS = 1402
CODE_EXECUTION_FAILED = 1403
CODE_TASK_FAILED = 1405
CODE_INTERNAL = 5000
CODE_UNAVAILABLE = 5003
CODE_TIMEOUT = 5004


class TaskError(Exception):
    """A job failure with a WaveSpeed task code. `retryable` marks conditions where running the
    same job again could succeed (the worker then re-queues it while attempts remain)."""

    code = CODE_TASK_FAILED
    retryable = False

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidParameter(TaskError):
    """The request is well-formed but cannot be honoured (e.g. an image with no pixels)."""

    code = CODE_INVALID_PARAMETER


class MediaAccessError(TaskError):
    """A media input could not be fetched or decoded. Messages name the field."""

    code = CODE_MEDIA_ACCESS


class NotSupportedYet(TaskError):
    """A field the API accepts but this server cannot act on yet: the job fails clearly rather
    than silently ignoring what the caller asked for."""

    code = CODE_INVALID_PARAMETER


class ExecutionFailed(TaskError):
    code = CODE_EXECUTION_FAILED


class JobCancelled(Exception):
    """Raised from the denoising callback when a job's cancel flag is set; not a failure."""


class LeaseLost(Exception):
    """Raised when the worker no longer holds a job's lease: another worker may own it now, so
    this one must stop and write nothing."""


def task_error_of(exc: BaseException) -> tuple[int, str]:
    """Map any exception raised while running a job to (task code, message)."""
    if isinstance(exc, TaskError):
        return exc.code, exc.message
    if isinstance(exc, MemoryError):
        return CODE_EXECUTION_FAILED, "The job ran out of memory."
    name = type(exc).__name__
    if name == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError, without importing torch here
        return CODE_EXECUTION_FAILED, "The GPU ran out of memory for this job."
    return CODE_INTERNAL, f"Internal error while running the job ({name}: {exc})"
