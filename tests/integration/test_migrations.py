"""Migrations == models: upgrade an empty database, compare with the metadata, go down and up.

The database here is created empty (not from the migrated template) and dropped afterwards.
Alembic's commands run their own event loop (migrations/env.py), so they run in a thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy.engine import Connection

from persistence.migrate import alembic_config
from persistence.models import Base
from persistence.schema import SCHEMA_REVISION
from persistence.session import create_engine
from tests.support.databases import (
    create_database,
    drop_database,
    plain_url_for,
    unique_name,
    url_for,
)


@pytest.fixture
async def empty_database() -> AsyncIterator[str]:
    name = unique_name("tasklane_test_migrations")
    await create_database(name)
    try:
        yield name
    finally:
        await drop_database(name)


async def alembic(command_name: str, url: str, *args: Any) -> None:
    await asyncio.to_thread(getattr(command, command_name), alembic_config(url), *args)


def _diff(connection: Connection) -> list[Any]:
    context = MigrationContext.configure(
        connection, opts={"compare_type": True, "compare_server_default": True}
    )
    return list(compare_metadata(context, Base.metadata))


async def schema_diff(url: str) -> list[Any]:
    engine = create_engine(url, pool_size=1, max_overflow=0)
    try:
        async with engine.connect() as conn:
            return await conn.run_sync(_diff)
    finally:
        await engine.dispose()


async def catalog(database: str) -> dict[str, list[str]]:
    conn = await asyncpg.connect(plain_url_for(database))
    try:
        tables = await conn.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1"
        )
        indexes = await conn.fetch(
            "SELECT indexname FROM pg_indexes WHERE schemaname = 'public' ORDER BY 1"
        )
        version = await conn.fetch("SELECT version_num FROM alembic_version")
    finally:
        await conn.close()
    return {
        "tables": [r["tablename"] for r in tables],
        "indexes": [r["indexname"] for r in indexes],
        "version": [r["version_num"] for r in version],
    }


async def catalog_or_empty(database: str) -> dict[str, list[str]]:
    """Like `catalog`, for a database that has no alembic_version table yet."""
    conn = await asyncpg.connect(plain_url_for(database))
    try:
        tables = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    finally:
        await conn.close()
    return {"tables": [r["tablename"] for r in tables]}


async def test_upgrade_compare_downgrade_upgrade(empty_database: str) -> None:
    url = url_for(empty_database)
    assert (await catalog_or_empty(empty_database))["tables"] == []

    await alembic("upgrade", url, "head")
    after_upgrade = await catalog(empty_database)
    assert after_upgrade["tables"] == [
        "agents",
        "alembic_version",
        "audit_log",
        "conversations",
        "flow_keys",
        "flow_limits",
        "pauses",
        "sweepers",
        "task_attempts",
        "task_signals",
        "tasklane_schema",
        "tasks",
        "workers",
    ]
    assert after_upgrade["version"] == [SCHEMA_REVISION]
    assert await schema_diff(url) == []
    await alembic("check", url)  # what `alembic check` in CI would say

    await alembic("downgrade", url, "base")
    after_downgrade = await catalog(empty_database)
    assert after_downgrade["tables"] == ["alembic_version"]
    assert after_downgrade["indexes"] == ["alembic_version_pkc"]
    assert after_downgrade["version"] == []

    await alembic("upgrade", url, "head")
    assert await catalog(empty_database) == after_upgrade
    assert await schema_diff(url) == []


async def test_the_comparison_does_see_drift(empty_database: str) -> None:
    """The no-diff assertion above can fail: a hand-made change to the schema shows up."""
    url = url_for(empty_database)
    await alembic("upgrade", url, "head")
    conn = await asyncpg.connect(plain_url_for(empty_database))
    try:
        await conn.execute("DROP INDEX ix_tasks_pending_agent")
        await conn.execute("ALTER TABLE tasks ADD COLUMN surprise text")
    finally:
        await conn.close()
    diff = await schema_diff(url)
    kinds = sorted(d[0] if isinstance(d, tuple) else d[0][0] for d in diff)
    assert kinds == ["add_index", "remove_column"], diff


async def test_0002_fails_unfinished_rows_that_break_the_new_rules(empty_database: str) -> None:
    """Rows written before the stricter CHECKs: unfinished ones that could never run right are
    failed with the reason; finished history stays as it was."""
    url = url_for(empty_database)
    await alembic("upgrade", url, "0001")
    conn = await asyncpg.connect(plain_url_for(empty_database))
    try:
        conv = await conn.fetchval("INSERT INTO conversations (user_id) VALUES ('u') RETURNING id")
        insert = (
            "INSERT INTO tasks (conversation_id, agent_id, status) VALUES ($1, $2, $3) RETURNING id"
        )
        tab = await conn.fetchval(insert, conv, "\t", "pending")
        done_tab = await conn.fetchval(insert, conv, "a b", "completed")
        fine = await conn.fetchval(insert, conv, "echo", "pending")
        selfish = await conn.fetchval(insert, conv, "echo", "pending")
        await conn.execute("UPDATE tasks SET parent_task_id = id WHERE id = $1", selfish)
        await alembic("upgrade", url, "head")
        rows = {r["id"]: r for r in await conn.fetch("SELECT id, status, error FROM tasks")}
        with pytest.raises(asyncpg.CheckViolationError, match="ck_tasks_agent_id_format"):
            await conn.execute(insert, conv, "\t", "pending")
    finally:
        await conn.close()
    assert rows[tab]["status"] == "failed"
    assert "is not a valid agent id" in rows[tab]["error"]
    assert rows[selfish]["status"] == "failed"
    assert "its own parent" in rows[selfish]["error"]
    assert (rows[fine]["status"], rows[done_tab]["status"]) == ("pending", "completed")
