"""The SQLite schema history: databases written by earlier releases open with today's store,
keep every row, and go on working. The old schemas are copied here as literal SQL, exactly as
those releases created them, so that a later change to the migrations cannot quietly rewrite
the past they must handle."""

from __future__ import annotations

import dataclasses
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from server.kernel.jobstate import State
from server.store import Job, NewJob, migrations
from server.store.sqlite import SqliteJobStore

ROOT = Path(__file__).resolve().parents[2]  # the repository

# server/store/sqlite.py at 8d9fe02, the first release (schema version 1).
DDL_8D9FE02 = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    status TEXT NOT NULL,
    input TEXT NOT NULL,
    base_url TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    outputs TEXT NOT NULL DEFAULT '[]',
    has_nsfw TEXT NOT NULL DEFAULT '[]',
    error TEXT NOT NULL DEFAULT '',
    code INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    max_attempts INTEGER NOT NULL DEFAULT 1,
    lease_owner TEXT,
    lease_expires REAL,
    progress REAL NOT NULL DEFAULT 0,
    inference_ms INTEGER,
    seed INTEGER,
    extra TEXT NOT NULL DEFAULT '{}',
    webhook_url TEXT,
    idempotency_key TEXT UNIQUE,
    request_hash TEXT
);
CREATE INDEX IF NOT EXISTS jobs_queue ON jobs (status, created_at);
CREATE INDEX IF NOT EXISTS jobs_lease ON jobs (status, lease_expires);
CREATE TABLE IF NOT EXISTS workers (
    id TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    model TEXT NOT NULL,
    state TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    info TEXT NOT NULL DEFAULT '{}',
    heartbeat_at REAL NOT NULL,
    started_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS webhook_outbox (
    event_id TEXT PRIMARY KEY,
    job_id TEXT NOT NULL,
    url TEXT NOT NULL,
    body TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    delivered_at REAL,
    gave_up_at REAL,
    last_error TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS outbox_due ON webhook_outbox (delivered_at, gave_up_at, next_attempt_at);
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

# server/store/sqlite.py at d6e3e80, the last release before versioning (schema version 2):
# it adds jobs.available_at, but, like 8d9fe02, leaves user_version at 0.
DDL_UNVERSIONED = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    status TEXT NOT NULL,
    input TEXT NOT NULL,
    base_url TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    outputs TEXT NOT NULL DEFAULT '[]',
    has_nsfw TEXT NOT NULL DEFAULT '[]',
    error TEXT NOT NULL DEFAULT '',
    code INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    max_attempts INTEGER NOT NULL DEFAULT 1,
    lease_owner TEXT,
    lease_expires REAL,
    progress REAL NOT NULL DEFAULT 0,
    inference_ms INTEGER,
    seed INTEGER,
    extra TEXT NOT NULL DEFAULT '{}',
    webhook_url TEXT,
    idempotency_key TEXT UNIQUE,
    request_hash TEXT,
    -- A job re-queued after a transient failure waits until then (NULL: claimable now).
    available_at REAL
);
CREATE INDEX IF NOT EXISTS jobs_queue ON jobs (status, created_at);
CREATE INDEX IF NOT EXISTS jobs_lease ON jobs (status, lease_expires);
CREATE TABLE IF NOT EXISTS workers (
    id TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    model TEXT NOT NULL,
    state TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    info TEXT NOT NULL DEFAULT '{}',
    heartbeat_at REAL NOT NULL,
    started_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS webhook_outbox (
    event_id TEXT PRIMARY KEY,
    job_id TEXT NOT NULL,
    url TEXT NOT NULL,
    body TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    delivered_at REAL,
    gave_up_at REAL,
    last_error TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS outbox_due ON webhook_outbox (delivered_at, gave_up_at, next_attempt_at);
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

# Rows as those releases wrote them: each statement is one the old store issued (create, claim,
# complete or fail, the outbox insert, a failed and a successful delivery attempt).
ROWS = """
INSERT INTO jobs (id, model, status, input, base_url, created_at, max_attempts, webhook_url,
                  idempotency_key, request_hash)
VALUES ('done', 'm', 'created', '{"prompt": "done"}', 'http://old', 1700000000.0, 2,
        'http://hook/done', 'key-done', 'hash-done');
UPDATE jobs SET lease_owner = 'w-old', lease_expires = 1700000031.0, attempts = 1,
                started_at = 1700000001.0, progress = 0.0, status = 'processing'
WHERE id = 'done' AND status = 'created';
UPDATE jobs SET outputs = '["outputs/done/0.mp4"]', has_nsfw = '[false]', inference_ms = 1234,
                seed = 42, extra = '{"render_size": [64, 64]}', progress = 1.0, error = '', code = 0,
                lease_owner = NULL, lease_expires = NULL, finished_at = 1700000002.0,
                status = 'completed'
WHERE id = 'done' AND status = 'processing' AND lease_owner = 'w-old';
INSERT OR IGNORE INTO webhook_outbox (event_id, job_id, url, body, next_attempt_at)
VALUES ('done-completed', 'done', 'http://hook/done', '{"id":"done","status":"completed"}',
        1700000002.0);
UPDATE webhook_outbox SET attempts = attempts + 1, next_attempt_at = 1700000003.0,
                          last_error = 'receiver answered 500'
WHERE event_id = 'done-completed';

INSERT INTO jobs (id, model, status, input, base_url, created_at, max_attempts, webhook_url,
                  idempotency_key, request_hash)
VALUES ('broken', 'm', 'created', '{"prompt": "broken"}', 'http://old', 1700000000.2, 1,
        'http://hook/broken', NULL, NULL);
UPDATE jobs SET error = 'bad input', code = 1401, lease_owner = NULL, lease_expires = NULL,
                finished_at = 1700000000.3, status = 'failed'
WHERE id = 'broken' AND status = 'created';
INSERT OR IGNORE INTO webhook_outbox (event_id, job_id, url, body, next_attempt_at)
VALUES ('broken-failed', 'broken', 'http://hook/broken', '{"id":"broken"}', 1700000000.3);
UPDATE webhook_outbox SET attempts = attempts + 1, delivered_at = 1700000000.4, last_error = ''
WHERE event_id = 'broken-failed';

INSERT INTO jobs (id, model, status, input, base_url, created_at, max_attempts, webhook_url,
                  idempotency_key, request_hash)
VALUES ('queued', 'm', 'created', '{"prompt": "queued"}', 'http://old', 1700000000.5, 2,
        'http://hook/queued', 'key-queued', 'hash-queued');

INSERT INTO workers (id, host, pid, model, state, reason, info, heartbeat_at, started_at)
VALUES ('w-old', 'host', 7, 'm', 'stopped', '', '{}', 1700000002.5, 1699999999.0);
INSERT OR IGNORE INTO settings (key, value) VALUES ('webhook_secret', 'whsec_old');
"""

DONE = Job(
    id="done",
    model="m",
    status=State.COMPLETED,
    input={"prompt": "done"},
    created_at=1700000000.0,
    base_url="http://old",
    started_at=1700000001.0,
    finished_at=1700000002.0,
    outputs=["outputs/done/0.mp4"],
    has_nsfw=[False],
    error="",
    code=0,
    attempts=1,
    max_attempts=2,
    lease_owner=None,
    lease_expires=None,
    progress=1.0,
    inference_ms=1234,
    seed=42,
    extra={"render_size": [64, 64]},
    webhook_url="http://hook/done",
    idempotency_key="key-done",
    request_hash="hash-done",
    available_at=None,
)

OLD_RELEASES = {"8d9fe02": DDL_8D9FE02, "unversioned": DDL_UNVERSIONED}

# Schema version 3 (a29a1e6, the last release before per-delivery webhook claims): version 2's
# tables with the outbox copied into this shape by migration step 3, user_version 3.
_V2_OUTBOX = DDL_UNVERSIONED[DDL_UNVERSIONED.index("CREATE TABLE IF NOT EXISTS webhook_outbox") :]
_V2_OUTBOX = _V2_OUTBOX[: _V2_OUTBOX.index("CREATE TABLE IF NOT EXISTS settings")]
DDL_V3 = DDL_UNVERSIONED.replace(_V2_OUTBOX, """
CREATE TABLE "webhook_outbox" (
    event_id TEXT PRIMARY KEY,
    job_id TEXT NOT NULL,
    url TEXT NOT NULL,
    -- The default serves an older server still running against this file: it writes a body
    -- and no status, and the dispatcher delivers a row with a body as it stands.
    status TEXT NOT NULL DEFAULT '',
    -- Only on rows written before version 3: newer bodies are built when delivered.
    body TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    delivered_at REAL,
    gave_up_at REAL,
    last_error TEXT NOT NULL DEFAULT ''
);
CREATE INDEX outbox_due ON webhook_outbox (delivered_at, gave_up_at, next_attempt_at);
""") + "PRAGMA user_version = 3;"

# Outbox rows as version 3 wrote them: one failed once, one delivered, and one a version 3
# dispatcher holds right now (its claim moved the next attempt to the claim's end, here far off).
ROWS_V3 = """
INSERT OR IGNORE INTO webhook_outbox (event_id, job_id, url, status, next_attempt_at)
VALUES ('done-completed', 'done', 'http://hook/done', 'completed', 1700000002.0),
       ('broken-failed', 'broken', 'http://hook/broken', 'failed', 1700000000.3),
       ('held-failed', 'held', 'http://hook/held', 'failed', 1700000000.6);
UPDATE webhook_outbox SET attempts = attempts + 1, next_attempt_at = 1700000003.0,
                          last_error = 'receiver answered 500'
WHERE event_id = 'done-completed';
UPDATE webhook_outbox SET attempts = attempts + 1, delivered_at = 1700000000.4, last_error = ''
WHERE event_id = 'broken-failed';
UPDATE webhook_outbox SET next_attempt_at = 4102444800.0 WHERE event_id = 'held-failed';
"""


def write_old(path: Path, ddl: str) -> Path:
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript(ddl)  # the old store's own call
    db.executescript(ROWS)
    db.close()
    return path


@pytest.fixture(params=list(OLD_RELEASES))
def old_db(request, tmp_path) -> Path:
    return write_old(tmp_path / "jobs.sqlite3", OLD_RELEASES[request.param])


def user_version(path: Path) -> int:
    return sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0]


def snapshot(path: Path) -> tuple:
    """Version, schema and every row: equal snapshots mean an open changed nothing."""
    db = sqlite3.connect(path)
    schema = db.execute("SELECT type, name, sql FROM sqlite_master ORDER BY type, name").fetchall()
    tables = [n for t, n, _ in schema if t == "table"]
    rows = {t: db.execute(f"SELECT * FROM {t} ORDER BY 1").fetchall() for t in tables}
    return user_version(path), schema, rows


def shape(path: Path) -> dict:
    """Each table's columns (name, type, not null, default, primary key) and its indexes."""
    db = sqlite3.connect(path)
    tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    return {
        t: (
            [r[1:] for r in db.execute(f"PRAGMA table_info({t})")],
            sorted(r[1] for r in db.execute(f"PRAGMA index_list({t})")),
        )
        for t in tables
    }


def test_old_database_is_brought_up_and_keeps_working(old_db):
    store = SqliteJobStore(old_db)
    assert user_version(old_db) == migrations.CURRENT

    assert store.get("done") == DONE  # every field as the old release wrote it
    assert store.get("broken").status is State.FAILED and store.get("broken").code == 1401
    assert store.get_setting("webhook_secret") == "whsec_old"
    assert [(w.id, w.state) for w in store.workers()] == [("w-old", "stopped")]

    job = store.claim("w", 30)
    assert job.id == "queued" and job.status is State.PROCESSING and job.attempts == 1
    assert job.input == {"prompt": "queued"} and job.idempotency_key == "key-queued"
    assert store.complete("queued", "w", outputs=["k"], has_nsfw=[False], inference_ms=5, seed=1, extra={})
    assert store.get("queued").status is State.COMPLETED
    assert store.claim("w", 30) is None

    # The event the old release left undelivered is still delivered, with the body it was
    # signed with; the delivered one is not replayed; the new one carries no body.
    due = {d.event_id: d for d in store.due_webhooks(time.time() + 1)}
    assert sorted(due) == ["done-completed", "queued-completed"]
    old = due["done-completed"]
    assert (old.job_id, old.url, old.status, old.attempts) == ("done", "http://hook/done", "completed", 1)
    assert old.body == '{"id":"done","status":"completed"}'
    assert due["queued-completed"].body is None and due["queued-completed"].status == "completed"
    claim = due["done-completed"].claim
    assert store.webhook_attempted(
        "done-completed", claim=claim, delivered=True, error="", next_attempt_at=None
    )

    before = snapshot(old_db)
    SqliteJobStore(old_db)  # opening again is a no-op
    assert snapshot(old_db) == before
    assert store.get("done") == DONE


def test_an_old_database_ends_in_the_shape_of_a_new_one(old_db, tmp_path):
    SqliteJobStore(old_db)
    fresh = SqliteJobStore(tmp_path / "fresh.sqlite3")
    assert shape(old_db) == shape(Path(fresh.path))
    assert user_version(Path(fresh.path)) == migrations.CURRENT
    columns = [c[0] for c in shape(old_db)["jobs"][0]]
    assert sorted(columns) == sorted(f.name for f in dataclasses.fields(Job))


def test_a_newer_database_is_refused(tmp_path):
    path = tmp_path / "jobs.sqlite3"
    SqliteJobStore(path)
    newer = migrations.CURRENT + 1
    sqlite3.connect(path).execute(f"PRAGMA user_version = {newer}")
    before = snapshot(path)
    with pytest.raises(RuntimeError, match=f"version {newer}.*version {migrations.CURRENT}"):
        SqliteJobStore(path)
    assert snapshot(path) == before


def test_a_failed_migration_changes_nothing(tmp_path, monkeypatch):
    path = write_old(tmp_path / "jobs.sqlite3", DDL_8D9FE02)
    before = snapshot(path)

    def broken(c):
        c.execute("ALTER TABLE webhook_outbox ADD COLUMN half_done TEXT")
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setitem(migrations._STEPS, migrations.CURRENT, broken)
    with pytest.raises(sqlite3.OperationalError, match="disk I/O"):
        SqliteJobStore(path)
    assert snapshot(path) == before
    monkeypatch.undo()
    SqliteJobStore(path)
    assert user_version(path) == migrations.CURRENT


def test_steps_are_idempotent(tmp_path):
    # A current database whose version was lost runs every step again and ends the same.
    path = tmp_path / "jobs.sqlite3"
    store = SqliteJobStore(path)
    store.create(NewJob(id="a", model="m", input={}, base_url="http://h", max_attempts=1))
    sqlite3.connect(path).execute("PRAGMA user_version = 0")
    before = snapshot(path)
    SqliteJobStore(path)
    assert snapshot(path)[1:] == before[1:] and user_version(path) == migrations.CURRENT
    assert store.get("a").status is State.CREATED


def test_processes_opening_an_old_database_at_once(tmp_path):
    path = write_old(tmp_path / "jobs.sqlite3", DDL_8D9FE02)
    start = time.time() + 3  # after every interpreter has imported the store
    code = (
        "import sys, time; from server.store.sqlite import SqliteJobStore;"
        "time.sleep(max(0.0, float(sys.argv[2]) - time.time())); SqliteJobStore(sys.argv[1])"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(path), str(start)], cwd=ROOT, stderr=subprocess.PIPE)
        for _ in range(4)
    ]
    errors = [p.communicate(timeout=60)[1].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], errors
    assert user_version(path) == migrations.CURRENT
    store = SqliteJobStore(path)
    assert store.get("done") == DONE
    assert [d.event_id for d in store.due_webhooks(time.time() + 1)] == ["done-completed"]


