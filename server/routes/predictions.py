"""Submit, poll, cancel and history (contract §3.1-3.3, §3.6)."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import secrets
import time
from typing import Any

import httpx
from fastapi import APIRouter, Depends, Request
from starlette.concurrency import run_in_threadpool

from server.auth import require_key
from server.capacity import check_can_run
from server.diskspace import check_free_space
from server.inputs import store_inline_media
from server.kernel.errors import CODE_TIMEOUT, ApiError, bad_request
from server.kernel.jobstate import State
from server.predictions import prediction_object, success
from server.routes.body import read_capped
from server.schemas import request_schema, validate_submit
from server.settings import MODEL_ID
from server.state import AppState, state_of
from server.store import IdempotencyConflict, Job, NewJob, QueueFull, StoreBusy
from server.logs import bind_job
from server.wakeup import nudge

log = logging.getLogger("wan_vace.api")
router = APIRouter(dependencies=[Depends(require_key)])

# The body is read by hand (size cap, tolerant validation), so FastAPI cannot infer it: the
# OpenAPI document gets the schema built from the kernel's field table instead.
_SUBMIT_BODY = {
    "requestBody": {"required": True, "content": {"application/json": {"schema": request_schema()}}}
}

_BASE64_WEBHOOK = (
    "webhook callback does not support base64 output, please use the normal API to use base64 output"
)


async def _json_body(request: Request, *, empty: Any = None) -> Any:
    """The parsed JSON body; `empty` (when not None) stands for an empty body."""
    cap = state_of(request).settings.max_request_bytes
    too_large = ApiError(
        413,
        f"request body larger than {cap // 2**20} MB; upload large media first "
        "(POST /api/v3/media/uploads) and send its URL",
    )
    raw = await read_capped(request, cap, too_large)
    if not raw.strip():
        if empty is not None:
            return empty
        raise bad_request("the request body must be a JSON object")
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad_request(f"the request body is not valid JSON ({e})") from None


def _check_webhook_url(url: str) -> None:
    """An absolute http(s) URL with a host: anything else could never be delivered (and some
    malformed URLs would make the dispatcher fail before it can count an attempt)."""
    try:
        parsed = httpx.URL(url)
    except Exception:
        raise bad_request("webhook must be an absolute http(s) URL") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise bad_request("webhook must be an absolute http(s) URL")


def _reads_files(job: Job) -> bool:
    """Whether rendering the job reads its output files (base64 outputs): too slow for the loop."""
    return (
        job.status is State.COMPLETED
        and bool(job.input.get("enable_base64_output"))
        and job.outputs_expired_at is None
    )


async def _rendered(st: AppState, request: Request, job_id: str, job: Job | None = None) -> dict[str, Any]:
    """The job's `data`, built on the event loop itself when that is cheap: one row read by its
    key and, for a queued job, an index count (tens of microseconds; a thread hop costs more
    than the query, measured under wrk). The reads run in the store's nonblocking mode, so a
    store locked by another connection cannot stall the loop; then, and for base64 outputs
    (file reads), the answer is built in the thread pool instead: one hop."""
    try:
        with st.store.nonblocking():
            job = job or _get_or_404(st, job_id)
            if not _reads_files(job):
                return _data(st, request, job)
    except StoreBusy:
        pass
    found = job
    return await run_in_threadpool(lambda: _data(st, request, found or _get_or_404(st, job_id)))


def _data(st: AppState, request: Request, job: Job) -> dict[str, Any]:
    data = prediction_object(job, st.base_url(request), storage=st.storage)
    if job.status is State.CREATED:
        # Extension: where a queued job stands (peers' users ask for it; WaveSpeed has none).
        data["queue_position"] = st.store.queue_position(job)
    return data


@router.post(f"/api/v3/{MODEL_ID}", openapi_extra=_SUBMIT_BODY)
@router.post(f"/api/v2/{MODEL_ID}", openapi_extra=_SUBMIT_BODY)
async def submit(request: Request) -> dict[str, Any]:
    st = state_of(request)
    body = await _json_body(request)
    inp, ignored = validate_submit(body)
    if ignored:
        log.info("submit: ignored unknown fields %s", ", ".join(sorted(ignored)))
    webhook = request.query_params.get("webhook") or inp.get("webhook_url")
    if webhook and inp["enable_base64_output"]:
        raise ApiError(400, _BASE64_WEBHOOK)
    if webhook:
        _check_webhook_url(webhook)
    inp["webhook_url"] = webhook or None
    job_id = secrets.token_hex(16)
    base = st.base_url(request)
    key = request.headers.get("idempotency-key")
    # The hash is over the request as sent (the JSON body, and the `?webhook=` query, which is
    # part of the request too), so a retried POST matches and a different one conflicts.
    req_hash = None
    if key:
        hashed: Any = body
        if request.query_params.get("webhook"):
            hashed = {"body": body, "webhook": request.query_params["webhook"]}
        req_hash = hashlib.sha256(json.dumps(hashed, sort_keys=True).encode()).hexdigest()
    s = st.settings
    limits = {"image": s.max_image_bytes, "video": s.max_video_bytes}

    def create() -> tuple[Job, bool]:
        # Before anything is stored: a job no worker can run is refused now, not queued
        # forever, and one the disk has no room for (507) before the disk is full. In the same
        # thread hop as the insert: each hop costs more than these checks.
        check_can_run(st, inp)
        check_free_space(st.settings)
        stored = store_inline_media(inp, job_id, st.storage, base, limits)
        job, created = st.store.create(
            NewJob(
                id=job_id,
                model=MODEL_ID,
                input=stored,
                base_url=base,
                max_attempts=s.max_attempts,
                webhook_url=inp["webhook_url"],
                idempotency_key=key,
                request_hash=req_hash,
            ),
            max_queue=s.max_queue,
        )
        if created:  # committed: idle workers on this host claim it now, not at their next poll
            nudge(s.data_dir)
        return job, created

    bind_job(job_id)
    try:
        job, created = await run_in_threadpool(create)
    except QueueFull:
        raise ApiError(
            429, f"The queue is full ({s.max_queue} jobs waiting); retry later.", headers={"Retry-After": "5"}
        ) from None
    except IdempotencyConflict:
        raise ApiError(
            409, "Idempotency-Key was already used with a different request body"
        ) from None

    if inp["enable_sync_mode"]:
        job = await _wait_for(st, job.id, s.sync_timeout)
        data = await _rendered(st, request, job.id, job)
        if not job.status.terminal:
            # [compat] The SDKs recognise this exact form as a sync-mode timeout (contract §3.3).
            data["code"] = CODE_TIMEOUT
            data["error"] = (
                f"Sync mode timed out after {s.sync_timeout:g} s; the prediction continues, "
                f"poll {data['urls']['get']}"
            )
            data["status"] = State.PROCESSING.value
        return success(data)
    return success(await _rendered(st, request, job.id, job))


async def _wait_for(st: AppState, job_id: str, budget: float) -> Job:
    """The job once terminal, or as it stands when `budget` runs out. Woken by the store's
    finished-job events where it has them (server/notify.py: one listener per process, a read
    every second as a fallback), else it reads the job every 0.1 s."""
    deadline = time.monotonic() + budget
    with st.finished.watch(job_id) as finished:  # before the first read: no event is missed
        while True:
            job = await run_in_threadpool(st.store.get, job_id)
            assert job is not None
            left = deadline - time.monotonic()
            if job.status.terminal or left <= 0:
                return job
            await finished.wait(min(left, st.finished.poll_interval))


def _get_or_404(st: AppState, job_id: str) -> Job:
    job = st.store.get(job_id)
    if job is None:
        raise ApiError(404, f"Prediction {job_id} not found")
    return job


@router.get("/api/v3/predictions/{job_id}/result")
@router.get("/api/v3/predictions/{job_id}")
@router.get("/api/v2/predictions/{job_id}/result")
@router.get("/api/v2/predictions/{job_id}")
async def result(job_id: str, request: Request) -> dict[str, Any]:
    bind_job(job_id)
    return success(await _rendered(state_of(request), request, job_id))


@router.post("/api/v3/predictions/{job_id}/cancel")
@router.delete("/api/v3/predictions/{job_id}")
def cancel(job_id: str, request: Request) -> dict[str, Any]:
    """Extension (WaveSpeed has none): queued jobs end at once; a running job is marked
    cancelled now and its worker stops at the next denoising step."""
    bind_job(job_id)
    st = state_of(request)
    job, changed = st.store.cancel(job_id)
    if job is None:
        raise ApiError(404, f"Prediction {job_id} not found")
    if not changed and job.status is not State.CANCELLED:
        raise ApiError(
            409,
            f"Prediction {job_id} already finished with status {job.status.value}; "
            "only created or processing predictions can be cancelled",
        )
    data = _data(st, request, job)
    data["cancel"] = "cancelled" if changed else "already cancelled"
    return success(data)


@router.post("/api/v3/predictions")
async def history(request: Request) -> dict[str, Any]:
    """Paged history (CLI, desktop app): body {page, page_size, status?, created_after?,
    created_before?, model?, include_inputs?}; timestamps as RFC 3339 or unix seconds; newest
    first. Extension: a full page's answer carries `next_cursor`; sent back as `cursor` (with
    the same filters), it reads the page after that one: pages read so neither overlap nor miss a job while
    new ones arrive (page numbers shift by the jobs created meanwhile). A page costs the same
    at any table size; a far page number only steps over index entries to find its start."""
    st = state_of(request)
    body = await _json_body(request, empty={})
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    page = _int_param(body, "page", 1, 1, 10**6)
    page_size = _int_param(body, "page_size", 20, 1, 100)
    status = body.get("status") or None
    if status is not None and (not isinstance(status, str) or status not in {s.value for s in State}):
        raise bad_request(f"status must be one of {', '.join(s.value for s in State)}")
    model = body.get("model") or None
    if model is not None and not isinstance(model, str):
        raise bad_request("model must be a string")
    if model is not None and model != MODEL_ID:
        # This server runs one model: a filter on any other matches nothing.
        return success({"page": page, "page_size": page_size, "total": 0, "items": []})
    after = _time_param(body, "created_after")
    before = _time_param(body, "created_before")
    cursor = _cursor_param(body)
    jobs, total = await run_in_threadpool(
        lambda: st.store.history(
            page=page,
            page_size=page_size,
            status=status,
            created_after=after,
            created_before=before,
            cursor=cursor,
        )
    )
    base = st.base_url(request)
    items = []
    for j in jobs:
        d = prediction_object(
            j, base, storage=st.storage, include_input=bool(body.get("include_inputs")), base64_outputs=False
        )
        d["execution_time"] = d["executionTime"]
        items.append(d)
    data = {"page": page, "page_size": page_size, "total": total, "items": items}
    if len(jobs) == page_size:  # there may be more (the next page can be empty)
        data["next_cursor"] = _cursor_of(jobs[-1])
    return success(data)


def _cursor_of(job: Job) -> str:
    """Opaque to clients: the (created_at, id) the next page starts after."""
    raw = json.dumps([job.created_at, job.id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _cursor_param(body: dict[str, Any]) -> tuple[float, str] | None:
    v = body.get("cursor")
    if v in (None, ""):
        return None
    invalid = bad_request("cursor must be a next_cursor from an earlier history answer")
    if not isinstance(v, str):
        raise invalid
    try:
        key = json.loads(base64.urlsafe_b64decode(v + "=" * (-len(v) % 4)))
    except ValueError:  # not base64, not UTF-8 or not JSON
        raise invalid from None
    if not (isinstance(key, list) and len(key) == 2 and isinstance(key[1], str)):
        raise invalid
    if isinstance(key[0], bool) or not isinstance(key[0], (int, float)):
        raise invalid
    return float(key[0]), key[1]


def _int_param(body: dict[str, Any], name: str, default: int, lo: int, hi: int) -> int:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise bad_request(f"{name} must be an integer between {lo} and {hi}")
    return v


def _time_param(body: dict[str, Any], name: str) -> float | None:
    from datetime import datetime

    v = body.get(name)
    if v in (None, ""):
        return None
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    if isinstance(v, str):
        try:
            return datetime.fromisoformat(v.replace("Z", "+00:00")).timestamp()
        except ValueError:
            pass
    raise bad_request(f"{name} must be an RFC 3339 time or unix seconds")
