"""The pipelined worker (a device stage renders the next job while a CPU stage finishes the
last) and the wake-up signal, with the two-stage fake runner (tests/fakes.py `STAGES` holds,
releases or fails each stage by name), a real SQLite store, real local storage and real Unix
sockets. Ordering is shown with the stages' events, not with timings."""

from __future__ import annotations

import errno
import os
import socket
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.kernel.errors import CODE_INTERNAL
from server.kernel.ids import new_worker_id
from server.kernel.jobstate import State, WorkerState
from server.settings import Settings
from server.storage import LocalStorage
from server.store import open_store
from server.store.sqlite import SqliteJobStore
from server.wakeup import Waker, nudge, wake_dir
from server.worker import Worker
from server.worker.handoff import Handoff
from tests import fakes
from tests.unit.test_worker_failures import assert_completed, submit, wait_for

STAGES = fakes.STAGES
END = {State.COMPLETED, State.FAILED, State.CANCELLED}


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(data_dir=tmp_path, model="tiny", workers=1, lease_seconds=5.0,
                    poll_interval=0.02, max_attempts=2, retry_delay=0.0)  # fmt: skip


@pytest.fixture(autouse=True)
def fresh_stages():
    STAGES.reset()
    yield
    STAGES.reset()  # a stage a failed test left held lets go


@contextmanager
def pipelined_worker(settings: Settings, factory=fakes.two_stage):
    worker = Worker(settings, new_worker_id(), runner_factory=factory)
    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(worker.run()), daemon=True)
    thread.start()
    try:
        yield worker
    finally:
        STAGES.reset()
        worker.stop("the test is over")
        thread.join(10)
        assert not thread.is_alive()
    assert codes == [0]
    assert work_dirs(worker.id) == []  # each job's work dir removed, whatever became of it


def work_dirs(worker_id: str) -> list[Path]:
    return [p for p in Path(tempfile.gettempdir()).glob(f"wan-vace-{worker_id}-*") if p.is_dir()]


def output_files(settings: Settings, job_id: str) -> list[Path]:
    return [p for p in (settings.storage_dir / "outputs" / job_id).rglob("*") if p.is_file()]


def wait_until(cond, timeout: float = 20, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what or cond}"
        time.sleep(0.005)


# The pipeline -------------------------------------------------------------------------------------
def test_the_next_job_renders_while_the_last_one_finishes_and_a_third_waits(settings):
    store = open_store(settings)
    STAGES.hold("finish:a")
    a, b = submit(store, "a"), submit(store, "b")
    with pipelined_worker(settings) as worker:
        STAGES.wait("finish:a:started")
        STAGES.wait("render:b:ended")  # b rendered while a is still in its CPU stage
        assert not STAGES.happened("finish:a:ended")
        assert {j.id for j in worker.owned} == {a, b}
        assert [store.get(j).status for j in (a, b)] == [State.PROCESSING] * 2
        (row,) = store.workers()
        assert row.state == WorkerState.BUSY.value and set(row.info["jobs"]) == {a, b}
        # The hand-off holds one job: a third is not claimed while b waits for the CPU stage.
        c = submit(store, "c")
        time.sleep(0.3)  # 15 polls
        assert store.get(c).status is State.CREATED and not STAGES.happened("render:c:started")
        STAGES.release("finish:a")
        for j in (a, b, c):
            assert_completed(store, j)
        log = STAGES.log
        assert log.index("finish:a:ended") < log.index("finish:b:started")
        assert log.index("render:b:started") < log.index("finish:a:ended")
        assert all(store.get(j).attempts == 1 for j in (a, b, c))
        assert [len(output_files(settings, j)) for j in (a, b, c)] == [1, 1, 1]
        wait_until(lambda: store.workers()[0].state == WorkerState.READY.value, what="ready")
        assert "jobs" not in store.workers()[0].info


