from __future__ import annotations

from datetime import timedelta
from typing import ClassVar

from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession

from domain.entities import WorkerInfo
from persistence.errors import translate
from persistence.models import WorkerModel
from persistence.repositories.base_repository import BaseRepository

LIVE_WITHIN_SECONDS = 30


class WorkerRepository(BaseRepository[WorkerModel, WorkerInfo]):
    """Registered worker processes. Workers write their own rows (see `lifecycle.touch_worker`)."""

    filterable_fields: ClassVar[frozenset[str]] = frozenset({"id", "queue", "hostname"})

    def __init__(self, session: AsyncSession) -> None:
        super().__init__(session, WorkerModel, "Worker")

    def _to_entity(self, model: WorkerModel) -> WorkerInfo:
        return WorkerInfo(
            id=model.id,
            hostname=model.hostname,
            pid=model.pid,
            queue=model.queue,
            agents=tuple(model.agents),
            started_at=model.started_at,
            last_seen_at=model.last_seen_at,
        )

    async def list_live(
        self, *, queue: str | None = None, within_seconds: float = LIVE_WITHIN_SECONDS
    ) -> list[WorkerInfo]:
        """Workers seen in the last `within_seconds`, by the database clock."""
        stmt = select(WorkerModel).where(
            WorkerModel.last_seen_at > func.now() - timedelta(seconds=within_seconds)
        )
        if queue is not None:
            stmt = stmt.where(WorkerModel.queue == queue)
        stmt = stmt.order_by(WorkerModel.started_at).execution_options(populate_existing=True)
        try:
            models = (await self.session.execute(stmt)).scalars().all()
        except SQLAlchemyError as exc:
            translate(exc, self.entity_name)
        return [self._to_entity(m) for m in models]
