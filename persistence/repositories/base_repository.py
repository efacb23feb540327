"""Generic repository: CRUD, safe filters and pagination over one ORM model.

Differences from the seed guide, on purpose:
- it flushes and never commits: the caller's unit of work owns the transaction;
- driver errors are translated in one place (`persistence.errors`) and chained: a unique
  violation and a foreign-key violation become *different* domain errors;
- filter fields come from an allow-list of mapped columns. An unknown field raises
  `InvalidFilterError` before any SQL is built; user input never reaches `getattr`.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Generic, TypeVar, cast

from sqlalchemy import ColumnElement, Select, delete, func, inspect, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import ColumnProperty
from sqlalchemy.sql.sqltypes import BigInteger, Integer, SmallInteger, String, Uuid

from domain.exceptions import InvalidFilterError, InvalidInputError
from persistence.errors import translate
from persistence.models import Base

TModel = TypeVar("TModel", bound=Base)
TEntity = TypeVar("TEntity")

MAX_PAGE_SIZE = 1000


class BaseRepository(Generic[TModel, TEntity]):
    """Subclasses set `filterable_fields` and implement `_to_entity` / `_to_model`."""

    filterable_fields: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, session: AsyncSession, model_class: type[TModel], entity_name: str) -> None:
        self.session = session
        self.model_class = model_class
        self.entity_name = entity_name
        self._columns = {
            prop.key: prop.columns[0]
            for prop in inspect(model_class).attrs
            if isinstance(prop, ColumnProperty)
        }
        unknown = self.filterable_fields - self._columns.keys()
        if unknown:
            raise TypeError(f"{type(self).__name__}.filterable_fields names no column: {unknown}")
        self._primary_key = inspect(model_class).primary_key[0]

    # -- conversions (concrete repositories implement these) ----------------------------------

    def _to_entity(self, model: TModel) -> TEntity:
        raise NotImplementedError

    def _to_model(self, entity: TEntity) -> TModel:
        raise NotImplementedError

    # -- CRUD ---------------------------------------------------------------------------------

    async def _get_by_id(self, entity_id: object) -> TModel | None:
        # populate_existing: lifecycle statements change rows behind the ORM's back, so a model
        # cached in this session's identity map may be stale.
        stmt = (
            select(self.model_class)
            .where(self._primary_key == entity_id)
            .execution_options(populate_existing=True)
        )
        try:
            return (await self.session.execute(stmt)).scalar_one_or_none()
        except SQLAlchemyError as exc:
            translate(exc, self.entity_name)

    async def _create(self, model: TModel) -> TModel:
        self.session.add(model)
        try:
            await self.session.flush()
        except SQLAlchemyError as exc:
            if model in self.session:  # a failed flush may already have expunged it
                self.session.expunge(model)
            translate(exc, self.entity_name)
        return model

    async def _update(self, model: TModel) -> TModel:
        try:
            await self.session.flush()
        except SQLAlchemyError as exc:
            translate(exc, self.entity_name)
        return model

    async def _delete(self, entity_id: object) -> bool:
        stmt = delete(self.model_class).where(self._primary_key == entity_id)
        try:
            result = await self.session.execute(stmt)
        except SQLAlchemyError as exc:
            translate(exc, self.entity_name)
        return bool(getattr(result, "rowcount", 0))

    # -- queries ------------------------------------------------------------------------------

    def _conditions(self, filters: Mapping[str, Any] | None) -> list[ColumnElement[bool]]:
        """Equality (or IN, for a list/tuple/set value) on allow-listed columns only."""
        conditions: list[ColumnElement[bool]] = []
        for field, value in (filters or {}).items():
            if field not in self.filterable_fields:
                raise InvalidFilterError(self.entity_name, str(field), self.filterable_fields)
            column = self._columns[field]
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
        self,
        filters: Mapping[str, Any] | None,
        order_by: Sequence[Any] = (),
    ) -> Select[Any]:
        stmt = select(self.model_class).where(*self._conditions(filters))
        return stmt.order_by(*order_by) if order_by else stmt

    async def _find_many(
        self,
        filters: Mapping[str, Any] | None = None,
        *,
        limit: int = 100,
        offset: int = 0,
        order_by: Sequence[Any] = (),
    ) -> list[TModel]:
        _check_window(limit, offset)
        stmt = self._select(filters, order_by).limit(limit).offset(offset)
        stmt = stmt.execution_options(populate_existing=True)
        try:
            return list(
                cast("Sequence[TModel]", (await self.session.execute(stmt)).scalars().all())
            )
        except SQLAlchemyError as exc:
            translate(exc, self.entity_name)

    async def _find_paginated(
        self,
        filters: Mapping[str, Any] | None = None,
        *,
        page: int = 1,
        page_size: int = 50,
        order_by: Sequence[Any] = (),
    ) -> tuple[list[TModel], int]:
        if page < 1:
            raise InvalidInputError(f"page must be at least 1, got {page}")
        _check_window(page_size, (page - 1) * page_size)  # before the count: bad input, no SQL
        stmt = self._select(filters)
        count = select(func.count()).select_from(stmt.order_by(None).subquery())
        try:
            total = int((await self.session.execute(count)).scalar_one())
        except SQLAlchemyError as exc:
            translate(exc, self.entity_name)
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
