"""Conversations, in plain SQL: `tasklane submit` creates one on its one asyncpg connection, so
this repository imports no SQLAlchemy (tests/integration/test_cli_imports.py)."""

from __future__ import annotations

from uuid import UUID

from domain.entities import Conversation
from domain.interfaces import IConversationRepository
from domain.payload import encode_json
from persistence.repositories.statement_repository import StatementRepository
from persistence.sql import Executor, Row, Sql

_COLUMNS = "id, user_id, title, metadata, created_at, updated_at"

INSERT_CONVERSATION = Sql(f"""
INSERT INTO conversations (id, user_id, title, metadata)
VALUES (:id, :user_id, :title, CAST(:metadata AS jsonb))
RETURNING {_COLUMNS}
""")

CONVERSATION_BY_ID = Sql(f"SELECT {_COLUMNS} FROM conversations WHERE id = :id")


class ConversationRepository(StatementRepository[Conversation], IConversationRepository):
    def __init__(self, ex: Executor) -> None:
        super().__init__(ex, "Conversation")

    def _to_entity(self, row: Row) -> Conversation:
        return Conversation(
            id=UUID(str(row["id"])),  # asyncpg hands its own UUID type back
            user_id=row["user_id"],
            title=row["title"],
            metadata=row["metadata"] or {},
            created_at=row["created_at"],
            updated_at=row["updated_at"],
        )

    async def create(self, conversation: Conversation) -> Conversation:
        metadata = encode_json(conversation.metadata, what="metadata")  # before any SQL
        [created] = await self._entities(
            INSERT_CONVERSATION,
            id=conversation.id,
            user_id=conversation.user_id,
            title=conversation.title,
            metadata=metadata,
        )
        return created

    async def get_by_id(self, conversation_id: UUID) -> Conversation | None:
        found = await self._entities(CONVERSATION_BY_ID, id=conversation_id)
        return found[0] if found else None
