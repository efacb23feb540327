"""Submitting tasks as every producer does: the checks, the insert, the doorbells.

`TaskClient` (`submit`, `submit_many`) and `tasklane submit` share a `Submitter`: the same checks
of a `TaskSpec`, the same insert (`TaskInsertRepository.create_many`: one INSERT … RETURNING, a
taken idempotency key read back and compared), the same doorbells rung once the rows are
committed. This module imports no SQLAlchemy and no structlog, so that the CLI submits on its one
asyncpg connection and answers in a few tenths of a second (tests/integration/test_cli_imports.py);
`TaskClient` adds the transactions of its SQLAlchemy engines around the same calls.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar
from uuid import UUID

from domain.entities import Doorbell, Task
from domain.exceptions import EntityNotFoundError, IdempotencyConflictError, InvalidInputError
from domain.payload import JsonValue
from persistence.repositories.task_insert_repository import TaskInsertRepository
from worker import tracing  # observability
from worker.config import Settings
from worker.dispatch import Dispatcher
from worker.redis_conn import create_redis

if TYPE_CHECKING:
    from redis.asyncio import Redis

# Producers give Redis about half a second to connect; after that the reconciler rings.
PRODUCER_REDIS_RETRIES = 3
# A committed submit returns within this long of its commit, whatever Redis does (a Redis that
# accepts connections and never answers included): the doorbell is then left to the reconciler.
RING_PATIENCE_SECONDS = 1.0
# Waiting for a task: the first read again after this long, each next one after half as long
# again, up to the longest.
FIRST_POLL_SECONDS = 0.02
LONGEST_POLL_SECONDS = 0.5

# The standard library's logging: a CLI command configures structlog only once something logs.
log = logging.getLogger("tasklane.client")

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class TaskSpec:
    """One task to submit with `submit_many`."""

    agent_id: str
    input: JsonValue
    conversation_id: UUID
    idempotency_key: str | None = None
    metadata: dict[str, Any] | None = None
    max_attempts: int | None = None
    run_after: datetime | None = None
    parent_task_id: UUID | None = None
    priority: int = 0


@dataclass(slots=True)
class Inserted:
    """The tasks as stored (an idempotency key's existing task in place of a new one), and the
    doorbells to ring once they are committed."""

    tasks: list[Task]
    doorbells: list[Doorbell] = field(default_factory=list)


def producer_redis(settings: Settings) -> Redis:
    """A producer's Redis client: few retries, as a doorbell not rung is rung by the reconciler.

    No socket timeout: each producer call is bounded as a whole instead (a ring by
    RING_PATIENCE_SECONDS, `TaskClient.watch`'s calls by TASKLANE_REDIS_TIMEOUT_SECONDS). redis-py
    puts a socket timeout on every reply and runs every send in a task of its own under
    `wait_for`: about 0.2 of the 0.75 ms of client CPU a one-at-a-time submit took (README,
    Performance).
    """
    return create_redis(settings.redis_url, retries=PRODUCER_REDIS_RETRIES, socket_timeout=None)


def parse_task_id(value: UUID | str) -> UUID:
    if isinstance(value, UUID):
        return value
    try:
        return UUID(str(value).strip())
    except ValueError:
        raise InvalidInputError(f"not a task id (expected a UUID): {value!r:.80}") from None


class Submitter:
    """Builds tasks from specs, inserts them and rings their doorbells, for one client's settings
    (its queue, redispatch period and input limit)."""

    def __init__(self, settings: Settings, dispatcher: Dispatcher) -> None:
        self.settings = settings
        self.dispatcher = dispatcher

    async def submit(self, repo: TaskInsertRepository, spec: TaskSpec) -> Task:
        """One task, inserted through `repo`, whose connection commits each statement (or step)
        on its own, then rung: `tasklane submit`, on its one asyncpg connection."""
        inserted = await self.insert(repo, [self.build(spec)])
        await self.ring(inserted.doorbells)
        return inserted.tasks[0]

    def build(self, spec: TaskSpec) -> Task:
        """The task `spec` asks for, checked: a bad spec is refused before anything is written."""
        if not isinstance(spec.agent_id, str):
            raise InvalidInputError(f"agent_id must be a string, got {spec.agent_id!r:.80}")
        if spec.run_after is not None and spec.run_after.tzinfo is None:
            raise InvalidInputError("run_after must be timezone-aware (e.g. datetime.now(UTC))")
        key = spec.idempotency_key
        if key is not None and (not isinstance(key, str) or not key.strip()):
            raise InvalidInputError("idempotency_key must be a non-empty string")
        if spec.metadata is not None and not isinstance(spec.metadata, dict):
            raise InvalidInputError("metadata must be a JSON object (a dict)")
        return Task(
            conversation_id=spec.conversation_id,
            agent_id=spec.agent_id,
            input=spec.input,
            parent_task_id=spec.parent_task_id,
            metadata=dict(spec.metadata or {}),
            max_attempts=spec.max_attempts,
            run_after=spec.run_after,
            idempotency_key=key,
            queue=self.settings.queue,
            priority=spec.priority,
            trace_context=tracing.carrier(),  # observability
        )

    def dispatch_delays(self, tasks: Sequence[Task]) -> list[float]:
        # A task scheduled for later is dispatched by the reconciler once due; any other is
        # rung right after commit, and the reconciler leaves it alone for a redispatch period.
        return [0.0 if t.run_after is not None else self.settings.redispatch_seconds for t in tasks]

    @staticmethod
    def doorbells(
        tasks: Sequence[Task], delays: Sequence[float], new: Mapping[UUID, Task]
    ) -> list[Doorbell]:
        # The rows as inserted: their due time (the database's clock) and priority place them.
        return [
            Doorbell.for_task(new[t.id])
            for t, d in zip(tasks, delays, strict=True)
            if d and t.id in new
        ]

    async def insert(self, repo: TaskInsertRepository, tasks: list[Task]) -> Inserted:
        """Insert `tasks` (one statement; under their parents' locks if they name any); a task
        whose idempotency key is taken is answered by the task holding it, if that is the same
        task (agent, input, conversation), else `IdempotencyConflictError`."""
        delays = self.dispatch_delays(tasks)
        inserted = await repo.create_many(
            tasks,
            dispatch_delays=delays,
            skip_taken_keys=any(t.idempotency_key for t in tasks),
            max_input_bytes=self.settings.max_input_bytes,
            attach=True,
        )
        new = {t.id: t for t in inserted}
        taken = [t for t in tasks if t.id not in new]
        existing = await repo.get_by_idempotency_keys(
            [t.idempotency_key for t in taken if t.idempotency_key]
        )
        result: list[Task] = []
        for task in tasks:
            if task.id in new:
                result.append(new[task.id])
                continue
            assert task.idempotency_key is not None
            found = existing.get(task.idempotency_key)
            if found is None:  # deleted between our insert and our read
                raise EntityNotFoundError("Task", f"idempotency_key={task.idempotency_key!r}")
            if (found.agent_id, found.input, found.conversation_id) != (
                task.agent_id,
                task.input,
                task.conversation_id,
            ):
                raise IdempotencyConflictError(task.idempotency_key, found.id)
            result.append(found)
        return Inserted(result, self.doorbells(tasks, delays, new))

    async def ring(self, doorbells: list[Doorbell]) -> None:
        """Ring committed tasks' doorbells; never raises (the reconciler rings them later)."""
        try:
            # One timer in this task, not `wait_for`'s task per ring.
            async with asyncio.timeout(RING_PATIENCE_SECONDS):
                await self.dispatcher.ring(doorbells)
        except Exception as exc:
            # Committed all the same: the reconciler rings them after TASKLANE_REDISPATCH_SECONDS.
            log.warning(
                "dispatch.deferred_to_reconciler: %d doorbell(s) left to the reconciler (%r)",
                len(doorbells),
                exc,
            )


async def wait_until_finished(
    read: Callable[[], Awaitable[T]], finished: Callable[[T], bool], within_seconds: float
) -> tuple[T, bool]:
    """Read a task until `finished` says so or `within_seconds` have passed: the last read, and
    whether it was finished. The reads start quick (most tasks are short) and slow down."""
    deadline = time.monotonic() + within_seconds
    delay = FIRST_POLL_SECONDS
    while True:
        state = await read()
        if finished(state):
            return state, True
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return state, False
        await asyncio.sleep(min(delay, remaining))
        delay = min(delay * 1.5, LONGEST_POLL_SECONDS)
