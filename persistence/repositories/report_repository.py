"""The operators' read model: what `tasklane show/list/tree/stats` read.

These are reports, not entities: rows of `tasks` keyed by column name (so that the CLI prints
every column, bookkeeping included) and aggregates computed by the database. Every age is
computed with the database clock, like every other time decision in tasklane.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

from sqlalchemy import Integer, Select, extract, func, literal, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased

from domain.value_objects import FINISHED_STATUSES, TaskStatus
from persistence.errors import translate
from persistence.models import TaskAttemptModel, TaskModel

# A row of `tasks`: {column name: value}, uuids as UUID, timestamps as aware datetimes.
TaskRow = dict[str, Any]

TASKS = TaskModel.__table__
TASK_COLUMNS: tuple[str, ...] = tuple(c.name for c in TASKS.columns)

# A parent loop made by hand with SQL must not make the tree query recurse forever.
MAX_TREE_DEPTH = 1000


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
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

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

        One recursive query; empty if the task does not exist.
        """
        tree = (
            select(TaskModel.id, literal(0, Integer).label("depth"))
            .where(TaskModel.id == task_id)
            .cte("tree", recursive=True)
        )
        child = aliased(TaskModel)
        tree = tree.union_all(
            select(child.id, tree.c.depth + 1)
            .join(tree, child.parent_task_id == tree.c.id)
            .where(tree.c.depth < MAX_TREE_DEPTH)
        )
        attempts = TaskAttemptModel.__table__
        run_seconds = (
            select(
                func.coalesce(
                    func.sum(
                        extract(
                            "epoch",
                            func.coalesce(attempts.c.finished_at, func.now())
                            - attempts.c.started_at,
                        )
                    ),
                    0,
                )
            )
            .where(attempts.c.task_id == TASKS.c.id)
            .scalar_subquery()
        )
        stmt = (
            select(TASKS, tree.c.depth.label("_depth"), run_seconds.label("_run_seconds"))
            .join(tree, TASKS.c.id == tree.c.id)
            .order_by(tree.c.depth, TASKS.c.created_at, TASKS.c.id)
        )
        nodes: list[TreeNode] = []
        seen: set[UUID] = set()
        for row in await self._rows(stmt):
            depth = row.pop("_depth")
            seconds = row.pop("_run_seconds")
            if row["id"] in seen:  # only a hand-made parent loop reaches a task twice
                continue
            seen.add(row["id"])
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

    async def _rows(self, stmt: Select[Any]) -> list[TaskRow]:
        try:
            result = await self.session.execute(stmt)
        except SQLAlchemyError as exc:
            translate(exc, "Task")
        return [dict(row) for row in result.mappings().all()]

    async def _tuples(self, stmt: Select[Any]) -> list[tuple[Any, ...]]:
        try:
            result = await self.session.execute(stmt)
        except SQLAlchemyError as exc:
            translate(exc, "Task")
        return [tuple(row) for row in result.all()]

    async def _scalar(self, stmt: Select[Any]) -> Any:
        try:
            return (await self.session.execute(stmt)).scalar_one()
        except SQLAlchemyError as exc:
            translate(exc, "Task")
