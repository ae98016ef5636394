"""A full disk, injected: the store's writes fail with SQLite's "database or disk is full" (or
storage's with ENOSPC) for a while, then work again (tests/fakes.py). Nothing may die of it:
the worker and the supervisor retry with backoff and log each outage once, the API answers 507
in the error envelope while reads go on, and processing resumes by itself when the fault clears.
The real thing, a filled tmpfs under the real server, is tests/e2e/test_full_disk.py."""

from __future__ import annotations

import errno
import logging
import os
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.kernel.errors import CODE_EXECUTION_FAILED, CODE_UNAVAILABLE
from server.kernel.jobstate import State
from server.settings import Settings
from server.storage import LocalStorage
from server.store import StoreUnavailable, WorkerInfo, open_store
from server.store.sqlite import SqliteJobStore
from server.worker.loop import EXIT_STORE_UNAVAILABLE
from server.worker.retry import Backoff
from tests import fakes
from tests.unit.test_worker_failures import assert_completed, submit, wait_for, worker_thread

KEY = "k-123"
URL = "/api/v3/wavespeed-ai/wan-2.1-14b-vace"
PNG = (
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8Dw"
    "HwAFBQIAX8jx0gAAAABJRU5ErkJggg=="
)


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(data_dir=tmp_path, model="tiny", workers=1, lease_seconds=5.0,
                    poll_interval=0.02, max_attempts=2, retry_delay=0.0)  # fmt: skip


def outage_logs(caplog, logger: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == logger and "unavailable" in r.getMessage()]


def part_files(root: Path) -> list[Path]:
    """Temporary files of storage writes under `root`."""
    return list(root.rglob(".*.part"))


def work_dirs(worker_id: str) -> list[Path]:
    return [p for p in Path(tempfile.gettempdir()).glob(f"wan-vace-{worker_id}-*") if p.is_dir()]


# The store ----------------------------------------------------------------------------------------
def test_writes_on_a_full_disk_raise_store_unavailable_while_reads_go_on(tmp_path, monkeypatch):
    store = SqliteJobStore(tmp_path / "jobs.sqlite3")
    full = fakes.fill_the_store(monkeypatch, new_connections_fail=True)
    job_id = submit(store, "queued before")
    assert store.write_error is None
    full.set()
    with pytest.raises(StoreUnavailable, match=r"the job store's disk is full \(database or disk is full\)"):
        submit(store, "refused")
    assert store.write_error is not None
    # This thread's connection was open before the fault: reads go on.
    assert store.get(job_id).status is State.CREATED and store.count_by_status() == {"created": 1}
    # A thread that never opened one cannot (SQLite would have to create its -wal/-shm files).
    seen: list[BaseException] = []
    t = threading.Thread(target=lambda: seen.append(_catch(lambda: store.get(job_id))))
    t.start()
    t.join()
    assert isinstance(seen[0], StoreUnavailable)
    full.clear()
    submit(store, "accepted again")
    assert store.write_error is None  # a write committed: the disk takes writes again
    assert store.count_by_status() == {"created": 2}


def _catch(fn):
    try:
        fn()
    except BaseException as e:  # noqa: BLE001 - handed to the test
        return e
    return None


def test_one_connection_per_thread_reused_and_replaced_when_broken(tmp_path):
    store = SqliteJobStore(tmp_path / "jobs.sqlite3")
    conn = store._conn()
    submit(store, "a")
    assert store._conn() is conn  # kept between calls
    conn.close()  # broken (closed under the store's feet)
    assert store.count_by_status() == {"created": 1}  # a new connection took its place
    assert store._conn() is not conn
    # Another thread has its own.
    other: list[object] = []
    t = threading.Thread(target=lambda: other.append(store._conn()))
    t.start()
    t.join()
    assert other[0] is not store._conn()


