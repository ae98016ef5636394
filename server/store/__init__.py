"""The job store: the single source of truth for jobs, leases, progress, cancel flags, workers
and the webhook outbox. It is also the queue: a job answered with an id is a committed row, so
no crash can lose it.

`JobStore` is the interface. `server.store.base.TransactionalJobStore` implements its rules once,
above a few backend primitives; `SqliteJobStore` (server/store/sqlite.py) is the embedded backend,
and `PostgresJobStore` (server/store/postgres.py) the shared one, with `FOR UPDATE SKIP LOCKED`
claims and LISTEN/NOTIFY events. Every state change goes through `server.kernel.jobstate.next_state` and is written
as a compare-and-set on the current status (and lease owner), so concurrent API replicas and
workers cannot race a job into an illegal state. tests/unit/test_store_contract.py is the suite every
backend passes.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

from server.kernel.jobstate import RenewResult, State, WorkerState

__all__ = [
    "CHANNEL_FINISHED",
    "CHANNEL_QUEUED",
    "Events",
    "IdempotencyConflict",
    "Job",
    "JobStore",
    "JobTiming",
    "NewJob",
    "QueueFull",
    "ReleasedJob",
    "RenewResult",
    "StoreBusy",
    "StoreUnavailable",
    "StoreUnreachable",
    "WebhookDelivery",
    "WorkerInfo",
    "WorkerState",
    "open_store",
]


@dataclass
class Job:
    id: str
    model: str
    status: State
    input: dict[str, Any]
    created_at: float
    base_url: str = ""
    started_at: float | None = None
    finished_at: float | None = None
    outputs: list[str] = field(default_factory=list)  # storage keys, rendered as URLs on read
    has_nsfw: list[bool] = field(default_factory=list)
    error: str = ""
    code: int = 0
    attempts: int = 0
    max_attempts: int = 1
    lease_owner: str | None = None
    lease_expires: float | None = None
    progress: float = 0.0
    inference_ms: int | None = None
    seed: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. conditioning keys, render notes
    webhook_url: str | None = None
    idempotency_key: str | None = None
    request_hash: str | None = None
    available_at: float | None = None
    # When retention deleted this finished job's files (output, inline inputs, conditioning);
    # None while they are kept.
    outputs_expired_at: float | None = None


@dataclass
class NewJob:
    id: str
    model: str
    input: dict[str, Any]
    base_url: str
    max_attempts: int
    webhook_url: str | None = None
    idempotency_key: str | None = None
    request_hash: str | None = None


@dataclass(frozen=True)
class ReleasedJob:
    """What releasing a lease did to one job (`JobStore.release_worker`), enough to log it."""

    id: str
    status: State  # CREATED (queued again) or FAILED (no attempt left)
    attempts: int  # claims counted, after the release
    max_attempts: int
    error: str  # the message the job now carries
    counted: bool = True  # False: a graceful hand-back, the claim's attempt given back

    def describe(self) -> str:
        """One line for the log: "re-queued job X (attempt n of m)" or "failed job X: why"."""
        if self.status is State.FAILED:
            return f"failed job {self.id}: {self.error}"
        if not self.counted:
            used = f"{self.attempts} of {self.max_attempts} used"
            return f"re-queued job {self.id} (attempt not counted; {used})"
        return f"re-queued job {self.id} (attempt {self.attempts} of {self.max_attempts})"


class QueueFull(Exception):
    pass


class IdempotencyConflict(Exception):
    pass


class StoreUnavailable(Exception):
    """The store cannot do what was asked right now because its disk is full or failing
    (SQLite: SQLITE_FULL "database or disk is full", SQLITE_IOERR "disk I/O error", a journal
    file it cannot create). Transient: the same call succeeds once space is freed. The API
    answers it with 507; workers and the supervisor retry with backoff."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message
        self.at = time.time()


@dataclass(frozen=True)
class JobTiming:
    """When one finished job was created, started and ended, and how long its denoising took:
    what the /metrics duration histograms are computed from (`JobStore.finished_timings`)."""

    status: str
    created_at: float
    started_at: float | None  # None: it ended without ever being claimed (cancelled or failed queued)
    finished_at: float
    inference_ms: int | None
    steps: int | None  # the request's num_inference_steps


class StoreUnreachable(StoreUnavailable):
    """The store's server cannot be reached (PostgreSQL down, restarting, or the network to it
    cut). Transient like StoreUnavailable, which workers and the supervisor already retry; the
    API answers it with 503 Service Unavailable and Retry-After instead of 507."""


# Channels of `JobStore.listen`. Each event's payload is a job id; it is sent when the
# transaction that made it true commits, so a listener that reads the job then sees it.
CHANNEL_QUEUED = "wan_vace_queued"  # a job became claimable: created, or queued again
CHANNEL_FINISHED = "wan_vace_finished"  # a job entered a terminal state


class Events(ABC):
    """A subscription to store events (`JobStore.listen`), for one thread."""

    @abstractmethod
    def wait(self, timeout: float) -> list[tuple[str, str]]:
        """The (channel, payload) events received, waiting up to `timeout` seconds for the first;
        [] when none came. Events may be coalesced or, while the connection is being restored,
        missed: a listener still polls (rarely) as a fallback."""

    @abstractmethod
    def close(self) -> None: ...


