"""Repository interfaces. Persistence implements them; callers depend only on these.

No method commits: the caller's unit of work owns the transaction.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Generic, Protocol, TypeVar
from uuid import UUID

from domain.entities import (
    Agent,
    Conversation,
    ConversationWithTasks,
    Doorbell,
    Task,
    TaskAttempt,
)
from domain.value_objects import TaskStatus

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    items: list[T]
    total: int
    page: int
    page_size: int


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
    async def create(self, task: Task) -> Task: ...

    async def create_many(self, tasks: Sequence[Task]) -> list[Task]: ...

    async def get_by_id(self, task_id: UUID) -> Task | None: ...

    async def get_by_idempotency_key(self, key: str) -> Task | None: ...

    async def update(self, task: Task) -> Task: ...

    async def find_pending_for_agent(
        self, agent_id: str, *, limit: int = 100, skip_locked: bool = False
    ) -> list[Task]: ...

    async def get_subtasks(self, parent_task_id: UUID) -> list[Task]: ...

    async def get_descendants(self, task_id: UUID) -> list[Task]: ...

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

    async def cancel(self, task_id: UUID) -> CancelResult: ...

    async def retry(self, task_id: UUID) -> RetryResult: ...

    async def count_prunable(
        self, *, older_than: datetime, statuses: Sequence[TaskStatus]
    ) -> int: ...

    async def prune_batch(
        self, *, older_than: datetime, statuses: Sequence[TaskStatus], batch_size: int = 1000
    ) -> int: ...


class IConversationRepository(Protocol):
    async def create(self, conversation: Conversation) -> Conversation: ...

    async def get_by_id(self, conversation_id: UUID) -> Conversation | None: ...

    async def find_by_user(self, user_id: str, *, limit: int = 100) -> list[Conversation]: ...

    async def find_with_tasks(self, user_id: str) -> list[ConversationWithTasks]: ...


class IAgentRepository(Protocol):
    async def upsert(self, agent: Agent) -> Agent: ...

    async def get_by_id(self, agent_id: str) -> Agent | None: ...

    async def list_all(self) -> list[Agent]: ...
