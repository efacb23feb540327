"""`ConversationRepository` against real PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from uuid import uuid4

import pytest
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncEngine

from domain.entities import Conversation, Task
from domain.exceptions import EntityAlreadyExistsError, InvalidInputError
from domain.value_objects import TaskStatus
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


async def test_find_by_user_newest_first_with_limit(uow: UnitOfWork) -> None:
    a, b, _, c = await create(
        uow,
        Conversation(user_id="u1", title="a"),
        Conversation(user_id="u1", title="b"),
        Conversation(user_id="u2", title="other user"),
        Conversation(user_id="u1", title="c"),
    )
    async with uow:
        assert [x.id for x in await uow.conversations.find_by_user("u1")] == [c.id, b.id, a.id]
        assert [x.id for x in await uow.conversations.find_by_user("u1", limit=2)] == [c.id, b.id]
        assert await uow.conversations.find_by_user("nobody") == []


async def test_find_with_tasks_loads_each_conversations_tasks_in_order(uow: UnitOfWork) -> None:
    a, b, empty, other = await create(
        uow,
        Conversation(user_id="u1"),
        Conversation(user_id="u1"),
        Conversation(user_id="u1"),
        Conversation(user_id="u2"),
    )
    a_tasks = await add_tasks(uow, a, 3)
    b_tasks = await add_tasks(uow, b, 2)
    await add_tasks(uow, other, 1)
    async with uow:
        found = await uow.conversations.find_with_tasks("u1")
    assert [x.conversation.id for x in found] == [empty.id, b.id, a.id]  # newest first
    assert [[t.id for t in x.tasks] for x in found] == [
        [],
        [t.id for t in b_tasks],
        [t.id for t in a_tasks],
    ]
    assert found[2].tasks == a_tasks  # full entities, as the task repository builds them


@pytest.mark.parametrize("conversations", [1, 6])
async def test_find_with_tasks_issues_two_queries_however_many_conversations(
    uow: UnitOfWork, engine: AsyncEngine, conversations: int
) -> None:
    convs = await create(uow, *[Conversation(user_id="u1") for _ in range(conversations)])
    for conv in convs:
        await add_tasks(uow, conv, 3)
    async with uow:
        with statements(engine) as sent:
            found = await uow.conversations.find_with_tasks("u1")
    assert len(found) == conversations
    assert sum(len(x.tasks) for x in found) == 3 * conversations
    assert len(sent) == 2, sent


async def test_find_with_tasks_sees_task_changes_made_in_the_same_session(uow: UnitOfWork) -> None:
    [conv] = await create(uow, Conversation(user_id="u1"))
    [task] = await add_tasks(uow, conv, 1)
    async with uow:
        [first] = await uow.conversations.find_with_tasks("u1")
        assert first.tasks[0].status is TaskStatus.PENDING
        await uow.session.execute(
            text("UPDATE tasks SET status = 'cancelled' WHERE id = :id"), {"id": task.id}
        )
        [again] = await uow.conversations.find_with_tasks("u1")
    assert again.tasks[0].status is TaskStatus.CANCELLED
