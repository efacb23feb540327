"""Service checks: is PostgreSQL reachable and migrated, is Redis reachable, is a worker live?

`check_postgres` and `check_redis` guard the commands that need those services (one clear line
instead of a driver error). Two reports answer the two questions an orchestrator asks:

- `health` (readiness): every dependency reachable, the schema migrated, a worker registered
  on the queue (`local`: on this host). It fails while PostgreSQL or Redis is away.
- `liveness`: this host's worker loop stamped its file lately. It reads one file and touches
  no service, so an outage the worker rides out never fails it.

A liveness probe starts `tasklane health --live` every few seconds, so this module imports no
driver at load time: each service check imports what it talks to.
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from worker.cli_format import duration
from worker.config import Settings, redact_url
from worker.liveness import STALE_AFTER_SECONDS, stamp_age

if TYPE_CHECKING:
    import asyncpg

# Each check gives up after this long, so that a report always comes (`health` runs four).
CHECK_TIMEOUT_SECONDS = 10.0


class ServiceError(Exception):
    """A service a command needs is unreachable or not ready (reported as one line)."""


def reason_of(exc: BaseException) -> str:
    """The first line of an exception's message, or its type when it has none."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    ok: bool
    detail: str


@dataclass(frozen=True, slots=True)
class HealthReport:
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)


# -- guards ---------------------------------------------------------------------------------------


async def connect_postgres(settings: Settings) -> asyncpg.Connection:
    """A connection to the configured database, or `ServiceError` within the connect timeout."""
    from persistence import pg

    try:
        return await asyncio.wait_for(
            pg.connect(
                settings.database_url,
                statement_cache=settings.db_statement_cache,
                application_name="tasklane-health",
                timeouts=settings.db_timeouts,
            ),
            timeout=CHECK_TIMEOUT_SECONDS,
        )
    except Exception as exc:
        raise ServiceError(
            f"cannot connect to PostgreSQL at {redact_url(settings.database_url)}: {reason_of(exc)}"
        ) from None


async def check_postgres(settings: Settings, *, schema: bool = True) -> None:
    """Raise `ServiceError` unless Postgres answers and (with `schema`) has the schema this
    code needs."""
    from persistence.schema import SchemaError, check_schema

    conn = await connect_postgres(settings)
    try:
        if schema:
            await check_schema(conn)
    except SchemaError as exc:
        raise ServiceError(str(exc)) from None
    finally:
        await conn.close()


async def check_redis(settings: Settings) -> None:
    from worker.redis_conn import create_redis

    redis = create_redis(
        settings.redis_url, retries=1, socket_timeout=settings.redis_timeout_seconds
    )
    try:
        await asyncio.wait_for(redis.ping(), timeout=CHECK_TIMEOUT_SECONDS)
    except Exception as exc:
        raise ServiceError(
            f"cannot connect to Redis at {redact_url(settings.redis_url)}: {reason_of(exc)}"
        ) from None
    finally:
        await redis.aclose()


# -- the reports ----------------------------------------------------------------------------------


def liveness(settings: Settings) -> HealthReport:
    """The worker on this host has a running event loop (see `worker.liveness`)."""
    path = settings.liveness_path
    age = stamp_age(Path(path))
    if age is None:
        check = Check("loop", False, f"no stamp at {path}: no worker runs here, or it stopped")
    elif age > STALE_AFTER_SECONDS:
        check = Check(
            "loop",
            False,
            f"stamp at {path} is {duration(age)} old (stale after {STALE_AFTER_SECONDS:g}s): "
            "the worker's event loop is blocked or gone",
        )
    else:
        check = Check("loop", True, f"stamped {duration(age)} ago ({path})")
    return HealthReport([check])


async def health(settings: Settings, *, local: bool = False) -> HealthReport:
    """Postgres, Redis, the schema revision and a live worker on the configured queue (with
    `local`: on this host, which is what a container's healthcheck asks). Every check runs
    and reports, except those that need an earlier one to have passed."""
    postgres = Check("postgres", True, redact_url(settings.database_url))
    schema = Check("schema", False, "not checked: PostgreSQL is unreachable")
    conn: asyncpg.Connection | None = None
    try:
        conn = await connect_postgres(settings)
    except ServiceError as exc:
        postgres = Check("postgres", False, str(exc))
    try:
        if conn is not None:
            schema = await _schema_check(conn)
        redis = Check("redis", True, redact_url(settings.redis_url))
        try:
            await check_redis(settings)
        except ServiceError as exc:
            redis = Check("redis", False, str(exc))
        if schema.ok and conn is not None:
            workers = await _worker_check(conn, settings, local)
        else:
            workers = Check("workers", False, f"not checked: the {schema.name} check failed")
    finally:
        if conn is not None:
            await conn.close()
    return HealthReport([postgres, redis, schema, workers])


async def _schema_check(conn: asyncpg.Connection) -> Check:
    from persistence.schema import SCHEMA_REVISION, SchemaError, check_schema

    try:
        await asyncio.wait_for(check_schema(conn), timeout=CHECK_TIMEOUT_SECONDS)
    except SchemaError as exc:
        return Check("schema", False, str(exc))
    except TimeoutError:
        return Check("schema", False, f"no answer within {CHECK_TIMEOUT_SECONDS:g}s")
    except Exception as exc:
        return Check("schema", False, reason_of(exc))
    return Check("schema", True, f"revision {SCHEMA_REVISION}")


async def _worker_check(conn: asyncpg.Connection, settings: Settings, local: bool) -> Check:
    """On the connection that checked the schema (plain SQL: `health` imports no ORM)."""
    from persistence.repositories.report_repository import ReportRepository
    from persistence.repositories.worker_sql import LIVE_WITHIN_SECONDS
    from persistence.sql import ConnectionExecutor

    hostname = socket.gethostname()
    try:
        async with asyncio.timeout(CHECK_TIMEOUT_SECONDS):
            workers = await ReportRepository(ConnectionExecutor(conn)).live_workers(
                queue=settings.queue
            )
    except TimeoutError:
        return Check("workers", False, f"no answer within {CHECK_TIMEOUT_SECONDS:g}s")
    except Exception as exc:
        return Check("workers", False, reason_of(exc))
    where = f"queue {settings.queue!r}"
    if local:
        workers = [w for w in workers if w.hostname == hostname]
        where += f" on host {hostname!r}"
    if not workers:
        return Check(
            "workers", False, f"no worker on {where} seen in the last {LIVE_WITHIN_SECONDS:g}s"
        )
    abandoned = sum(w.abandoned_handlers for w in workers)
    note = (
        f"; {abandoned} handler(s) ignored their timeout's cancellation and were abandoned"
        " (still running in their worker: fix the handler, restart the worker)"
        if abandoned
        else ""
    )
    return Check("workers", True, f"{len(workers)} live on {where}{note}")
