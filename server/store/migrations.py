"""The SQLite schema as a history of versions, numbered in `PRAGMA user_version`.

    1  the first release (8d9fe02): jobs, workers, the webhook outbox with each event's body,
       settings.
    2  jobs.available_at: a job re-queued after a transient failure waits until then.
    3  webhook_outbox.status (the terminal status an event announces) and an optional body: new
       rows record only the event, and the dispatcher builds the body from the job row when it
       delivers. Rows written before keep their body and are delivered with it, so an event
       half-delivered by an older release is still deliverable, with the bytes it was signed with.
    4  webhook_outbox.claim_token and claim_expires: each delivery is claimed on its own, and only
       the claim's holder records its result; last_status: the receiver's last HTTP answer (a
       410 that ended a delivery shows there). Added as NULLs: no row is under a claim yet.
    5  queries that do not grow with the table: jobs_order (status, created_at, id) serves the
       claim, queue positions (an index-only range count) and history by status; jobs_created
       (created_at, id) serves history; jobs_queue, a prefix of jobs_order, is dropped (an
       index, no data). job_counts holds the number of jobs in each status, kept by triggers on
       jobs (insert, status change, delete), so /health, the queue cap and history totals read
       a few rows instead of counting the table; the step fills it from the rows there.
    6  retention: jobs.outputs_expired_at (when a finished job's files were deleted; NULL on
       every existing row, so they are all candidates), the indexes retention reads by
       (jobs_expiry for files still kept, jobs_finished for rows to prune, outbox_job for a
       job's outbox rows), and the `locks` table (one cleanup pass at a time across processes).

Releases before versioning left user_version at 0 with their tables in place; every step
inspects the columns it changes, so running all steps on such a database brings it up from
whichever of them it is, and running a step twice changes nothing. Nothing is ever dropped
that has not been copied first.

`migrate` runs at every store open, in one `BEGIN IMMEDIATE` transaction that re-reads the
version after taking the write lock: of two processes opening an old database at once, one
migrates and the other finds the work done. A database newer than this code is refused, since
an older server could corrupt what a newer one wrote.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable

log = logging.getLogger("wan_vace.store")

CURRENT = 6

# Version 1 exactly as 8d9fe02 wrote it. IF NOT EXISTS also fills in the tables that a crash in
# the middle of that release's (non-transactional) schema script could have left missing.
_V1 = """
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
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL)
"""

_V3_OUTBOX = """
CREATE TABLE webhook_outbox_v3 (
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
INSERT INTO webhook_outbox_v3 (event_id, job_id, url, status, body, attempts, next_attempt_at,
                               delivered_at, gave_up_at, last_error)
    SELECT event_id, job_id, url, substr(event_id, length(job_id) + 2), body, attempts,
           next_attempt_at, delivered_at, gave_up_at, last_error
    FROM webhook_outbox;
DROP TABLE webhook_outbox;
ALTER TABLE webhook_outbox_v3 RENAME TO webhook_outbox;
CREATE INDEX outbox_due ON webhook_outbox (delivered_at, gave_up_at, next_attempt_at)
"""


def _run(c: sqlite3.Connection, script: str) -> None:
    # Not executescript(): it commits the open transaction first.
    for statement in script.split(";"):
        if statement.strip():
            c.execute(statement)


def _columns(c: sqlite3.Connection, table: str) -> dict[str, bool]:
    """Column name -> NOT NULL, for an existing table ({} when there is none)."""
    return {r[1]: bool(r[3]) for r in c.execute(f"PRAGMA table_info({table})")}


def _to_v1(c: sqlite3.Connection) -> None:
    _run(c, _V1)


def _to_v2(c: sqlite3.Connection) -> None:
    if "available_at" not in _columns(c, "jobs"):
        c.execute("ALTER TABLE jobs ADD COLUMN available_at REAL")


def _to_v3(c: sqlite3.Connection) -> None:
    # SQLite cannot relax NOT NULL in place: the outbox is copied into its new shape.
    if "status" not in _columns(c, "webhook_outbox"):
        _run(c, _V3_OUTBOX)


def _to_v4(c: sqlite3.Connection) -> None:
    have = _columns(c, "webhook_outbox")
    for name, decl in (("claim_token", "TEXT"), ("claim_expires", "REAL"), ("last_status", "INTEGER")):
        if name not in have:
            c.execute(f"ALTER TABLE webhook_outbox ADD COLUMN {name} {decl}")


# --- version 5: query-speed indexes and maintained counts (begin) ---------------------------
_V5 = """
CREATE INDEX IF NOT EXISTS jobs_order ON jobs (status, created_at, id);
CREATE INDEX IF NOT EXISTS jobs_created ON jobs (created_at, id);
DROP INDEX IF EXISTS jobs_queue;
CREATE TABLE IF NOT EXISTS job_counts (status TEXT PRIMARY KEY, n INTEGER NOT NULL) WITHOUT ROWID
"""

# One statement each: a trigger body holds semicolons, which _run would split on. Every writer
# of the file (any process, any release from this one on) keeps the counts, whatever SQL it runs.
_V5_TRIGGERS = (
    """CREATE TRIGGER IF NOT EXISTS job_counts_insert AFTER INSERT ON jobs BEGIN
        INSERT INTO job_counts (status, n) VALUES (NEW.status, 1)
            ON CONFLICT (status) DO UPDATE SET n = n + 1;
    END""",
    """CREATE TRIGGER IF NOT EXISTS job_counts_update AFTER UPDATE OF status ON jobs
    WHEN OLD.status IS NOT NEW.status BEGIN
        UPDATE job_counts SET n = n - 1 WHERE status = OLD.status;
        INSERT INTO job_counts (status, n) VALUES (NEW.status, 1)
            ON CONFLICT (status) DO UPDATE SET n = n + 1;
    END""",
    """CREATE TRIGGER IF NOT EXISTS job_counts_delete AFTER DELETE ON jobs BEGIN
        UPDATE job_counts SET n = n - 1 WHERE status = OLD.status;
    END""",
)


def _to_v5(c: sqlite3.Connection) -> None:
    _run(c, _V5)
    for trigger in _V5_TRIGGERS:
        c.execute(trigger)
    # Counted again from the rows (inside the migration's write lock, so nothing moves
    # meanwhile); rows that reached 0 stay, so running the step twice changes nothing.
    c.execute("UPDATE job_counts SET n = 0")
    c.execute(
        "INSERT INTO job_counts (status, n) SELECT status, COUNT(*) FROM jobs WHERE true GROUP BY status"
        " ON CONFLICT (status) DO UPDATE SET n = excluded.n"
    )


# --- version 5 (end) -------------------------------------------------------------------------


_V6 = """
CREATE INDEX IF NOT EXISTS jobs_expiry ON jobs (outputs_expired_at, finished_at);
CREATE INDEX IF NOT EXISTS jobs_finished ON jobs (finished_at);
CREATE INDEX IF NOT EXISTS outbox_job ON webhook_outbox (job_id);
CREATE TABLE IF NOT EXISTS locks (name TEXT PRIMARY KEY, owner TEXT NOT NULL, expires REAL NOT NULL)
"""


def _to_v6(c: sqlite3.Connection) -> None:
    if "outputs_expired_at" not in _columns(c, "jobs"):
        c.execute("ALTER TABLE jobs ADD COLUMN outputs_expired_at REAL")
    _run(c, _V6)


_STEPS: dict[int, Callable[[sqlite3.Connection], None]] = {
    1: _to_v1, 2: _to_v2, 3: _to_v3, 4: _to_v4, 5: _to_v5, 6: _to_v6,
}  # fmt: skip
assert sorted(_STEPS) == list(range(1, CURRENT + 1))


def version(c: sqlite3.Connection) -> int:
    return c.execute("PRAGMA user_version").fetchone()[0]


def _check_not_newer(found: int, path: str) -> None:
    if found > CURRENT:
        raise RuntimeError(
            f"the job store {path} has schema version {found}, newer than version {CURRENT} that "
            "this server knows; run the release that wrote it (or a newer one), not this one"
        )


def migrate(c: sqlite3.Connection, path: str) -> int:
    """Bring the database on autocommit connection `c` to CURRENT. Returns the version found."""
    found = version(c)
    _check_not_newer(found, path)
    if found == CURRENT:
        return found  # the common case takes no write lock
    c.execute("BEGIN IMMEDIATE")
    try:
        found = version(c)  # another process may have migrated while we waited for the lock
        _check_not_newer(found, path)
        if found == 0:
            log.info("job store %s: %s", path, _unversioned(c))
        for step in range(found + 1, CURRENT + 1):
            _STEPS[step](c)
        if found < CURRENT:
            c.execute(f"PRAGMA user_version = {CURRENT}")
    except BaseException:
        c.execute("ROLLBACK")
        raise
    c.execute("COMMIT")
    if found != CURRENT:
        log.info("job store %s: schema version %d -> %d", path, found, CURRENT)
    return found


def _unversioned(c: sqlite3.Connection) -> str:
    """What an unversioned database holds, for the log."""
    cols = _columns(c, "jobs")
    if not cols:
        return "empty"
    return "a release before versioning, schema " + ("2" if "available_at" in cols else "1")
