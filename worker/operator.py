"""What the `tasklane` CLI does, as plain async operations returning plain data.

Rendering lives in `worker.cli_render`; argument parsing and exit codes in `worker.cli`. Every
failure an operator can cause or meet (unreachable services, an unmigrated database, an unknown
id) surfaces as an `OperatorError` with a one-line message.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

from domain.entities import TaskAttempt, WorkerInfo
from domain.exceptions import EntityNotFoundError
from domain.payload import JsonValue
from domain.value_objects import FINISHED_STATUSES, TaskStatus
from persistence import pg
from persistence.repositories.report_repository import StatusCount, TaskRow, TreeNode
from persistence.schema import SCHEMA_REVISION, SchemaError, check_schema
from persistence.session import UnitOfWork, create_engine, create_session_factory
from worker.client import TaskClient, parse_task_id
from worker.config import Settings, redact_url
from worker.redis_conn import create_redis

CONNECT_TIMEOUT_SECONDS = 10.0
LIVE_WITHIN_SECONDS = 30.0
CLI_USER = "cli"


class OperatorError(Exception):
    """A failure to report as one line (exit code 1)."""


def reason_of(exc: BaseException) -> str:
    """The first line of an exception's message, or its type when it has none."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# -- the services ---------------------------------------------------------------------------------


async def check_postgres(settings: Settings, *, schema: bool = True) -> None:
    """Raise `OperatorError` unless Postgres answers and (with `schema`) has the schema this
    code needs."""
    try:
        conn = await asyncio.wait_for(
            pg.connect(settings.database_url, statement_cache=settings.db_statement_cache),
            timeout=CONNECT_TIMEOUT_SECONDS,
        )
    except Exception as exc:
        raise OperatorError(
            f"cannot connect to PostgreSQL at {redact_url(settings.database_url)}: {reason_of(exc)}"
        ) from None
    try:
        if schema:
            await check_schema(conn)
    except SchemaError as exc:
        raise OperatorError(str(exc)) from None
    finally:
        await conn.close()


async def check_redis(settings: Settings) -> None:
    redis = create_redis(settings.redis_url, retries=1)
    try:
        await asyncio.wait_for(redis.ping(), timeout=CONNECT_TIMEOUT_SECONDS)
    except Exception as exc:
        raise OperatorError(
            f"cannot connect to Redis at {redact_url(settings.redis_url)}: {reason_of(exc)}"
        ) from None
    finally:
        await redis.aclose()


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


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    ok: bool
    detail: str


