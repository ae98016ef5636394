"""The job store's rules, written once above any SQL.

`TransactionalJobStore` implements the `JobStore` lifecycle (create, claim, renew, complete,
fail, cancel, lost leases, the webhook outbox) in terms of a few backend primitives: open a
session or a write transaction, fetch job rows, compare-and-set one job row, insert an outbox
row. A backend (SQLite today, PostgreSQL later) supplies only those primitives plus the plain
queries (history, counts, workers, settings), so the rules cannot drift between backends:

- every state change is `server.kernel.jobstate.next_state`, applied as a compare-and-set on the
  job's current status (and lease owner), so a job that moved on meanwhile is left alone;
- leaving `processing` clears the lease; entering a terminal state sets `finished_at`;
- `completed` and `failed` insert the webhook event into the outbox in the same transaction as
  the transition, so no crash between the two can lose a webhook (the body is built when the
  event is delivered: server/webhooks.py);
- a lost lease, and a retryable failure, re-queue the job while attempts remain.

Rows cross the primitives as Python values (`State`, lists, dicts); encoding them (JSON text,
JSONB) is the backend's business.
"""

from __future__ import annotations

import time
from abc import abstractmethod
from contextlib import AbstractContextManager
from typing import Any, Generic, TypeVar

from server.kernel.jobstate import TERMINAL, Event, State, allowed, next_state
from server.store import (
    IdempotencyConflict,
    Job,
    JobStore,
    NewJob,
    QueueFull,
    RenewResult,
    WebhookDelivery,
)

C = TypeVar("C")  # the backend's connection while a session or transaction is open

LEASE_EXPIRED = "The worker stopped renewing its lease"


