"""The first connection to PostgreSQL: wait for the server, create the database when missing.

A server that is still starting (a container's first boot under `docker compose up`) refuses
connections for a while, so `reach_database` tries again for a bounded time and says so, one
line per wait. A database that does not exist is created when the caller allows it and the
role may create databases; otherwise the error names the `createdb` command that would.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import asyncpg
from sqlalchemy.engine import URL, make_url

from persistence.pg import dsn
from persistence.session import database_url

ATTEMPT_TIMEOUT_SECONDS = 5.0
FIRST_WAIT_SECONDS = 0.5
LONGEST_WAIT_SECONDS = 2.0
MAINTENANCE_DATABASES = ("postgres", "template1")

# What a server that is not up yet answers: nothing (refused, reset, unresolvable while its
# container starts), too slowly, or "the database system is starting up".
_NOT_UP_YET: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.PostgresConnectionError,
)


class StartupError(Exception):
    """PostgreSQL cannot be reached, or the database cannot be had; one line says why."""


class DatabaseMissing(StartupError):
    """The server answers but the database does not exist (and was not created)."""

    def __init__(self, message: str, database: str) -> None:
        super().__init__(message)
        self.database = database


async def reach_database(
    url: str,
    *,
    wait_seconds: float,
    create: bool,
    say: Callable[[str], None],
) -> None:
    """Connect once to the database `url` names.

    While the server is not up, try again for at most `wait_seconds`, calling `say` with one
    line before each wait. When the database does not exist, create it if `create` (saying so);
    raise `DatabaseMissing` if not, or if the role may not create databases. Any other failure
    (a wrong password, say) raises `StartupError` at once.
    """
    target = database_url(url)
    shown = make_url(url).render_as_string(hide_password=True)
    deadline = time.monotonic() + wait_seconds
    wait = FIRST_WAIT_SECONDS
    while True:
        try:
            conn = await _connect(target, deadline)
        except asyncpg.InvalidCatalogNameError:
            if not create:
                raise DatabaseMissing(
                    f'database "{target.database}" does not exist on {_server(target)}',
                    str(target.database),
                ) from None
            await _create_database(target, deadline, say)
            return
        except _NOT_UP_YET as exc:
            left = deadline - time.monotonic()
            if left <= 0:
                waited = f" after {wait_seconds:g}s" if wait_seconds > 0 else ""
                raise StartupError(
                    f"cannot connect to PostgreSQL at {shown}{waited}: {_reason(exc)}"
                ) from None
            pause = min(wait, left)
            say(
                f"waiting for PostgreSQL at {_server(target)} ({_reason(exc)}); "
                f"trying again in {pause:.1f}s, for {left:.0f}s more at most"
            )
            await asyncio.sleep(pause)
            wait = min(2 * wait, LONGEST_WAIT_SECONDS)
        except Exception as exc:
            raise StartupError(f"cannot connect to PostgreSQL at {shown}: {_reason(exc)}") from None
        else:
            await conn.close()
            return


async def _connect(target: URL, deadline: float) -> asyncpg.Connection:
    timeout = max(1.0, min(ATTEMPT_TIMEOUT_SECONDS, deadline - time.monotonic()))
    return await asyncpg.connect(dsn(target), timeout=timeout)


async def _create_database(target: URL, deadline: float, say: Callable[[str], None]) -> None:
    name = str(target.database)
    conn = await _maintenance_connection(target, deadline)
    try:
        await conn.execute(f'CREATE DATABASE "{name.replace(chr(34), chr(34) * 2)}"')
    except asyncpg.DuplicateDatabaseError:
        return  # another process created it meanwhile: what we wanted
    except asyncpg.InsufficientPrivilegeError:
        raise DatabaseMissing(
            f'database "{name}" does not exist on {_server(target)}, and role '
            f'"{target.username}" may not create databases: have a role that may run '
            f"`createdb -h {target.host} -p {target.port or 5432} -O {target.username} {name}`, "
            "or point DATABASE_URL at a database that exists",
            name,
        ) from None
    finally:
        await conn.close()
    say(f'created database "{name}" on {_server(target)}')


async def _maintenance_connection(target: URL, deadline: float) -> asyncpg.Connection:
    """A connection to the server's own database, from which another can be created."""
    for name in MAINTENANCE_DATABASES:
        try:
            return await _connect(target.set(database=name), deadline)
        except asyncpg.InvalidCatalogNameError:
            continue
    raise StartupError(
        f'database "{target.database}" does not exist on {_server(target)}, and neither does '
        f"{' nor '.join(MAINTENANCE_DATABASES)} to create it from"
    )


def _server(target: URL) -> str:
    return f"{target.host or 'localhost'}:{target.port or 5432}"


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
