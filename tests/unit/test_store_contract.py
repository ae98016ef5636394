"""The JobStore contract: what every backend must do, run against each of them.

`store` is parametrized by BACKENDS, a name and a factory of an empty store: SQLite in a scratch
directory, PostgreSQL in a scratch schema of the machine's server. Backend-specific checks (SQLite's WAL mode, its migrations) live in
tests/test_store.py and tests/test_store_migrations.py.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from server.kernel.jobstate import State
from server.store import (
    IdempotencyConflict,
    JobStore,
    NewJob,
    QueueFull,
    ReleasedJob,
    RenewResult,
    WorkerInfo,
)
from server.store.sqlite import SqliteJobStore


def _postgres(tmp_path: Path, stack: ExitStack) -> JobStore:
    from server.store.postgres import PostgresJobStore
    from tests.pg import scratch_url

    store = PostgresJobStore(stack.enter_context(scratch_url()), pool_size=4)
    stack.callback(store.close)
    return store


BACKENDS: dict[str, Callable[[Path, ExitStack], JobStore]] = {
    "sqlite": lambda tmp_path, stack: SqliteJobStore(tmp_path / "jobs.sqlite3"),
    # The machine's PostgreSQL (tests/pg.py: a fresh schema per test; skipped without a server,
    # except under CI=true, where it fails).
    "postgres": _postgres,
}


@pytest.fixture(params=list(BACKENDS))
def store(request, tmp_path) -> Iterator[JobStore]:
    with ExitStack() as stack:
        yield BACKENDS[request.param](tmp_path, stack)


def new(i: str, **kw) -> NewJob:
    return NewJob(id=i, model="m", input={"prompt": i}, base_url="http://h", max_attempts=2, **kw)


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


def test_lost_lease_messages_in_full(store):
    store.create(new("a"))
    store.claim("w1", 300)
    assert store.expire_leases(now=time.time() + 1) == []  # a live lease is not touched
    assert [r.id for r in store.release_worker("w1", "The worker process exited unexpectedly")] == ["a"]
    a = store.get("a")
    assert a.error == "The worker process exited unexpectedly; the job was queued again."
    assert a.lease_owner is None and a.lease_expires is None and a.finished_at is None
    store.claim("w2", 0.01)
    assert store.expire_leases(now=time.time() + 1) == ["a"]
    a = store.get("a")
    assert a.error == (
        "The worker stopped renewing its lease while running this job (attempt 2 of 2);"
        " it was not retried again."
    )
    assert a.lease_owner is None and a.finished_at is not None


def test_release_worker(store):
    store.create(new("a"))
    store.claim("w1", 300)
    assert [r.id for r in store.release_worker("w1", "The worker process exited unexpectedly")] == ["a"]
    assert store.get("a").status is State.CREATED
    assert store.release_worker("w1", "again") == []


def test_release_worker_says_what_became_of_each_job(store):
    store.create(new("a"))
    store.claim("w1", 300)
    (r,) = store.release_worker("w1", "The server restarted")
    assert r == ReleasedJob(
        id="a", status=State.CREATED, attempts=1, max_attempts=2,
        error="The server restarted; the job was queued again.", counted=True,
    )  # fmt: skip
    assert r.describe() == "re-queued job a (attempt 1 of 2)"
    store.claim("w2", 300)
    (r,) = store.release_worker("w2", "The server restarted")
    assert (r.status, r.attempts, r.counted) == (State.FAILED, 2, True)
    assert r.describe() == (
        "failed job a: The server restarted while running this job (attempt 2 of 2);"
        " it was not retried again."
    )
    assert store.get("a").error == r.error


def test_graceful_hand_back_gives_the_attempt_back(store):
    store.create(new("a"))
    time.sleep(0.002)
    store.create(new("b"))
    store.claim("w1", 300)
    store.claim("w2", 300)
    assert store.renew("a", "w1", 300, progress=0.15) == RenewResult.OK
    assert store.renew("b", "w2", 300, progress=0.4) == RenewResult.OK
    (r,) = store.release_worker("w1", "The worker was stopped (server shutdown)", graceful=True)
    assert (r.id, r.status, r.attempts, r.max_attempts, r.counted) == ("a", State.CREATED, 0, 2, False)
    assert r.describe() == "re-queued job a (attempt not counted; 0 of 2 used)"
    a = store.get("a")
    assert a.status is State.CREATED and a.attempts == 0 and a.progress == 0.0
    assert a.error == "The worker was stopped (server shutdown); the job was queued again." and a.code == 0
    assert a.lease_owner is None and a.lease_expires is None and a.finished_at is None
    # Its old run writes nothing.
    assert store.renew("a", "w1", 300, progress=0.5) == RenewResult.LOST
    assert not store.complete("a", "w1", outputs=["k"], has_nsfw=[], inference_ms=1, seed=None, extra={})
    # Only the holder's jobs: w2's job runs on untouched.
    b = store.get("b")
    assert b.status is State.PROCESSING and b.lease_owner == "w2" and b.attempts == 1 and b.progress == 0.4
    assert store.release_worker("w1", "again", graceful=True) == []
    # Claimable at once, and the next claim is attempt 1 again.
    assert store.claim("w3", 300).id == "a" and store.get("a").attempts == 1


def test_graceful_hand_back_on_the_last_attempt_still_requeues(store):
    store.create(new("a", webhook_url="http://hook"))
    store.claim("w1", 300)
    store.release_worker("w1", "The worker process exited unexpectedly")  # a crash: counted
    assert store.claim("w2", 300).attempts == 2  # the last one
    (r,) = store.release_worker("w2", "The worker was stopped (server shutdown)", graceful=True)
    assert (r.status, r.attempts) == (State.CREATED, 1)
    a = store.get("a")
    assert a.status is State.CREATED and a.attempts == 1 and a.code == 0
    assert store.due_webhooks(time.time() + 1) == []  # queued again is no webhook event
    assert store.claim("w3", 300).attempts == 2
    assert store.complete("a", "w3", outputs=["k"], has_nsfw=[False], inference_ms=1, seed=None, extra={})
    assert store.get("a").attempts == 2


def test_requeued_jobs_show_no_progress(store):
    # A lost lease, a dead worker's release and a retryable failure all reset progress to 0
    # (each job is cancelled after its check, so the next claim takes the next job).
    store.create(new("a"))
    store.claim("w1", 0.01)
    assert store.renew("a", "w1", 0.01, progress=0.15) == RenewResult.OK
    time.sleep(0.02)
    assert store.expire_leases() == ["a"]
    a = store.get("a")
    assert a.status is State.CREATED and a.progress == 0.0
    store.cancel("a")
    store.create(new("b"))
    store.claim("w2", 300)
    store.renew("b", "w2", 300, progress=0.7)
    store.release_worker("w2", "The worker process exited unexpectedly")
    assert store.get("b").progress == 0.0
    store.cancel("b")
    store.create(new("c"))
    store.claim("w3", 300)
    store.renew("c", "w3", 300, progress=0.5)
    assert store.fail("c", "w3", code=1402, error="media timed out", retryable=True) is State.CREATED
    c = store.get("c")
    assert c.status is State.CREATED and c.progress == 0.0 and c.attempts == 1
    # A job that ends keeps the progress it reached.
    assert store.claim("w3", 300).id == "c"
    store.renew("c", "w3", 300, progress=0.5)
    assert store.fail("c", "w3", code=1401, error="bad") is State.FAILED
    assert store.get("c").progress == 0.5


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


def test_cancel_clears_the_lease_and_sets_finished_at(store):
    store.create(new("a"))
    store.claim("w1", 30)
    job, _ = store.cancel("a")
    assert job.error == "Cancelled by request." and job.code == 0
    assert job.lease_owner is None and job.lease_expires is None and job.finished_at is not None


def test_retryable_failure(store):
    store.create(new("a"))
    store.claim("w1", 30)
    assert store.fail("a", "w1", code=1402, error="media timed out", retryable=True, retry_delay=0.2) is State.CREATED
    assert store.claim("w1", 30) is None  # waits out the retry delay
    time.sleep(0.25)
    assert store.claim("w1", 30).attempts == 2
    assert store.fail("a", "w1", code=1402, error="media timed out", retryable=True) is State.FAILED
    assert store.get("a").code == 1402


def test_fail_only_by_the_lease_holder_and_keeps_the_seed(store):
    store.create(new("a"))
    store.claim("w1", 30)
    assert store.fail("a", "w2", code=1401, error="bad") is None
    assert store.fail("a", "w1", code=1401, error="bad", seed=7) is State.FAILED
    a = store.get("a")
    assert a.seed == 7 and a.error == "bad" and a.finished_at is not None
    assert store.fail("a", "w1", code=1401, error="again") is None  # terminal is final
    store.create(new("b"))
    assert store.fail("b", None, code=1400, error="expired in the queue") is State.FAILED
    assert store.fail("missing", None, code=1400, error="x") is None


def test_queue_cap(store):
    store.create(new("a"), max_queue=2)
    store.create(new("b"), max_queue=2)
    with pytest.raises(QueueFull):
        store.create(new("c"), max_queue=2)
    store.claim("w", 30)  # running jobs do not count against the queue
    store.create(new("c"), max_queue=2)


def test_queue_depth_position_and_counts(store):
    for i in "abc":
        store.create(new(i))
        time.sleep(0.002)
    assert store.queue_depth() == 3
    assert [store.queue_position(store.get(i)) for i in "abc"] == [0, 1, 2]
    store.claim("w", 30)
    assert store.queue_depth() == 2 and store.queue_position(store.get("c")) == 1
    assert store.count_by_status() == {"created": 2, "processing": 1}


def test_renewed_progress_never_goes_back(store):
    store.create(new("a"))
    store.claim("w1", 30)
    assert store.renew("a", "w1", 30, progress=0.6) == RenewResult.OK
    assert store.renew("a", "w1", 30, progress=0.2) == RenewResult.OK
    assert store.renew("a", "w1", 30) == RenewResult.OK
    assert store.get("a").progress == 0.6
    assert store.renew("missing", "w1", 30) == RenewResult.LOST


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
    # The event only: the dispatcher builds the body from the job when it delivers.
    assert (due[0].job_id, due[0].url, due[0].status, due[0].body) == ("a", "http://hook", "failed", None)
    assert store.due_webhooks(time.time() + 1) == []  # claimed by the first call
    assert store.webhook_attempted(
        "a-failed", claim=due[0].claim, delivered=False, error="500", next_attempt_at=time.time(),
        status_code=500,
    )
    [again] = store.due_webhooks(time.time() + 1)
    assert (again.attempts, again.last_status) == (1, 500)
    assert store.webhook_attempted(
        "a-failed", claim=again.claim, delivered=True, error="", next_attempt_at=None
    )
    assert store.due_webhooks(time.time() + 1000) == []


def test_only_completed_and_failed_jobs_with_a_url_have_events(store):
    store.create(new("done", webhook_url="http://hook"))
    store.claim("w", 30)
    store.complete("done", "w", outputs=["k"], has_nsfw=[False], inference_ms=1, seed=None, extra={})
    store.create(new("retried", webhook_url="http://hook"))
    store.claim("w", 30)
    store.fail("retried", "w", code=1402, error="timeout", retryable=True)  # re-queued: no event
    store.create(new("cancelled", webhook_url="http://hook"))
    store.cancel("cancelled")
    store.create(new("quiet"))
    store.claim("w", 30)
    store.complete("quiet", "w", outputs=[], has_nsfw=[], inference_ms=1, seed=None, extra={})
    due = store.due_webhooks(time.time() + 1)
    assert [(d.event_id, d.status) for d in due] == [("done-completed", "completed")]


def test_the_event_is_written_with_its_transition_or_not_at_all(store, monkeypatch):
    store.create(new("a", webhook_url="http://hook"))
    store.claim("w1", 30)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(store, "_insert_outbox_if_absent", broken)
    with pytest.raises(OSError):
        store.fail("a", "w1", code=1401, error="bad")
    assert store.get("a").status is State.PROCESSING  # rolled back with the event
    monkeypatch.undo()
    assert store.fail("a", "w1", code=1401, error="bad") is State.FAILED
    assert [d.event_id for d in store.due_webhooks(time.time() + 1)] == ["a-failed"]


def test_webhook_gives_up(store):
    store.create(new("a", webhook_url="http://hook"))
    store.claim("w1", 30)
    store.fail("a", "w1", code=1401, error="bad")
    [d] = store.due_webhooks(time.time() + 1)
    store.webhook_attempted(
        "a-failed", claim=d.claim, delivered=False, error="invalid URL", next_attempt_at=None
    )
    assert store.due_webhooks(time.time() + 1000) == []


def failed_event(store, jid: str, url: str = "http://hook") -> str:
    """A job that failed with a webhook URL: its event is due now."""
    store.create(new(jid, webhook_url=url))
    assert store.claim("w", 30).id == jid
    store.fail(jid, "w", code=1401, error="bad")
    return f"{jid}-failed"


def test_a_held_webhook_claim_is_never_shared(store):
    events = [failed_event(store, f"e{i:02d}") for i in range(24)]
    got: list = []
    lock = threading.Lock()

    def dispatcher():
        while batch := store.due_webhooks(time.time(), limit=3):
            with lock:
                got.extend(batch)

    threads = [threading.Thread(target=dispatcher) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(d.event_id for d in got) == events  # each row claimed by exactly one call
    assert all(d.claim for d in got) and len({d.claim for d in got}) == len(events)  # a claim each
    assert store.due_webhooks(time.time() + 5) == []  # held: nobody else gets them
    assert store.renew_webhook_claims({d.event_id: d.claim for d in got}, 30) == set(events)
    assert store.due_webhooks(time.time() + 20) == []  # renewed past the first expiry


def test_only_the_claim_holder_records_a_result(store):
    eid = failed_event(store, "a")
    [first] = store.due_webhooks(time.time(), lease_seconds=0.05)
    time.sleep(0.1)
    [second] = store.due_webhooks(time.time())  # the first claim ran out: taken over
    assert second.event_id == eid and second.claim != first.claim and second.attempts == 0
    # The first holder, late: its renewal and its result change nothing.
    assert store.renew_webhook_claims({eid: first.claim}, 30) == set()
    assert not store.webhook_attempted(eid, claim=first.claim, delivered=True, error="", next_attempt_at=None)
    assert not store.webhook_attempted(eid, claim="", delivered=True, error="", next_attempt_at=None)
    assert store.due_webhooks(time.time() + 5) == []  # still pending, still held by the second
    assert store.webhook_attempted(
        eid, claim=second.claim, delivered=False, error="receiver answered 503",
        next_attempt_at=time.time(), status_code=503,
    )  # fmt: skip
    # The claim ended with its result: the holder cannot record it twice.
    assert not store.webhook_attempted(
        eid, claim=second.claim, delivered=True, error="", next_attempt_at=None
    )
    [third] = store.due_webhooks(time.time() + 0.01)
    assert (third.attempts, third.last_status) == (1, 503)  # one attempt counted, the holder's
    assert store.webhook_attempted(eid, claim=third.claim, delivered=True, error="", next_attempt_at=None)
    assert store.due_webhooks(time.time() + 1000) == []


def test_an_expired_webhook_claim_is_taken_over_a_renewed_one_is_not(store):
    a, b, c = (failed_event(store, i) for i in "abc")
    claims = {d.event_id: d.claim for d in store.due_webhooks(time.time(), lease_seconds=0.2)}
    assert sorted(claims) == [a, b, c]
    assert store.due_webhooks(time.time()) == []
    assert store.renew_webhook_claims({a: claims[a]}, 30) == {a}
    time.sleep(0.3)
    # c's claim ran out but nobody took it over yet: its holder may still renew it.
    assert store.renew_webhook_claims({c: claims[c]}, 30) == {c}
    [taken] = store.due_webhooks(time.time())
    assert taken.event_id == b and taken.claim != claims[b]
    assert store.renew_webhook_claims({b: claims[b]}, 30) == set()


def test_a_claim_can_pass_over_rows_and_leaves_them_due(store):
    ids = [failed_event(store, f"e{i}", url=f"http://{'slow' if i < 3 else 'fast'}/hook") for i in range(5)]
    got = store.due_webhooks(time.time(), limit=1, accept=lambda d: "fast" in d.url)
    assert [d.event_id for d in got] == ids[3:4]
    assert [d.event_id for d in store.due_webhooks(time.time())] == ids[:3] + ids[4:]


def test_history(store):
    for i in range(5):
        store.create(new(f"j{i}"))
        time.sleep(0.002)
    store.cancel("j0")
    jobs, total = store.history(page=1, page_size=2)
    assert total == 5 and [j.id for j in jobs] == ["j4", "j3"]
    jobs, total = store.history(page=1, page_size=10, status="cancelled")
    assert total == 1 and jobs[0].id == "j0"


def test_workers(store):
    w = WorkerInfo(id="w1", host="h", pid=1, model="m", state="loading", started_at=1.0, heartbeat_at=2.0)
    store.upsert_worker(w)
    w.state, w.reason, w.info, w.heartbeat_at = "failed", "no weights", {"gpu": "x"}, 3.0
    store.upsert_worker(w)
    [got] = store.workers()
    assert (got.id, got.state, got.reason, got.info, got.heartbeat_at, got.started_at) == (
        "w1", "failed", "no weights", {"gpu": "x"}, 3.0, 1.0
    )


def test_settings(store):
    assert store.get_setting("k") is None
    assert store.set_setting_if_absent("k", "first") == "first"
    assert store.set_setting_if_absent("k", "second") == "first"
    assert store.get_setting("k") == "first"


def _insert(store, rows: list[dict]) -> None:
    """Rows with chosen times, through the backend's own insert (both are transactional)."""
    with store._transaction() as c:
        for r in rows:
            store._insert_job(c, {"model": "m", "input": {}, "base_url": "", "max_attempts": 1, **r})