class TransactionalJobStore(JobStore, Generic[C]):
    # Backend primitives ----------------------------------------------------------------------
    @abstractmethod
    def _session(self) -> AbstractContextManager[C]:
        """A connection whose statements each commit on their own (reads, lease renewals)."""

    @abstractmethod
    def _transaction(self) -> AbstractContextManager[C]:
        """A write transaction holding its write lock from the start (so a read followed by a
        compare-and-set cannot deadlock on a lock upgrade); commits on exit, rolls back on an
        exception."""

    @abstractmethod
    def _fetch_job(self, c: C, job_id: str) -> Job | None: ...

    @abstractmethod
    def _fetch_by_idempotency_key(self, c: C, key: str) -> Job | None: ...

    @abstractmethod
    def _fetch_next_claimable(self, c: C, now: float) -> Job | None:
        """The first queued job in claim order (created_at, then id) that is available by `now`,
        locked against other claimers until the transaction ends."""

    @abstractmethod
    def _fetch_leased(
        self, c: C, *, expired_before: float | None = None, owner: str | None = None
    ) -> list[Job]:
        """Processing jobs whose lease expires before `expired_before`, or held by `owner`."""

    @abstractmethod
    def _count_queued(self, c: C, *, ahead_of: Job | None = None) -> int:
        """Queued jobs, or only those claimed before `ahead_of` in claim order."""

    @abstractmethod
    def _insert_job(self, c: C, values: dict[str, Any]) -> None: ...

    @abstractmethod
    def _update_job_if(
        self, c: C, job_id: str, status: State, owner: str | None, values: dict[str, Any]
    ) -> bool:
        """Write `values` to the job only while it is in `status` (and, with an owner, while
        `owner` holds its lease). True when the row was written."""

    @abstractmethod
    def _extend_lease(
        self, c: C, job_id: str, owner: str, expires: float, progress: float | None
    ) -> bool:
        """Move a processing job's lease on while `owner` holds it; progress never goes back."""

    @abstractmethod
    def _insert_outbox_if_absent(
        self, c: C, *, event_id: str, job_id: str, url: str, status: State, next_attempt_at: float
    ) -> None: ...

    @abstractmethod
    def _claim_outbox(self, c: C, now: float, limit: int, until: float) -> list[WebhookDelivery]:
        """Undelivered, not given up rows due by `now`, their next attempt moved to `until`."""

    @abstractmethod
    def _update_outbox(self, c: C, event_id: str, values: dict[str, Any]) -> None:
        """Write `values` to an outbox row and count one more attempt."""

    # Transitions -----------------------------------------------------------------------------
    def _transition(
        self, c: C, job: Job, event: Event, *, owner: str | None = None, **values: Any
    ) -> State | None:
        """Apply one legal transition as a compare-and-set, writing `values` with it. Returns the
        new state, or None when the job moved on meanwhile (or `owner` lost the lease)."""
        if not allowed(job.status, event):
            return None
        new = next_state(job.status, event, attempts=job.attempts, max_attempts=job.max_attempts)
        if new is not State.PROCESSING:
            values.setdefault("lease_owner", None)
            values.setdefault("lease_expires", None)
        if new in TERMINAL:
            values.setdefault("finished_at", time.time())
        values["status"] = new
        if not self._update_job_if(c, job.id, job.status, owner, values):
            return None
        if new in (State.COMPLETED, State.FAILED) and job.webhook_url:
            # One event per id, whatever retries or replicas do.
            self._insert_outbox_if_absent(
                c,
                event_id=f"{job.id}-{new.value}",
                job_id=job.id,
                url=job.webhook_url,
                status=new,
                next_attempt_at=time.time(),
            )
        return new

    # Jobs ------------------------------------------------------------------------------------
    def create(self, job: NewJob, *, max_queue: int | None = None) -> tuple[Job, bool]:
        with self._transaction() as c:
            if job.idempotency_key:
                existing = self._fetch_by_idempotency_key(c, job.idempotency_key)
                if existing is not None:
                    if existing.request_hash != job.request_hash:
                        raise IdempotencyConflict(job.idempotency_key)
                    return existing, False
            if max_queue is not None:
                depth = self._count_queued(c)
                if depth >= max_queue:
                    raise QueueFull(depth)
            self._insert_job(
                c,
                {
                    "id": job.id,
                    "model": job.model,
                    "status": State.CREATED,
                    "input": job.input,
                    "base_url": job.base_url,
                    "created_at": time.time(),
                    "max_attempts": job.max_attempts,
                    "webhook_url": job.webhook_url,
                    "idempotency_key": job.idempotency_key,
                    "request_hash": job.request_hash,
                },
            )
            created = self._fetch_job(c, job.id)
        assert created is not None
        return created, True

    def get(self, job_id: str) -> Job | None:
        with self._session() as c:
            return self._fetch_job(c, job_id)

    def claim(self, worker_id: str, lease_seconds: float) -> Job | None:
        with self._transaction() as c:
            job = self._fetch_next_claimable(c, time.time())
            if job is None:
                return None
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
            return self._fetch_job(c, job.id) if new else None

    def renew(
        self, job_id: str, worker_id: str, lease_seconds: float, progress: float | None = None
    ) -> str:
        # Not a transition (the state stays `processing`): one statement, no write transaction,
        # because every running job renews every second.
        p = None if progress is None else float(progress)
        with self._session() as c:
            if self._extend_lease(c, job_id, worker_id, time.time() + lease_seconds, p):
                return RenewResult.OK
            job = self._fetch_job(c, job_id)
        if job is not None and job.status is State.CANCELLED:
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
        with self._transaction() as c:
            job = self._fetch_job(c, job_id)
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
        with self._transaction() as c:
            job = self._fetch_job(c, job_id)
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
        with self._transaction() as c:
            job = self._fetch_job(c, job_id)
            if job is None:
                return None, False
            new = self._transition(c, job, Event.CANCEL, error="Cancelled by request.", code=0)
            return self._fetch_job(c, job_id), new is not None

    def _lose_leases(self, reason: str, **where: Any) -> list[str]:
        ids = []
        with self._transaction() as c:
            for job in self._fetch_leased(c, **where):
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
        return self._lose_leases(LEASE_EXPIRED, expired_before=now or time.time())

    def release_worker(self, worker_id: str, reason: str) -> list[str]:
        return self._lose_leases(reason, owner=worker_id)

    def queue_depth(self) -> int:
        with self._session() as c:
            return self._count_queued(c)

    def queue_position(self, job: Job) -> int:
        with self._session() as c:
            return self._count_queued(c, ahead_of=job)

    # Webhook outbox --------------------------------------------------------------------------
    def due_webhooks(self, now: float, limit: int = 20, lease_seconds: float = 30.0) -> list[WebhookDelivery]:
        """Due deliveries, each claimed for `lease_seconds` (its next attempt time is moved on)
        so two dispatchers never post the same event at once."""
        with self._transaction() as c:
            return self._claim_outbox(c, now, limit, now + lease_seconds)

    def webhook_attempted(
        self, event_id: str, *, delivered: bool, error: str, next_attempt_at: float | None
    ) -> None:
        now = time.time()
        if delivered:
            values: dict[str, Any] = {"delivered_at": now, "last_error": ""}
        elif next_attempt_at is None:
            values = {"gave_up_at": now, "last_error": error}
        else:
            values = {"next_attempt_at": next_attempt_at, "last_error": error}
        with self._session() as c:
            self._update_outbox(c, event_id, values)
