"""The dashboard's audit log: every action taken through `tasklane web`, newest first."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from persistence.errors import translated
from persistence.sql import Executor, Row, Sql

MAX_DETAIL = 500

INSERT = Sql(
    """
INSERT INTO audit_log (actor, address, action, target, matched, changed, status, detail,
                       finished_at)
VALUES (:actor, :address, :action, CAST(:target AS jsonb), :matched, :changed, :status, :detail,
        CASE WHEN :status = 'running' THEN NULL ELSE now() END)
RETURNING *
"""
)

PROGRESS = Sql(
    """
UPDATE audit_log SET changed = changed + :changed,
       status = :status, detail = COALESCE(:detail, detail),
       finished_at = CASE WHEN :status = 'running' THEN NULL ELSE now() END
WHERE id = :id
"""
)

RECENT = Sql(
    """
SELECT * FROM audit_log
WHERE (CAST(:before AS bigint) IS NULL OR id < :before)
  AND (CAST(:task AS text) IS NULL OR target -> 'ids' @> jsonb_build_array(CAST(:task AS text)))
ORDER BY id DESC LIMIT :limit
"""
)

ONE = Sql("SELECT * FROM audit_log WHERE id = :id")


@dataclass(frozen=True, slots=True)
class AuditEntry:
    id: int
    at: datetime
    actor: str
    address: str | None
    action: str
    target: Any  # {"ids": [...]} or {"filter": {...}}
    matched: int
    changed: int
    status: str  # running, done, failed
    detail: str | None
    finished_at: datetime | None


class AuditRepository:
    def __init__(self, ex: Executor) -> None:
        self._ex = ex

    async def record(
        self,
        *,
        actor: str,
        address: str | None,
        action: str,
        target: Any,
        matched: int,
        changed: int = 0,
        status: str = "running",
        detail: str | None = None,
    ) -> AuditEntry:
        [row] = await self._fetch(
            INSERT,
            actor=actor,
            address=address,
            action=action,
            target=json.dumps(target, default=str),
            matched=matched,
            changed=changed,
            status=status,
            detail=_cut(detail),
        )
        return _entry(row)

    async def progress(
        self, entry_id: int, *, changed: int, status: str = "running", detail: str | None = None
    ) -> None:
        """Add `changed` tasks to the entry; `status` done or failed closes it."""
        await self._fetch(
            PROGRESS, id=entry_id, changed=changed, status=status, detail=_cut(detail)
        )

    async def recent(
        self, *, limit: int = 100, before: int | None = None, task: str | None = None
    ) -> list[AuditEntry]:
        """Newest first; with `task`, the entries that acted on that task by id."""
        rows = await self._fetch(RECENT, limit=limit, before=before, task=task)
        return [_entry(r) for r in rows]

    async def get(self, entry_id: int) -> AuditEntry | None:
        rows = await self._fetch(ONE, id=entry_id)
        return _entry(rows[0]) if rows else None

    async def _fetch(self, stmt: Sql, **params: Any) -> Sequence[Row]:
        with translated("Audit entry"):
            return await self._ex.fetch(stmt, **params)


def _cut(detail: str | None) -> str | None:
    if detail is None or len(detail) <= MAX_DETAIL:
        return detail
    return detail[: MAX_DETAIL - 1] + "…"


def _entry(row: Row) -> AuditEntry:
    return AuditEntry(**{name: row[name] for name in AuditEntry.__dataclass_fields__})
