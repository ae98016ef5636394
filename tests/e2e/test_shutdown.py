"""Graceful shutdown with real processes and signals: a worker sent SIGTERM claims nothing more,
finishes the job it holds within the shutdown grace (or hands it back, uncounted, when the grace
runs out or a second signal comes) and exits 0; the supervisor's stop waits for its workers'
grace, skips a worker that is draining already, and kills (and hands back, counted) one that
does not stop. Also: each spawned worker gets its slot's CUDA_VISIBLE_DEVICES (a fake
nvidia-smi on PATH makes this CPU host show GPUs), and an idle worker waits on the store's events
when the store has them. Fake runners from tests/fakes.py ("sleep S" renders for S seconds)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from server.kernel.ids import new_worker_id
from server.kernel.jobstate import State, WorkerState
from server.settings import Settings
from server.store import Events, JobStore, open_store
from server.store.sqlite import SqliteJobStore
from server.worker import Worker, supervision
from server.worker.supervision import Supervisor
from tests import fakes
from tests.conftest import FAST, ROOT, ServerProcess, wait_terminal
from tests.unit.test_gpus import fake_nvidia_smi
from tests.unit.test_worker_failures import submit, wait_for

END = {State.COMPLETED, State.FAILED, State.CANCELLED}
# A worker process on the fake runner: `worker_main`, as `wan-vace worker` runs one (its signal
# handling included), with the test's settings.
WORKER = """
import sys
from server.worker.loop import worker_main
from tests import fakes
worker_main(sys.argv[2], sys.argv[1], None, fakes.sleeps)
"""


@pytest.fixture
def clean_env(monkeypatch):
    """No WAN_VACE_* or CUDA_* variable of the caller's leaks into these settings or workers."""
    for k in list(os.environ):
        if k.upper().startswith("WAN_VACE_") or k.startswith("CUDA_"):
            monkeypatch.delenv(k)
    return monkeypatch


def make_settings(tmp_path: Path, **kw) -> Settings:
    return Settings(**{"data_dir": tmp_path, "lease_seconds": 5.0, "poll_interval": 0.05, "max_attempts": 2,
                       "retry_delay": 0.0, "workers": 1, "device": "cpu", **kw})  # fmt: skip


class WorkerProcess:
    """A worker in its own process (fake runner), its log in the data dir."""

    def __init__(self, settings: Settings):
        self.id = new_worker_id()
        self.log_path = Path(settings.data_dir) / f"worker-{self.id}.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(self.log_path, "ab") as log:
            argv = [sys.executable, "-c", WORKER, self.id, settings.model_dump_json()]
            self.proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"worker still running after {timeout} s:\n{self.log()[-4000:]}") from None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@contextmanager
def worker_process(settings: Settings) -> Iterator[WorkerProcess]:
    w = WorkerProcess(settings)
    try:
        yield w
    finally:
        w.kill()


def wait_progress(store: JobStore, job_id: str, timeout: float = 60) -> None:
    """Until the job runs in its render (progress reported after the fetch)."""
    deadline = time.monotonic() + timeout
    while (job := store.get(job_id)).status is not State.PROCESSING or job.progress < 0.1:
        assert job.status not in END and time.monotonic() < deadline, job
        time.sleep(0.02)


def row(store: JobStore, worker_id: str):
    return next((w for w in store.workers() if w.id == worker_id), None)


