"""`ConversationRepository` against real PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from uuid import uuid4

import pytest
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine

from domain.entities import Conversation, Task
from domain.exceptions import EntityAlreadyExistsError, InvalidInputError
from persistence.session import UnitOfWork


@contextmanager
def statements(engine: AsyncEngine) -> Iterator[list[str]]:
    """Every SQL statement sent through `engine` inside the block."""
    sent: list[str] = []

    def on_execute(*args: Any) -> None:
        sent.append(args[2])

    event.listen(engine.sync_engine, "before_cursor_execute", on_execute)
    try:
        yield sent
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", on_execute)


async def create(uow: UnitOfWork, *conversations: Conversation) -> list[Conversation]:
    """Each in its own transaction, so that their created_at differ."""
    created = []
    for conversation in conversations:
        async with uow:
            created.append(await uow.conversations.create(conversation))
            await uow.commit()
    return created


async def add_tasks(uow: UnitOfWork, conversation: Conversation, n: int) -> list[Task]:
    created = []
    for i in range(n):  # one transaction each: distinct created_at
        async with uow:
            [task] = await uow.tasks.create_many(
                [Task(conversation_id=conversation.id, agent_id="echo", input={"i": i})]
            )
            await uow.commit()
        created.append(task)
    return created


async def test_create_and_get(uow: UnitOfWork) -> None:
    conv = Conversation(user_id="u1", title="hello", metadata={"k": [1, 2]})
    [created] = await create(uow, conv)
    assert created.id == conv.id
    assert (created.user_id, created.title, created.metadata) == ("u1", "hello", {"k": [1, 2]})
    assert created.created_at is not None
    assert created.updated_at == created.created_at
    async with uow:
        assert await uow.conversations.get_by_id(conv.id) == created
        assert await uow.conversations.get_by_id(uuid4()) is None


async def test_defaults(uow: UnitOfWork) -> None:
    [created] = await create(uow, Conversation(user_id="u1"))
    assert created.title is None
    assert created.metadata == {}


async def test_duplicate_id_already_exists(uow: UnitOfWork) -> None:
    [conv] = await create(uow, Conversation(user_id="u1"))
    async with uow:
        with pytest.raises(
            EntityAlreadyExistsError, match=f"Conversation already exists.*{conv.id}"
        ):
            await uow.conversations.create(Conversation(user_id="u2", id=conv.id))
    async with uow:  # the failed unit of work left the first one alone
        found = await uow.conversations.get_by_id(conv.id)
    assert found is not None
    assert found.user_id == "u1"


async def test_metadata_that_jsonb_cannot_hold_is_refused_before_any_sql(
    uow: UnitOfWork, engine: AsyncEngine
) -> None:
    async with uow:
        with statements(engine) as sent, pytest.raises(InvalidInputError, match="NUL"):
            await uow.conversations.create(Conversation(user_id="u1", metadata={"x": "\x00"}))
    assert sent == []