# Storage ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["copy", "rename"])
def test_a_put_on_a_full_disk_leaves_no_temporary_file_or_folder(tmp_path, monkeypatch, where):
    storage = LocalStorage(tmp_path / "media")
    src = tmp_path / "output.mp4"
    src.write_bytes(os.urandom(1 << 16))
    if where == "copy":
        fakes.fill_the_storage(monkeypatch).set()
    else:
        real = os.replace

        def replace(a, b, **kw):
            if str(a).endswith(".part"):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real(a, b, **kw)

        monkeypatch.setattr(os, "replace", replace)
    key = storage.new_key("outputs/job1", "output.mp4")
    with pytest.raises(OSError) as e:
        storage.put_file(key, src)
    assert e.value.errno == errno.ENOSPC
    with pytest.raises(OSError):
        storage.put_bytes(storage.new_key("uploads", "x.bin"), src.read_bytes())
    assert list((tmp_path / "media").rglob("*")) == []  # no .part file, no empty key folders
    assert storage.write_error is not None and storage.write_error.errno == errno.ENOSPC
    monkeypatch.undo()
    assert storage.put_file(key, src) == key and storage.write_error is None


# The worker ---------------------------------------------------------------------------------------
def test_the_worker_survives_a_full_disk_at_claim_and_runs_the_job_once_it_clears(
    settings, monkeypatch, caplog
):
    store = open_store(settings)
    job_id = submit(store, "ok")
    full = fakes.fill_the_store(monkeypatch)
    full.set()
    caplog.set_level(logging.INFO)
    with worker_thread(settings, fakes.succeeds) as worker:
        time.sleep(2.0)  # claims fail, with backoff
        assert store.get(job_id).status is State.CREATED
        full.clear()
        assert_completed(store, job_id)
        assert store.get(job_id).attempts == 1
        assert worker.info.state in ("ready", "busy")
    # (Other tests' workers may still beat in this process: count this one's.)
    starts = [r for r in outage_logs(caplog, "wan_vace.worker") if worker.id in r.getMessage()]
    assert len(starts) == 1, [r.getMessage() for r in starts]  # once per outage, not per retry
    assert "database or disk is full" in starts[0].getMessage()
    assert any("answer again" in r.getMessage() for r in caplog.records)


def test_an_outcome_that_cannot_be_recorded_waits_with_its_lease_renewed(settings, monkeypatch):
    settings = settings.model_copy(update={"lease_seconds": 1.0})
    store = open_store(settings)
    boom, ok = submit(store, "boom"), submit(store, "ok")
    full = fakes.fill_the_store(monkeypatch)
    with worker_thread(settings, fakes.fills_the_disk) as worker:
        assert full.wait(10)  # rendered; now `complete` fails
        time.sleep(2.5)  # longer than the lease
        job = store.get(boom)
        assert job.status is State.PROCESSING and job.outputs == []
        with pytest.raises(StoreUnavailable):
            store.expire_leases()  # what the supervisor meets meanwhile
        full.clear()
        assert_completed(store, boom)
        assert store.get(boom).attempts == 1  # recorded, not run again
        assert_completed(store, ok)
    assert part_files(settings.storage_dir) == [] and work_dirs(worker.id) == []


def test_a_failure_that_cannot_be_recorded_is_recorded_once_the_store_answers(settings, monkeypatch):
    store = open_store(settings)
    boom, ok = submit(store, "boom"), submit(store, "ok")
    full = fakes.fill_the_store(monkeypatch)
    with worker_thread(settings, fakes.fills_the_disk_then_oom):
        assert full.wait(10)
        time.sleep(1.0)
        assert store.get(boom).status is State.PROCESSING
        full.clear()
        job = wait_for(store, boom, {State.FAILED})
        assert job.code == CODE_EXECUTION_FAILED and job.error == "The GPU ran out of memory for this job."
        assert_completed(store, ok)


def test_an_output_the_disk_refuses_is_stored_once_there_is_room(settings, monkeypatch):
    store = open_store(settings)
    boom, ok = submit(store, "boom"), submit(store, "ok")
    full = fakes.fill_the_storage(monkeypatch)
    with worker_thread(settings, fakes.fills_the_storage) as worker:
        assert full.wait(10)
        time.sleep(1.5)  # puts fail, with backoff
        assert store.get(boom).status is State.PROCESSING
        assert part_files(settings.storage_dir) == []  # each failed put removed its own
        assert len(work_dirs(worker.id)) == 1  # the render waits in its work dir
        full.clear()
        assert_completed(store, boom)
        assert_completed(store, ok)
    assert part_files(settings.storage_dir) == [] and work_dirs(worker.id) == []


