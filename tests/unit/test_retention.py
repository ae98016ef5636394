"""Retention (server/retention.py) on a real SQLite store and a real storage folder, each pass at
an explicit `now`: what is older than the settings goes, and nothing else."""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time

import pytest
from pydantic import ValidationError

from server.retention import Retention, cleanup, describe_age
from server.settings import Settings
from server.storage import LocalStorage
from server.store import NewJob, StoreUnavailable
from server.store.sqlite import SqliteJobStore

DAY = 86400.0
BASE = "http://vace.test"


@pytest.fixture
def env(tmp_path):
    store = SqliteJobStore(tmp_path / "jobs.sqlite3")
    storage = LocalStorage(tmp_path / "media")
    return store, storage


def settings(tmp_path, **kw) -> Settings:
    return Settings(data_dir=tmp_path, **kw)


def put(storage, prefix: str, name: str = "f.bin", age: float | None = None, now: float | None = None) -> str:
    key = storage.put_bytes(storage.new_key(prefix, name), b"x" * 100)
    if age is not None:
        t = (now or time.time()) - age
        os.utime(storage.local_path(key), (t, t))
    return key


def submit(store, storage, jid: str, *, inp: dict | None = None, webhook: str | None = None) -> dict:
    """A job as the API creates it: an inline input stored under inputs/<id>."""
    inline = put(storage, f"inputs/{jid}", "image.png")
    store.create(
        NewJob(
            id=jid,
            model="m",
            input={"prompt": "p", "images": [storage.url(BASE, inline)], **(inp or {})},
            base_url=BASE,
            max_attempts=1,
            webhook_url=webhook,
        )
    )
    return {"inline": inline}


def finish(store, storage, jid: str, how: str = "complete", **kw) -> dict[str, str]:
    """Submit, claim and end a job the way a worker does, with an output and a conditioning file."""
    keys = submit(store, storage, jid, **kw)
    if how == "cancel_queued":
        store.cancel(jid)
        return keys
    claimed = store.claim("w1", 30)
    assert claimed is not None and claimed.id == jid
    keys["output"] = put(storage, f"outputs/{jid}", "output.mp4")
    keys["cond"] = put(storage, f"conditioning/{jid}", "conditioning_video.mp4")
    if how == "complete":
        assert store.complete(
            jid, "w1", outputs=[keys["output"]], has_nsfw=[False], inference_ms=1, seed=1,
            extra={"conditioning": {"video": keys["cond"]}},
        )  # fmt: skip
    elif how == "fail":
        store.fail(jid, "w1", code=1403, error="boom")
    else:
        store.cancel(jid)
    return keys


def test_a_jobs_files_go_one_second_past_the_cutoff_and_stay_one_second_before(env, tmp_path):
    store, storage = env
    s = settings(tmp_path)
    keys = {
        how: finish(store, storage, f"job-{how}", how)
        for how in ("complete", "fail", "cancel", "cancel_queued")
    }
    last = max(store.get(f"job-{how}").finished_at for how in keys)
    first = min(store.get(f"job-{how}").finished_at for how in keys)

    rep = cleanup(s, store, storage, first + s.retention_seconds - 1)
    assert rep.expired_jobs == 0 and rep.deleted_files == 0
    assert all(storage.exists(k) for ks in keys.values() for k in ks.values())
    assert all(store.get(f"job-{how}").outputs_expired_at is None for how in keys)

    now = last + s.retention_seconds + 1
    rep = cleanup(s, store, storage, now)
    # Output, inline input and conditioning file of each of the four finished jobs, together.
    assert rep.expired_jobs == 4 and rep.deleted_files == sum(len(ks) for ks in keys.values()) == 10
    assert not any(storage.exists(k) for ks in keys.values() for k in ks.values())
    assert all(store.get(f"job-{how}").outputs_expired_at == now for how in keys)
    assert store.get("job-complete").status.value == "completed"  # the row stays
    assert (rep.bytes, rep.files) == (0, 0) and storage.usage() == (0, 0)
    # Nothing more to do: marked jobs are not selected again.
    again = cleanup(s, store, storage, now + DAY)
    assert (again.expired_jobs, again.deleted_files) == (0, 0)


