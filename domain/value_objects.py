"""Value objects of the task lifecycle.

`TaskStatus` owns the one transition table: every status change in tasklane, whether made by a
domain entity or by a guarded SQL statement in persistence, is checked against (or generated
from) `ALLOWED_TRANSITIONS`.
"""

from __future__ import annotations

from enum import StrEnum
from types import MappingProxyType
from typing import TYPE_CHECKING

from domain.exceptions import InvalidTransitionError

if TYPE_CHECKING:
    from collections.abc import Mapping
    from uuid import UUID


class TaskStatus(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    WAITING = "waiting"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @classmethod
    def from_string(cls, value: str) -> TaskStatus:
        try:
            return cls(value)
        except ValueError:
            allowed = ", ".join(s.value for s in cls)
            raise ValueError(
                f"unknown task status {value!r} (expected one of: {allowed})"
            ) from None

    @property
    def is_final(self) -> bool:
        """Final states never change again (an operator may still retry a *failed* task)."""
        return self in FINAL_STATUSES

    @property
    def is_finished(self) -> bool:
        """Finished = the task will not run again on its own: completed, failed or cancelled."""
        return self in FINISHED_STATUSES

    def can_transition_to(self, target: TaskStatus) -> bool:
        return target in ALLOWED_TRANSITIONS[self]

    def check_transition(self, target: TaskStatus, task_id: UUID | None = None) -> None:
        if not self.can_transition_to(target):
            raise InvalidTransitionError(self.value, target.value, task_id)

    @classmethod
    def sources_of(cls, target: TaskStatus) -> tuple[TaskStatus, ...]:
        """Every status from which `target` may be reached, in table order (for SQL guards)."""
        return tuple(s for s in cls if target in ALLOWED_TRANSITIONS[s])


ALLOWED_TRANSITIONS: Mapping[TaskStatus, frozenset[TaskStatus]] = MappingProxyType(
    {
        TaskStatus.PENDING: frozenset({TaskStatus.RUNNING, TaskStatus.CANCELLED}),
        TaskStatus.RUNNING: frozenset(
            {
                TaskStatus.COMPLETED,
                TaskStatus.FAILED,
                TaskStatus.PENDING,  # retry, release on shutdown, lease rescue
                TaskStatus.WAITING,
                TaskStatus.CANCELLED,
            }
        ),
        TaskStatus.WAITING: frozenset({TaskStatus.PENDING, TaskStatus.CANCELLED}),
        TaskStatus.FAILED: frozenset({TaskStatus.PENDING}),  # operator retry only
        TaskStatus.COMPLETED: frozenset(),
        TaskStatus.CANCELLED: frozenset(),
    }
)

# A task whose status is one of these has nothing left to do until somebody acts on it.
FINISHED_STATUSES: frozenset[TaskStatus] = frozenset(
    {TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED}
)
# Final in the strict sense of the guarantees: no transition leaves them at all.
FINAL_STATUSES: frozenset[TaskStatus] = frozenset(
    s for s, targets in ALLOWED_TRANSITIONS.items() if not targets
)
UNFINISHED_STATUSES: frozenset[TaskStatus] = frozenset(TaskStatus) - FINISHED_STATUSES


class AttemptOutcome(StrEnum):
    """How one handler run (a `task_attempts` row) ended."""

    COMPLETED = "completed"
    FAILED = "failed"
    RETRY = "retry"
    WAITING = "waiting"
    RELEASED = "released"
    LOST = "lost"
    CANCELLED = "cancelled"
