"""The one place where driver errors become domain errors.

Both paths end up here: SQLAlchemy's wrapped DBAPI errors (ORM and `text()` statements) and raw
asyncpg errors (the worker's hot path). The original exception is always chained.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

import asyncpg

from domain.exceptions import EntityAlreadyExistsError, EntityNotFoundError, InvalidInputError

# SQLSTATE classes (https://www.postgresql.org/docs/current/errcodes-appendix.html)
UNIQUE_VIOLATION = "23505"
FOREIGN_KEY_VIOLATION = "23503"
NOT_NULL_VIOLATION = "23502"
CHECK_VIOLATION = "23514"
SERIALIZATION_FAILURE = "40001"
DEADLOCK_DETECTED = "40P01"
DATA_EXCEPTION_CLASS = "22"
UNDEFINED_TABLE = "42P01"

LOCK_NOT_AVAILABLE = "55P03"  # lock_timeout ran out: somebody held the row long; try again

RETRYABLE_SQLSTATES = frozenset({SERIALIZATION_FAILURE, DEADLOCK_DETECTED, LOCK_NOT_AVAILABLE})

# Errors after which a connection is not to be used again (the pool opens another). A fenced
# statement may simply be run again on a new one; whether it had committed is for the caller to
# find out.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresConnectionError,  # class 08
    # Class 57: the server ended the session (admin or crash shutdown, cannot connect now) or
    # cancelled the statement.
    asyncpg.OperatorInterventionError,
    asyncpg.InterfaceError,
    # What asyncpg raises for a statement on a connection whose server has just said goodbye
    # (its FATAL message read, its end of stream not yet): "cannot switch to state 12; another
    # operation (2) is in progress". The statement was never sent.
    asyncpg.InternalClientError,
    ConnectionError,
    OSError,
    TimeoutError,
)

# Foreign keys by constraint name: which entity a violation says is missing.
_FK_TARGETS = {
    "fk_tasks_conversation_id_conversations": ("Conversation", "conversation_id"),
    "fk_tasks_parent_task_id_tasks": ("Task", "parent_task_id"),
    "fk_task_attempts_task_id_tasks": ("Task", "task_id"),
}
_FK_DETAIL = re.compile(r"Key \((?P<column>[^)]+)\)=\((?P<value>[^)]*)\) is not present")
_UNIQUE_DETAIL = re.compile(r"Key \((?P<column>[^)]+)\)=\((?P<value>.*)\) already exists")


def find_postgres_error(exc: BaseException) -> asyncpg.PostgresError | None:
    """The asyncpg error behind `exc`, following SQLAlchemy's `.orig` and the cause chain."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, asyncpg.PostgresError):
            return current
        orig = getattr(current, "orig", None)
        current = orig if isinstance(orig, BaseException) else current.__cause__
    return None


def sqlstate_of(exc: BaseException) -> str | None:
    pg = find_postgres_error(exc)
    return pg.sqlstate if pg is not None else None


def is_retryable(exc: BaseException) -> bool:
    """Deadlocks and serialization failures: the whole transaction may simply be run again."""
    return sqlstate_of(exc) in RETRYABLE_SQLSTATES


def translate(exc: BaseException, entity: str) -> NoReturn:
    """Raise the domain error that `exc` means, chained to it; re-raise `exc` if it means none."""
    pg = find_postgres_error(exc)
    if pg is None:
        raise exc
    state = pg.sqlstate or ""
    detail = getattr(pg, "detail", None) or ""
    constraint = getattr(pg, "constraint_name", None) or ""
    if state == FOREIGN_KEY_VIOLATION:
        target, column = _FK_TARGETS.get(constraint, ("referenced row", "?"))
        match = _FK_DETAIL.search(detail)
        value = match["value"] if match else "?"
        column = match["column"] if match else column
        raise EntityNotFoundError(target, value, f"referenced by {entity}.{column}") from exc
    if state == UNIQUE_VIOLATION:
        match = _UNIQUE_DETAIL.search(detail)
        what = f"{match['column']}={match['value']!r}" if match else constraint or "unique key"
        raise EntityAlreadyExistsError(entity, f"{what} is already taken") from exc
    # The primary message only: str(pg) adds the DETAIL "Failing row contains (…)", which would
    # copy task input (possibly secrets) into error messages and logs.
    message = getattr(pg, "message", None) or type(pg).__name__
    if state in (NOT_NULL_VIOLATION, CHECK_VIOLATION):
        rule = constraint or getattr(pg, "column_name", None)
        where = f" ({rule})" if rule else ""
        raise InvalidInputError(f"{entity} rejected by the database{where}: {message}") from exc
    if state.startswith(DATA_EXCEPTION_CLASS):
        raise InvalidInputError(f"{entity} rejected by the database: {message}") from exc
    raise exc


@contextmanager
def translated(entity: str) -> Iterator[None]:
    """`with translated("Task"): …` turns integrity and data errors into domain errors."""
    try:
        yield
    except Exception as exc:
        if find_postgres_error(exc) is None:
            raise
        translate(exc, entity)
