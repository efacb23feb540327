"""A plain asyncpg pool for the worker's hot path, decoding like SQLAlchemy's connections do.

Both kinds of connection hand jsonb values over as Python objects and take them as JSON text,
so the statements in `persistence.lifecycle` behave the same on either.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import asyncpg

from domain.payload import decode_json
from persistence.timeouts import DEFAULT_TIMEOUTS, DbTimeouts
from persistence.url import asyncpg_dsn

if TYPE_CHECKING:
    from sqlalchemy.engine import URL


def _encode_jsonb(text: str) -> bytes:
    return b"\x01" + text.encode()  # binary jsonb is a version byte followed by the text


def _decode_jsonb(data: bytes) -> Any:
    return decode_json(data[1:].decode())


class _Connection(asyncpg.Connection):
    """A pooled connection that skips asyncpg's reset query on release.

    By default every release sends `SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *;
    RESET ALL`: a round trip (and a statement for PostgreSQL) per lifecycle step. Without it,
    bench/run.py measured ~8 % more tasks/s and ~15 % less PostgreSQL CPU per task. Nothing in
    tasklane leaves session state behind (no SET, LISTEN, cursors or advisory locks on these
    connections); an open transaction is still rolled back on release, which asyncpg does
    regardless of this query.
    """

    def get_reset_query(self) -> str:
        return ""


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec(
        "jsonb",
        encoder=_encode_jsonb,
        decoder=_decode_jsonb,
        schema="pg_catalog",
        format="binary",
    )


def dsn(url: str | URL) -> str:
    """A libpq-style DSN (asyncpg's) from a SQLAlchemy-style URL."""
    if isinstance(url, str):
        return asyncpg_dsn(url)  # no SQLAlchemy import (persistence.url)
    from persistence.session import database_url

    return database_url(url, driver="postgresql").render_as_string(hide_password=False)


async def create_pool(
    url: str | URL,
    *,
    min_size: int = 1,
    max_size: int = 10,
    statement_cache: bool = True,
    application_name: str = "tasklane",
    timeouts: DbTimeouts = DEFAULT_TIMEOUTS,
) -> asyncpg.Pool:
    return await asyncpg.create_pool(
        dsn(url),
        min_size=min(min_size, max_size),
        max_size=max_size,
        init=_init_connection,
        connection_class=_Connection,
        statement_cache_size=100 if statement_cache else 0,
        server_settings={"application_name": application_name, **timeouts.server_settings()},
        command_timeout=timeouts.command_seconds,
        timeout=timeouts.connect_seconds,
        # A connection that died under us (pg_terminate_backend, a restart) is replaced.
        max_inactive_connection_lifetime=300,
    )


async def connect(
    url: str | URL,
    *,
    statement_cache: bool = True,
    application_name: str = "tasklane",
    timeouts: DbTimeouts = DEFAULT_TIMEOUTS,
) -> asyncpg.Connection:
    conn = await asyncpg.connect(
        dsn(url),
        statement_cache_size=100 if statement_cache else 0,
        server_settings={"application_name": application_name, **timeouts.server_settings()},
        command_timeout=timeouts.command_seconds,
        timeout=timeouts.connect_seconds,
    )
    await _init_connection(conn)
    return conn
