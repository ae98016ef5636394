"""A worker's life: build the runner once, then claim jobs from the store, run each (`job`) and
go on. It talks to the API process only through the store, so the same code runs as a child of
`wan-vace serve` or alone (`wan-vace worker`) on another machine.

Liveness: a heartbeat thread renews the worker row and the current job's lease every second;
the step callback renews too and is where cancellation and a lost lease stop the job.

A store or storage outage (a full disk) never ends a worker: a failed claim is retried with
backoff (0.5 s doubling to 10 s), the heartbeat keeps trying every second, a job's outcome is
recorded once the store answers again (its lease renewed meanwhile), and each outage is logged
once, when it starts and when it ends (server/worker/retry.py). A worker that cannot even open
the store exits with EXIT_STORE_UNAVAILABLE, which the supervisor restarts without counting it
as a crash.

Stopping: SIGTERM and SIGINT (Ctrl-C reaches the whole terminal process group, the spawned
workers with the server) and the parent server's exit all stop the worker gracefully: it hands
its job back to the queue without counting the attempt (the job did nothing wrong), logs one
line and exits 0. Only a crash, a lost lease or an error costs an attempt.
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
from server.worker.job import JobRun, remove_work_dirs
from server.worker.retry import Backoff, Outage, transient

log = logging.getLogger("wan_vace.worker")

# Exit status of a worker that could not load its model: restarting it would fail the same way.
EXIT_LOAD_FAILED = 3
# Exit status of a worker that could not open the store (a full or failing disk): restarted
# after a backoff, and not counted as a crash.
EXIT_STORE_UNAVAILABLE = 4


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
        # Held around a claim and around the hand-back in `stop`: a job claimed while the worker
        # stops is either handed back by it, or never claimed.
        self._claim_lock = threading.Lock()
        # Held through `stop`: `run` returns only once a stop in progress has handed back.
        self._stopping = threading.Lock()
        # The store as this worker's threads see it; logs each outage once.
        self.outage = Outage(f"worker {worker_id}", log)

    # Lifecycle -------------------------------------------------------------------------------
    def set_state(self, state: WorkerState, reason: str = "", **info: Any) -> None:
        self.info.state = state.value
        self.info.reason = reason
        self.info.info.update(info)
        self.info.heartbeat_at = time.time()
        self._publish()

    def _publish(self) -> bool:
        """Write the worker row; during a store outage the heartbeat writes it once it can."""
        try:
            self.store.upsert_worker(self.info)
        except Exception as e:
            if not transient(e):
                raise
            self.outage.failed(e)
            return False
        self.outage.ok()
        return True

    def _claim(self, backoff: Backoff) -> tuple[Job | None, float]:
        """The next job (or None) and how long to wait before looking again when there is none."""
        try:
            job = self.store.claim(self.id, self.s.lease_seconds)
        except Exception as e:
            if not transient(e):
                raise
            self.outage.failed(e)
            return None, backoff.next()
        backoff.reset()
        if job is not None:  # a claim that took a job wrote: the store answers again
            self.outage.ok()
        return job, self.s.poll_interval

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
        backoff = Backoff()
        while not self._stop.is_set():
            with self._claim_lock:
                if self._stop.is_set():
                    break
                job, wait = self._claim(backoff)
            if job is None:
                self._stop.wait(wait)
                continue
            self.current = job
            self.set_state(WorkerState.BUSY, job=job.id)
            try:
                JobRun(
                    self.s, self.id, self.store, self.storage, self.runner, job,
                    stop=self._stop, outage=self.outage,
                ).execute()  # fmt: skip
            finally:
                self.current = None
                self.info.info.pop("job", None)
                if not self._stop.is_set():
                    self.set_state(WorkerState.READY)
        with self._stopping:  # a stop in progress (another thread) finishes its hand-back first
            self.set_state(WorkerState.STOPPED, reason=self.info.reason)
        return 0

    def stop(self, reason: str) -> None:
        """Stop gracefully: hand the running job back to the queue, its attempt not counted (a
        job the worker was asked to leave did nothing wrong), and mark the worker stopped. The
        job's own thread notices at its next progress call (the lease is gone) and writes
        nothing."""
        with self._stopping:
            self._stop.set()
            with self._claim_lock:
                released = self.store.release_worker(self.id, reason, graceful=True)
            self.set_state(WorkerState.STOPPED, reason=reason)
            what = "; ".join(r.describe() for r in released) or "no job was running"
            log.info("worker %s: %s; %s", self.id, reason, what)

    def _parent_gone(self) -> bool:
        return self.parent_pid is not None and os.getppid() != self.parent_pid

    def _heartbeat(self) -> None:
        while not self._stop.is_set():
            time.sleep(1.0)
            if self._parent_gone():
                # Not a crash of the job: hand it back uncounted, like a graceful stop.
                code = 0
                try:
                    self.stop("The server that started this worker exited")
                except Exception:  # the store is down: the lease runs out instead
                    log.exception("worker %s: handing the job back failed", self.id)
                    code = 1
                remove_work_dirs(self.id)  # the job's thread never gets to remove its own
                _exit_now(code)
            job = self.current
            try:
                if job is not None:
                    self.store.renew(job.id, self.id, self.s.lease_seconds)
            except Exception as e:  # the next beat tries again; the job's thread decides
                if not transient(e):
                    log.exception("worker %s: renewing the lease of job %s failed", self.id, job.id)
                else:
                    self.outage.failed(e)
            self.info.heartbeat_at = time.time()
            try:
                self._publish()
            except Exception:  # never let the heartbeat end: the lease depends on it
                log.exception("worker %s: the heartbeat failed", self.id)


def _exit_now(code: int) -> None:
    """Exit at once, whatever the main thread is doing (a job's step may run for seconds; its
    job was handed back). First what a normal exit of a spawned process would run:
    multiprocessing's exit finalizers, which release the semaphores it registered (tqdm's lock
    in the pipeline), or the server's resource tracker warns of "leaked semaphore objects"."""
    try:
        import multiprocessing.util

        multiprocessing.util._exit_function()
    except Exception:  # exiting regardless: say why the tracker may warn
        log.warning("multiprocessing's exit finalizers failed", exc_info=True)
    logging.shutdown()
    os._exit(code)


