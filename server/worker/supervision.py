"""Starts the local worker processes (in the API process) and keeps them alive.

Workers are spawned, never forked (a forked child would inherit the API's threads and sockets,
and CUDA cannot be initialised in a fork). A worker that dies is restarted; its job is handed
back at once (re-queued while attempts remain, else failed with a clear error). A worker that
cannot load its model exits with EXIT_LOAD_FAILED and is not restarted: /health reports why.
The supervisor also expires leases of workers anywhere (another machine, an earlier run).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import socket
import threading
import time
from typing import Any

from server.settings import Settings
from server.store import JobStore, WorkerInfo
from server.kernel.ids import new_worker_id
from server.kernel.runner import RunnerFactory
from server.worker.loop import EXIT_LOAD_FAILED, worker_main

log = logging.getLogger("wan_vace.supervisor")

# A worker that dies this soon after starting, this many times in a row, is crash-looping.
_FAST_DEATH_S = 20.0
_MAX_FAST_DEATHS = 5


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _Slot:
    def __init__(self) -> None:
        self.proc: Any = None
        self.worker_id = ""
        self.started = 0.0
        self.fast_deaths = 0
        self.given_up = False


class Supervisor:
    def __init__(self, settings: Settings, store: JobStore, runner_factory: RunnerFactory | None = None):
        self.s = settings
        self.store = store
        # None: the workers build the real pipeline. A factory must be importable by name (the
        # spawned process unpickles it by reference); the tests pass failure-named fakes.
        self.runner_factory = runner_factory
        self.host = socket.gethostname()
        self.slots = [_Slot() for _ in range(max(0, settings.workers))]
        self.failed_reason = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._ctx = mp.get_context("spawn")

    def owns_host(self, host: str) -> bool:
        return host == self.host

    def start(self) -> None:
        self._recover_from_earlier_run()
        for slot in self.slots:
            self._spawn(slot)
        self._thread = threading.Thread(target=self._loop, name="supervisor", daemon=True)
        self._thread.start()

    def _recover_from_earlier_run(self) -> None:
        """Workers of an earlier run of this server on this host whose process is gone: hand
        their jobs back now instead of waiting for the leases to run out."""
        for w in self.store.workers():
            if w.host == self.host and w.state != "stopped" and not _pid_alive(w.pid):
                ids = self.store.release_worker(w.id, "The server restarted")
                if ids:
                    log.info("re-queued %d job(s) of a worker from an earlier run", len(ids))
                w.state, w.reason = "stopped", "gone after a restart"
                self.store.upsert_worker(w)

    def _spawn(self, slot: _Slot) -> None:
        slot.worker_id = new_worker_id()
        slot.proc = self._ctx.Process(
            target=worker_main,
            args=(self.s.model_dump_json(), slot.worker_id, os.getpid(), self.runner_factory),
            name=f"wan-vace-worker-{slot.worker_id}",
            daemon=True,
        )
        slot.proc.start()
        slot.started = time.monotonic()
        log.info("started worker %s (pid %s)", slot.worker_id, slot.proc.pid)

    def _loop(self) -> None:
        last_expire = 0.0
        while not self._stop.wait(0.5):
            for slot in self.slots:
                if slot.given_up or slot.proc is None or slot.proc.is_alive():
                    continue
                self._on_death(slot)
            if time.monotonic() - last_expire > 1.0:
                last_expire = time.monotonic()
                try:
                    ids = self.store.expire_leases()
                    if ids:
                        log.warning("lease expired for job(s) %s", ", ".join(ids))
                except Exception:
                    log.exception("lease expiry failed")

    def _on_death(self, slot: _Slot) -> None:
        code = slot.proc.exitcode
        reason = f"The worker process exited unexpectedly (exit code {code})"
        ids = self.store.release_worker(slot.worker_id, reason)
        log.warning("worker %s died (exit code %s); handed back job(s) %s", slot.worker_id, code, ids)
        if code == EXIT_LOAD_FAILED:
            slot.given_up = True
            row = next((w for w in self.store.workers() if w.id == slot.worker_id), None)
            self.failed_reason = row.reason if row else "the worker could not load the model"
            return
        self._mark_stopped(slot.worker_id, reason)
        if time.monotonic() - slot.started < _FAST_DEATH_S:
            slot.fast_deaths += 1
        else:
            slot.fast_deaths = 0
        if slot.fast_deaths >= _MAX_FAST_DEATHS:
            slot.given_up = True
            self.failed_reason = f"worker crashed {slot.fast_deaths} times in a row right after starting"
            return
        time.sleep(min(2.0 ** (slot.fast_deaths - 1), 10.0) if slot.fast_deaths else 0)
        self._spawn(slot)

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
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        procs = [s.proc for s in self.slots if s.proc is not None and s.proc.is_alive()]
        for p in procs:
            p.terminate()  # SIGTERM: the worker hands its job back and exits
        deadline = time.monotonic() + 10
        for p in procs:
            p.join(timeout=max(0.1, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join(timeout=5)


__all__ = ["Supervisor", "WorkerInfo"]
