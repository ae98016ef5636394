"""The job store: the single source of truth for jobs, leases, progress, cancel flags, workers
and the webhook outbox. It is also the queue: a job answered with an id is a committed row, so
no crash can lose it.

`JobStore` is the interface. `server.store.base.TransactionalJobStore` implements its rules once,
above a few backend primitives; `SqliteJobStore` (server/store/sqlite.py) is the embedded backend,
and a PostgreSQL store (scale-out issue) supplies the same primitives with `FOR UPDATE SKIP
LOCKED` claims. Every state change goes through `server.kernel.jobstate.next_state` and is written
as a compare-and-set on the current status (and lease owner), so concurrent API replicas and
workers cannot race a job into an illegal state. tests/test_store_contract.py is the suite every
backend passes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from server.kernel.jobstate import RenewResult, State, WorkerState

__all__ = [
    "IdempotencyConflict",
    "Job",
    "JobStore",
    "NewJob",
    "QueueFull",
    "RenewResult",
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


class QueueFull(Exception):
    pass


class IdempotencyConflict(Exception):
    pass


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
    """One due outbox row. The event is `<job_id>-<status>`; its body is built from the job row
    when it is delivered, except on rows written before schema version 3, which carry the body
    they were first signed with."""

    event_id: str
    job_id: str
    url: str
    status: str  # the terminal status the event announces
    attempts: int
    next_attempt_at: float
    body: str | None = None


class JobStore(ABC):
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
    def release_worker(self, worker_id: str, reason: str) -> list[str]:
        """Apply LEASE_LOST at once to every job held by a worker known to be dead."""

    @abstractmethod
    def queue_depth(self) -> int: ...

    @abstractmethod
    def queue_position(self, job: Job) -> int:
        """How many queued jobs will be claimed before `job` (0 = next)."""

    @abstractmethod
    def count_by_status(self) -> dict[str, int]: ...

    @abstractmethod
    def history(
        self,
        *,
        page: int,
        page_size: int,
        status: str | None = None,
        created_after: float | None = None,
        created_before: float | None = None,
    ) -> tuple[list[Job], int]: ...

    # Workers -------------------------------------------------------------------------------
    @abstractmethod
    def upsert_worker(self, worker: WorkerInfo) -> None: ...

    @abstractmethod
    def workers(self) -> list[WorkerInfo]: ...

    # Webhook outbox --------------------------------------------------------------------------
    @abstractmethod
    def due_webhooks(
        self, now: float, limit: int = 20, lease_seconds: float = 30.0
    ) -> list[WebhookDelivery]:
        """Due deliveries, each claimed for `lease_seconds`."""

    @abstractmethod
    def webhook_attempted(
        self, event_id: str, *, delivered: bool, error: str, next_attempt_at: float | None
    ) -> None:
        """Record one delivery attempt; `next_attempt_at=None` with delivered=False gives up."""

    @abstractmethod
    def get_setting(self, key: str) -> str | None: ...

    @abstractmethod
    def set_setting_if_absent(self, key: str, value: str) -> str: ...


def open_store(settings: Any) -> JobStore:
    """The store named by the settings: SQLite in the data dir unless a database URL is set."""
    url = settings.database_url
    if url and url.startswith(("postgresql://", "postgres://")):
        raise NotImplementedError(
            "PostgreSQL job store is not supported yet (scale-out issue); "
            "unset WAN_VACE_DATABASE_URL to use the embedded SQLite store"
        )
    if url and not url.startswith("sqlite:///"):
        raise ValueError(f"WAN_VACE_DATABASE_URL must be sqlite:///PATH or postgresql://..., got {url!r}")
    from server.store.sqlite import SqliteJobStore

    path = url[len("sqlite:///") :] if url else settings.sqlite_path
    return SqliteJobStore(path)
