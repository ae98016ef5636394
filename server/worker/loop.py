"""A worker's life: build the runner once, then claim jobs from the store, run each (`job`) and
go on. It talks to the API process only through the store, so the same code runs as a child of
`wan-vace serve` or alone (`wan-vace worker`) on another machine.

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
import threading
import time
from typing import Any

from server.kernel.jobstate import WorkerState
from server.kernel.runner import Runner, RunnerFactory
from server.settings import Settings
from server.storage import open_storage
from server.store import Job, WorkerInfo, open_store
from server.worker.job import JobRun

log = logging.getLogger("wan_vace.worker")

# Exit status of a worker that could not load its model: restarting it would fail the same way.
EXIT_LOAD_FAILED = 3


def default_runner_factory(settings: Settings) -> Runner:
    """The served pipeline. `pipelines` (torch, diffusers) is imported here, in the worker
    process, never in the API process."""
    from pipelines.config import PipelineConfig
    from pipelines.runner import load_runner

    return load_runner(
        PipelineConfig(
            model=settings.model,
            weights_root=settings.resolved_weights_dir,
            device=settings.device,
            tiny_downscale=settings.tiny_downscale,
            encode_preset=settings.encode_preset,
            cpu_threads=settings.cpu_threads,
            preprocessor_memory=settings.preprocessor_memory,
            safety_checker=settings.safety_checker,
            nsfw_policy=settings.nsfw_policy,
        )
    )


class Worker:
    def __init__(
        self,
        settings: Settings,
        worker_id: str,
        parent_pid: int | None = None,
        runner_factory: RunnerFactory | None = None,
    ):
        self.s = settings
        self.id = worker_id
        self.parent_pid = parent_pid
        self.runner_factory = runner_factory or default_runner_factory
        self.runner: Runner | None = None
        self.store = open_store(settings)
        self.storage = open_storage(settings)
        self.info = WorkerInfo(
            id=worker_id,
            host=socket.gethostname(),
            pid=os.getpid(),
            model=settings.model,
            state=WorkerState.STARTING.value,
            started_at=time.time(),
        )
        self.current: Job | None = None
        self._stop = threading.Event()

    # Lifecycle -------------------------------------------------------------------------------
    def set_state(self, state: WorkerState, reason: str = "", **info: Any) -> None:
        self.info.state = state.value
        self.info.reason = reason
        self.info.info.update(info)
        self.info.heartbeat_at = time.time()
        self.store.upsert_worker(self.info)

    def run(self) -> int:
        self.set_state(WorkerState.LOADING)
        threading.Thread(target=self._heartbeat, name="heartbeat", daemon=True).start()
        try:
            self.runner = self.runner_factory(self.s)
            self.runner.warm_up()
        except Exception as e:  # the reason goes to /health, where operators look
            log.exception("model load failed")
            self.set_state(WorkerState.FAILED, reason=f"could not load model {self.s.model!r}: {e}")
            return EXIT_LOAD_FAILED
        self.set_state(WorkerState.READY, **self.runner.info)
        log.info("worker %s ready (model %s on %s)", self.id, self.s.model, self.runner.device)
        while not self._stop.is_set():
            job = self.store.claim(self.id, self.s.lease_seconds)
            if job is None:
                self._stop.wait(self.s.poll_interval)
                continue
            self.current = job
            self.set_state(WorkerState.BUSY, job=job.id)
            try:
                JobRun(self.s, self.id, self.store, self.storage, self.runner, job).execute()
            finally:
                self.current = None
                self.info.info.pop("job", None)
                if not self._stop.is_set():
                    self.set_state(WorkerState.READY)
        self.set_state(WorkerState.STOPPED, reason=self.info.reason)
        return 0

    def stop(self, reason: str) -> None:
        """Hand the running job back to the queue (it counts as an attempt) and stop."""
        self._stop.set()
        self.store.release_worker(self.id, reason)
        self.set_state(WorkerState.STOPPED, reason=reason)

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


def worker_main(
    settings_json: str,
    worker_id: str,
    parent_pid: int | None,
    runner_factory: RunnerFactory | None = None,
) -> None:
    """Entry point of a spawned worker process. `runner_factory` must be importable by name
    (spawn pickles it by reference): `default_runner_factory` unless a test passes a fake."""
    settings = Settings.model_validate_json(settings_json)
    logging.basicConfig(
        level=settings.log_level.upper(),
        format=f"%(asctime)s worker[{worker_id}] %(levelname)s %(message)s",
    )
    worker = Worker(settings, worker_id, parent_pid, runner_factory)

    install_sigterm(worker)
    sys.exit(worker.run())
