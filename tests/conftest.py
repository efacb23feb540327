"""Fixtures for every suite. Integration tests get a fresh, migrated database per test."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from persistence.session import UnitOfWork, create_engine, create_session_factory
from tests.support import databases


@pytest.fixture(scope="session")
def template_database() -> Iterator[str]:
    name = databases.create_migrated_template()
    yield name
    asyncio.run(databases.drop_database(name))


@pytest.fixture
async def database(template_database: str) -> AsyncIterator[str]:
    """Name of a fresh database copied from the migrated template; dropped afterwards."""
    name = databases.unique_name()
    await databases.create_database(name, template=template_database)
    yield name
    await databases.drop_database(name)


@pytest.fixture
def database_url(database: str) -> str:
    return databases.url_for(database)


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(database_url, pool_size=5, max_overflow=5)
    yield engine
    # Nothing a test did may leave a connection checked out.
    checked_out = engine.pool.checkedout()  # type: ignore[attr-defined]
    await engine.dispose()
    assert checked_out == 0, f"{checked_out} connection(s) left checked out of the pool"


@pytest.fixture
def session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return create_session_factory(engine)


@pytest.fixture
def uow(session_factory: async_sessionmaker[AsyncSession]) -> UnitOfWork:
    return UnitOfWork(session_factory)
