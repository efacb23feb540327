from __future__ import annotations

from typing import ClassVar
from uuid import UUID

from sqlalchemy import insert

from domain.entities import Conversation
from domain.interfaces import IConversationRepository
from domain.payload import encode_json
from persistence.models import ConversationModel
from persistence.repositories.base_repository import BaseRepository
from persistence.sql import Executor, Row


class ConversationRepository(
    BaseRepository[ConversationModel, Conversation], IConversationRepository
):
    filterable_fields: ClassVar[frozenset[str]] = frozenset({"id", "user_id", "title"})

    def __init__(self, ex: Executor) -> None:
        super().__init__(ex, ConversationModel, "Conversation")

    def _to_entity(self, row: Row) -> Conversation:
        return Conversation(
            id=row["id"],
            user_id=row["user_id"],
            title=row["title"],
            metadata=row["metadata"] or {},
            created_at=row["created_at"],
            updated_at=row["updated_at"],
        )

    async def create(self, conversation: Conversation) -> Conversation:
        encode_json(conversation.metadata, what="metadata")  # a clear error before the driver's
        stmt = (
            insert(self.table)
            .values(
                id=conversation.id,
                user_id=conversation.user_id,
                title=conversation.title,
                metadata=conversation.metadata,
            )
            .returning(*self.table.c)
        )
        [created] = await self._entities(stmt)
        return created

    async def get_by_id(self, conversation_id: UUID) -> Conversation | None:
        return await self._get_by_id(conversation_id)
