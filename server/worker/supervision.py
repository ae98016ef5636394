"""Starts the local worker processes (in the API process, or in `wan-vace worker` when its host
runs several) and keeps them alive.

One worker per slot of the host's plan (server/gpus.py): each is started with its slot's
`CUDA_VISIBLE_DEVICES` (its GPU, or its group of `gpus_per_job` GPUs), set in the child before
anything there can import torch.

Workers are spawned, never forked (a forked child would inherit the API's threads and sockets,
and CUDA cannot be initialised in a fork). A worker that dies is restarted; its job is handed
back at once (re-queued while attempts remain, else failed with a clear error). A worker that
cannot load its model exits with EXIT_LOAD_FAILED and is not restarted: /health reports why. A
worker that exited 0 stopped gracefully (a signal: it handed its job back itself, uncounted); it
is restarted unless the server is shutting down meanwhile (Ctrl-C signals server and workers
together). Workers are spawned with SIGINT and SIGTERM blocked until their handlers are in place,
so no signal can kill one mid-start with a traceback.
The supervisor also expires leases of workers anywhere (another machine, an earlier run).

Stopping (the server shuts down): each worker is sent SIGTERM (unless it is draining already: a
Ctrl-C reached it first) and given `shutdown_grace` seconds and a margin to finish its jobs and
hand back the rest itself; one still running then is killed and its jobs handed back, counted
(it did not stop when asked).

A store outage (a full disk) never ends the supervisor thread: a tick whose store call fails is
tried again with backoff (0.5 s doubling to 10 s), the outage logged once. Once the store
answers, every running job first gets a fresh lease (no worker could renew during the outage),
then expiry goes on (a lease is expired 3 s after it ran out, so an outage that ends just
after one ran out leaves its worker time to renew it). A worker that died of the outage (EXIT_STORE_UNAVAILABLE), or
quickly while the store was failing, does not count towards the crash-loop limit.

When every local worker is given up (`failed_reason`) and no worker anywhere is live, queued
jobs would wait forever: after `unservable_grace` seconds the supervisor fails them (code 5003,
the reason in the message), and keeps failing jobs queued later while that lasts.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing import resource_tracker
from typing import Any

from server import gpus
from server.capacity import STALE_S
from server.kernel.errors import CODE_UNAVAILABLE
from server.kernel.ids import new_worker_id
from server.kernel.jobstate import WorkerState
from server.kernel.runner import RunnerFactory
from server.logs import configure as configure_logging
from server.settings import Settings
from server.store import JobStore, WorkerInfo
from server.wakeup import nudge
from server.worker.job import remove_work_dirs
from server.worker.loop import EXIT_LOAD_FAILED, EXIT_STORE_UNAVAILABLE, worker_main
from server.worker.retry import Backoff, Outage

log = logging.getLogger("wan_vace.supervisor")

# A worker that dies this soon after starting, this many times in a row, is crash-looping.
_FAST_DEATH_S = 20.0
_MAX_FAST_DEATHS = 5
# A worker that stopped gracefully (exit 0) is restarted after this long unless the server
# stops meanwhile: a Ctrl-C reaches the workers a moment before uvicorn stops the supervisor.
_CLEAN_EXIT_GRACE_S = 3.0
_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}
# A lease is expired this long after it ran out, not at once: a store outage that ends just
# after a lease ran out (no worker could renew meanwhile) leaves its worker, which renews every
# second, time to renew. An outage longer than this made an expiry attempt fail, and the leases
# are renewed before any expires (`_forgive`).
_EXPIRY_GRACE_S = 3.0
# A stopping worker gets the shutdown grace and this long besides to hand back and exit.
_STOP_MARGIN_S = 10.0


@contextmanager
def _stop_signals_blocked() -> Iterator[None]:
    """Block SIGINT and SIGTERM in this thread while a child is started: the child inherits the
    mask and unblocks them once its handlers are installed (server.worker.loop.install_sigterm),
    so a signal sent meanwhile is handled, not fatal. A signal for this process stays pending
    the few milliseconds the block lasts."""
    # Starting multiprocessing's resource tracker unblocks these signals after spawning it, so
    # start it first (a no-op once it runs); then the block lasts until the worker is spawned.
    resource_tracker.ensure_running()
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A killed worker whose server died too is nobody's child until init reaps it, and a
    # container's init may never do so: a zombie is dead.
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def _worker_process(
    settings_json: str,
    worker_id: str,
    parent_pid: int,
    runner_factory: RunnerFactory | None,
    env: dict[str, str] | None = None,
    slot_info: dict[str, Any] | None = None,
) -> None:
    """A spawned worker's entry: its slot's environment first (CUDA_VISIBLE_DEVICES: CUDA reads
    it once, when torch first initialises it, which nothing before this line does), then its
    logging, as the server's (level, text or JSON lines naming the worker), then the worker."""
    os.environ.update(env or {})
    configure_logging(Settings.model_validate_json(settings_json), worker=worker_id)
    worker_main(settings_json, worker_id, parent_pid, runner_factory, slot_info)


