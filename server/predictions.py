"""The prediction object: how a stored job looks on the wire (contract §4), in poll answers,
sync-mode answers and webhook bodies. No FastAPI here: the webhook dispatcher builds its bodies
with the same code when it delivers them.

A job whose files retention deleted (server/retention.py) still answers `completed`, and keeps
its `outputs` as the URLs they were (the WaveSpeed SDKs read `outputs` as a list of URLs; those
URLs now answer 410 Gone with a message saying when and why), with two extensions:
`outputs_expired: true` and `outputs_expired_at`. A job that asked for base64 outputs gets the
URLs too once expired: there are no bytes left to encode.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from server.kernel.jobstate import State
from server.storage import Storage
from server.store import Job


def rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="microseconds").replace(
        "+00:00", "Z"
    )


def result_url(base_url: str, job_id: str) -> str:
    return f"{base_url.rstrip('/')}/api/v3/predictions/{job_id}/result"


def prediction_object(
    job: Job,
    base_url: str,
    *,
    storage: Storage,
    include_input: bool = False,
    base64_outputs: bool = True,
) -> dict[str, Any]:
    """The `data` object for a job. Outputs are absolute URLs on `base_url` (as the storage
    names them), or bare base64 strings when the job asked for `enable_base64_output` and
    `base64_outputs` is left on (history and webhook bodies list URLs)."""
    completed = job.status is State.COMPLETED
    expired = job.outputs_expired_at is not None
    keys = job.outputs if completed else []
    outputs = [storage.url(base_url, k) for k in keys]
    if completed and not expired and job.input.get("enable_base64_output") and base64_outputs:
        try:
            outputs = [base64.b64encode(storage.read_bytes(k)).decode("ascii") for k in keys]
        except KeyError:  # deleted by retention a moment before the row says so: the URLs
            pass
    inference_ms = job.inference_ms or 0
    data: dict[str, Any] = {
        "id": job.id,
        "model": job.model,
        "outputs": outputs,
        "urls": {"get": result_url(base_url, job.id)},
        # One per output (contract §4). `safety_checked` says whether a checker actually ran
        # (its weights may be missing, or the request turned it off); /health says which.
        "has_nsfw_contents": list(job.has_nsfw) if completed else [],
        "status": job.status.value,
        "created_at": rfc3339(job.created_at),
        "error": job.error if job.status in (State.FAILED, State.CANCELLED) else "",
        "code": job.code if job.status is State.FAILED else 0,
        "executionTime": inference_ms,
        "timings": {"inference": inference_ms},
        # Extensions: extra fields are safe for every client read (contract §8).
        "progress": round(job.progress, 4),
        "attempts": job.attempts,
    }
    if job.seed is not None:
        data["seed"] = job.seed
    if job.outputs_expired_at is not None:
        data["outputs_expired"] = True
        data["outputs_expired_at"] = rfc3339(job.outputs_expired_at)
    if completed:
        data["safety_checked"] = bool(job.extra.get("safety_checked", False))
        if job.extra.get("render_size"):
            # What the model actually rendered before scaling (the tiny model renders small).
            data["render_size"] = list(job.extra["render_size"])
        if job.extra.get("preprocessing"):
            # e.g. task face: which references had a face cropped, and by which detector.
            data["preprocessing"] = job.extra["preprocessing"]
        cond = job.extra.get("conditioning")
        if cond:
            data["conditioning"] = _conditioning_urls(cond, base_url, storage.url)
    if include_input:
        data["input"] = job.input
    return data


def _conditioning_urls(cond: dict[str, Any], base_url: str, url: Callable[[str, str], str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in cond.items():
        if isinstance(value, list):
            out[name] = [url(base_url, k) for k in value]
        elif isinstance(value, str) and "/" in value:
            out[name] = url(base_url, value)
        else:
            out[name] = value
    return out


def success(data: Any) -> dict[str, Any]:
    """The success envelope: never a top-level `error` key, never `data: null` (contract §9)."""
    return {"code": 200, "message": "success", "data": data}
