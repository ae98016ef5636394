"""The embedded job store: one SQLite file in WAL mode.

The rules live in `server.store.base`; this module only says them in SQL. WAL lets the API
process read while a worker process writes. Every write transaction is a short `BEGIN
IMMEDIATE` (one writer at a time, no lock-upgrade deadlocks), so the store is safe to share
between threads and processes. The schema and its migrations, run at open, are in
server/store/migrations.py.

Connections: one per thread, opened on first use and kept (recreated when it breaks). A kept
connection keeps the -wal and -shm files open, so reads (polls, /health) go on working on a full
disk, where SQLite could not create those files for a new connection. A call that fails because
the disk is full or failing (SQLITE_FULL, SQLITE_IOERR, SQLITE_CANTOPEN) raises
`StoreUnavailable`, which the API answers with 507 and workers retry.

Waiting for a lock: a call waits up to 30 s for another connection's lock (the busy timeout),
except inside `nonblocking()`, where it waits 10 ms and raises `StoreBusy`. In WAL mode a read
waits only on a lock that shuts readers out (a connection in exclusive locking mode, a recovery
after a crash), which is rare, but the API's event loop must not be the one that waits: it reads
in nonblocking mode and hands a busy call to its thread pool.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Any

from server.kernel.jobstate import State
from server.store import Job, JobTiming, StoreBusy, StoreUnavailable, WebhookDelivery, WorkerInfo
from server.store.base import TransactionalJobStore
from server.store.migrations import migrate

_JSON_COLUMNS = {"input", "outputs", "has_nsfw", "extra"}

# The claim order; queue positions count in the same order (both read the jobs_order index).
_QUEUED = "status = 'created'"
_CLAIM_ORDER = "ORDER BY created_at, id"
# History, newest first: the claim order reversed, so one index (jobs_created, or jobs_order
# under a status filter) serves the order, the page boundary and the seek.
_NEWEST_FIRST = "ORDER BY created_at DESC, id DESC"
# An outbox row still to deliver (neither delivered nor given up).
_PENDING = "delivered_at IS NULL AND gave_up_at IS NULL"
# Retention: a finished job, and one with no webhook still to deliver (read by outbox_job).
_TERMINAL = "status IN ('completed', 'failed', 'cancelled')"
_SETTLED = (
    "NOT EXISTS (SELECT 1 FROM webhook_outbox o WHERE o.job_id = jobs.id"
    " AND o.delivered_at IS NULL AND o.gave_up_at IS NULL)"
)


log = logging.getLogger("wan_vace.store")

# Primary result codes (the low byte of an extended code) that mean the disk is full or failing,
# not that the call was wrong: the same call succeeds once space is freed.
_SQLITE_IOERR, _SQLITE_FULL, _SQLITE_CANTOPEN = 10, 13, 14
# ... and that another connection holds a lock this call waited for in vain.
_SQLITE_BUSY, _SQLITE_LOCKED = 5, 6

# How long a call waits for a lock, in ms: normally, and in nonblocking mode.
_BUSY_MS, _NOWAIT_MS = 30_000, 10


def _unavailable(e: sqlite3.Error) -> StoreUnavailable | None:
    """The StoreUnavailable an SQLite error stands for, or None for any other error."""
    code = getattr(e, "sqlite_errorcode", None)
    primary = code & 0xFF if isinstance(code, int) else None
    text = str(e).lower()
    if primary == _SQLITE_FULL or "database or disk is full" in text:
        return StoreUnavailable(f"the job store's disk is full ({e})")
    if primary in (_SQLITE_IOERR, _SQLITE_CANTOPEN) or "disk i/o error" in text or "unable to open" in text:
        return StoreUnavailable(f"the job store cannot write to its disk, which may be full ({e})")
    return None


def _row_to_job(row: sqlite3.Row) -> Job:
    d = dict(row)
    for k in _JSON_COLUMNS:
        d[k] = json.loads(d[k])
    d["status"] = State(d["status"])
    return Job(**d)


def _encode(values: dict[str, Any]) -> dict[str, Any]:
    return {
        k: json.dumps(v) if k in _JSON_COLUMNS else v.value if isinstance(v, Enum) else v
        for k, v in values.items()
    }


class SqliteJobStore(TransactionalJobStore[sqlite3.Connection]):
    def __init__(self, path: str | Path):
        self.path = str(path)
        self._local = threading.local()
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        conn = self._connect()
        try:  # errors here are raised as they are: a store that cannot open is not transient
            conn.execute("PRAGMA journal_mode=WAL")  # not allowed inside a transaction
            migrate(conn, self.path)
        except BaseException:
            conn.close()
            raise
        # This thread's, from now on.
        self._local.conn, self._local.pid, self._local.busy_ms = conn, os.getpid(), _BUSY_MS

    def _busy_ms(self) -> int:
        """How long this thread's calls wait for a lock (its mode)."""
        return _NOWAIT_MS if getattr(self._local, "nowait", False) else _BUSY_MS

    def _connect(self) -> sqlite3.Connection:
        # Opening reads the schema, which may wait for a lock already.
        conn = sqlite3.connect(self.path, timeout=self._busy_ms() / 1000, isolation_level=None)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn

    @contextmanager
    def nonblocking(self) -> Iterator[None]:
        local = self._local
        before, local.nowait = getattr(local, "nowait", False), True
        try:
            yield
        finally:
            local.nowait = before

    def _conn(self) -> sqlite3.Connection:
        """This thread's connection, opened on first use (again in a forked child, or once the
        kept one was closed), waiting for locks as long as the mode asks."""
        local = self._local
        busy_ms = self._busy_ms()
        conn = getattr(local, "conn", None)
        if conn is not None:
            try:
                conn.total_changes  # noqa: B018 - raises on a closed connection
            except sqlite3.ProgrammingError:
                conn = None
        if conn is None or local.pid != os.getpid():
            conn = self._connect()
            local.conn, local.pid, local.busy_ms = conn, os.getpid(), busy_ms
        elif local.busy_ms != busy_ms:  # a thread keeps to one mode, so this is rare
            conn.execute(f"PRAGMA busy_timeout = {busy_ms}")
            local.busy_ms = busy_ms
        return conn

    def _drop(self) -> None:
        """Forget this thread's connection (the next call opens a new one)."""
        conn, self._local.conn = getattr(self._local, "conn", None), None
        if conn is not None:
            try:
                conn.close()
            except sqlite3.Error:
                pass

    def _recover(self, conn: sqlite3.Connection) -> None:
        """After a failed call: end what is left of its transaction; a connection that cannot
        even do that, or answer a trivial query, is broken and replaced."""
        try:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            conn.execute("SELECT 1").fetchone()
        except sqlite3.Error:
            log.warning("job store %s: connection broken; a new one is opened", self.path)
            self._drop()

    @contextmanager
    def _session(self) -> Iterator[sqlite3.Connection]:
        try:
            conn = self._conn()
        except sqlite3.Error as e:
            self._drop()
            self._raise_if_unavailable(e)
            self._raise_if_busy(e)
            raise
        try:
            yield conn
        except sqlite3.Error as e:
            self._recover(conn)
            self._raise_if_unavailable(e)
            self._raise_if_busy(e)
            raise
        except BaseException:
            self._recover(conn)
            raise

    def _raise_if_unavailable(self, e: sqlite3.Error) -> None:
        """Raise StoreUnavailable (remembered for /health) if `e` means a full or failing disk."""
        unavailable = _unavailable(e)
        if unavailable is not None:
            self.write_error = unavailable
            raise unavailable from e

    def _raise_if_busy(self, e: sqlite3.Error) -> None:
        """In nonblocking mode, raise StoreBusy if `e` is a lock the call gave up waiting for."""
        code = getattr(e, "sqlite_errorcode", None)
        busy = isinstance(code, int) and code & 0xFF in (_SQLITE_BUSY, _SQLITE_LOCKED)
        if busy and getattr(self._local, "nowait", False):
            raise StoreBusy(f"the job store {self.path} is locked ({e})") from e

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._session() as conn:
            before = conn.total_changes
            conn.execute("BEGIN IMMEDIATE")
            yield conn  # an error rolls back (the session's recovery)
            conn.execute("COMMIT")  # a failed commit too
            wrote = conn.total_changes > before
        if wrote:  # the disk takes writes again (a transaction that changed nothing proves nothing)
            self.write_error = None

    # Job rows --------------------------------------------------------------------------------
    def _fetch_job(self, c: sqlite3.Connection, job_id: str) -> Job | None:
        row = c.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _row_to_job(row) if row else None

    def _fetch_by_idempotency_key(self, c: sqlite3.Connection, key: str) -> Job | None:
        row = c.execute("SELECT * FROM jobs WHERE idempotency_key = ?", (key,)).fetchone()
        return _row_to_job(row) if row else None

    def _fetch_next_claimable(self, c: sqlite3.Connection, now: float) -> Job | None:
        # BEGIN IMMEDIATE already excludes other claimers: no row lock needed.
        row = c.execute(
            f"SELECT * FROM jobs WHERE {_QUEUED} AND (available_at IS NULL OR available_at <= ?)"
            f" {_CLAIM_ORDER} LIMIT 1",
            (now,),
        ).fetchone()
        return _row_to_job(row) if row else None

    def _fetch_leased(
        self, c: sqlite3.Connection, *, expired_before: float | None = None, owner: str | None = None
    ) -> list[Job]:
        where, params = ["status = 'processing'"], []
        if expired_before is not None:
            where.append("lease_expires < ?")
            params.append(expired_before)
        if owner is not None:
            where.append("lease_owner = ?")
            params.append(owner)
        rows = c.execute(f"SELECT * FROM jobs WHERE {' AND '.join(where)}", params).fetchall()
        return [_row_to_job(r) for r in rows]

    def _count_queued(self, c: sqlite3.Connection, *, ahead_of: Job | None = None) -> int:
        if ahead_of is None:
            row = c.execute("SELECT n FROM job_counts WHERE status = 'created'").fetchone()
            return row[0] if row else 0
        # A range of the covering index jobs_order, counted without reading a row: about 50 ns
        # a job ahead (0.6 ms at 10,000; the queue cap bounds it). The row value keeps SQLite
        # to one range, where the spelled-out OR is planned as two.
        return c.execute(
            f"SELECT COUNT(*) FROM jobs WHERE {_QUEUED} AND (created_at, id) < (?, ?)",
            (ahead_of.created_at, ahead_of.id),
        ).fetchone()[0]

    def _insert_job(self, c: sqlite3.Connection, values: dict[str, Any]) -> None:
        row = _encode(values)
        c.execute(
            f"INSERT INTO jobs ({', '.join(row)}) VALUES ({', '.join('?' for _ in row)})",
            list(row.values()),
        )

    def _update_job_if(
        self, c: sqlite3.Connection, job_id: str, status: State, owner: str | None, values: dict[str, Any]
    ) -> bool:
        row = _encode(values)
        where, params = "id = ? AND status = ?", [*row.values(), job_id, status.value]
        if owner is not None:
            where += " AND lease_owner = ?"
            params.append(owner)
        sets = ", ".join(f"{k} = ?" for k in row)
        return c.execute(f"UPDATE jobs SET {sets} WHERE {where}", params).rowcount == 1

    def _extend_lease(
        self, c: sqlite3.Connection, job_id: str, owner: str, expires: float, progress: float | None
    ) -> bool:
        sets, params = "lease_expires = ?", [expires]
        if progress is not None:
            sets += ", progress = MAX(progress, ?)"
            params.append(progress)
        cur = c.execute(
            f"UPDATE jobs SET {sets} WHERE id = ? AND status = 'processing' AND lease_owner = ?",
            [*params, job_id, owner],
        )
        return cur.rowcount == 1

    # Webhook outbox --------------------------------------------------------------------------
    def _insert_outbox_if_absent(
        self,
        c: sqlite3.Connection,
        *,
        event_id: str,
        job_id: str,
        url: str,
        status: State,
        next_attempt_at: float,
    ) -> None:
        c.execute(
            "INSERT OR IGNORE INTO webhook_outbox (event_id, job_id, url, status, next_attempt_at)"
            " VALUES (?, ?, ?, ?, ?)",
            (event_id, job_id, url, status.value, next_attempt_at),
        )

    def _due_outbox(self, c: sqlite3.Connection, now: float) -> Iterator[WebhookDelivery]:
        # BEGIN IMMEDIATE already excludes other claimers: no row lock needed.
        cur = c.execute(
            "SELECT event_id, job_id, url, status, body, attempts, next_attempt_at, last_status"
            f" FROM webhook_outbox WHERE {_PENDING} AND next_attempt_at <= ?"
            " AND (claim_expires IS NULL OR claim_expires <= ?) ORDER BY next_attempt_at, event_id",
            (now, now),
        )
        try:
            for r in cur:
                yield WebhookDelivery(**dict(r))
        finally:
            cur.close()

    def _claim_outbox_row(
        self, c: sqlite3.Connection, event_id: str, token: str, until: float, *, holder: str | None = None
    ) -> bool:
        where, params = f"event_id = ? AND {_PENDING}", [token, until, until, event_id]
        if holder is not None:
            where += " AND claim_token = ?"
            params.append(holder)
        cur = c.execute(
            "UPDATE webhook_outbox SET claim_token = ?, claim_expires = ?, next_attempt_at = ?"
            f" WHERE {where}",
            params,
        )
        return cur.rowcount == 1

    def _update_outbox_if_claimed(
        self, c: sqlite3.Connection, event_id: str, token: str, values: dict[str, Any]
    ) -> bool:
        sets = ", ".join(f"{k} = ?" for k in values)
        cur = c.execute(
            f"UPDATE webhook_outbox SET attempts = attempts + 1, claim_token = NULL, claim_expires = NULL,"
            f" {sets} WHERE event_id = ? AND claim_token = ? AND {_PENDING}",
            [*values.values(), event_id, token],
        )
        return cur.rowcount == 1

    # Retention -------------------------------------------------------------------------------
    def _fetch_finished(
        self,
        c: sqlite3.Connection,
        *,
        before: float,
        limit: int,
        unexpired: bool = False,
        settled: bool = False,
    ) -> list[Job]:
        # Pinned to the index for the range on finished_at: left alone, the planner may pick an
        # index on status and sort every finished job of the history.
        index = "jobs_expiry" if unexpired else "jobs_finished"
        where = [_TERMINAL, "finished_at < ?"]
        if unexpired:
            where.append("outputs_expired_at IS NULL")
        if settled:
            where.append(_SETTLED)
        rows = c.execute(
            f"SELECT * FROM jobs INDEXED BY {index} WHERE {' AND '.join(where)} ORDER BY finished_at LIMIT ?",
            (before, limit),
        ).fetchall()
        return [_row_to_job(r) for r in rows]

    def _set_outputs_expired(self, c: sqlite3.Connection, job_ids: list[str], at: float) -> int:
        marks = ", ".join("?" for _ in job_ids)
        return c.execute(
            f"UPDATE jobs SET outputs_expired_at = ? WHERE id IN ({marks}) AND {_TERMINAL}"
            " AND outputs_expired_at IS NULL",
            [at, *job_ids],
        ).rowcount

    def _delete_finished(self, c: sqlite3.Connection, job_ids: list[str], before: float) -> int:
        marks = ", ".join("?" for _ in job_ids)
        deleted = c.execute(
            f"DELETE FROM jobs WHERE id IN ({marks}) AND {_TERMINAL} AND finished_at < ? AND {_SETTLED}",
            [*job_ids, before],
        ).rowcount
        c.execute(
            f"DELETE FROM webhook_outbox WHERE job_id IN ({marks})"
            " AND NOT EXISTS (SELECT 1 FROM jobs WHERE jobs.id = webhook_outbox.job_id)",
            job_ids,
        )
        return deleted

    def _take_lock(self, c: sqlite3.Connection, name: str, owner: str, until: float, now: float) -> bool:
        # An upsert whose update is skipped by its WHERE changes no row: someone else holds it.
        cur = c.execute(
            "INSERT INTO locks (name, owner, expires) VALUES (?, ?, ?) ON CONFLICT(name) DO UPDATE"
            " SET owner = excluded.owner, expires = excluded.expires"
            " WHERE locks.owner = excluded.owner OR locks.expires <= ?",
            (name, owner, until, now),
        )
        return cur.rowcount == 1

    def _drop_lock(self, c: sqlite3.Connection, name: str, owner: str) -> None:
        c.execute("DELETE FROM locks WHERE name = ? AND owner = ?", (name, owner))

    # Plain queries ---------------------------------------------------------------------------
    def count_by_status(self) -> dict[str, int]:
        # The counts the triggers keep (migration 5): a few rows, whatever the history holds.
        with self._session() as c:
            rows = c.execute("SELECT status, n FROM job_counts WHERE n > 0").fetchall()
        return {r["status"]: r["n"] for r in rows}

    def finished_timings(self, since: float, limit: int) -> list[JobTiming]:
        # Only finished jobs have a finished_at, so the range alone selects them; a condition on
        # status here could tempt the planner onto a status index and a scan of the history.
        with self._session() as c:
            rows = c.execute(
                "SELECT status, created_at, started_at, finished_at, inference_ms,"
                " json_extract(input, '$.num_inference_steps') AS steps FROM jobs"
                " WHERE finished_at >= ? ORDER BY finished_at DESC LIMIT ?",
                (since, limit),
            ).fetchall()
        return [JobTiming(**dict(r)) for r in rows]

    def history(
        self,
        *,
        page: int,
        page_size: int,
        status: str | None = None,
        created_after: float | None = None,
        created_before: float | None = None,
        cursor: tuple[float, str] | None = None,
    ) -> tuple[list[Job], int]:
        where, params = [], []
        if status:
            where.append("status = ?")
            params.append(status)
        if created_after is not None:
            where.append("created_at >= ?")
            params.append(created_after)
        if created_before is not None:
            where.append("created_at <= ?")
            params.append(created_before)
        clause = " AND ".join(where) or "true"
        with self._session() as c:
            c.execute("BEGIN")  # one snapshot for the total, the boundary and the page
            if created_after is None and created_before is None:
                total = self._counted(c, status)
            else:  # a window: counted over the index range (jobs_created or jobs_order), no row read
                total = c.execute(f"SELECT COUNT(*) FROM jobs WHERE {clause}", params).fetchone()[0]
            seek: tuple[str, list[Any]] | None = ("", [])
            if cursor is not None:
                seek = (" AND (created_at, id) < (?, ?)", list(cursor))
            elif page > 1:
                # Page N's first row, found by stepping over the index entries before it (no row
                # is read), then the page is read by seeking to it.
                first = c.execute(
                    f"SELECT created_at, id FROM jobs WHERE {clause} {_NEWEST_FIRST} LIMIT 1 OFFSET ?",
                    [*params, (page - 1) * page_size],
                ).fetchone()
                seek = None if first is None else (" AND (created_at, id) <= (?, ?)", list(first))
            rows = []
            if seek is not None:
                rows = c.execute(
                    f"SELECT * FROM jobs WHERE {clause}{seek[0]} {_NEWEST_FIRST} LIMIT ?",
                    [*params, *seek[1], page_size],
                ).fetchall()
            c.execute("COMMIT")
        return [_row_to_job(r) for r in rows], total

    def _counted(self, c: sqlite3.Connection, status: str | None) -> int:
        if status:
            row = c.execute("SELECT n FROM job_counts WHERE status = ?", (status,)).fetchone()
        else:
            row = c.execute("SELECT SUM(n) FROM job_counts").fetchone()
        return (row[0] if row else 0) or 0

    def upsert_worker(self, worker: WorkerInfo) -> None:
        with self._session() as c:
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
        with self._session() as c:
            rows = c.execute("SELECT * FROM workers ORDER BY started_at").fetchall()
        out = []
        for r in rows:
            d = dict(r)
            d["info"] = json.loads(d["info"])
            out.append(WorkerInfo(**d))
        return out

    def get_setting(self, key: str) -> str | None:
        with self._session() as c:
            row = c.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
        return row["value"] if row else None

    def set_setting_if_absent(self, key: str, value: str) -> str:
        with self._transaction() as c:
            c.execute("INSERT OR IGNORE INTO settings (key, value) VALUES (?, ?)", (key, value))
            return c.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()["value"]
