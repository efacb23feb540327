"""Generic repository: CRUD, safe filters and pagination over one mapped table, in SQLAlchemy
Core, on top of `StatementRepository` (the executor, `_to_entity`, translated errors).

Differences from the seed guide, on purpose:
- it runs through an `Executor` (persistence.sql), so the same repository serves a unit of
  work's session and the worker's pooled asyncpg connections; rows come back as mappings and
  become entities in `_to_entity` (no identity map that lifecycle statements could leave stale);
- it never commits: the caller's unit of work owns the transaction;
- driver errors are translated in one place (`persistence.errors`) and chained: a unique
  violation and a foreign-key violation become *different* domain errors;
- filter fields come from an allow-list of mapped columns. An unknown field raises
  `InvalidFilterError` before any SQL is built; user input never reaches `getattr`.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Generic, TypeVar

from sqlalchemy import ColumnElement, Select, Table, delete, func, select
from sqlalchemy.sql.sqltypes import BigInteger, Integer, SmallInteger, String, Uuid

from domain.exceptions import InvalidFilterError, InvalidInputError
from persistence.models import Base
from persistence.repositories.statement_repository import StatementRepository
from persistence.sql import Executor

TModel = TypeVar("TModel", bound=Base)
TEntity = TypeVar("TEntity")

MAX_PAGE_SIZE = 1000


class BaseRepository(StatementRepository[TEntity], Generic[TModel, TEntity]):
    """Subclasses set `filterable_fields` and implement `_to_entity` (a row by column name)."""

    filterable_fields: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, ex: Executor, model_class: type[TModel], entity_name: str) -> None:
        super().__init__(ex, entity_name)
        self.model_class = model_class
        self.table: Table = model_class.__table__  # type: ignore[assignment]
        unknown = self.filterable_fields - set(self.table.c.keys())
        if unknown:
            raise TypeError(f"{type(self).__name__}.filterable_fields names no column: {unknown}")
        [self._primary_key] = self.table.primary_key.columns

    # -- CRUD ---------------------------------------------------------------------------------

    async def _get_by_id(self, entity_id: object) -> TEntity | None:
        found = await self._entities(select(self.table).where(self._primary_key == entity_id))
        return found[0] if found else None

    async def _delete(self, entity_id: object) -> bool:
        stmt = delete(self.table).where(self._primary_key == entity_id).returning(self._primary_key)
        return bool(await self._fetch(stmt))

    # -- queries ------------------------------------------------------------------------------

    def _conditions(self, filters: Mapping[str, Any] | None) -> list[ColumnElement[bool]]:
        """Equality (or IN, for a list/tuple/set value) on allow-listed columns only."""
        conditions: list[ColumnElement[bool]] = []
        for field, value in (filters or {}).items():
            if field not in self.filterable_fields:
                raise InvalidFilterError(self.entity_name, str(field), self.filterable_fields)
            column = self.table.c[field]
            if isinstance(value, list | tuple | set | frozenset):
                values = [self._coerce(field, column, v) for v in value]
                conditions.append(column.in_(values))
            elif value is None:
                conditions.append(column.is_(None))
            else:
                conditions.append(column == self._coerce(field, column, value))
        return conditions

    def _coerce(self, field: str, column: Any, value: Any) -> Any:
        """Reject values of the wrong kind with a clear error instead of a driver error."""
        kind = column.type
        if isinstance(kind, Uuid) and not isinstance(value, uuid.UUID):
            try:
                return uuid.UUID(str(value))
            except ValueError:
                raise InvalidInputError(f"{field} must be a UUID, got {_show(value)}") from None
        if isinstance(kind, Integer):
            if isinstance(value, bool) or not isinstance(value, int):
                raise InvalidInputError(f"{field} must be an integer, got {_show(value)}")
            bits = (
                64 if isinstance(kind, BigInteger) else 16 if isinstance(kind, SmallInteger) else 32
            )
            if not -(2 ** (bits - 1)) <= value < 2 ** (bits - 1):
                raise InvalidInputError(f"{field} is out of range for a {bits}-bit integer")
        if isinstance(kind, String) and not isinstance(value, str):
            raise InvalidInputError(f"{field} must be a string, got {_show(value)}")
        return value

    def _select(
        self, filters: Mapping[str, Any] | None, order_by: Sequence[Any] = ()
    ) -> Select[Any]:
        stmt = select(self.table).where(*self._conditions(filters))
        return stmt.order_by(*order_by) if order_by else stmt

    async def _find_many(
        self,
        filters: Mapping[str, Any] | None = None,
        *,
        limit: int = 100,
        offset: int = 0,
        order_by: Sequence[Any] = (),
    ) -> list[TEntity]:
        _check_window(limit, offset)
        return await self._entities(self._select(filters, order_by).limit(limit).offset(offset))

    async def _count(self, filters: Mapping[str, Any] | None = None) -> int:
        stmt = select(func.count().label("n")).select_from(self._select(filters).subquery())
        [row] = await self._fetch(stmt)
        return int(row["n"])

    async def _find_paginated(
        self,
        filters: Mapping[str, Any] | None = None,
        *,
        page: int = 1,
        page_size: int = 50,
        order_by: Sequence[Any] = (),
    ) -> tuple[list[TEntity], int]:
        if page < 1:
            raise InvalidInputError(f"page must be at least 1, got {page}")
        _check_window(page_size, (page - 1) * page_size)  # before the count: bad input, no SQL
        total = await self._count(filters)
        items = await self._find_many(
            filters, limit=page_size, offset=(page - 1) * page_size, order_by=order_by
        )
        return items, total


def _show(value: Any) -> str:
    try:
        return f"{value!r:.80}"
    except ValueError:  # an int too long for repr (over Python's 4300-digit limit)
        return f"an {type(value).__name__} too long to show"


def _check_window(limit: int, offset: int) -> None:
    if not 1 <= limit <= MAX_PAGE_SIZE:
        raise InvalidInputError(f"limit must be between 1 and {MAX_PAGE_SIZE}, got {limit}")
    if offset < 0:
        raise InvalidInputError(f"offset must not be negative, got {offset}")
