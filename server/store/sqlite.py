"""The embedded job store: one SQLite file in WAL mode.

The rules live in `server.store.base`; this module only says them in SQL. WAL lets the API
process read while a worker process writes. Every write transaction is a short `BEGIN
IMMEDIATE` (one writer at a time, no lock-upgrade deadlocks) on a fresh connection, so the
store is safe to share between threads and processes. The schema and its migrations, run at
open, are in server/store/migrations.py.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Any

from server.kernel.jobstate import State
from server.store import Job, WebhookDelivery, WorkerInfo
from server.store.base import TransactionalJobStore
from server.store.migrations import migrate

_JSON_COLUMNS = {"input", "outputs", "has_nsfw", "extra"}

# The claim order; queue positions count in the same order.
_QUEUED = "status = 'created'"
_CLAIM_ORDER = "ORDER BY created_at, id"


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
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        with self._session() as c:
            c.execute("PRAGMA journal_mode=WAL")  # not allowed inside a transaction
            migrate(c, self.path)

    @contextmanager
    def _session(self) -> Iterator[sqlite3.Connection]:
        conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA busy_timeout=30000")
        conn.execute("PRAGMA synchronous=NORMAL")
        try:
            yield conn
        finally:
            conn.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._session() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

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
            return c.execute(f"SELECT COUNT(*) FROM jobs WHERE {_QUEUED}").fetchone()[0]
        return c.execute(
            f"SELECT COUNT(*) FROM jobs WHERE {_QUEUED}"
            " AND (created_at < ? OR (created_at = ? AND id < ?))",
            (ahead_of.created_at, ahead_of.created_at, ahead_of.id),
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

    def _claim_outbox(
        self, c: sqlite3.Connection, now: float, limit: int, until: float
    ) -> list[WebhookDelivery]:
        rows = c.execute(
            "SELECT event_id, job_id, url, status, body, attempts, next_attempt_at FROM webhook_outbox"
            " WHERE delivered_at IS NULL AND gave_up_at IS NULL AND next_attempt_at <= ?"
            " ORDER BY next_attempt_at LIMIT ?",
            (now, limit),
        ).fetchall()
        for r in rows:
            c.execute("UPDATE webhook_outbox SET next_attempt_at = ? WHERE event_id = ?", (until, r["event_id"]))
        return [WebhookDelivery(**dict(r)) for r in rows]

    def _update_outbox(self, c: sqlite3.Connection, event_id: str, values: dict[str, Any]) -> None:
        sets = ", ".join(f"{k} = ?" for k in values)
        c.execute(
            f"UPDATE webhook_outbox SET attempts = attempts + 1, {sets} WHERE event_id = ?",
            [*values.values(), event_id],
        )

    # Plain queries ---------------------------------------------------------------------------
    def count_by_status(self) -> dict[str, int]:
        with self._session() as c:
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
        with self._session() as c:
            total = c.execute(f"SELECT COUNT(*) FROM jobs WHERE {clause}", params).fetchone()[0]
            rows = c.execute(
                f"SELECT * FROM jobs WHERE {clause} ORDER BY created_at DESC, id LIMIT ? OFFSET ?",
                params + [page_size, (page - 1) * page_size],
            ).fetchall()
        return [_row_to_job(r) for r in rows], total

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
