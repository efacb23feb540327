"""Behaviour of the domain entities, one method at a time (no services)."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import RFC_4122, UUID, uuid4

import pytest

from domain.entities import Agent, Conversation, Doorbell, Task
from domain.exceptions import AttemptsExhaustedError, InvalidInputError, InvalidTransitionError
from domain.ids import new_id
from domain.value_objects import TaskStatus

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
LEASE = timedelta(seconds=30)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def new_task(**kwargs: Any) -> Task:
    return Task(conversation_id=uuid4(), agent_id="echo", **kwargs)


def started(task: Task, when: float = 1) -> Task:
    task.start(worker_id="w1", lease_expires_at=at(when) + LEASE, at=at(when))
    return task


# -- construction -------------------------------------------------------------------------------


def test_a_new_task_is_pending_with_no_attempts() -> None:
    task = new_task()
    assert task.status is TaskStatus.PENDING
    assert (task.attempts, task.runs, task.step, task.version) == (0, 0, 0, 1)
    assert task.input == {}
    assert task.metadata == {}
    assert task.attempts_left
    assert not task.is_finished


def test_tasks_do_not_share_mutable_defaults() -> None:
    a, b = new_task(), new_task()
    a.metadata["k"] = 1
    assert b.metadata == {}
    assert a.id != b.id


@pytest.mark.parametrize(
    ("agent_id", "message"),
    [
        ("", "agent_id must be a non-empty string"),
        ("   ", "is not a valid agent id"),
        ("\t", "is not a valid agent id"),
        ("echo\n", "is not a valid agent id"),
        ("-echo", "is not a valid agent id"),
        ("é", "is not a valid agent id"),
        ("x" * 201, "over the limit of 200"),
    ],
)
def test_a_task_needs_a_valid_agent_id(agent_id: str, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        Task(conversation_id=uuid4(), agent_id=agent_id)


def test_max_attempts_is_bounded() -> None:
    Task(conversation_id=uuid4(), agent_id="echo", max_attempts=10_000)
    with pytest.raises(InvalidInputError, match="between 1 and 10000"):
        Task(conversation_id=uuid4(), agent_id="echo", max_attempts=10_001)


def test_a_task_is_not_its_own_parent() -> None:
    task_id = uuid4()
    with pytest.raises(InvalidInputError, match="its own parent"):
        Task(conversation_id=uuid4(), agent_id="echo", id=task_id, parent_task_id=task_id)


@pytest.mark.parametrize("max_attempts", [0, -1])
def test_max_attempts_must_be_positive(max_attempts: int) -> None:
    with pytest.raises(InvalidInputError, match=f"got {max_attempts}"):
        new_task(max_attempts=max_attempts)


# -- start --------------------------------------------------------------------------------------


def test_start_counts_an_attempt_and_a_run_and_takes_a_lease() -> None:
    task = started(new_task(max_attempts=3), when=5)
    assert task.status is TaskStatus.RUNNING
    assert (task.attempts, task.runs) == (1, 1)
    assert task.worker_id == "w1"
    assert task.started_at == at(5)
    assert task.lease_expires_at == at(5) + LEASE
    assert task.updated_at == at(5)


def test_start_refuses_when_attempts_are_spent() -> None:
    task = new_task(attempts=2, max_attempts=2)  # e.g. max_attempts lowered by an operator
    with pytest.raises(AttemptsExhaustedError, match="has used 2 of 2 attempts"):
        started(task)
    assert task.status is TaskStatus.PENDING
    assert (task.attempts, task.runs) == (2, 0)


def test_start_without_max_attempts_is_unbounded() -> None:
    task = new_task(attempts=100)
    started(task)
    assert task.attempts == 101


def test_start_of_a_running_task_is_a_transition_error_even_with_attempts_spent() -> None:
    task = started(new_task(max_attempts=1))
    with pytest.raises(InvalidTransitionError, match="running → running"):
        started(task, when=2)
    assert (task.attempts, task.runs, task.started_at) == (1, 1, at(1))


# -- complete / fail / cancel -------------------------------------------------------------------


def test_complete_stores_the_output_and_finishes() -> None:
    task = started(new_task())
    task.error = "an earlier attempt's error"
    task.complete({"y": 4}, at=at(3))
    assert task.status is TaskStatus.COMPLETED
    assert task.output == {"y": 4}
    assert task.error is None
    assert task.completed_at == at(3)
    assert task.lease_expires_at is None
    assert task.is_finished


def test_fail_stores_the_error_and_finishes() -> None:
    task = started(new_task())
    task.fail("boom", at=at(3))
    assert task.status is TaskStatus.FAILED
    assert task.error == "boom"
    assert task.completed_at == at(3)
    assert task.lease_expires_at is None
    assert task.attempts == 1


@pytest.mark.parametrize("setup", ["pending", "running", "waiting"])
def test_cancel_from_every_unfinished_state(setup: str) -> None:
    task = new_task()
    if setup != "pending":
        started(task)
    if setup == "waiting":
        task.wait(at=at(2))
    task.cancel(at=at(3))
    assert task.status is TaskStatus.CANCELLED
    assert task.completed_at == at(3)
    assert task.lease_expires_at is None


@pytest.mark.parametrize("final", ["complete", "cancel"])
def test_final_states_refuse_everything(final: str) -> None:
    task = started(new_task())
    if final == "complete":
        task.complete(1, at=at(2))
    else:
        task.cancel(at=at(2))
    status = task.status
    for op in (
        lambda: started(task, when=3),
        lambda: task.complete(2, at=at(3)),
        lambda: task.fail("x", at=at(3)),
        lambda: task.cancel(at=at(3)),
        lambda: task.retry(at=at(3)),
        lambda: task.wait(at=at(3)),
        lambda: task.resume(at=at(3)),
        lambda: task.release(at=at(3)),
        lambda: task.expire_lease(at=at(3)),
    ):
        with pytest.raises(InvalidTransitionError, match=f"{status.value} → "):
            op()
    assert task.status is status
    assert task.updated_at == at(2)


# -- wait / resume ------------------------------------------------------------------------------


def test_wait_drops_the_lease() -> None:
    task = started(new_task())
    task.wait(at=at(2))
    assert task.status is TaskStatus.WAITING
    assert task.lease_expires_at is None
    assert task.attempts == 1


def test_resume_resets_attempts_and_starts_the_next_step() -> None:
    task = started(new_task(max_attempts=2))
    task.retry(at=at(2))
    started(task, when=3)
    assert task.attempts == 2
    task.wait(at=at(4))
    task.resume(at=at(10))
    assert task.status is TaskStatus.PENDING
    assert (task.attempts, task.step, task.runs) == (0, 1, 2)
    assert task.run_after == at(10)
    started(task, when=11)  # the new step has fresh attempts
    assert task.attempts == 1


def test_only_a_waiting_task_resumes() -> None:
    task = started(new_task())
    with pytest.raises(InvalidTransitionError, match="only a waiting task resumes"):
        task.resume(at=at(2))
    assert task.step == 0


# -- retry --------------------------------------------------------------------------------------


def test_handler_retry_keeps_the_attempts_used() -> None:
    task = started(new_task(max_attempts=3))
    task.retry(at=at(2), run_after=at(60))
    assert task.status is TaskStatus.PENDING
    assert task.attempts == 1
    assert task.run_after == at(60)
    assert task.lease_expires_at is None


def test_handler_retry_without_a_time_is_due_now() -> None:
    task = started(new_task())
    task.retry(at=at(2))
    assert task.run_after == at(2)


def test_handler_retry_with_attempts_spent_is_refused() -> None:
    task = started(new_task(max_attempts=1))
    with pytest.raises(AttemptsExhaustedError):
        task.retry(at=at(2))
    assert task.status is TaskStatus.RUNNING


def test_operator_retry_from_failed_resets_attempts_and_error() -> None:
    task = started(new_task(max_attempts=1))
    task.fail("boom", at=at(2))
    task.retry(at=at(5))
    assert task.status is TaskStatus.PENDING
    assert task.attempts == 0
    assert task.error is None
    assert task.output is None
    assert task.completed_at is None
    assert task.run_after == at(5)
    assert task.runs == 1  # the run count is history: never reset
    started(task, when=6)
    assert (task.attempts, task.runs) == (1, 2)


@pytest.mark.parametrize("setup", ["pending", "waiting"])
def test_retry_needs_a_running_or_failed_task(setup: str) -> None:
    task = new_task()
    if setup == "waiting":
        started(task)
        task.wait(at=at(2))
    with pytest.raises(InvalidTransitionError, match="only a running or failed task is retried"):
        task.retry(at=at(3))
    assert task.status.value == setup


# -- release / expire_lease ---------------------------------------------------------------------


def test_release_gives_the_attempt_back() -> None:
    task = started(new_task(max_attempts=1))
    task.release(at=at(2))
    assert task.status is TaskStatus.PENDING
    assert (task.attempts, task.runs) == (0, 1)
    assert task.run_after == at(2)
    assert task.lease_expires_at is None
    started(task, when=3)  # the attempt it gave back can be used again
    assert task.attempts == 1


def test_only_a_running_task_is_released() -> None:
    task = new_task()
    with pytest.raises(InvalidTransitionError, match="pending → pending"):
        task.release(at=at(1))


def test_expired_lease_with_attempts_left_goes_back_to_pending() -> None:
    task = started(new_task(max_attempts=2))
    task.expire_lease(at=at(40), backoff_seconds=5)
    assert task.status is TaskStatus.PENDING
    assert task.attempts == 1
    assert task.lease_expires_at is None
    assert task.run_after == at(45)  # the rescuer's backoff, as in SQL
    assert task.error == "lease expired on worker w1"


def test_expired_lease_with_attempts_spent_fails() -> None:
    task = started(new_task(max_attempts=1))
    task.expire_lease(at=at(40))
    assert task.status is TaskStatus.FAILED
    assert task.error == "lease expired on worker w1"  # the rescue statement's error
    assert task.completed_at == at(40)


@pytest.mark.parametrize("setup", ["pending", "waiting", "failed"])
def test_only_a_running_task_has_a_lease_to_expire(setup: str) -> None:
    task = new_task(max_attempts=3)
    if setup != "pending":
        started(task)
        if setup == "waiting":
            task.wait(at=at(2))
        else:
            task.fail("boom", at=at(2))
    with pytest.raises(InvalidTransitionError, match="only a running task holds a lease"):
        task.expire_lease(at=at(40))
    assert task.status.value == setup


# -- conversations, agents, doorbells -----------------------------------------------------------


def test_conversation_defaults() -> None:
    conv = Conversation(user_id="u1")
    assert conv.title is None
    assert conv.metadata == {}
    assert conv.id != Conversation(user_id="u1").id


@pytest.mark.parametrize("user_id", ["", "  "])
def test_a_conversation_needs_a_user(user_id: str) -> None:
    with pytest.raises(InvalidInputError, match="user_id must be a non-empty string"):
        Conversation(user_id=user_id)


def test_agent() -> None:
    agent = Agent(id="echo", description="echoes", max_attempts=5)
    assert (agent.id, agent.description, agent.max_attempts) == ("echo", "echoes", 5)
    with pytest.raises(InvalidInputError, match="is not a valid agent id"):
        Agent(id=" ")


def test_doorbell_job_id_names_the_next_run() -> None:
    task_id = uuid4()
    assert Doorbell(task_id, 0).job_id == f"{task_id}:1"
    assert Doorbell(task_id, 3).job_id == f"{task_id}:4"


def test_new_ids_are_uuid7_and_strictly_increasing() -> None:
    # Enough ids to overflow the per-millisecond counter at least once.
    ids = [new_id() for _ in range(20_000)]
    assert all(i.version == 7 for i in ids)
    assert all(i.variant == RFC_4122 for i in ids)
    assert all(a < b for a, b in itertools.pairwise(ids))
    assert len(set(ids)) == len(ids)
    assert isinstance(Task(conversation_id=uuid4(), agent_id="a").id, UUID)
    assert Task(conversation_id=uuid4(), agent_id="a").id.version == 7
