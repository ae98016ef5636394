"""The PostgreSQL schema as a history of versions, recorded in the `schema_version` table.

    1  the first PostgreSQL release: the schema SQLite reached at its version 6 (jobs with
       available_at and outputs_expired_at, workers, the webhook outbox with claims, settings,
       locks) and its indexes; JSON columns are JSONB, times double precision. The counts of
       jobs per status are kept as SQLite's migration 5 keeps them, by triggers, but written
       without a lock (FOLD_COUNTS below says how).

`migrate` runs at every store open. A database not at CURRENT is migrated in one transaction
that first takes `pg_advisory_xact_lock(_LOCK_KEY)` and then reads the version again: of several
processes starting together (API replicas, workers on other machines), one migrates and the
others, let in once it commits, find the work done. The lock is released by the commit or the
rollback, so a process killed mid-migration leaves neither a lock nor half a schema (PostgreSQL's
DDL is transactional). A database newer than this code is refused: an older server could corrupt
what a newer one wrote.
"""

from __future__ import annotations

import logging
from typing import Any

from psycopg.rows import scalar_row

log = logging.getLogger("wan_vace.store")

CURRENT = 1
# pg_advisory_xact_lock's key for migrations: a constant of this application ("wanvace" in ASCII).
_LOCK_KEY = 0x77616E76616365

# The counts of jobs per status. A single row per status, updated by every status change, would
# make every claim, submit and completion in the cluster wait for the one before it to commit
# (they all change the `created` or `processing` row), and two transactions changing them in
# opposite orders (a claim: created -> processing; a re-queue: processing -> created) deadlock,
# one of them aborted by the server after a second. So a status change only appends its +1/-1 to
# job_count_changes, which takes no lock that anyone waits for, and the counts are job_counts plus
# those changes (the job_status_counts view). The store folds the changes into job_counts now and
# then (FOLD_COUNTS, one statement, so a reader sees the counts either before or after it, never
# half): the changes table stays small (at most about a hundred rows a process, plus a second's
# changes), and reading the counts stays reading a few rows.
FOLD_COUNTS = (
    "WITH moved AS (DELETE FROM job_count_changes RETURNING status, n)"
    " INSERT INTO job_counts (status, n) SELECT status, sum(n) FROM moved GROUP BY status ORDER BY status"
    " ON CONFLICT (status) DO UPDATE SET n = job_counts.n + excluded.n"
)