def test_a_job_is_reported_completed_only_once_its_output_is_stored(settings, monkeypatch):
    store = open_store(settings)
    put_started, release_put = threading.Event(), threading.Event()
    real_put = LocalStorage.put_file

    def blocking_put(self, key, src):
        put_started.set()
        assert release_put.wait(20)
        return real_put(self, key, src)

    real_complete = SqliteJobStore.complete
    stored_at_complete: list[bool] = []

    def checking_complete(self, job_id, worker_id, **outcome):
        storage = LocalStorage(settings.storage_dir)
        stored_at_complete.append(all(storage.exists(k) for k in outcome["outputs"]))
        return real_complete(self, job_id, worker_id, **outcome)

    monkeypatch.setattr(LocalStorage, "put_file", blocking_put)
    monkeypatch.setattr(SqliteJobStore, "complete", checking_complete)
    a = submit(store, "a")
    with pipelined_worker(settings):
        assert put_started.wait(20)
        for _ in range(30):  # polled while the put is blocked: never completed, no output
            job = store.get(a)
            assert job.status is State.PROCESSING and job.outputs == [], job
            time.sleep(0.01)
        release_put.set()
        assert_completed(store, a)
    assert stored_at_complete == [True]


@pytest.mark.parametrize("report", [True, False], ids=["at-a-progress-call", "before-storing"])
def test_a_job_cancelled_in_the_cpu_stage_writes_nothing(settings, report):
    store = open_store(settings)
    STAGES.hold("finish:a", report=report)
    a, b = submit(store, "a"), submit(store, "b")
    with pipelined_worker(settings):
        STAGES.wait("finish:a:started")
        job, changed = store.cancel(a)
        assert changed and job.status is State.CANCELLED
        if not report:  # a stage that never reports: the check before storing catches it
            STAGES.release("finish:a")
        assert_completed(store, b)
        job = store.get(a)
        assert job.status is State.CANCELLED and job.outputs == [] and job.error == "Cancelled by request."
        assert output_files(settings, a) == []


def test_a_job_whose_lease_is_lost_in_the_cpu_stage_writes_nothing(settings):
    store = open_store(settings)
    STAGES.hold("finish:a", report=False)
    a = submit(store, "a", max_attempts=1)
    with pipelined_worker(settings):
        STAGES.wait("finish:a:started")
        assert store.expire_leases(time.time() + 3600) == [a]  # what a stalled heartbeat meets
        STAGES.release("finish:a")
        STAGES.wait("finish:a:ended")
        b = submit(store, "b")
        assert_completed(store, b)  # the worker went on
        job = store.get(a)
        assert job.status is State.FAILED and job.outputs == [] and job.attempts == 1
        assert job.error.startswith("The worker stopped renewing its lease")
        assert output_files(settings, a) == []


def test_a_job_lost_in_the_cpu_stage_and_claimed_again_by_the_same_worker_completes_once(settings):
    """The store names this worker the owner again; the earlier run must still write nothing."""
    store = open_store(settings)
    STAGES.hold("finish:a", report=False)
    a = submit(store, "a")
    with pipelined_worker(settings) as worker:
        STAGES.wait("finish:a:started")
        assert store.expire_leases(time.time() + 3600) == [a]
        # Claimed again (attempt 2) and rendered: in the hand-off.
        wait_until(lambda: STAGES.log.count("render:a:ended") == 2, what="the second render")
        assert [j.id for j in worker.owned] == [a, a]
        STAGES.release("finish:a")
        assert_completed(store, a)
        assert store.get(a).attempts == 2
        assert STAGES.log.count("finish:a:ended") == 2
        assert len(output_files(settings, a)) == 1  # the earlier run stored nothing


def test_a_failure_in_finish_fails_that_job_only(settings):
    store = open_store(settings)
    STAGES.hold("finish:a")
    STAGES.fail("finish:a", RuntimeError("x264 exited with status 1"))
    a, b = submit(store, "a"), submit(store, "b")
    with pipelined_worker(settings):
        STAGES.wait("render:b:ended")  # b waits in the hand-off while a fails
        STAGES.release("finish:a")
        job = wait_for(store, a, END)
        assert job.status is State.FAILED and job.code == CODE_INTERNAL and job.attempts == 1
        assert job.error == "Internal error while running the job (RuntimeError: x264 exited with status 1)"
        assert job.outputs == [] and output_files(settings, a) == []
        assert_completed(store, b)


