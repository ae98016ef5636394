"""The shared job store: PostgreSQL, for API replicas and workers on many machines.

The rules live in `server.store.base`; this module only says them in SQL, as sqlite.py does.
What differs from SQLite, and why the rules still hold:

- Concurrency. SQLite has one writer at a time (`BEGIN IMMEDIATE`); here write transactions run
  side by side under READ COMMITTED, where each statement sees what committed before it began.
  No table is locked: every state change is the base's compare-and-set on the status (and lease
  owner), whose row count says whether it won, and a write transaction reads the rows it acts on
  with a row lock (`_fetch_job`, `_fetch_leased`: FOR UPDATE), so the values it writes (attempts
  + 1, the lease, the outbox row) come from the row as it stands and no other writer changes it
  until the commit. A writer that waited for such a lock reads the row again once it is free
  (PostgreSQL re-checks the WHERE on the newest version), so a job that moved on meanwhile is
  left out, as the compare-and-set would leave it. The next job to claim, and the due webhook
  rows, are read FOR UPDATE SKIP LOCKED: concurrent claimers each take a different job and never
  wait for one another. Locks on several jobs are taken in id order, so two sweeps cannot
  deadlock; kept counts take no lock at all (server/store/pg_schema.py says how).
- Reads never wait for writers (MVCC), but each is a network round trip, and in an outage it
  waits for a connection until the pool's timeout; so `nonblocking()` sends every call off the
  event loop at once (StoreBusy: the API hands the call to its thread pool).
- Events. `create`, every re-queue and every terminal transition send `pg_notify` in their own
  transaction: delivered at commit, never for a rolled-back one, to listeners on any machine
  (`listen`): idle workers and sync-mode requests wake at once instead of at their next poll.
- Outages. Each process keeps a psycopg_pool pool. While the server cannot be reached (down,
  restarting, the network cut) a call raises `StoreUnreachable` within `timeout` seconds: the API
  answers 503, workers and the supervisor retry with backoff. The pool checks each connection
  before lending it and replaces broken ones, so once the server is back calls succeed again
  within a second or two, with no restart; a listener reconnects and listens again by itself.

Times are Unix seconds in double precision (the `Job` dataclass's floats), JSON columns JSONB.
The schema is versioned in server/store/pg_schema.py and migrated at open. Several deployments
may share one database in different schemas (a URL with `options=-csearch_path=NAME`): their
tables and their events are kept apart.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from typing import Any

import psycopg
from psycopg import errors as pg_errors
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool, PoolClosed, PoolTimeout

from server.kernel.jobstate import State
from server.store import (
    CHANNEL_FINISHED,
    CHANNEL_QUEUED,
    Events,
    IdempotencyConflict,
    Job,
    JobTiming,
    NewJob,
    StoreBusy,
    StoreUnreachable,
    WebhookDelivery,
    WorkerInfo,
)
from server.store.base import TransactionalJobStore
from server.store.pg_schema import FOLD_COUNTS, migrate

log = logging.getLogger("wan_vace.store")

_JSON_COLUMNS = {"input", "outputs", "has_nsfw", "extra"}
# The claim order; queue positions count in the same order (both read the jobs_queued index).
_QUEUED = "status = 'created'"
_CLAIM_ORDER = "ORDER BY created_at, id"
# History, newest first: the claim order reversed, so one index serves order, boundary and seek.
_NEWEST_FIRST = "ORDER BY created_at DESC, id DESC"
_PENDING = "delivered_at IS NULL AND gave_up_at IS NULL"
_TERMINAL = "status IN ('completed', 'failed', 'cancelled')"
_SETTLED = (
    "NOT EXISTS (SELECT 1 FROM webhook_outbox o WHERE o.job_id = jobs.id"
    " AND o.delivered_at IS NULL AND o.gave_up_at IS NULL)"
)
# Error codes of a server that is going away or not there yet, not of a wrong statement: class 08
# (connection exceptions), 57P01-57P03 (shut down by an administrator or a crash, cannot connect
# now: starting up).
_UNREACHABLE_STATES = ("08", "57P01", "57P02", "57P03")
# pg_advisory_xact_lock's key for a create under a queue cap ("wanvace" + 1; the migration's is
# "wanvace"), so that two submits cannot both see room for one more job.
_QUEUE_CAP_KEY = 0x77616E76616366
# How often the kept counts' changes are folded (pg_schema.FOLD_COUNTS): after this many write
# transactions of this process, or this many seconds after the last fold.
_FOLD_EVERY, _FOLD_SECONDS = 50, 1.0
_CHANNELS = (CHANNEL_QUEUED, CHANNEL_FINISHED)
_POOL_NAME = "wan-vace-store"
# How long a call waits for a connection while the server is known to be unreachable.
_OUTAGE_TIMEOUT = 1.5


def where_of(url: str) -> str:
    """host:port/dbname of a connection URL, for messages: never the user or the password."""
    try:
        d = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "(an unparsable PostgreSQL URL)"
    return f"{d.get('host') or 'localhost'}:{d.get('port') or 5432}/{d.get('dbname') or ''}"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _unreachable(e: BaseException, where: str) -> StoreUnreachable | None:
    """The StoreUnreachable a driver error stands for, or None for any other error. libpq's
    messages name the host and port, never the password."""
    if isinstance(e, PoolClosed):  # this store was closed: a bug of the caller, not an outage
        return None
    if isinstance(e, psycopg.OperationalError):
        state = getattr(e, "sqlstate", None)
        if state is None or state.startswith(_UNREACHABLE_STATES):
            return StoreUnreachable(
                f"the job store's PostgreSQL server at {where} cannot be reached: {_first_line(e)}"
            )
    if isinstance(e, psycopg.InterfaceError):  # a connection closed under us
        return StoreUnreachable(f"the job store's connection to {where} was lost: {_first_line(e)}")
    return None


class _QuietReconnects(logging.Filter):
    """psycopg_pool logs a warning at each failed reconnection attempt (about one a second per
    process while the server is down); for this store's pools the store says it once instead,
    when the outage starts (with the last attempt's reason) and when it ends."""

    def filter(self, record: logging.LogRecord) -> bool:
        name = record.args[0] if isinstance(record.args, tuple) and record.args else None
        ours = isinstance(name, str) and name.startswith(_POOL_NAME)
        retry = str(record.msg).startswith(("error connecting in", "reconnection attempt in pool"))
        return not (ours and retry)


logging.getLogger("psycopg.pool").addFilter(_QuietReconnects())


class _LastError:
    """The reason the last connection attempt of one store's pool failed ('' once one works)."""

    text = ""

    def connection_class(self) -> type[psycopg.Connection]:
        """A Connection class for the pool that records why a connect failed: PoolTimeout,
        all a caller gets from the pool, says nothing of it."""
        last = self

        class Recorded(psycopg.Connection):
            @classmethod
            def connect(cls, conninfo: str = "", **kwargs: Any) -> Recorded:
                try:
                    conn = super().connect(conninfo, **kwargs)
                except psycopg.Error as e:
                    last.text = _first_line(e)
                    raise
                last.text = ""
                return conn

        return Recorded


def _row_to_job(row: dict[str, Any]) -> Job:
    d = dict(row)
    d["status"] = State(d["status"])
    return Job(**d)


def _encode(values: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in values.items():
        if k in _JSON_COLUMNS:
            v = Jsonb(v)
        elif isinstance(v, Enum):
            v = v.value
        out[k] = v
    return out


def _channel_in(channel: str, schema: str) -> str:
    """The server-side name of a CHANNEL_* in `schema`. Events are database-wide in PostgreSQL:
    a deployment in a schema of its own (not `public`) gets channels of its own, the schema
    hashed where the name would pass PostgreSQL's 63 bytes."""
    if schema == "public":
        return channel
    name = f"{channel}.{schema}"
    if len(name.encode()) > 63:
        name = f"{channel}.{hashlib.sha256(schema.encode()).hexdigest()[:16]}"
    return name


def _in_transaction(c: psycopg.Connection) -> bool:
    return c.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS


def _connect_kwargs(url: str, connect_timeout: float) -> dict[str, Any]:
    """libpq settings added to the URL's, each only where the URL does not set it."""
    try:
        given = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        # libpq's reason quotes the URL, password and all: not repeated here.
        raise ValueError(
            "WAN_VACE_DATABASE_URL is not a PostgreSQL URL that libpq can read; the form is "
            "postgresql://USER:PASSWORD@HOST:5432/DBNAME (special characters in the password %-encoded)"
        ) from None
    defaults: dict[str, Any] = {
        "connect_timeout": max(2, round(connect_timeout)),  # libpq's floor is 2 s
        "application_name": "wan-vace",
        # A server that vanished without closing its connections (powered off, the network cut)
        # is noticed in seconds, not after the system's two hours: keepalive probes on idle
        # connections, and a limit on data sent but never acknowledged.
        "keepalives": 1,
        "keepalives_idle": 5,
        "keepalives_interval": 2,
        "keepalives_count": 3,
    }
    if psycopg.pq.version() >= 120000:  # tcp_user_timeout is libpq 12's
        defaults["tcp_user_timeout"] = 15_000
    return {k: v for k, v in defaults.items() if k not in given}


class PgEvents(Events):
    """LISTEN on a connection of its own, in autocommit mode (a pooled connection goes back to
    other callers between statements, and a notification is delivered only between them). A
    lost connection is reopened, and LISTEN said again, by the next `wait` after a short pause;
    the events sent meanwhile are missed, which listeners cover with their fallback poll."""

    def __init__(self, url: str, kwargs: dict[str, Any], channels: dict[str, str], where: str):
        self.url, self.kwargs, self.where = url, kwargs, where
        self.channels = channels  # the name on the server -> the CHANNEL_* constant
        self._conn: psycopg.Connection | None = None
        self._lock = threading.Lock()
        self._closed = self._waiting = False
        self._retry_at = 0.0
        self._connect()

    def _connect(self) -> bool:
        try:
            conn = psycopg.connect(self.url, autocommit=True, **self.kwargs)
        except psycopg.Error as e:
            log.debug("job store %s: cannot listen yet (%s)", self.where, _first_line(e))
            self._retry_at = time.monotonic() + 0.5
            return False
        try:
            for wire in self.channels:
                conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(wire)))
        except psycopg.Error as e:
            conn.close()
            log.debug("job store %s: LISTEN failed (%s)", self.where, _first_line(e))
            self._retry_at = time.monotonic() + 0.5
            return False
        self._conn = conn
        return True

    def wait(self, timeout: float) -> list[tuple[str, str]]:
        with self._lock:
            if self._closed:
                return []
            self._waiting = True
        try:
            return self._wait(timeout)
        finally:
            with self._lock:
                self._waiting = False
                if self._closed:  # closed by another thread meanwhile: the waiter closes it
                    self._drop()

    def _wait(self, timeout: float) -> list[tuple[str, str]]:
        deadline = time.monotonic() + timeout
        if self._conn is None:
            if time.monotonic() < self._retry_at or not self._connect():
                time.sleep(max(0.0, min(self._retry_at, deadline) - time.monotonic()))
                return []
            log.info("job store %s: listening for events again", self.where)
        conn = self._conn
        assert conn is not None
        try:
            left = max(0.0, deadline - time.monotonic())
            got = list(conn.notifies(timeout=left, stop_after=1))
            if got:  # and whatever else has arrived already
                got += conn.notifies(timeout=0.0)
        except psycopg.Error as e:
            if not self._closed:
                log.info("job store %s: the connection listening for events was lost (%s); reconnecting",
                         self.where, _first_line(e))  # fmt: skip
            self._drop()
            self._retry_at = time.monotonic() + 0.5
            return []
        return [(self.channels[n.channel], n.payload) for n in got if n.channel in self.channels]

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except psycopg.Error:
                pass

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if not self._waiting:  # else the waiting thread closes it when its wait ends
                self._drop()


