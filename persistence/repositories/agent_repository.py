from __future__ import annotations

from typing import ClassVar

from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession

from domain.entities import Agent
from domain.interfaces import IAgentRepository
from persistence.errors import translate
from persistence.models import AgentModel
from persistence.repositories.base_repository import BaseRepository


class AgentRepository(BaseRepository[AgentModel, Agent], IAgentRepository):
    filterable_fields: ClassVar[frozenset[str]] = frozenset({"id"})

    def __init__(self, session: AsyncSession) -> None:
        super().__init__(session, AgentModel, "Agent")

    def _to_entity(self, model: AgentModel) -> Agent:
        return Agent(
            id=model.id,
            description=model.description,
            max_attempts=model.max_attempts,
            timeout_seconds=model.timeout_seconds,
            last_seen_at=model.last_seen_at,
            created_at=model.created_at,
            updated_at=model.updated_at,
        )

    async def upsert(self, agent: Agent) -> Agent:
        """Insert or refresh an agent (every worker does this for the agents it serves)."""
        values = {
            "id": agent.id,
            "description": agent.description,
            "max_attempts": agent.max_attempts,
            "timeout_seconds": agent.timeout_seconds,
            "last_seen_at": func.now(),
        }
        insert_stmt = insert(AgentModel).values(**values)
        stmt = insert_stmt.on_conflict_do_update(
            index_elements=[AgentModel.id],
            set_={
                "description": insert_stmt.excluded.description,
                "max_attempts": insert_stmt.excluded.max_attempts,
                "timeout_seconds": insert_stmt.excluded.timeout_seconds,
                "last_seen_at": func.now(),
                "updated_at": func.now(),
            },
        ).returning(AgentModel)
        try:
            result = await self.session.execute(stmt.execution_options(populate_existing=True))
        except SQLAlchemyError as exc:
            translate(exc, self.entity_name)
        return self._to_entity(result.scalar_one())

    async def get_by_id(self, agent_id: str) -> Agent | None:
        model = await self._get_by_id(agent_id)
        return self._to_entity(model) if model is not None else None

    async def list_all(self) -> list[Agent]:
        stmt = select(AgentModel).order_by(AgentModel.id)
        try:
            models = (await self.session.execute(stmt)).scalars().all()
        except SQLAlchemyError as exc:
            translate(exc, self.entity_name)
        return [self._to_entity(m) for m in models]