_V1 = (
    """CREATE TABLE jobs (
        id TEXT PRIMARY KEY,
        model TEXT NOT NULL,
        status TEXT NOT NULL,
        input JSONB NOT NULL,
        base_url TEXT NOT NULL DEFAULT '',
        created_at DOUBLE PRECISION NOT NULL,
        started_at DOUBLE PRECISION,
        finished_at DOUBLE PRECISION,
        outputs JSONB NOT NULL DEFAULT '[]',
        has_nsfw JSONB NOT NULL DEFAULT '[]',
        error TEXT NOT NULL DEFAULT '',
        code INTEGER NOT NULL DEFAULT 0,
        attempts INTEGER NOT NULL DEFAULT 0,
        max_attempts INTEGER NOT NULL DEFAULT 1,
        lease_owner TEXT,
        lease_expires DOUBLE PRECISION,
        progress DOUBLE PRECISION NOT NULL DEFAULT 0,
        inference_ms BIGINT,
        seed BIGINT,
        extra JSONB NOT NULL DEFAULT '{}',
        webhook_url TEXT,
        idempotency_key TEXT UNIQUE,
        request_hash TEXT,
        available_at DOUBLE PRECISION,
        outputs_expired_at DOUBLE PRECISION
    )""",
    # The queue in claim order, and only the queue (partial: a job leaves it when claimed): the
    # claim reads its first entries, a queue position counts a range of it.
    "CREATE INDEX jobs_queued ON jobs (created_at, id) WHERE status = 'created'",
    # History under a status filter, and history, newest first (both read backwards).
    "CREATE INDEX jobs_order ON jobs (status, created_at, id)",
    "CREATE INDEX jobs_created ON jobs (created_at, id)",
    # Lease sweeps: running jobs whose lease ran out.
    "CREATE INDEX jobs_lease ON jobs (lease_expires) WHERE status = 'processing'",
    # Retention: finished jobs whose files are still kept, oldest first (partial: the rows whose
    # files are gone drop out of it); finished rows to prune, and /metrics' recent timings.
    "CREATE INDEX jobs_expiry ON jobs (finished_at) WHERE outputs_expired_at IS NULL",
    "CREATE INDEX jobs_finished ON jobs (finished_at)",
    """CREATE TABLE workers (
        id TEXT PRIMARY KEY,
        host TEXT NOT NULL,
        pid INTEGER NOT NULL,
        model TEXT NOT NULL,
        state TEXT NOT NULL,
        reason TEXT NOT NULL DEFAULT '',
        info JSONB NOT NULL DEFAULT '{}',
        heartbeat_at DOUBLE PRECISION NOT NULL,
        started_at DOUBLE PRECISION NOT NULL
    )""",
    """CREATE TABLE webhook_outbox (
        event_id TEXT PRIMARY KEY,
        job_id TEXT NOT NULL,
        url TEXT NOT NULL,
        status TEXT NOT NULL DEFAULT '',
        body TEXT,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at DOUBLE PRECISION NOT NULL,
        delivered_at DOUBLE PRECISION,
        gave_up_at DOUBLE PRECISION,
        last_error TEXT NOT NULL DEFAULT '',
        claim_token TEXT,
        claim_expires DOUBLE PRECISION,
        last_status INTEGER
    )""",
    # Only pending rows are scanned for delivery, in due order: a partial index holds just them.
    (
        "CREATE INDEX outbox_due ON webhook_outbox (next_attempt_at, event_id)"
        " WHERE delivered_at IS NULL AND gave_up_at IS NULL"
    ),
    # A job's outbox rows (retention: a job is deleted only once its webhooks are settled).
    "CREATE INDEX outbox_job ON webhook_outbox (job_id)",
    "CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE locks (name TEXT PRIMARY KEY, owner TEXT NOT NULL, expires DOUBLE PRECISION NOT NULL)",
    # Kept counts (FOLD_COUNTS above says why in two tables).
    "CREATE TABLE job_counts (status TEXT PRIMARY KEY, n BIGINT NOT NULL)",
    "CREATE TABLE job_count_changes (status TEXT NOT NULL, n INTEGER NOT NULL)",
    # Rows come and go all the time: vacuumed by the number of dead rows, not a share of a table
    # that is nearly empty.
    "ALTER TABLE job_count_changes SET (autovacuum_vacuum_scale_factor = 0, autovacuum_vacuum_threshold = 1000)",
    """CREATE VIEW job_status_counts AS
        SELECT status, sum(n)::bigint AS n FROM (
            SELECT status, n FROM job_counts UNION ALL SELECT status, n FROM job_count_changes
        ) AS kept GROUP BY status""",
    """CREATE FUNCTION wan_vace_count_jobs() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP = 'INSERT' THEN
            INSERT INTO job_count_changes (status, n) VALUES (NEW.status, 1);
        ELSIF TG_OP = 'DELETE' THEN
            INSERT INTO job_count_changes (status, n) VALUES (OLD.status, -1);
        ELSE
            INSERT INTO job_count_changes (status, n) VALUES (OLD.status, -1), (NEW.status, 1);
        END IF;
        RETURN NULL;
    END $$""",
    (
        "CREATE TRIGGER job_counts_insert_delete AFTER INSERT OR DELETE ON jobs"
        " FOR EACH ROW EXECUTE FUNCTION wan_vace_count_jobs()"
    ),
    # Only a change of status: the lease renewals every running job makes each second fire nothing.
    (
        "CREATE TRIGGER job_counts_update AFTER UPDATE OF status ON jobs FOR EACH ROW"
        " WHEN (OLD.status IS DISTINCT FROM NEW.status) EXECUTE FUNCTION wan_vace_count_jobs()"
    ),
)

_STEPS: dict[int, tuple[str, ...]] = {1: _V1}
assert sorted(_STEPS) == list(range(1, CURRENT + 1))


def _check_not_newer(found: int, where: str) -> None:
    if found > CURRENT:
        raise RuntimeError(
            f"the job store {where} has schema version {found}, newer than version {CURRENT} that this "
            "server knows; run the release that wrote it (or a newer one), not this one"
        )


def version(conn: Any) -> int:
    """The schema version of the database on `conn` (0: none yet), read in the schema that
    `conn`'s tables are created in (the first of its search_path)."""
    cur = conn.cursor(row_factory=scalar_row)  # whatever row factory the connection has
    # pg_class is read with this statement's snapshot, so another process's migration that
    # committed is seen (to_regclass() would go by this session's catalogue cache instead).
    found = cur.execute(
        "SELECT count(*) FROM pg_class WHERE relname = 'schema_version'"
        " AND relnamespace = (SELECT oid FROM pg_namespace WHERE nspname = current_schema())"
    ).fetchone()
    if not found:
        return 0
    return int(cur.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone() or 0)


def migrate(conn: Any, where: str) -> int:
    """Bring the database on psycopg connection `conn` (in autocommit mode) to CURRENT; returns
    the version found. `where` names the database in messages (never its password)."""
    found = version(conn)
    _check_not_newer(found, where)
    if found == CURRENT:
        return found  # the common case takes no lock
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
        # Read again under the lock: in READ COMMITTED each statement sees what committed
        # before it began, so a migration another process finished while we waited is seen.
        found = version(conn)
        _check_not_newer(found, where)
        if found < CURRENT:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY,"
                " applied_at DOUBLE PRECISION NOT NULL DEFAULT extract(epoch FROM now()))"
            )
            for step in range(found + 1, CURRENT + 1):
                for statement in _STEPS[step]:
                    conn.execute(statement)
                conn.execute("INSERT INTO schema_version (version) VALUES (%s)", (step,))
    if found != CURRENT:
        log.info("job store %s: schema version %d -> %d", where, found, CURRENT)
    return found
