"""Health is a state, not a bare 200 (architecture guideline 7)."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from server.state import state_of

router = APIRouter()

# A worker whose heartbeat is older than this is not counted as alive.
_STALE_S = 15.0


def health_report(request: Request) -> dict[str, Any]:
    st = state_of(request)
    now = time.time()
    sup = st.supervisor
    local = sup.snapshot() if sup is not None else {}
    workers = []
    for w in st.store.workers():
        if w.state == "stopped":
            continue
        alive = now - w.heartbeat_at < max(_STALE_S, st.settings.lease_seconds)
        if w.id in local:
            alive = alive and local[w.id]["alive"]
        elif sup is not None and sup.owns_host(w.host) and not alive:
            continue  # a worker of an earlier run of this server: gone, not our concern now
        workers.append(
            {
                "id": w.id,
                "pid": w.pid,
                "host": w.host,
                "state": w.state if alive else "dead",
                "reason": w.reason,
                "alive": alive,
                "heartbeat_age_s": round(now - w.heartbeat_at, 1),
                "model": w.model,
                **w.info,
            }
        )
    live = [w for w in workers if w["alive"]]
    counts = st.store.count_by_status()
    expected = st.settings.workers
    if any(w["state"] == "busy" for w in live):
        state, reason = "busy", ""
    elif any(w["state"] == "ready" for w in live):
        state, reason = "ready", ""
    elif any(w["state"] == "loading" for w in live):
        state, reason = "loading", "loading model weights"
    elif sup is not None and sup.failed_reason:
        state, reason = "failed", sup.failed_reason
    elif expected == 0 and not workers:
        state, reason = "ready", "API only (--workers 0): jobs wait for external workers"
    else:
        failed = [w for w in workers if w["state"] == "failed"]
        state = "failed" if failed else "starting"
        reason = failed[0]["reason"] if failed else "starting worker processes"
    model_info = next((w for w in live if w.get("render")), live[0] if live else {})
    return {
        "status": state,
        "reason": reason,
        "model": {
            "name": st.settings.model,
            "kind": model_info.get("kind"),
            "render": model_info.get("render"),
        },
        # From a live worker: which tasks its runner can run now (or what is missing), and
        # which safety checker it runs.
        "tasks": model_info.get("tasks", {}),
        "safety_checker": model_info.get("safety_checker", "unknown until a worker is ready"),
        "queue_depth": counts.get("created", 0),
        "running": counts.get("processing", 0),
        "jobs": counts,
        "workers": workers,
        "auth": "open" if st.auth.open else "api key",
    }


@router.get("/health")
def health(request: Request) -> dict[str, Any]:
    return health_report(request)


@router.get("/health/ready")
def ready(request: Request) -> JSONResponse:
    """For load balancers and orchestrators: 200 only when a worker can take jobs."""
    rep = health_report(request)
    return JSONResponse(rep, 200 if rep["status"] in ("ready", "busy") else 503)
