"""The base of every repository: statements through one `Executor`, rows in, entities out.

It imports no SQLAlchemy. A repository made of plain `Sql` statements alone (creating tasks and
conversations) extends this class directly and so serves the CLI's one asyncpg connection as
well as a unit of work: `tasklane submit` runs on it (tests/integration/test_cli_imports.py).
`BaseRepository` adds the SQLAlchemy Core half (CRUD over a mapped table, filters, pagination).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Generic, TypeVar

from persistence.errors import translated
from persistence.sql import Executor, Row, Statement

TEntity = TypeVar("TEntity")


class StatementRepository(Generic[TEntity]):
    """Subclasses implement `_to_entity` (a row by column name)."""

    def __init__(self, ex: Executor, entity_name: str) -> None:
        self._ex = ex
        self.entity_name = entity_name

    def _to_entity(self, row: Row) -> TEntity:
        raise NotImplementedError

    # -- statements, with driver errors translated ---------------------------------------------

    async def _fetch(self, stmt: Statement, **params: Any) -> Sequence[Row]:
        with translated(self.entity_name):
            return await self._ex.fetch(stmt, **params)

    async def _entities(self, stmt: Statement, **params: Any) -> list[TEntity]:
        return [self._to_entity(row) for row in await self._fetch(stmt, **params)]
