"""tests/support/db.py reuses one connection per URL within a test: these hold it to what a
fresh connection per read gave — a read after the backend died still answers, an error in the
SQL costs nothing, and the connection is gone when the test's block ends."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from tests.support import db

BACKEND = "SELECT pg_backend_pid()"


async def test_reads_share_a_connection_and_a_dead_one_is_replaced(database_url: str) -> None:
    first = await db.value(database_url, BACKEND)
    assert await db.value(database_url, BACKEND) == first  # kept

    with pytest.raises(asyncpg.UndefinedTableError):
        await db.query(database_url, "SELECT * FROM no_such_table")
    assert await db.value(database_url, BACKEND) == first  # an error in the SQL keeps it

    conn = await asyncpg.connect(database_url.replace("+asyncpg", ""))
    try:
        assert await conn.fetchval("SELECT pg_terminate_backend($1)", first)
    finally:
        await conn.close()
    # Whether or not the client has seen the goodbye yet (a closed connection, or one that fails
    # the read), the read is answered on a new connection.
    second = await db.value(database_url, BACKEND)
    assert second != first
    assert await db.value(database_url, BACKEND) == second


async def test_the_kept_connection_closes_with_its_block(database_url: str) -> None:
    async def in_a_block_of_its_own() -> list[int]:  # another event loop, as a thread has
        async with db.reused_connections():
            return [await db.value(database_url, BACKEND) for _ in range(2)]

    pids = await asyncio.to_thread(asyncio.run, in_a_block_of_its_own())
    assert pids[0] == pids[1]
    await asyncio.sleep(0.1)
    alive = "SELECT count(*) FROM pg_stat_activity WHERE pid = $1"
    assert await db.value(database_url, alive, pids[0]) == 0