class StoreBusy(Exception):
    """A call in nonblocking mode (`JobStore.nonblocking`) found the store locked by another
    connection and did not wait. The same call made outside that mode waits for the lock."""


@dataclass
class WorkerInfo:
    id: str
    host: str
    pid: int
    model: str
    state: str  # a WorkerState value
    reason: str = ""
    info: dict[str, Any] = field(default_factory=dict)
    heartbeat_at: float = 0.0
    started_at: float = 0.0


@dataclass
class WebhookDelivery:
    """One claimed outbox row. The event is `<job_id>-<status>`; its body is built from the job
    row when it is delivered, except on rows written before schema version 3, which carry the body
    they were first signed with. `claim` is this delivery's own claim token: only its holder may
    record the attempt's result (`JobStore.webhook_attempted`)."""

    event_id: str
    job_id: str
    url: str
    status: str  # the terminal status the event announces
    attempts: int  # attempts recorded before this one
    next_attempt_at: float
    body: str | None = None
    claim: str = ""
    claim_expires: float = 0.0
    last_status: int | None = None  # the receiver's HTTP answer to the previous attempt


class JobStore(ABC):
    # The last StoreUnavailable this store raised, until a write transaction commits again
    # (/health reads it); None while writes work.
    write_error: StoreUnavailable | None = None

    def nonblocking(self) -> AbstractContextManager[None]:
        """Within this block, this thread's calls never wait long for another connection's lock:
        they raise StoreBusy instead (for the API's event loop, which must not stall; it hands a
        busy call to a thread). A backend that never waits on a lock keeps this default."""
        return nullcontext()

    def listen(self, *channels: str) -> Events | None:
        """Subscribe to events on `channels` (CHANNEL_QUEUED, CHANNEL_FINISHED), or None when the
        backend has no push (SQLite: workers on its host are nudged over server/wakeup.py and
        everything else polls)."""
        return None

    @abstractmethod
    def create(self, job: NewJob, *, max_queue: int | None = None) -> tuple[Job, bool]:
        """Insert a queued job. Returns (job, created). With an idempotency key already used for
        the same request hash, returns the existing job and False; for another hash raises
        IdempotencyConflict. Raises QueueFull when `max_queue` jobs are already queued."""

    @abstractmethod
    def get(self, job_id: str) -> Job | None: ...

    @abstractmethod
    def claim(self, worker_id: str, lease_seconds: float) -> Job | None:
        """Atomically take the oldest queued job, with a lease, counting an attempt."""

    @abstractmethod
    def renew(
        self, job_id: str, worker_id: str, lease_seconds: float, progress: float | None = None
    ) -> str:
        """Extend the lease (and record progress). Returns a RenewResult value."""

    @abstractmethod
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
        """processing -> completed, only if `worker_id` still holds the lease."""

    @abstractmethod
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
        """Fail a job (or re-queue it when `retryable` and attempts remain, claimable again
        after `retry_delay` x attempts so far seconds). With a worker id
        only while that worker holds the lease. Returns the new state, or None if nothing
        changed."""

    @abstractmethod
    def cancel(self, job_id: str) -> tuple[Job | None, bool]:
        """Cancel a queued or running job. Returns (job after, changed)."""

    @abstractmethod
    def expire_leases(self, now: float | None = None) -> list[str]:
        """Apply LEASE_LOST to every running job whose lease ran out; returns their ids."""

    @abstractmethod
    def release_worker(self, worker_id: str, reason: str, *, graceful: bool = False) -> list[ReleasedJob]:
        """Take back at once every job held by `worker_id`, saying what became of each.

        Not graceful (a worker known to be dead, a restart after a crash): LEASE_LOST, the claim
        counts as an attempt, re-queued while attempts remain, else failed. Graceful (the worker
        was asked to stop and is handing its jobs back): HAND_BACK, always re-queued, the claim's
        attempt given back, code 0. Either way the lease is cleared and progress reset to 0."""

    @abstractmethod
    def extend_leases(self, lease_seconds: float) -> list[str]:
        """Give every running job whose lease ends sooner a lease of `lease_seconds` from now;
        returns their ids. After a store outage, during which no worker could renew: the live
        ones renew within a second, a dead one's jobs expire `lease_seconds` later."""

    @abstractmethod
    def fail_queued(self, *, code: int, error: str) -> list[str]:
        """Apply FAIL to every queued job (none can run: every local worker failed to load);
        returns their ids."""

    @abstractmethod
    def queue_depth(self) -> int: ...

    @abstractmethod
    def queue_position(self, job: Job) -> int:
        """How many queued jobs come before `job` in claim order (0 = next), exact, read from an
        index (a poll of a queued job asks it). A job ahead waiting out a retry delay counts:
        it is claimed first once its delay is over."""

    @abstractmethod
    def count_by_status(self) -> dict[str, int]:
        """Jobs per status, statuses with none left out; kept as jobs move, not counted on each
        call (/health asks it), so its cost does not grow with the history."""

    @abstractmethod
    def finished_timings(self, since: float, limit: int) -> list[JobTiming]:
        """The timings of up to `limit` jobs that ended at or after `since`, the latest first.
        Read by the index on finished_at, so the cost follows the jobs in that window, not the
        length of the history."""

    @abstractmethod
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
        """One page of jobs, newest first (created_at, then id, both descending), and the total
        matching the filters (`created_after`/`created_before` inclusive). Page N starts after
        the first (N-1) x page_size matches; with `cursor`, the (created_at, id) of the last job
        of the page before, the page starts right after that job instead, so pages read one
        after another neither overlap nor miss a job however many are created meanwhile.

        The cost does not grow with the table: the page is read by seeking an index, its
        boundary found over index entries alone, and the total of an unwindowed query comes
        from kept counts (a window is counted over an index range)."""

    # Workers -------------------------------------------------------------------------------
    @abstractmethod
    def upsert_worker(self, worker: WorkerInfo) -> None: ...

    @abstractmethod
    def workers(self) -> list[WorkerInfo]: ...

    # Webhook outbox --------------------------------------------------------------------------
    @abstractmethod
    def due_webhooks(
        self,
        now: float,
        limit: int = 20,
        lease_seconds: float = 30.0,
        *,
        accept: Callable[[WebhookDelivery], bool] | None = None,
    ) -> list[WebhookDelivery]:
        """Claim up to `limit` due deliveries (oldest next attempt first), each under its own
        claim token for `lease_seconds`: while a claim is held no other call returns its row. A
        row whose claim ran out with no result recorded (its holder crashed) is due again.
        `accept`, asked about each due row in turn inside the claim, may pass over a row (left
        unclaimed for others), e.g. one for a receiver that is busy already."""

    @abstractmethod
    def renew_webhook_claims(self, claims: dict[str, str], lease_seconds: float) -> set[str]:
        """Extend the claims `{event_id: claim token}` still held by those tokens to
        `lease_seconds` from now; returns the event ids renewed."""

    @abstractmethod
    def webhook_attempted(
        self,
        event_id: str,
        *,
        claim: str,
        delivered: bool,
        error: str,
        next_attempt_at: float | None,
        status_code: int | None = None,
    ) -> bool:
        """Record one delivery attempt and end its claim, only while `claim` still holds the row
        (a compare-and-set on the token). `next_attempt_at=None` with delivered=False gives up;
        `status_code` is the receiver's HTTP answer (None: no answer). Returns False, changing
        nothing, when the claim was taken over or the row is no longer pending."""

    # Retention (server/retention.py) ---------------------------------------------------------
    @abstractmethod
    def expirable(self, finished_before: float, limit: int) -> list[Job]:
        """Up to `limit` terminal jobs that ended before `finished_before` and whose files are
        not marked expired yet, the oldest first (read by an index, so a long history of
        expired rows costs nothing)."""

    @abstractmethod
    def mark_outputs_expired(self, job_ids: list[str], at: float) -> int:
        """Record that these jobs' files were deleted at `at`. Only terminal jobs not marked yet
        are written; returns how many were."""

    @abstractmethod
    def prunable(self, finished_before: float, limit: int) -> list[str]:
        """Ids of up to `limit` terminal jobs that ended before `finished_before` and have no
        webhook still to deliver, the oldest first."""

    @abstractmethod
    def delete_jobs(self, job_ids: list[str], finished_before: float) -> int:
        """Delete these job rows and their webhook outbox rows in one transaction: only those
        still terminal, ended before `finished_before`, with no webhook still to deliver.
        Returns how many job rows were deleted."""

    @abstractmethod
    def acquire_lock(self, name: str, owner: str, seconds: float, now: float | None = None) -> bool:
        """Take the named lock for `seconds` from `now`, or renew it: True when it was free, had
        run out, or `owner` held it already; False while someone else holds it."""

    @abstractmethod
    def release_lock(self, name: str, owner: str) -> None:
        """Give the lock up, if `owner` holds it."""

    @abstractmethod
    def get_setting(self, key: str) -> str | None: ...

    @abstractmethod
    def set_setting_if_absent(self, key: str, value: str) -> str: ...


def open_store(settings: Any) -> JobStore:
    """The store named by the settings: SQLite in the data dir unless a database URL is set."""
    url = settings.database_url
    if url and url.startswith(("postgresql://", "postgres://")):
        try:
            from server.store.postgres import PostgresJobStore
        except ImportError as e:  # the optional driver: the embedded default needs none
            raise RuntimeError(
                f"WAN_VACE_DATABASE_URL names PostgreSQL, but its driver is not installed ({e}); "
                "install it with: pip install 'wan-vace[cluster]'"
            ) from e
        return PostgresJobStore(url, pool_size=getattr(settings, "database_pool_size", 8))
    if url and not url.startswith("sqlite:///"):
        raise ValueError(f"WAN_VACE_DATABASE_URL must be sqlite:///PATH or postgresql://..., got {url!r}")
    from server.store.sqlite import SqliteJobStore

    path = url[len("sqlite:///") :] if url else settings.sqlite_path
    return SqliteJobStore(path)
