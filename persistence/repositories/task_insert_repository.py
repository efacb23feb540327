"""Creating tasks: the one insert every task goes through, and the reads that settle it.

`TaskRepository` inherits these (a handler's subtasks, `TaskClient.submit` and `submit_many`), and
`tasklane submit` uses them alone, on its one asyncpg connection: so this module is plain SQL
(`task_sql.INSERT_TASKS`) and imports no SQLAlchemy (tests/integration/test_cli_imports.py).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any
from uuid import UUID

from domain.entities import Task
from domain.exceptions import EntityNotFoundError, InvalidInputError
from domain.value_objects import TaskStatus
from persistence.mappers import insert_params, task_from_row
from persistence.repositories import task_sql as q
from persistence.repositories.statement_repository import StatementRepository
from persistence.sql import Executor, Row


class TaskInsertRepository(StatementRepository[Task]):
    def __init__(self, ex: Executor, entity_name: str = "Task") -> None:
        # `entity_name` is passed on by BaseRepository when TaskRepository inherits this class.
        super().__init__(ex, entity_name)

    def _to_entity(self, row: Row) -> Task:
        return task_from_row(row)

    async def create(self, task: Task) -> Task:
        return (await self.create_many([task]))[0]

    async def create_many(
        self,
        tasks: Sequence[Task],
        *,
        dispatch_delays: Sequence[float] | None = None,
        skip_taken_keys: bool = False,
        max_input_bytes: int | None = None,
        attach: bool = False,
    ) -> list[Task]:
        """Insert `tasks` in one statement (`INSERT_ONE_TASK` for one task, `INSERT_TASKS` for
        more); returns the inserted rows in the order of `tasks`.

        `dispatch_delays[i]` is how long the reconciler leaves task i alone (the caller rings
        its doorbell after commit); by default 0: the reconciler dispatches it at its next tick.
        With `skip_taken_keys`, a task whose idempotency key is already taken is left out of the
        result (the caller reads the existing task instead). With `attach`, tasks that name a
        parent are added under that parent's lock, which must be running or waiting: a producer
        giving a task a parent from outside (a handler's own subtasks are inserted by the
        transaction that holds their parent already).
        """
        if not tasks:
            return []
        delays = list(dispatch_delays) if dispatch_delays is not None else [0.0] * len(tasks)
        params: dict[str, Any] = insert_params(
            tasks, dispatch_delays=delays, max_input_bytes=max_input_bytes
        )
        if len(tasks) == 1:
            params = {name: values[0] for name, values in params.items()}
            stmt = q.INSERT_ONE_TASK_SKIP_TAKEN_KEY if skip_taken_keys else q.INSERT_ONE_TASK
        else:
            stmt = q.INSERT_TASKS_SKIP_TAKEN_KEYS if skip_taken_keys else q.INSERT_TASKS
        parents = sorted({t.parent_task_id for t in tasks if t.parent_task_id is not None})
        if attach and parents:
            async with self._ex.atomic():
                await self._lock_parents_to_attach(parents)
                inserted = await self._entities(stmt, **params)
                await self._count_up([t.parent_task_id for t in inserted if t.parent_task_id])
        else:
            inserted = await self._entities(stmt, **params)
        by_id = {task.id: task for task in inserted}
        return [by_id[t.id] for t in tasks if t.id in by_id]

    async def get_by_idempotency_keys(self, keys: Sequence[str]) -> dict[str, Task]:
        """Every task holding one of `keys`, by key."""
        if not keys:
            return {}
        found = await self._entities(q.TASKS_BY_KEYS, keys=sorted(set(keys)))
        return {t.idempotency_key: t for t in found if t.idempotency_key}

    async def _count_up(self, parents: Sequence[UUID]) -> None:
        """Each of `parents` (locked) gained a child for every time it is named."""
        counts = Counter(parents)
        if counts:
            ids = sorted(counts)
            await self._fetch(q.COUNT_UP, ids=ids, counts=[counts[i] for i in ids])

    async def _lock_parents_to_attach(self, parents: Sequence[UUID]) -> None:
        # asyncpg hands its own UUID type back; the parents are the standard library's.
        locked = await self._fetch(q.LOCK_PARENTS, ids=parents)
        rows = {UUID(str(r["id"])): r["status"] for r in locked}
        for parent_id in parents:
            status = rows.get(parent_id)
            if status is None:
                raise EntityNotFoundError("Task", parent_id, "named as a parent")
            if status not in (TaskStatus.RUNNING, TaskStatus.WAITING):
                raise InvalidInputError(
                    f"cannot add a subtask to task {parent_id}: it is {status}; a parent must "
                    "be running or waiting (its subtasks would never be waited for)"
                )