@dataclass(frozen=True, slots=True)
class HealthReport:
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)


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
    ) -> TaskRow:
        if conversation_id is None:
            conversation = await self.client.create_conversation(
                user_id=CLI_USER, title=f"tasklane submit {agent_id}"
            )
            conv_id: UUID = conversation.id
        else:
            conv_id = parse_task_id(conversation_id)
        task = await self.client.submit(
            agent_id, input, conversation_id=conv_id, idempotency_key=idempotency_key
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
            workers = await uow.workers.list_live(within_seconds=LIVE_WITHIN_SECONDS)
            children = (
                await uow.reports.children_by_status(task_id)
                if status is TaskStatus.WAITING
                else {}
            )
        reason = explain(row, now=now, workers=workers, children=children, settings=self.settings)
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
            workers = await uow.workers.list_live(within_seconds=LIVE_WITHIN_SECONDS)
            now = await uow.reports.now()
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
        extra = f" and {others} unfinished subtask{'s' if others != 1 else ''}" if others else ""
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


# -- health ---------------------------------------------------------------------------------------


async def health(settings: Settings, *, local: bool = False) -> HealthReport:
    """Postgres, Redis, the schema revision and a live worker on the configured queue (with
    `local`: on this host, which is what a container's healthcheck asks). Every check runs
    and reports, except those that need an earlier one to have passed."""
    postgres = Check("postgres", True, redact_url(settings.database_url))
    schema = Check("schema", False, "not checked: PostgreSQL is unreachable")
    try:
        conn = await asyncio.wait_for(
            pg.connect(settings.database_url, statement_cache=settings.db_statement_cache),
            timeout=CONNECT_TIMEOUT_SECONDS,
        )
    except Exception as exc:
        postgres = Check(
            "postgres",
            False,
            f"cannot connect to PostgreSQL at {redact_url(settings.database_url)}: "
            f"{reason_of(exc)}",
        )
    else:
        try:
            schema = await _schema_check(conn)
        finally:
            await conn.close()
    redis = Check("redis", True, redact_url(settings.redis_url))
    try:
        await check_redis(settings)
    except OperatorError as exc:
        redis = Check("redis", False, str(exc))
    if schema.ok:
        workers = await _worker_check(settings, local)
    else:
        workers = Check("workers", False, f"not checked: the {schema.name} check failed")
    return HealthReport([postgres, redis, schema, workers])


async def _schema_check(conn: Any) -> Check:
    try:
        await check_schema(conn)
    except SchemaError as exc:
        return Check("schema", False, str(exc))
    except Exception as exc:
        return Check("schema", False, reason_of(exc))
    return Check("schema", True, f"revision {SCHEMA_REVISION}")


async def _worker_check(settings: Settings, local: bool) -> Check:
    hostname = socket.gethostname()
    engine = create_engine(
        settings.database_url,
        pool_size=1,
        max_overflow=0,
        statement_cache=settings.db_statement_cache,
        application_name="tasklane-health",
    )
    try:
        async with UnitOfWork(create_session_factory(engine)) as uow:
            workers = await uow.workers.list_live(
                queue=settings.queue, within_seconds=LIVE_WITHIN_SECONDS
            )
    except Exception as exc:
        return Check("workers", False, reason_of(exc))
    finally:
        await engine.dispose()
    where = f"queue {settings.queue!r}"
    if local:
        workers = [w for w in workers if w.hostname == hostname]
        where += f" on host {hostname!r}"
    if not workers:
        return Check(
            "workers", False, f"no worker on {where} seen in the last {LIVE_WITHIN_SECONDS:g}s"
        )
    return Check("workers", True, f"{len(workers)} live on {where}")


# -- why a task is where it is --------------------------------------------------------------------


def explain(
    row: TaskRow,
    *,
    now: datetime,
    workers: Sequence[WorkerInfo],
    children: dict[TaskStatus, int],
    settings: Settings,
) -> str | None:
    """One line saying why a task is not progressing, or what it is doing (None: completed)."""
    status = TaskStatus(row["status"])
    queue = row["queue"]
    on_queue = [w for w in workers if w.queue == queue]
    if status is TaskStatus.PENDING:
        return _explain_pending(row, now, on_queue, workers)
    if status is TaskStatus.RUNNING:
        return _explain_running(row, now, on_queue)
    if status is TaskStatus.WAITING:
        return _explain_waiting(children, queue, on_queue)
    if status is TaskStatus.FAILED:
        attempts = f"{row['attempts']} attempt{'s' if row['attempts'] != 1 else ''}"
        error = _first_line(row["error"]) or "no error recorded"
        return f"failed after {attempts}: {error} — `tasklane retry {row['id']}` runs it again"
    if status is TaskStatus.CANCELLED:
        return "cancelled: it will not run again"
    return None


def _explain_pending(
    row: TaskRow, now: datetime, on_queue: Sequence[WorkerInfo], workers: Sequence[WorkerInfo]
) -> str:
    queue = row["queue"]
    run_after: datetime = row["run_after"]
    if run_after > now:
        wait = duration(run_after - now)
        if row["attempts"] and row["error"]:
            limit = row["max_attempts"] or "?"
            return (
                f"pending: attempt {row['attempts']} of {limit} failed "
                f"({_first_line(row['error'])}); next attempt in {wait}"
            )
        return f"pending: not due yet, runs in {wait}"
    due = duration(now - run_after)
    if not on_queue:
        others = sorted({w.queue for w in workers})
        elsewhere = f" (live workers serve: {', '.join(others)})" if others else ""
        return (
            f"pending: due {due} ago but no live worker for queue {queue!r}{elsewhere} "
            "— is a worker running for this queue?"
        )
    agent = row["agent_id"]
    if not any(agent in w.agents for w in on_queue):
        served = sorted({a for w in on_queue for a in w.agents})
        return (
            f"pending: due {due} ago; no live worker on queue {queue!r} serves agent {agent!r} "
            f"(they serve: {', '.join(served) or 'none'}), so it will fail as an unknown agent"
        )
    n = len(on_queue)
    return (
        f"pending: due {due} ago, not claimed yet by the {n} live worker{'s' if n != 1 else ''} "
        f"on queue {queue!r}"
    )


def _explain_running(row: TaskRow, now: datetime, on_queue: Sequence[WorkerInfo]) -> str:
    lease: datetime | None = row["lease_expires_at"]
    worker = row["worker_id"] or "?"
    attempt = f"attempt {row['attempts']} of {row['max_attempts'] or '?'}"
    if lease is not None and lease <= now:
        rescuer = (
            "will be rescued at the next reconcile tick"
            if on_queue
            else f"will be rescued once a worker runs for queue {row['queue']!r} (none is live)"
        )
        return f"running: lease expired {duration(now - lease)} ago ({attempt}), {rescuer}"
    since = f" for {duration(now - row['started_at'])}" if row["started_at"] else ""
    left = f", lease expires in {duration(lease - now)}" if lease is not None else ""
    if not any(w.id == worker for w in on_queue):
        return (
            f"running: worker {worker} has not been seen for a while{left}; "
            "the task is rescued when the lease runs out"
        )
    return f"running on {worker}{since} ({attempt}){left}"


def _explain_waiting(
    children: dict[TaskStatus, int], queue: str, on_queue: Sequence[WorkerInfo]
) -> str:
    total = sum(children.values())
    unfinished = {s: n for s, n in children.items() if s not in FINISHED_STATUSES and n}
    if unfinished:
        parts = ", ".join(f"{n} {s.value}" for s, n in sorted(unfinished.items()))
        return f"waiting: {sum(unfinished.values())} of {total} children unfinished ({parts})"
    if not on_queue:
        return (
            f"waiting: all {total} children finished; it resumes once a worker runs for "
            f"queue {queue!r} (none is live)"
        )
    return f"waiting: all {total} children finished; the reconciler resumes it at its next tick"


def _first_line(text: str | None, limit: int = 120) -> str:
    if not text:
        return ""
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= limit else line[: limit - 1] + "…"


# -- durations ------------------------------------------------------------------------------------


def duration(value: timedelta | float) -> str:
    """A short human duration: 850ms, 12.3s, 4m05s, 2h03m, 3d04h."""
    seconds = value.total_seconds() if isinstance(value, timedelta) else float(value)
    seconds = max(0.0, seconds)
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"