# The supervisor -----------------------------------------------------------------------------------
def _failing(store, name: str, fault: threading.Event) -> None:
    real = getattr(store, name)

    def call(*a, **kw):
        if fault.is_set():
            raise StoreUnavailable("the job store's disk is full (database or disk is full)")
        return real(*a, **kw)

    setattr(store, name, call)


def test_the_supervisor_survives_release_errors_and_still_restarts_the_dead_worker(settings, caplog):
    from server.worker.supervision import Supervisor

    store = open_store(settings)
    boom, ok = submit(store, "boom"), submit(store, "ok")
    fault = threading.Event()
    _failing(store, "release_worker", fault)
    fault.set()
    sup = Supervisor(settings, store, runner_factory=fakes.killed_mid_run)
    caplog.set_level(logging.INFO)
    sup.start()
    try:
        (slot,) = sup.slots
        first = slot.proc
        first.join(60)  # killed itself mid-run
        time.sleep(2.0)  # the hand-back fails, with backoff
        assert sup._thread.is_alive()
        assert store.get(boom).status is State.PROCESSING and slot.proc is first
        fault.clear()
        job = wait_for(store, boom, {State.FAILED}, timeout=60)  # handed back, retried, failed
        assert job.attempts == 2
        assert_completed(store, ok)  # a restarted worker took the next job
        assert slot.fast_deaths == 1  # the death during the outage was not counted
    finally:
        sup.stop()
    assert len(outage_logs(caplog, "wan_vace.supervisor")) == 1


def test_the_supervisor_survives_expiry_errors_and_expires_leases_afterwards(settings, caplog):
    from server.worker.supervision import Supervisor

    settings = settings.model_copy(update={"workers": 0, "lease_seconds": 1.0})
    store = open_store(settings)
    job_id = submit(store, "held by a worker that died elsewhere")
    assert store.claim("ghost", 0.1).id == job_id
    fault = threading.Event()
    _failing(store, "expire_leases", fault)
    _failing(store, "extend_leases", fault)
    fault.set()
    sup = Supervisor(settings, store)
    caplog.set_level(logging.INFO)
    sup.start()
    try:
        time.sleep(2.5)
        assert sup._thread.is_alive()
        assert store.get(job_id).status is State.PROCESSING
        fault.clear()
        job = wait_for(store, job_id, {State.CREATED}, timeout=10)
        assert job.attempts == 1 and job.error.startswith("The worker stopped renewing its lease")
    finally:
        sup.stop()
    assert len(outage_logs(caplog, "wan_vace.supervisor")) == 1


def test_after_an_outage_every_running_job_gets_a_fresh_lease_before_any_expires(settings):
    """No worker could renew during the outage: expiring at once would take a live worker's job."""
    from server.worker.supervision import Supervisor

    settings = settings.model_copy(update={"workers": 0, "lease_seconds": 3.0})
    store = open_store(settings)
    job_id = submit(store, "running")
    store.claim("live-worker", 0.1)
    time.sleep(0.2)  # its lease ran out while the store was down
    sup = Supervisor(settings, store)
    sup._forgive = True  # what a failed store call leaves
    sup._tick()
    job = store.get(job_id)
    assert job.status is State.PROCESSING and job.lease_expires > time.time() + 2
    sup._last_expire = 0.0
    sup._tick()  # expiry as usual afterwards: nothing has run out
    assert store.get(job_id).status is State.PROCESSING


