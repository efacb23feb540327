from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID

from sqlalchemy import (  # fmt: skip
    BigInteger,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Identity,
    Index,
    Integer,
    Text,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from persistence.models.base import Base


class SignalModel(Base):
    """A signal delivered to a task: by `TaskClient.signal`, `tasklane signal`, or a plain SQL
    INSERT from another service (`INSERT INTO task_signals (task_id, name, payload) VALUES …`).

    The trigger `tasklane_task_signal` (migration 0006) refuses a signal for a finished task and
    resumes a task waiting for that name in the same statement. A signal sent before the task
    waits is kept and consumed by the wait; `consumed_step` is the step that read it.
    """

    __tablename__ = "task_signals"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    task_id: Mapped[UUID] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(Text)
    payload: Mapped[Any | None] = mapped_column(JSONB)
    sent_by: Mapped[str] = mapped_column(Text, server_default=text("'sql'"))
    sent_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    consumed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    consumed_step: Mapped[int | None] = mapped_column(Integer)

    __table_args__ = (
        CheckConstraint("length(name) BETWEEN 1 AND 200", name="name_length"),
        Index("ix_task_signals_task", "task_id", "name"),
    )
