"""The one-job hand-off between a worker's device stage and its CPU stage.

The slot is the CPU stage itself: it stays taken from `put` until the CPU stage calls `done`
(the job's outputs are stored and its outcome recorded, or it ended otherwise). So the device
stage, which claims only between two `put`s, owns at most one job besides the one in the CPU
stage, and a rendered job waits only for the encode ahead of it, never behind a queue.
"""

from __future__ import annotations

import threading
from typing import Generic, TypeVar

T = TypeVar("T")


class Handoff(Generic[T]):
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._item: T | None = None
        self._taken = False  # the CPU stage is working on an item
        self._closed = False

    def put(self, item: T) -> bool:
        """Wait until the CPU stage is free, then hand it `item`; False (not handed over) once
        the hand-off is closed."""
        with self._cond:
            while (self._item is not None or self._taken) and not self._closed:
                self._cond.wait()
            if self._closed:
                return False
            self._item = item
            self._cond.notify_all()
            return True

    def take(self) -> T | None:
        """The next item, once there is one; None when the hand-off is closed and empty. An item
        handed over before the close is still taken, so its stage can clean up after it."""
        with self._cond:
            while self._item is None and not self._closed:
                self._cond.wait()
            item, self._item = self._item, None
            self._taken = item is not None
            return item

    def done(self) -> None:
        """The CPU stage is free again."""
        with self._cond:
            self._taken = False
            self._cond.notify_all()

    def close(self) -> None:
        """No more items: a `put` waiting or to come returns False, `take` returns None once
        empty."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def busy(self) -> bool:
        with self._cond:
            return self._item is not None or self._taken