def test_store_outages_do_not_count_towards_the_crash_loop_limit(settings):
    from server.worker.supervision import _MAX_FAST_DEATHS, Supervisor

    store = open_store(settings)
    sup = Supervisor(settings, store)
    (slot,) = sup.slots
    slot.store_backoff = Backoff(first=0.01, cap=0.02)
    for i in range(_MAX_FAST_DEATHS + 2):  # a worker that could not open the store, again and again
        slot.worker_id, slot.started, slot.released = f"w{i}", time.monotonic(), None
        slot.proc = SimpleNamespace(exitcode=EXIT_STORE_UNAVAILABLE)
        sup._on_death(slot)
        assert slot.restart_at is not None and not slot.given_up
        slot.restart_at = None
    assert slot.fast_deaths == 0
    # A crash right after starting while the store was failing: not counted either...
    slot.worker_id, slot.started, slot.released = "w-crash", time.monotonic(), None
    sup.outage.failed(StoreUnavailable("the job store's disk is full"))
    slot.proc = SimpleNamespace(exitcode=-9)
    sup._on_death(slot)
    assert slot.fast_deaths == 0
    # ...one with the store fine is.
    sup.outage.ok()
    time.sleep(0.01)
    slot.worker_id, slot.started, slot.released = "w-crash2", time.monotonic(), None
    sup._on_death(slot)
    assert slot.fast_deaths == 1


def test_a_worker_that_cannot_open_the_store_is_restarted_not_given_up(settings):
    from server.worker.supervision import Supervisor

    store = open_store(settings)
    sup = Supervisor(settings, store, runner_factory=fakes.store_unavailable_at_start)
    (slot,) = sup.slots
    slot.store_backoff = Backoff(first=0.05, cap=0.1)
    sup.start()
    try:
        deadline = time.monotonic() + 60
        while len(store.workers()) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(store.workers()) >= 3 and not slot.given_up and slot.fast_deaths == 0
        assert not sup.failed_reason
    finally:
        sup.stop()


# Queued jobs no worker can run -------------------------------------------------------------------
def test_jobs_queued_when_every_worker_failed_to_load_fail_after_the_grace(settings):
    from server.worker.supervision import Supervisor

    settings = settings.model_copy(update={"unservable_grace": 0.5})
    store = open_store(settings)
    before = [submit(store, f"queued before {i}") for i in range(3)]
    # A live worker elsewhere could still run them: they wait.
    store.upsert_worker(WorkerInfo(id="remote", host="gpu-7", pid=1, model="m", state="ready",
                                   heartbeat_at=time.time(), started_at=time.time()))  # fmt: skip
    sup = Supervisor(settings, store, runner_factory=fakes.crash_in_setup)
    sup.start()
    try:
        deadline = time.monotonic() + 60
        while not sup.failed_reason and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sup.failed_reason
        time.sleep(1.5)
        assert all(store.get(j).status is State.CREATED for j in before)
        # The remote worker stops: nobody can run them.
        store.upsert_worker(WorkerInfo(id="remote", host="gpu-7", pid=1, model="m", state="stopped",
                                       heartbeat_at=time.time(), started_at=time.time()))  # fmt: skip
        expected = (
            "No worker can run jobs on this server: could not load model 'tiny': "
            "CUDA driver initialization failed (simulated)"
        )
        for j in before:
            job = wait_for(store, j, {State.FAILED}, timeout=10)
            assert job.code == CODE_UNAVAILABLE and job.error == expected
        later = submit(store, "slipped in after the check")  # as if submitted in a race
        job = wait_for(store, later, {State.FAILED}, timeout=10)
        assert job.code == CODE_UNAVAILABLE and job.error == expected
    finally:
        sup.stop()


# The API ------------------------------------------------------------------------------------------
@pytest.fixture
def client(tmp_path):
    app = create_app(Settings(data_dir=tmp_path, workers=0, api_keys=[KEY], min_free_bytes=0))
    with TestClient(app) as c:
        c.headers["Authorization"] = f"Bearer {KEY}"
        yield c, app.state.wan


def assert_507(r, *fragments: str) -> None:
    assert r.status_code == 507, r.text
    body = r.json()
    assert body["code"] == 507 and body["data"] is None and body["error"] == body["message"]
    assert body["message"].startswith("Insufficient storage on the server: ")
    assert body["message"].endswith("Nothing was stored; retry once space is freed.")
    for f in fragments:
        assert f in body["message"], body["message"]
    assert r.headers["retry-after"] == "30"