# Drain -----------------------------------------------------------------------------------------
def test_sigterm_lets_the_job_finish_within_the_grace_and_claims_nothing_more(tmp_path, clean_env):
    s = make_settings(tmp_path, shutdown_grace=10.0)
    store = open_store(s)
    job = submit(store, "sleep 2")
    with worker_process(s) as w:
        wait_progress(store, job)
        time.sleep(0.5)
        signalled = time.monotonic()
        w.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        while (r := row(store, w.id)).state != WorkerState.STOPPING.value:
            assert time.monotonic() < deadline, r
            time.sleep(0.02)
        assert r.reason == "The worker was stopped (SIGTERM)" and r.info["jobs"] == [job]
        later = submit(store, "queued during the drain")
        assert w.wait(20) == 0
        took = time.monotonic() - signalled
    done = store.get(job)
    assert (done.status, done.attempts, done.code, len(done.outputs)) == (State.COMPLETED, 1, 0, 1), done
    assert 1.0 < took < 8, took  # it waited for the job (1.5 s left), not the whole grace
    assert store.get(later).status is State.CREATED and store.get(later).attempts == 0
    assert row(store, w.id).state == WorkerState.STOPPED.value
    log = w.log()
    assert f"draining: finishing 1 job(s) ({job}) within 10 s" in log
    assert "drained in " in log and f"1 job(s) finished ({job})" in log
    assert "Traceback" not in log


def test_a_grace_that_runs_out_hands_the_job_back_uncounted_for_another_worker(tmp_path, clean_env):
    s = make_settings(tmp_path, shutdown_grace=0.5)
    store = open_store(s)
    job = submit(store, "sleep 3")
    with worker_process(s) as w:
        wait_progress(store, job)
        time.sleep(0.5)
        signalled = time.monotonic()
        w.proc.send_signal(signal.SIGTERM)
        assert w.wait(10) == 0
        took = time.monotonic() - signalled
    assert took < 2, took  # the grace (0.5 s), not the job (2.5 s left)
    back = store.get(job)
    assert (back.status, back.attempts, back.code, back.progress) == (State.CREATED, 0, 0, 0.0), back
    assert back.error == "The worker was stopped (SIGTERM); the job was queued again."
    assert "the 0.5 s grace ran out: re-queued job " + job + " (attempt not counted; 0 of 2 used)" in w.log()
    with worker_process(s) as other:
        done = wait_for(store, job, END, timeout=60)
        assert (done.status, done.attempts) == (State.COMPLETED, 1), done
        other.proc.send_signal(signal.SIGTERM)
        assert other.wait(10) == 0


def test_a_second_signal_during_the_grace_hands_back_at_once(tmp_path, clean_env):
    s = make_settings(tmp_path, shutdown_grace=60.0)
    store = open_store(s)
    job = submit(store, "sleep 30")
    with worker_process(s) as w:
        wait_progress(store, job)
        w.proc.send_signal(signal.SIGINT)  # Ctrl-C
        time.sleep(0.3)
        w.proc.send_signal(signal.SIGTERM)  # within a second: the same stop, ignored
        time.sleep(1.2)
        assert w.proc.poll() is None and store.get(job).status is State.PROCESSING
        w.proc.send_signal(signal.SIGINT)  # Ctrl-C again: now
        assert w.wait(10) == 0
    back = store.get(job)
    assert (back.status, back.attempts) == (State.CREATED, 0), back
    assert "a second signal: re-queued job " + job in w.log()


def test_a_grace_of_zero_hands_back_at_once(tmp_path, clean_env):
    s = make_settings(tmp_path, shutdown_grace=0.0)
    store = open_store(s)
    job = submit(store, "sleep 30")
    with worker_process(s) as w:
        wait_progress(store, job)
        w.proc.send_signal(signal.SIGTERM)
        assert w.wait(10) == 0
    assert (store.get(job).status, store.get(job).attempts) == (State.CREATED, 0)
    assert "draining" not in w.log()


# The supervisor's stop ----------------------------------------------------------------------------
def test_the_supervisor_stop_waits_for_the_grace_and_skips_a_worker_already_draining(tmp_path, clean_env):
    s = make_settings(tmp_path, shutdown_grace=20.0)
    store = open_store(s)
    job = submit(store, "sleep 3.5")
    sup = Supervisor(s, store, runner_factory=fakes.sleeps)
    sup.start()
    try:
        wait_progress(store, job)
        (slot,) = sup.slots
        os.kill(slot.proc.pid, signal.SIGINT)  # Ctrl-C reaches the worker first...
        deadline = time.monotonic() + 5
        while row(store, slot.worker_id).state != WorkerState.STOPPING.value:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        time.sleep(1.2)  # ...and the server's stop comes later than one stop's signals would
    finally:
        sup.stop()  # a second signal would hand the job back: it sends none to a draining worker
    done = store.get(job)
    assert (done.status, done.attempts) == (State.COMPLETED, 1), done
    assert slot.proc.exitcode == 0


