"""The task list's filter and cursor, read from a query string or a form."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any
from urllib.parse import urlencode
from uuid import UUID

from persistence.repositories.dashboard_repository import ALL_STATUSES, Cursor, TaskFilter

DEFAULT_PAGE = 50
MAX_TEXT = 200


class BadParameter(ValueError):
    """A filter value that cannot be used (one line, shown to the user; a 400)."""


class Params:
    """What a request carries: a query string or a form, multi-valued keys included."""

    def __init__(self, get: Callable[[str], str | None], getlist: Callable[[str], list[Any]]):
        self.get = get
        self.getlist = getlist


def task_filter(params: Params) -> TaskFilter:
    statuses: list[str] = []
    for raw in params.getlist("status"):
        for part in str(raw).split(","):
            value = part.strip().lower()
            if not value:
                continue
            if value not in ALL_STATUSES:
                raise BadParameter(f"status must be one of {', '.join(ALL_STATUSES)}: {part!r}")
            statuses.append(value)
    return TaskFilter(
        statuses=tuple(s for s in ALL_STATUSES if s in statuses),
        agent_id=_text(params, "agent"),
        queue=_text(params, "queue"),
        conversation_id=_uuid(params, "conversation"),
        parent_task_id=_uuid(params, "parent"),
        error=_text(params, "error"),
        created_from=_time(params, "from"),
        created_to=_time(params, "to"),
    )


def cursor(params: Params) -> Cursor | None:
    raw = _text(params, "after")
    if raw is None:
        return None
    stamp, _, ident = raw.rpartition("~")
    try:
        return Cursor(datetime.fromisoformat(stamp), UUID(ident))
    except ValueError:
        raise BadParameter(f"after: not a cursor from a previous page: {raw[:40]!r}") from None


def limit(params: Params, high: int) -> int:
    raw = _text(params, "limit")
    if raw is None:
        return DEFAULT_PAGE
    try:
        value = int(raw)
    except ValueError:
        raise BadParameter(f"limit must be a whole number: {raw[:40]!r}") from None
    if not 1 <= value <= high:
        raise BadParameter(f"limit must be between 1 and {high}: {value}")
    return value


def encode_cursor(value: Cursor) -> str:
    return f"{value.created_at.isoformat()}~{value.id}"


def filter_query(where: TaskFilter) -> dict[str, str]:
    """The filter as query parameters (to link the next page, or repeat it in a form)."""
    query: dict[str, str] = {}
    if where.statuses:
        query["status"] = ",".join(where.statuses)
    for key, value in (
        ("agent", where.agent_id),
        ("queue", where.queue),
        ("conversation", where.conversation_id),
        ("parent", where.parent_task_id),
        ("error", where.error),
        ("from", where.created_from.isoformat() if where.created_from else None),
        ("to", where.created_to.isoformat() if where.created_to else None),
    ):
        if value is not None and value != "":
            query[key] = str(value)
    return query


def url(path: str, query: Mapping[str, str]) -> str:
    return f"{path}?{urlencode(query)}" if query else path


def _text(params: Params, key: str) -> str | None:
    raw = params.get(key)
    if raw is None or not str(raw).strip():
        return None
    value = str(raw).strip()
    if len(value) > MAX_TEXT:
        raise BadParameter(f"{key} is longer than {MAX_TEXT} characters")
    return value


def _uuid(params: Params, key: str) -> UUID | None:
    raw = _text(params, key)
    if raw is None:
        return None
    try:
        return UUID(raw)
    except ValueError:
        raise BadParameter(f"{key} must be an id (a UUID): {raw[:40]!r}") from None


def _time(params: Params, key: str) -> datetime | None:
    raw = _text(params, key)
    if raw is None:
        return None
    try:
        value = datetime.fromisoformat(raw)
    except ValueError:
        raise BadParameter(
            f"{key} must be an ISO-8601 time such as 2026-12-24T08:00:00+00:00: {raw[:40]!r}"
        ) from None
    if value.tzinfo is None:  # a browser's datetime-local field: taken as UTC
        from datetime import UTC

        value = value.replace(tzinfo=UTC)
    return value