def test_a_full_disk_in_finish_runs_the_job_again(settings):
    store = open_store(settings)
    STAGES.fail("finish:a", OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    a = submit(store, "a")
    with pipelined_worker(settings):
        assert_completed(store, a)  # failed retryably, then run again (the fault was once)
        job = store.get(a)
        assert job.attempts == 2 and STAGES.log.count("finish:a:started") == 2


def test_a_graceful_stop_hands_back_both_jobs_uncounted(settings):
    store = open_store(settings)
    STAGES.hold("finish:a")
    a, b = submit(store, "a"), submit(store, "b")
    worker = Worker(settings, new_worker_id(), runner_factory=fakes.two_stage)
    codes: list[int] = []
    thread = threading.Thread(target=lambda: codes.append(worker.run()), daemon=True)
    thread.start()
    STAGES.wait("finish:a:started")
    STAGES.wait("render:b:ended")  # one job in each stage
    worker.stop("The worker was stopped (SIGTERM)")  # what SIGTERM and SIGINT do
    thread.join(10)
    assert not thread.is_alive() and codes == [0]
    for j in (a, b):
        job = store.get(j)
        assert (job.status, job.attempts, job.progress, job.code) == (State.CREATED, 0, 0.0, 0), job
        assert job.error == "The worker was stopped (SIGTERM); the job was queued again."
        assert job.lease_owner is None and output_files(settings, j) == []
    assert store.workers()[0].state == WorkerState.STOPPED.value
    assert work_dirs(worker.id) == []
    with pipelined_worker(settings):
        for j in (a, b):
            assert_completed(store, j)
            assert store.get(j).attempts == 1  # only the run that completed counts


def test_a_runner_with_only_run_runs_each_job_in_one_stage(settings):
    store = open_store(settings)
    a, b = submit(store, "a"), submit(store, "b")
    with pipelined_worker(settings, fakes.succeeds) as worker:
        assert_completed(store, a)
        assert_completed(store, b)
        assert worker._handoff is None


def test_the_hand_off_takes_one_job_until_it_is_done():
    handoff: Handoff[str] = Handoff()
    assert handoff.put("a")
    second = threading.Thread(target=lambda: handoff.put("b"), daemon=True)
    second.start()
    assert handoff.take() == "a"
    second.join(0.2)
    assert second.is_alive()  # taken is not done: the CPU stage is still busy with "a"
    handoff.done()
    second.join(5)
    assert not second.is_alive() and handoff.take() == "b"
    handoff.close()
    assert handoff.put("c") is False and handoff.take() is None


# The wake-up ----------------------------------------------------------------------------------------
def test_a_nudge_makes_an_idle_worker_claim_at_once_instead_of_at_its_next_poll(settings):
    settings = settings.model_copy(update={"poll_interval": 5.0})
    store = open_store(settings)
    with pipelined_worker(settings) as worker:
        wait_until(lambda: (wake_dir(settings.data_dir) / f"{worker.id}.sock").exists(), what="socket")
        wait_until(lambda: store.workers()[0].state == WorkerState.READY.value, what="ready")
        time.sleep(0.1)  # its first claim found nothing: the next poll is 5 s away
        unnudged = submit(store, "queued without a nudge")
        time.sleep(1.0)
        assert store.get(unnudged).status is State.CREATED  # waiting for the poll
        sent = time.time()
        assert nudge(settings.data_dir) == 1
        job = wait_for(store, unnudged, {State.PROCESSING, State.COMPLETED}, timeout=5)
        assert job.started_at - sent < 0.1, job.started_at - sent
        assert_completed(store, unnudged)
        # And through the API: its submit nudges, the worker claims at once.
        app = create_app(settings.model_copy(update={"workers": 0, "api_keys": ["k"], "min_free_bytes": 0}))
        with TestClient(app) as c:
            time.sleep(0.1)
            r = c.post("/api/v3/wavespeed-ai/wan-2.1-14b-vace", json={"prompt": "x"},
                       headers={"Authorization": "Bearer k"})  # fmt: skip
            assert r.status_code == 200, r.text
            job = wait_for(store, r.json()["data"]["id"], {State.PROCESSING, State.COMPLETED}, timeout=5)
            assert job.started_at - job.created_at < 0.5, job.started_at - job.created_at


def test_a_stop_ends_the_idle_wait_at_once(settings):
    settings = settings.model_copy(update={"poll_interval": 30.0})
    worker = Worker(settings, new_worker_id(), runner_factory=fakes.two_stage)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    wait_until(lambda: worker.info.state == WorkerState.READY.value, what="ready")
    time.sleep(0.1)
    started = time.monotonic()
    worker.stop("the test is over")
    thread.join(5)
    assert not thread.is_alive() and time.monotonic() - started < 2
    assert list(wake_dir(settings.data_dir).iterdir()) == []  # its socket removed


def test_jobs_handed_back_by_a_stop_are_taken_by_a_sibling_at_once(settings):
    settings = settings.model_copy(update={"poll_interval": 5.0})
    store = open_store(settings)
    STAGES.hold("finish:a")
    a = submit(store, "a")
    leaving = Worker(settings, new_worker_id(), runner_factory=fakes.two_stage)
    thread = threading.Thread(target=leaving.run, daemon=True)
    thread.start()
    STAGES.wait("finish:a:started")
    with pipelined_worker(settings) as sibling:
        wait_until(lambda: sibling.info.state == WorkerState.READY.value, what="ready")
        time.sleep(0.1)  # its first claim found nothing: the next poll is 5 s away
        stopped = time.time()
        leaving.stop("The worker was stopped (SIGTERM)")
        STAGES.release("finish:a")  # the leaving run finds its lease gone; the sibling's is not held
        job = wait_for(store, a, {State.PROCESSING, State.COMPLETED}, timeout=5)
        assert job.lease_owner in (sibling.id, None) and job.started_at - stopped < 0.5
        assert_completed(store, a)
    thread.join(10)


def _stale_socket(path: Path) -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(path))
    s.close()  # a worker killed with SIGKILL leaves its file behind like this


