"""`AgentRepository` against real PostgreSQL: workers upsert the agents they serve."""

from __future__ import annotations

from sqlalchemy import text

from domain.entities import Agent
from persistence.session import UnitOfWork


async def upsert(uow: UnitOfWork, agent: Agent) -> Agent:
    async with uow:
        stored = await uow.agents.upsert(agent)
        await uow.commit()
    return stored


async def test_upsert_inserts_then_updates(uow: UnitOfWork) -> None:
    first = await upsert(uow, Agent(id="echo", description="v1", max_attempts=3))
    assert (first.id, first.description, first.max_attempts, first.timeout_seconds) == (
        "echo",
        "v1",
        3,
        None,
    )
    assert first.created_at is not None
    assert first.last_seen_at is not None
    assert first.updated_at == first.created_at

    second = await upsert(
        uow, Agent(id="echo", description="v2", max_attempts=None, timeout_seconds=2.5)
    )
    assert (second.description, second.max_attempts, second.timeout_seconds) == ("v2", None, 2.5)
    assert second.created_at == first.created_at
    assert second.updated_at is not None
    assert second.updated_at > first.updated_at  # type: ignore[operator]
    assert second.last_seen_at is not None
    assert second.last_seen_at > first.last_seen_at

    async with uow:
        assert await uow.agents.get_by_id("echo") == second
        assert await uow.agents.get_by_id("echo") is not None


async def test_upsert_twice_in_one_transaction_keeps_one_row(uow: UnitOfWork) -> None:
    async with uow:
        await uow.agents.upsert(Agent(id="echo", description="a"))
        again = await uow.agents.upsert(Agent(id="echo", description="b"))
        await uow.commit()
    assert again.description == "b"
    async with uow:
        [row] = (await uow.session.execute(text("SELECT id, description FROM agents"))).all()
        assert tuple(row) == ("echo", "b")


async def test_get_by_id(uow: UnitOfWork) -> None:
    for name in ["square", "echo", "fanout"]:
        await upsert(uow, Agent(id=name))
    async with uow:
        assert await uow.agents.get_by_id("nobody") is None
        found = await uow.agents.get_by_id("square")
    assert found is not None
    assert found.id == "square"
