"""SQL written once, run two ways.

Lifecycle statements are plain SQL with `:name` parameters. Inside a unit of work they run through
the SQLAlchemy session (same transaction as everything else); on the worker's hot path they run on
a plain asyncpg connection, which needs `$n` placeholders. `Sql` holds both forms, compiled once.

Write casts as `CAST(:x AS type)`, never `:x::type` (SQLAlchemy's `text()` would misread it).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import asyncpg
from sqlalchemy import TextClause, text
from sqlalchemy.ext.asyncio import AsyncSession

_PARAM = re.compile(r"(?<![:\w]):([A-Za-z_]\w*)")


class Row(Protocol):
    """A result row read by column name: an asyncpg Record or a SQLAlchemy RowMapping."""

    def __getitem__(self, key: str, /) -> Any: ...


@dataclass(frozen=True, slots=True)
class Sql:
    source: str
    clause: TextClause = field(init=False, repr=False)
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
        object.__setattr__(self, "clause", text(self.source))

    def args(self, params: Mapping[str, Any]) -> list[Any]:
        return [params[name] for name in self.names]


class Executor(Protocol):
    """Runs `Sql` in whatever transaction its connection is in."""

    async def fetch(self, stmt: Sql, **params: Any) -> Sequence[Row]: ...

    async def execute(self, stmt: Sql, **params: Any) -> None: ...


class SessionExecutor:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def fetch(self, stmt: Sql, **params: Any) -> Sequence[Row]:
        result = await self.session.execute(stmt.clause, params)
        return cast("Sequence[Row]", result.mappings().all())

    async def execute(self, stmt: Sql, **params: Any) -> None:
        await self.session.execute(stmt.clause, params)


class ConnectionExecutor:
    def __init__(self, conn: asyncpg.Connection | asyncpg.pool.PoolConnectionProxy) -> None:
        self.conn = conn

    async def fetch(self, stmt: Sql, **params: Any) -> Sequence[Row]:
        return cast("Sequence[Row]", await self.conn.fetch(stmt.pg, *stmt.args(params)))

    async def execute(self, stmt: Sql, **params: Any) -> None:
        await self.conn.execute(stmt.pg, *stmt.args(params))