def test_only_the_jobs_past_the_cutoff_lose_their_files(env, tmp_path):
    store, storage = env
    s = settings(tmp_path, retention_seconds=3600)
    old = finish(store, storage, "old")
    time.sleep(0.01)  # finished_at of the two differ
    young = finish(store, storage, "young")
    cut = store.get("old").finished_at + 3600 + 0.001  # the old job just past, the young not
    assert store.get("young").finished_at + 3600 > cut
    cleanup(s, store, storage, cut)
    assert not any(storage.exists(k) for k in old.values())
    assert all(storage.exists(k) for k in young.values())
    assert store.get("young").outputs_expired_at is None


def test_queued_and_running_jobs_keep_their_inputs_whatever_their_age(env, tmp_path):
    store, storage = env
    s = settings(tmp_path, retention_seconds=60)
    now = time.time() + 100 * DAY
    upload_r = put(storage, "uploads", "ref.png", age=50 * DAY, now=now)
    upload_q = put(storage, "uploads", "ref.png", age=50 * DAY, now=now)
    running = submit(store, storage, "running", inp={"mask_image": storage.url(BASE, upload_r)})
    assert store.claim("w1", 30).id == "running"
    # Named through another host than the job's base URL (a client behind another name): kept.
    queued = submit(store, storage, "queued", inp={"video": "http://other.host" + storage.url("", upload_q)})
    for key in (queued["inline"], running["inline"]):
        t = now - 50 * DAY
        os.utime(storage.local_path(key), (t, t))

    rep = cleanup(s, store, storage, now)
    assert rep.deleted_files == 0 and rep.files == 4
    assert all(storage.exists(k) for k in (running["inline"], queued["inline"], upload_r, upload_q))
    assert store.get("running").outputs_expired_at is None and store.get("queued").outputs_expired_at is None
    # Once they end, their inline inputs go with them and the uploads by age.
    store.cancel("running")
    store.cancel("queued")
    cleanup(s, store, storage, now)
    assert not any(storage.exists(k) for k in (running["inline"], queued["inline"], upload_r, upload_q))


def test_uploads_go_by_their_own_age(env, tmp_path):
    store, storage = env
    s = settings(tmp_path, retention_seconds=DAY)
    now = time.time() + 10 * DAY
    gone = put(storage, "uploads", "a.png", age=DAY + 1, now=now)
    kept = put(storage, "uploads", "b.png", age=DAY - 1, now=now)
    rep = cleanup(s, store, storage, now)
    assert not storage.exists(gone) and storage.exists(kept)
    assert rep.deleted_files == 1 and rep.deleted_bytes == 100 and (rep.bytes, rep.files) == (100, 1)
    # A finished job naming an upload does not keep it: uploads are the client's, by age.
    finish(store, storage, "j", inp={"video": storage.url(BASE, kept)})
    cleanup(s, store, storage, now + 2)
    assert not storage.exists(kept)


def test_files_of_no_job_go_by_age_those_of_unexpired_rows_stay(env, tmp_path):
    store, storage = env
    s = settings(tmp_path, retention_seconds=DAY)
    now = time.time() + 10 * DAY
    # Inline inputs of a submit the queue refused (no row), old and new; a worker's leftover
    # output of a job still waiting for step 1 (its row not expired yet) stays.
    orphan_old = put(storage, "inputs/refused1", "image.png", age=DAY + 1, now=now)
    orphan_new = put(storage, "inputs/refused2", "image.png", age=DAY - 1, now=now)
    other = put(storage, "thumbnails", "x.png", age=30 * DAY, now=now)  # not ours to judge
    cleanup(s, store, storage, now)
    assert not storage.exists(orphan_old) and storage.exists(orphan_new) and storage.exists(other)


