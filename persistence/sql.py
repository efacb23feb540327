"""One executor abstraction for every repository: a unit of work's session or a pooled connection.

Repositories issue statements through an `Executor` and never know which one they have:
- `SessionExecutor` runs in a SQLAlchemy `AsyncSession`'s transaction (the `UnitOfWork` that
  producers, the CLI and operators use);
- `ConnectionExecutor` runs on a plain asyncpg connection (the worker's hot path, where the
  ORM's per-statement cost would be most of the work), in autocommit unless a repository method
  asks for `atomic()`;
- `AutocommitExecutor` runs one statement on a connection of its own from an asyncpg pool
  (a producer's single-statement submit).

Statements are either `Sql` — plain SQL with `:name` parameters, compiled once to asyncpg's `$n`
form — or SQLAlchemy Core statements (allow-listed filters and pagination), which the connection
executor compiles for asyncpg. Write casts as `CAST(:x AS type)`, never `:x::type` (SQLAlchemy's
`text()` would misread it).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias, cast

import asyncpg

from persistence.errors import CONNECTION_ERRORS

# SQLAlchemy is imported only where a statement needs it (a session, a Core statement): the
# CLI's read commands run `Sql` on one asyncpg connection, and importing SQLAlchemy would be most
# of their run time (tests/integration/test_cli_imports.py).
if TYPE_CHECKING:
    from sqlalchemy import TextClause
    from sqlalchemy.engine.interfaces import Dialect
    from sqlalchemy.ext.asyncio import AsyncSession
    from sqlalchemy.sql import Executable

_PARAM = re.compile(r"(?<![:\w]):([A-Za-z_]\w*)")


@functools.cache
def _dialect() -> Dialect:
    from sqlalchemy.dialects.postgresql import asyncpg as asyncpg_dialect

    return asyncpg_dialect.dialect()  # type: ignore[no-untyped-call]


class Row(Protocol):
    """A result row read by column name: an asyncpg Record or a SQLAlchemy RowMapping."""

    def __getitem__(self, key: str, /) -> Any: ...

    def items(self) -> Iterable[tuple[str, Any]]: ...


@dataclass(frozen=True, slots=True)
class Sql:
    source: str
    pg: str = field(init=False, repr=False)  # the same statement with $1, $2… placeholders
    names: tuple[str, ...] = field(init=False, repr=False)  # parameter name of each $n

    def __post_init__(self) -> None:
        names: list[str] = []

        def number(match: re.Match[str]) -> str:
            name = match[1]
            if name not in names:
                names.append(name)
            return f"${names.index(name) + 1}"

        object.__setattr__(self, "pg", _PARAM.sub(number, self.source))
        object.__setattr__(self, "names", tuple(names))

    @property
    def clause(self) -> TextClause:
        """The statement for a SQLAlchemy session (built when one runs it)."""
        return _text(self.source)

    def args(self, params: Mapping[str, Any]) -> list[Any]:
        return [params[name] for name in self.names]


@functools.lru_cache(maxsize=1024)
def _text(source: str) -> TextClause:
    from sqlalchemy import text

    return text(source)


Statement: TypeAlias = "Sql | Executable"


class Executor(Protocol):
    """Runs statements in whatever transaction its connection is in."""

    async def fetch(self, stmt: Statement, **params: Any) -> Sequence[Row]: ...

    async def execute(self, stmt: Statement, **params: Any) -> None: ...

    def atomic(self) -> contextlib.AbstractAsyncContextManager[None]:
        """Statements inside commit together: a transaction of their own on a bare connection,
        nothing more inside a unit of work's transaction."""
        ...


class SessionExecutor:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def fetch(self, stmt: Statement, **params: Any) -> Sequence[Row]:
        clause = stmt.clause if isinstance(stmt, Sql) else stmt
        result = await self.session.execute(clause, params or None)
        if not result.returns_rows:  # type: ignore[attr-defined]  # an UPDATE without RETURNING
            return []
        return cast("Sequence[Row]", result.mappings().all())

    async def execute(self, stmt: Statement, **params: Any) -> None:
        clause = stmt.clause if isinstance(stmt, Sql) else stmt
        await self.session.execute(clause, params or None)

    @contextlib.asynccontextmanager
    async def atomic(self) -> AsyncIterator[None]:
        yield  # the unit of work's transaction already holds everything together


