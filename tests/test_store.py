import threading
import time

import pytest

from server.kernel.jobstate import State
from server.store import IdempotencyConflict, NewJob, QueueFull, RenewResult
from server.store.sqlite import SqliteJobStore


@pytest.fixture
def store(tmp_path):
    s = SqliteJobStore(tmp_path / "jobs.sqlite3")
    s.webhook_payload = lambda job: {"id": job.id, "status": job.status.value}
    return s


def new(i: str, **kw) -> NewJob:
    return NewJob(id=i, model="m", input={"prompt": i}, base_url="http://h", max_attempts=2, **kw)


def test_wal_mode(store):
    import sqlite3

    assert sqlite3.connect(store.path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_fifo_claim_and_complete(store):
    store.create(new("a"))
    time.sleep(0.01)
    store.create(new("b"))
    j = store.claim("w1", 30)
    assert j.id == "a" and j.status is State.PROCESSING and j.attempts == 1 and j.lease_owner == "w1"
    assert store.renew("a", "w1", 30, progress=0.5) == RenewResult.OK
    assert store.get("a").progress == 0.5
    assert store.complete("a", "w1", outputs=["k"], has_nsfw=[False], inference_ms=5, seed=3, extra={})
    a = store.get("a")
    assert a.status is State.COMPLETED and a.outputs == ["k"] and a.lease_owner is None and a.seed == 3
    assert store.claim("w1", 30).id == "b"
    assert store.claim("w1", 30) is None


def test_complete_requires_the_lease(store):
    store.create(new("a"))
    store.claim("w1", 30)
    assert not store.complete("a", "w2", outputs=[], has_nsfw=[], inference_ms=0, seed=None, extra={})
    assert store.renew("a", "w2", 30) == RenewResult.LOST
    assert store.get("a").status is State.PROCESSING


def test_concurrent_claims_never_share_a_job(store):
    for i in range(30):
        store.create(new(f"j{i:02d}"))
    got: list[str] = []
    lock = threading.Lock()

    def worker(wid):
        while (j := store.claim(wid, 30)) is not None:
            with lock:
                got.append(j.id)

    threads = [threading.Thread(target=worker, args=(f"w{k}",)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == [f"j{i:02d}" for i in range(30)]


def test_expired_lease_requeues_then_fails(store):
    store.create(new("a"))
    store.claim("w1", 0.01)
    time.sleep(0.02)
    assert store.expire_leases() == ["a"]
    a = store.get("a")
    assert a.status is State.CREATED and a.code == 0 and "queued again" in a.error
    store.claim("w2", 0.01)
    time.sleep(0.02)
    assert store.expire_leases() == ["a"]
    a = store.get("a")
    assert a.status is State.FAILED and a.code == 5000
    assert "attempt 2 of 2" in a.error


def test_release_worker(store):
    store.create(new("a"))
    store.claim("w1", 300)
    assert store.release_worker("w1", "The worker process exited unexpectedly") == ["a"]
    assert store.get("a").status is State.CREATED
    assert store.release_worker("w1", "again") == []


def test_cancel(store):
    store.create(new("a"))
    job, changed = store.cancel("a")
    assert changed and job.status is State.CANCELLED
    job, changed = store.cancel("a")
    assert not changed and job.status is State.CANCELLED
    store.create(new("b"))
    store.claim("w1", 30)
    assert store.cancel("b")[1]
    assert store.renew("b", "w1", 30) == RenewResult.CANCELLED
    assert not store.complete("b", "w1", outputs=[], has_nsfw=[], inference_ms=0, seed=None, extra={})
    assert store.cancel("missing") == (None, False)


def test_retryable_failure(store):
    store.create(new("a"))
    store.claim("w1", 30)
    assert store.fail("a", "w1", code=1402, error="media timed out", retryable=True, retry_delay=0.2) is State.CREATED
    assert store.claim("w1", 30) is None  # waits out the retry delay
    time.sleep(0.25)
    assert store.claim("w1", 30).attempts == 2
    assert store.fail("a", "w1", code=1402, error="media timed out", retryable=True) is State.FAILED
    assert store.get("a").code == 1402


def test_queue_cap(store):
    store.create(new("a"), max_queue=2)
    store.create(new("b"), max_queue=2)
    with pytest.raises(QueueFull):
        store.create(new("c"), max_queue=2)
    store.claim("w", 30)  # running jobs do not count against the queue
    store.create(new("c"), max_queue=2)


def test_idempotency(store):
    j1, c1 = store.create(new("a", idempotency_key="k", request_hash="h1"))
    j2, c2 = store.create(new("b", idempotency_key="k", request_hash="h1"))
    assert c1 and not c2 and j2.id == "a"
    with pytest.raises(IdempotencyConflict):
        store.create(new("c", idempotency_key="k", request_hash="h2"))


def test_terminal_events_fill_the_outbox_once(store):
    store.create(new("a", webhook_url="http://hook"))
    store.claim("w1", 30)
    store.fail("a", "w1", code=1401, error="bad")
    due = store.due_webhooks(time.time() + 1)
    assert [d.event_id for d in due] == ["a-failed"]
    assert store.due_webhooks(time.time() + 1) == []  # claimed by the first call
    store.webhook_attempted("a-failed", delivered=False, error="500", next_attempt_at=time.time())
    assert [d.attempts for d in store.due_webhooks(time.time() + 1)] == [1]
    store.webhook_attempted("a-failed", delivered=True, error="", next_attempt_at=None)
    assert store.due_webhooks(time.time() + 1000) == []


def test_history(store):
    for i in range(5):
        store.create(new(f"j{i}"))
        time.sleep(0.002)
    store.cancel("j0")
    jobs, total = store.history(page=1, page_size=2)
    assert total == 5 and [j.id for j in jobs] == ["j4", "j3"]
    jobs, total = store.history(page=1, page_size=10, status="cancelled")
    assert total == 1 and jobs[0].id == "j0"
