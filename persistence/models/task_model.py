from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any
from uuid import UUID

from sqlalchemy import (
    CheckConstraint,
    DateTime,
    FetchedValue,
    ForeignKey,
    Index,
    Integer,
    Text,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.orm import Mapped, mapped_column, relationship

from domain.entities import (
    AGENT_ID_CHARACTERS_PATTERN,
    DEFAULT_QUEUE,
    MAX_AGENT_ID_LENGTH,
    MAX_ATTEMPTS_LIMIT,
    MAX_PRIORITY,
)
from domain.value_objects import UNFINISHED_STATUSES, TaskStatus
from persistence.models.base import Base

if TYPE_CHECKING:
    from persistence.models.conversation_model import ConversationModel

_UNFINISHED = ", ".join(f"'{s.value}'" for s in TaskStatus if s in UNFINISHED_STATUSES)
# The CHECK constraints name their sets as array constants ('{a,b}'::text[]), not `IN (...)`
# lists: PostgreSQL prepares every CHECK expression afresh for each statement that writes a task
# (every insert, every lifecycle update), and an `IN` list is stored as an array expression that
# it folds into a constant each time (migration 0011).
_ALL_STATUSES = "'{" + ",".join(s.value for s in TaskStatus) + "}'::text[]"
_UNFINISHED_STATUSES = (
    "'{" + ",".join(s.value for s in TaskStatus if s in UNFINISHED_STATUSES) + "}'::text[]"
)
_MAY_NOT_RUN = f"status <> ALL ({_UNFINISHED_STATUSES})"
_FINISHED = ", ".join(f"'{s.value}'" for s in TaskStatus if s not in UNFINISHED_STATUSES)


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
    # Observability: the W3C trace context (traceparent, tracestate) of the span that submitted
    # the task, or of the handler run that spawned it; NULL with tracing off (worker/tracing.py).
    trace_context: Mapped[dict[str, str] | None] = mapped_column(JSONB)
    # Dispatch bookkeeping: the reconciler (re)sends the doorbell of a due pending task once this
    # has passed. now() for rows inserted by plain SQL; pushed forward whenever a doorbell is sent.
    dispatch_after: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )
    version: Mapped[int] = mapped_column(Integer, server_default=text("1"))
    # Flow control (migration 0005). Higher priority starts first among due tasks; `due_rank` is
    # when the task competes as due: run_after − priority minutes (waiting long enough outranks
    # any priority). `limit_key`: the task's key under its agent's limits ('' when none).
    # tasklane's INSERT computes both; for rows written with plain SQL (which leave them NULL)
    # and on updates, the triggers `tasklane_task_flow_on_insert` and `tasklane_task_flow` do
    # (migration 0012). No column default: NULL is what calls the trigger.
    priority: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    limit_key: Mapped[str] = mapped_column(Text, server_default=FetchedValue())
    due_rank: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=FetchedValue()
    )
    # Durable waits (migration 0006): the signal names a waiting task waits for, its timer or
    # timeout, what a timeout does, what resumed it last, and its latest progress.
    wait_signals: Mapped[list[str] | None] = mapped_column(ARRAY(Text))
    wait_deadline: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    wait_on_timeout: Mapped[str | None] = mapped_column(Text)
    woke_by: Mapped[str | None] = mapped_column(Text)
    progress: Mapped[Any | None] = mapped_column(JSONB)
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
        CheckConstraint(f"status = ANY ({_ALL_STATUSES})", name="status"),
        # The domain's rules for a task that may still run (`domain.entities.Task`), in SQL.
        # Finished rows are exempt: history written before a rule existed stays readable, and
        # an operator's retry of such a row is refused by the constraint, with its name.
        # The length by char_length, not a {0,199} in the regex: PostgreSQL's regex engine
        # expands a bounded repetition at every match (about 6 µs a row, migration 0011).
        CheckConstraint(
            f"{_MAY_NOT_RUN} OR (char_length(agent_id) <= {MAX_AGENT_ID_LENGTH}"
            f" AND agent_id ~ '{AGENT_ID_CHARACTERS_PATTERN}')",
            name="agent_id_format",
        ),
        CheckConstraint("attempts >= 0", name="attempts_not_negative"),
        CheckConstraint(
            "wait_on_timeout IS NULL OR wait_on_timeout = ANY ('{resume,fail}'::text[])",
            name="wait_on_timeout",
        ),
        CheckConstraint(
            f"priority BETWEEN {-MAX_PRIORITY} AND {MAX_PRIORITY}", name="priority_range"
        ),
        CheckConstraint("open_children >= 0", name="open_children_not_negative"),
        CheckConstraint(
            f"{_MAY_NOT_RUN} OR max_attempts IS NULL"
            f" OR max_attempts BETWEEN 1 AND {MAX_ATTEMPTS_LIMIT}",
            name="max_attempts_range",
        ),
        CheckConstraint(
            "max_attempts IS NULL OR attempts <= max_attempts", name="attempts_within_max"
        ),
        # A task that is its own parent would wait for itself forever.
        CheckConstraint(
            f"{_MAY_NOT_RUN} OR parent_task_id IS DISTINCT FROM id",
            name="not_its_own_parent",
        ),
        # The reconciler's dispatch scan: due pending tasks of one queue needing a doorbell.
        Index(
            "ix_tasks_dispatch",
            "queue",
            func.greatest(text("run_after"), text("dispatch_after")),
            postgresql_where=text("status = 'pending'"),
        ),
        # Due pending tasks per agent and key, in the order they compete: flow control's fair
        # pick among keys (a skip scan over limit_key) and claims straight from Postgres.
        Index(
            "ix_tasks_pending_agent",
            "queue",
            "agent_id",
            "limit_key",
            "due_rank",
            postgresql_where=text("status = 'pending'"),
        ),
        # Running tasks per agent and key: what a concurrency limit counts.
        Index(
            "ix_tasks_running_flow",
            "queue",
            "agent_id",
            "limit_key",
            postgresql_where=text("status = 'running'"),
        ),
        # Fan-in: "is any child of this parent unfinished?" without reading the finished ones.
        Index(
            "ix_tasks_open_children",
            "parent_task_id",
            postgresql_where=text(f"parent_task_id IS NOT NULL AND status IN ({_UNFINISHED})"),
        ),
        # Timers and signal timeouts due to wake.
        Index(
            "ix_tasks_wait_deadline",
            "wait_deadline",
            postgresql_where=text("status = 'waiting' AND wait_deadline IS NOT NULL"),
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
        # The operators' reads (`persistence.repositories.report_repository`): `list` reads
        # these ranges backwards (newest first, ties by id) and `stats` counts off them up to a
        # cap. Migration 0008 also creates extended statistics `stx_tasks_agent_status` on
        # (agent_id, status), which SQLAlchemy cannot declare (tests/integration/test_schema.py
        # checks it): the estimate of one agent's tasks in one status, past the cap.
        Index("ix_tasks_by_status", "status", "created_at", "id"),
        Index("ix_tasks_by_conversation", "conversation_id", "created_at", "id"),
        Index("ix_tasks_by_agent", "agent_id", "status", "created_at", "id"),
        # `prune` walks finished tasks oldest first; `stats` reads the last minute's finishes.
        Index(
            "ix_tasks_finished",
            "status",
            "completed_at",
            "id",
            postgresql_where=text(f"status IN ({_FINISHED})"),
        ),
    )

    def __repr__(self) -> str:
        return f"<TaskModel id={self.id} agent={self.agent_id!r} status={self.status}>"
