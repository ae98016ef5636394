"""Sync-mode requests woken the moment their job ends, by the store's events.

A request with `enable_sync_mode` holds its POST until the job is terminal. With a store that
pushes events (PostgreSQL's LISTEN/NOTIFY, `JobStore.listen`), one daemon thread per API process
listens on CHANNEL_FINISHED and wakes the requests waiting for that job, whichever machine's
worker finished it; each request still reads its job every FALLBACK_POLL_S as a fallback (an
event sent while the listening connection was being restored is missed). With a store that has
no events (SQLite) a request reads its job every PLAIN_POLL_S, a few microseconds on one host.

The thread starts on the first sync-mode request, not with the app: most deployments never use
sync mode, and its connection is one more on the database server.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from server.store import CHANNEL_FINISHED, Events, JobStore

log = logging.getLogger("wan_vace.notify")

# How often a waiting request reads its job: with events (a fallback), and without.
FALLBACK_POLL_S = 1.0
PLAIN_POLL_S = 0.1


class Watch:
    """One request's wait for one job, set from the listener thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.event = asyncio.Event()

    def wake(self) -> None:  # any thread
        try:
            self.loop.call_soon_threadsafe(self.event.set)
        except RuntimeError:  # the loop has closed: nobody waits any more
            pass

    async def wait(self, timeout: float) -> None:
        """Until the job's event came (since the last wait) or `timeout` seconds passed."""
        try:
            await asyncio.wait_for(self.event.wait(), timeout)
        except TimeoutError:
            pass
        self.event.clear()


class FinishedWaiters:
    """The requests waiting for jobs to finish, by job id, and the one thread that wakes them."""

    def __init__(self, store: JobStore):
        self.store = store
        self._lock = threading.Lock()
        self._watches: dict[str, set[Watch]] = {}
        self._thread: threading.Thread | None = None
        self._events: Events | None = None
        self._stop = threading.Event()
        self._push = False  # listening: waiters poll at the fallback pace

    @property
    def poll_interval(self) -> float:
        return FALLBACK_POLL_S if self._push else PLAIN_POLL_S

    @contextmanager
    def watch(self, job_id: str) -> Iterator[Watch]:
        """Register a wait for `job_id` (on the running event loop) for the block. Registered
        before the caller first reads the job, so an event sent after that read is not missed."""
        w = Watch(asyncio.get_running_loop())
        with self._lock:
            self._watches.setdefault(job_id, set()).add(w)
            if self._thread is None and not self._stop.is_set():
                # Started here but connecting in the thread: the event loop never waits on it.
                self._thread = threading.Thread(target=self._run, name="finished-jobs-listener", daemon=True)
                self._thread.start()
        try:
            yield w
        finally:
            with self._lock:
                watches = self._watches.get(job_id)
                if watches is not None:
                    watches.discard(w)
                    if not watches:
                        del self._watches[job_id]

    def _run(self) -> None:
        try:
            events = self.store.listen(CHANNEL_FINISHED)
        except Exception as e:  # noqa: BLE001 - never the request's problem: it polls
            log.warning("sync-mode requests poll their jobs: listening for finished jobs failed (%s)", e)
            return
        if events is None:  # a store without events: requests poll at the plain pace
            return
        with self._lock:
            if self._stop.is_set():
                events.close()
                return
            self._events, self._push = events, True
        while not self._stop.is_set():
            try:
                got = events.wait(1.0)
            except Exception:  # keep listening: the waiters' fallback poll covers the gap
                log.exception("the finished-jobs listener failed; listening again")
                self._stop.wait(1.0)
                continue
            for _channel, job_id in got:
                with self._lock:
                    watches = list(self._watches.get(job_id, ()))
                for w in watches:
                    w.wake()

    def close(self) -> None:
        with self._lock:
            self._stop.set()
            events, self._events, self._push = self._events, None, False
        if events is not None:
            events.close()
