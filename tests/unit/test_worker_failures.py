"""The worker under failure, with fake runners named after what they simulate (tests/fakes.py)
and a real SQLite store: each test asserts the job's final state, code and message, and that the
worker goes on to complete the next job. In-process workers run in milliseconds; the SIGKILL
case spawns real worker processes under the real supervisor. (tests/test_recovery.py still
SIGKILLs the real server and the real tiny pipeline.)"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

import pytest

from server.kernel.errors import CODE_EXECUTION_FAILED, CODE_INTERNAL
from server.kernel.ids import new_worker_id
from server.kernel.jobstate import State, WorkerState
from server.schemas import validate_submit
from server.settings import Settings
from server.store import Job, JobStore, NewJob, open_store
from server.worker import EXIT_LOAD_FAILED, Worker
from tests import fakes


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(data_dir=tmp_path, model="tiny", workers=1, lease_seconds=5.0,
                    poll_interval=0.02, max_attempts=2, retry_delay=0.0,
                    shutdown_grace=0.0)  # a signal hands back at once (draining: test_shutdown.py)  # fmt: skip


def submit(store: JobStore, prompt: str, max_attempts: int = 2) -> str:
    inp, _ = validate_submit({"prompt": prompt, "seed": 7})
    job_id = new_worker_id() + new_worker_id()
    store.create(NewJob(id=job_id, model="m", input=inp, base_url="", max_attempts=max_attempts))
    return job_id


def wait_for(store: JobStore, job_id: str, states: set[State], timeout: float = 20) -> Job:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = store.get(job_id)
        if job is not None and job.status in states:
            return job
        time.sleep(0.01)
    raise AssertionError(f"job {job_id} never reached {states}: {store.get(job_id)}")


@contextmanager
def worker_thread(settings: Settings, factory):
    worker = Worker(settings, new_worker_id(), runner_factory=factory)
    exit_code: list[int] = []
    thread = threading.Thread(target=lambda: exit_code.append(worker.run()), daemon=True)
    thread.start()
    try:
        yield worker
    finally:
        worker._stop.set()
        fakes.RELEASE_HANG.set()
        thread.join(10)
        assert not thread.is_alive()


def assert_completed(store: JobStore, job_id: str) -> None:
    job = wait_for(store, job_id, {State.COMPLETED, State.FAILED, State.CANCELLED})
    assert job.status is State.COMPLETED, (job.code, job.error)
    assert job.code == 0 and job.error == "" and len(job.outputs) == 1 and job.progress == 1.0


def test_crash_in_setup_fails_the_worker_clearly_and_keeps_the_jobs_queued(settings):
    store = open_store(settings)
    job_id = submit(store, "ok")
    worker = Worker(settings, "w-setup", runner_factory=fakes.crash_in_setup)
    assert worker.run() == EXIT_LOAD_FAILED  # returns at once: restarting would fail again
    (row,) = store.workers()
    assert row.state == WorkerState.FAILED.value
    assert row.reason == "could not load model 'tiny': CUDA driver initialization failed (simulated)"
    job = store.get(job_id)
    assert job.status is State.CREATED and job.attempts == 0  # nothing was taken


def test_crash_in_setup_under_the_supervisor_is_not_restarted(settings):
    from server.worker.supervision import Supervisor

    store = open_store(settings)
    sup = Supervisor(settings, store, runner_factory=fakes.crash_in_setup)
    sup.start()
    try:
        deadline = time.monotonic() + 30
        while not sup.failed_reason and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sup.failed_reason.startswith("could not load model 'tiny': CUDA driver")
        assert all(slot.given_up for slot in sup.slots)
        assert len(store.workers()) == 1  # one start, no restart loop
    finally:
        sup.stop()


def test_oom_in_run_fails_the_job_and_the_worker_goes_on(settings):
    store = open_store(settings)
    boom, ok = submit(store, "boom"), submit(store, "ok")
    with worker_thread(settings, fakes.oom_in_run):
        job = wait_for(store, boom, {State.FAILED})
        assert job.code == CODE_EXECUTION_FAILED  # 1403
        assert job.error == "The GPU ran out of memory for this job."
        assert job.attempts == 1 and job.outputs == []  # not retried: it would fail again
        assert_completed(store, ok)


def test_a_step_that_hangs_is_cancelled_at_once_and_writes_nothing(settings):
    fakes.RELEASE_HANG.clear()
    store = open_store(settings)
    boom, ok = submit(store, "boom"), submit(store, "ok")
    with worker_thread(settings, fakes.hangs_in_step) as worker:
        running = wait_for(store, boom, {State.PROCESSING})
        while store.get(boom).progress < 0.1:
            time.sleep(0.01)
        job, changed = store.cancel(boom)
        assert changed and job.status is State.CANCELLED  # at once, while the step still hangs
        time.sleep(0.3)
        assert worker.current is not None and worker.current.id == running.id
        assert worker.info.state == WorkerState.BUSY.value
        fakes.RELEASE_HANG.set()  # the step returns; its progress call sees the cancel
        assert_completed(store, ok)
        job = store.get(boom)
        assert job.status is State.CANCELLED and job.outputs == []
        assert job.error == "Cancelled by request." and job.code == 0


def test_a_slow_job_keeps_its_lease_and_reports_progress(settings):
    settings = settings.model_copy(update={"lease_seconds": 1.0})
    store = open_store(settings)
    boom, ok = submit(store, "boom"), submit(store, "ok")
    seen: list[float] = []
    with worker_thread(settings, fakes.slow):
        wait_for(store, boom, {State.PROCESSING})
        while (job := store.get(boom)).status is State.PROCESSING:
            seen.append(job.progress)
            assert store.expire_leases() == []  # 3 s of work on a 1 s lease: renewed in time
            time.sleep(0.05)
        assert_completed(store, boom)
        assert store.get(boom).attempts == 1
        assert seen == sorted(seen) and max(seen) > 0.5  # progress only grows
        assert_completed(store, ok)


def test_killed_mid_run_is_retried_then_failed_and_the_worker_is_restarted(settings):
    from server.worker.supervision import Supervisor

    store = open_store(settings)
    boom, ok = submit(store, "boom"), submit(store, "ok")
    sup = Supervisor(settings, store, runner_factory=fakes.killed_mid_run)
    sup.start()
    try:
        job = wait_for(store, boom, {State.FAILED}, timeout=60)
        assert job.code == CODE_INTERNAL and job.attempts == 2
        assert job.error == (
            "The worker process exited unexpectedly (exit code -9) while running this job "
            "(attempt 2 of 2); it was not retried again."
        )
        assert_completed(store, ok)  # a restarted worker took the next job
        assert len({w.id for w in store.workers()}) == 3  # two deaths, two restarts
    finally:
        sup.stop()


def test_a_worker_stopped_mid_run_hands_the_job_back_uncounted(settings):
    store = open_store(settings)
    boom = submit(store, "boom")
    with worker_thread(settings, fakes.slow) as worker:
        wait_for(store, boom, {State.PROCESSING})
        while store.get(boom).progress < 0.15:
            time.sleep(0.01)
        worker.stop("The worker was stopped (server shutdown)")  # what SIGTERM / SIGINT do
        job = store.get(boom)
        assert job.status is State.CREATED and job.attempts == 0 and job.progress == 0.0
        assert job.error == "The worker was stopped (server shutdown); the job was queued again."
        assert job.code == 0 and job.lease_owner is None
        (row,) = store.workers()
        assert row.state == WorkerState.STOPPED.value
        time.sleep(0.6)  # the old run's next progress call finds the lease gone: it writes nothing
        job = store.get(boom)
        assert job.status is State.CREATED and job.attempts == 0 and job.progress == 0.0
    with worker_thread(settings, fakes.slow):
        assert_completed(store, boom)
        assert store.get(boom).attempts == 1  # the only claim that counted is the one that ran


def test_sigint_to_a_spawned_worker_hands_the_job_back_without_a_traceback(settings, capfd):
    """Ctrl-C reaches the workers with the server: the worker hands its job back uncounted and
    exits 0 quietly; the supervisor starts a successor, which completes the job."""
    import os
    import signal

    from server.worker.supervision import Supervisor

    store = open_store(settings)
    boom = submit(store, "boom")
    sup = Supervisor(settings, store, runner_factory=fakes.slow)
    sup.start()
    try:
        wait_for(store, boom, {State.PROCESSING}, timeout=60)
        while store.get(boom).progress < 0.15:
            time.sleep(0.01)
        (slot,) = sup.slots
        first = slot.proc
        os.kill(first.pid, signal.SIGINT)
        first.join(10)
        assert first.exitcode == 0
        job = store.get(boom)
        assert job.status is State.CREATED and job.attempts == 0 and job.progress == 0.0
        assert job.error == "The worker was stopped (server shutdown); the job was queued again."
        job = wait_for(store, boom, {State.COMPLETED, State.FAILED}, timeout=60)
        assert job.status is State.COMPLETED and job.attempts == 1
        assert slot.proc is not first  # restarted after the grace period
    finally:
        sup.stop()
    err = capfd.readouterr().err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err


def test_a_failure_that_breaks_the_runner_records_the_job_then_ends_the_worker(settings):
    # A multi-GPU group that lost a rank cannot run another job: the job goes back to the queue
    # (retryable) and the worker exits, so its supervisor restarts it with a new group.
    store = open_store(settings)
    job_id = submit(store, "boom")
    worker = Worker(settings, "w-group", runner_factory=fakes.breaks_its_group)
    with pytest.raises(RuntimeError, match="cannot run more jobs.*rank 1 of the GPU group died"):
        worker.run()
    job = store.get(job_id)
    assert job.status is State.CREATED and job.attempts == 1 and "rank 1" in job.error
