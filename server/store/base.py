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
- each outbox delivery is claimed on its own, under a fresh token, and its result is recorded
  only by that token's holder (a compare-and-set), so no two dispatchers send one event while a
  claim is held; a claim that runs out unrecorded (its holder crashed) is taken over;
- a lost lease, and a retryable failure, re-queue the job while attempts remain (the claim
  counted as an attempt); a graceful hand-back (`release_worker(..., graceful=True)`) always
  re-queues it and gives the claim's attempt back;
- re-queueing a job resets its progress to 0: a queued job shows no progress of a run that ended.

Rows cross the primitives as Python values (`State`, lists, dicts); encoding them (JSON text,
JSONB) is the backend's business.
"""

from __future__ import annotations

import secrets
import time
from abc import abstractmethod
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any, Generic, TypeVar

from server.kernel.jobstate import TERMINAL, Event, State, allowed, next_state
from server.store import (
    CHANNEL_FINISHED,
    CHANNEL_QUEUED,
    IdempotencyConflict,
    Job,
    JobStore,
    NewJob,
    QueueFull,
    ReleasedJob,
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
    def _due_outbox(self, c: C, now: float) -> Iterator[WebhookDelivery]:
        """Pending (undelivered, not given up) rows due by `now` and not under a claim that runs
        past `now`, oldest next attempt first, read lazily and locked against other claimers
        until the transaction ends. Closing the iterator ends the read."""

    @abstractmethod
    def _claim_outbox_row(
        self, c: C, event_id: str, token: str, until: float, *, holder: str | None = None
    ) -> bool:
        """Put the row under claim `token` until `until`, its next attempt moved there too; with
        `holder`, only while that token holds it (a renewal). True when the row was written."""

    @abstractmethod
    def _update_outbox_if_claimed(self, c: C, event_id: str, token: str, values: dict[str, Any]) -> bool:
        """Write `values` to a pending row while claim `token` holds it, count one more attempt and
        end the claim. True when the row was written."""

    @abstractmethod
    def _fetch_finished(
        self, c: C, *, before: float, limit: int, unexpired: bool = False, settled: bool = False
    ) -> list[Job]:
        """Terminal jobs that ended before `before`, oldest first, at most `limit`; with
        `unexpired`, only those whose files are not marked expired; with `settled`, only those
        with no webhook still to deliver."""

    @abstractmethod
    def _set_outputs_expired(self, c: C, job_ids: list[str], at: float) -> int:
        """Set outputs_expired_at on those of the jobs that are terminal and not marked yet."""

    @abstractmethod
    def _delete_finished(self, c: C, job_ids: list[str], before: float) -> int:
        """Delete those of the jobs that are terminal, ended before `before` and have no webhook
        still to deliver, and the outbox rows of every job so deleted."""

    @abstractmethod
    def _take_lock(self, c: C, name: str, owner: str, until: float, now: float) -> bool:
        """Set the lock to (`owner`, `until`) if it is absent, ran out by `now`, or is `owner`'s."""

    @abstractmethod
    def _drop_lock(self, c: C, name: str, owner: str) -> None: ...

    def _notify(self, c: C, channel: str, payload: str) -> None:
        """Send a `listen` event when the transaction commits (a backend without push: nothing)."""

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
        if new is State.CREATED:  # queued again: the run that ended shows no progress
            values.setdefault("progress", 0.0)
        if new in TERMINAL:
            values.setdefault("finished_at", time.time())
        values["status"] = new
        if not self._update_job_if(c, job.id, job.status, owner, values):
            return None
        if new is State.CREATED:
            self._notify(c, CHANNEL_QUEUED, job.id)
        elif new in TERMINAL:
            self._notify(c, CHANNEL_FINISHED, job.id)
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
            self._notify(c, CHANNEL_QUEUED, job.id)
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

    def _lose_leases(self, reason: str, *, graceful: bool = False, **where: Any) -> list[ReleasedJob]:
        released = []
        with self._transaction() as c:
            for job in self._fetch_leased(c, **where):
                if graceful:  # handed back: the claim's attempt is given back
                    event, attempts = Event.HAND_BACK, max(0, job.attempts - 1)
                    msg, code = f"{reason}; the job was queued again.", 0
                    values: dict[str, Any] = {"attempts": attempts}
                elif job.attempts >= job.max_attempts:  # the state machine fails it
                    event, attempts = Event.LEASE_LOST, job.attempts
                    msg = (
                        f"{reason} while running this job (attempt {job.attempts} of "
                        f"{job.max_attempts}); it was not retried again."
                    )
                    code, values = 5000, {}
                else:  # re-queued: it keeps its history but is not an error (yet)
                    event, attempts = Event.LEASE_LOST, job.attempts
                    msg, code, values = f"{reason}; the job was queued again.", 0, {}
                new = self._transition(c, job, event, owner=job.lease_owner, error=msg, code=code, **values)
                if new is not None:
                    released.append(
                        ReleasedJob(
                            id=job.id,
                            status=new,
                            attempts=attempts,
                            max_attempts=job.max_attempts,
                            error=msg,
                            counted=not graceful,
                        )
                    )
        return released

    def expire_leases(self, now: float | None = None) -> list[str]:
        return [r.id for r in self._lose_leases(LEASE_EXPIRED, expired_before=now or time.time())]

    def release_worker(self, worker_id: str, reason: str, *, graceful: bool = False) -> list[ReleasedJob]:
        return self._lose_leases(reason, graceful=graceful, owner=worker_id)

    def extend_leases(self, lease_seconds: float) -> list[str]:
        ids: list[str] = []
        with self._transaction() as c:
            until = time.time() + lease_seconds
            for job in self._fetch_leased(c, expired_before=until):
                if job.lease_owner and self._extend_lease(c, job.id, job.lease_owner, until, None):
                    ids.append(job.id)
        return ids

    def fail_queued(self, *, code: int, error: str) -> list[str]:
        failed: list[str] = []
        with self._transaction() as c:
            # In claim order, whether or not a retry delay holds the job back.
            while (job := self._fetch_next_claimable(c, float("inf"))) is not None:
                if self._transition(c, job, Event.FAIL, error=error, code=code) is None:
                    break  # cannot happen inside the write lock; never loop on one row
                failed.append(job.id)
        return failed

    def queue_depth(self) -> int:
        with self._session() as c:
            return self._count_queued(c)

    def queue_position(self, job: Job) -> int:
        with self._session() as c:
            return self._count_queued(c, ahead_of=job)

    # Retention -------------------------------------------------------------------------------
    # Each call is one short statement or transaction over at most `limit` rows, so the API's
    # own writes never wait long behind a cleanup pass.
    def expirable(self, finished_before: float, limit: int) -> list[Job]:
        with self._session() as c:
            return self._fetch_finished(c, before=finished_before, limit=limit, unexpired=True)

    def mark_outputs_expired(self, job_ids: list[str], at: float) -> int:
        if not job_ids:
            return 0
        with self._transaction() as c:
            return self._set_outputs_expired(c, job_ids, at)

    def prunable(self, finished_before: float, limit: int) -> list[str]:
        with self._session() as c:
            return [j.id for j in self._fetch_finished(c, before=finished_before, limit=limit, settled=True)]

    def delete_jobs(self, job_ids: list[str], finished_before: float) -> int:
        if not job_ids:
            return 0
        # The conditions are checked again inside the transaction: a row selected earlier may
        # have gained a pending webhook meanwhile (it cannot leave a terminal state).
        with self._transaction() as c:
            return self._delete_finished(c, job_ids, finished_before)

    def acquire_lock(self, name: str, owner: str, seconds: float, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        with self._transaction() as c:
            return self._take_lock(c, name, owner, now + seconds, now)

    def release_lock(self, name: str, owner: str) -> None:
        with self._transaction() as c:
            self._drop_lock(c, name, owner)

    # Webhook outbox --------------------------------------------------------------------------
    def due_webhooks(
        self,
        now: float,
        limit: int = 20,
        lease_seconds: float = 30.0,
        *,
        accept: Callable[[WebhookDelivery], bool] | None = None,
    ) -> list[WebhookDelivery]:
        """Each delivery gets its own claim token, so two dispatchers never post the same event
        while a claim is held, and only the holder records the result. The claim also moves the
        row's next attempt to the claim's expiry, which is all a dispatcher of a release before
        schema version 4 looks at: it leaves a claimed row alone too."""
        if limit <= 0:
            return []
        until = now + lease_seconds
        claimed: list[WebhookDelivery] = []
        with self._transaction() as c:
            rows = self._due_outbox(c, now)
            try:
                for d in rows:
                    if accept is None or accept(d):
                        claimed.append(d)
                        if len(claimed) >= limit:
                            break
            finally:
                close = getattr(rows, "close", None)
                if close is not None:
                    close()
            for d in claimed:
                d.claim, d.claim_expires = secrets.token_hex(16), until
                self._claim_outbox_row(c, d.event_id, d.claim, until)
        return claimed

    def renew_webhook_claims(self, claims: dict[str, str], lease_seconds: float) -> set[str]:
        if not claims:
            return set()
        until = time.time() + lease_seconds
        with self._transaction() as c:
            held = (e for e, token in claims.items() if self._claim_outbox_row(c, e, token, until, holder=token))
            return set(held)

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
        now = time.time()
        values: dict[str, Any] = {"last_status": status_code}
        if delivered:
            values.update(delivered_at=now, last_error="")
        elif next_attempt_at is None:
            values.update(gave_up_at=now, last_error=error)
        else:
            values.update(next_attempt_at=next_attempt_at, last_error=error)
        with self._session() as c:
            return self._update_outbox_if_claimed(c, event_id, claim, values)
