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

from domain.entities import DEFAULT_QUEUE
from domain.value_objects import TaskStatus
from persistence.models.base import Base

if TYPE_CHECKING:
    from persistence.models.conversation_model import ConversationModel

_STATUSES = ", ".join(f"'{s.value}'" for s in TaskStatus)


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
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    completed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), onupdate=func.now()
    )

    conversation: Mapped[ConversationModel] = relationship(back_populates="tasks")

    __table_args__ = (
        CheckConstraint(f"status IN ({_STATUSES})", name="status"),
        CheckConstraint("length(btrim(agent_id)) > 0", name="agent_id_not_blank"),
        CheckConstraint("attempts >= 0", name="attempts_not_negative"),
        CheckConstraint("max_attempts IS NULL OR max_attempts >= 1", name="max_attempts_positive"),
        CheckConstraint(
            "max_attempts IS NULL OR attempts <= max_attempts", name="attempts_within_max"
        ),
        # The reconciler's dispatch scan: due pending tasks of one queue needing a doorbell.
        Index(
            "ix_tasks_dispatch",
            "queue",
            func.greatest(text("run_after"), text("dispatch_after")),
            postgresql_where=text("status = 'pending'"),
        ),
        # find_pending_for_agent: due pending tasks per agent, oldest first.
        Index(
            "ix_tasks_pending_agent",
            "agent_id",
            "created_at",
            postgresql_where=text("status = 'pending'"),
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
        Index("ix_tasks_status_created", "status", "created_at"),
    )

    def __repr__(self) -> str:
        return f"<TaskModel id={self.id} agent={self.agent_id!r} status={self.status}>"
