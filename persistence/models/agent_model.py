from __future__ import annotations

from datetime import datetime

from sqlalchemy import DateTime, Double, Integer, Text, func
from sqlalchemy.orm import Mapped, mapped_column

from persistence.models.base import Base


class AgentModel(Base):
    """An agent some worker serves; upserted by every worker at start."""

    __tablename__ = "agents"

    id: Mapped[str] = mapped_column(Text, primary_key=True)
    description: Mapped[str | None] = mapped_column(Text)
    # The decorator's defaults; a task's max_attempts is resolved from here at its first claim.
    max_attempts: Mapped[int | None] = mapped_column(Integer)
    timeout_seconds: Mapped[float | None] = mapped_column(Double)
    last_seen_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), onupdate=func.now()
    )

    def __repr__(self) -> str:
        return f"<AgentModel id={self.id!r}>"
