"""Domain errors. Each carries the ids and states involved so that its message explains itself."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterable
    from uuid import UUID


class DomainError(Exception):
    """Base of every error tasklane raises on purpose."""


class EntityNotFoundError(DomainError, LookupError):
    def __init__(self, entity: str, entity_id: object, detail: str | None = None) -> None:
        self.entity = entity
        self.entity_id = entity_id
        message = f"{entity} {entity_id} not found"
        super().__init__(f"{message}: {detail}" if detail else message)


class EntityAlreadyExistsError(DomainError):
    def __init__(self, entity: str, detail: str) -> None:
        self.entity = entity
        self.detail = detail
        super().__init__(f"{entity} already exists: {detail}")


class InvalidTransitionError(DomainError):
    def __init__(
        self, current: str, target: str, task_id: UUID | None = None, reason: str | None = None
    ) -> None:
        self.current = current
        self.target = target
        self.task_id = task_id
        subject = f"task {task_id}: " if task_id else ""
        why = f" ({reason})" if reason else ""
        super().__init__(f"{subject}{current} → {target} is not allowed{why}")


class ConcurrentUpdateError(DomainError):
    """Somebody else changed the row between our read and our write (optimistic concurrency)."""

    def __init__(self, entity: str, entity_id: object, expected_version: int) -> None:
        self.entity = entity
        self.entity_id = entity_id
        self.expected_version = expected_version
        super().__init__(
            f"{entity} {entity_id} was changed concurrently "
            f"(expected version {expected_version}); reload it and try again"
        )


class TaskNotEditableError(DomainError):
    """An operator's edit of a task that has already started (or finished)."""

    def __init__(self, task_id: UUID, status: str) -> None:
        self.task_id = task_id
        self.status = status
        super().__init__(
            f"task {task_id} is {status}: only a pending task can be edited "
            "(its run_after, max_attempts and metadata)"
        )


class SignalRefusedError(DomainError):
    """A signal for a task that has finished: nothing would ever read it."""

    def __init__(self, task_id: UUID, status: str) -> None:
        self.task_id = task_id
        self.status = status
        super().__init__(f"task {task_id} is {status}: a finished task takes no signal")


class InvalidInputError(DomainError, ValueError):
    """Input rejected before anything was written."""


class InvalidFilterError(InvalidInputError):
    def __init__(self, entity: str, field: str, allowed: Iterable[str]) -> None:
        self.entity = entity
        self.field = field
        self.allowed = tuple(sorted(allowed))
        super().__init__(
            f"cannot filter {entity} by {field!r}; allowed fields: {', '.join(self.allowed)}"
        )


class IdempotencyConflictError(DomainError):
    def __init__(self, key: str, existing_task_id: UUID) -> None:
        self.key = key
        self.existing_task_id = existing_task_id
        super().__init__(
            f"idempotency key {key!r} already belongs to task {existing_task_id} "
            "with a different agent, input or conversation"
        )


class AttemptsExhaustedError(DomainError):
    def __init__(self, task_id: UUID, attempts: int, max_attempts: int) -> None:
        self.task_id = task_id
        super().__init__(f"task {task_id} has used {attempts} of {max_attempts} attempts")
