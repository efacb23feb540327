"""Domain entities: plain dataclasses with behaviour. No database, no framework.

Every status change goes through `Task._move_to`, which consults the one transition table in
`TaskStatus`. Timestamps are passed in (`at=`): the database clock is the only clock tasklane
trusts, so callers hand the entity the time they got from it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

from domain.exceptions import AttemptsExhaustedError, InvalidInputError, InvalidTransitionError
from domain.ids import new_id
from domain.payload import JsonValue
from domain.policies import Backoff
from domain.value_objects import AttemptOutcome, TaskStatus

DEFAULT_QUEUE = "tasklane"
# Longest agent id and idempotency key a new task may carry. Both are indexed, and a btree entry
# holds at most 2704 bytes: a longer value would reach the database only to be refused there.
# In characters, at up to 4 UTF-8 bytes each.
MAX_AGENT_ID_LENGTH = 200
MAX_IDEMPOTENCY_KEY_LENGTH = 500
# What an agent id is made of: ASCII letters, digits and `_ . : / @ -`, not starting with a
# punctuation mark. ASCII on purpose: the `tasks` CHECK constraint states the same rule in SQL,
# and Unicode notions of "space" or "printable" differ between Python and PostgreSQL's locales.
AGENT_ID_CHARACTERS = "A-Za-z0-9_.:/@-"
_AGENT_ID_START = f"^[A-Za-z0-9_][{AGENT_ID_CHARACTERS}]"
AGENT_ID_PATTERN = f"{_AGENT_ID_START}{{0,{MAX_AGENT_ID_LENGTH - 1}}}$"
_AGENT_ID = re.compile(AGENT_ID_PATTERN.replace("$", r"\Z"))
# The characters alone, at any length: the CHECK constraint's form, which bounds the length
# with char_length (persistence/models/task_model.py says why).
AGENT_ID_CHARACTERS_PATTERN = f"{_AGENT_ID_START}*$"
# The most attempts a task may be given (also a CHECK constraint).
MAX_ATTEMPTS_LIMIT = 10_000
# Priorities run from -MAX_PRIORITY to MAX_PRIORITY (also a CHECK constraint); a task of
# priority p competes as if it had become due p minutes earlier (`Task.due_rank`).
MAX_PRIORITY = 1000


def check_agent_id(agent_id: object) -> str:
    """The agent id, or InvalidInputError saying what is wrong with it."""
    if not isinstance(agent_id, str) or not agent_id:
        raise InvalidInputError(f"agent_id must be a non-empty string, got {agent_id!r:.60}")
    if len(agent_id) > MAX_AGENT_ID_LENGTH:
        raise InvalidInputError(
            f"agent_id is {len(agent_id)} characters, over the limit of "
            f"{MAX_AGENT_ID_LENGTH}: {agent_id!r:.60}"
        )
    if not _AGENT_ID.match(agent_id):
        raise InvalidInputError(
            f"agent_id {agent_id!r:.60} is not a valid agent id: use ASCII letters, digits and "
            f"`_ . : / @ -`, starting with a letter, digit or `_`"
        )
    return agent_id


def check_priority(priority: object) -> int:
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise InvalidInputError(f"priority must be a whole number, got {priority!r:.40}")
    if not -MAX_PRIORITY <= priority <= MAX_PRIORITY:
        raise InvalidInputError(
            f"priority must be between {-MAX_PRIORITY} and {MAX_PRIORITY}, got {priority}"
        )
    return priority


def due_rank(run_after: datetime, priority: int) -> datetime:
    """When a task competes as due: `priority` minutes before it became due. Higher priority
    starts first among due tasks, and a task that has waited longer than the difference in
    priority minutes starts first whatever its priority (aging: nothing starves)."""
    return run_after - timedelta(minutes=priority)


def check_max_attempts(max_attempts: object) -> None:
    if max_attempts is None:
        return
    if isinstance(max_attempts, bool) or not isinstance(max_attempts, int):
        raise InvalidInputError(f"max_attempts must be a whole number, got {max_attempts!r:.40}")
    if not 1 <= max_attempts <= MAX_ATTEMPTS_LIMIT:
        raise InvalidInputError(
            f"max_attempts must be between 1 and {MAX_ATTEMPTS_LIMIT}, got {max_attempts}"
        )


@dataclass(slots=True)
class Task:
    conversation_id: UUID
    agent_id: str
    input: JsonValue = field(default_factory=dict)
    id: UUID = field(default_factory=new_id)
    parent_task_id: UUID | None = None
    status: TaskStatus = TaskStatus.PENDING
    output: JsonValue = None
    error: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    attempts: int = 0
    max_attempts: int | None = None
    run_after: datetime | None = None
    worker_id: str | None = None
    lease_expires_at: datetime | None = None
    idempotency_key: str | None = None
    created_at: datetime | None = None
    started_at: datetime | None = None
    completed_at: datetime | None = None
    updated_at: datetime | None = None
    # Lifecycle bookkeeping beyond the seed's fields:
    queue: str = DEFAULT_QUEUE
    runs: int = 0  # handler runs ever started; the current run's number is its fencing token
    step: int = 0  # how many times the task resumed after waiting for subtasks
    version: int = 1  # bumped by every write; optimistic concurrency for `update`
    priority: int = 0  # higher starts first among due tasks (see `due_rank`)
    # Durable waits: the signal names it waits (or last waited) for, and what resumed it last
    # ("children", "signal", "timeout", "timer", "timeout_fail").
    wait_signals: list[str] | None = None
    woke_by: str | None = None
    trace_context: dict[str, str] | None = None  # observability: W3C traceparent/tracestate

    def __post_init__(self) -> None:
        check_agent_id(self.agent_id)
        check_max_attempts(self.max_attempts)
        check_priority(self.priority)
        if self.parent_task_id is not None and self.parent_task_id == self.id:
            raise InvalidInputError(f"task {self.id} cannot be its own parent")

    def check_new(self) -> None:
        """Limits for a task about to be written (a row already stored is read as it is)."""
        key = self.idempotency_key
        if key is not None and len(key) > MAX_IDEMPOTENCY_KEY_LENGTH:
            raise InvalidInputError(
                f"idempotency_key is {len(key)} characters, over the limit of "
                f"{MAX_IDEMPOTENCY_KEY_LENGTH}"
            )

    # -- queries ---------------------------------------------------------------------------------

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def attempts_left(self) -> bool:
        return self.max_attempts is None or self.attempts < self.max_attempts

    # -- behaviour -------------------------------------------------------------------------------

    def start(
        self,
        *,
        worker_id: str,
        lease_expires_at: datetime,
        at: datetime,
        default_max_attempts: int | None = None,
    ) -> None:
        """A worker claimed the task: one more attempt, a new run (fencing token) and a lease.

        A task submitted without `max_attempts` gets its default now, once: the agent's, else
        the worker's (`default_max_attempts`), and keeps it from then on.
        """
        self.status.check_transition(TaskStatus.RUNNING, self.id)  # a wrong state is the error
        if self.max_attempts is None and default_max_attempts is not None:
            self.max_attempts = default_max_attempts
        if not self.attempts_left:
            assert self.max_attempts is not None
            raise AttemptsExhaustedError(self.id, self.attempts, self.max_attempts)
        self._move_to(TaskStatus.RUNNING, at)
        self.attempts += 1
        self.runs += 1
        self.worker_id = worker_id
        self.lease_expires_at = lease_expires_at
        self.started_at = at

    def complete(self, output: JsonValue, *, at: datetime) -> None:
        self._move_to(TaskStatus.COMPLETED, at)
        self.output = output
        self.error = None
        self._finish(at)

    def fail(self, error: str, *, at: datetime) -> None:
        self._move_to(TaskStatus.FAILED, at)
        self.error = error
        self._finish(at)

    def wait(self, *, at: datetime) -> None:
        """The handler spawned subtasks and waits for all of them to finish."""
        self._move_to(TaskStatus.WAITING, at)
        self.lease_expires_at = None

    def resume(self, *, at: datetime) -> None:
        """All subtasks finished: the handler runs again for its next step, with fresh attempts."""
        self._require(TaskStatus.WAITING, TaskStatus.PENDING, "only a waiting task resumes")
        self._move_to(TaskStatus.PENDING, at)
        self.attempts = 0
        self.step += 1
        self.run_after = at

    def cancel(self, *, at: datetime) -> None:
        self._move_to(TaskStatus.CANCELLED, at)
        self._finish(at)

    def retry(self, *, at: datetime, run_after: datetime | None = None) -> None:
        """Run again: a handler's retry (from running) or an operator's retry (from failed).

        An operator's retry starts the current step over with fresh attempts; a handler's retry
        keeps the attempts it has used.
        """
        if self.status not in (TaskStatus.RUNNING, TaskStatus.FAILED):
            # waiting → pending is a resume, not a retry: it starts the next step.
            raise InvalidTransitionError(
                self.status.value,
                TaskStatus.PENDING.value,
                self.id,
                "only a running or failed task is retried",
            )
        operator_retry = self.status is TaskStatus.FAILED
        if not operator_retry and not self.attempts_left:
            # As in the SQL: a pending task with its attempts spent could never be claimed.
            assert self.max_attempts is not None
            raise AttemptsExhaustedError(self.id, self.attempts, self.max_attempts)
        self._move_to(TaskStatus.PENDING, at)
        if operator_retry:  # the same fields the OPERATOR_RETRY statement resets
            self.attempts = 0
            self.error = None
            self.output = None
            self.completed_at = None
        self.run_after = run_after or at
        self.lease_expires_at = None

    def release(self, *, at: datetime) -> None:
        """Graceful shutdown handed the task back: its attempt is given back."""
        self._require(TaskStatus.RUNNING, TaskStatus.PENDING, "only a running task is released")
        self._move_to(TaskStatus.PENDING, at)
        self.attempts = max(0, self.attempts - 1)
        self.run_after = at
        self.lease_expires_at = None

    def expire_lease(self, *, at: datetime, backoff_seconds: float = 0.0) -> None:
        """The lease ran out (worker killed, loop blocked): retry after the backoff, or fail if
        attempts are spent. Either way the error says where the lease was lost."""
        self._require(TaskStatus.RUNNING, TaskStatus.PENDING, "only a running task holds a lease")
        error = f"lease expired on worker {self.worker_id or '?'}"
        if self.attempts_left:
            self.retry(at=at, run_after=at + timedelta(seconds=backoff_seconds))
            self.error = error
        else:
            self.fail(error, at=at)

    def retry_delay_after_failure(
        self,
        *,
        permanent: bool,
        retry_after: float | None,
        default_max_attempts: int,
        backoff: Backoff,
    ) -> float | None:
        """What a failed run leads to: None, fail now (a permanent error, or its attempts are
        spent); else retry after that many seconds (the handler's `Retry(after=…)`, else the
        backoff)."""
        if permanent or self.attempts >= (self.max_attempts or default_max_attempts):
            return None
        return retry_after if retry_after is not None else backoff.delay(self.attempts)

    def _require(self, expected: TaskStatus, target: TaskStatus, reason: str) -> None:
        if self.status is not expected:
            raise InvalidTransitionError(self.status.value, target.value, self.id, reason)

    def _move_to(self, target: TaskStatus, at: datetime) -> None:
        self.status.check_transition(target, self.id)
        self.status = target
        self.updated_at = at

    def _finish(self, at: datetime) -> None:
        self.completed_at = at
        self.lease_expires_at = None


@dataclass(slots=True)
class Conversation:
    user_id: str
    title: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    id: UUID = field(default_factory=new_id)
    created_at: datetime | None = None
    updated_at: datetime | None = None

    def __post_init__(self) -> None:
        if not self.user_id or not self.user_id.strip():
            raise InvalidInputError("user_id must be a non-empty string")


@dataclass(slots=True)
class Agent:
    id: str
    description: str | None = None
    max_attempts: int | None = None  # the decorator's default, used when a task sets none
    timeout_seconds: float | None = None
    last_seen_at: datetime | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None

    def __post_init__(self) -> None:
        check_agent_id(self.id)


@dataclass(slots=True, frozen=True)
class TaskAttempt:
    """One handler run of a task, as an operator reads it in the history."""

    task_id: UUID
    run: int
    attempt: int
    worker_id: str | None
    started_at: datetime
    finished_at: datetime | None
    outcome: AttemptOutcome | None
    error: str | None


@dataclass(slots=True, frozen=True)
class WorkerInfo:
    """A registered worker process (the `workers` table)."""

    id: str
    hostname: str
    pid: int
    queue: str
    agents: tuple[str, ...]
    started_at: datetime
    last_seen_at: datetime
    abandoned_handlers: int = 0  # handlers left running past their timeout, ignoring it


@dataclass(slots=True, frozen=True)
class Doorbell:
    """A request to run a pending task: what the arq job carries is only the task id.

    Its job id names the run it is for, so a doorbell re-sent while the first is still queued is
    absorbed by Redis, while the doorbell for a later run (after a retry or a resume) is not.
    """

    task_id: UUID
    runs: int  # runs the task has had so far; this doorbell is for run `runs + 1`
    queue: str | None = None  # the task's queue; None: the ringer's own
    # When the task competes as due (`due_rank`), by the database clock: the doorbell's place in
    # its queue.
    due_at: datetime | None = None

    @classmethod
    def for_task(cls, task: Task) -> Doorbell:
        due = task.run_after and due_rank(task.run_after, task.priority)
        return cls(task.id, task.runs, task.queue, due)

    @property
    def job_id(self) -> str:
        return f"{self.task_id}:{self.runs + 1}"
