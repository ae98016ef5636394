"""The embedded job store: one SQLite file in WAL mode.

WAL lets the API process read while a worker process writes. Every write runs in a short
`BEGIN IMMEDIATE` transaction (one writer at a time, no upgrade deadlocks) on a fresh
connection, so the store is safe to share between threads and processes.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from server.kernel.jobstate import TERMINAL, Event, State, allowed, next_state
from server.store import (
    IdempotencyConflict,
    Job,
    JobStore,
    NewJob,
    QueueFull,
    RenewResult,
    WebhookDelivery,
    WorkerInfo,
)

_SCHEMA = """
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

_JSON_COLUMNS = {"input", "outputs", "has_nsfw", "extra"}


def _row_to_job(row: sqlite3.Row) -> Job:
    d = dict(row)
    for k in _JSON_COLUMNS:
        d[k] = json.loads(d[k])
    d["status"] = State(d["status"])
    return Job(**d)


class SqliteJobStore(JobStore):
    def __init__(self, path: str | Path):
        self.path = str(path)
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        with self._conn() as c:
            c.execute("PRAGMA journal_mode=WAL")
            c.executescript(_SCHEMA)
        # Terminal events need a callback to fill the outbox in the same transaction; the
        # webhook payload is built by the server (it knows the public URL), so it is injected.
        self.webhook_payload: Any = None

    @contextmanager
    def _conn(self) -> Iterator[sqlite3.Connection]:
        conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA busy_timeout=30000")
        conn.execute("PRAGMA synchronous=NORMAL")
        try:
            yield conn
        finally:
            conn.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._conn() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    # Transitions ---------------------------------------------------------------------------
    def _transition(
        self,
        conn: sqlite3.Connection,
        job: Job,
        event: Event,
        *,
        owner: str | None = None,
        **values: Any,
    ) -> State | None:
        """Compare-and-set one legal transition; writes `values` with it. Returns the new state
        or None when the job moved on meanwhile (or `owner` no longer holds the lease)."""
        if not allowed(job.status, event):
            return None
        new = next_state(job.status, event, attempts=job.attempts, max_attempts=job.max_attempts)
        if new is not State.PROCESSING:
            values.setdefault("lease_owner", None)
            values.setdefault("lease_expires", None)
        if new in TERMINAL:
            values.setdefault("finished_at", time.time())
        values["status"] = new.value
        cols = ", ".join(f"{k} = ?" for k in values)
        params: list[Any] = [json.dumps(v) if k in _JSON_COLUMNS else v for k, v in values.items()]
        where = "id = ? AND status = ?"
        params += [job.id, job.status.value]
        if owner is not None:
            where += " AND lease_owner = ?"
            params.append(owner)
        cur = conn.execute(f"UPDATE jobs SET {cols} WHERE {where}", params)
        if cur.rowcount != 1:
            return None
        if new in (State.COMPLETED, State.FAILED):
            self._enqueue_webhook(conn, job.id)
        return new

    def _enqueue_webhook(self, conn: sqlite3.Connection, job_id: str) -> None:
        job = self._get(conn, job_id)
        if job is None or not job.webhook_url or self.webhook_payload is None:
            return
        body = json.dumps(self.webhook_payload(job), separators=(",", ":"))
        event_id = f"{job.id}-{job.status.value}"
        # One delivery per event id, whatever retries or replicas do.
        conn.execute(
            "INSERT OR IGNORE INTO webhook_outbox (event_id, job_id, url, body, next_attempt_at)"
            " VALUES (?, ?, ?, ?, ?)",
            (event_id, job.id, job.webhook_url, body, time.time()),
        )

    def _get(self, conn: sqlite3.Connection, job_id: str) -> Job | None:
        row = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _row_to_job(row) if row else None

    # Jobs ----------------------------------------------------------------------------------
    def create(self, job: NewJob, *, max_queue: int | None = None) -> tuple[Job, bool]:
        with self._tx() as c:
            if job.idempotency_key:
                row = c.execute(
                    "SELECT * FROM jobs WHERE idempotency_key = ?", (job.idempotency_key,)
                ).fetchone()
                if row:
                    existing = _row_to_job(row)
                    if existing.request_hash != job.request_hash:
                        raise IdempotencyConflict(job.idempotency_key)
                    return existing, False
            if max_queue is not None:
                depth = c.execute("SELECT COUNT(*) FROM jobs WHERE status = 'created'").fetchone()[0]
                if depth >= max_queue:
                    raise QueueFull(depth)
            c.execute(
                "INSERT INTO jobs (id, model, status, input, base_url, created_at, max_attempts,"
                " webhook_url, idempotency_key, request_hash) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (
                    job.id,
                    job.model,
                    State.CREATED.value,
                    json.dumps(job.input),
                    job.base_url,
                    time.time(),
                    job.max_attempts,
                    job.webhook_url,
                    job.idempotency_key,
                    job.request_hash,
                ),
            )
            created = self._get(c, job.id)
        assert created is not None
        return created, True

    def get(self, job_id: str) -> Job | None:
        with self._conn() as c:
            return self._get(c, job_id)

    def claim(self, worker_id: str, lease_seconds: float) -> Job | None:
        with self._tx() as c:
            row = c.execute(
                "SELECT * FROM jobs WHERE status = 'created'"
                " AND (available_at IS NULL OR available_at <= ?) ORDER BY created_at, id LIMIT 1",
                (time.time(),),
            ).fetchone()
            if row is None:
                return None
            job = _row_to_job(row)
            now = time.time()
            new = self._transition(
                c,
                job,
                Event.CLAIM,
                lease_owner=worker_id,
                lease_expires=now + lease_seconds,
                attempts=job.attempts + 1,
                started_at=now,
                progress=0.0,
            )
            return self._get(c, job.id) if new else None

    def renew(
        self, job_id: str, worker_id: str, lease_seconds: float, progress: float | None = None
    ) -> str:
        sets = "lease_expires = ?"
        params: list[Any] = [time.time() + lease_seconds]
        if progress is not None:
            sets += ", progress = MAX(progress, ?)"
            params.append(float(progress))
        with self._conn() as c:
            cur = c.execute(
                f"UPDATE jobs SET {sets} WHERE id = ? AND status = 'processing' AND lease_owner = ?",
                params + [job_id, worker_id],
            )
            if cur.rowcount == 1:
                return RenewResult.OK
            row = c.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row and row["status"] == State.CANCELLED.value:
            return RenewResult.CANCELLED
        return RenewResult.LOST

    def complete(
        self,
        job_id: str,
        worker_id: str,
        *,
        outputs: list[str],
        has_nsfw: list[bool],
        inference_ms: int,
        seed: int | None,
        extra: dict[str, Any],
    ) -> bool:
        with self._tx() as c:
            job = self._get(c, job_id)
            if job is None:
                return False
            new = self._transition(
                c,
                job,
                Event.COMPLETE,
                owner=worker_id,
                outputs=outputs,
                has_nsfw=has_nsfw,
                inference_ms=inference_ms,
                seed=seed,
                extra=extra,
                progress=1.0,
                error="",
                code=0,
            )
            return new is State.COMPLETED

    def fail(
        self,
        job_id: str,
        worker_id: str | None,
        *,
        code: int,
        error: str,
        retryable: bool = False,
        seed: int | None = None,
        retry_delay: float = 0.0,
    ) -> State | None:
        with self._tx() as c:
            job = self._get(c, job_id)
            if job is None:
                return None
            extra = {"seed": seed} if seed is not None else {}
            if retryable and job.status is State.PROCESSING:
                # Same path as a lost lease: re-queue while attempts remain, after a pause that
                # gives a briefly unavailable media host time to recover.
                return self._transition(
                    c,
                    job,
                    Event.LEASE_LOST,
                    owner=worker_id,
                    error=error,
                    code=code,
                    available_at=time.time() + retry_delay * job.attempts,
                    **extra,
                )
            return self._transition(c, job, Event.FAIL, owner=worker_id, error=error, code=code, **extra)

    def cancel(self, job_id: str) -> tuple[Job | None, bool]:
        with self._tx() as c:
            job = self._get(c, job_id)
            if job is None:
                return None, False
            new = self._transition(c, job, Event.CANCEL, error="Cancelled by request.", code=0)
            return self._get(c, job_id), new is not None

    def _lose_leases(self, where: str, params: tuple[Any, ...], reason: str) -> list[str]:
        ids = []
        with self._tx() as c:
            rows = c.execute(f"SELECT * FROM jobs WHERE status = 'processing' AND {where}", params).fetchall()
            for row in rows:
                job = _row_to_job(row)
                if job.attempts >= job.max_attempts:  # the state machine fails it
                    msg = (
                        f"{reason} while running this job (attempt {job.attempts} of "
                        f"{job.max_attempts}); it was not retried again."
                    )
                    code = 5000
                else:  # re-queued: it keeps its history but is not an error (yet)
                    msg, code = f"{reason}; the job was queued again.", 0
                new = self._transition(c, job, Event.LEASE_LOST, owner=job.lease_owner, error=msg, code=code)
                if new is not None:
                    ids.append(job.id)
        return ids

    def expire_leases(self, now: float | None = None) -> list[str]:
        return self._lose_leases(
            "lease_expires < ?", (now or time.time(),), "The worker stopped renewing its lease"
        )

    def release_worker(self, worker_id: str, reason: str) -> list[str]:
        return self._lose_leases("lease_owner = ?", (worker_id,), reason)

    def queue_depth(self) -> int:
        with self._conn() as c:
            return c.execute("SELECT COUNT(*) FROM jobs WHERE status = 'created'").fetchone()[0]

    def queue_position(self, job: Job) -> int:
        # The claim order: created_at, then id.
        with self._conn() as c:
            return c.execute(
                "SELECT COUNT(*) FROM jobs WHERE status = 'created'"
                " AND (created_at < ? OR (created_at = ? AND id < ?))",
                (job.created_at, job.created_at, job.id),
            ).fetchone()[0]

    def count_by_status(self) -> dict[str, int]:
        with self._conn() as c:
            rows = c.execute("SELECT status, COUNT(*) AS n FROM jobs GROUP BY status").fetchall()
        return {r["status"]: r["n"] for r in rows}

    def history(
        self,
        *,
        page: int,
        page_size: int,
        status: str | None = None,
        created_after: float | None = None,
        created_before: float | None = None,
    ) -> tuple[list[Job], int]:
        where, params = ["1=1"], []
        if status:
            where.append("status = ?")
            params.append(status)
        if created_after is not None:
            where.append("created_at >= ?")
            params.append(created_after)
        if created_before is not None:
            where.append("created_at <= ?")
            params.append(created_before)
        clause = " AND ".join(where)
        with self._conn() as c:
            total = c.execute(f"SELECT COUNT(*) FROM jobs WHERE {clause}", params).fetchone()[0]
            rows = c.execute(
                f"SELECT * FROM jobs WHERE {clause} ORDER BY created_at DESC, id LIMIT ? OFFSET ?",
                params + [page_size, (page - 1) * page_size],
            ).fetchall()
        return [_row_to_job(r) for r in rows], total

    # Workers -------------------------------------------------------------------------------
    def upsert_worker(self, worker: WorkerInfo) -> None:
        with self._conn() as c:
            c.execute(
                "INSERT INTO workers (id, host, pid, model, state, reason, info, heartbeat_at, started_at)"
                " VALUES (?,?,?,?,?,?,?,?,?) ON CONFLICT(id) DO UPDATE SET state=excluded.state,"
                " reason=excluded.reason, info=excluded.info, heartbeat_at=excluded.heartbeat_at,"
                " model=excluded.model",
                (
                    worker.id,
                    worker.host,
                    worker.pid,
                    worker.model,
                    worker.state,
                    worker.reason,
                    json.dumps(worker.info),
                    worker.heartbeat_at or time.time(),
                    worker.started_at or time.time(),
                ),
            )

    def workers(self) -> list[WorkerInfo]:
        with self._conn() as c:
            rows = c.execute("SELECT * FROM workers ORDER BY started_at").fetchall()
        out = []
        for r in rows:
            d = dict(r)
            d["info"] = json.loads(d["info"])
            out.append(WorkerInfo(**d))
        return out

    # Webhook outbox --------------------------------------------------------------------------
    def due_webhooks(self, now: float, limit: int = 20, lease_seconds: float = 30.0) -> list[WebhookDelivery]:
        """Due deliveries, each claimed for `lease_seconds` (its next attempt time is moved on)
        so two dispatchers never post the same event at once."""
        with self._tx() as c:
            rows = c.execute(
                "SELECT event_id, job_id, url, body, attempts, next_attempt_at FROM webhook_outbox"
                " WHERE delivered_at IS NULL AND gave_up_at IS NULL AND next_attempt_at <= ?"
                " ORDER BY next_attempt_at LIMIT ?",
                (now, limit),
            ).fetchall()
            for r in rows:
                c.execute(
                    "UPDATE webhook_outbox SET next_attempt_at = ? WHERE event_id = ?",
                    (now + lease_seconds, r["event_id"]),
                )
        return [WebhookDelivery(**dict(r)) for r in rows]

    def webhook_attempted(
        self, event_id: str, *, delivered: bool, error: str, next_attempt_at: float | None
    ) -> None:
        now = time.time()
        with self._conn() as c:
            if delivered:
                c.execute(
                    "UPDATE webhook_outbox SET attempts = attempts + 1, delivered_at = ?, last_error = ''"
                    " WHERE event_id = ?",
                    (now, event_id),
                )
            elif next_attempt_at is None:
                c.execute(
                    "UPDATE webhook_outbox SET attempts = attempts + 1, gave_up_at = ?, last_error = ?"
                    " WHERE event_id = ?",
                    (now, error, event_id),
                )
            else:
                c.execute(
                    "UPDATE webhook_outbox SET attempts = attempts + 1, next_attempt_at = ?, last_error = ?"
                    " WHERE event_id = ?",
                    (next_attempt_at, error, event_id),
                )

    def get_setting(self, key: str) -> str | None:
        with self._conn() as c:
            row = c.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
        return row["value"] if row else None

    def set_setting_if_absent(self, key: str, value: str) -> str:
        with self._tx() as c:
            c.execute("INSERT OR IGNORE INTO settings (key, value) VALUES (?, ?)", (key, value))
            return c.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()["value"]
