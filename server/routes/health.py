"""Health is a state, not a bare 200 (architecture guideline 7)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from server.capacity import capacity
from server.diskspace import disk_report
from server.state import state_of

router = APIRouter()


def health_report(request: Request) -> dict[str, Any]:
    st = state_of(request)
    cap = capacity(st)
    state, reason, workers, live = cap.state, cap.reason, cap.workers, cap.live
    counts = st.store.count_by_status()
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
        # Free space of the data dir; `ok` false (with a reason) below the free-space floor or
        # after a write failed for want of space: submits and uploads answer 507 meanwhile.
        "disk": disk_report(st.settings, st.store, st.storage),
        # What storage holds and the retention settings, as of the last cleanup pass (never a
        # walk per call); null sizes until the first pass.
        "storage": st.retention.report() if st.retention is not None else None,
        "auth": "open" if st.auth.open else "api key",
    }


@router.get("/health")
def health(request: Request) -> dict[str, Any]:
    return health_report(request)


@router.get("/health/ready")
def ready(request: Request) -> JSONResponse:
    """For load balancers and orchestrators: 200 only when a worker can take jobs and the disk
    has room for them."""
    rep = health_report(request)
    ok = rep["status"] in ("ready", "busy") and rep["disk"]["ok"]
    return JSONResponse(rep, 200 if ok else 503)

