"""Reading the test database directly, as an operator would: plain SQL."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar
from uuid import UUID

import asyncpg

from persistence import pg
from persistence.errors import CONNECTION_ERRORS

T = TypeVar("T")


# Tests read the database often (`eventually` polls every 50 ms): a connection per read cost the
# suite some 3,000 backends, each forked, introspected (the jsonb codec) and torn down. Within a
# test that asks for it (the `database` fixture does, for its test's event loop), reads reuse one
# connection per URL; reads from any other loop (a sync test's `asyncio.run`, a thread) still
# open their own.
_reusing: set[asyncio.AbstractEventLoop] = set()
_kept: dict[tuple[asyncio.AbstractEventLoop, str], asyncpg.Connection] = {}


@contextlib.asynccontextmanager
async def reused_connections() -> AsyncIterator[None]:
    """Reads in this event loop reuse a connection per URL until the block ends."""
    loop = asyncio.get_running_loop()
    _reusing.add(loop)
    try:
        yield
    finally:
        _reusing.discard(loop)
        for key in [key for key in _kept if key[0] is loop]:
            _kept.pop(key).terminate()  # no goodbye: the server may be gone


async def query(url: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    loop = asyncio.get_running_loop()
    if loop not in _reusing:
        conn = await pg.connect(url)
        try:
            return list(await conn.fetch(sql, *args))
        finally:
            await conn.close()
    kept = _kept.pop((loop, url), None)  # taken while in use: concurrent reads open their own
    if kept is not None and not kept.is_closed():
        # Its backend gone (terminated, restarted, dropped with its database): the read is made
        # again on a new connection, as it always was.
        with contextlib.suppress(*CONNECTION_ERRORS):
            return await _read_and_keep(kept, url, sql, args)
    return await _read_and_keep(await pg.connect(url), url, sql, args)


async def _read_and_keep(
    conn: asyncpg.Connection, url: str, sql: str, args: tuple[Any, ...]
) -> list[asyncpg.Record]:
    try:
        rows = list(await conn.fetch(sql, *args))
    except BaseException as exc:
        if isinstance(exc, asyncpg.PostgresError) and not isinstance(exc, CONNECTION_ERRORS):
            _keep(conn, url)  # an error in the SQL leaves the connection as good as it was
        else:
            conn.terminate()  # lost, or cancelled mid-read: not to be used again
        raise
    _keep(conn, url)
    return rows


def _keep(conn: asyncpg.Connection, url: str) -> None:
    loop = asyncio.get_running_loop()
    if conn.is_closed():
        return
    if loop not in _reusing or (loop, url) in _kept:
        conn.terminate()  # the block ended meanwhile, or a concurrent read kept its own
        return
    _kept[(loop, url)] = conn


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
