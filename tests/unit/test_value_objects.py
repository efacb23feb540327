"""The transition table of `TaskStatus`, checked against a table written out here by hand, and a
property test driving `Task` through random sequences of operations."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from uuid import uuid4

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from domain.entities import Task
from domain.exceptions import AttemptsExhaustedError, InvalidTransitionError
from domain.value_objects import (
    FINAL_STATUSES,
    FINISHED_STATUSES,
    UNFINISHED_STATUSES,
    TaskStatus,
)

P, R, W = TaskStatus.PENDING, TaskStatus.RUNNING, TaskStatus.WAITING
C, F, X = TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED

# The transition table of docs/architecture.md, written out by hand: (from, to) pairs that
# are allowed. Every other pair is not.
EXPECTED_ALLOWED = {
    (P, R),
    (P, X),
    (R, C),
    (R, F),
    (R, P),
    (R, W),
    (R, X),
    (W, P),
    (W, X),
    (F, P),
}
ALL_PAIRS = [(a, b) for a in TaskStatus for b in TaskStatus]


def test_there_are_six_statuses_stored_as_lower_case_strings() -> None:
    assert [s.value for s in TaskStatus] == [
        "pending",
        "running",
        "waiting",
        "completed",
        "failed",
        "cancelled",
    ]
    assert len(ALL_PAIRS) == 36


@pytest.mark.parametrize(("source", "target"), ALL_PAIRS, ids=lambda s: str(s))
def test_transition_table(source: TaskStatus, target: TaskStatus) -> None:
    allowed = (source, target) in EXPECTED_ALLOWED
    assert source.can_transition_to(target) is allowed
    if allowed:
        source.check_transition(target)
    else:
        with pytest.raises(InvalidTransitionError):
            source.check_transition(target)


def test_invalid_transition_error_names_both_states_and_the_task() -> None:
    task_id = uuid4()
    with pytest.raises(InvalidTransitionError) as info:
        TaskStatus.COMPLETED.check_transition(TaskStatus.RUNNING, task_id)
    err = info.value
    assert (err.current, err.target, err.task_id) == ("completed", "running", task_id)
    assert "completed → running is not allowed" in str(err)
    assert str(task_id) in str(err)


@pytest.mark.parametrize("target", list(TaskStatus), ids=str)
def test_sources_of_is_the_inverse_of_the_table(target: TaskStatus) -> None:
    expected = tuple(s for s in TaskStatus if (s, target) in EXPECTED_ALLOWED)
    assert TaskStatus.sources_of(target) == expected


def test_sources_of_examples() -> None:
    assert TaskStatus.sources_of(P) == (R, W, F)
    assert TaskStatus.sources_of(X) == (P, R, W)
    assert TaskStatus.sources_of(R) == (P,)


def test_final_finished_and_unfinished_sets() -> None:
    assert frozenset({C, X}) == FINAL_STATUSES
    assert frozenset({C, F, X}) == FINISHED_STATUSES
    assert frozenset({P, R, W}) == UNFINISHED_STATUSES
    assert [s for s in TaskStatus if s.is_final] == [C, X]
    assert [s for s in TaskStatus if s.is_finished] == [C, F, X]


def test_from_string() -> None:
    assert TaskStatus.from_string("waiting") is W
    with pytest.raises(ValueError, match=r"unknown task status 'done' \(expected one of: pending"):
        TaskStatus.from_string("done")


# -- property test: random operations on a Task -------------------------------------------------

T0 = datetime(2030, 1, 1, tzinfo=UTC)
Op = Callable[[Task, datetime], None]

OPERATIONS: dict[str, Op] = {
    "start": lambda t, at: t.start(
        worker_id="w1", lease_expires_at=at + timedelta(seconds=30), at=at
    ),
    "complete": lambda t, at: t.complete({"ok": True}, at=at),
    "fail": lambda t, at: t.fail("boom", at=at),
    "wait": lambda t, at: t.wait(at=at),
    "resume": lambda t, at: t.resume(at=at),
    "cancel": lambda t, at: t.cancel(at=at),
    "retry": lambda t, at: t.retry(at=at),
    "release": lambda t, at: t.release(at=at),
    "expire_lease": lambda t, at: t.expire_lease(at=at),
}

# The status each operation needs, and the status it leads to (expire_lease: pending or failed).
OP_SOURCES = {
    "start": {P},
    "complete": {R},
    "fail": {R},
    "wait": {R},
    "resume": {W},
    "cancel": {P, R, W},
    "retry": {R, F},
    "release": {R},
    "expire_lease": {R},
}


def _snapshot(task: Task) -> dict[str, object]:
    return copy.deepcopy(dataclasses.asdict(task))


@settings(max_examples=300, deadline=None)
@given(
    ops=st.lists(st.sampled_from(sorted(OPERATIONS)), max_size=40),
    max_attempts=st.one_of(st.none(), st.integers(min_value=1, max_value=4)),
)
def test_random_operations_keep_the_invariants(ops: list[str], max_attempts: int | None) -> None:
    task = Task(conversation_id=uuid4(), agent_id="echo", max_attempts=max_attempts)
    for i, name in enumerate(ops):
        at = T0 + timedelta(seconds=i + 1)
        before = _snapshot(task)
        source = task.status
        refused: InvalidTransitionError | AttemptsExhaustedError | None = None
        try:
            OPERATIONS[name](task, at)
        except (InvalidTransitionError, AttemptsExhaustedError) as exc:
            refused = exc
        if refused is not None:
            # A refused operation changes nothing.
            assert _snapshot(task) == before, f"{name} from {source} changed the task"
        if isinstance(refused, InvalidTransitionError):
            # ... and is refused exactly where the operation does not apply, naming the state.
            assert source not in OP_SOURCES[name], f"{name} refused from {source}"
            assert refused.current == source.value
            continue
        if isinstance(refused, AttemptsExhaustedError):
            # Only where the move itself is legal: otherwise the transition error says why.
            assert source in OP_SOURCES[name], f"{name} from {source}: attempts, not transition"
            assert max_attempts is not None
            assert before["attempts"] == max_attempts
            continue
        # A legal operation: from a status the operation accepts, along the table.
        assert source in OP_SOURCES[name], f"{name} accepted from {source}"
        assert source.can_transition_to(task.status)
        assert task.updated_at == at
        # Final states are never left; failed is left only by a retry, to pending.
        assert not source.is_final
        if source is F:
            assert (name, task.status) == ("retry", P)
        # Attempts stay within their bounds.
        assert task.attempts >= 0
        if max_attempts is not None:
            assert task.attempts <= max_attempts
        assert task.runs >= task.attempts
        # A pending task can always be claimed: it never waits with its attempts spent.
        if task.status is P:
            assert task.attempts_left
