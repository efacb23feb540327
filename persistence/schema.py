"""Which schema this code needs, and a check that the database has it."""

from __future__ import annotations

import asyncpg

from domain.exceptions import DomainError

# The Alembic head this code was written against (a test keeps it equal to the real head).
SCHEMA_REVISION = "0001"


class SchemaError(DomainError):
    """The database is not migrated to the revision this code needs."""


async def check_schema(conn: asyncpg.Connection | asyncpg.pool.PoolConnectionProxy) -> None:
    try:
        revision = await conn.fetchval("SELECT version_num FROM alembic_version")
    except asyncpg.UndefinedTableError:
        raise SchemaError("the database is not migrated: run `tasklane migrate`") from None
    if revision != SCHEMA_REVISION:
        raise SchemaError(
            f"the database schema is at revision {revision or 'none'}, this code needs "
            f"{SCHEMA_REVISION}: run `tasklane migrate`"
        )
