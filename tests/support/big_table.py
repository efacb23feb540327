"""A `tasks` table of millions of rows, built in seconds: for tests/integration/test_scale.py and
the `scale` case of bench/run.py.

Rows are made by the database (INSERT … SELECT generate_series), with the table's indexes and
foreign keys dropped first and rebuilt after (as a bulk load is done), then VACUUM ANALYZE, so
that the planner and the visibility map see the table as a long-running deployment's would
(autovacuum is off on the CI machine).

The shape: `finished` tasks spread over the last 30 days (completed 90 %, failed 7 %, cancelled
3 %), `pending` due tasks, `agents` agents, a conversation per 1,000 tasks.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg

from tests.support.databases import plain_url_for

AGENT_PREFIX = "bulk-agent-"


@dataclass(frozen=True, slots=True)
class Built:
    finished: int
    pending: int
    agents: int
    seconds: float


_CONVERSATIONS = """
INSERT INTO conversations (id, user_id, title)
SELECT md5('bulk-conversation-' || g)::uuid, 'bulk', 'bulk ' || g
FROM generate_series(0, CAST($1 AS bigint) - 1) AS g
ON CONFLICT (id) DO NOTHING
"""

# $1 first row number, $2 rows, $3 agents, $4 'finished' or 'pending'
_TASKS = """
INSERT INTO tasks (id, conversation_id, agent_id, status, attempts, max_attempts, output, error,
                   run_after, dispatch_after, created_at, started_at, completed_at, updated_at,
                   limit_key, due_rank)
SELECT gen_random_uuid(),
       md5('bulk-conversation-' || (g / 1000))::uuid,
       CAST($5 AS text) || (g % CAST($3 AS int)),
       s.status,
       CASE WHEN CAST($4 AS text) = 'pending' THEN 0 ELSE 1 END,
       3,
       CASE WHEN s.status = 'completed' THEN '{"ok": true}'::jsonb END,
       CASE WHEN s.status IN ('failed', 'cancelled') THEN s.status END,
       t.created, t.created, t.created,
       CASE WHEN CAST($4 AS text) = 'pending' THEN NULL ELSE t.created END,
       CASE WHEN CAST($4 AS text) = 'pending' THEN NULL ELSE t.created + interval '2 seconds' END,
       t.created, '', t.created
FROM generate_series(CAST($1 AS bigint), CAST($1 AS bigint) + CAST($2 AS bigint) - 1) AS g
CROSS JOIN LATERAL (
    SELECT CASE WHEN CAST($4 AS text) = 'pending' THEN 'pending'
                WHEN g % 100 < 90 THEN 'completed'
                WHEN g % 100 < 97 THEN 'failed'
                ELSE 'cancelled' END AS status
) AS s
CROSS JOIN LATERAL (
    -- spread over the last 30 days, oldest first; pending ones over the last hour
    SELECT now() - CASE WHEN CAST($4 AS text) = 'pending' THEN interval '1 hour'
                        ELSE interval '30 days' END
           * (1 - (g - CAST($1 AS bigint))::float8 / CAST($2 AS bigint)) AS created
) AS t
"""


async def build(
    database: str,
    *,
    finished: int,
    pending: int,
    agents: int = 8,
    server_url: str | None = None,
) -> Built:
    """Fill `database`'s (migrated, empty) tasks table. Returns what was built, and how long
    it took."""
    started = time.monotonic()
    conn = await asyncpg.connect(plain_url_for(database, server_url))
    try:
        await conn.execute("SET statement_timeout = 0; SET maintenance_work_mem = '256MB'")
        async with bulk_load(conn):
            await conn.execute(_CONVERSATIONS, (finished + pending) // 1000 + 1)
            await conn.execute(_TASKS, 0, finished, agents, "finished", AGENT_PREFIX)
            await conn.execute(_TASKS, finished, pending, agents, "pending", AGENT_PREFIX)
        await conn.execute("VACUUM ANALYZE tasks")
        await conn.execute("VACUUM ANALYZE conversations")
    finally:
        await conn.close()
    return Built(finished, pending, agents, time.monotonic() - started)


@contextlib.asynccontextmanager
async def bulk_load(conn: asyncpg.Connection) -> AsyncIterator[None]:
    """Drop the `tasks` table's indexes and foreign keys (and those that point at it) for a bulk
    load on `conn`, and build them again after it. Rows should bring their `limit_key` and
    `due_rank`: the flow trigger then leaves them alone (about 10 µs a row otherwise)."""
    indexes = await conn.fetch(
        "SELECT c.relname AS name, pg_get_indexdef(i.indexrelid) AS definition, "
        "con.conname AS constraint_name, pg_get_constraintdef(con.oid) AS constraint_def "
        "FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
        "LEFT JOIN pg_constraint con ON con.conindid = i.indexrelid "
        "AND con.conrelid = i.indrelid AND con.contype IN ('p', 'u', 'x') "
        "WHERE i.indrelid = 'tasks'::regclass"
    )
    foreign_keys = await conn.fetch(
        "SELECT conname AS name, pg_get_constraintdef(oid) AS definition FROM pg_constraint "
        "WHERE conrelid = 'tasks'::regclass AND contype = 'f'"
    )
    referencing = await conn.fetch(
        "SELECT conrelid::regclass::text AS tbl, conname AS name, "
        "pg_get_constraintdef(oid) AS definition FROM pg_constraint "
        "WHERE confrelid = 'tasks'::regclass AND conrelid <> 'tasks'::regclass"
    )
    for fk in referencing:
        await conn.execute(f'ALTER TABLE {fk["tbl"]} DROP CONSTRAINT "{fk["name"]}"')
    for fk in foreign_keys:
        await conn.execute(f'ALTER TABLE tasks DROP CONSTRAINT "{fk["name"]}"')
    for index in indexes:
        if index["constraint_name"]:
            await conn.execute(f'ALTER TABLE tasks DROP CONSTRAINT "{index["constraint_name"]}"')
        else:
            await conn.execute(f'DROP INDEX "{index["name"]}"')

    yield

    for index in indexes:
        if index["constraint_name"]:
            await conn.execute(
                f'ALTER TABLE tasks ADD CONSTRAINT "{index["constraint_name"]}" '
                f"{index['constraint_def']}"
            )
        else:
            await conn.execute(index["definition"])
    for fk in foreign_keys:
        await conn.execute(f'ALTER TABLE tasks ADD CONSTRAINT "{fk["name"]}" {fk["definition"]}')
    for fk in referencing:
        await conn.execute(
            f'ALTER TABLE {fk["tbl"]} ADD CONSTRAINT "{fk["name"]}" {fk["definition"]}'
        )