def install_sigterm(worker: Worker) -> None:
    """On SIGTERM or SIGINT, hand the running job back (not counted as an attempt) and exit 0,
    without a KeyboardInterrupt traceback. The work happens on a thread: the handler runs on the
    main thread, which may be inside a store transaction that the release would otherwise wait
    for. A second signal while the first is being handled is ignored."""
    stopping = threading.Event()

    def release_and_exit(reason: str) -> None:
        code = 1  # not a clean stop: the supervisor hands back what is still held, counted
        try:
            worker.stop(reason)
            code = 0
        except BaseException:
            log.exception("worker %s: handing the job back failed", worker.id)
        finally:
            remove_work_dirs(worker.id)  # the job's thread never gets to remove its own
            _exit_now(code)

    def on_signal(signum: int, frame: Any) -> None:
        if stopping.is_set():
            return
        stopping.set()
        if worker.parent_pid is not None:  # a server's worker: Ctrl-C or the server's stop
            reason = "The worker was stopped (server shutdown)"
        else:
            reason = f"The worker was stopped ({signal.Signals(signum).name})"
        threading.Thread(target=release_and_exit, args=(reason,), daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # A supervisor spawns its workers with these signals blocked, so one sent before the handlers
    # were installed waits (pending) instead of killing the process or printing a traceback.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})


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
    try:
        worker = Worker(settings, worker_id, parent_pid, runner_factory)
    except Exception as e:
        if not transient(e):
            raise
        log.error("worker %s: cannot open the store (%s); exiting to be restarted", worker_id, e)
        sys.exit(EXIT_STORE_UNAVAILABLE)

    install_sigterm(worker)
    sys.exit(worker.run())
