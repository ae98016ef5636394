"""What the workers can do right now, read from their rows in the store: the service's state
for /health, and the checks submit makes before it accepts a job.

Every worker publishes in its row the tasks its runner can run (`info.tasks`: "ready" or why
not) and the model it serves; so the API process, which never loads a model, knows at submit
time whether a job can run, and refuses one that cannot instead of queueing it forever.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from server.kernel.errors import ApiError
from server.state import AppState

# A worker whose heartbeat is older than this is not counted as alive.
STALE_S = 15.0


@dataclass
class Capacity:
    state: str  # starting | loading | ready | busy | stopping | failed
    reason: str
    workers: list[dict[str, Any]]  # every worker worth showing, as /health lists them
    live: list[dict[str, Any]] = field(default_factory=list)


def capacity(st: AppState) -> Capacity:
    now = time.time()
    sup = st.supervisor
    local = sup.snapshot() if sup is not None else {}
    workers = []
    for w in st.store.workers():
        if w.state == "stopped":
            continue
        alive = now - w.heartbeat_at < max(STALE_S, st.settings.lease_seconds)
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
    # The workers this server runs (its host's plan); without a supervisor (an app built with
    # none), what the settings would plan.
    expected = len(sup.slots) if sup is not None else st.settings.worker_count
    # A `stopping` worker is alive (finishing its jobs) but takes no more: never ready or busy.
    if any(w["state"] == "busy" for w in live):
        state, reason = "busy", ""
    elif any(w["state"] == "ready" for w in live):
        state, reason = "ready", ""
    elif any(w["state"] == "loading" for w in live):
        state, reason = "loading", "loading model weights"
    elif any(w["state"] == "stopping" for w in live):
        state, reason = "stopping", "the workers are stopping: they finish their jobs and take no more"
    elif sup is not None and sup.failed_reason:
        state, reason = "failed", sup.failed_reason
    elif expected == 0 and not workers:
        state, reason = "ready", "API only (--workers 0): no worker is seen yet; jobs wait for one"
    else:
        failed = [w for w in workers if w["state"] == "failed"]
        state = "failed" if failed else "starting"
        reason = failed[0]["reason"] if failed else "starting worker processes"
    return Capacity(state, reason, workers, live)


def check_can_run(st: AppState, inp: dict[str, Any]) -> None:
    """Refuse at submit what no worker can run: 503 when every local worker failed to load its
    model (the jobs would wait forever), 400 when a live worker reports the request's task as
    not runnable (missing weights), naming the tasks that can run. While workers are still
    starting, or none is seen at all with `--workers 0`, jobs are queued as before."""
    cap = capacity(st)
    if cap.state == "failed" and not any(w["state"] in ("loading", "starting") for w in cap.live):
        raise ApiError(
            503, f"No worker can run jobs on this server: {cap.reason}", headers={"Retry-After": "30"}
        )
    if not inp.get("video"):
        return  # the task applies to a video only (with none it is ignored, as on WaveSpeed)
    task = inp["task"]
    reports = [w.get("tasks") or {} for w in cap.live if w.get("tasks")]
    if not reports or any(r.get(task) == "ready" for r in reports):
        return
    runnable = sorted({t for r in reports for t, v in r.items() if v == "ready"})
    why = next((r[task] for r in reports if task in r), "unknown to the workers")
    raise ApiError(
        400,
        f"task {task!r} cannot run on this server ({why}); tasks that can: {', '.join(runnable)}",
    )