class PostgresJobStore(TransactionalJobStore[psycopg.Connection]):
    """`url`: a libpq URL (postgresql://user:password@host:5432/dbname?...). `pool_size`: the
    connections this process keeps at most; `timeout`: how long a call waits for one (an outage
    answers StoreUnreachable after it)."""

    def __init__(self, url: str, *, pool_size: int = 8, timeout: float = 3.0):
        self.url = url
        self.where = where_of(url)
        self.timeout = timeout
        self._kwargs = _connect_kwargs(url, timeout)
        self._local = threading.local()
        self._listeners: weakref.WeakSet[PgEvents] = weakref.WeakSet()
        self._writes, self._folded_at = 0, time.monotonic()
        self._outage = False  # the server was found unreachable and no call has succeeded since
        self._last_error = _LastError()
        # Connect once by hand first: an unreachable server fails the open at once with
        # libpq's reason (refused, no such database, password), not after the pool's timeout.
        try:
            with psycopg.connect(url, autocommit=True, **self._kwargs) as c:
                migrate(c, self.where)
                schema = c.execute("SELECT current_schema()").fetchone()[0]
        except psycopg.Error as e:
            down = _unreachable(e, self.where)
            if down is None:
                raise
            raise StoreUnreachable(
                f"{down.message}; check WAN_VACE_DATABASE_URL and that the server is up"
            ) from e
        self._wire = {ch: _channel_in(ch, schema) for ch in _CHANNELS}
        self._pool = ConnectionPool(
            url,
            min_size=1,
            max_size=max(1, pool_size),
            timeout=timeout,
            # A connection broken while it sat in the pool (the server restarted) is replaced
            # before it is lent out: the first call after an outage does not fail on it.
            check=ConnectionPool.check_connection,
            # The pool retries a lost connection after a second, then gives up until the next
            # call asks again (its backoff would double the pause each time): a call made once
            # the server is back finds a connection within a second or so, well inside its
            # timeout, even after a long outage.
            reconnect_timeout=1.0,
            kwargs={"autocommit": True, "row_factory": dict_row, **self._kwargs},
            connection_class=self._last_error.connection_class(),
            open=False,
            name=_POOL_NAME,
        )
        try:
            self._pool.open(wait=True, timeout=timeout)
        except PoolTimeout as e:
            self._pool.close()
            why = f": {self._last_error.text}" if self._last_error.text else ""
            raise StoreUnreachable(
                f"the job store's PostgreSQL server at {self.where} cannot be reached{why}"
            ) from e

    def close(self) -> None:
        for events in list(self._listeners):
            events.close()
        self._pool.close()

    # Sessions and transactions ---------------------------------------------------------------
    @contextmanager
    def nonblocking(self) -> Iterator[None]:
        local = self._local
        before, local.nowait = getattr(local, "nowait", False), True
        try:
            yield
        finally:
            local.nowait = before

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection]:
        if getattr(self._local, "nowait", False):
            raise StoreBusy(f"the job store at {self.where} answers over the network: not on the event loop")
        # During an outage a call gives up sooner: every caller (an API request, a worker's
        # loop) learns it in about a second instead of each waiting out the full timeout.
        timeout = min(self.timeout, _OUTAGE_TIMEOUT) if self._outage else self.timeout
        try:
            with self._pool.connection(timeout=timeout) as c:
                yield c
        except PoolTimeout as e:
            raise self._pool_timeout(timeout) from e
        except psycopg.Error as e:
            down = _unreachable(e, self.where)
            if down is None:
                raise
            raise self._down(down) from e
        if isinstance(self.write_error, StoreUnreachable):  # reached again
            if self._outage:
                log.info("job store %s: reachable again", self.where)
            self.write_error, self._outage = None, False

    def _down(self, down: StoreUnreachable, *, outage: bool = True) -> StoreUnreachable:
        """Remember `down` for /health (until a call succeeds again), log the start of an
        outage, and return it to be raised. `outage` False: the server answers, but this
        process's connections are all busy (a load to size the pool for, not an outage)."""
        if outage and not self._outage:
            log.warning("%s", down.message)
        self.write_error = down
        self._outage = self._outage or outage
        return down

    def _pool_timeout(self, waited: float) -> StoreUnreachable:
        stats = self._pool.get_stats()
        if stats.get("pool_size", 0) >= self._pool.max_size and not stats.get("pool_available"):
            busy = StoreUnreachable(
                f"all {self._pool.max_size} connections of this process to the job store at {self.where} "
                f"stayed busy for {waited:g} s (WAN_VACE_DATABASE_POOL_SIZE)"
            )
            return self._down(busy, outage=False)
        why = f": {self._last_error.text}" if self._last_error.text else ""
        return self._down(StoreUnreachable(
            f"the job store's PostgreSQL server at {self.where} cannot be reached (no connection within "
            f"{waited:g} s){why}"
        ))  # fmt: skip

    @contextmanager
    def _session(self) -> Iterator[psycopg.Connection]:
        # Autocommit: each statement commits on its own.
        with self._connection() as c:
            yield c

    @contextmanager
    def _transaction(self) -> Iterator[psycopg.Connection]:
        # READ COMMITTED (the server's default); the module docstring says why that suffices.
        with self._connection() as c:
            with c.transaction():
                yield c
            self._after_write(c)
        self.write_error = None

    def _after_write(self, c: psycopg.Connection) -> None:
        """Fold the kept counts' changes now and then (pg_schema.FOLD_COUNTS): housekeeping
        after a commit, so a failure here is only logged."""
        self._writes += 1
        now = time.monotonic()
        if self._writes < _FOLD_EVERY and now - self._folded_at < _FOLD_SECONDS:
            return
        self._writes, self._folded_at = 0, now
        try:
            c.execute(FOLD_COUNTS)
        except psycopg.Error as e:
            log.debug(
                "job store %s: folding the job counts failed (%s); the next write retries", self.where, e
            )

    def _notify(self, c: psycopg.Connection, channel: str, payload: str) -> None:
        # Queued by the server and delivered when (and only if) this transaction commits.
        c.execute("SELECT pg_notify(%s, %s)", (self._wire[channel], payload))

    def listen(self, *channels: str) -> PgEvents:
        events = PgEvents(self.url, self._kwargs, {self._wire[ch]: ch for ch in channels}, self.where)
        self._listeners.add(events)
        return events

    def create(self, job: NewJob, *, max_queue: int | None = None) -> tuple[Job, bool]:
        # Two submits with one idempotency key at once both find no job with it; the second
        # insert waits for the first transaction, then hits the unique index. Read again, the
        # key names the first job: the answer SQLite gives (its writers take turns).
        try:
            return super().create(job, max_queue=max_queue)
        except pg_errors.UniqueViolation:
            if not job.idempotency_key:
                raise
            with self._session() as c:
                existing = self._fetch_by_idempotency_key(c, job.idempotency_key)
            if existing is None:
                raise
            if existing.request_hash != job.request_hash:
                raise IdempotencyConflict(job.idempotency_key) from None
            return existing, False

    # Job rows --------------------------------------------------------------------------------
    def _fetch_job(self, c: psycopg.Connection, job_id: str) -> Job | None:
        # In a write transaction the row is locked until it ends: the transition computed from
        # it is written before any other writer can change it (a writer already holding it is
        # waited for, and the row read as it left it). A plain read (a poll) locks nothing.
        lock = " FOR UPDATE" if _in_transaction(c) else ""
        row = c.execute(f"SELECT * FROM jobs WHERE id = %s{lock}", (job_id,)).fetchone()
        return _row_to_job(row) if row else None

    def _fetch_by_idempotency_key(self, c: psycopg.Connection, key: str) -> Job | None:
        row = c.execute("SELECT * FROM jobs WHERE idempotency_key = %s", (key,)).fetchone()
        return _row_to_job(row) if row else None

    def _fetch_next_claimable(self, c: psycopg.Connection, now: float) -> Job | None:
        # SKIP LOCKED: a job another claimer (or a cancel) holds is passed over, not waited for,
        # so claimers never queue behind one another; one that claimed it and committed has
        # moved it out of `created`, which this statement's snapshot already shows.
        row = c.execute(
            f"SELECT * FROM jobs WHERE {_QUEUED} AND (available_at IS NULL OR available_at <= %s)"
            f" {_CLAIM_ORDER} LIMIT 1 FOR UPDATE SKIP LOCKED",
            (now,),
        ).fetchone()
        return _row_to_job(row) if row else None

    def _fetch_leased(
        self, c: psycopg.Connection, *, expired_before: float | None = None, owner: str | None = None
    ) -> list[Job]:
        where, params = ["status = 'processing'"], []
        if expired_before is not None:
            where.append("lease_expires < %s")
            params.append(expired_before)
        if owner is not None:
            where.append("lease_owner = %s")
            params.append(owner)
        # Locked in id order (two sweeps at once cannot deadlock). A row another transaction
        # holds is waited for, then checked against WHERE again as that one left it: a job it
        # completed, or whose lease it renewed, is left out.
        rows = c.execute(
            f"SELECT * FROM jobs WHERE {' AND '.join(where)} ORDER BY id FOR UPDATE", params
        ).fetchall()
        return [_row_to_job(r) for r in rows]

    def _count_queued(self, c: psycopg.Connection, *, ahead_of: Job | None = None) -> int:
        if ahead_of is None:
            if _in_transaction(c):
                # create()'s queue cap. Without a turn, two submits could each count the other's
                # job as not there yet and both take the last place; creates under a cap take
                # turns (until commit, a few milliseconds), nothing else waits for it.
                c.execute("SELECT pg_advisory_xact_lock(%s)", (_QUEUE_CAP_KEY,))
            row = c.execute("SELECT n FROM job_status_counts WHERE status = 'created'").fetchone()
            return int(row["n"]) if row else 0
        # A range of jobs_queued (the row comparison is one index condition), counted in the index.
        row = c.execute(
            f"SELECT count(*) AS n FROM jobs WHERE {_QUEUED} AND (created_at, id) < (%s, %s)",
            (ahead_of.created_at, ahead_of.id),
        ).fetchone()
        return int(row["n"])

    def _insert_job(self, c: psycopg.Connection, values: dict[str, Any]) -> None:
        row = _encode(values)
        c.execute(
            f"INSERT INTO jobs ({', '.join(row)}) VALUES ({', '.join('%s' for _ in row)})",
            list(row.values()),
        )

    def _update_job_if(
        self, c: psycopg.Connection, job_id: str, status: State, owner: str | None, values: dict[str, Any]
    ) -> bool:
        # The compare-and-set: on a row another transaction is changing, the UPDATE waits and
        # then checks the WHERE against the committed row, so it writes only over the state the
        # transition was computed from.
        row = _encode(values)
        where, params = "id = %s AND status = %s", [*row.values(), job_id, status.value]
        if owner is not None:
            where += " AND lease_owner = %s"
            params.append(owner)
        sets = ", ".join(f"{k} = %s" for k in row)
        return c.execute(f"UPDATE jobs SET {sets} WHERE {where}", params).rowcount == 1

    def _extend_lease(
        self, c: psycopg.Connection, job_id: str, owner: str, expires: float, progress: float | None
    ) -> bool:
        # One statement (renew() runs it alone, in autocommit): the row is checked and written
        # under its lock, so a lease lost or a job cancelled meanwhile is never extended.
        sets, params = "lease_expires = %s", [expires]
        if progress is not None:
            sets += ", progress = GREATEST(progress, %s)"
            params.append(progress)
        cur = c.execute(
            f"UPDATE jobs SET {sets} WHERE id = %s AND status = 'processing' AND lease_owner = %s",
            [*params, job_id, owner],
        )
        return cur.rowcount == 1

    # Webhook outbox --------------------------------------------------------------------------
    def _insert_outbox_if_absent(
        self,
        c: psycopg.Connection,
        *,
        event_id: str,
        job_id: str,
        url: str,
        status: State,
        next_attempt_at: float,
    ) -> None:
        # The same event from two transactions at once: the second insert waits for the first
        # on the primary key, then does nothing (one event per id).
        c.execute(
            "INSERT INTO webhook_outbox (event_id, job_id, url, status, next_attempt_at)"
            " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (event_id) DO NOTHING",
            (event_id, job_id, url, status.value, next_attempt_at),
        )

    def _due_outbox(self, c: psycopg.Connection, now: float) -> Iterator[WebhookDelivery]:
        # A server-side cursor reads the rows lazily (the caller stops after `limit`), each
        # locked as it is fetched; rows another dispatcher holds are passed over, not waited for.
        with c.cursor(name="due_outbox", row_factory=dict_row) as cur:
            cur.itersize = 20
            cur.execute(
                "SELECT event_id, job_id, url, status, body, attempts, next_attempt_at, last_status"
                f" FROM webhook_outbox WHERE {_PENDING} AND next_attempt_at <= %s"
                " AND (claim_expires IS NULL OR claim_expires <= %s) ORDER BY next_attempt_at, event_id"
                " FOR UPDATE SKIP LOCKED",
                (now, now),
            )
            for r in cur:
                yield WebhookDelivery(**r)

    def _claim_outbox_row(
        self, c: psycopg.Connection, event_id: str, token: str, until: float, *, holder: str | None = None
    ) -> bool:
        # Like every compare-and-set here: an UPDATE that waited for another writer's lock checks
        # its WHERE (the token, pending) again on the row that writer left.
        where, params = f"event_id = %s AND {_PENDING}", [token, until, until, event_id]
        if holder is not None:
            where += " AND claim_token = %s"
            params.append(holder)
        cur = c.execute(
            f"UPDATE webhook_outbox SET claim_token = %s, claim_expires = %s, next_attempt_at = %s WHERE {where}",
            params,
        )
        return cur.rowcount == 1

    def _update_outbox_if_claimed(
        self, c: psycopg.Connection, event_id: str, token: str, values: dict[str, Any]
    ) -> bool:
        sets = ", ".join(f"{k} = %s" for k in values)
        cur = c.execute(
            "UPDATE webhook_outbox SET attempts = attempts + 1, claim_token = NULL, claim_expires = NULL,"
            f" {sets} WHERE event_id = %s AND claim_token = %s AND {_PENDING}",
            [*values.values(), event_id, token],
        )
        return cur.rowcount == 1

    # Retention -------------------------------------------------------------------------------
    def _fetch_finished(
        self,
        c: psycopg.Connection,
        *,
        before: float,
        limit: int,
        unexpired: bool = False,
        settled: bool = False,
    ) -> list[Job]:
        # Oldest first by jobs_expiry (files still kept) or jobs_finished (rows to prune).
        where = [_TERMINAL, "finished_at < %s"]
        if unexpired:
            where.append("outputs_expired_at IS NULL")
        if settled:
            where.append(_SETTLED)
        rows = c.execute(
            f"SELECT * FROM jobs WHERE {' AND '.join(where)} ORDER BY finished_at LIMIT %s", (before, limit)
        ).fetchall()
        return [_row_to_job(r) for r in rows]

    def _set_outputs_expired(self, c: psycopg.Connection, job_ids: list[str], at: float) -> int:
        return c.execute(
            f"UPDATE jobs SET outputs_expired_at = %s WHERE id = ANY(%s) AND {_TERMINAL}"
            " AND outputs_expired_at IS NULL",
            (at, job_ids),
        ).rowcount

    def _delete_finished(self, c: psycopg.Connection, job_ids: list[str], before: float) -> int:
        # The conditions are checked on the rows as they stand (a webhook may have been queued
        # for one since it was selected: it is kept).
        deleted = c.execute(
            f"DELETE FROM jobs WHERE id = ANY(%s) AND {_TERMINAL} AND finished_at < %s AND {_SETTLED}",
            (job_ids, before),
        ).rowcount
        c.execute(
            "DELETE FROM webhook_outbox WHERE job_id = ANY(%s)"
            " AND NOT EXISTS (SELECT 1 FROM jobs WHERE jobs.id = webhook_outbox.job_id)",
            (job_ids,),
        )
        return deleted

    def _take_lock(self, c: psycopg.Connection, name: str, owner: str, until: float, now: float) -> bool:
        # An upsert whose update is skipped by its WHERE changes no row: someone else holds it.
        # Two at once serialise on the row (or on the unique index for a first insert).
        cur = c.execute(
            "INSERT INTO locks (name, owner, expires) VALUES (%s, %s, %s) ON CONFLICT (name) DO UPDATE"
            " SET owner = excluded.owner, expires = excluded.expires"
            " WHERE locks.owner = excluded.owner OR locks.expires <= %s",
            (name, owner, until, now),
        )
        return cur.rowcount == 1

    def _drop_lock(self, c: psycopg.Connection, name: str, owner: str) -> None:
        c.execute("DELETE FROM locks WHERE name = %s AND owner = %s", (name, owner))

    # Plain queries ---------------------------------------------------------------------------
    def count_by_status(self) -> dict[str, int]:
        # The kept counts (job_counts plus the changes not folded yet): a few rows.
        with self._session() as c:
            rows = c.execute("SELECT status, n FROM job_status_counts WHERE n > 0").fetchall()
        return {r["status"]: int(r["n"]) for r in rows}

    def finished_timings(self, since: float, limit: int) -> list[JobTiming]:
        # Only finished jobs have a finished_at, so the range on jobs_finished alone selects them.
        with self._session() as c:
            rows = c.execute(
                "SELECT status, created_at, started_at, finished_at, inference_ms,"
                " CASE WHEN jsonb_typeof(input->'num_inference_steps') = 'number'"
                "  THEN (input->>'num_inference_steps')::numeric::int END AS steps"
                " FROM jobs WHERE finished_at >= %s ORDER BY finished_at DESC LIMIT %s",
                (since, limit),
            ).fetchall()
        return [JobTiming(**r) for r in rows]

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
            where.append("status = %s")
            params.append(status)
        if created_after is not None:
            where.append("created_at >= %s")
            params.append(created_after)
        if created_before is not None:
            where.append("created_at <= %s")
            params.append(created_before)
        clause = " AND ".join(where) or "true"
        with self._connection() as c, c.transaction():
            # One snapshot for the total, the boundary and the page (READ COMMITTED would take
            # one per statement), read-only: it takes no lock and waits for none.
            c.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            if created_after is None and created_before is None:
                if status:
                    row = c.execute("SELECT n FROM job_status_counts WHERE status = %s", (status,)).fetchone()
                else:
                    row = c.execute("SELECT sum(n) AS n FROM job_status_counts").fetchone()
                total = int(row["n"] or 0) if row else 0
            else:  # a window: counted over the index range (jobs_created, or jobs_order by status)
                total = int(
                    c.execute(f"SELECT count(*) AS n FROM jobs WHERE {clause}", params).fetchone()["n"]
                )
            seek: tuple[str, list[Any]] | None = ("", [])
            if cursor is not None:
                seek = (" AND (created_at, id) < (%s, %s)", list(cursor))
            elif page > 1:
                # Page N's first row, found by stepping over index entries, then the page is read
                # by seeking to it.
                first = c.execute(
                    f"SELECT created_at, id FROM jobs WHERE {clause} {_NEWEST_FIRST} LIMIT 1 OFFSET %s",
                    [*params, (page - 1) * page_size],
                ).fetchone()
                seek = None if first is None else (
                    " AND (created_at, id) <= (%s, %s)", [first["created_at"], first["id"]])  # fmt: skip
            rows = []
            if seek is not None:
                rows = c.execute(
                    f"SELECT * FROM jobs WHERE {clause}{seek[0]} {_NEWEST_FIRST} LIMIT %s",
                    [*params, *seek[1], page_size],
                ).fetchall()
        return [_row_to_job(r) for r in rows], total

    def upsert_worker(self, worker: WorkerInfo) -> None:
        with self._session() as c:
            c.execute(
                "INSERT INTO workers (id, host, pid, model, state, reason, info, heartbeat_at, started_at)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (id) DO UPDATE SET"
                " state = excluded.state, reason = excluded.reason, info = excluded.info,"
                " heartbeat_at = excluded.heartbeat_at, model = excluded.model",
                (
                    worker.id,
                    worker.host,
                    worker.pid,
                    worker.model,
                    worker.state,
                    worker.reason,
                    Jsonb(worker.info),
                    worker.heartbeat_at or time.time(),
                    worker.started_at or time.time(),
                ),
            )

    def workers(self) -> list[WorkerInfo]:
        with self._session() as c:
            rows = c.execute("SELECT * FROM workers ORDER BY started_at").fetchall()
        return [WorkerInfo(**r) for r in rows]

    def get_setting(self, key: str) -> str | None:
        with self._session() as c:
            row = c.execute("SELECT value FROM settings WHERE key = %s", (key,)).fetchone()
        return row["value"] if row else None

    def set_setting_if_absent(self, key: str, value: str) -> str:
        # Two at once: the second insert waits for the first on the primary key, then does
        # nothing; the read after it (a new snapshot) sees the first one's value.
        with self._transaction() as c:
            c.execute(
                "INSERT INTO settings (key, value) VALUES (%s, %s) ON CONFLICT (key) DO NOTHING", (key, value)
            )
            return c.execute("SELECT value FROM settings WHERE key = %s", (key,)).fetchone()["value"]
