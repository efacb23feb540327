"""The operators' read model: what `tasklane show/list/tree/stats` read.

These are reports, not entities: rows of `tasks` keyed by column name (so that the CLI prints
every column, bookkeeping included) and aggregates computed by the database. Every age is
computed with the database clock, like every other time decision in tasklane.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

from sqlalchemy import Select, extract, func, select

from domain.value_objects import FINISHED_STATUSES, TaskStatus
from persistence.errors import translated
from persistence.models import TaskModel
from persistence.repositories.task_sql import SUBTREE
from persistence.sql import Executor, Row, Sql

# A row of `tasks`: {column name: value}, uuids as UUID, timestamps as aware datetimes.
TaskRow = dict[str, Any]

TASKS = TaskModel.__table__
TASK_COLUMNS: tuple[str, ...] = tuple(c.name for c in TASKS.columns)

# A tree with how long each task's handler runs took (running ones count until now).
TREE = Sql(
    SUBTREE
    + """
SELECT t.*, tree.depth AS _depth,
       (SELECT COALESCE(sum(EXTRACT(EPOCH FROM COALESCE(a.finished_at, now()) - a.started_at)), 0)
        FROM task_attempts AS a WHERE a.task_id = t.id) AS _run_seconds
FROM tasks AS t JOIN tree ON t.id = tree.id
WHERE NOT tree.is_cycle
ORDER BY tree.depth, t.created_at, t.id
"""
)


@dataclass(frozen=True, slots=True)
class TreeNode:
    """One task of a tree, with its depth (the root is 0) and how long its handler runs took."""

    row: TaskRow
    depth: int
    run_seconds: float


@dataclass(frozen=True, slots=True)
class StatusCount:
    agent_id: str
    status: TaskStatus
    count: int


class ReportRepository:
    def __init__(self, ex: Executor) -> None:
        self._ex = ex

    async def now(self) -> datetime:
        """The database clock."""
        return await self._scalar(select(func.now()))  # type: ignore[no-any-return]

    # -- tasks ----------------------------------------------------------------------------------

    async def task(self, task_id: UUID) -> TaskRow | None:
        rows = await self._rows(select(TASKS).where(TASKS.c.id == task_id))
        return rows[0] if rows else None

    async def tasks(
        self,
        *,
        agent_id: str | None = None,
        status: TaskStatus | None = None,
        conversation_id: UUID | None = None,
        limit: int = 50,
    ) -> list[TaskRow]:
        """Newest first."""
        stmt = select(TASKS)
        if agent_id is not None:
            stmt = stmt.where(TASKS.c.agent_id == agent_id)
        if status is not None:
            stmt = stmt.where(TASKS.c.status == status.value)
        if conversation_id is not None:
            stmt = stmt.where(TASKS.c.conversation_id == conversation_id)
        stmt = stmt.order_by(TASKS.c.created_at.desc(), TASKS.c.id).limit(limit)
        return await self._rows(stmt)

    async def tree(self, task_id: UUID) -> list[TreeNode]:
        """The task and every task below it, breadth first, children in creation order.

        One recursive query (the walk `task_sql.SUBTREE`); empty if the task does not exist.
        """
        nodes: list[TreeNode] = []
        for found in await self._fetch(TREE, id=task_id):
            row = dict(found.items())
            depth, seconds = row.pop("_depth"), row.pop("_run_seconds")
            nodes.append(TreeNode(row, int(depth), float(seconds)))
        return nodes

    async def children_by_status(self, task_id: UUID) -> dict[TaskStatus, int]:
        stmt = (
            select(TASKS.c.status, func.count())
            .where(TASKS.c.parent_task_id == task_id)
            .group_by(TASKS.c.status)
        )
        return {TaskStatus(status): int(n) for status, n in await self._tuples(stmt)}

    # -- aggregates -----------------------------------------------------------------------------

    async def counts_by_agent_and_status(self) -> list[StatusCount]:
        stmt = (
            select(TASKS.c.agent_id, TASKS.c.status, func.count())
            .group_by(TASKS.c.agent_id, TASKS.c.status)
            .order_by(TASKS.c.agent_id, TASKS.c.status)
        )
        return [
            StatusCount(agent, TaskStatus(status), int(n))
            for agent, status, n in await self._tuples(stmt)
        ]

    async def oldest_pending_seconds(self) -> float | None:
        """How long the longest-waiting *due* pending task has been due (None: none is).

        A task scheduled for later, or waiting out a retry backoff, is not late: only the time
        since its `run_after` counts.
        """
        stmt = select(extract("epoch", func.now() - func.min(TASKS.c.run_after))).where(
            TASKS.c.status == TaskStatus.PENDING.value, TASKS.c.run_after <= func.now()
        )
        value = await self._scalar(stmt)
        return None if value is None else max(0.0, float(value))

    async def scheduled_count(self) -> int:
        """Pending tasks not due yet (scheduled for later, or waiting out a retry backoff)."""
        stmt = (
            select(func.count())
            .select_from(TASKS)
            .where(TASKS.c.status == TaskStatus.PENDING.value, TASKS.c.run_after > func.now())
        )
        return int(await self._scalar(stmt))

    async def finished_within(self, seconds: float) -> dict[TaskStatus, int]:
        """Tasks that reached completed, failed or cancelled in the last `seconds`, by status."""
        stmt = (
            select(TASKS.c.status, func.count())
            .where(
                TASKS.c.completed_at > func.now() - timedelta(seconds=seconds),
                TASKS.c.status.in_(sorted(s.value for s in FINISHED_STATUSES)),
            )
            .group_by(TASKS.c.status)
        )
        return {TaskStatus(status): int(n) for status, n in await self._tuples(stmt)}

    # -- plumbing -------------------------------------------------------------------------------

    async def _fetch(self, stmt: Select[Any] | Sql, **params: Any) -> Sequence[Row]:
        with translated("Task"):
            return await self._ex.fetch(stmt, **params)

    async def _rows(self, stmt: Select[Any]) -> list[TaskRow]:
        return [dict(row.items()) for row in await self._fetch(stmt)]

    async def _tuples(self, stmt: Select[Any]) -> list[tuple[Any, ...]]:
        return [tuple(value for _, value in row.items()) for row in await self._fetch(stmt)]

    async def _scalar(self, stmt: Select[Any]) -> Any:
        [row] = await self._fetch(stmt)
        return next(value for _, value in row.items())