def test_an_older_server_writing_to_a_migrated_file_loses_no_event(tmp_path):
    # E.g. an old worker still running during an upgrade: its outbox insert names no status.
    path = tmp_path / "jobs.sqlite3"
    store = SqliteJobStore(path)
    sqlite3.connect(path, isolation_level=None).execute(
        "INSERT OR IGNORE INTO webhook_outbox (event_id, job_id, url, body, next_attempt_at)"
        " VALUES ('a-failed', 'a', 'http://hook', '{\"id\":\"a\"}', 1.0)"
    )
    [d] = store.due_webhooks(time.time())
    assert (d.event_id, d.body) == ("a-failed", '{"id":"a"}')


def test_a_version_3_outbox_gets_per_delivery_claims(tmp_path):
    path = tmp_path / "jobs.sqlite3"
    db = sqlite3.connect(path, isolation_level=None)
    db.executescript(DDL_V3)
    db.executescript(ROWS_V3)
    db.close()
    assert user_version(path) == 3
    store = SqliteJobStore(path)
    assert user_version(path) == migrations.CURRENT
    assert shape(path) == shape(Path(SqliteJobStore(tmp_path / "fresh.sqlite3").path))

    def row(event_id: str) -> tuple:
        return sqlite3.connect(path).execute(
            "SELECT attempts, delivered_at, gave_up_at, last_error, last_status, claim_token, claim_expires"
            " FROM webhook_outbox WHERE event_id = ?",
            (event_id,),
        ).fetchone()

    assert row("done-completed") == (1, None, None, "receiver answered 500", None, None, None)
    [d] = store.due_webhooks(time.time())  # the delivered row is not replayed
    assert (d.event_id, d.status, d.body, d.attempts) == ("done-completed", "completed", None, 1)
    assert d.last_status is None
    assert d.claim and row("done-completed")[5] == d.claim
    assert store.webhook_attempted(
        d.event_id, claim=d.claim, delivered=False, error="receiver answered 410", next_attempt_at=None,
        status_code=410,
    )  # fmt: skip
    attempts, _, gave_up, error, status, token, expires = row("done-completed")
    assert (attempts, error, status, token, expires) == (2, "receiver answered 410", 410, None, None)
    assert gave_up is not None
    # The row a version 3 dispatcher had claimed stays its own until that claim's end.
    assert store.due_webhooks(4102444800.0 - 1) == []
    assert [d.event_id for d in store.due_webhooks(4102444800.0)] == ["held-failed"]


def test_version_5_counts_the_jobs_already_there_and_keeps_counting(old_db):
    store = SqliteJobStore(old_db)
    rows = dict(sqlite3.connect(old_db).execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall())
    assert rows and store.count_by_status() == rows
    assert store.queue_depth() == rows.get("created", 0) > 0
    store.claim("w", 30)
    after = {**rows, "created": rows["created"] - 1, "processing": rows.get("processing", 0) + 1}
    assert store.count_by_status() == {k: n for k, n in after.items() if n}
    indexes = {r[1] for r in sqlite3.connect(old_db).execute("PRAGMA index_list(jobs)")}
    assert {"jobs_order", "jobs_created"} <= indexes and "jobs_queue" not in indexes