class _Slot:
    def __init__(self, plan: gpus.Slot) -> None:
        self.plan = plan  # its GPUs and the environment its worker starts with
        self.proc: Any = None
        self.worker_id = ""
        self.started = 0.0
        self.fast_deaths = 0
        self.given_up = False
        self.restart_at: float | None = None  # monotonic time to start a dead worker's successor
        self.released: list[Any] | None = None  # a dead worker's jobs, once handed back
        self.store_backoff = Backoff()  # restarts of a worker that could not open the store


class Supervisor:
    def __init__(self, settings: Settings, store: JobStore, runner_factory: RunnerFactory | None = None):
        self.s = settings
        self.store = store
        # None: the workers build the real pipeline. A factory must be importable by name (the
        # spawned process unpickles it by reference); the tests pass failure-named fakes.
        self.runner_factory = runner_factory
        self.host = socket.gethostname()
        # GpuPlanError for GPUs asked for that are not there (the CLI checked before the API).
        self.plan = gpus.plan(settings)
        self.slots = [_Slot(p) for p in self.plan.slots]
        self.failed_reason = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._ctx = mp.get_context("spawn")
        self.outage = Outage("supervisor", log)
        self._backoff = Backoff()
        self._next_try = 0.0  # monotonic: no tick before this after a failed one
        self._recovered = False  # the earlier run's dead workers were handed back
        self._forgive = False  # a store call failed: renew every lease before expiring any
        self._last_expire = 0.0
        self._unservable_since: float | None = None

    def owns_host(self, host: str) -> bool:
        return host == self.host

    def start(self) -> None:
        if self.slots or self.plan.warnings:
            log.info("worker plan: %s", self.plan.describe())
        for warning in self.plan.warnings:
            log.warning("%s", warning)
        try:
            self._recover_from_earlier_run()
            self._recovered = True
        except Exception as e:  # the store is down at start: the loop tries again
            self._tick_failed(e)
        for slot in self.slots:
            self._spawn(slot)
        self._thread = threading.Thread(target=self._loop, name="supervisor", daemon=True)
        self._thread.start()

    def _recover_from_earlier_run(self) -> None:
        """Workers of an earlier run of this server on this host whose process is gone: hand
        their jobs back now instead of waiting for the leases to run out. (A worker stopped
        gracefully handed its jobs back itself and is marked stopped: nothing to do.) The
        process died with its job, so the claim counts as an attempt."""
        for w in self.store.workers():
            if w.host == self.host and w.state != "stopped" and not _pid_alive(w.pid):
                for r in self.store.release_worker(w.id, "The server restarted"):
                    log.info("worker %s from an earlier run: %s", w.id, r.describe())
                w.state, w.reason = "stopped", "gone after a restart"
                self.store.upsert_worker(w)

    def _spawn(self, slot: _Slot) -> None:
        slot.worker_id = new_worker_id()
        slot.released = None
        slot.proc = self._ctx.Process(
            target=_worker_process,
            args=(self.s.model_dump_json(), slot.worker_id, os.getpid(), self.runner_factory,
                  dict(slot.plan.env), slot.plan.info()),
            name=f"wan-vace-worker-{slot.worker_id}",
            # A daemon process may not start processes, and a worker over several GPUs starts
            # its group's other ranks. Either kind ends with the server all the same: `stop`
            # terminates it, and a worker whose server died hands its jobs back and exits.
            daemon=self.s.gpus_per_job == 1,
        )  # fmt: skip
        with _stop_signals_blocked():
            slot.proc.start()
        slot.started = time.monotonic()
        where = f" on CUDA_VISIBLE_DEVICES={slot.plan.cuda_visible_devices}" if slot.plan.gpus else ""
        log.info("started worker %s (pid %s)%s", slot.worker_id, slot.proc.pid, where)

    def _loop(self) -> None:
        while not self._stop.wait(0.5):
            if time.monotonic() < self._next_try:
                continue
            try:
                self._tick()
            except Exception as e:  # never the end of this thread: restarts and expiry need it
                self._tick_failed(e)
            else:
                self._backoff.reset()
                self.outage.ok()

    def _tick_failed(self, e: Exception) -> None:
        self.outage.failed(e)  # logged once per outage
        self._forgive = True
        self._next_try = time.monotonic() + self._backoff.next()

    def _tick(self) -> None:
        """One round: hand back and restart dead workers, renew or expire leases, fail queued
        jobs no worker can run. Each step can be run again after a failure."""
        if not self._recovered:
            self._recover_from_earlier_run()
            self._recovered = True
        for slot in self.slots:
            if slot.given_up or slot.proc is None or slot.proc.is_alive():
                continue
            if slot.restart_at is None:
                self._on_death(slot)  # gives up, or sets when to restart
            if slot.restart_at is not None and time.monotonic() >= slot.restart_at:
                if self._stop.is_set():
                    break
                self._spawn(slot)
                slot.restart_at = None  # after the spawn: a failed one is tried again
        if self._forgive:
            # The store failed us, so it failed the workers too: none could renew a lease. Give
            # every running job a fresh one before expiring any (a live worker renews at once).
            ids = self.store.extend_leases(self.s.lease_seconds)
            if ids:
                log.warning("after the store outage: renewed the lease of job(s) %s", ", ".join(ids))
            self._forgive = False
            self._last_expire = time.monotonic()
        elif time.monotonic() - self._last_expire > 1.0:
            self._last_expire = time.monotonic()
            ids = self.store.expire_leases(time.time() - _EXPIRY_GRACE_S)
            if ids:
                log.warning("lease expired for job(s) %s", ", ".join(ids))
                nudge(self.s.data_dir)  # re-queued: an idle worker here takes them now
        self._fail_unservable()

    def _unservable_reason(self) -> str:
        """Why no worker can run queued jobs ("" while one may): every local worker was given
        up, and no worker anywhere (another machine's) is live."""
        if not self.slots or not self.failed_reason or not all(s.given_up for s in self.slots):
            return ""
        now, live_s = time.time(), max(STALE_S, self.s.lease_seconds)
        for w in self.store.workers():
            if w.state in ("starting", "loading", "ready", "busy") and now - w.heartbeat_at < live_s:
                return ""
        return self.failed_reason

    def _fail_unservable(self) -> None:
        reason = self._unservable_reason()
        if not reason:
            self._unservable_since = None
            return
        now = time.monotonic()
        if self._unservable_since is None:
            self._unservable_since = now
        if now - self._unservable_since < self.s.unservable_grace:
            return
        error = f"No worker can run jobs on this server: {reason}"
        ids = self.store.fail_queued(code=CODE_UNAVAILABLE, error=error)
        if ids:
            log.warning("failed %d queued job(s) (%s): %s", len(ids), ", ".join(ids), error)

    def _on_death(self, slot: _Slot) -> None:
        """Hand a dead worker's jobs back, then give up on its slot or say when to restart it.
        Run again from the start when a store call in it fails (the hand-back is kept)."""
        code = slot.proc.exitcode
        # A graceful stop handed its job back before exiting; a job still held here was not
        # handed back (a crash, or a job that exited the process): its attempt counts.
        reason = f"The worker process exited unexpectedly (exit code {code})"
        if slot.released is None:
            slot.released = self.store.release_worker(slot.worker_id, reason)
            remove_work_dirs(slot.worker_id)
            if slot.released:
                nudge(self.s.data_dir)
            if code != 0 or slot.released:
                what = "; ".join(r.describe() for r in slot.released) or "it held no job"
                log.warning("worker %s died (exit code %s): %s", slot.worker_id, code, what)
        released = slot.released
        if code == 0 and not released:  # stopped gracefully (a signal)
            log.info("worker %s stopped (exit code 0)", slot.worker_id)
            slot.fast_deaths = 0
            # Restarted unless the server stops meanwhile (Ctrl-C reaches both at once).
            slot.restart_at = time.monotonic() + _CLEAN_EXIT_GRACE_S
            return
        if code == EXIT_STORE_UNAVAILABLE:  # an outage, not a crash: not counted
            self._mark_stopped(slot.worker_id, "could not open the job store")
            delay = slot.store_backoff.next()
            log.warning("worker %s could not open the store; restarting it in %.1f s", slot.worker_id, delay)
            slot.restart_at = time.monotonic() + delay
            return
        if code == EXIT_LOAD_FAILED:
            slot.given_up = True
            row = next((w for w in self.store.workers() if w.id == slot.worker_id), None)
            self.failed_reason = row.reason if row else "the worker could not load the model"
            return
        self._mark_stopped(slot.worker_id, reason)
        slot.store_backoff.reset()
        # A worker that died while the store was failing may have died of it: not counted.
        during_outage = self.outage.last_failure >= slot.started
        if time.monotonic() - slot.started < _FAST_DEATH_S and not during_outage:
            slot.fast_deaths += 1
        elif not during_outage:
            slot.fast_deaths = 0
        if slot.fast_deaths >= _MAX_FAST_DEATHS:
            slot.given_up = True
            self.failed_reason = f"worker crashed {slot.fast_deaths} times in a row right after starting"
            return
        delay = min(2.0 ** (slot.fast_deaths - 1), 10.0) if slot.fast_deaths else 0.0
        slot.restart_at = time.monotonic() + delay

    def _mark_stopped(self, worker_id: str, reason: str) -> None:
        row = next((w for w in self.store.workers() if w.id == worker_id), None)
        if row is not None:
            row.state, row.reason = "stopped", reason
            self.store.upsert_worker(row)

    def snapshot(self) -> dict[str, dict[str, Any]]:
        return {
            s.worker_id: {"alive": bool(s.proc and s.proc.is_alive()), "pid": s.proc.pid if s.proc else None}
            for s in self.slots
            if s.worker_id
        }

    def stop(self) -> None:
        """Stop every worker: SIGTERM (each drains: finishes its jobs within the shutdown grace,
        hands back the rest), wait the grace and a margin, then kill what still runs and hand
        its jobs back, counted."""
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        running = [s for s in self.slots if s.proc is not None and s.proc.is_alive()]
        draining = self._draining_ids() if running else set()
        for slot in running:
            # One already draining (Ctrl-C reached it) is not signalled again: a second signal
            # would cut its grace short.
            if slot.worker_id not in draining:
                slot.proc.terminate()
        deadline = time.monotonic() + self.s.shutdown_grace + _STOP_MARGIN_S
        for slot in running:
            slot.proc.join(timeout=max(0.1, deadline - time.monotonic()))
            if slot.proc.is_alive():
                slot.proc.kill()
                slot.proc.join(timeout=5)
                self._killed(slot)

    def _draining_ids(self) -> set[str]:
        try:
            return {w.id for w in self.store.workers() if w.state == WorkerState.STOPPING.value}
        except Exception:  # the store is down: signal every worker, as before there were drains
            log.debug("reading the worker rows failed", exc_info=True)
            return set()

    def _killed(self, slot: _Slot) -> None:
        """A worker that outlived the grace was killed: its jobs did not finish, and it did not
        hand them back, so they are re-queued now with the attempt counted."""
        reason = (
            f"The worker did not stop within the shutdown grace ({self.s.shutdown_grace:g} s) and was killed"
        )
        try:
            released = self.store.release_worker(slot.worker_id, reason)
            self._mark_stopped(slot.worker_id, reason)
        except Exception:  # the store is down: the next start (or the leases running out) does it
            log.exception("worker %s: handing back the jobs of a killed worker failed", slot.worker_id)
            return
        remove_work_dirs(slot.worker_id)
        what = "; ".join(r.describe() for r in released) or "it held no job"
        log.warning("worker %s killed after the shutdown grace: %s", slot.worker_id, what)


__all__ = ["Supervisor", "WorkerInfo"]
