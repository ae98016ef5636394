"""One job, start to end: fetch its media, run it, store the outputs, record the outcome.

Strictness is the point: a job is `completed` only after its output is in storage; a cancelled
job or one whose lease was lost writes nothing (another worker may own it now); every other
failure becomes a task error with a code and a message (`server.kernel.errors.task_error_of`),
re-queued when it is transient and attempts remain.

A full or failing disk is not the job's fault: storing an output that the disk refuses, and
recording the outcome while the store is unavailable, are retried with backoff until they
succeed (server/worker/retry.py), the lease renewed by the heartbeat meanwhile; they end early
only if the job is cancelled or taken over, or the worker stops (the job is then handed back or
its lease runs out). A render that runs out of disk fails retryably. The job's work dir is
removed whatever happens; a dead worker's work dirs are removed by the supervisor
(`remove_work_dirs`).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from server.diskspace import is_disk_full
from server.kernel.errors import CODE_INTERNAL, JobCancelled, LeaseLost, task_error_of
from server.kernel.jobstate import RenewResult
from server.kernel.request import VaceRequest
from server.kernel.runner import Runner
from server.settings import Settings
from server.storage import Storage
from server.store import Job, JobStore
from server.worker.fetching import fetch_inputs
from server.worker.retry import Outage, Stopped, retry_until, transient

log = logging.getLogger("wan_vace.worker")

T = TypeVar("T")


def _work_dir_prefix(worker_id: str, job_id: str = "") -> str:
    return f"wan-vace-{worker_id}-{job_id}"


def remove_work_dirs(worker_id: str) -> int:
    """Remove the work dirs a worker left behind (it died, or exited mid-job); returns how many."""
    n = 0
    for p in Path(tempfile.gettempdir()).glob(_work_dir_prefix(worker_id) + "*"):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
            n += 1
    return n


class JobRun:
    def __init__(
        self,
        settings: Settings,
        worker_id: str,
        store: JobStore,
        storage: Storage,
        runner: Runner,
        job: Job,
        *,
        stop: threading.Event | None = None,
        outage: Outage | None = None,
    ):
        self.s, self.worker_id, self.store, self.storage = settings, worker_id, store, storage
        self.runner, self.job = runner, job
        self.stop = stop or threading.Event()  # the worker's: set when it stops
        self.outage = outage or Outage(f"worker {worker_id}", log)

    def progress(self, fraction: float | None) -> None:
        """Renew the lease with the job's progress; stop the job if it was cancelled or lost.
        While the store is unavailable the job goes on (the heartbeat keeps trying too)."""
        try:
            res = self.store.renew(self.job.id, self.worker_id, self.s.lease_seconds, progress=fraction)
        except Exception as e:
            if not transient(e):
                raise
            self.outage.failed(e)
            return
        if res == RenewResult.CANCELLED:
            raise JobCancelled(self.job.id)
        if res == RenewResult.LOST:
            raise LeaseLost(self.job.id)
        self.outage.ok()

    def _check_lease(self) -> None:
        self.progress(None)

    def _put(self, call: Callable[[], T]) -> T:
        """A storage write, retried while the disk refuses it, as long as the job is ours."""
        return retry_until(call, outage=self.outage, stop=self.stop, between=self._check_lease)

    def execute(self) -> None:
        job = self.job
        try:
            outcome = self._run()
        except JobCancelled:
            log.info("job %s cancelled", job.id)
            return
        except LeaseLost:
            log.warning("job %s: lease lost, stopping without writing", job.id)
            return
        except Stopped:
            log.info("job %s: the worker stops before its outputs could be stored", job.id)
            return
        except Exception as e:
            code, message = task_error_of(e)
            retryable = getattr(e, "retryable", False)
            if is_disk_full(e):  # not the job's fault: run it again once there is room
                code, retryable = CODE_INTERNAL, True
                message = f"The server ran out of disk space while running this job ({e})"
                log.warning("job %s failed: %s", job.id, message)
            elif code == CODE_INTERNAL:
                log.exception("job %s failed", job.id)
            else:
                log.info("job %s failed: %s", job.id, message)
            self._record(
                lambda: self.store.fail(
                    job.id,
                    self.worker_id,
                    code=code,
                    error=message,
                    retryable=retryable,
                    retry_delay=self.s.retry_delay,
                )
            )
            return
        done = self._record(lambda: self.store.complete(job.id, self.worker_id, **outcome))
        if done is False:
            log.info("job %s finished but was cancelled or taken over meanwhile", job.id)

    def _record(self, call: Callable[[], T]) -> T | None:
        """Record the outcome, retried while the store is unavailable; None if the worker stops
        first (a graceful stop hands the job back; otherwise its lease runs out)."""
        try:
            return retry_until(call, outage=self.outage, stop=self.stop)
        except Stopped:
            log.warning("job %s: the worker stops before the outcome could be recorded", self.job.id)
            return None

    def _run(self) -> dict[str, Any]:
        """Fetch, render and store the outputs; the arguments of `complete`."""
        job = self.job
        req = VaceRequest.from_input(job.input)
        prefix = _work_dir_prefix(self.worker_id, job.id) + "-"
        with tempfile.TemporaryDirectory(prefix=prefix, ignore_cleanup_errors=True) as tmp:
            bases = [b for b in (job.base_url, self.s.public_url) if b]
            media = fetch_inputs(req, settings=self.s, storage=self.storage, base_urls=bases)
            self.progress(0.0)
            result = self.runner.run(req, media, Path(tmp), self.progress)
            out_key = self._put(
                lambda: self.storage.put_file(
                    self.storage.new_key(f"outputs/{job.id}", "output.mp4"), result.video_path
                )
            )
            extra: dict[str, Any] = {
                "safety_checked": result.safety_checked,
                "render_size": list(result.render_size),
            }
            if result.conditioning:
                extra["conditioning"] = self._store_conditioning(result.conditioning)
            if result.notes:
                extra["preprocessing"] = result.notes
        return {
            "outputs": [out_key],
            "has_nsfw": [result.has_nsfw],
            "inference_ms": result.inference_ms,
            "seed": result.seed,
            "extra": extra,
        }

    def _store_conditioning(self, cond: dict[str, Any]) -> dict[str, Any]:
        prefix = f"conditioning/{self.job.id}"

        def put(p: Path) -> str:
            return self._put(lambda: self.storage.put_file(self.storage.new_key(prefix, p.name), p))

        out: dict[str, Any] = {}
        for name, value in cond.items():
            if isinstance(value, Path):
                out[name] = put(value)
            elif isinstance(value, list):
                out[name] = [put(p) for p in value]
            else:
                out[name] = value
        return out