def _outbox(tmp_path) -> list[tuple]:
    with sqlite3.connect(tmp_path / "jobs.sqlite3") as c:
        return c.execute(
            "SELECT job_id, delivered_at IS NOT NULL FROM webhook_outbox ORDER BY job_id"
        ).fetchall()


def test_rows_are_pruned_only_by_the_second_setting_with_their_outbox_rows(env, tmp_path):
    store, storage = env
    for jid in ("a", "b", "pending"):
        finish(store, storage, jid, webhook="http://hook.test/")
        time.sleep(0.01)
    for d in store.due_webhooks(time.time() + 1, limit=10):
        if d.job_id != "pending":
            store.webhook_attempted(d.event_id, claim=d.claim, delivered=True, error="", next_attempt_at=None)
    a, b = store.get("a").finished_at, store.get("b").finished_at
    far = time.time() + 1000 * DAY

    cleanup(settings(tmp_path), store, storage, far)  # job_retention_seconds 0: rows kept
    assert all(store.get(j) is not None for j in ("a", "b", "pending")) and len(_outbox(tmp_path)) == 3

    s = settings(tmp_path, job_retention_seconds=30 * DAY)
    rep = cleanup(s, store, storage, a + 30 * DAY + 0.005)  # a just past the cutoff, b not
    assert rep.pruned_jobs == 1 and store.get("a") is None and store.get("b") is not None
    assert [j for j, _ in _outbox(tmp_path)] == ["b", "pending"]
    assert b + 30 * DAY > a + 30 * DAY + 0.005

    rep = cleanup(s, store, storage, far)
    # A webhook still to deliver keeps its job: the event must not be lost.
    assert rep.pruned_jobs == 1 and store.get("b") is None and store.get("pending") is not None
    assert _outbox(tmp_path) == [("pending", 0)]


def test_pruning_a_row_takes_any_file_left_with_it(env, tmp_path):
    store, storage = env
    keys = finish(store, storage, "j")
    s = settings(tmp_path, retention_seconds=DAY, job_retention_seconds=DAY)
    end = store.get("j").finished_at
    # Same age for both: step 1 deletes the files, step 2 the row; nothing is left either way.
    rep = cleanup(s, store, storage, end + DAY + 1)
    assert rep.expired_jobs == 1 and rep.pruned_jobs == 1 and store.get("j") is None
    assert not any(storage.exists(k) for k in keys.values())


def test_rows_must_outlive_files():
    with pytest.raises(ValidationError, match="JOB_RETENTION_SECONDS .* must be at least"):
        Settings(retention_seconds=DAY, job_retention_seconds=DAY - 1)
    with pytest.raises(ValidationError, match="must be at least"):
        Settings(retention_seconds=0, job_retention_seconds=DAY)
    assert Settings(retention_seconds=0).job_retention_seconds == 0


def test_keep_forever_measures_and_deletes_nothing(env, tmp_path):
    store, storage = env
    keys = finish(store, storage, "j")
    old = put(storage, "uploads", "a.png", age=400 * DAY)
    rep = cleanup(settings(tmp_path, retention_seconds=0), store, storage, time.time() + 1000 * DAY)
    assert rep.deleted_files == 0 and storage.exists(old) and all(storage.exists(k) for k in keys.values())
    assert (rep.bytes, rep.files) == (400, 4)


def test_expiry_and_pruning_read_by_index(env):
    store, _ = env
    conn = store._conn()  # this thread's: the calls below run on it
    sql: list[str] = []
    conn.set_trace_callback(sql.append)
    store.expirable(1.0, 5)
    store.prunable(1.0, 5)
    conn.set_trace_callback(None)
    selects = [q for q in sql if q.startswith("SELECT * FROM jobs")]
    plans = [" | ".join(r[3] for r in conn.execute("EXPLAIN QUERY PLAN " + q)) for q in selects]
    assert len(plans) == 2
    assert "USING INDEX jobs_expiry (outputs_expired_at=? AND finished_at<?)" in plans[0]
    assert "USING INDEX jobs_finished (finished_at<?)" in plans[1] and "outbox_job" in plans[1]
    assert not any("TEMP B-TREE" in p for p in plans)  # no sort of the whole history


