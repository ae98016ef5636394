"""One job, start to end: fetch its media, run it, store the outputs, record the outcome.

Strictness is the point: a job is `completed` only after its output is in storage; a cancelled
job or one whose lease was lost writes nothing (another worker may own it now); every other
failure becomes a task error with a code and a message (`server.kernel.errors.task_error_of`),
re-queued when it is transient and attempts remain.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

from server.kernel.errors import CODE_INTERNAL, JobCancelled, LeaseLost, task_error_of
from server.kernel.jobstate import RenewResult
from server.kernel.request import VaceRequest
from server.kernel.runner import Runner
from server.settings import Settings
from server.storage import Storage
from server.store import Job, JobStore
from server.worker.fetching import fetch_inputs

log = logging.getLogger("wan_vace.worker")


class JobRun:
    def __init__(
        self,
        settings: Settings,
        worker_id: str,
        store: JobStore,
        storage: Storage,
        runner: Runner,
        job: Job,
    ):
        self.s, self.worker_id, self.store, self.storage = settings, worker_id, store, storage
        self.runner, self.job = runner, job

    def progress(self, fraction: float) -> None:
        """Renew the lease with the job's progress; stop the job if it was cancelled or lost."""
        res = self.store.renew(self.job.id, self.worker_id, self.s.lease_seconds, progress=fraction)
        if res == RenewResult.CANCELLED:
            raise JobCancelled(self.job.id)
        if res == RenewResult.LOST:
            raise LeaseLost(self.job.id)

    def execute(self) -> None:
        job = self.job
        try:
            req = VaceRequest.from_input(job.input)
            with tempfile.TemporaryDirectory(prefix=f"wan-vace-{job.id}-") as tmp:
                bases = [b for b in (job.base_url, self.s.public_url) if b]
                media = fetch_inputs(req, settings=self.s, storage=self.storage, base_urls=bases)
                self.progress(0.0)
                result = self.runner.run(req, media, Path(tmp), self.progress)
                out_key = self.storage.put_file(
                    self.storage.new_key(f"outputs/{job.id}", "output.mp4"), result.video_path
                )
                extra: dict[str, Any] = {
                    "safety_checked": result.safety_checked,
                    "render_size": list(result.render_size),
                }
                if result.conditioning:
                    extra["conditioning"] = self._store_conditioning(result.conditioning)
                if result.notes:
                    extra["preprocessing"] = result.notes
                if not self.store.complete(
                    job.id,
                    self.worker_id,
                    outputs=[out_key],
                    has_nsfw=[result.has_nsfw],
                    inference_ms=result.inference_ms,
                    seed=result.seed,
                    extra=extra,
                ):
                    log.info("job %s finished but was cancelled or taken over meanwhile", job.id)
        except JobCancelled:
            log.info("job %s cancelled", job.id)
        except LeaseLost:
            log.warning("job %s: lease lost, stopping without writing", job.id)
        except Exception as e:
            code, message = task_error_of(e)
            if code == CODE_INTERNAL:
                log.exception("job %s failed", job.id)
            else:
                log.info("job %s failed: %s", job.id, message)
            self.store.fail(
                job.id,
                self.worker_id,
                code=code,
                error=message,
                retryable=getattr(e, "retryable", False),
                retry_delay=self.s.retry_delay,
            )

    def _store_conditioning(self, cond: dict[str, Any]) -> dict[str, Any]:
        prefix = f"conditioning/{self.job.id}"
        out: dict[str, Any] = {}
        for name, value in cond.items():
            if isinstance(value, Path):
                out[name] = self.storage.put_file(self.storage.new_key(prefix, value.name), value)
            elif isinstance(value, list):
                out[name] = [self.storage.put_file(self.storage.new_key(prefix, p.name), p) for p in value]
            else:
                out[name] = value
        return out
