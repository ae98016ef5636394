"""The job state machine: states, events and legal transitions. Pure: no I/O, no FastAPI, no
SQL, no torch, so it is tested in microseconds and the stores cannot disagree about it.

    created ──claim──▶ processing ──complete──▶ completed
       │                  │ │ └────fail──────▶ failed
       │                  │ └──cancel────────▶ cancelled
       │                  ├──lease_lost──▶ created (attempts left) | failed (none left)
       │                  └──hand_back───▶ created (always)
       ├──cancel──▶ cancelled
       └──fail────▶ failed      (e.g. expired before any worker could run it)

`lease_lost` is a crash, a lost lease or a retryable error: the claim counted as an attempt.
`hand_back` is a graceful stop (the worker was asked to stop, the server is shutting down): the
job did nothing wrong, so it is always queued again and the store gives its attempt back.

`created` is WaveSpeed's name for "queued"; clients treat every non-terminal status as "keep
polling", and only `completed`, `failed`, `cancelled` end a poll loop (contract §1.3).
"""

from __future__ import annotations

from enum import Enum


class State(str, Enum):
    CREATED = "created"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({State.COMPLETED, State.FAILED, State.CANCELLED})


class Event(str, Enum):
    CLAIM = "claim"
    COMPLETE = "complete"
    FAIL = "fail"
    CANCEL = "cancel"
    LEASE_LOST = "lease_lost"  # worker died or stopped renewing
    HAND_BACK = "hand_back"  # worker stopped gracefully: queued again, the attempt not counted


class IllegalTransition(ValueError):
    pass


_TABLE: dict[tuple[State, Event], State] = {
    (State.CREATED, Event.CLAIM): State.PROCESSING,
    (State.CREATED, Event.CANCEL): State.CANCELLED,
    (State.CREATED, Event.FAIL): State.FAILED,
    (State.PROCESSING, Event.COMPLETE): State.COMPLETED,
    (State.PROCESSING, Event.FAIL): State.FAILED,
    (State.PROCESSING, Event.CANCEL): State.CANCELLED,
    (State.PROCESSING, Event.HAND_BACK): State.CREATED,
}


def next_state(state: State, event: Event, *, attempts: int = 0, max_attempts: int = 1) -> State:
    """The state after `event`, or IllegalTransition.

    A lost lease re-queues the job while attempts remain (`attempts` counts claims so far),
    otherwise fails it: a job is never left `processing` without a live owner.
    """
    if state is State.PROCESSING and event is Event.LEASE_LOST:
        return State.CREATED if attempts < max_attempts else State.FAILED
    try:
        return _TABLE[(state, event)]
    except KeyError:
        raise IllegalTransition(f"{event.value} is not allowed in state {state.value}") from None


def allowed(state: State, event: Event) -> bool:
    return (state, event) in _TABLE or (state is State.PROCESSING and event is Event.LEASE_LOST)


class WorkerState(str, Enum):
    """What a worker row says about its process (shown in /health)."""

    STARTING = "starting"
    LOADING = "loading"  # loading weights and warming up
    READY = "ready"  # idle, claiming
    BUSY = "busy"  # running a job
    FAILED = "failed"  # could not load its model: not restarted, the reason says why
    # Asked to stop (SIGTERM): claims nothing more, finishes the jobs it holds within the
    # shutdown grace, then hands back what is left.
    STOPPING = "stopping"
    STOPPED = "stopped"


class RenewResult(str, Enum):
    """What renewing a job's lease answers."""

    OK = "ok"
    CANCELLED = "cancelled"  # the job was cancelled: stop now, write nothing
    LOST = "lost"  # another owner or a terminal state: stop now, write nothing
