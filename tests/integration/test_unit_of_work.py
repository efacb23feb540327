"""The unit of work owns one session and one transaction: commit persists, anything else rolls
back, and after-commit callbacks run only once the data is durable."""

from __future__ import annotations

import logging
from uuid import UUID

import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from domain.entities import Conversation
from persistence.session import UnitOfWork


async def exists(session_factory: async_sessionmaker[AsyncSession], conv_id: UUID) -> bool:
    """Seen from a separate session: only committed data."""
    async with UnitOfWork(session_factory) as other:
        return await other.conversations.get_by_id(conv_id) is not None


async def test_commit_persists(
    uow: UnitOfWork, session_factory: async_sessionmaker[AsyncSession]
) -> None:
    conv = Conversation(user_id="u1")
    async with uow:
        await uow.conversations.create(conv)
        assert not await exists(session_factory, conv.id)  # flushed, not yet committed
        await uow.commit()
    assert await exists(session_factory, conv.id)


async def test_leaving_without_commit_rolls_back(
    uow: UnitOfWork, session_factory: async_sessionmaker[AsyncSession]
) -> None:
    conv = Conversation(user_id="u1")
    async with uow:
        await uow.conversations.create(conv)
        assert await uow.conversations.get_by_id(conv.id) is not None  # visible inside
    assert not await exists(session_factory, conv.id)


async def test_an_exception_rolls_back_and_propagates(
    uow: UnitOfWork, session_factory: async_sessionmaker[AsyncSession]
) -> None:
    conv = Conversation(user_id="u1")

    async def failing_work() -> None:
        async with uow:
            await uow.conversations.create(conv)
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        await failing_work()
    assert not await exists(session_factory, conv.id)


async def test_explicit_rollback_discards_the_work(
    uow: UnitOfWork, session_factory: async_sessionmaker[AsyncSession]
) -> None:
    dropped, kept = Conversation(user_id="u1"), Conversation(user_id="u1")
    async with uow:
        await uow.conversations.create(dropped)
        await uow.rollback()
        await uow.conversations.create(kept)
        await uow.commit()
    assert not await exists(session_factory, dropped.id)
    assert await exists(session_factory, kept.id)


async def test_work_after_a_commit_needs_its_own_commit(
    uow: UnitOfWork, session_factory: async_sessionmaker[AsyncSession]
) -> None:
    first, second = Conversation(user_id="u1"), Conversation(user_id="u1")
    async with uow:
        await uow.conversations.create(first)
        await uow.commit()
        await uow.conversations.create(second)
    assert await exists(session_factory, first.id)
    assert not await exists(session_factory, second.id)


async def test_after_commit_callbacks_run_after_the_commit_in_order(
    uow: UnitOfWork, session_factory: async_sessionmaker[AsyncSession]
) -> None:
    conv = Conversation(user_id="u1")
    seen: list[tuple[str, bool]] = []

    async def callback(name: str) -> None:
        seen.append((name, await exists(session_factory, conv.id)))

    async with uow:
        await uow.conversations.create(conv)
        uow.after_commit(lambda: callback("first"))
        uow.after_commit(lambda: callback("second"))
        assert seen == []
        await uow.commit()
        assert seen == [("first", True), ("second", True)]  # the data was durable already
        await uow.commit()  # a second commit does not run them again
    assert seen == [("first", True), ("second", True)]


async def test_after_commit_callbacks_never_run_after_a_rollback(uow: UnitOfWork) -> None:
    ran: list[str] = []

    async def callback() -> None:
        ran.append("ran")

    async with uow:
        await uow.conversations.create(Conversation(user_id="u1"))
        uow.after_commit(callback)
    assert ran == []

    async def failing_work() -> None:
        async with uow:
            uow.after_commit(callback)
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        await failing_work()
    assert ran == []

    async with uow:  # explicit rollback forgets them, even if a commit follows
        uow.after_commit(callback)
        await uow.rollback()
        await uow.commit()
    assert ran == []

    async with uow:  # and a new unit of work starts with none
        await uow.commit()
    assert ran == []


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


async def test_a_failing_callback_does_not_undo_the_commit(
    uow: UnitOfWork, session_factory: async_sessionmaker[AsyncSession]
) -> None:
    conv = Conversation(user_id="u1")
    ran: list[str] = []

    async def broken() -> None:
        raise ConnectionError("redis is down")

    async def fine() -> None:
        ran.append("fine")

    logger, handler = logging.getLogger("persistence.session"), Records()
    logger.addHandler(handler)
    try:
        async with uow:
            await uow.conversations.create(conv)
            uow.after_commit(broken)
            uow.after_commit(fine)
            await uow.commit()
    finally:
        logger.removeHandler(handler)
    assert await exists(session_factory, conv.id)
    assert ran == ["fine"]  # later callbacks still run
    [record] = handler.records
    assert record.levelno == logging.WARNING
    assert "after-commit callback failed" in record.getMessage()
    assert record.exc_info is not None
    assert isinstance(record.exc_info[1], ConnectionError)


async def test_the_session_exists_only_inside(uow: UnitOfWork) -> None:
    with pytest.raises(RuntimeError, match="not open"):
        _ = uow.session
    async with uow:
        first = uow.session
    async with uow:
        assert uow.session is not first  # one session per unit of work
    with pytest.raises(RuntimeError, match="not open"):
        _ = uow.session
