from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any
from uuid import UUID

from sqlalchemy import (
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    Text,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column, relationship

from domain.entities import AGENT_ID_PATTERN, DEFAULT_QUEUE, MAX_ATTEMPTS_LIMIT
from domain.value_objects import UNFINISHED_STATUSES, TaskStatus
from persistence.models.base import Base

if TYPE_CHECKING:
    from persistence.models.conversation_model import ConversationModel

_STATUSES = ", ".join(f"'{s.value}'" for s in TaskStatus)
_UNFINISHED = ", ".join(f"'{s.value}'" for s in TaskStatus if s in UNFINISHED_STATUSES)


class TaskModel(Base):
    __tablename__ = "tasks"

    id: Mapped[UUID] = mapped_column(primary_key=True, server_default=func.gen_random_uuid())
    conversation_id: Mapped[UUID] = mapped_column(
        ForeignKey("conversations.id", ondelete="CASCADE")
    )
    parent_task_id: Mapped[UUID | None] = mapped_column(ForeignKey("tasks.id", ondelete="SET NULL"))
    agent_id: Mapped[str] = mapped_column(Text)
    queue: Mapped[str] = mapped_column(Text, server_default=text(f"'{DEFAULT_QUEUE}'"))
    status: Mapped[str] = mapped_column(Text, server_default=text(f"'{TaskStatus.PENDING.value}'"))
    input: Mapped[Any] = mapped_column(JSONB, server_default=text("'{}'::jsonb"))
    output: Mapped[Any | None] = mapped_column(JSONB)
    error: Mapped[str | None] = mapped_column(Text)
    metadata_: Mapped[dict[str, Any]] = mapped_column(
        "metadata", JSONB, server_default=text("'{}'::jsonb")
    )
    attempts: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    # NULL until the first claim resolves it: the agent's default, then TASKLANE_MAX_ATTEMPTS.
    max_attempts: Mapped[int | None] = mapped_column(Integer)
    run_after: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    worker_id: Mapped[str | None] = mapped_column(Text)
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    idempotency_key: Mapped[str | None] = mapped_column(Text, unique=True)
    # Fencing: every claim increments `runs`; a run may only write while `runs` still equals its
    # own number and the task is still running.
    runs: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    # Steps: incremented each time the task resumes after its subtasks finished.
    step: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    # Dispatch bookkeeping: the reconciler (re)sends the doorbell of a due pending task once this
    # has passed. now() for rows inserted by plain SQL; pushed forward whenever a doorbell is sent.
    dispatch_after: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )
    version: Mapped[int] = mapped_column(Integer, server_default=text("1"))
    # Fan-in: how many of this task's children are unfinished, kept by the statements that add
    # and finish children (under this row's lock). It says when to check for a resume, so that
    # no child's finish reads its siblings.
    open_children: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    completed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), onupdate=func.now()
    )

    conversation: Mapped[ConversationModel] = relationship(back_populates="tasks")

    __table_args__ = (
        CheckConstraint(f"status IN ({_STATUSES})", name="status"),
        # The domain's rules for a task that may still run (`domain.entities.Task`), in SQL.
        # Finished rows are exempt: history written before a rule existed stays readable, and
        # an operator's retry of such a row is refused by the constraint, with its name.
        CheckConstraint(
            f"status NOT IN ({_UNFINISHED}) OR agent_id ~ '{AGENT_ID_PATTERN}'",
            name="agent_id_format",
        ),
        CheckConstraint("attempts >= 0", name="attempts_not_negative"),
        CheckConstraint("open_children >= 0", name="open_children_not_negative"),
        CheckConstraint(
            f"status NOT IN ({_UNFINISHED}) OR max_attempts IS NULL"
            f" OR max_attempts BETWEEN 1 AND {MAX_ATTEMPTS_LIMIT}",
            name="max_attempts_range",
        ),
        CheckConstraint(
            "max_attempts IS NULL OR attempts <= max_attempts", name="attempts_within_max"
        ),
        # A task that is its own parent would wait for itself forever.
        CheckConstraint(
            f"status NOT IN ({_UNFINISHED}) OR parent_task_id IS DISTINCT FROM id",
            name="not_its_own_parent",
        ),
        # The reconciler's dispatch scan: due pending tasks of one queue needing a doorbell.
        Index(
            "ix_tasks_dispatch",
            "queue",
            func.greatest(text("run_after"), text("dispatch_after")),
            postgresql_where=text("status = 'pending'"),
        ),
        # find_pending_for_agent: due pending tasks per agent, oldest due first.
        Index(
            "ix_tasks_pending_agent",
            "agent_id",
            "run_after",
            postgresql_where=text("status = 'pending'"),
        ),
        # Fan-in: "is any child of this parent unfinished?" without reading the finished ones.
        Index(
            "ix_tasks_open_children",
            "parent_task_id",
            postgresql_where=text(f"parent_task_id IS NOT NULL AND status IN ({_UNFINISHED})"),
        ),
        # The rescuer: running tasks by lease expiry.
        Index(
            "ix_tasks_running_lease",
            "lease_expires_at",
            postgresql_where=text("status = 'running'"),
        ),
        # Children of a parent, in creation order.
        Index(
            "ix_tasks_parent",
            "parent_task_id",
            "created_at",
            postgresql_where=text("parent_task_id IS NOT NULL"),
        ),
        Index("ix_tasks_conversation", "conversation_id", "created_at"),
        # The dashboard's reads (migration 0007): keyset pages by status or agent, newest first;
        # finished tasks by completion time.
        Index("ix_tasks_by_status", "status", "created_at", "id"),
        Index("ix_tasks_by_agent", "agent_id", "status", "created_at", "id"),
        Index(
            "ix_tasks_finished",
            "status",
            "completed_at",
            "id",
            postgresql_where=text("status IN ('completed', 'failed', 'cancelled')"),
        ),
    )

    def __repr__(self) -> str:
        return f"<TaskModel id={self.id} agent={self.agent_id!r} status={self.status}>"
