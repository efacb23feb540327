"""Reading the test database directly, as an operator would: plain SQL."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from uuid import UUID

import asyncpg

from persistence import pg

T = TypeVar("T")


async def query(url: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    conn = await pg.connect(url)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


async def bulk(url: str, sql: str, *args: Any) -> None:
    """A statement that builds test data in bulk (hundreds of thousands of rows): no statement
    timeout, which a shared machine could otherwise hit."""
    conn = await pg.connect(url)
    try:
        async with conn.transaction():
            await conn.execute("SET LOCAL statement_timeout = 0")
            await conn.execute(sql, *args)
    finally:
        await conn.close()


async def value(url: str, sql: str, *args: Any) -> Any:
    rows = await query(url, sql, *args)
    return rows[0][0] if rows else None


async def task_row(url: str, task_id: UUID) -> asyncpg.Record:
    rows = await query(url, "SELECT * FROM tasks WHERE id = $1", task_id)
    assert rows, f"task {task_id} not found"
    return rows[0]


async def attempts(url: str, task_id: UUID) -> list[asyncpg.Record]:
    return await query(url, "SELECT * FROM task_attempts WHERE task_id = $1 ORDER BY run", task_id)


async def marks(
    url: str, task_id: UUID | None = None, label: str | None = None
) -> list[asyncpg.Record]:
    return await query(
        url,
        "SELECT * FROM test_marks WHERE ($1::uuid IS NULL OR task_id = $1)"
        " AND ($2::text IS NULL OR label = $2) ORDER BY id",
        task_id,
        label,
    )


async def eventually(
    probe: Callable[[], Awaitable[T]],
    check: Callable[[T], bool],
    *,
    timeout: float = 20.0,
    interval: float = 0.05,
    what: str = "condition",
) -> T:
    """Poll `probe()` until `check` accepts its value; fail with the last value seen."""
    deadline = time.monotonic() + timeout
    while True:
        result = await probe()
        if check(result):
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s; last value: {result!r}")
        await asyncio.sleep(interval)


async def wait_final(url: str, task_ids: list[UUID], timeout: float = 30.0) -> list[asyncpg.Record]:
    """Wait until every task is completed, failed or cancelled; return their rows."""

    async def rows() -> list[asyncpg.Record]:
        return await query(url, "SELECT * FROM tasks WHERE id = ANY($1::uuid[])", task_ids)

    return await eventually(
        rows,
        lambda rs: (
            len(rs) == len(task_ids)
            and all(r["status"] in ("completed", "failed", "cancelled") for r in rs)
        ),
        timeout=timeout,
        what=f"{len(task_ids)} task(s) finished",
    )
