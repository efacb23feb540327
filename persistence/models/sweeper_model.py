from __future__ import annotations

from datetime import datetime

from sqlalchemy import DateTime, Text
from sqlalchemy.orm import Mapped, mapped_column

from persistence.models.base import Base


class SweeperModel(Base):
    """Which worker reconciles a queue (rescue, resume, dispatch) until when.

    Every worker refreshes its own `workers` row each tick; only the sweeper of its queue also
    runs the sweeps, so the reconciler's cost does not grow with the number of workers. The role
    is a row with an expiry, taken over when it lapses: no advisory lock, nothing that lives in a
    session (PgBouncer's transaction pooling is fine).
    """

    __tablename__ = "sweepers"

    queue: Mapped[str] = mapped_column(Text, primary_key=True)
    worker_id: Mapped[str] = mapped_column(Text)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
