"""Retention: finished jobs' files, uploads and (optionally) job rows are deleted after an age,
so `data/media`, the history and /health's counts stay bounded.

One pass (`cleanup`, with an explicit `now` so tests need no sleeps):

1. Files of finished jobs. A terminal job (completed, failed, cancelled) that ended more than
   `retention_seconds` before `now` loses its output, its inline inputs and its conditioning
   files together (`outputs/<job>`, `inputs/<job>`, `conditioning/<job>`); then its row is marked
   `outputs_expired_at`. Deleting first and marking after makes a pass cut short harmless: the
   next one deletes nothing more and marks it. The row stays: a poll still answers `completed`,
   with `outputs_expired` (server/predictions.py), and `/media/` answers 410 for its files.
2. Job rows, when `job_retention_seconds` is set: terminal jobs that ended before that age, with
   no webhook still to deliver, are deleted with their outbox rows (and any file left of them).
3. One walk of the storage: its size for /health, and the files the job rules cannot see.
   Uploads older than `retention_seconds` go by their own age, unless a queued or running job
   names them. Files under a job prefix whose row is gone (the inline inputs of a submit the
   queue refused, a pruned row's leftovers), or whose job's files were marked expired, go too.

Queued and running jobs are never touched: only terminal rows are selected, and a job never
leaves a terminal state. Every step works in batches of `BATCH` rows, each a short store call,
so the API's own writes never wait long behind a pass.

`Retention` runs the pass in a thread of the API process every `retention_interval` seconds.
Where several API processes share one store, only the holder of the `retention` lock in the
store runs it (the lock runs out if its holder dies, and another process takes over). A store or
disk fault is logged once (server/worker/retry.py's `Outage`) and the pass is tried again at
the next interval; nothing ends the loop but `stop()`. /health reads the report of the last
pass (`report()`), never the disk.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from server.predictions import rfc3339
from server.settings import Settings
from server.storage import MEDIA_PREFIX, InvalidKey, Storage, StoredObject, check_key
from server.store import Job, JobStore
from server.worker.retry import Outage

log = logging.getLogger("wan_vace.retention")

LOCK = "retention"
BATCH = 100
WALK_BATCH = 5000  # objects listed between two checks that the pass may go on
# Where a job's files live, each as `<prefix>/<job id>/<token>/<name>`.
JOB_PREFIXES = ("outputs", "inputs", "conditioning")
UPLOADS = "uploads"
_ACTIVE = ("created", "processing")

ENV_FILES = "WAN_VACE_RETENTION_SECONDS"


def job_of_key(key: str) -> str | None:
    """The job id a storage key belongs to (its output, inline inputs, conditioning), else None."""
    try:
        check_key(key)
    except InvalidKey:
        return None
    parts = key.split("/")
    return parts[1] if len(parts) >= 3 and parts[0] in JOB_PREFIXES else None


def job_prefixes(job_id: str) -> list[str]:
    return [f"{p}/{job_id}" for p in JOB_PREFIXES]


def describe_age(seconds: float) -> str:
    """'7 days', '36 hours', '90 seconds': the largest unit that says it in whole numbers."""
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size and seconds % size == 0:
            n = int(seconds // size)
            return f"{n} {unit}{'s' if n != 1 else ''}"
    return f"{seconds:g} second{'s' if seconds != 1 else ''}"


def expired_message(key: str, settings: Settings) -> str:
    """What /media/ says about a file of a job whose files were deleted by retention."""
    what = {"outputs": "output", "inputs": "input", "conditioning": "conditioning file"}[key.split("/", 1)[0]]
    kept = settings.retention_seconds
    after = f"after {describe_age(kept)} ({ENV_FILES}={kept:g})" if kept else f"under an earlier {ENV_FILES}"
    return f"this {what} expired {after} and was deleted; the job's record remains"


def upload_gone_hint(key: str, settings: Settings) -> str:
    """A note for a missing upload: it may have been deleted by age (no record says which)."""
    if key.startswith(UPLOADS + "/") and settings.retention_seconds:
        return f" (uploads are deleted {describe_age(settings.retention_seconds)} after they were uploaded: {ENV_FILES})"
    return ""


@dataclass
class PassReport:
    at: float  # the pass's `now`
    expired_jobs: int = 0  # jobs whose files were deleted (and marked so)
    pruned_jobs: int = 0  # job rows deleted
    deleted_files: int = 0
    deleted_bytes: int = 0  # of the files found by the walk (job prefixes are deleted unsized)
    bytes: int = 0  # what storage holds after the pass
    files: int = 0
    seconds: float = 0.0  # how long the pass took
    complete: bool = True  # False: stopped early (shutdown, or the lock was lost)


def cleanup(
    settings: Settings,
    store: JobStore,
    storage: Storage,
    now: float,
    *,
    go_on: Callable[[], bool] = lambda: True,
) -> PassReport:
    """One retention pass as of `now`. `go_on()`, asked between batches, may end it early."""
    started = time.monotonic()
    rep = PassReport(at=now)
    try:
        if settings.retention_seconds and not _expire_files(rep, settings, store, storage, now, go_on):
            rep.complete = False
            return rep
        if settings.job_retention_seconds and not _prune_rows(rep, settings, store, storage, now, go_on):
            rep.complete = False
            return rep
        rep.complete = _walk(rep, settings, store, storage, now, go_on)
        return rep
    finally:
        rep.seconds = time.monotonic() - started


def _delete_job_files(storage: Storage, job_id: str) -> int:
    return sum(storage.delete_prefix(p) for p in job_prefixes(job_id))


def _expire_files(
    rep: PassReport,
    settings: Settings,
    store: JobStore,
    storage: Storage,
    now: float,
    go_on: Callable[[], bool],
) -> bool:
    cutoff = now - settings.retention_seconds
    while jobs := store.expirable(cutoff, BATCH):
        for job in jobs:
            rep.deleted_files += _delete_job_files(storage, job.id)
        marked = store.mark_outputs_expired([j.id for j in jobs], now)
        rep.expired_jobs += marked
        if marked == 0:  # nothing moved (cannot happen: selected rows are terminal); never spin
            break
        if not go_on():
            return False
    return True


def _prune_rows(
    rep: PassReport,
    settings: Settings,
    store: JobStore,
    storage: Storage,
    now: float,
    go_on: Callable[[], bool],
) -> bool:
    cutoff = now - settings.job_retention_seconds
    while ids := store.prunable(cutoff, BATCH):
        for job_id in ids:  # usually nothing is left: the files expired long before
            rep.deleted_files += _delete_job_files(storage, job_id)
        deleted = store.delete_jobs(ids, cutoff)
        rep.pruned_jobs += deleted
        if deleted == 0:
            break
        if not go_on():
            return False
    return True


def _walk(
    rep: PassReport,
    settings: Settings,
    store: JobStore,
    storage: Storage,
    now: float,
    go_on: Callable[[], bool],
) -> bool:
    cutoff = now - settings.retention_seconds if settings.retention_seconds else None
    old_uploads: list[StoredObject] = []
    old_by_job: dict[str, list[StoredObject]] = {}
    for n, obj in enumerate(storage.iter_objects(""), 1):
        rep.bytes += obj.size
        rep.files += 1
        if n % WALK_BATCH == 0 and not go_on():  # a shutdown need not wait for a long walk
            return False
        if cutoff is None or obj.mtime >= cutoff:
            continue
        if obj.key.startswith(UPLOADS + "/"):
            old_uploads.append(obj)
        elif (job_id := job_of_key(obj.key)) is not None:
            old_by_job.setdefault(job_id, []).append(obj)
    doomed: list[StoredObject] = []
    if old_uploads:
        # Read last, just before deleting, so a job queued during the walk still counts.
        named = _uploads_named_by_active_jobs(settings, store, storage)
        doomed += [o for o in old_uploads if o.key not in named]
    if not go_on():
        return False
    for job_id, objs in old_by_job.items():
        job = store.get(job_id)
        # A row with files not marked expired is left to step 1 (it may be queued, running, or
        # ended recently after a long wait).
        if job is None or job.outputs_expired_at is not None:
            doomed += objs
    for i, obj in enumerate(doomed):
        if storage.delete(obj.key):
            rep.deleted_files += 1
            rep.deleted_bytes += obj.size
            rep.bytes -= obj.size
            rep.files -= 1
        if i % BATCH == BATCH - 1 and not go_on():
            return False
    return True


def _uploads_named_by_active_jobs(settings: Settings, store: JobStore, storage: Storage) -> set[str]:
    """Keys of uploads that queued and running jobs name in their input. Any URL with
    `/media/uploads/` counts, whichever host it names: keeping one upload too many is cheap,
    deleting one a job still needs fails the job."""
    named: set[str] = set()
    for job in _active_jobs(store):
        bases = [b for b in (job.base_url, settings.public_url) if b]
        for value in _strings(job.input):
            key = storage.key_from_url(value, bases)
            if key is None and (i := value.find(MEDIA_PREFIX + UPLOADS + "/")) >= 0:
                key = value[i + len(MEDIA_PREFIX) :].split("?", 1)[0]
            if key is not None:
                named.add(key)
    return named


def _active_jobs(store: JobStore) -> Iterator[Job]:
    for status in _ACTIVE:
        page = 1
        while True:
            jobs, total = store.history(page=page, page_size=500, status=status)
            yield from jobs
            if not jobs or page * 500 >= total:
                break
            page += 1


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


class Retention:
    """The cleanup loop of one API process (`start`/`stop`), and the report /health shows."""

    def __init__(self, settings: Settings, store: JobStore, storage: Storage):
        self.s, self.store, self.storage = settings, store, storage
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.last: PassReport | None = None
        self.held: bool | None = None  # whether this process held the lock at its last try
        self.outage = Outage("retention", log)
        self._stop = threading.Event()
        self._pass = threading.Lock()  # one pass at a time in this process
        self._thread: threading.Thread | None = None

    @property
    def lock_seconds(self) -> float:
        # Held from one pass to the next, so the same process keeps doing it; a dead holder's
        # lock runs out within two intervals (a minute at least, for slow passes).
        return max(60.0, 2 * self.s.retention_interval)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="retention", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self.held:
            try:  # another process may take over at once
                self.store.release_lock(LOCK, self.owner)
            except Exception as e:  # noqa: BLE001 - the lock runs out by itself
                log.info("retention: could not give the cleanup lock back (%s); it runs out by itself", e)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except Exception as e:  # noqa: BLE001 - the loop outlives any fault; logged once
                self.outage.failed(e)
            else:
                self.outage.ok()
            self._stop.wait(self.s.retention_interval)

    def _hold(self) -> bool:
        self.held = self.store.acquire_lock(LOCK, self.owner, self.lock_seconds)
        return self.held

    def run_once(self, now: float | None = None) -> PassReport | None:
        """One pass as of `now` (default: the clock), if this process holds the lock; None when
        another process does."""
        with self._pass:
            if not self._hold():
                return None
            rep = cleanup(
                self.s,
                self.store,
                self.storage,
                time.time() if now is None else now,
                go_on=lambda: not self._stop.is_set() and self._hold(),
            )
            if rep.expired_jobs or rep.pruned_jobs or rep.deleted_files:
                log.info(
                    "retention: deleted the files of %d finished jobs, %d job rows, %d files in all (%.1f s)",
                    rep.expired_jobs, rep.pruned_jobs, rep.deleted_files, rep.seconds,
                )  # fmt: skip
            if not rep.complete and self.last is not None:
                # A walk cut short counted part of the storage: the last whole count says more.
                rep.bytes, rep.files = self.last.bytes, self.last.files
            self.last = rep
            return rep

    def report(self) -> dict[str, Any]:
        """/health's `storage` section: what the last pass measured, and the settings."""
        last = self.last
        out: dict[str, Any] = {
            "bytes": last.bytes if last else None,
            "files": last.files if last else None,
            "measured_at": rfc3339(last.at) if last else None,
            "retention_seconds": self.s.retention_seconds,
            "job_retention_seconds": self.s.job_retention_seconds,
            "cleanup_interval": self.s.retention_interval,
        }
        if last is not None:
            out["last_cleanup"] = {
                "expired_jobs": last.expired_jobs,
                "pruned_jobs": last.pruned_jobs,
                "deleted_files": last.deleted_files,
                "seconds": round(last.seconds, 3),
                "complete": last.complete,
            }
        elif self.held is False:
            out["note"] = "another API process sharing this store runs the cleanup and measures storage"
        if self.outage.active:
            out["error"] = (
                "the last cleanup failed (the store or storage is unavailable); retried every interval"
            )
        return out
