from __future__ import annotations

from datetime import datetime
from uuid import UUID

from sqlalchemy import CheckConstraint, DateTime, ForeignKey, Index, Integer, Text, func, text
from sqlalchemy.orm import Mapped, mapped_column

from domain.value_objects import AttemptOutcome
from persistence.models.base import Base

_OUTCOMES = ", ".join(f"'{o.value}'" for o in AttemptOutcome)


class TaskAttemptModel(Base):
    """One row per handler run: the history an operator reads when a task misbehaves."""

    __tablename__ = "task_attempts"

    task_id: Mapped[UUID] = mapped_column(
        ForeignKey("tasks.id", ondelete="CASCADE"), primary_key=True
    )
    run: Mapped[int] = mapped_column(Integer, primary_key=True)  # 1, 2, 3… never reset
    attempt: Mapped[int] = mapped_column(Integer)  # attempt number within the task's step
    worker_id: Mapped[str | None] = mapped_column(Text)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    outcome: Mapped[str | None] = mapped_column(Text)  # NULL while the run is in progress
    error: Mapped[str | None] = mapped_column(Text)
    # Which claim statement started this run: a claim whose answer was lost is taken up again
    # (adopted) only if this run is the one that very statement started.
    claim_token: Mapped[UUID | None] = mapped_column()

    __table_args__ = (
        CheckConstraint(f"outcome IS NULL OR outcome IN ({_OUTCOMES})", name="outcome"),
        # The dashboard's runs per minute (migration 0007).
        Index(
            "ix_task_attempts_finished",
            "finished_at",
            postgresql_where=text("finished_at IS NOT NULL"),
        ),
    )

    def __repr__(self) -> str:
        return f"<TaskAttemptModel task={self.task_id} run={self.run} outcome={self.outcome}>"