def test_lock_one_holder_at_a_time_until_it_runs_out(env):
    store, _ = env
    assert store.acquire_lock("retention", "a", 10, now=1000)
    assert not store.acquire_lock("retention", "b", 10, now=1005)
    assert store.acquire_lock("retention", "a", 10, now=1005)  # renewed: until 1015
    assert not store.acquire_lock("retention", "b", 10, now=1014)
    assert store.acquire_lock("retention", "b", 10, now=1015)  # ran out: taken over
    store.release_lock("retention", "a")  # not a's any more: nothing happens
    assert not store.acquire_lock("retention", "a", 10, now=1016)
    store.release_lock("retention", "b")
    assert store.acquire_lock("retention", "a", 10, now=1016)


def test_only_the_lock_holder_cleans(env, tmp_path):
    store, storage = env
    s = settings(tmp_path, retention_seconds=DAY)
    one, two = Retention(s, store, storage), Retention(s, store, storage)
    old = put(storage, "uploads", "a.png", age=2 * DAY)
    assert two.run_once() is not None and not storage.exists(old)  # the first to ask holds it
    old = put(storage, "uploads", "b.png", age=2 * DAY)
    assert one.run_once() is None and storage.exists(old)
    assert one.report()["note"].startswith("another API process")
    two.stop()  # gives the lock up: the other takes over at once
    assert one.run_once() is not None and not storage.exists(old) and one.report()["files"] == 0


def test_the_loop_rides_out_a_store_fault_logging_it_once(env, tmp_path, caplog):
    store, storage = env
    s = settings(tmp_path, retention_seconds=DAY, retention_interval=0.02)
    calls, fail_for = [], 3
    real = store.expirable

    def flaky(*a, **kw):
        calls.append(1)
        if len(calls) <= fail_for:
            raise StoreUnavailable("the job store's disk is full (test)")
        return real(*a, **kw)

    store.expirable = flaky
    old = put(storage, "uploads", "a.png", age=2 * DAY)
    r = Retention(s, store, storage)
    caplog.set_level(logging.INFO, "wan_vace.retention")
    r.start()
    try:
        deadline = time.monotonic() + 10
        while (r.last is None or r.outage.active) and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        r.stop()
    assert r.last is not None and not storage.exists(old) and len(calls) > fail_for
    errors = [m for m in caplog.messages if "unavailable" in m]
    assert len(errors) == 1 and any("answer again" in m for m in caplog.messages)
    assert not any(t.name == "retention" and t.is_alive() for t in threading.enumerate())


def test_ages_are_said_plainly():
    assert describe_age(7 * DAY) == "7 days" and describe_age(DAY) == "1 day"
    assert describe_age(36 * 3600) == "36 hours" and describe_age(90) == "90 seconds"
    assert describe_age(120) == "2 minutes" and describe_age(1.5) == "1.5 seconds"


def test_a_pass_stops_between_batches_when_asked_and_the_next_finishes(env, tmp_path, monkeypatch):
    from server import retention

    store, storage = env
    monkeypatch.setattr(retention, "BATCH", 2)
    s = settings(tmp_path, retention_seconds=DAY)
    for i in range(5):
        finish(store, storage, f"j{i}")
    now = time.time() + 2 * DAY
    cut = cleanup(s, store, storage, now, go_on=lambda: False)
    assert (cut.expired_jobs, cut.complete) == (2, False)
    assert [store.get(f"j{i}").outputs_expired_at is not None for i in range(5)] == [
        True,
        True,
        False,
        False,
        False,
    ]
    rest = cleanup(s, store, storage, now)
    assert (rest.expired_jobs, rest.complete, rest.files) == (3, True, 0)
