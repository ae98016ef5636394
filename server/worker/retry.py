"""Riding out a store or storage outage (a full disk, a failing one): what counts as one, a
backoff, and logging once per outage instead of once per retry.

The workers and the supervisor never give up on the store: a call that fails with a
`transient` error is retried, 0.5 s after the first failure, doubling to 10 s, until it answers.
"""

from __future__ import annotations

import errno
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from server.diskspace import is_disk_full
from server.storage import StorageUnavailable
from server.store import StoreUnavailable

FIRST_DELAY_S = 0.5
MAX_DELAY_S = 10.0

T = TypeVar("T")


def disk_trouble(exc: BaseException) -> bool:
    """Whether `exc` is a storage write refused for want of space, or by a failing disk."""
    return is_disk_full(exc) or (isinstance(exc, OSError) and exc.errno == errno.EIO)


def transient(exc: BaseException) -> bool:
    """Whether a store or storage call that raised `exc` is worth retrying: the store says it is
    unavailable, the object store's endpoint is (StorageUnavailable), SQLite says something it did
    not translate (a lock held past its timeout), or the file system is full or failing."""
    return isinstance(exc, (StoreUnavailable, StorageUnavailable, sqlite3.OperationalError)) or disk_trouble(exc)


class Outage:
    """One component's view of the store: `failed(exc)` after a call failed (logs the first
    failure of an outage, with its traceback when the error is not a known outage), `ok()` after
    one answered (logs the end of the outage). Shared by a component's threads."""

    def __init__(self, what: str, log: logging.Logger):
        self.what, self.log = what, log
        self._lock = threading.Lock()
        self.since: float | None = None  # monotonic start of the current outage
        self.last_failure = 0.0  # monotonic time of the latest failure (0: none yet)

    @property
    def active(self) -> bool:
        return self.since is not None

    def failed(self, exc: BaseException) -> None:
        with self._lock:
            self.last_failure = time.monotonic()
            if self.since is not None:
                return
            self.since = self.last_failure
        known = isinstance(exc, StoreUnavailable) or disk_trouble(exc)
        self.log.error(
            "%s: the store or storage is unavailable (%s: %s); retrying until it answers",
            self.what, type(exc).__name__, exc, exc_info=not known,
        )  # fmt: skip

    def ok(self) -> None:
        with self._lock:
            since, self.since = self.since, None
        if since is not None:
            self.log.warning(
                "%s: the store and storage answer again (after %.1f s)", self.what, time.monotonic() - since
            )


class Backoff:
    """The delays between retries of one call: 0.5 s doubling to 10 s, reset on success."""

    def __init__(self, first: float = FIRST_DELAY_S, cap: float = MAX_DELAY_S):
        self.first, self.cap = first, cap
        self._next = first

    def next(self) -> float:
        delay, self._next = self._next, min(self._next * 2, self.cap)
        return delay

    def reset(self) -> None:
        self._next = self.first


class Stopped(Exception):
    """`retry_until` gave up because its stop event was set."""


def retry_until(
    call: Callable[[], T],
    *,
    outage: Outage,
    stop: threading.Event,
    between: Callable[[], object] | None = None,
) -> T:
    """`call()`'s result, retried with backoff while it raises a `transient` error; raises
    Stopped once `stop` is set. `between()`, run before each retry, may raise to end the retries
    (e.g. the job's lease was lost meanwhile)."""
    backoff = Backoff()
    while True:
        try:
            result = call()
        except Exception as e:
            if not transient(e):
                raise
            outage.failed(e)
        else:
            outage.ok()
            return result
        if stop.wait(backoff.next()):
            raise Stopped()
        if between is not None:
            between()
