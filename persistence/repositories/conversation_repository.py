from __future__ import annotations

from typing import ClassVar
from uuid import UUID

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import selectinload

from domain.entities import Conversation, ConversationWithTasks
from domain.interfaces import IConversationRepository
from domain.payload import encode_json
from persistence.errors import translate
from persistence.models import ConversationModel
from persistence.repositories.base_repository import BaseRepository
from persistence.repositories.task_repository import TaskRepository


class ConversationRepository(
    BaseRepository[ConversationModel, Conversation], IConversationRepository
):
    filterable_fields: ClassVar[frozenset[str]] = frozenset({"id", "user_id", "title"})

    def __init__(self, session: AsyncSession) -> None:
        super().__init__(session, ConversationModel, "Conversation")

    def _to_entity(self, model: ConversationModel) -> Conversation:
        return Conversation(
            id=model.id,
            user_id=model.user_id,
            title=model.title,
            metadata=model.metadata_ or {},
            created_at=model.created_at,
            updated_at=model.updated_at,
        )

    def _to_model(self, entity: Conversation) -> ConversationModel:
        encode_json(entity.metadata, what="metadata")  # clear error before the driver's
        return ConversationModel(
            id=entity.id,
            user_id=entity.user_id,
            title=entity.title,
            metadata_=entity.metadata,
        )

    async def create(self, conversation: Conversation) -> Conversation:
        return self._to_entity(await self._create(self._to_model(conversation)))

    async def get_by_id(self, conversation_id: UUID) -> Conversation | None:
        model = await self._get_by_id(conversation_id)
        return self._to_entity(model) if model is not None else None

    async def find_by_user(self, user_id: str, *, limit: int = 100) -> list[Conversation]:
        models = await self._find_many(
            {"user_id": user_id}, limit=limit, order_by=(ConversationModel.created_at.desc(),)
        )
        return [self._to_entity(m) for m in models]

    async def find_with_tasks(self, user_id: str) -> list[ConversationWithTasks]:
        """A user's conversations with their tasks: two queries in all, whatever their number."""
        stmt = (
            select(ConversationModel)
            .where(ConversationModel.user_id == user_id)
            .options(selectinload(ConversationModel.tasks))
            .order_by(ConversationModel.created_at.desc(), ConversationModel.id)
            .execution_options(populate_existing=True)
        )
        try:
            models = (await self.session.execute(stmt)).scalars().all()
        except SQLAlchemyError as exc:
            translate(exc, self.entity_name)
        tasks = TaskRepository(self.session)
        return [
            ConversationWithTasks(self._to_entity(m), [tasks._to_entity(t) for t in m.tasks])
            for m in models
        ]
