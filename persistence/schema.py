"""Which schema this code needs, and a check that the database serves it.

Migration revisions are numbered in order ("0001", "0002", …). Code written for revision R runs
on a database at R or later, as long as no later migration declared that it breaks code older
than itself: each migration keeps `tasklane_schema.oldest_code_revision` — a migration that only
extends the schema (new tables, nullable columns, indexes) leaves it as it is, one that older
code would misuse sets it to its own revision. So a rolling deploy can run `tasklane migrate`
first and still have every running worker healthy, and a worker of older code is refused, with
the reason, only once a migration says so.
"""

from __future__ import annotations

import asyncpg

from domain.exceptions import DomainError

# The Alembic head this code was written against (a test keeps it equal to the real head).
SCHEMA_REVISION = "0012"


class SchemaError(DomainError):
    """The database does not serve the schema this code needs."""


async def check_schema(conn: asyncpg.Connection | asyncpg.pool.PoolConnectionProxy) -> str:
    """The database's revision, if this code can run on it; else `SchemaError` saying why."""
    try:
        revision = await conn.fetchval("SELECT version_num FROM alembic_version")
    except asyncpg.UndefinedTableError:
        raise SchemaError("the database is not migrated: run `tasklane migrate`") from None
    if revision is None or revision < SCHEMA_REVISION:
        raise SchemaError(
            f"the database schema is at revision {revision or 'none'}, this code needs "
            f"{SCHEMA_REVISION} or later: run `tasklane migrate`"
        )
    oldest = await conn.fetchval("SELECT max(oldest_code_revision) FROM tasklane_schema")
    if oldest is not None and oldest > SCHEMA_REVISION:
        raise SchemaError(
            f"the database schema is at revision {revision}, which no longer serves code "
            f"written for {SCHEMA_REVISION} (the oldest it serves is {oldest}): deploy newer "
            "tasklane code"
        )
    return str(revision)