@pytest.mark.parametrize(
    "filters",
    [{}, {"status": "created"}, {"status": "cancelled"}, {"created_after": 1003.0, "created_before": 1009.0}],
    ids=repr,
)
def test_history_pages_cursors_and_windows(store, filters):
    # Ties on created_at (three jobs a second), broken by id, newest first; every 4th finished.
    rows = []
    for i in range(40):
        done = i % 4 == 0
        rows.append({"id": f"h{(7 * i) % 40:02d}", "created_at": 1000.0 + i // 3,
                     "status": State.CANCELLED if done else State.CREATED,
                     "finished_at": 2000.0 + i if done else None})  # fmt: skip
    _insert(store, rows)
    lo, hi = filters.get("created_after", 0.0), filters.get("created_before", float("inf"))
    by_hand = [
        r["id"]
        for r in sorted(rows, key=lambda r: (r["created_at"], r["id"]), reverse=True)
        if lo <= r["created_at"] <= hi and filters.get("status", r["status"].value) == r["status"].value
    ]
    everything, total = store.history(page=1, page_size=100, **filters)
    assert [j.id for j in everything] == by_hand and total == len(by_hand) > 4

    # Cursor pages while new jobs arrive: in order, each once, none of the new ones.
    seen, cursor, k = [], None, 0
    while True:
        jobs, _ = store.history(page=1, page_size=4, cursor=cursor, **filters)
        seen += [j.id for j in jobs]
        if len(jobs) < 4:
            break
        cursor = (jobs[-1].created_at, jobs[-1].id)
        store.create(new(f"new{k}"))
        k += 1
    assert seen == by_hand

    # Page numbers in a fixed window: the same rows, page by page; past the end, nothing.
    window = {"created_before": 1999.0, **filters}
    numbered = []
    for page in range(1, len(by_hand) // 4 + 2):
        numbered += [j.id for j in store.history(page=page, page_size=4, **window)[0]]
    assert numbered == by_hand
    assert store.history(page=len(by_hand) // 4 + 5, page_size=4, **window)[0] == []


def test_finished_timings_newest_first_in_the_window(store):
    store.create(NewJob(id="a", model="m", input={"num_inference_steps": 12}, base_url="", max_attempts=1))
    store.create(NewJob(id="b", model="m", input={}, base_url="", max_attempts=1))
    store.create(NewJob(id="c", model="m", input={"num_inference_steps": 3}, base_url="", max_attempts=1))
    assert store.finished_timings(0.0, 10) == []
    job = store.claim("w", 30)
    store.complete(job.id, "w", outputs=[], has_nsfw=[], inference_ms=40, seed=None, extra={})
    store.cancel("b")  # ended without ever being claimed
    t = store.finished_timings(0.0, 10)
    assert [(x.status, x.steps, x.inference_ms, x.started_at is None) for x in t] == [
        ("cancelled", None, None, True),
        ("completed", 12, 40, False),
    ]
    assert t[0].finished_at >= t[1].finished_at >= t[1].started_at >= t[1].created_at
    assert len(store.finished_timings(0.0, 1)) == 1 and store.finished_timings(time.time() + 60, 10) == []


def test_retention_marks_and_deletes_only_settled_finished_jobs(store):
    _insert(store, [
        {"id": "old1", "created_at": 1.0, "status": State.COMPLETED, "finished_at": 10.0},
        {"id": "old2", "created_at": 2.0, "status": State.FAILED, "finished_at": 20.0},
        {"id": "hook", "created_at": 3.0, "status": State.COMPLETED, "finished_at": 30.0},
        {"id": "new", "created_at": 4.0, "status": State.COMPLETED, "finished_at": 1e12},
        {"id": "queued", "created_at": 5.0, "status": State.CREATED},
    ])  # fmt: skip
    with store._transaction() as c:  # a webhook still to deliver keeps its job's row
        store._insert_outbox_if_absent(
            c, event_id="hook-completed", job_id="hook", url="http://r", status=State.COMPLETED, next_attempt_at=0.0
        )
    assert [j.id for j in store.expirable(100.0, 10)] == ["old1", "old2", "hook"]
    assert [j.id for j in store.expirable(100.0, 2)] == ["old1", "old2"]
    assert store.mark_outputs_expired(["old1", "queued", "new"], 50.0) == 2  # not the queued one
    assert store.mark_outputs_expired(["old1"], 60.0) == 0  # marked once
    assert store.get("old1").outputs_expired_at == 50.0
    assert [j.id for j in store.expirable(100.0, 10)] == ["old2", "hook"]
    assert store.prunable(100.0, 10) == ["old1", "old2"]
    assert store.delete_jobs(["old1", "hook", "queued", "new"], 100.0) == 1
    assert store.get("old1") is None and store.get("hook") is not None and store.get("queued") is not None
    assert store.count_by_status() == {"completed": 2, "failed": 1, "created": 1}


def test_locks(store):
    assert store.acquire_lock("retention", "a", 30, now=100.0)
    assert not store.acquire_lock("retention", "b", 30, now=110.0)  # held by a
    assert store.acquire_lock("retention", "a", 30, now=120.0)  # a renews it, to 150
    assert not store.acquire_lock("retention", "b", 30, now=149.0)
    assert store.acquire_lock("retention", "b", 30, now=150.0)  # ran out: b takes it over
    store.release_lock("retention", "a")  # not a's: nothing happens
    assert not store.acquire_lock("retention", "a", 30, now=151.0)
    store.release_lock("retention", "b")
    assert store.acquire_lock("retention", "a", 30, now=152.0)


def test_extend_leases_after_an_outage(store):
    for i in "ab":
        store.create(new(i))
    store.claim("w1", 1)
    store.claim("w2", 600)
    assert store.extend_leases(60) == ["a"]  # b's lease runs longer already
    assert 55 < store.get("a").lease_expires - time.time() <= 60
    assert store.get("a").lease_owner == "w1" and store.expire_leases() == []
