"""What only the PostgreSQL store has to prove (the shared rules run in test_store_contract.py):
claims from many threads and processes at once take each job exactly once; opposite transitions
at once never deadlock and the kept counts stay exact; the queue cap holds under concurrent
submits; several processes migrating a fresh database at once; a newer schema refused; events
sent at commit and only then; an unreachable server answered quickly and clearly (StoreUnreachable
in the store, 503 in the contract's envelope from the API) and recovered from without a restart;
sync-mode requests woken by the finished event.

Each test has a fresh schema on the machine's server (tests/pg.py); outages are a relay the test
cuts (tests/pg.py `Cuttable`), or, in the slow test, a private server restarted with pg_ctl."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import socket
import threading
import time

import psycopg
import pytest
from fastapi.testclient import TestClient

from server.kernel.jobstate import State
from server.store import CHANNEL_FINISHED, CHANNEL_QUEUED, NewJob, QueueFull, StoreBusy, StoreUnreachable
from server.store.pg_schema import FOLD_COUNTS
from tests import pg
from tests.pg import Cuttable, scratch_url, via


@pytest.fixture
def url():
    with scratch_url() as u:  # skips, or fails under CI=true, without a server
        yield u


def _store(url: str, pool: int = 4, **kw):
    from server.store.postgres import PostgresJobStore

    return PostgresJobStore(url, pool_size=pool, **kw)


def new(i: str, **kw) -> NewJob:
    return NewJob(id=i, model="m", input={"prompt": i}, base_url="http://h", max_attempts=2, **kw)


def _done(store, job_id: str, worker: str) -> bool:
    return store.complete(job_id, worker, outputs=[], has_nsfw=[], inference_ms=0, seed=None, extra={})


def counted(url: str) -> dict[str, int]:
    with psycopg.connect(url) as c:
        return dict(c.execute("SELECT status, count(*) FROM jobs GROUP BY status").fetchall())


# Concurrency ---------------------------------------------------------------------------------
def test_claims_from_threads_take_each_job_once(url):
    store = _store(url, pool=8)
    ids = [f"j{i:03d}" for i in range(120)]
    for i in ids:
        store.create(new(i))
    taken: list[str] = []
    lock = threading.Lock()

    def claimer(k: int) -> None:
        while (job := store.claim(f"w{k}", 30)) is not None:
            with lock:
                taken.append(job.id)
            assert _done(store, job.id, f"w{k}")

    threads = [threading.Thread(target=claimer, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(taken) == ids  # every job once: none twice, none missed
    assert store.count_by_status() == {"completed": 120} == counted(url)
    store.close()


def test_claims_from_processes_take_each_job_once(url):
    store = _store(url)
    with store._transaction() as c:  # 200 queued jobs in one go
        for i in range(200):
            store._insert_job(c, {"id": f"p{i:03d}", "model": "m", "input": {}, "base_url": "",
                                  "created_at": 1000.0 + i, "max_attempts": 1, "status": State.CREATED})  # fmt: skip
    ctx = mp.get_context("spawn")
    out, start = ctx.Queue(), ctx.Barrier(4)
    procs = [ctx.Process(target=pg.claim_all, args=(url, f"proc{k}", start, out)) for k in range(4)]
    for p in procs:
        p.start()
    took = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
    assert all(p.exitcode == 0 for p in procs)
    claimed = [j for t in took for j in t]
    assert len(claimed) == len(set(claimed)) == 200  # none twice, none missed
    # Claimers passed each other (SKIP LOCKED) instead of taking turns: all took a share.
    assert all(t for t in took), [len(t) for t in took]
    assert store.count_by_status() == {"completed": 200}
    store.close()


def test_opposite_transitions_at_once_never_deadlock_and_counts_stay_exact(url):
    """A claim moves a job created -> processing while a retryable failure moves another
    processing -> created: with one counter row per status, two such transactions lock the two
    rows in opposite orders, and the server aborts one of them as a deadlock."""
    store = _store(url, pool=8)
    for i in range(30):
        store.create(NewJob(id=f"d{i}", model="m", input={}, base_url="", max_attempts=10**6))
    errors: list[str] = []
    stop = time.monotonic() + 2.0

    def churn(k: int) -> None:
        while time.monotonic() < stop:
            try:
                if job := store.claim(f"w{k}", 30):
                    store.fail(job.id, f"w{k}", code=1, error="again", retryable=True)
            except Exception as e:  # noqa: BLE001 - the test reports every one
                errors.append(repr(e))

    threads = [threading.Thread(target=churn, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert store.count_by_status() == counted(url) == {"created": 30}
    store.close()


def test_the_queue_cap_holds_against_concurrent_submits(url):
    store = _store(url, pool=10)
    barrier = threading.Barrier(10)
    outcomes: list[str] = []

    def submit(k: int) -> None:
        barrier.wait()
        for n in range(3):
            try:
                store.create(new(f"q{k}-{n}"), max_queue=7)
                outcomes.append("created")
            except QueueFull:
                outcomes.append("full")

    threads = [threading.Thread(target=submit, args=(k,)) for k in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert outcomes.count("created") == 7 and outcomes.count("full") == 23
    assert store.queue_depth() == 7 == counted(url)["created"]
    store.close()


def test_kept_counts_match_the_rows_after_every_kind_of_change(url):
    store = _store(url)
    steps = {
        "create": lambda: [store.create(new(i)) for i in "abcdefgh"],
        "claim": lambda: [store.claim("w1", 30) for _ in range(4)],  # a, b, c, d
        "complete": lambda: _done(store, "a", "w1"),
        "fail": lambda: store.fail("b", "w1", code=1400, error="x"),
        "retry": lambda: store.fail("c", "w1", code=5000, error="x", retryable=True),
        "cancel queued": lambda: store.cancel("e"),
        "cancel cancelled": lambda: store.cancel("e"),  # no change: the counts stay
        "fold": lambda: psycopg.connect(url, autocommit=True).execute(FOLD_COUNTS),
        "expire": lambda: store.expire_leases(time.time() + 60),  # d: re-queued
        "claim again": lambda: [store.claim("w2", 30) for _ in range(2)],
        "hand back": lambda: store.release_worker("w2", "stopping", graceful=True),
        "fail queued": lambda: store.fail_queued(code=5000, error="no worker"),
        "delete": lambda: psycopg.connect(url, autocommit=True).execute(
            "DELETE FROM jobs WHERE status = 'failed'"
        ),
    }
    for name, step in steps.items():
        step()
        rows = counted(url)
        assert store.count_by_status() == rows, name
        assert store.queue_depth() == rows.get("created", 0), name
        assert store.history(page=1, page_size=1)[1] == sum(rows.values()), name
        for status in ("created", "completed", "failed", "cancelled"):
            assert store.history(page=1, page_size=1, status=status)[1] == rows.get(status, 0), name
    assert counted(url) == {"completed": 1, "cancelled": 1}  # the test did move every job
    store.close()


def test_the_counts_changes_are_folded_as_jobs_move(url):
    store = _store(url)
    for i in range(120):
        store.create(new(f"f{i}"))
    with psycopg.connect(url) as c:
        (changes,) = c.execute("SELECT count(*) FROM job_count_changes").fetchone()
        (folded,) = c.execute("SELECT coalesce(sum(n), 0) FROM job_counts").fetchone()
    assert changes < 60 and folded >= 60  # folded every 50 writes of this process
    assert store.count_by_status() == {"created": 120}
    store.close()


# Schema --------------------------------------------------------------------------------------
def test_processes_opening_a_fresh_database_at_once_migrate_it_once(url):
    ctx = mp.get_context("spawn")
    out, start = ctx.Queue(), ctx.Barrier(4)
    procs = [ctx.Process(target=pg.open_store, args=(url, start, out)) for _ in range(4)]
    for p in procs:
        p.start()
    results = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(30)
    assert results == ["ok"] * 4
    with psycopg.connect(url) as c:
        assert c.execute("SELECT version FROM schema_version").fetchall() == [(1,)]  # one step, once
        triggers = c.execute(
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'jobs'::regclass AND NOT tgisinternal"
        )
        assert triggers.fetchone()[0] == 2


def test_a_newer_schema_is_refused(url):
    _store(url).close()
    with psycopg.connect(url, autocommit=True) as c:
        c.execute("INSERT INTO schema_version (version) VALUES (99)")
    with pytest.raises(RuntimeError, match="schema version 99, newer than version 1 that this server knows"):
        _store(url)


# Events --------------------------------------------------------------------------------------
def test_events_are_sent_at_commit_and_only_then(url, monkeypatch):
    store = _store(url)
    events = store.listen(CHANNEL_QUEUED, CHANNEL_FINISHED)
    try:
        assert events.wait(0.2) == []
        store.create(new("a"))
        assert events.wait(5) == [(CHANNEL_QUEUED, "a")]
        job = store.claim("w", 30)
        assert events.wait(0.2) == []  # a claim is neither
        # A retryable failure queues the job again: idle workers hear of it.
        assert store.fail(job.id, "w", code=1, error="flaky", retryable=True) is State.CREATED
        assert events.wait(5) == [(CHANNEL_QUEUED, "a")]
        job = store.claim("w", 30)
        assert _done(store, job.id, "w")
        assert events.wait(5) == [(CHANNEL_FINISHED, "a")]
        store.create(new("b"))
        store.create(new("c"))
        store.cancel("b")
        store.fail("c", None, code=1, error="x")
        got = events.wait(5)
        while len(got) < 4 and (more := events.wait(2)):
            got += more
        assert got == [
            (CHANNEL_QUEUED, "b"),
            (CHANNEL_QUEUED, "c"),
            (CHANNEL_FINISHED, "b"),
            (CHANNEL_FINISHED, "c"),
        ]
        # A create whose transaction rolls back after its NOTIFY: no event, no job.
        monkeypatch.setattr(store, "_fetch_job", lambda c, job_id: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            store.create(new("d"))
        monkeypatch.undo()
        assert events.wait(0.5) == [] and store.get("d") is None
    finally:
        events.close()
        store.close()


def test_events_of_another_schema_are_not_heard(url):
    store = _store(url)
    events = store.listen(CHANNEL_QUEUED)
    try:
        with scratch_url() as other_url:
            other = _store(other_url)
            other.create(new("elsewhere"))
            other.close()
        assert events.wait(0.5) == []
        store.create(new("here"))
        assert events.wait(5) == [(CHANNEL_QUEUED, "here")]
    finally:
        events.close()
        store.close()


# Outages -------------------------------------------------------------------------------------
def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_server_is_a_quick_clear_error():
    url = f"postgresql://wan:s3cret-password@127.0.0.1:{_closed_port()}/wan"
    t0 = time.monotonic()
    with pytest.raises(StoreUnreachable) as e:
        _store(url)
    assert time.monotonic() - t0 < 2  # refused at once, not after the pool's timeout
    msg = str(e.value)
    assert f"127.0.0.1:{url.rsplit(':', 1)[1].split('/')[0]}/wan" in msg and "cannot be reached" in msg
    assert "Connection refused" in msg and "s3cret" not in msg and "WAN_VACE_DATABASE_URL" in msg


def test_calls_in_nonblocking_mode_go_to_a_thread_at_once(url):
    store = _store(url)
    store.create(new("a"))
    t0 = time.monotonic()
    with pytest.raises(StoreBusy), store.nonblocking():
        store.get("a")
    assert time.monotonic() - t0 < 0.1
    assert store.get("a").id == "a"  # outside the mode: read as usual
    store.close()


@pytest.fixture
def relay():
    r = Cuttable()
    yield r
    r.close()


def test_an_outage_is_unreachable_then_recovered_from_without_a_restart(url, relay):
    store = _store(via(url, relay.port), timeout=2.0)
    events = store.listen(CHANNEL_QUEUED)
    try:
        store.create(new("before"))
        assert events.wait(5) == [(CHANNEL_QUEUED, "before")]
        relay.cut()
        t0 = time.monotonic()
        with pytest.raises(StoreUnreachable, match=f"127.0.0.1:{relay.port}/test cannot be reached"):
            store.get("before")
        assert time.monotonic() - t0 < 4  # the pool's timeout, not a hang
        assert "Connection refused" in str(store.write_error)  # /health shows it, with the reason
        assert events.wait(0.5) == []  # the listener waits it out, raising nothing
        relay.restore()
        # The very next call succeeds: the pool replaced its broken connections.
        assert store.get("before").status is State.CREATED
        assert store.write_error is None
        # The listener reconnected (and listens again) by itself.
        deadline = time.monotonic() + 10
        got: list = []
        while not got and time.monotonic() < deadline:
            store.create(new(f"after{time.monotonic()}"))
            got = events.wait(1)
        assert got and got[0][0] == CHANNEL_QUEUED
    finally:
        events.close()
        store.close()


KEY = "k-pg"
MODEL = "/api/v3/wavespeed-ai/wan-2.1-14b-vace"


def _app(tmp_path, database_url: str):
    from server.app import create_app
    from server.settings import Settings

    app = create_app(Settings(data_dir=tmp_path, workers=0, api_keys=[KEY], database_url=database_url))
    client = TestClient(app)
    client.headers["Authorization"] = f"Bearer {KEY}"
    return client


def test_the_api_answers_503_in_the_envelope_while_the_database_is_down(url, relay, tmp_path):
    # The password must never reach a client (trust authentication ignores it).
    with _app(tmp_path, via(url, relay.port, password="s3cret-pw")) as c:
        r = c.post(MODEL, json={"prompt": "x"})
        assert r.status_code == 200, r.text
        jid = r.json()["data"]["id"]
        relay.cut()
        t0 = time.monotonic()
        r = c.get(f"/api/v3/predictions/{jid}/result")
        assert time.monotonic() - t0 < 6
        assert r.status_code == 503 and r.headers["retry-after"] == "5"
        env = r.json()
        assert env["code"] == 503 and "job store is unavailable" in env["message"], env
        assert f"127.0.0.1:{relay.port}" in env["message"] and "s3cret" not in env["message"]
        assert c.post(MODEL, json={"prompt": "y"}).status_code == 503  # a submit too
        relay.restore()
        # It recovers by itself, no restart of anything: the next request is answered.
        r = c.get(f"/api/v3/predictions/{jid}/result")
        assert r.status_code == 200 and r.json()["data"]["status"] == "created"


def test_a_sync_mode_request_is_woken_by_the_finished_event(url, tmp_path):
    store = _store(url)
    finished_at: list[float] = []

    def worker() -> None:
        deadline = time.monotonic() + 20
        while (job := store.claim("w", 30)) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # the request is waiting by now
        finished_at.append(time.monotonic())
        _done(store, job.id, "w")

    with _app(tmp_path, url) as c:
        t = threading.Thread(target=worker)
        t.start()
        r = c.post(MODEL, json={"prompt": "x", "enable_sync_mode": True})
        answered = time.monotonic()
        t.join()
    assert r.status_code == 200 and r.json()["data"]["status"] == "completed", r.text
    # The event woke it, not the fallback read (which comes every FALLBACK_POLL_S).
    from server.notify import FALLBACK_POLL_S

    assert answered - finished_at[0] < FALLBACK_POLL_S / 2, answered - finished_at[0]
    store.close()


def test_without_events_a_waiter_polls():
    from server.notify import PLAIN_POLL_S, FinishedWaiters

    class NoEvents:
        def listen(self, *channels):
            return None

    waiters = FinishedWaiters(NoEvents())

    async def wait_once() -> float:
        with waiters.watch("x") as w:
            await asyncio.sleep(0.1)  # the listener thread found there are no events
            t0 = time.monotonic()
            await w.wait(waiters.poll_interval)
            return time.monotonic() - t0

    assert asyncio.run(wait_once()) < PLAIN_POLL_S * 3
    assert waiters.poll_interval == PLAIN_POLL_S


@pytest.mark.slow
def test_a_real_restart_is_recovered_from():
    """PostgreSQL stopped and started again with pg_ctl (a private server: the machine's is
    never stopped): calls fail fast meanwhile, then succeed; the listener listens again."""
    from tests.pgserver import PrivatePostgres, available

    if available():
        pytest.skip(available())
    with PrivatePostgres() as pg:
        store = _store(pg.url, timeout=2.0)
        events = store.listen(CHANNEL_QUEUED)
        try:
            store.create(new("a"))
            assert events.wait(5) == [(CHANNEL_QUEUED, "a")]
            pg.stop()
            t0 = time.monotonic()
            with pytest.raises(StoreUnreachable, match="cannot be reached"):
                store.claim("w", 30)
            assert time.monotonic() - t0 < 4
            assert events.wait(0.5) == []
            pg.start()
            job = store.claim("w", 30)  # the first call after the restart
            assert job is not None and job.id == "a"
            deadline = time.monotonic() + 10
            got: list = []
            while not got and time.monotonic() < deadline:
                store.create(new(f"after{time.monotonic()}"))
                got = events.wait(1)
            assert got and got[0][0] == CHANNEL_QUEUED
        finally:
            events.close()
            store.close()


# Query plans ---------------------------------------------------------------------------------
def test_the_hot_queries_are_index_reads(url):
    """The store's own statements (caught as it runs them), explained by PostgreSQL over 20,000
    jobs, most of them finished: none reads the jobs table whole, the counts none of it."""
    import secrets
    from contextlib import contextmanager

    store = _store(url)
    with psycopg.connect(url, autocommit=True) as c:
        with c.cursor().copy(
            "COPY jobs (id, model, status, input, created_at, finished_at) FROM STDIN"
        ) as cp:
            for i in range(20_000):
                done = i < 19_000
                status = ("completed", "failed", "cancelled")[i % 3] if done else "created"
                cp.write_row(
                    (secrets.token_hex(16), "m", status, "{}", 1e6 + i, 1e6 + i + 0.5 if done else None)
                )
        c.execute("VACUUM ANALYZE jobs")
    ran: list[tuple[str, object]] = []
    plain = store._connection

    @contextmanager
    def recorded():
        with plain() as c:
            real = c.execute
            c.execute = lambda q, params=None, **kw: (ran.append((q, params)), real(q, params, **kw))[1]
            try:
                yield c
            finally:
                del c.execute

    store._connection = recorded
    queued = store.history(page=1, page_size=100, status="created")[0]
    calls = {
        "claim": (lambda: store.claim("w", 30), "jobs_queued"),
        "queue position": (lambda: store.queue_position(queued[50]), "jobs_queued"),
        "lease sweep": (lambda: store.expire_leases(1.0), "jobs_lease"),
        "history": (lambda: store.history(page=1, page_size=20), "jobs_created"),
        "history, page 50": (lambda: store.history(page=50, page_size=20), "jobs_created"),
        "history, queued": (lambda: store.history(page=2, page_size=20, status="created"), "jobs_"),
        "history, window": (lambda: store.history(page=1, page_size=20, created_after=1e6 + 10, created_before=1e6 + 900), "jobs_created"),
        "files to expire": (lambda: store.expirable(1e6 + 10_000, 100), "jobs_"),
        "rows to prune": (lambda: store.prunable(1e6 + 10_000, 100), "jobs_finished"),
        "timings": (lambda: store.finished_timings(1e6 + 18_000, 100), "jobs_finished"),
        "counts": (lambda: (store.count_by_status(), store.queue_depth()), None),
    }  # fmt: skip
    with psycopg.connect(url) as c:
        for name, (call, index) in calls.items():
            ran.clear()
            call()
            selects = [(q, p) for q, p in ran if q.startswith("SELECT") and "pg_notify" not in q]
            plans = {q: "\n".join(r[0] for r in c.execute("EXPLAIN " + q, p).fetchall()) for q, p in selects}
            assert plans, name
            for q, plan in plans.items():
                assert "Seq Scan on jobs" not in plan, f"{name}: {q}\n{plan}"
                if index is None:  # the kept counts: not a row of jobs
                    assert " on jobs " not in plan, f"{name}: {q}\n{plan}"
            if index is not None:  # the call's search (its reads by id go by the primary key)
                assert any(f"using {index}" in plan for plan in plans.values()), f"{name}: {plans}"
    store.close()
