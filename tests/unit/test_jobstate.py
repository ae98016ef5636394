import pytest

from server.kernel.jobstate import Event, IllegalTransition, State, allowed, next_state


def test_happy_path():
    s = next_state(State.CREATED, Event.CLAIM)
    assert s is State.PROCESSING
    assert next_state(s, Event.COMPLETE) is State.COMPLETED


@pytest.mark.parametrize(
    "state,event,expected",
    [
        (State.CREATED, Event.CANCEL, State.CANCELLED),
        (State.CREATED, Event.FAIL, State.FAILED),
        (State.PROCESSING, Event.FAIL, State.FAILED),
        (State.PROCESSING, Event.CANCEL, State.CANCELLED),
        (State.PROCESSING, Event.HAND_BACK, State.CREATED),
    ],
)
def test_legal(state, event, expected):
    assert next_state(state, event) is expected


@pytest.mark.parametrize("state", [State.COMPLETED, State.FAILED, State.CANCELLED])
@pytest.mark.parametrize("event", list(Event))
def test_terminal_states_are_final(state, event):
    assert state.terminal
    assert not allowed(state, event)
    with pytest.raises(IllegalTransition):
        next_state(state, event)


def test_cannot_complete_unclaimed_job():
    with pytest.raises(IllegalTransition):
        next_state(State.CREATED, Event.COMPLETE)
    with pytest.raises(IllegalTransition):
        next_state(State.PROCESSING, Event.CLAIM)


def test_lost_lease_requeues_while_attempts_remain():
    assert next_state(State.PROCESSING, Event.LEASE_LOST, attempts=1, max_attempts=2) is State.CREATED
    assert next_state(State.PROCESSING, Event.LEASE_LOST, attempts=2, max_attempts=2) is State.FAILED
    assert not allowed(State.CREATED, Event.LEASE_LOST)


def test_hand_back_always_requeues():
    # A graceful stop is not the job's fault: queued again even on its last attempt.
    for attempts in (0, 1, 2, 5):
        new = next_state(State.PROCESSING, Event.HAND_BACK, attempts=attempts, max_attempts=2)
        assert new is State.CREATED
    assert allowed(State.PROCESSING, Event.HAND_BACK)
    assert not allowed(State.CREATED, Event.HAND_BACK)
    with pytest.raises(IllegalTransition):
        next_state(State.CREATED, Event.HAND_BACK)


def test_module_is_pure():
    import ast
    import inspect

    import server.kernel.jobstate as m

    tree = ast.parse(inspect.getsource(m))
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} | {
        a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names
    }
    assert imported <= {"__future__", "enum"}, imported
