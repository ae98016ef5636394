"""The SQLite store's hot queries stay index reads as the table grows, and say the same as a
count of the rows would: queue positions (every poll of a queued job), history pages and their
totals, the counts /health shows. The plans are SQLite's own `EXPLAIN QUERY PLAN` of the very
statements the store runs, caught with the connection's trace callback."""

from __future__ import annotations

import secrets
import sqlite3
import threading
import time

import pytest

from server.kernel.jobstate import State
from server.store import NewJob, StoreBusy
from server.store.sqlite import SqliteJobStore

DEPTH = 10_000


def new(i: str, **kw) -> NewJob:
    return NewJob(id=i, model="m", input={"prompt": i}, base_url="http://h", max_attempts=2, **kw)


def fill(store: SqliteJobStore, queued: int, finished: int = 0, *, t0: float = 1_000_000.0) -> list[str]:
    """Rows in one transaction through the store's own insert: `finished` terminal jobs, then
    `queued` ones, one second apart; returns their ids in creation order."""
    ids = []
    terminal = [State.COMPLETED, State.FAILED, State.CANCELLED]
    with store._transaction() as c:
        for i in range(finished + queued):
            jid = secrets.token_hex(16)
            done = i < finished
            store._insert_job(
                c,
                {
                    "id": jid,
                    "model": "m",
                    "input": {},
                    "base_url": "http://h",
                    "created_at": t0 + i,
                    "max_attempts": 2,
                    "status": terminal[i % 3] if done else State.CREATED,
                    "finished_at": t0 + i + 0.5 if done else None,
                },
            )
            ids.append(jid)
    return ids


def plans(store: SqliteJobStore, call) -> list[str]:
    """What SQLite does for each query `call` makes the store run: the plan lines of each."""
    conn = store._conn()
    ran: list[str] = []
    conn.set_trace_callback(ran.append)
    try:
        call()
    finally:
        conn.set_trace_callback(None)
    queries = [q for q in ran if q.lstrip().upper().startswith("SELECT")]
    assert queries, "the call ran no query"
    return [" | ".join(r[3] for r in conn.execute(f"EXPLAIN QUERY PLAN {q}")) for q in queries]


def assert_no_table_scan(lines: list[str]) -> None:
    for line in lines:
        # "SCAN jobs" alone reads every row; "SCAN jobs USING [COVERING] INDEX" walks an index in
        # order and stops at the LIMIT (or reads index entries only); a temp B-tree is a sort.
        assert "SCAN jobs |" not in line + " |" and "TEMP B-TREE" not in line, lines


@pytest.fixture(scope="module", params=["planned without statistics", "after ANALYZE"])
def deep(request, tmp_path_factory):
    """DEPTH queued jobs behind 2,000 finished ones; once as opened, once after ANALYZE (as
    `PRAGMA optimize` would leave it), since the planner may choose otherwise with statistics."""
    store = SqliteJobStore(tmp_path_factory.mktemp("deep") / "jobs.sqlite3")
    ids = fill(store, DEPTH, 2_000)
    if request.param == "after ANALYZE":
        store._conn().execute("ANALYZE")
    return store, ids


def test_a_queue_position_is_an_index_range_count(deep):
    store, ids = deep
    last = store.get(ids[-1])
    assert store.queue_position(last) == DEPTH - 1
    [line] = plans(store, lambda: store.queue_position(last))
    assert line.startswith("SEARCH jobs USING COVERING INDEX jobs_order (status=? AND (created_at,id)<(?,?))")


def test_the_claim_reads_the_queue_in_index_order(deep):
    store, _ = deep
    with store._session() as c:
        lines = plans(store, lambda: store._fetch_next_claimable(c, time.time()))
    assert_no_table_scan(lines)
    assert "jobs_order" in lines[0]


@pytest.mark.parametrize(
    "query",
    [
        {"page": 1},
        {"page": 60},  # the last page: 12,000 rows, 200 a page
        {"page": 3, "status": "failed"},
        {"page": 2, "created_after": 1_000_500.0, "created_before": 1_009_000.0},
        {"page": 2, "status": "created", "created_after": 1_003_000.0},
        {"page": 1, "cursor": (1_006_000.0, "f" * 32)},
        {"page": 1, "status": "completed", "cursor": (1_001_000.0, "0")},
    ],
    ids=repr,
)
def test_a_history_page_and_its_total_are_index_reads(deep, query):
    store, _ = deep
    lines = plans(store, lambda: store.history(page_size=200, **query))
    assert_no_table_scan(lines)
    jobs, total = store.history(page_size=200, **query)
    assert jobs and total


def test_counts_and_depth_read_no_job_row(deep):
    store, _ = deep
    for call in (store.count_by_status, store.queue_depth, lambda: store.history(page=1, page_size=1)):
        for line in plans(store, call):
            if "jobs" in line.replace("job_counts", ""):
                assert "SEARCH" in line or "SCAN jobs USING INDEX" in line, line  # the page itself
    assert store.queue_depth() == DEPTH
    assert store.count_by_status() == {"created": DEPTH, "completed": 667, "failed": 667, "cancelled": 666}


def counted(store: SqliteJobStore) -> dict[str, int]:
    rows = sqlite3.connect(store.path).execute("SELECT status, COUNT(*) FROM jobs GROUP BY status")
    return dict(rows.fetchall())


