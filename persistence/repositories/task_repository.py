"""Task persistence: CRUD and queries on the ORM, lifecycle writes through `persistence.lifecycle`.

Reads go through the ORM (with `populate_existing`, since lifecycle statements change rows
behind the identity map's back). Writes are explicit statements: inserts are one `unnest`
statement for any number of tasks, `update` is guarded by the row version, and the lifecycle
operations an operator triggers (cancel, retry) share their SQL with the worker.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, ClassVar
from uuid import UUID

from sqlalchemy import Integer, String, and_, cast, delete, exists, func, literal, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased

from domain.entities import Doorbell, Task, TaskAttempt
from domain.exceptions import (
    ConcurrentUpdateError,
    EntityNotFoundError,
    InvalidInputError,
    InvalidTransitionError,
)
from domain.interfaces import CancelResult, ITaskRepository, Page, RetryResult
from domain.payload import encode_json
from domain.value_objects import FINISHED_STATUSES, UNFINISHED_STATUSES, TaskStatus
from persistence import lifecycle
from persistence.errors import translate
from persistence.mappers import attempt_from_row, task_from_row
from persistence.models import TaskAttemptModel, TaskModel
from persistence.repositories.base_repository import BaseRepository
from persistence.sql import SessionExecutor

# Fields `update` writes: the entity's state. Lease and dispatch bookkeeping belong to the
# lifecycle statements and are never overwritten from an entity read earlier.
_UPDATABLE = (
    "status",
    "output",
    "error",
    "metadata",
    "attempts",
    "max_attempts",
    "run_after",
    "worker_id",
    "started_at",
    "completed_at",
    "step",
)


def _can_lead_to(target: TaskStatus) -> frozenset[TaskStatus]:
    """Statuses from which `target` is reached by zero or more moves of the transition table.

    An entity read once may take several steps before `update` writes it (pending → running →
    completed), so `update` checks reachability, not one step: a final state leads nowhere.
    """
    found, frontier = {target}, [target]
    while frontier:
        for source in TaskStatus.sources_of(frontier.pop()):
            if source not in found:
                found.add(source)
                frontier.append(source)
    return frozenset(found)


# (column name, attribute name) of every mapped column: `metadata` lives in `metadata_`.
_COLUMN_ATTRS = [(p.columns[0].name, p.key) for p in TaskModel.__mapper__.column_attrs]


def _model_row(model: TaskModel) -> dict[str, Any]:
    """The ORM model as a row keyed by column name, for the shared row → entity mapper."""
    return {column: getattr(model, attr) for column, attr in _COLUMN_ATTRS}


class TaskRepository(BaseRepository[TaskModel, Task], ITaskRepository):
    filterable_fields: ClassVar[frozenset[str]] = frozenset(
        {
            "id",
            "conversation_id",
            "parent_task_id",
            "agent_id",
            "queue",
            "status",
            "worker_id",
            "idempotency_key",
            "attempts",
            "max_attempts",
            "step",
        }
    )

    def __init__(self, session: AsyncSession) -> None:
        super().__init__(session, TaskModel, "Task")
        self._sql = SessionExecutor(session)

    def _to_entity(self, model: TaskModel) -> Task:
        return task_from_row(_model_row(model))

    # -- create ---------------------------------------------------------------------------------

    async def create(self, task: Task) -> Task:
        return (await self.create_many([task]))[0]

    async def create_many(
        self,
        tasks: Sequence[Task],
        *,
        dispatch_delays: Sequence[float] | None = None,
        skip_taken_keys: bool = False,
        max_input_bytes: int | None = None,
    ) -> list[Task]:
        """Insert `tasks` in one statement.

        `dispatch_delays[i]` is how long the reconciler leaves task i alone (the caller rings
        its doorbell after commit); by default 0: the reconciler dispatches it at its next tick.
        """
        delays = list(dispatch_delays) if dispatch_delays is not None else [0.0] * len(tasks)
        try:
            return await lifecycle.insert_tasks(
                self._sql,
                tasks,
                dispatch_delays=delays,
                skip_taken_keys=skip_taken_keys,
                max_input_bytes=max_input_bytes,
            )
        except SQLAlchemyError as exc:
            translate(exc, self.entity_name)

    # -- read -----------------------------------------------------------------------------------

    async def get_by_id(self, task_id: UUID) -> Task | None:
        model = await self._get_by_id(task_id)
        return self._to_entity(model) if model is not None else None

    async def get_by_idempotency_key(self, key: str) -> Task | None:
        found = await self._find_many({"idempotency_key": key}, limit=1)
        return self._to_entity(found[0]) if found else None

    # Lookups by a caller's list of keys return every match: no page-size window applies.

    async def get_many_by_idempotency_keys(self, keys: Sequence[str]) -> dict[str, Task]:
        if not keys:
            return {}
        stmt = self._select({"idempotency_key": list(set(keys))})
        found = await self._entities(stmt.execution_options(populate_existing=True))
        return {t.idempotency_key: t for t in found if t.idempotency_key}

    async def get_many(self, task_ids: Sequence[UUID]) -> list[Task]:
        if not task_ids:
            return []
        stmt = self._select({"id": list(set(task_ids))})
        return await self._entities(stmt.execution_options(populate_existing=True))

    async def find_pending_for_agent(
        self, agent_id: str, *, limit: int = 100, skip_locked: bool = False
    ) -> list[Task]:
        """Due pending tasks of an agent, oldest first. With `skip_locked` the rows are locked
        for this transaction and rows locked by others are skipped (claiming)."""
        stmt = (
            select(TaskModel)
            .where(
                TaskModel.agent_id == agent_id,
                TaskModel.status == TaskStatus.PENDING.value,
                TaskModel.run_after <= func.now(),
            )
            .order_by(TaskModel.created_at, TaskModel.id)
            .limit(limit)
            .execution_options(populate_existing=True)
        )
        if skip_locked:
            stmt = stmt.with_for_update(skip_locked=True)
        return await self._entities(stmt)

    async def get_subtasks(self, parent_task_id: UUID) -> list[Task]:
        """Children in creation order (id breaks ties, so the order is stable)."""
        stmt = (
            select(TaskModel)
            .where(TaskModel.parent_task_id == parent_task_id)
            .order_by(TaskModel.created_at, TaskModel.id)
            .execution_options(populate_existing=True)
        )
        return await self._entities(stmt)

    async def get_descendants(self, task_id: UUID) -> list[Task]:
        """Every task below `task_id`, breadth first, children in creation order."""
        tree = (
            select(TaskModel.id, literal(1, Integer).label("depth"))
            .where(TaskModel.parent_task_id == task_id)
            .cte("tree", recursive=True)
        )
        child = aliased(TaskModel)
        tree = tree.union(
            select(child.id, tree.c.depth + 1)
            .join(tree, child.parent_task_id == tree.c.id)
            .where(tree.c.depth < 1000)  # a parent loop made by hand must not recurse forever
        )
        stmt = (
            select(TaskModel)
            .join(tree, TaskModel.id == tree.c.id)
            .order_by(tree.c.depth, TaskModel.created_at, TaskModel.id)
            .execution_options(populate_existing=True)
        )
        return await self._entities(stmt)

    async def search(
        self,
        *,
        conversation_id: UUID | None = None,
        agent_id: str | None = None,
        status: TaskStatus | None = None,
        text: str | None = None,
        limit: int = 100,
    ) -> list[Task]:
        """Newest first. `text` matches anywhere in the input's JSON text, case-insensitively."""
        conditions = self._conditions(
            {
                k: v
                for k, v in (
                    ("conversation_id", conversation_id),
                    ("agent_id", agent_id),
                    ("status", status.value if status is not None else None),
                )
                if v is not None
            }
        )
        if text:
            pattern = "%" + text.replace("\\", "\\\\").replace("%", r"\%").replace("_", r"\_")
            conditions.append(cast(TaskModel.input, String).ilike(pattern + "%", escape="\\"))
        stmt = (
            select(TaskModel)
            .where(*conditions)
            .order_by(TaskModel.created_at.desc(), TaskModel.id)
            .limit(limit)
            .execution_options(populate_existing=True)
        )
        return await self._entities(stmt)

    async def find_paginated(
        self,
        *,
        page: int = 1,
        page_size: int = 50,
        filters: Mapping[str, Any] | None = None,
    ) -> Page[Task]:
        models, total = await self._find_paginated(
            filters,
            page=page,
            page_size=page_size,
            order_by=(TaskModel.created_at.desc(), TaskModel.id),
        )
        return Page([self._to_entity(m) for m in models], total, page, page_size)

    async def list_attempts(self, task_id: UUID) -> list[TaskAttempt]:
        stmt = (
            select(TaskAttemptModel.__table__)
            .where(TaskAttemptModel.task_id == task_id)
            .order_by(TaskAttemptModel.run)
        )
        try:
            rows = (await self.session.execute(stmt)).mappings().all()
        except SQLAlchemyError as exc:
            translate(exc, "TaskAttempt")
        return [attempt_from_row(row) for row in rows]

    async def _entities(self, stmt: Any) -> list[Task]:
        try:
            models = (await self.session.execute(stmt)).scalars().all()
        except SQLAlchemyError as exc:
            translate(exc, self.entity_name)
        return [self._to_entity(m) for m in models]

    # -- update ---------------------------------------------------------------------------------

    async def update(self, task: Task) -> Task:
        """Write the entity's state if nobody changed the row since it was read.

        Raises `ConcurrentUpdateError` when the row's version moved on, `EntityNotFoundError`
        when it is gone, `InvalidTransitionError` when the stored status may not change to the
        entity's: no path in the transition table leads there (final states stay final). Never
        silently overwrites a concurrent change.
        """
        output = task.output
        encode_json(output, what="output")  # clear error for a bad payload before any SQL
        encode_json(task.metadata, what="metadata")
        values: dict[str, Any] = {name: getattr(task, name) for name in _UPDATABLE}
        values["status"] = task.status.value
        values["metadata_"] = values.pop("metadata")
        stmt = (
            update(TaskModel)
            .where(
                TaskModel.id == task.id,
                TaskModel.version == task.version,
                TaskModel.status.in_([s.value for s in _can_lead_to(task.status)]),
            )
            .values(**values, version=TaskModel.version + 1, updated_at=func.now())
            .returning(*TaskModel.__table__.c)
            .execution_options(synchronize_session=False)
        )
        try:
            row = (await self.session.execute(stmt)).mappings().one_or_none()
        except SQLAlchemyError as exc:
            translate(exc, self.entity_name)
        if row is None:
            current = await self.get_by_id(task.id)
            if current is None:
                raise EntityNotFoundError("Task", task.id)
            if current.version != task.version:
                raise ConcurrentUpdateError("Task", task.id, task.version)
            raise InvalidTransitionError(
                current.status.value, task.status.value, task.id, "no path in the transition table"
            )
        return task_from_row(row)

    # -- operator actions -----------------------------------------------------------------------

    async def cancel(self, task_id: UUID, *, dispatch_delay: float = 0.0) -> CancelResult:
        """Cancel the task and its unfinished descendants (in this unit of work's transaction).

        Cancelling a finished task changes nothing: `CancelResult.cancelled == 0`.
        """
        try:
            result = await lifecycle.cancel_tree(self._sql, task_id, dispatch_delay=dispatch_delay)
        except SQLAlchemyError as exc:
            translate(exc, self.entity_name)
        if result is None:
            raise EntityNotFoundError("Task", task_id)
        task = await self.get_by_id(task_id)
        assert task is not None
        doorbells = [result.resumed_parent] if result.resumed_parent else []
        return CancelResult(task=task, cancelled=result.cancelled, doorbells=doorbells)

    async def retry(self, task_id: UUID, *, dispatch_delay: float = 0.0) -> RetryResult:
        """Operator retry: failed → pending with fresh attempts. Any other state: unchanged."""
        try:
            retried = await lifecycle.operator_retry(
                self._sql, task_id, dispatch_delay=dispatch_delay
            )
        except SQLAlchemyError as exc:
            translate(exc, self.entity_name)
        if retried is not None:
            return RetryResult(retried, True, [Doorbell(retried.id, retried.runs, retried.queue)])
        task = await self.get_by_id(task_id)
        if task is None:
            raise EntityNotFoundError("Task", task_id)
        return RetryResult(task, False, [])

    # -- pruning --------------------------------------------------------------------------------

    def _prunable(self, older_than: datetime, statuses: Sequence[TaskStatus]) -> Any:
        unfinished = [s for s in statuses if s not in FINISHED_STATUSES]
        if unfinished or not statuses:
            raise InvalidInputError(
                "prune only deletes finished tasks (completed, failed, cancelled); "
                f"got {', '.join(s.value for s in unfinished) or 'no status'}"
            )
        parent = aliased(TaskModel)
        open_parent = exists().where(
            parent.id == TaskModel.parent_task_id,
            parent.status.in_([s.value for s in UNFINISHED_STATUSES]),
        )
        open_child = exists().where(
            parent.parent_task_id == TaskModel.id,
            parent.status.in_([s.value for s in UNFINISHED_STATUSES]),
        )
        return and_(
            TaskModel.status.in_([s.value for s in statuses]),
            TaskModel.completed_at < older_than,
            ~open_parent,  # a waiting parent still reads its children
            ~open_child,
        )

    async def count_prunable(self, *, older_than: datetime, statuses: Sequence[TaskStatus]) -> int:
        stmt = (
            select(func.count()).select_from(TaskModel).where(self._prunable(older_than, statuses))
        )
        return int((await self.session.execute(stmt)).scalar_one())

    async def prune_batch(
        self, *, older_than: datetime, statuses: Sequence[TaskStatus], batch_size: int = 1000
    ) -> int:
        """Delete up to `batch_size` finished tasks (their attempts go with them); returns how
        many. The caller commits between batches so locks stay short."""
        victims = (
            select(TaskModel.id)
            .where(self._prunable(older_than, statuses))
            .limit(batch_size)
            .with_for_update(skip_locked=True)
            .scalar_subquery()
        )
        stmt = delete(TaskModel).where(TaskModel.id.in_(victims))
        try:
            result = await self.session.execute(stmt.execution_options(synchronize_session=False))
        except SQLAlchemyError as exc:
            translate(exc, self.entity_name)
        return int(getattr(result, "rowcount", 0))