def compile_core(stmt: Executable) -> tuple[str, list[Any]]:
    """A Core statement as asyncpg SQL with its positional arguments, bound as SQLAlchemy binds
    them (a JSON value becomes JSON text, which the pool's jsonb codec takes)."""
    compiled = stmt.compile(dialect=_dialect(), compile_kwargs={"render_postcompile": True})  # type: ignore[attr-defined]
    processors = compiled._bind_processors
    args = []
    for name in compiled.positiontup or ():
        value = compiled.params[name]
        process = processors.get(name)
        args.append(process(value) if process is not None else value)
    return compiled.string, args


class ConnectionExecutor:
    def __init__(self, conn: asyncpg.Connection | asyncpg.pool.PoolConnectionProxy) -> None:
        self.conn = conn

    async def fetch(self, stmt: Statement, **params: Any) -> Sequence[Row]:
        if isinstance(stmt, Sql):
            return cast("Sequence[Row]", await self.conn.fetch(stmt.pg, *stmt.args(params)))
        query, args = compile_core(stmt)
        return cast("Sequence[Row]", await self.conn.fetch(query, *args))

    async def execute(self, stmt: Statement, **params: Any) -> None:
        if isinstance(stmt, Sql):
            await self.conn.execute(stmt.pg, *stmt.args(params))
        else:
            query, args = compile_core(stmt)
            await self.conn.execute(query, *args)

    @contextlib.asynccontextmanager
    async def atomic(self) -> AsyncIterator[None]:
        if self.conn.is_in_transaction():
            yield
            return
        async with self.conn.transaction():
            yield


class ConnectionLost(Exception):
    """The connection was closed, or died under the statement (which may have committed)."""


class AutocommitExecutor:
    """An `Executor` that runs each statement on a connection of its own from an asyncpg pool
    (`persistence.pg.create_pool`, created on first use by `pool()`): the statement commits by
    itself, in one round trip (no BEGIN/COMMIT, no pre-ping).

    A plain asyncpg pool, not a SQLAlchemy engine: checking a connection out of an engine and back
    in (greenlets, pool events, reset on return) took more of a single submit's client CPU than
    the statement itself (bench/run.py, submit). A connection is checked here instead: one found
    closed in the pool, or lost under the statement, is terminated and `ConnectionLost` raised
    (chained to the cause). A statement that fails in Postgres leaves a healthy connection, which
    goes back to the pool, and its error is raised as it is. `atomic()` is refused: every
    statement here commits alone.
    """

    def __init__(self, pool: Callable[[], Awaitable[asyncpg.Pool]]) -> None:
        self._pool = pool

    async def fetch(self, stmt: Statement, **params: Any) -> Sequence[Row]:
        pool = await self._pool()
        conn = await pool.acquire()  # a refused connection is raised as it is
        try:
            if conn.is_closed():  # dropped while it sat in the pool
                raise ConnectionLost("the pooled connection was closed")
            rows = await ConnectionExecutor(conn).fetch(stmt, **params)
        except BaseException as exc:
            if isinstance(exc, asyncpg.PostgresError) and not isinstance(exc, CONNECTION_ERRORS):
                await pool.release(conn)  # e.g. a foreign key violation: the connection is fine
                raise
            # Lost, or cancelled mid-statement: the connection is not to be used again.
            await asyncio.shield(_discard(pool, conn))
            if isinstance(exc, Exception) and not isinstance(exc, ConnectionLost):
                raise ConnectionLost(repr(exc)) from exc
            raise
        await pool.release(conn)
        return rows

    async def execute(self, stmt: Statement, **params: Any) -> None:
        await self.fetch(stmt, **params)

    def atomic(self) -> contextlib.AbstractAsyncContextManager[None]:
        raise TypeError("an autocommit executor runs single statements only")


async def _discard(pool: asyncpg.Pool, conn: asyncpg.pool.PoolConnectionProxy) -> None:
    # asyncpg may have handed a connection that died back to its pool on its own already.
    with contextlib.suppress(asyncpg.InterfaceError):
        conn.terminate()
        await pool.release(conn)
