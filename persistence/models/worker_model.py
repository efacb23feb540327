from __future__ import annotations

from datetime import datetime

from sqlalchemy import DateTime, Integer, Text, func, text
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import Mapped, mapped_column

from persistence.models.base import Base


class WorkerModel(Base):
    """A worker process. It refreshes `last_seen_at` at every reconcile tick."""

    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(Text, primary_key=True)
    hostname: Mapped[str] = mapped_column(Text)
    pid: Mapped[int] = mapped_column(Integer)
    queue: Mapped[str] = mapped_column(Text)
    agents: Mapped[list[str]] = mapped_column(ARRAY(Text))
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    last_seen_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), index=True
    )
    # Handlers that ignored cancellation past their timeout and were left behind (health shows
    # them): each still holds memory, and perhaps a connection, in that process.
    abandoned_handlers: Mapped[int] = mapped_column(Integer, server_default=text("0"))

    def __repr__(self) -> str:
        return f"<WorkerModel id={self.id!r} queue={self.queue!r}>"
