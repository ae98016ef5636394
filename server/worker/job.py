"""One job, start to end: fetch its media, run it, store the outputs, record the outcome.

In two stages for a runner that has them (server/kernel/runner.py): `render` (fetch, then the
runner's device stage) and `finish` (the runner's CPU stage, storing the outputs, `complete`),
run by the worker's two stage threads (server/worker/loop.py), the job's work dir kept between
them; `execute` runs a runner with only `run` as one stage. Each stage fails, stops or completes
the job by the same rules.

Strictness is the point: a job is `completed` only after its output is in storage; a cancelled
job or one whose lease was lost writes nothing (another worker may own it now: the CPU stage
checks before it starts and before it stores anything, and at each progress call); every other
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
from server.kernel.runner import Media, Rendered, Runner, RunResult
from server.logs import job_context
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
        self.workdir: Path | None = None  # made by the device stage, removed by the last one
        self._superseded = False
        # A failure that leaves the runner unusable (`fatal`: a multi-GPU group that lost a
        # rank); the job is recorded as failed or re-queued, then the worker must restart.
        self.fatal: Exception | None = None

    def supersede(self) -> None:
        """This worker claimed the job again (its lease was lost meanwhile): this run is over
        and writes nothing, at its next progress call."""
        self._superseded = True

    def progress(self, fraction: float | None) -> None:
        """Renew the lease with the job's progress; stop the job if it was cancelled or lost.
        While the store is unavailable the job goes on (the heartbeat keeps trying too)."""
        if self._superseded:
            raise LeaseLost(self.job.id)
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

    def _claimed(self) -> None:
        log.info("job %s claimed (attempt %d of %d)", self.job.id, self.job.attempts, self.job.max_attempts)

    def execute(self) -> None:
        """Both stages in this thread: a runner with only `run`."""
        with job_context(self.job.id):
            self._execute()

    def _execute(self) -> None:
        self._claimed()
        try:
            outcome = self._guard(lambda: self._store(self.runner.run(*self._prepare(), self.progress)))
            if outcome is not None:
                self._complete(outcome)
        finally:
            self.remove_workdir()

    def render(self) -> Rendered | None:
        """The device stage: fetch the media and render. None when the job ended here (failed,
        cancelled, taken over, the worker stops): its work dir is removed then; otherwise it
        is kept for `finish`, which the caller must run (or `abandon`)."""
        with job_context(self.job.id):  # every line logged for this job carries its id
            self._claimed()
            return self._render()

    def _render(self) -> Rendered | None:
        rendered = self._guard(lambda: self.runner.render(*self._prepare(), self.progress))
        if rendered is None:
            self.remove_workdir()
        return rendered

    def finish(self, rendered: Rendered) -> None:
        """The CPU stage: encode, store the outputs, record the outcome; a failure here fails
        the job as one in `render` does. The work dir is removed whatever happens."""
        with job_context(self.job.id):
            self._finish_stage(rendered)

    def _finish_stage(self, rendered: Rendered) -> None:
        try:
            outcome = self._guard(lambda: self._store(self._finish(rendered)))
            if outcome is not None:
                self._complete(outcome)
        finally:
            self.remove_workdir()

    def abandon(self) -> None:
        """A rendered job that never reached the CPU stage (the worker stops): write nothing;
        the stop hands it back."""
        log.info("job %s: the worker stops before its outputs could be stored", self.job.id)
        self.remove_workdir()

    def remove_workdir(self) -> None:
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def _guard(self, step: Callable[[], T]) -> T | None:
        """`step()`, or None when it ended the job: cancelled, lost or stopped (nothing written),
        or failed (the failure recorded)."""
        job = self.job
        try:
            return step()
        except JobCancelled:
            log.info("job %s cancelled", job.id)
        except LeaseLost:
            log.warning("job %s: lease lost, stopping without writing", job.id)
        except Stopped:
            log.info("job %s: the worker stops before its outputs could be stored", job.id)
        except Exception as e:
            self._fail(e)
        return None

    def _fail(self, e: Exception) -> None:
        job = self.job
        if getattr(e, "fatal", False):
            self.fatal = e
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

    def _complete(self, outcome: dict[str, Any]) -> None:
        if self._superseded:  # stored, but the job is another run's now: that run records it
            log.warning("job %s: lease lost, stopping without recording the outcome", self.job.id)
            return
        done = self._record(lambda: self.store.complete(self.job.id, self.worker_id, **outcome))
        if done is False:
            log.info("job %s finished but was cancelled or taken over meanwhile", self.job.id)

    def _record(self, call: Callable[[], T]) -> T | None:
        """Record the outcome, retried while the store is unavailable; None if the worker stops
        first (a graceful stop hands the job back; otherwise its lease runs out)."""
        try:
            return retry_until(call, outage=self.outage, stop=self.stop)
        except Stopped:
            log.warning("job %s: the worker stops before the outcome could be recorded", self.job.id)
            return None

    def _prepare(self) -> tuple[VaceRequest, Media, Path]:
        """The typed request, its fetched media and a fresh work dir: what a runner starts from."""
        job = self.job
        req = VaceRequest.from_input(job.input)
        prefix = _work_dir_prefix(self.worker_id, job.id) + "-"
        self.workdir = Path(tempfile.mkdtemp(prefix=prefix))
        bases = [b for b in (job.base_url, self.s.public_url) if b]
        media = fetch_inputs(req, settings=self.s, storage=self.storage, base_urls=bases)
        self.progress(0.0)
        return req, media, self.workdir

    def _finish(self, rendered: Rendered) -> RunResult:
        # The job may have been cancelled or taken over while it waited for the CPU stage.
        self._check_lease()
        assert self.workdir is not None
        return self.runner.finish(rendered, self.workdir, self.progress)

    def _store(self, result: RunResult) -> dict[str, Any]:
        """Put the outputs into storage; the arguments of `complete`."""
        job = self.job
        self._check_lease()  # nothing is stored for a job that is no longer ours
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
