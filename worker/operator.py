"""What the `tasklane` CLI does, as plain async operations returning plain data.

Rendering lives in `worker.cli_render`; argument parsing and exit codes in `worker.cli`; the
service checks in `worker.health`; why a task is where it is in `worker.diagnosis`. Every failure
an operator can cause or meet surfaces as one line: an unknown id as an `OperatorError`, an
unreachable service or an unmigrated database as a `ServiceError`.

The read commands, `prune` and `submit` run plain SQL (`ReportRepository`, `PruneRepository`,
and for `submit` the producers' own `worker.submission`) on the one asyncpg connection that
checked the schema, and import no ORM: a command answers in a tenth of a second, `submit` (which
rings Redis too) in a few. The other commands that change tasks go through `TaskClient`, built on
first use.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any
from uuid import UUID

from domain.entities import Conversation, TaskAttempt, WorkerInfo
from domain.exceptions import EntityNotFoundError
from domain.payload import JsonValue
from domain.value_objects import FINISHED_STATUSES, TaskStatus
from persistence.repositories.conversation_repository import ConversationRepository
from persistence.repositories.flow_repository import FlowRepository
from persistence.repositories.prune_repository import START, PruneRepository, check_statuses
from persistence.repositories.report_repository import (
    COUNT_CAP,
    AgentCounts,
    Count,
    ReportRepository,
    TaskRow,
    TreeNode,
)
from persistence.repositories.task_insert_repository import TaskInsertRepository
from persistence.schema import SchemaError, check_schema
from persistence.sql import ConnectionExecutor, Executor
from worker.cli_format import counted
from worker.config import Settings
from worker.diagnosis import explain
from worker.health import ServiceError, check_redis, connect_postgres

if TYPE_CHECKING:
    import asyncpg
    from redis.asyncio import Redis

    from worker.client import TaskClient

CLI_USER = "cli"
FINISHED = frozenset(s.value for s in FINISHED_STATUSES)


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
    """Counts are exact up to `count_cap`; past it estimated, and the `*_estimated` fields
    say which (the agents' and statuses' names)."""

    by_status: dict[str, int]
    by_agent: dict[str, dict[str, int]]
    total: int
    oldest_pending_seconds: float | None
    pending_not_due: int
    finished_last_minute: int
    finished_last_minute_by_status: dict[str, int]
    workers: list[WorkerInfo]
    now: datetime
    by_status_estimated: list[str]
    by_agent_estimated: dict[str, list[str]]
    pending_not_due_estimated: bool
    finished_last_minute_estimated: bool
    agents_truncated: bool
    count_cap: int = COUNT_CAP
    # Flow control: every agent's limits with their use, and what is paused.
    limits: list[dict[str, Any]] = field(default_factory=list)
    pauses: list[dict[str, Any]] = field(default_factory=list)

    @property
    def live_workers(self) -> int:
        return len(self.workers)

    @property
    def estimated(self) -> bool:
        return bool(
            self.by_status_estimated
            or self.by_agent_estimated
            or self.pending_not_due_estimated
            or self.finished_last_minute_estimated
        )


@dataclass(frozen=True, slots=True)
class PruneResult:
    cutoff: datetime
    statuses: list[TaskStatus]
    dry_run: bool
    matched: int  # the dry run's count (a real run: what it deleted)
    deleted: int
    batches: int
    matched_estimated: bool = False  # the dry run's count passed the cap: an estimate
    max_rate: float | None = None


# -- the operations -------------------------------------------------------------------------------


class Operator:
    """The CLI's operations on one configured deployment. Open it with `Operator.open`."""

    def __init__(
        self,
        settings: Settings,
        conn: asyncpg.Connection,
        executor: Executor | None = None,
        client: TaskClient | None = None,
    ) -> None:
        self.settings = settings
        # Reads and prunes run on the checked connection, in autocommit: each statement sees
        # the latest commits (a `wait` re-reads the task), and no transaction is held between
        # them. (`executor`: the same connection seen through a test's recorder.)
        self._ex = executor or ConnectionExecutor(conn)
        self.reports = ReportRepository(self._ex)
        self.flow = FlowRepository(self._ex)
        self._client: TaskClient | None = client  # None: built when a command needs it
        self._redis: Redis | None = None  # `submit`'s, to ring the doorbell

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, settings: Settings, *, redis: bool) -> AsyncIterator[Operator]:
        """Check the services first (Redis only if the command dispatches work), so that an
        unreachable service or an unmigrated database is one clear line, not a driver error."""
        conn = await connect_postgres(settings)
        try:
            try:
                await check_schema(conn)
            except SchemaError as exc:
                raise ServiceError(str(exc)) from None
            if redis:
                await check_redis(settings)
            operator = cls(settings, conn)
            try:
                yield operator
            finally:
                if operator._client is not None:
                    await operator._client.close()
                if operator._redis is not None:
                    await operator._redis.aclose()
        finally:
            await conn.close()

    @property
    def client(self) -> TaskClient:
        """The producer's client (its engines and the ORM), for the commands that change tasks."""
        if self._client is None:
            from worker.client import TaskClient

            self._client = TaskClient.from_settings(self.settings)
        return self._client

    async def now(self) -> datetime:
        """The database clock (readable output says how long ago things happened by it)."""
        return await self.reports.now()

    async def _row(self, task_id: UUID) -> TaskRow:
        row = await self.reports.task(task_id)
        if row is None:
            raise OperatorError(f"no task with id {task_id}")
        return row

    # -- submit ---------------------------------------------------------------------------------

    async def agent_known(self, agent_id: str) -> bool:
        return await self.reports.agent_known(agent_id)

    async def submit(
        self,
        agent_id: str,
        input: JsonValue,
        *,
        conversation_id: str | None,
        idempotency_key: str | None,
        priority: int = 0,
    ) -> TaskRow:
        """`TaskClient.submit`'s checks, insert and doorbell (`worker.submission`), on this
        operator's connection: each statement commits on its own, so the task is committed
        before its doorbell rings."""
        # Imported here: they bring Redis's and arq's clients, which the read commands never use.
        from worker.dispatch import Dispatcher
        from worker.submission import Submitter, TaskSpec, parse_task_id, producer_redis

        if conversation_id is None:
            conversation = Conversation(user_id=CLI_USER, title=f"tasklane submit {agent_id}")
            conv_id = (await ConversationRepository(self._ex).create(conversation)).id
        else:
            conv_id = parse_task_id(conversation_id)
        spec = TaskSpec(
            agent_id, input, conv_id, idempotency_key=idempotency_key, priority=priority
        )
        self._redis = self._redis or producer_redis(self.settings)
        submitter = Submitter(self.settings, Dispatcher(self._redis, self.settings.queue))
        task = await submitter.submit(TaskInsertRepository(self._ex), spec)
        return await self._row(task.id)

    async def wait(self, task_id: UUID, timeout: float) -> tuple[TaskRow, bool]:  # noqa: ASYNC109
        """The task once finished, or as it is when `timeout` runs out (then False)."""
        from worker.submission import wait_until_finished

        return await wait_until_finished(
            lambda: self._row(task_id), lambda row: row["status"] in FINISHED, timeout
        )

    # -- read -----------------------------------------------------------------------------------

    async def show(self, task_id: UUID) -> TaskReport:
        reports = self.reports
        row = await self._row(task_id)
        history = await reports.attempts(task_id)
        now = await reports.now()
        status = TaskStatus(row["status"])
        workers = await reports.live_workers()
        children = await reports.children_by_status(task_id) if status is TaskStatus.WAITING else {}
        hold = await self.flow.hold_of(task_id) if status is TaskStatus.PENDING else None
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
        try:
            conv = UUID(conversation_id.strip()) if conversation_id is not None else None
        except ValueError:
            raise OperatorError(
                f"not a conversation id (expected a UUID): {conversation_id!r:.80}"
            ) from None
        rows = await self.reports.tasks(
            agent_id=agent_id, status=status, conversation_id=conv, limit=limit
        )
        return rows, await self.reports.now()

    async def tree(self, task_id: UUID) -> Tree:
        nodes = await self.reports.tree(task_id)
        now = await self.reports.now()
        if not nodes:
            raise OperatorError(f"no task with id {task_id}")
        return Tree(nodes, now)

    async def stats(self) -> Stats:
        reports = self.reports
        statuses = await reports.counts_by_status()
        agents = await reports.counts_by_agent(big=[s for s, n in statuses.items() if n.estimated])
        oldest = await reports.oldest_pending_seconds()
        not_due = await reports.scheduled_count()
        finished = await reports.finished_within(60)
        workers = await reports.live_workers()
        now = await reports.now()
        limits = await self.flow.limits()
        pauses = await self.flow.pauses()
        by_agent = _by_agent(agents)
        total = sum(statuses.values(), Count(0))
        last_minute = sum(finished.values(), Count(0))
        return Stats(
            by_status={s.value: statuses.get(s, Count(0)).value for s in TaskStatus},
            by_agent=by_agent,
            total=total.value,
            oldest_pending_seconds=oldest,
            pending_not_due=not_due.value,
            finished_last_minute=last_minute.value,
            finished_last_minute_by_status={s.value: n.value for s, n in sorted(finished.items())},
            workers=workers,
            now=now,
            by_status_estimated=[s.value for s in TaskStatus if statuses[s].estimated],
            by_agent_estimated={
                agent: [s.value for s in TaskStatus if s in counts and counts[s].estimated]
                for agent, counts in sorted(agents.by_agent.items())
                if any(c.estimated for c in counts.values())
            },
            pending_not_due_estimated=not_due.estimated,
            finished_last_minute_estimated=last_minute.estimated,
            agents_truncated=agents.truncated,
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
        max_rate: float | None = None,
    ) -> PruneResult:
        """Delete finished tasks (their attempts go with them) whose `completed_at` is older
        than `older_than`, by the database clock: one status at a time, oldest first, in
        batches of at most `batch_size`, each batch one statement that commits on its own so
        that no lock is held for long. `max_rate` (tasks per second) paces the deletes: no
        batch is larger than it, and the average rate stays under it. A dry run counts (up to
        the cap, estimated beyond) and deletes nothing."""
        check_statuses(statuses)
        prunes = PruneRepository(self._ex)
        cutoff = await self.reports.now() - older_than
        if dry_run:
            matched = await prunes.count(statuses=statuses, cutoff=cutoff)
            return PruneResult(
                cutoff, list(statuses), True, matched.count, 0, 0, matched.estimated, max_rate
            )
        size = batch_size if max_rate is None else max(1, min(batch_size, int(max_rate)))
        started = time.monotonic()
        deleted = batches = 0
        for status in statuses:
            position = START
            while True:
                batch = await prunes.batch(status=status, cutoff=cutoff, after=position, size=size)
                if batch.position is None:
                    break
                position = batch.position
                deleted += batch.deleted
                batches += 1
                if max_rate is not None:  # the average rate so far stays under max_rate
                    await asyncio.sleep(max(0.0, deleted / max_rate - (time.monotonic() - started)))
                if batch.scanned < size:  # nothing older is left in this status
                    break
        return PruneResult(
            cutoff, list(statuses), False, deleted, deleted, batches, False, max_rate
        )


def _by_agent(agents: AgentCounts) -> dict[str, dict[str, int]]:
    return {
        agent: {s.value: counts.get(s, Count(0)).value for s in TaskStatus}
        for agent, counts in sorted(agents.by_agent.items())
    }
