"""Throwaway PostgreSQL databases: one migrated template per test session, one copy per test.

Names start with `tasklane_test_` so a crashed run's leftovers are easy to recognise and drop.
"""

from __future__ import annotations

import asyncio
import os
import uuid

import asyncpg
from sqlalchemy.engine import make_url

from persistence.migrate import migrate
from tests.support.servers import postgres_url

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def url_for(database: str, server_url: str | None = None) -> str:
    """An asyncpg-flavoured SQLAlchemy URL for `database` on the test server (or another)."""
    return _url(database, "postgresql+asyncpg", server_url)


def plain_url_for(database: str, server_url: str | None = None) -> str:
    """A libpq-style URL (for asyncpg.connect and psql)."""
    return _url(database, "postgresql", server_url)


def _url(database: str, driver: str, server_url: str | None) -> str:
    url = make_url(server_url or postgres_url()).set(drivername=driver, database=database)
    return url.render_as_string(hide_password=False)


def unique_name(prefix: str = "tasklane_test") -> str:
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


async def _admin(sql: str, server_url: str | None = None) -> None:
    conn = await asyncpg.connect(plain_url_for("postgres", server_url))
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def create_database(
    name: str, *, template: str | None = None, server_url: str | None = None
) -> None:
    # WAL_LOG, not FILE_COPY: FILE_COPY forces two checkpoints per copy, and a checkpoint waits
    # for every page dirty on the server. While another test bulk-loads a million rows, a copy
    # took 0.9-2.8 s with FILE_COPY and 0.5-0.8 s with WAL_LOG (the template is a few MB).
    clause = f' TEMPLATE "{template}" STRATEGY WAL_LOG' if template else ""
    await _admin(f'CREATE DATABASE "{name}"{clause}', server_url)


async def drop_database(name: str, server_url: str | None = None) -> None:
    await _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', server_url)


async def _execute(database: str, sql: str, server_url: str | None = None) -> None:
    conn = await asyncpg.connect(plain_url_for(database, server_url))
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def create_migrated_template(server_url: str | None = None) -> str:
    """The migrated schema, plus what only tests use: the `test_marks` table the test agents
    write to, and the audit trigger that records every task transition (support/invariants.py)."""
    from tests.agents import MARKS_DDL
    from tests.support.invariants import AUDIT_DDL

    name = unique_name("tasklane_test_tpl")
    asyncio.run(create_database(name, server_url=server_url))
    migrate(url_for(name, server_url))
    asyncio.run(_execute(name, MARKS_DDL + ";" + AUDIT_DDL, server_url))
    return name