def test_the_supervisor_stop_drains_its_workers(tmp_path, clean_env):
    s = make_settings(tmp_path, shutdown_grace=20.0)
    store = open_store(s)
    job = submit(store, "sleep 2")
    sup = Supervisor(s, store, runner_factory=fakes.sleeps)
    sup.start()
    try:
        wait_progress(store, job)
    finally:
        started = time.monotonic()
        sup.stop()
    assert 1.0 < time.monotonic() - started < 15
    done = store.get(job)
    assert (done.status, done.attempts) == (State.COMPLETED, 1), done


def test_a_worker_that_outlives_the_grace_is_killed_and_its_job_handed_back_counted(
    tmp_path, clean_env, monkeypatch
):
    monkeypatch.setattr(supervision, "_STOP_MARGIN_S", 0.5)
    s = make_settings(tmp_path, shutdown_grace=0.5)
    store = open_store(s)
    job = submit(store, "sleep 30")
    sup = Supervisor(s, store, runner_factory=fakes.ignores_sigterm)
    sup.start()
    try:
        wait_progress(store, job)
    finally:
        started = time.monotonic()
        sup.stop()
    assert time.monotonic() - started < 5
    (slot,) = sup.slots
    assert slot.proc.exitcode == -signal.SIGKILL
    back = store.get(job)
    assert (back.status, back.attempts) == (State.CREATED, 1), back
    assert back.error.startswith("The worker did not stop within the shutdown grace (0.5 s) and was killed")
    assert row(store, slot.worker_id).state == WorkerState.STOPPED.value


# GPUs -------------------------------------------------------------------------------------------
def test_each_spawned_worker_runs_with_its_slots_cuda_visible_devices(tmp_path, clean_env):
    clean_env.setenv("PATH", f"{fake_nvidia_smi(tmp_path, 4)}{os.pathsep}{os.environ['PATH']}")
    s = make_settings(tmp_path, workers=None, device="auto", gpus_per_job=2)
    store = open_store(s)
    sup = Supervisor(s, store, runner_factory=fakes.sleeps)
    assert [sl.plan.cuda_visible_devices for sl in sup.slots] == ["0,1", "2,3"]
    sup.start()
    try:
        deadline = time.monotonic() + 60
        while len(ready := [w for w in store.workers() if w.state == WorkerState.READY.value]) < 2:
            assert time.monotonic() < deadline, store.workers()
            time.sleep(0.05)
    finally:
        sup.stop()
    # What each runner saw in its own process, and what its row says.
    seen = sorted((w.info["environment"]["CUDA_VISIBLE_DEVICES"], w.info["gpus"]) for w in ready)
    assert seen == [("0,1", "0,1"), ("2,3", "2,3")]
    assert {w.info["environment"]["CUDA_DEVICE_ORDER"] for w in ready} == {"PCI_BUS_ID"}
    assert all(w.info["gpu_names"] == ["NVIDIA H200"] * 2 for w in ready)
    assert "CUDA_VISIBLE_DEVICES" not in os.environ  # the server's own environment is untouched


