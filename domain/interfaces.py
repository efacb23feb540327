"""Repository interfaces. Persistence implements them; callers depend only on these.

No method commits: the caller's unit of work owns the transaction. A lifecycle step that issues
several statements keeps them atomic by itself (one transaction when it runs on a bare
connection), so that each step commits or fails as a whole.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Generic, Protocol, TypeVar
from uuid import UUID

from domain.entities import Agent, Conversation, Doorbell, Task, TaskAttempt, WorkerInfo
from domain.policies import Backoff
from domain.value_objects import TaskStatus

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    items: list[T]
    total: int
    page: int
    page_size: int


# -- what lifecycle steps return ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Finish:
    """A run's final write: did it land, and which tasks to dispatch once it has committed (its
    new subtasks, a parent it resumed)."""

    landed: bool
    doorbells: list[Doorbell] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Miss:
    """Why a doorbell claimed nothing."""

    reason: str
    due_in_seconds: float | None = None  # set when the task is pending but not due yet
    # Pending and due, its agent limited (flow control): only a flow claim of (queue, agent)
    # may start it.
    flow: tuple[str, str] | None = None


@dataclass(frozen=True, slots=True)
class FlowClaim:
    """What a flow claim (a limited agent's next start) came to."""

    task: Task | None
    held: str | None = None  # why nothing started: at its limit, paused, rate limited, none due
    retry_at: datetime | None = None  # rate limited: when the next start is allowed
    more: bool = False  # other tasks were due and allowed: worth another flow claim now
    key: str = ""  # the started task's key
    # The rate steps the start took (seconds per unit; None where that rate is not limited):
    # what `ctx.consume` corrects against the estimate.
    unit_seconds: float | None = None
    key_unit_seconds: float | None = None
    estimate: float = 1.0


@dataclass(frozen=True, slots=True)
class Rescued:
    """A running task whose lease ran out, now pending again (or failed, its attempts spent)."""

    task_id: UUID
    runs: int
    status: TaskStatus
    queue: str


@dataclass(frozen=True, slots=True)
class ExpiredChild:
    task_id: UUID
    run: int
    parent_id: UUID


@dataclass(frozen=True, slots=True)
class CancelResult:
    """What a cancel did: the task as it is now and how many tasks changed (itself included).

    `doorbells`: tasks to dispatch once the transaction commits (a parent that resumed because
    the cancelled task was its last unfinished child).
    """

    task: Task
    cancelled: int
    doorbells: list[Doorbell] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return self.cancelled > 0


@dataclass(frozen=True, slots=True)
class RetryResult:
    task: Task
    retried: bool
    doorbells: list[Doorbell] = field(default_factory=list)


class ITaskRepository(Protocol):
    # -- create and read -----------------------------------------------------------------------

    async def create(self, task: Task) -> Task: ...

    async def create_many(self, tasks: Sequence[Task]) -> list[Task]: ...

    async def get_by_id(self, task_id: UUID) -> Task | None: ...

    async def get_by_idempotency_keys(self, keys: Sequence[str]) -> dict[str, Task]: ...

    async def find_pending_for_agent(
        self,
        agent_id: str | Sequence[str],
        *,
        limit: int = 100,
        queue: str | None = None,
        skip_locked: bool = False,
    ) -> list[Task]: ...

    async def get_subtasks(self, parent_task_id: UUID) -> list[Task]: ...

    async def search(
        self,
        *,
        conversation_id: UUID | None = None,
        agent_id: str | None = None,
        status: TaskStatus | None = None,
        text: str | None = None,
        limit: int = 100,
    ) -> list[Task]: ...

    async def find_paginated(
        self,
        *,
        page: int = 1,
        page_size: int = 50,
        filters: Mapping[str, Any] | None = None,
    ) -> Page[Task]: ...

    async def list_attempts(self, task_id: UUID) -> list[TaskAttempt]: ...

    async def update(self, task: Task) -> Task: ...

    # -- the lifecycle -------------------------------------------------------------------------

    async def claim(
        self,
        ids: Sequence[UUID],
        *,
        worker_id: str,
        lease_seconds: float,
        default_max_attempts: int,
        queue: str | None = None,
    ) -> list[Task]: ...

    async def heartbeat(self, held: Mapping[UUID, int], *, lease_seconds: float) -> set[UUID]: ...

    async def complete(
        self, task: Task, output_json: str, children: Sequence[Task] = (), *, dispatch_delay: float
    ) -> Finish: ...

    async def fail(self, task: Task, error: str, *, dispatch_delay: float) -> Finish: ...

    async def retry_later(self, task: Task, error: str, *, delay_seconds: float) -> bool: ...

    async def release(self, task: Task) -> bool: ...

    async def wait(
        self, task: Task, children: Sequence[Task], *, dispatch_delay: float
    ) -> Finish: ...

    async def cancel(self, task_id: UUID, *, dispatch_delay: float = 0.0) -> CancelResult: ...

    async def retry(self, task_id: UUID, *, dispatch_delay: float = 0.0) -> RetryResult: ...

    async def rescue_roots(self, *, limit: int, backoff: Backoff) -> list[Rescued]: ...

    async def rescue_child(
        self, expired: ExpiredChild, *, backoff: Backoff, dispatch_delay: float
    ) -> tuple[Rescued | None, Doorbell | None]: ...

    async def mark_due_dispatched(
        self, *, queue: str, limit: int, redispatch_seconds: float
    ) -> list[Doorbell]: ...


class IConversationRepository(Protocol):
    async def create(self, conversation: Conversation) -> Conversation: ...

    async def get_by_id(self, conversation_id: UUID) -> Conversation | None: ...


class IAgentRepository(Protocol):
    async def upsert(self, agent: Agent) -> Agent: ...

    async def get_by_id(self, agent_id: str) -> Agent | None: ...


class IWorkerRepository(Protocol):
    async def touch(
        self, *, worker_id: str, hostname: str, pid: int, queue: str, agents: Sequence[str]
    ) -> None: ...

    async def list_live(
        self, *, queue: str | None = None, within_seconds: float = 30.0
    ) -> list[WorkerInfo]: ...
