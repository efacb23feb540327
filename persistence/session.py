"""Engines, session factory and the units of work.

Transactions belong to the caller: repositories never commit, the unit of work does. Leaving
`async with uow:` without `await uow.commit()` rolls back. Work that must only happen once the
data is durable (sending doorbells to Redis) is registered with `uow.after_commit(...)`.

Two kinds of unit share the repositories (built by `RepositoryFactory` on an `Executor`):
`UnitOfWork` on a SQLAlchemy session, for producers, the CLI and operators, and
`PooledUnitOfWork` on one of the worker's pooled asyncpg connections, for lifecycle steps.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, Self

import asyncpg
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from domain.payload import decode_json
from persistence.repository_factory import RepositoryFactory
from persistence.sql import ConnectionExecutor, Executor, SessionExecutor
from persistence.timeouts import DEFAULT_TIMEOUTS, DbTimeouts

log = logging.getLogger(__name__)

AfterCommit = Callable[[], Awaitable[Any]]


def database_url(url: str | URL, *, driver: str = "postgresql+asyncpg") -> URL:
    """Parse a database URL and force the async driver (plain `postgresql://` is accepted)."""
    parsed = make_url(url) if isinstance(url, str) else url
    if not parsed.drivername.startswith("postgresql"):
        raise ValueError(f"not a PostgreSQL URL: {parsed.render_as_string(hide_password=True)}")
    return parsed.set(drivername=driver)


def create_engine(
    url: str | URL,
    *,
    pool_size: int = 5,
    max_overflow: int = 5,
    statement_cache: bool = True,
    application_name: str = "tasklane",
    echo: bool = False,
    timeouts: DbTimeouts = DEFAULT_TIMEOUTS,
) -> AsyncEngine:
    """An asyncpg engine with a bounded, pre-pinged pool.

    `statement_cache=False` disables asyncpg's prepared statement cache, which PgBouncer in
    transaction pooling mode requires.
    """
    connect_args: dict[str, Any] = {
        "server_settings": {"application_name": application_name, **timeouts.server_settings()},
        "command_timeout": timeouts.command_seconds,
        "timeout": timeouts.connect_seconds,
    }
    if not statement_cache:
        connect_args["statement_cache_size"] = 0
        connect_args["prepared_statement_cache_size"] = 0
    return create_async_engine(
        database_url(url),
        echo=echo,
        hide_parameters=True,  # task input may hold secrets; never put it in error messages
        json_deserializer=decode_json,  # a value Python cannot load is read as UnreadableJson
        pool_pre_ping=True,
        pool_size=pool_size,
        max_overflow=max_overflow,
        pool_timeout=30,
        connect_args=connect_args,
    )


def create_session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, class_=AsyncSession, expire_on_commit=False)


class _Repositories:
    """The repositories of a unit of work, all bound to its one executor."""

    def _bind(self, ex: Executor) -> None:
        repos = RepositoryFactory(ex)
        self.tasks = repos.create_task_repository()
        self.conversations = repos.create_conversation_repository()
        self.agents = repos.create_agent_repository()
        self.workers = repos.create_worker_repository()
        self.reports = repos.create_report_repository()
        self.flow = repos.create_flow_repository()
        self.dashboard = repos.create_dashboard_repository()
        self.audit = repos.create_audit_repository()


class UnitOfWork(_Repositories):
    """One session, one transaction, the repositories bound to it.

    ```
    async with UnitOfWork(session_factory) as uow:
        task = await uow.tasks.create(task)
        uow.after_commit(lambda: dispatcher.dispatch([task]))
        await uow.commit()
    ```
    """

    def __init__(self, session_factory: async_sessionmaker[AsyncSession]) -> None:
        self._session_factory = session_factory
        self._session: AsyncSession | None = None
        self._after_commit: list[AfterCommit] = []

    @property
    def session(self) -> AsyncSession:
        if self._session is None:
            raise RuntimeError("the unit of work is not open; use `async with uow:`")
        return self._session

    async def __aenter__(self) -> Self:
        self._session = self._session_factory()
        self._after_commit = []
        self._bind(SessionExecutor(self._session))
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        session = self.session
        try:
            if session.in_transaction():
                await session.rollback()
        finally:
            await session.close()
            self._session = None

    def after_commit(self, callback: AfterCommit) -> None:
        """Run `callback` once this unit of work has committed (never if it rolls back)."""
        self._after_commit.append(callback)

    async def commit(self) -> None:
        await self.session.commit()
        callbacks, self._after_commit = self._after_commit, []
        for callback in callbacks:
            try:
                await callback()
            except Exception:
                # The data is committed; the reconciler repairs whatever the callback failed to do.
                log.warning(
                    "after-commit callback failed; the reconciler will catch up", exc_info=True
                )

    async def rollback(self) -> None:
        self._after_commit = []
        await self.session.rollback()


class PooledUnitOfWork(_Repositories):
    """A unit of work on one pooled asyncpg connection: the worker's lifecycle steps.

    Each repository step is atomic on its own (one statement, or one transaction it opens
    itself), so a step commits or fails whole and needs nothing around it. With
    `transaction=True` the unit is one transaction across several steps, committed by
    `commit()` and rolled back if left without it.
    """

    def __init__(self, pool: asyncpg.Pool, *, transaction: bool = False) -> None:
        self._pool = pool
        self._want_transaction = transaction
        self._conn: asyncpg.pool.PoolConnectionProxy | None = None
        self._transaction: asyncpg.transaction.Transaction | None = None

    async def __aenter__(self) -> Self:
        self._conn = await self._pool.acquire()
        try:
            if self._want_transaction:
                self._transaction = self._conn.transaction()
                await self._transaction.start()
        except BaseException:
            await self._pool.release(self._conn)
            raise
        self._bind(ConnectionExecutor(self._conn))
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        conn, self._conn = self._conn, None
        assert conn is not None
        try:
            if self._transaction is not None:
                transaction, self._transaction = self._transaction, None
                await transaction.rollback()
        finally:
            await self._pool.release(conn)

    async def commit(self) -> None:
        if self._transaction is None:
            raise RuntimeError("this unit of work has no transaction to commit")
        transaction, self._transaction = self._transaction, None
        await transaction.commit()