def test_kept_counts_match_the_rows_after_every_kind_of_change(tmp_path):
    store = SqliteJobStore(tmp_path / "jobs.sqlite3")
    steps = {
        "create": lambda: [store.create(new(i)) for i in "abcdefgh"],
        "claim": lambda: [store.claim("w1", 30) for _ in range(4)],  # a, b, c, d
        "complete": lambda: store.complete(
            "a", "w1", outputs=[], has_nsfw=[], inference_ms=1, seed=None, extra={}
        ),
        "fail": lambda: store.fail("b", "w1", code=1400, error="x"),
        "retry": lambda: store.fail("c", "w1", code=5000, error="x", retryable=True),
        "cancel queued": lambda: store.cancel("e"),
        "cancel cancelled": lambda: store.cancel("e"),  # no change: the counts stay
        "expire": lambda: store.expire_leases(time.time() + 60),  # d: re-queued
        "claim again": lambda: [store.claim("w2", 30) for _ in range(2)],
        "hand back": lambda: store.release_worker("w2", "stopping", graceful=True),
        "fail queued": lambda: store.fail_queued(code=5000, error="no worker"),
        "delete": lambda: sqlite3.connect(store.path, isolation_level=None).execute(
            "DELETE FROM jobs WHERE status = 'failed'"
        ),
    }
    for name, step in steps.items():
        step()
        rows = counted(store)
        assert store.count_by_status() == rows, name
        assert store.queue_depth() == rows.get("created", 0), name
        assert store.history(page=1, page_size=1)[1] == sum(rows.values()), name
        for status in ("created", "completed", "failed", "cancelled"):
            assert store.history(page=1, page_size=1, status=status)[1] == rows.get(status, 0), name
    assert counted(store) == {"completed": 1, "cancelled": 1}  # the test did move every job


def test_queue_positions_are_the_claim_order(tmp_path):
    store = SqliteJobStore(tmp_path / "jobs.sqlite3")
    fill(store, 30)
    with store._transaction() as c:  # ties on created_at: the id decides, in both
        for i in range(5):
            store._insert_job(
                c,
                {"id": f"tie{4 - i}", "model": "m", "input": {}, "base_url": "", "created_at": 1_000_010.0,
                 "max_attempts": 2, "status": State.CREATED},
            )  # fmt: skip
    first = store.claim("w", 30)
    store.expire_leases(time.time() + 60)  # back in the queue, at its old place (the front)
    assert store.get(first.id).status is State.CREATED
    claimed = 0
    while True:
        queued = [j for j in store.history(page=1, page_size=100, status="created")[0]]
        if not queued:
            break
        positions = {store.queue_position(j): j.id for j in queued}
        assert sorted(positions) == list(range(len(queued)))
        assert store.claim("w", 30).id == positions[0]
        claimed += 1
    assert claimed == 35


def all_pages(store: SqliteJobStore, between=lambda: None, **filters) -> list[str]:
    """Every page read with the cursor from the page before, `between` run between pages."""
    seen: list[str] = []
    cursor = None
    while True:
        jobs, _ = store.history(page=1, page_size=7, cursor=cursor, **filters)
        seen += [j.id for j in jobs]
        if len(jobs) < 7:
            return seen
        cursor = (jobs[-1].created_at, jobs[-1].id)
        between()


@pytest.mark.parametrize(
    "filters",
    [
        {},
        {"status": "created"},
        {"status": "cancelled"},
        {"created_after": 1_000_010.0, "created_before": 1_000_080.0},
    ],
    ids=repr,
)
def test_history_pages_miss_and_repeat_nothing_while_jobs_arrive(tmp_path, filters):
    store = SqliteJobStore(tmp_path / "jobs.sqlite3")
    fill(store, 40, 60)
    for j in store.history(page=1, page_size=100, status="created")[0][::3]:
        store.cancel(j.id)
    expected, total = store.history(page=1, page_size=1000, **filters)
    assert len(expected) == total > 7
    # The brute-force answer: newest first, the filters applied by hand.
    everything = store.history(page=1, page_size=1000)[0]
    lo, hi = filters.get("created_after", 0.0), filters.get("created_before", float("inf"))
    by_hand = [
        j.id for j in everything
        if lo <= j.created_at <= hi and filters.get("status", j.status.value) == j.status.value
    ]  # fmt: skip
    assert [j.id for j in expected] == by_hand

    arrivals = iter(range(1000))
    got = all_pages(store, lambda: store.create(new(f"new{next(arrivals)}")), **filters)
    assert got == by_hand  # in order, each once, none of the jobs that arrived meanwhile

    # Page numbers: the same rows, page by page, within a fixed window.
    numbered = []
    for page in range(1, total // 7 + 2):
        numbered += [j.id for j in store.history(page=page, page_size=7, **filters, **(
            {} if "created_before" in filters else {"created_before": 1_000_099.0}))[0]]  # fmt: skip
    assert numbered == by_hand
    assert store.history(page=total // 7 + 5, page_size=7, **filters)[0] == []


def test_nonblocking_calls_do_not_wait_for_a_lock(tmp_path):
    store = SqliteJobStore(tmp_path / "jobs.sqlite3")
    store.create(new("a"))
    store._drop()  # a connection in exclusive locking mode needs the file to itself
    locker = sqlite3.connect(store.path, isolation_level=None, check_same_thread=False)
    locker.execute("PRAGMA locking_mode = EXCLUSIVE")
    locker.execute("BEGIN EXCLUSIVE")
    locker.execute("UPDATE jobs SET progress = 0.5")
    try:
        t = time.monotonic()
        with pytest.raises(StoreBusy), store.nonblocking():
            store.get("a")
        assert time.monotonic() - t < 1.0
    finally:
        # Released after a while from another thread: a call outside the mode waits for it.
        threading.Timer(0.3, lambda: (locker.execute("COMMIT"), locker.close())).start()
    t = time.monotonic()
    assert store.get("a").progress == 0.5
    assert time.monotonic() - t >= 0.2
    with store.nonblocking():
        assert store.get("a").id == "a"
