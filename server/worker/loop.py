"""A worker's life: build the runner once, then claim jobs from the store, run each (`job`) and
go on. It talks to the API process only through the store, so the same code runs as a child of
`wan-vace serve` or alone (`wan-vace worker`) on another machine.

Two stages, so the device never waits for CPU work: a device-stage thread claims a job,
fetches its media and renders it (`Runner.render`), then hands it over (server/worker/handoff.py,
one job) to a CPU-stage thread that encodes it (`Runner.finish`), stores the outputs and records
the outcome, while the device stage claims and renders the next. The next claim waits until the
CPU stage took the last job, so a worker holds at most two jobs (one per stage) and is `busy`
while it holds any. A runner with only `run` runs each job in the device-stage thread alone.

Idle, the device stage waits for the store's events when it has them (`JobStore.listen`: a job
was queued by any API replica, on any host; PostgreSQL), polling only rarely as a fallback;
without them (SQLite) for a nudge from the API on this host (server/wakeup.py) or
`poll_interval`, whichever comes first.

Liveness: a heartbeat thread renews the worker row and the leases of the jobs of both stages
every second; each stage's progress callback renews too and is where cancellation and a lost
lease stop the job (the CPU stage checks again before it stores anything).

A store or storage outage (a full disk) never ends a worker: a failed claim is retried with
backoff (0.5 s doubling to 10 s), the heartbeat keeps trying every second, a job's outcome is
recorded once the store answers again (its lease renewed meanwhile), and each outage is logged
once, when it starts and when it ends (server/worker/retry.py). A worker that cannot even open
the store exits with EXIT_STORE_UNAVAILABLE, which the supervisor restarts without counting it
as a crash.

Stopping: SIGTERM and SIGINT (Ctrl-C reaches the whole terminal process group, the spawned
workers with the server) drain the worker: it claims nothing more at once (its row says
`stopping`), lets the jobs it holds (both stages') finish and be stored within `shutdown_grace`
seconds, then hands back whatever it still holds, without counting the attempts (the jobs did
nothing wrong), and exits 0; a second signal during the grace hands back at once, and a grace of
0 hands back at once. The parent server's exit hands back at once too. Only a crash, a lost lease
or an error costs an attempt; a worker killed between the stages leaves its jobs leased to it,
so the supervisor's hand-back (or the lease running out) re-queues them.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any

from server.kernel.jobstate import WorkerState
from server.kernel.runner import Rendered, Runner, RunnerFactory
from server.settings import Settings
from server.storage import open_storage
from server.store import CHANNEL_QUEUED, Events, Job, ReleasedJob, WorkerInfo, open_store
from server.wakeup import Waker, nudge
from server.worker.handoff import Handoff
from server.worker.job import JobRun, remove_work_dirs
from server.worker.retry import Backoff, Outage, transient

log = logging.getLogger("wan_vace.worker")

# Exit status of a worker that could not load its model: restarting it would fail the same way.
EXIT_LOAD_FAILED = 3
# Exit status of a worker that could not open the store (a full or failing disk): restarted
# after a backoff, and not counted as a crash.
EXIT_STORE_UNAVAILABLE = 4
# With store events, the idle wait still claims this often: a job whose retry delay ran out is
# claimable without any event, and an event may be missed while a connection is restored.
EVENTS_POLL_S = 2.0
# The idle wait on store events is cut into slices this long, so a stop (or a local nudge, seen
# between slices) never waits for the whole wait.
_EVENTS_SLICE_S = 0.2
# Signals this close together are one stop: Ctrl-C reaches a server's workers directly and the
# server's own stop sends them SIGTERM a moment later; only a later one means "hand back now".
SAME_STOP_S = 1.0


def default_runner_factory(settings: Settings) -> Runner:
    """The served pipeline. `pipelines` (torch, diffusers) is imported here, in the worker
    process, never in the API process."""
    from pipelines.config import PipelineConfig
    from pipelines.runner import load_runner
    from pipelines.speed import SpeedConfig

    tiling = {"on": True, "off": False}.get(settings.vae_tiling, settings.vae_tiling)
    return load_runner(
        PipelineConfig(
            model=settings.model,
            weights_root=settings.resolved_weights_dir,
            device=settings.device,
            tiny_downscale=settings.tiny_downscale,
            encode_preset=settings.encode_preset,
            encode_threads=settings.encode_threads,
            cpu_threads=settings.cpu_threads,
            preprocessor_memory=settings.preprocessor_memory,
            safety_checker=settings.safety_checker,
            nsfw_policy=settings.nsfw_policy,
            gpus_per_job=settings.gpus_per_job,
            speed=SpeedConfig(attention=settings.attention, compile=settings.compile, memory=settings.memory,
                              vae_tiling=tiling, text_encoder=settings.text_encoder),  # fmt: skip
            fast_mode=settings.fast_mode,
            fast_mode_threshold=settings.fast_mode_threshold,
        )
    )


def _two_stage(runner: Runner) -> bool:
    """Whether the runner splits a job into a device and a CPU stage (a simple fake has `run`)."""
    return callable(getattr(runner, "render", None)) and callable(getattr(runner, "finish", None))


class Worker:
    def __init__(
        self,
        settings: Settings,
        worker_id: str,
        parent_pid: int | None = None,
        runner_factory: RunnerFactory | None = None,
        slot_info: Mapping[str, Any] | None = None,
    ):
        """`slot_info`: what the worker row says of this worker's place in its host's plan
        (server/gpus.py `Slot.info`: its GPUs)."""
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
            info=dict(slot_info or {}),
        )
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is not None:  # the GPUs this process's CUDA sees, as it was started
            self.info.info["gpus"] = visible
        # The runs of the jobs this worker holds a lease on, in claim order: one per stage at most.
        self._owned: list[JobRun] = []
        self._stop = threading.Event()
        # A drain (`drain`): no claim once set; `_hurry` ends its grace early (a second signal);
        # `_drained` once it handed back what was left.
        self._draining = threading.Event()
        self._hurry = threading.Event()
        self._drained = threading.Event()
        # Held around a claim and around the hand-back in `stop`: a job claimed while the worker
        # stops is either handed back by it, or never claimed.
        self._claim_lock = threading.Lock()
        # Held through `stop`: `run` returns only once a stop in progress has handed back.
        self._stopping = threading.Lock()
        # Held while the worker row is changed and written: the stage threads and the heartbeat
        # would otherwise publish each other's stale states.
        self._state_lock = threading.RLock()
        # Notified when the jobs held change or the worker stops: what a drain waits on.
        self._held_changed = threading.Condition(self._state_lock)
        self._handoff: Handoff[tuple[JobRun, Rendered]] | None = None
        self._waker: Waker | None = None
        self._events: Events | None = None
        self._cpu_error: BaseException | None = None  # the CPU stage ended on it; so must the worker
        # The store as this worker's threads see it; logs each outage once.
        self.outage = Outage(f"worker {worker_id}", log)

    @property
    def current(self) -> Job | None:
        """The job claimed last of those running (the device stage's while there is one)."""
        with self._state_lock:
            return self._owned[-1].job if self._owned else None

    @property
    def owned(self) -> list[Job]:
        with self._state_lock:
            return [r.job for r in self._owned]

    # Lifecycle -------------------------------------------------------------------------------
    def set_state(self, state: WorkerState, reason: str = "", **info: Any) -> None:
        with self._state_lock:
            self.info.state = state.value
            self.info.reason = reason
            self.info.info.update(info)
            self.info.heartbeat_at = time.time()
            self._publish()

    def _publish(self) -> bool:
        """Write the worker row; during a store outage the heartbeat writes it once it can."""
        try:
            with self._state_lock:
                self.store.upsert_worker(self.info)
        except Exception as e:
            if not transient(e):
                raise
            self.outage.failed(e)
            return False
        self.outage.ok()
        return True

    def _own(self, run: JobRun, owned: bool) -> None:
        """Record that a job was claimed, or ended in either stage: busy while any is held."""
        with self._state_lock:
            if owned:
                for earlier in self._owned:
                    if earlier.job.id == run.job.id:
                        # Its lease was lost and this worker claimed the job again: the earlier
                        # run (in the CPU stage) must not write, though the store names us owner.
                        earlier.supersede()
                self._owned.append(run)
            else:
                self._owned = [r for r in self._owned if r is not run]
            ids = list(dict.fromkeys(r.job.id for r in self._owned))
            if ids:
                self.info.info.update(job=ids[-1], jobs=ids)
            else:
                self.info.info.pop("job", None)
                self.info.info.pop("jobs", None)
            # A stop writes its own state; a drain stays `stopping`, with the jobs it has left.
            if not (self._stop.is_set() or self._draining.is_set()):
                self.set_state(WorkerState.BUSY if ids else WorkerState.READY)
            elif not self._stop.is_set():
                self._publish()
            self._held_changed.notify_all()

    def _claim(self, backoff: Backoff) -> tuple[Job | None, float | None]:
        """The next job (or None), and when there is none how long to wait before looking again:
        None for the poll (a nudge ends it), a backoff after a failed claim."""
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
        return job, None

    def _open_waker(self) -> Waker | None:
        try:
            return Waker(self.s.data_dir, self.id)
        except OSError as e:  # a read-only data dir, a path no socket can have: polling still works
            log.warning("worker %s: no wake-up socket (%s); looking for jobs every %g s",
                        self.id, e, self.s.poll_interval)  # fmt: skip
            return None

    def _open_events(self) -> Events | None:
        """The store's push of queued jobs (PostgreSQL), or None: then the waker and polling."""
        try:
            return self.store.listen(CHANNEL_QUEUED)
        except Exception as e:  # the store is down now: poll; its claims retry with backoff
            if not transient(e):
                raise
            log.warning("worker %s: cannot listen for queued jobs (%s); looking for jobs every %g s",
                        self.id, e, self.s.poll_interval)  # fmt: skip
            return None

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
        self._waker = self._open_waker()
        self._events = self._open_events()
        cpu_stage = None
        if _two_stage(self.runner):
            self._handoff = Handoff()
            cpu_stage = threading.Thread(target=self._cpu_stage, name="cpu-stage", daemon=True)
            cpu_stage.start()
        self.set_state(WorkerState.READY, **self.runner.info)
        log.info("worker %s ready (model %s on %s)", self.id, self.s.model, self.runner.device)
        try:
            self._device_stage()
        finally:
            if self._handoff is not None:
                self._handoff.close()
            if cpu_stage is not None:
                cpu_stage.join()  # the job in the CPU stage ends first: stored, or written nothing
            if self._waker is not None:
                self._waker.close()
            if self._events is not None:
                self._events.close()
        if self._cpu_error is not None:
            raise self._cpu_error
        if self._draining.is_set():  # the drain's thread hands back and logs how it ended
            self._drained.wait()
        with self._stopping:  # a stop in progress (another thread) finishes its hand-back first
            self.set_state(WorkerState.STOPPED, reason=self.info.reason)
        return 0

    def _idle(self, backoff: float | None) -> None:
        """After a claim that found nothing: wait for a nudge from the API (a job was queued on
        this host) or `poll_interval`, whichever comes first. After a failed claim: the backoff,
        nudges or not, so a failing store is not hammered."""
        if backoff is not None:
            self._stop.wait(backoff)
        elif self._events is not None:
            self._wait_for_events()
        elif self._waker is None:
            self._stop.wait(self.s.poll_interval)
        else:
            self._waker.wait(self.s.poll_interval)

    def _wait_for_events(self) -> None:
        """Until a job is queued anywhere (an event), a nudge from this host, a stop or a drain,
        or the fallback poll, whichever comes first."""
        assert self._events is not None
        deadline = time.monotonic() + max(self.s.poll_interval, EVENTS_POLL_S)
        while not (self._stop.is_set() or self._draining.is_set()):
            left = deadline - time.monotonic()
            if left <= 0:
                return
            try:
                if self._events.wait(min(left, _EVENTS_SLICE_S)):
                    return
            except Exception as e:  # a lost connection: wait out the slice, the claim retries
                if not transient(e):
                    raise
                self.outage.failed(e)
                self._stop.wait(min(left, _EVENTS_SLICE_S))
            if self._waker is not None and self._waker.drain():
                return

    def _device_stage(self) -> None:
        """Claim, fetch and render; hand each rendered job to the CPU stage (or, for a runner
        with one stage, run it all here). The next claim comes once the rendered job was handed
        over (the CPU stage is free for it), so the next job renders while the last one encodes
        and at most two are held."""
        backoff = Backoff()
        while not self._stop.is_set():
            if self._cpu_error is not None:
                raise self._cpu_error
            if self._waker is not None:
                # Nudges sent so far are for jobs committed before this claim, which sees them.
                self._waker.drain()
            with self._claim_lock:
                if self._stop.is_set() or self._draining.is_set():
                    break
                job, wait = self._claim(backoff)
                if job is not None:
                    run = JobRun(
                        self.s, self.id, self.store, self.storage, self.runner, job,
                        stop=self._stop, outage=self.outage,
                    )  # fmt: skip
                    self._own(run, True)
            if job is None:
                self._idle(wait)
                continue
            if self._handoff is None:
                try:
                    run.execute()
                finally:
                    self._own(run, False)
                self._raise_if_fatal(run)
                continue
            rendered = None
            try:
                rendered = run.render()
            finally:
                if rendered is None:
                    run.remove_workdir()
                    self._own(run, False)
            self._raise_if_fatal(run)
            if not self._handoff.put((run, rendered)):  # the worker stops (or its CPU stage died)
                run.abandon()
                self._own(run, False)

    def _raise_if_fatal(self, run: JobRun) -> None:
        """End the worker after a job whose failure broke the runner (its job already recorded):
        the supervisor starts a new one, which builds the runner (a GPU group) again."""
        if run.fatal is not None:
            raise RuntimeError(f"the runner cannot run more jobs ({run.fatal}); the worker restarts")

    def _cpu_stage(self) -> None:
        """Finish each rendered job: encode, store, record. A failure that escapes a job (the
        store refusing for good) ends the worker as it would have in one stage."""
        assert self._handoff is not None
        while (item := self._handoff.take()) is not None:
            run, rendered = item
            try:
                run.finish(rendered)
            except BaseException as e:  # noqa: BLE001 - re-raised by the device stage's thread
                self._cpu_error = e
                self._handoff.close()
                if self._waker is not None:
                    self._waker.poke()
                return
            finally:
                self._own(run, False)
                self._handoff.done()

    def stop(self, reason: str) -> None:
        """Stop gracefully at once: hand the jobs of both stages back to the queue, their
        attempts not counted (a job the worker was asked to leave did nothing wrong), and mark
        the worker stopped. Each stage notices at its job's next progress call (the lease is
        gone), or before it stores anything, and writes nothing."""
        released = self._hand_back(reason)
        what = "; ".join(r.describe() for r in released) or "no job was running"
        log.info("worker %s: %s; %s", self.id, reason, what)

    def _hand_back(self, reason: str) -> list[ReleasedJob]:
        with self._stopping:
            self._stop.set()
            with self._claim_lock:
                released = self.store.release_worker(self.id, reason, graceful=True)
            if self._handoff is not None:
                self._handoff.close()
            if self._waker is not None:
                self._waker.poke()
                self._waker.unlink()  # a signal's stop exits before `run` could remove it
            if released:  # queued again: another worker on this host takes them now
                nudge(self.s.data_dir)
            self.set_state(WorkerState.STOPPED, reason=reason)
            with self._held_changed:
                self._held_changed.notify_all()  # a drain waiting for its jobs: stopped meanwhile
        return released

    def drain(self, reason: str, grace: float) -> None:
        """Stop claiming at once, let the jobs held (both stages') finish and be stored within
        `grace` seconds, then hand back whatever is still held (`stop`). `hurry` ends the grace
        early. Returns once the worker stopped; a grace of 0, or no job held, is `stop`."""
        try:
            with self._claim_lock:  # a claim in progress is held (and counted) before this
                self._draining.set()
                held = list(dict.fromkeys(j.id for j in self.owned))
            if grace <= 0 or not held or self._stop.is_set():
                if not self._stop.is_set():
                    self.stop(reason)
                return
            self.set_state(WorkerState.STOPPING, reason=reason)
            if self._waker is not None:
                self._waker.poke()  # a device stage idle beside a busy CPU stage: it ends now
            log.info("worker %s: %s; draining: finishing %d job(s) (%s) within %g s, then handing back "
                     "what is left", self.id, reason, len(held), ", ".join(held), grace)  # fmt: skip
            started = time.monotonic()
            with self._held_changed:
                self._held_changed.wait_for(
                    lambda: not self._owned or self._hurry.is_set() or self._stop.is_set(), timeout=grace
                )
            if self._stop.is_set():  # stopped meanwhile (the parent server exited): it logged
                return
            released = self._hand_back(reason)
            took = time.monotonic() - started
            done = [j for j in held if j not in {r.id for r in released}]
            parts = [f"{len(done)} job(s) finished ({', '.join(done)})"] if done else []
            if released:
                why = "a second signal" if self._hurry.is_set() else f"the {grace:g} s grace ran out"
                parts.append(f"{why}: " + "; ".join(r.describe() for r in released))
            log.info("worker %s: drained in %.1f s: %s", self.id, took, "; ".join(parts) or "no job left")
        finally:
            self._drained.set()

    def hurry(self) -> None:
        """End a drain's grace now: what is still held is handed back."""
        self._hurry.set()
        with self._held_changed:
            self._held_changed.notify_all()

    def _parent_gone(self) -> bool:
        return self.parent_pid is not None and os.getppid() != self.parent_pid

    def _note_gpu_memory(self) -> None:
        """The runner's GPU memory in the worker row, for /metrics (runners without a GPU, and
        the fakes, have no `gpu_memory`)."""
        mem = getattr(self.runner, "gpu_memory", None)
        if not callable(mem):
            return
        try:
            values = mem()
        except Exception:  # a metric must never cost the heartbeat
            log.debug("worker %s: reading GPU memory failed", self.id, exc_info=True)
            return
        with self._state_lock:
            self.info.info.update(values)

    def _heartbeat(self) -> None:
        while not self._stop.is_set():
            time.sleep(1.0)
            if self._parent_gone():
                # Not a crash of the jobs: hand them back uncounted, like a graceful stop.
                code = 0
                try:
                    self.stop("The server that started this worker exited")
                except Exception:  # the store is down: the leases run out instead
                    log.exception("worker %s: handing the jobs back failed", self.id)
                    code = 1
                remove_work_dirs(self.id)  # the stages never get to remove their own
                _exit_now(code)
            for job in {j.id: j for j in self.owned}.values():
                try:
                    self.store.renew(job.id, self.id, self.s.lease_seconds)
                except Exception as e:  # the next beat tries again; the job's stage decides
                    if not transient(e):
                        log.exception("worker %s: renewing the lease of job %s failed", self.id, job.id)
                    else:
                        self.outage.failed(e)
            self.info.heartbeat_at = time.time()
            self._note_gpu_memory()
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
    """On SIGTERM or SIGINT, drain (`Worker.drain`, `shutdown_grace`): finish the jobs held if
    they can be within the grace, hand back the rest (not counted as attempts), and exit 0,
    without a KeyboardInterrupt traceback. The work happens on a thread: the handler runs on the
    main thread, which may be inside a store transaction that the release would otherwise wait
    for. A second signal during the grace hands back at once; one within SAME_STOP_S of the
    first is the same stop (Ctrl-C and then the server's SIGTERM) and is ignored."""
    first: list[float] = []

    def drain_and_exit(reason: str) -> None:
        code = 1  # not a clean stop: the supervisor hands back what is still held, counted
        try:
            worker.drain(reason, worker.s.shutdown_grace)
            code = 0
        except BaseException:
            log.exception("worker %s: handing the job back failed", worker.id)
        finally:
            remove_work_dirs(worker.id)  # the job's thread never gets to remove its own
            _exit_now(code)

    def hurry(name: str) -> None:
        log.info("worker %s: %s again: handing back now", worker.id, name)
        worker.hurry()

    def on_signal(signum: int, frame: Any) -> None:
        if first:
            if time.monotonic() - first[0] >= SAME_STOP_S and not worker._hurry.is_set():
                # On a thread, as the first: this handler may interrupt the main thread while it
                # holds the lock `hurry` takes (or logging's).
                threading.Thread(target=hurry, args=(signal.Signals(signum).name,), daemon=True).start()
            return
        first.append(time.monotonic())
        if worker.parent_pid is not None:  # a server's worker: Ctrl-C or the server's stop
            reason = "The worker was stopped (server shutdown)"
        else:
            reason = f"The worker was stopped ({signal.Signals(signum).name})"
        threading.Thread(target=drain_and_exit, args=(reason,), daemon=True).start()

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
    slot_info: Mapping[str, Any] | None = None,
) -> None:
    """Entry point of a spawned worker process. `runner_factory` must be importable by name
    (spawn pickles it by reference): `default_runner_factory` unless a test passes a fake.
    `slot_info`: the worker row's note of its GPUs (its environment was set before this)."""
    settings = Settings.model_validate_json(settings_json)
    logging.basicConfig(
        level=settings.log_level.upper(),
        format=f"%(asctime)s worker[{worker_id}] %(levelname)s %(message)s",
    )
    try:
        worker = Worker(settings, worker_id, parent_pid, runner_factory, slot_info)
    except Exception as e:
        if not transient(e):
            raise
        log.error("worker %s: cannot open the store (%s); exiting to be restarted", worker_id, e)
        sys.exit(EXIT_STORE_UNAVAILABLE)

    install_sigterm(worker)
    sys.exit(worker.run())
