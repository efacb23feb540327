from __future__ import annotations

from typing import ClassVar

from sqlalchemy import func
from sqlalchemy.dialects.postgresql import insert

from domain.entities import Agent
from domain.interfaces import IAgentRepository
from persistence.models import AgentModel
from persistence.repositories.base_repository import BaseRepository
from persistence.sql import Executor, Row


class AgentRepository(BaseRepository[AgentModel, Agent], IAgentRepository):
    filterable_fields: ClassVar[frozenset[str]] = frozenset({"id"})

    def __init__(self, ex: Executor) -> None:
        super().__init__(ex, AgentModel, "Agent")

    def _to_entity(self, row: Row) -> Agent:
        return Agent(
            id=row["id"],
            description=row["description"],
            max_attempts=row["max_attempts"],
            timeout_seconds=row["timeout_seconds"],
            last_seen_at=row["last_seen_at"],
            created_at=row["created_at"],
            updated_at=row["updated_at"],
        )

    async def upsert(self, agent: Agent) -> Agent:
        """Insert or refresh an agent (every worker does this for the agents it serves)."""
        insert_stmt = insert(self.table).values(
            id=agent.id,
            description=agent.description,
            max_attempts=agent.max_attempts,
            timeout_seconds=agent.timeout_seconds,
            last_seen_at=func.now(),
        )
        stmt = insert_stmt.on_conflict_do_update(
            index_elements=[self.table.c.id],
            set_={
                "description": insert_stmt.excluded.description,
                "max_attempts": insert_stmt.excluded.max_attempts,
                "timeout_seconds": insert_stmt.excluded.timeout_seconds,
                "last_seen_at": func.now(),
                "updated_at": func.now(),
            },
        ).returning(*self.table.c)
        [upserted] = await self._entities(stmt)
        return upserted

    async def get_by_id(self, agent_id: str) -> Agent | None:
        return await self._get_by_id(agent_id)