def test_stale_sockets_and_junk_in_the_wake_dir_never_break_a_submit(tmp_path):
    d = wake_dir(tmp_path)
    d.mkdir(parents=True)
    _stale_socket(d / "dead.sock")
    (d / "junk.sock").write_text("not a socket")
    (d / "dir.sock").mkdir()
    (d / "other.txt").write_text("ignored")
    live = Waker(tmp_path, "live")
    try:
        app = create_app(Settings(data_dir=tmp_path, workers=0, api_keys=["k"], min_free_bytes=0))
        with TestClient(app) as c:
            r = c.post("/api/v3/wavespeed-ai/wan-2.1-14b-vace", json={"prompt": "x"},
                       headers={"Authorization": "Bearer k"})  # fmt: skip
            assert r.status_code == 200, r.text
        assert live.wait(1.0)  # the live one was nudged
        assert sorted(p.name for p in d.iterdir()) == ["dir.sock", "junk.sock", "live.sock", "other.txt"]
        # A worker that never drains: its queue fills, the nudges go on without blocking.
        started = time.monotonic()
        assert all(nudge(tmp_path) == 1 for _ in range(500))
        assert time.monotonic() - started < 2
    finally:
        live.close()
    assert nudge(tmp_path) == 0 and nudge(tmp_path / "never-used") == 0


def test_a_data_dir_longer_than_a_socket_path_still_wakes(tmp_path):
    long_dir = tmp_path / ("d" * 120)
    assert len(str(wake_dir(long_dir) / "w.sock")) > 108
    waker = Waker(long_dir, "w")
    try:
        assert not waker.wait(0.01)
        assert nudge(long_dir) == 1 and waker.wait(1.0)
        assert not waker.drain()  # taken by the wait
        waker.poke()
        assert waker.wait(1.0)
    finally:
        waker.close()
    assert not (wake_dir(long_dir) / "w.sock").exists()
