"""The worker process: loads the pipeline once, then claims jobs from the store, runs them and
records the outcome. It talks to the API process only through the store, so the same code runs
as a child of `wan-vace serve` or alone (`wan-vace worker`) on another machine.

Liveness: a heartbeat thread renews the worker row and the current job's lease every second;
the step callback renews too and is where cancellation and a lost lease stop the job. A worker
whose parent server died exits at once, handing its job back to the queue.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from server.kernel.errors import JobCancelled, LeaseLost, MediaAccessError, task_error_of
from server.settings import Settings
from server.storage import LocalStorage
from server.store import Job, RenewResult, WorkerInfo, open_store

log = logging.getLogger("wan_vace.worker")

# Exit status of a worker that could not load its model: restarting it would fail the same way.
EXIT_LOAD_FAILED = 3


class Worker:
    def __init__(self, settings: Settings, worker_id: str, parent_pid: int | None = None):
        self.s = settings
        self.id = worker_id
        self.parent_pid = parent_pid
        self.store = open_store(settings)
        from server.webhooks import webhook_payload_builder

        self.store.webhook_payload = webhook_payload_builder(settings)  # type: ignore[attr-defined]
        self.storage = LocalStorage(settings.storage_dir)
        self.info = WorkerInfo(
            id=worker_id,
            host=socket.gethostname(),
            pid=os.getpid(),
            model=settings.model,
            state="starting",
            started_at=time.time(),
        )
        self.current: Job | None = None
        self._stop = threading.Event()

    # Lifecycle -------------------------------------------------------------------------------
    def set_state(self, state: str, reason: str = "", **info: Any) -> None:
        self.info.state = state
        self.info.reason = reason
        self.info.info.update(info)
        self.info.heartbeat_at = time.time()
        self.store.upsert_worker(self.info)

    def run(self) -> int:
        self.set_state("loading")
        threading.Thread(target=self._heartbeat, name="heartbeat", daemon=True).start()
        try:
            from pipelines.runner import load_runner

            self.runner = load_runner(
                self.s.model,
                weights_root=self.s.resolved_weights_dir,
                device=self.s.device,
                tiny_downscale=self.s.tiny_downscale,
                encode_preset=self.s.encode_preset,
                cpu_threads=self.s.cpu_threads,
            )
            self.runner.warm_up()
        except Exception as e:  # the reason goes to /health, where operators look
            log.exception("model load failed")
            self.set_state("failed", reason=f"could not load model {self.s.model!r}: {e}")
            return EXIT_LOAD_FAILED
        self.set_state("ready", **self.runner.info)
        log.info("worker %s ready (model %s on %s)", self.id, self.s.model, self.runner.device)
        while not self._stop.is_set():
            job = self.store.claim(self.id, self.s.lease_seconds)
            if job is None:
                self._stop.wait(self.s.poll_interval)
                continue
            self.current = job
            self.set_state("busy", job=job.id)
            try:
                self.execute(job)
            finally:
                self.current = None
                self.info.info.pop("job", None)
                self.set_state("ready")
        self.set_state("stopped")
        return 0

    def stop(self, reason: str) -> None:
        """Hand the running job back to the queue (it counts as an attempt) and stop."""
        self._stop.set()
        self.store.release_worker(self.id, reason)
        self.set_state("stopped", reason=reason)

    def _parent_gone(self) -> bool:
        return self.parent_pid is not None and os.getppid() != self.parent_pid

    def _heartbeat(self) -> None:
        while not self._stop.is_set():
            time.sleep(1.0)
            if self._parent_gone():
                self.stop("The server that started this worker exited")
                os._exit(0)
            job = self.current
            if job is not None:
                self.store.renew(job.id, self.id, self.s.lease_seconds)
            self.info.heartbeat_at = time.time()
            self.store.upsert_worker(self.info)

    # One job ---------------------------------------------------------------------------------
    def _progress(self, job: Job):
        def progress(fraction: float) -> None:
            res = self.store.renew(job.id, self.id, self.s.lease_seconds, progress=fraction)
            if res == RenewResult.CANCELLED:
                raise JobCancelled(job.id)
            if res == RenewResult.LOST:
                raise LeaseLost(job.id)

        return progress

    def execute(self, job: Job) -> None:
        progress = self._progress(job)
        try:
            with tempfile.TemporaryDirectory(prefix=f"wan-vace-{job.id}-") as tmp:
                media = self.fetch(job)
                progress(0.0)
                result = self.runner.run(job.input, media, Path(tmp), progress)
                out_key = self.storage.put_file(
                    LocalStorage.new_key(f"outputs/{job.id}", "output.mp4"), result.video_path
                )
                extra: dict[str, Any] = {
                    "safety_checked": result.safety_checked,
                    "render_size": list(result.render_size),
                }
                if result.conditioning:
                    extra["conditioning"] = self._store_conditioning(job, result.conditioning)
                if not self.store.complete(
                    job.id,
                    self.id,
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
            if code == 5000:
                log.exception("job %s failed", job.id)
            else:
                log.info("job %s failed: %s", job.id, message)
            self.store.fail(
                job.id,
                self.id,
                code=code,
                error=message,
                retryable=getattr(e, "retryable", False),
                retry_delay=self.s.retry_delay,
            )

    def fetch(self, job: Job) -> Any:
        from pipelines.runner import FetchedMedia
        from server.fetch import FetchPolicy, fetch_media

        inp = job.input
        bases = [b for b in (job.base_url, self.s.public_url) if b]

        def get(url: str, field: str, limit: int) -> bytes:
            def local(u: str) -> bytes | None:
                # One of our own media URLs (an upload, an inline input): read from storage.
                key = LocalStorage.key_from_url(u, bases)
                if key is None:
                    return None
                if not self.storage.exists(key):
                    raise MediaAccessError(f"{field}: no such file on this server")
                return self.storage.read_bytes(key)

            policy = FetchPolicy(
                max_bytes=limit, timeout_s=self.s.fetch_timeout, allow_private=self.s.allow_private_urls
            )
            return fetch_media(url, field, policy, local_resolver=local)

        img, vid = self.s.max_image_bytes, self.s.max_video_bytes
        m = FetchedMedia()
        for name, limit in (
            ("video", vid),
            ("mask_video", vid),
            ("mask_image", img),
            ("first_image", img),
            ("last_image", img),
        ):
            if inp.get(name):
                setattr(m, name, get(inp[name], name, limit))
        m.images = [get(u, f"images[{i}]", img) for i, u in enumerate(inp.get("images") or [])]
        return m

    def _store_conditioning(self, job: Job, cond: dict[str, Any]) -> dict[str, Any]:
        prefix = f"conditioning/{job.id}"
        out: dict[str, Any] = {}
        for name, value in cond.items():
            if isinstance(value, Path):
                out[name] = self.storage.put_file(LocalStorage.new_key(prefix, value.name), value)
            elif isinstance(value, list):
                out[name] = [self.storage.put_file(LocalStorage.new_key(prefix, p.name), p) for p in value]
            else:
                out[name] = value
        return out


def install_sigterm(worker: Worker) -> None:
    """On SIGTERM, hand the running job back and exit. The work happens on a thread: the handler
    runs on the main thread, which may be inside a store transaction that the release would
    otherwise wait for."""

    def release_and_exit() -> None:
        try:
            worker.stop("The worker was stopped (server shutdown)")
        finally:
            os._exit(0)

    def on_term(signum: int, frame: Any) -> None:
        threading.Thread(target=release_and_exit, daemon=True).start()

    signal.signal(signal.SIGTERM, on_term)


def worker_main(settings_json: str, worker_id: str, parent_pid: int | None) -> None:
    """Entry point of a spawned worker process."""
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s worker[{worker_id}] %(levelname)s %(message)s"
    )
    settings = Settings.model_validate_json(settings_json)
    worker = Worker(settings, worker_id, parent_pid)

    install_sigterm(worker)
    sys.exit(worker.run())
