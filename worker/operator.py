"""What the `tasklane` CLI does, as plain async operations returning plain data.

Rendering lives in `worker.cli_render`; argument parsing and exit codes in `worker.cli`; the
service checks in `worker.health`; why a task is where it is in `worker.diagnosis`. Every failure
an operator can cause or meet surfaces as one line: an unknown id as an `OperatorError`, an
unreachable service or an unmigrated database as a `ServiceError`.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

from domain.entities import TaskAttempt, WorkerInfo
from domain.exceptions import EntityNotFoundError
from domain.payload import JsonValue
from domain.value_objects import TaskStatus
from persistence.repositories.report_repository import StatusCount, TaskRow, TreeNode
from persistence.session import UnitOfWork
from worker.cli_format import counted
from worker.client import TaskClient, parse_task_id
from worker.config import Settings
from worker.diagnosis import explain
from worker.health import check_postgres, check_redis

CLI_USER = "cli"


class OperatorError(Exception):
    """A failure to report as one line (exit code 1)."""


# -- what the operations return -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TaskReport:
    """`tasklane show`: the task, its runs oldest first, and why it is where it is."""

    row: TaskRow
    history: list[TaskAttempt]
    reason: str | None
    now: datetime


@dataclass(frozen=True, slots=True)
class ActionResult:
    """`cancel` / `retry`: the task as it is now, whether anything changed, and what happened."""

    row: TaskRow
    changed: bool
    message: str


@dataclass(frozen=True, slots=True)
class Tree:
    nodes: list[TreeNode]
    now: datetime


@dataclass(frozen=True, slots=True)
class Stats:
    by_status: dict[str, int]
    by_agent: dict[str, dict[str, int]]
    total: int
    oldest_pending_seconds: float | None
    pending_not_due: int
    finished_last_minute: int
    finished_last_minute_by_status: dict[str, int]
    workers: list[WorkerInfo]
    now: datetime
    # Flow control: every agent's limits with their use, and what is paused.
    limits: list[dict[str, Any]] = field(default_factory=list)
    pauses: list[dict[str, Any]] = field(default_factory=list)

    @property
    def live_workers(self) -> int:
        return len(self.workers)


@dataclass(frozen=True, slots=True)
class PruneResult:
    cutoff: datetime
    statuses: list[TaskStatus]
    dry_run: bool
    matched: int  # the dry run's count
    deleted: int
    batches: int


# -- the operations -------------------------------------------------------------------------------


class Operator:
    """The CLI's operations on one configured deployment. Open it with `Operator.open`."""

    def __init__(self, settings: Settings, client: TaskClient) -> None:
        self.settings = settings
        self.client = client

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, settings: Settings, *, redis: bool) -> AsyncIterator[Operator]:
        """Check the services first (Redis only if the command dispatches work), so that an
        unreachable service or an unmigrated database is one clear line, not a driver error."""
        await check_postgres(settings)
        if redis:
            await check_redis(settings)
        client = TaskClient.from_settings(settings)
        try:
            yield cls(settings, client)
        finally:
            await client.close()

    def _uow(self) -> UnitOfWork:
        return UnitOfWork(self.client.session_factory)

    async def now(self) -> datetime:
        """The database clock (readable output says how long ago things happened by it)."""
        async with self._uow() as uow:
            return await uow.reports.now()

    async def _row(self, task_id: UUID) -> TaskRow:
        async with self._uow() as uow:
            row = await uow.reports.task(task_id)
        if row is None:
            raise OperatorError(f"no task with id {task_id}")
        return row

    # -- submit ---------------------------------------------------------------------------------

    async def agent_known(self, agent_id: str) -> bool:
        async with self._uow() as uow:
            return await uow.agents.get_by_id(agent_id) is not None

    async def submit(
        self,
        agent_id: str,
        input: JsonValue,
        *,
        conversation_id: str | None,
        idempotency_key: str | None,
        priority: int = 0,
    ) -> TaskRow:
        if conversation_id is None:
            conversation = await self.client.create_conversation(
                user_id=CLI_USER, title=f"tasklane submit {agent_id}"
            )
            conv_id: UUID = conversation.id
        else:
            conv_id = parse_task_id(conversation_id)
        task = await self.client.submit(
            agent_id,
            input,
            conversation_id=conv_id,
            idempotency_key=idempotency_key,
            priority=priority,
        )
        return await self._row(task.id)

    async def wait(self, task_id: UUID, timeout: float) -> tuple[TaskRow, bool]:  # noqa: ASYNC109
        """The task once finished, or as it is when `timeout` runs out (then False)."""
        try:
            await self.client.wait(task_id, timeout=timeout)
        except TimeoutError:
            return await self._row(task_id), False
        return await self._row(task_id), True

    # -- read -----------------------------------------------------------------------------------

    async def show(self, task_id: UUID) -> TaskReport:
        async with self._uow() as uow:
            row = await uow.reports.task(task_id)
            if row is None:
                raise OperatorError(f"no task with id {task_id}")
            history = await uow.tasks.list_attempts(task_id)
            now = await uow.reports.now()
            status = TaskStatus(row["status"])
            workers = await uow.workers.list_live()
            children = (
                await uow.reports.children_by_status(task_id)
                if status is TaskStatus.WAITING
                else {}
            )
            hold = await uow.flow.hold_of(task_id) if status is TaskStatus.PENDING else None
        reason = explain(row, now=now, workers=workers, children=children, hold=hold)
        return TaskReport(row, history, reason, now)

    async def list_tasks(
        self,
        *,
        agent_id: str | None,
        status: TaskStatus | None,
        conversation_id: str | None,
        limit: int,
    ) -> tuple[list[TaskRow], datetime]:
        conv = parse_task_id(conversation_id) if conversation_id is not None else None
        async with self._uow() as uow:
            rows = await uow.reports.tasks(
                agent_id=agent_id, status=status, conversation_id=conv, limit=limit
            )
            return rows, await uow.reports.now()

    async def tree(self, task_id: UUID) -> Tree:
        async with self._uow() as uow:
            nodes = await uow.reports.tree(task_id)
            now = await uow.reports.now()
        if not nodes:
            raise OperatorError(f"no task with id {task_id}")
        return Tree(nodes, now)

    async def stats(self) -> Stats:
        async with self._uow() as uow:
            counts = await uow.reports.counts_by_agent_and_status()
            oldest = await uow.reports.oldest_pending_seconds()
            not_due = await uow.reports.scheduled_count()
            finished = await uow.reports.finished_within(60)
            workers = await uow.workers.list_live()
            now = await uow.reports.now()
            limits = await uow.flow.limits()
            pauses = await uow.flow.pauses()
        by_status, by_agent = _tabulate(counts)
        return Stats(
            by_status=by_status,
            by_agent=by_agent,
            total=sum(by_status.values()),
            oldest_pending_seconds=oldest,
            pending_not_due=not_due,
            finished_last_minute=sum(finished.values()),
            finished_last_minute_by_status={s.value: n for s, n in sorted(finished.items())},
            workers=workers,
            now=now,
            limits=limits,
            pauses=pauses,
        )

    # -- act ------------------------------------------------------------------------------------

    async def cancel(self, task_id: UUID) -> ActionResult:
        try:
            result = await self.client.cancel(task_id)
        except EntityNotFoundError:
            raise OperatorError(f"no task with id {task_id}") from None
        row = await self._row(task_id)
        if not result.changed:
            return ActionResult(
                row, False, f"task {task_id} is already {row['status']}: nothing to cancel"
            )
        others = result.cancelled - 1
        extra = f" and {counted(others, 'unfinished subtask')}" if others else ""
        return ActionResult(row, True, f"cancelled task {task_id}{extra}")

    async def retry(self, task_id: UUID) -> ActionResult:
        try:
            result = await self.client.retry(task_id)
        except EntityNotFoundError:
            raise OperatorError(f"no task with id {task_id}") from None
        row = await self._row(task_id)
        if not result.retried:
            return ActionResult(
                row,
                False,
                f"task {task_id} is {row['status']}: only a failed task can be retried",
            )
        return ActionResult(row, True, f"task {task_id} is pending again with fresh attempts")

    async def edit(
        self,
        task_id: UUID,
        *,
        run_after: Any,
        max_attempts: Any,
        metadata: Any,
        expected_version: int | None,
    ) -> ActionResult:
        """An operator's edit of a pending task (TaskClient.update); arguments left UNSET stay."""
        try:
            task = await self.client.update(
                task_id,
                run_after=run_after,
                max_attempts=max_attempts,
                metadata=metadata,
                expected_version=expected_version,
            )
        except EntityNotFoundError:
            raise OperatorError(f"no task with id {task_id}") from None
        row = await self._row(task_id)
        return ActionResult(row, True, f"task {task_id} edited (version {task.version})")

    async def prune(
        self,
        *,
        older_than: timedelta,
        statuses: Sequence[TaskStatus],
        dry_run: bool,
        batch_size: int,
    ) -> PruneResult:
        """Delete finished tasks (their attempts go with them) whose `completed_at` is older
        than `older_than`, by the database clock, in batches of `batch_size`, one transaction
        per batch so that no lock is held for long."""
        async with self._uow() as uow:
            cutoff = await uow.reports.now() - older_than
            matched = await uow.tasks.count_prunable(older_than=cutoff, statuses=statuses)
        deleted = batches = 0
        if not dry_run:
            while True:
                async with self._uow() as uow:
                    n = await uow.tasks.prune_batch(
                        older_than=cutoff, statuses=statuses, batch_size=batch_size
                    )
                    await uow.commit()
                if n == 0:
                    break
                deleted += n
                batches += 1
        return PruneResult(cutoff, list(statuses), dry_run, matched, deleted, batches)


def _tabulate(counts: Sequence[StatusCount]) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
    by_status = {s.value: 0 for s in TaskStatus}
    by_agent: dict[str, dict[str, int]] = {}
    for c in counts:
        by_status[c.status.value] += c.count
        agent = by_agent.setdefault(c.agent_id, {s.value: 0 for s in TaskStatus})
        agent[c.status.value] += c.count
    return by_status, by_agent