def test_the_api_answers_507_on_a_full_store_while_polls_and_health_answer(client, monkeypatch):
    c, st = client
    full = fakes.fill_the_store(monkeypatch, new_connections_fail=True)
    r = c.post(URL, json={"prompt": "before"})
    assert r.status_code == 200
    job_id = r.json()["data"]["id"]
    assert c.get(f"/api/v3/predictions/{job_id}/result").status_code == 200
    assert c.get("/health").json()["disk"]["ok"] is True
    full.set()
    assert_507(
        c.post(URL, json={"prompt": "during"}), "the job store's disk is full (database or disk is full)"
    )
    poll = c.get(f"/api/v3/predictions/{job_id}/result")
    assert poll.status_code == 200 and poll.json()["data"]["status"] == "created"
    health = c.get("/health")
    assert health.status_code == 200
    disk = health.json()["disk"]
    assert disk["ok"] is False and isinstance(disk["free_bytes"], int)
    assert "a write failed for want of disk space (the job store: " in disk["reason"]
    assert c.get("/health/ready").status_code == 503
    full.clear()
    assert c.post(URL, json={"prompt": "after"}).status_code == 200
    after = c.get("/health").json()["disk"]
    assert after["ok"] is True and after["reason"] == ""  # a write went through
    assert st.store.count_by_status() == {"created": 2}


def test_uploads_and_inline_media_on_a_full_storage_disk_answer_507(client, monkeypatch):
    c, st = client
    real = os.replace

    def replace(a, b, **kw):
        if str(a).endswith(".part"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(a, b, **kw)

    monkeypatch.setattr(os, "replace", replace)
    files = {"file": ("ref.png", fakes_png(), "image/png")}
    assert_507(c.post("/api/v3/media/upload/binary", files=files), "No space left on device")
    assert_507(c.post(URL, json={"prompt": "a cat", "image": PNG}), "No space left on device")
    assert list(st.settings.storage_dir.rglob("*")) == []
    assert st.store.count_by_status() == {}
    assert "storage: " in c.get("/health").json()["disk"]["reason"]
    monkeypatch.undo()
    assert c.post("/api/v3/media/upload/binary", files=files).status_code == 200


def fakes_png() -> bytes:
    import base64

    return base64.b64decode(PNG.split(",", 1)[1])


def test_below_the_free_space_floor_uploads_and_jobs_are_refused(tmp_path):
    app = create_app(Settings(data_dir=tmp_path, workers=0, api_keys=[KEY], min_free_bytes=1 << 60))
    with TestClient(app) as c:
        c.headers["Authorization"] = f"Bearer {KEY}"
        r = c.post(URL, json={"prompt": "a cat"})
        assert_507(r, "free, below the 1073741824.0 GiB it keeps free (WAN_VACE_MIN_FREE_BYTES)")
        assert_507(c.post("/api/v3/media/upload/binary", files={"file": ("r.png", fakes_png(), "image/png")}))
        assert_507(c.post("/api/v3/media/uploads", json={"filename": "r.png", "content_type": "image/png"}))
        assert app.state.wan.store.count_by_status() == {}
        health = c.get("/health")
        assert health.status_code == 200
        disk = health.json()["disk"]
        assert disk["ok"] is False and disk["min_free_bytes"] == 1 << 60
        assert "new jobs and uploads are refused" in disk["reason"]
        assert c.get("/health/ready").status_code == 503


def test_the_default_floor_is_1_gib_or_5_percent_of_a_smaller_disk(tmp_path):
    from server.diskspace import GIB, floor_bytes

    s = Settings(data_dir=tmp_path)
    assert s.min_free_bytes is None
    assert floor_bytes(s, 100 * GIB) == GIB
    assert floor_bytes(s, 10 * GIB) == GIB // 2
    assert floor_bytes(s, 20 << 20) == 1 << 20  # a 20 MB tmpfs keeps 1 MB
    assert floor_bytes(Settings(data_dir=tmp_path, min_free_bytes=0), 100 * GIB) == 0
