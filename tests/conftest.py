"""Fixtures for every suite. Integration tests get a fresh, migrated database per test."""

from __future__ import annotations

import asyncio
import compileall
import contextlib
import os
import sysconfig
from collections.abc import AsyncIterator, Iterator

import hypothesis
import pytest
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from domain.entities import Conversation
from persistence.session import UnitOfWork, create_engine, create_session_factory
from tests.support import databases, db, servers, services, workers
from worker.client import TaskClient
from worker.config import Settings
from worker.runtime import WorkerRuntime

# -- hypothesis ------------------------------------------------------------------------------------

# How hard the property tests try. The fuzz tests and the state machine drive real servers, so
# their examples cost milliseconds each: light keeps the suite in minutes, heavy is for a
# deliberate long run. No deadline: the machine may be busy, and speed is never asserted.
HYPOTHESIS_ENV = "TASKLANE_TEST_HYPOTHESIS"
hypothesis.settings.register_profile(
    "light", max_examples=50, stateful_step_count=50, deadline=None, print_blob=True
)
hypothesis.settings.register_profile(
    "heavy", max_examples=500, stateful_step_count=100, deadline=None, print_blob=True
)


FALLBACK = pytest.StashKey[servers.Fallback]()


def pytest_configure(config: pytest.Config) -> None:
    profile = os.environ.get(HYPOTHESIS_ENV, "light")
    if profile not in ("light", "heavy"):
        raise pytest.UsageError(f"{HYPOTHESIS_ENV}={profile!r}: use light or heavy")
    hypothesis.settings.load_profile(profile)
    # The process that runs the session (not an xdist worker, which inherits its environment)
    # finds the servers, or starts embedded ones, before any test process starts.
    if not hasattr(config, "workerinput"):
        _compile_project()
        config.stash[FALLBACK] = servers.Fallback().start()


def _compile_project() -> None:
    """This repository's and its dependencies' bytecode, once, before the tests start hundreds
    of worker and CLI processes: where PYTHONDONTWRITEBYTECODE is set, each would compile them
    again (SQLAlchemy, arq and the rest: 1.6 s of CPU per worker import, 0.7 s compiled). Files
    already compiled are skipped. (Not uv's compile-bytecode setting: that recompiles and
    prints a line on every `uv run`, the CLI's included.)"""
    for package in ("domain", "persistence", "worker", "tasklane", "tests"):
        compileall.compile_dir(os.path.join(databases.ROOT, package), quiet=2)
    compileall.compile_dir(sysconfig.get_paths()["purelib"], quiet=2, workers=0)


def pytest_unconfigure(config: pytest.Config) -> None:
    if FALLBACK in config.stash:
        config.stash[FALLBACK].stop()


def pytest_report_header(config: pytest.Config) -> list[str]:
    return config.stash[FALLBACK].report if FALLBACK in config.stash else []


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Slow tests first: run in parallel, a long test started last would finish alone."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


# -- PostgreSQL ------------------------------------------------------------------------------------


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
    async with db.reused_connections():  # the test's reads share a connection (support/db.py)
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


# -- Redis, settings, client, worker ---------------------------------------------------------------


@pytest.fixture
def redis_url() -> str:
    return servers.redis_url()


@pytest.fixture
def private_redis() -> Iterator[services.PrivateRedis]:
    """A redis-server of this test's own (on a free port), for scenarios that flush, kill or
    restart Redis, or need the default queue name."""
    server = services.PrivateRedis().start()
    yield server
    server.stop()


@contextlib.asynccontextmanager
async def _own_queue(redis_url: str) -> AsyncIterator[str]:
    name = services.unique_queue()
    yield name
    client = Redis.from_url(redis_url)
    try:
        job_ids = await client.zrange(name, 0, -1)
        keys = [b"arq:job:" + job_id for job_id in job_ids]
        await client.delete(name, *keys)
    finally:
        await client.aclose()


@pytest.fixture
async def queue(redis_url: str) -> AsyncIterator[str]:
    """A queue name of this test's own; its doorbells are removed afterwards."""
    async with _own_queue(redis_url) as name:
        yield name


@pytest.fixture
async def other_queue(redis_url: str) -> AsyncIterator[str]:
    """A second queue of this test's own, cleaned up the same way."""
    async with _own_queue(redis_url) as name:
        yield name


@pytest.fixture
def processes() -> Iterator[list[workers.WorkerProcess]]:
    """Worker processes a test starts; all stopped at the end, whatever happened."""
    started: list[workers.WorkerProcess] = []
    yield started
    for process in started:
        process.stop()


@pytest.fixture
def settings(
    database_url: str, redis_url: str, queue: str, monkeypatch: pytest.MonkeyPatch
) -> Settings:
    # The test agents' marker rows go to this test's database (tests/agents.py reads it).
    monkeypatch.setenv("DATABASE_URL", database_url)
    return workers.make_settings(database_url, redis_url, queue)


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[TaskClient]:
    client = TaskClient.from_settings(settings)
    yield client
    checked_out = client.engine.pool.checkedout()  # type: ignore[attr-defined]
    await client.close()
    assert checked_out == 0, f"{checked_out} connection(s) left checked out of the pool"


@pytest.fixture
async def conversation(client: TaskClient) -> Conversation:
    return await client.create_conversation(user_id="test-user", title="test")


@pytest.fixture
async def worker(settings: Settings) -> AsyncIterator[WorkerRuntime]:
    """An in-process worker on this test's database and queue."""
    async with workers.running_worker(settings) as runtime:
        yield runtime