def test_serve_starts_one_worker_per_gpu(tmp_path):
    srv = ServerProcess(tmp_path, PATH=f"{fake_nvidia_smi(tmp_path, 2)}{os.pathsep}{os.environ['PATH']}")
    for k in [k for k in srv.env if k.startswith("CUDA_") or k == "WAN_VACE_WORKERS"]:
        del srv.env[k]
    srv.start()
    try:
        deadline = time.monotonic() + 90
        while True:  # both loaded (the first ready one makes the server ready)
            workers = srv.wait_health({"ready", "busy"})["workers"]
            if len([w for w in workers if w["state"] == "ready"]) == 2 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert sorted(w["gpus"] for w in workers) == ["0", "1"], workers
        assert all(w["gpu_names"] == ["NVIDIA H200"] for w in workers)
        with srv.client() as c:
            jid = c.post("/api/v3/wavespeed-ai/wan-2.1-14b-vace", json={"prompt": "x", **FAST}).json()[
                "data"
            ]["id"]
            assert wait_terminal(c, jid)["status"] == "completed"
    finally:
        srv.stop()
    log = srv.log_path.read_text(errors="replace")
    assert "worker plan: 2 workers: worker 1 on GPU 0 (NVIDIA H200); worker 2 on GPU 1 (NVIDIA H200)" in log


# The idle wait on store events ------------------------------------------------------------------
class QueueEvents(Events):
    """Store events a test sends (what PostgreSQL's LISTEN gives a worker)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._pending: list[tuple[str, str]] = []
        self.waits = 0
        self.closed = False

    def send(self, channel: str, payload: str) -> None:
        with self._cond:
            self._pending.append((channel, payload))
            self._cond.notify_all()

    def wait(self, timeout: float) -> list[tuple[str, str]]:
        with self._cond:
            self.waits += 1
            self._cond.wait_for(lambda: self._pending, timeout)
            out, self._pending = self._pending, []
            return out

    def close(self) -> None:
        self.closed = True


def test_an_idle_worker_waits_on_the_stores_events_and_a_stop_ends_the_wait(tmp_path, clean_env, monkeypatch):
    from server.store import CHANNEL_QUEUED

    events = QueueEvents()
    channels: list[tuple[str, ...]] = []

    def listen(self, *names: str) -> Events:
        channels.append(names)
        return events

    monkeypatch.setattr(SqliteJobStore, "listen", listen)
    # Polling every 30 s and no wake-up socket: only an event can make this worker claim soon.
    s = make_settings(tmp_path, poll_interval=30.0, data_dir=tmp_path)
    monkeypatch.setattr(Worker, "_open_waker", lambda self: None)
    store = open_store(s)
    worker = Worker(s, new_worker_id(), runner_factory=fakes.sleeps)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while worker.info.state != WorkerState.READY.value or events.waits == 0:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert channels == [(CHANNEL_QUEUED,)]
        job = submit(store, "quick")
        time.sleep(0.5)
        assert store.get(job).status is State.CREATED  # no event yet, no poll for 30 s
        sent = time.time()
        events.send(CHANNEL_QUEUED, job)
        done = wait_for(store, job, END, timeout=5)
        assert done.status is State.COMPLETED and done.started_at - sent < 0.5
        time.sleep(0.3)  # idle again, in the events' wait
    finally:
        stopped = time.monotonic()
        worker.stop("the test is over")
        thread.join(5)
    assert not thread.is_alive() and time.monotonic() - stopped < 1.5
    assert events.closed


def test_serve_runs_a_job_over_a_two_process_group(tmp_path):
    # --gpus-per-job 2 on the CPU (gloo): the spawned worker starts its second rank itself
    # (a daemon process could not), and the job goes through the context-parallel group.
    from tests.conftest import FAST, ServerProcess, wait_terminal

    srv = ServerProcess(tmp_path, WAN_VACE_DEVICE="cpu", WAN_VACE_GPUS_PER_JOB="2").start(timeout=180)
    try:
        with srv.client() as c:
            health = c.get("/health").json()
            (w,) = [w for w in health["workers"] if w["alive"]]
            assert w["group"]["world_size"] == 2, w
            r = c.post("/api/v3/wavespeed-ai/wan-2.1-14b-vace", json={"prompt": "x", **FAST})
            d = wait_terminal(c, r.json()["data"]["id"], timeout=180)
            assert d["status"] == "completed", d["error"]
    finally:
        srv.stop()
