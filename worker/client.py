"""The producer API: submit tasks, wait for them, cancel and retry them.

```python
async with TaskClient.from_env() as client:
    conv = await client.create_conversation(user_id="u1", title="demo")
    task = await client.submit("echo", {"x": 1}, conversation_id=conv.id)
    done = await client.wait(task.id, timeout=10)
```

A submit is one insert in Postgres, then one pipelined write to Redis after the commit. If the
doorbell cannot be rung (Redis away, the process dies right after commit), the task is still
committed and the reconciler rings it later: a committed task always runs.

A plain `submit` (no caller session) is one round trip to Postgres: a single INSERT … RETURNING
in autocommit on a connection of the client's second, autocommit engine (no BEGIN/COMMIT, no
pool pre-ping). Anything out of the ordinary — a taken idempotency key, a connection found dead —
goes the unit-of-work way, as `submit_many` and `session=` submits always do.

What a submit checks, the insert and the doorbells are `worker.submission`'s, which `tasklane
submit` shares without this module's SQLAlchemy engines.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from types import TracebackType
from typing import Any, Self
from uuid import UUID

import asyncpg
import structlog
from redis.asyncio import Redis
from sqlalchemy import event
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from domain.entities import (
    Conversation,
    Doorbell,
    Task,
    TaskAttempt,
    check_agent_id,
    check_priority,
)
from domain.exceptions import (
    ConcurrentUpdateError,
    EntityAlreadyExistsError,
    EntityNotFoundError,
    InvalidInputError,
)
from domain.interfaces import CancelResult, RetryResult
from domain.payload import JsonValue, encode_json
from domain.value_objects import FINISHED_STATUSES
from persistence.errors import translated
from persistence.pg import create_pool
from persistence.repositories import TaskRepository
from persistence.repositories.flow_repository import NO_LIMIT
from persistence.session import UnitOfWork, create_engine, create_session_factory
from persistence.sql import AutocommitExecutor, ConnectionLost, SessionExecutor
from worker import tracing  # observability
from worker.agents import parse_rate
from worker.config import Settings
from worker.dispatch import Dispatcher
from worker.submission import Inserted, Submitter, producer_redis, wait_until_finished
from worker.submission import TaskSpec as TaskSpec  # the public API's, defined there
from worker.submission import parse_task_id as parse_task_id
from worker.watch import INTEREST_SECONDS, SAFETY_POLL_SECONDS, channel, follow

SUBMIT_BATCH = 1000
_SESSION_DOORBELLS = "tasklane_doorbells"

log = structlog.get_logger("tasklane.client")


class Unset:
    """The default of `TaskClient.update`'s arguments: leave this field as it is."""

    def __repr__(self) -> str:
        return "UNSET"


UNSET = Unset()


def _aware(value: datetime) -> datetime:
    if not isinstance(value, datetime) or value.tzinfo is None:
        raise InvalidInputError("run_after must be a timezone-aware datetime")
    return value


def _max_attempts(value: int | None) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise InvalidInputError(f"max_attempts must be a whole number ≥ 1, got {value!r:.40}")
    return value


# The longest pause with an end: a year (a longer one is a pause without an end).
MAX_PAUSE_SECONDS = 365 * 24 * 3600.0


def _scope_agent(agent_id: str | None) -> str:
    return "" if agent_id is None else check_agent_id(agent_id)


def _per_second(rate: str | float | None) -> float:
    """A rate as units per second: "60/min", a number per second, or None (no limit)."""
    if rate is None:
        return NO_LIMIT
    if isinstance(rate, str):
        try:
            return parse_rate(rate)
        except ValueError as exc:
            raise InvalidInputError(str(exc)) from None
    return rate


def _event(message: Any) -> dict[str, Any] | None:
    """A worker's event from a pub/sub message; None for anything else."""
    if not isinstance(message, dict) or message.get("type") != "message":
        return None
    try:
        event = json.loads(message["data"])
    except (ValueError, TypeError):
        return None
    return event if isinstance(event, dict) else None


# A producer's connections: up to 10 for single-statement submits (a plain asyncpg pool), up to
# 10 for everything else (its engine: 5 kept, 5 more under load, fewer kept if
# TASKLANE_DB_POOL_SIZE is below 5).
AUTOCOMMIT_CONNECTIONS = 10


def _client_engine(url: str | URL, settings: Settings) -> AsyncEngine:
    return create_engine(
        url,
        pool_size=max(1, min(5, settings.db_pool_size)),
        max_overflow=5,
        statement_cache=settings.db_statement_cache,
        application_name="tasklane-client",
        timeouts=settings.db_timeouts,
    )


class TaskClient:
    def __init__(self, *, settings: Settings, engine: AsyncEngine, redis: Redis) -> None:
        self.settings = settings
        self.engine = engine
        self.session_factory = create_session_factory(engine)
        # Single-statement submits: the same database, on a plain asyncpg pool (created on first
        # use), in autocommit, without pre-ping.
        self.autocommit_pool: asyncpg.Pool | None = None
        self._autocommit_pool_lock = asyncio.Lock()
        self._autocommit = TaskRepository(AutocommitExecutor(self._autocommit_connections))
        self.redis = redis
        self.dispatcher = Dispatcher(redis, settings.queue)
        self._submitter = Submitter(settings, self.dispatcher)
        self._background: set[asyncio.Task[None]] = set()

    @classmethod
    def from_env(cls, **overrides: Any) -> TaskClient:
        """Configured from DATABASE_URL, REDIS_URL, TASKLANE_QUEUE… (`overrides` win)."""
        return cls.from_settings(Settings.from_env(**overrides))

    @classmethod
    def from_settings(cls, settings: Settings) -> TaskClient:
        engine = _client_engine(settings.database_url, settings)
        return cls(settings=settings, engine=engine, redis=producer_redis(settings))

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        await self.redis.aclose()
        if self.autocommit_pool is not None:
            await self.autocommit_pool.close()
        await self.engine.dispose()

    async def _autocommit_connections(self) -> asyncpg.Pool:
        if self.autocommit_pool is None:
            async with self._autocommit_pool_lock:
                if self.autocommit_pool is None:
                    self.autocommit_pool = await create_pool(
                        self.engine.url,
                        min_size=0,
                        max_size=AUTOCOMMIT_CONNECTIONS,
                        statement_cache=self.settings.db_statement_cache,
                        application_name="tasklane-client",
                        timeouts=self.settings.db_timeouts,
                    )
        return self.autocommit_pool

    # -- conversations ------------------------------------------------------------------------

    async def create_conversation(
        self, *, user_id: str, title: str | None = None, metadata: dict[str, Any] | None = None
    ) -> Conversation:
        conversation = Conversation(user_id=user_id, title=title, metadata=dict(metadata or {}))
        async with UnitOfWork(self.session_factory) as uow:
            created = await uow.conversations.create(conversation)
            await uow.commit()
        return created

    # -- submitting ---------------------------------------------------------------------------

    @tracing.submit_span  # observability
    async def submit(
        self,
        agent_id: str,
        input: JsonValue,
        *,
        conversation_id: UUID | str,
        idempotency_key: str | None = None,
        metadata: dict[str, Any] | None = None,
        max_attempts: int | None = None,
        run_after: datetime | None = None,
        parent_task_id: UUID | str | None = None,
        priority: int = 0,
        session: AsyncSession | None = None,
    ) -> Task:
        """Create one task and dispatch it once it is committed.

        With `session`, the task is written in the caller's transaction and dispatched only if
        and when that transaction commits. The same `idempotency_key` returns the existing task;
        the same key with another agent, input or conversation raises
        `IdempotencyConflictError`. `priority` (−1000…1000): higher starts first among due
        tasks; a task that has waited `priority` minutes longer starts first regardless.
        """
        spec = TaskSpec(
            agent_id=agent_id,
            input=input,
            conversation_id=parse_task_id(conversation_id),
            idempotency_key=idempotency_key,
            metadata=metadata,
            max_attempts=max_attempts,
            run_after=run_after,
            parent_task_id=parse_task_id(parent_task_id) if parent_task_id else None,
            priority=priority,
        )
        task = self._submitter.build(spec)
        if session is not None:
            repo = TaskRepository(SessionExecutor(session))
            inserted = await self._submitter.insert(repo, [task])
            self._ring_after_commit(session, inserted.doorbells)
            return inserted.tasks[0]
        if task.parent_task_id is not None:  # the parent is locked and checked: a transaction
            inserted = await self._insert_in_transaction(task)
        else:
            inserted = await self._insert_alone(task)
        await self._ring(inserted.doorbells)
        return inserted.tasks[0]

    @tracing.submit_span  # observability
    async def submit_many(self, specs: Sequence[TaskSpec]) -> list[Task]:
        """Create many tasks, all or none: one transaction, one insert statement per batch of
        1000, then one pipelined Redis write per batch once it has committed."""
        tasks = [self._submitter.build(spec) for spec in specs]
        batches: list[Inserted] = []
        async with UnitOfWork(self.session_factory) as uow:
            for start in range(0, len(tasks), SUBMIT_BATCH):
                part = tasks[start : start + SUBMIT_BATCH]
                batches.append(await self._submitter.insert(uow.tasks, part))
            await uow.commit()
        for batch in batches:
            await self._ring(batch.doorbells)
        return [task for batch in batches for task in batch.tasks]

    async def _insert_alone(self, task: Task) -> Inserted:
        """One task, no caller transaction: INSERT … RETURNING in autocommit, one round trip.

        The input is checked (and encoded) before a connection is taken. A taken idempotency
        key inserts nothing: the unit-of-work way then reads the existing task and compares. A
        connection lost under the insert leaves it unknown whether the insert landed: the
        unit-of-work way inserts the same task (same id) again, and finds it if it had.
        """
        delays = self._submitter.dispatch_delays([task])
        try:
            with translated("Task"):
                inserted = await self._autocommit.create_many(
                    [task],
                    dispatch_delays=delays,
                    skip_taken_keys=task.idempotency_key is not None,
                    max_input_bytes=self.settings.max_input_bytes,
                )
        except ConnectionLost as lost:
            log.info(
                "submit.connection_lost", task_id=str(task.id), error=repr(lost.__cause__ or lost)
            )
            return await self._insert_again(task)
        if not inserted:  # the idempotency key is taken
            return await self._insert_in_transaction(task)
        return Inserted(inserted, self._submitter.doorbells([task], delays, {task.id: inserted[0]}))

    async def _insert_in_transaction(self, task: Task) -> Inserted:
        async with UnitOfWork(self.session_factory) as uow:
            inserted = await self._submitter.insert(uow.tasks, [task])
            await uow.commit()
        return inserted

    async def _insert_again(self, task: Task) -> Inserted:
        """Insert `task` once more after its first insert may or may not have landed."""
        try:
            return await self._insert_in_transaction(task)
        except EntityAlreadyExistsError:
            # Our own id is taken: the first insert did land (a taken idempotency key inserts
            # nothing and is handled by `_insert`, so this is the primary key).
            existing = await self.get(task.id)
            delays = self._submitter.dispatch_delays([task])
            doorbells = self._submitter.doorbells([task], delays, {task.id: existing})
            return Inserted([existing], doorbells)

    # -- dispatching --------------------------------------------------------------------------

    async def _ring(self, doorbells: list[Doorbell]) -> None:
        """Every ring of this client goes through here (tests stall it)."""
        await self._submitter.ring(doorbells)

    def _ring_after_commit(self, session: AsyncSession, doorbells: list[Doorbell]) -> None:
        """Ring once the caller's transaction commits; forget them if it rolls back."""
        sync_session = session.sync_session
        key = (_SESSION_DOORBELLS, id(self))
        hook = sync_session.info.get(key)
        if hook is None:
            hook = sync_session.info[key] = _AfterCommit(self, sync_session)
        hook.doorbells.extend(doorbells)

    def _ring_later(self, doorbells: list[Doorbell]) -> None:
        task = asyncio.get_running_loop().create_task(self._ring(doorbells))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- reading and operating ----------------------------------------------------------------

    async def get(self, task_id: UUID | str) -> Task:
        tid = parse_task_id(task_id)
        async with UnitOfWork(self.session_factory) as uow:
            task = await uow.tasks.get_by_id(tid)
        if task is None:
            raise EntityNotFoundError("Task", tid)
        return task

    async def wait(self, task_id: UUID | str, timeout: float = 30.0) -> Task:  # noqa: ASYNC109
        """Poll until the task is finished (completed, failed or cancelled); `TimeoutError` if it
        is not within `timeout` seconds."""
        task, finished = await wait_until_finished(
            lambda: self.get(task_id), lambda t: t.is_finished, timeout
        )
        if not finished:
            raise TimeoutError(f"task {task.id} is still {task.status} after {timeout:g}s")
        return task

    async def cancel(self, task_id: UUID | str) -> CancelResult:
        """Cancel the task and its unfinished subtasks. A finished task is left as it is
        (`result.changed` is False)."""
        tid = parse_task_id(task_id)
        async with UnitOfWork(self.session_factory) as uow:
            result = await uow.tasks.cancel(tid, dispatch_delay=self.settings.redispatch_seconds)
            await uow.commit()
        await self._ring(result.doorbells)
        return result

    async def retry(self, task_id: UUID | str) -> RetryResult:
        """Run a failed task again with fresh attempts. Any other task is left as it is
        (`result.retried` is False)."""
        tid = parse_task_id(task_id)
        async with UnitOfWork(self.session_factory) as uow:
            result = await uow.tasks.retry(tid, dispatch_delay=self.settings.redispatch_seconds)
            await uow.commit()
        await self._ring(result.doorbells)
        return result

    async def update(
        self,
        task_id: UUID | str,
        *,
        run_after: datetime | Unset | None = UNSET,
        max_attempts: int | Unset | None = UNSET,
        metadata: dict[str, Any] | Unset = UNSET,
        priority: int | Unset = UNSET,
        expected_version: int | None = None,
    ) -> Task:
        """An operator's edit of a task that has not started: when it runs (`run_after`, an aware
        datetime; None: now), how many attempts it gets (None: its agent's default), its
        metadata. Only the arguments given change.

        `expected_version`: the version you read (`task.version`); if the task changed since,
        `ConcurrentUpdateError` and nothing is written. A task that already started (or
        finished) raises `TaskNotEditableError`.
        """
        tid = parse_task_id(task_id)
        async with UnitOfWork(self.session_factory) as uow:
            task = await uow.tasks.get_by_id(tid)
            if task is None:
                raise EntityNotFoundError("Task", tid)
            if expected_version is not None and task.version != expected_version:
                raise ConcurrentUpdateError("Task", tid, expected_version)
            if not isinstance(run_after, Unset):
                task.run_after = _aware(run_after) if run_after is not None else None
            if not isinstance(max_attempts, Unset):
                task.max_attempts = _max_attempts(max_attempts)
            if not isinstance(metadata, Unset):
                if not isinstance(metadata, dict):
                    raise InvalidInputError("metadata must be a JSON object (a dict)")
                task.metadata = dict(metadata)
            if not isinstance(priority, Unset):
                task.priority = check_priority(priority)
            updated = await uow.tasks.update(task)
            await uow.commit()
        if run_after is None:  # "run it now": no need to wait for the reconciler
            await self._ring([Doorbell.for_task(updated)])
        return updated

    # -- durable waits ---------------------------------------------------------------------------

    async def signal(
        self, task_id: UUID | str, name: str, payload: JsonValue = None, *, sent_by: str = "client"
    ) -> int:
        """Deliver signal `name` (with a JSON `payload`) to a task: a task waiting for it resumes
        at once (`ctx.signals[name]`); one not yet waiting keeps it for its wait. A finished task
        refuses it (`SignalRefusedError`). Returns the signal's id."""
        tid = parse_task_id(task_id)
        if not isinstance(name, str) or not 0 < len(name) <= 200:
            raise InvalidInputError("a signal's name is 1 to 200 characters")
        payload_json = encode_json(
            payload, what="signal payload", max_bytes=self.settings.max_input_bytes
        )
        async with UnitOfWork(self.session_factory) as uow:
            signal_id, doorbell = await uow.tasks.signal(tid, name, payload_json, sent_by=sent_by)
            await uow.commit()
        if doorbell is not None:
            await self._ring([doorbell])
        return signal_id

    async def watch(
        self, task_id: UUID | str, *, safety_poll_seconds: float = SAFETY_POLL_SECONDS
    ) -> AsyncIterator[dict[str, Any]]:
        """The task's changes as they happen, until it is final: `{"event": "state", ...}` with
        its status, attempts, runs, step, progress (read from Postgres: first, after each
        worker event, after a reconnect, and every `safety_poll_seconds` without news) and
        `{"event": "progress", "progress": …}` as the handler reports it. See worker.watch."""
        tid = parse_task_id(task_id)
        last: tuple[Any, ...] | None = None
        renewed = 0.0
        pubsub = self.redis.pubsub()
        try:
            while True:
                try:
                    if time.monotonic() - renewed > INTEREST_SECONDS / 3:
                        # The producer's client has no socket timeout: bound these calls here.
                        async with asyncio.timeout(self.settings.redis_timeout_seconds):
                            await follow(self.redis, tid)
                            if not renewed:
                                await pubsub.subscribe(channel(tid))
                        renewed = time.monotonic()
                    message = (
                        await pubsub.get_message(
                            ignore_subscribe_messages=True, timeout=safety_poll_seconds
                        )
                        if last is not None
                        else None
                    )
                except Exception as exc:  # Redis away: Postgres tells the truth meanwhile
                    log.info("watch.redis_failed", task_id=str(tid), error=repr(exc))
                    await asyncio.sleep(min(safety_poll_seconds, 1.0))
                    message, renewed = None, 0.0
                    pubsub = self.redis.pubsub()
                event = _event(message)
                if event is not None and event.get("event") == "progress":
                    yield event
                    continue
                row = await self._state(tid)
                state = tuple(row[k] for k in ("status", "attempts", "runs", "step", "progress"))
                if state != last:
                    last = state
                    yield {"event": "state", "task_id": str(tid), **row}
                if row["status"] in {s.value for s in FINISHED_STATUSES}:
                    return
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def _state(self, task_id: UUID) -> dict[str, Any]:
        async with UnitOfWork(self.session_factory) as uow:
            row = await uow.reports.task(task_id)
        if row is None:
            raise EntityNotFoundError("Task", task_id)
        keys = ("status", "attempts", "runs", "step", "progress", "error", "output", "woke_by")
        return {k: row[k] for k in keys}

    # -- flow control ----------------------------------------------------------------------------

    async def pause(
        self,
        *,
        agent_id: str | None = None,
        key: str | None = None,
        queue: str | None = None,
        reason: str = "paused by an operator",
        for_seconds: float | None = None,
        by: str = "client",
    ) -> dict[str, Any]:
        """Pause a queue (this client's, or `queue`), one agent on it, or one key of an agent:
        nothing new starts there until `resume` (or until `for_seconds` have passed); running
        tasks finish. Returns the pause as stored."""
        if for_seconds is not None and not 0 < for_seconds <= MAX_PAUSE_SECONDS:
            raise InvalidInputError(
                f"for_seconds must be between 0 and {MAX_PAUSE_SECONDS:g}, got {for_seconds!r}"
            )
        if not isinstance(reason, str) or not reason.strip() or len(reason) > 1000:
            raise InvalidInputError("a pause needs a reason of 1 to 1000 characters")
        async with UnitOfWork(self.session_factory) as uow:
            pause = await uow.flow.pause(
                queue or self.settings.queue,
                agent_id=_scope_agent(agent_id),
                key=key or "",
                reason=reason,
                by=by,
                for_seconds=for_seconds,
            )
            await uow.commit()
        return pause

    async def resume(
        self, *, agent_id: str | None = None, key: str | None = None, queue: str | None = None
    ) -> bool:
        """Lift a pause made with the same arguments; False if there was none."""
        async with UnitOfWork(self.session_factory) as uow:
            resumed = await uow.flow.resume(
                queue or self.settings.queue, agent_id=_scope_agent(agent_id), key=key or ""
            )
            await uow.commit()
        return resumed

    async def set_limits(
        self,
        agent_id: str,
        *,
        queue: str | None = None,
        concurrency: int | Unset | None = UNSET,
        per_key: int | Unset | None = UNSET,
        rate: str | float | Unset | None = UNSET,
        key_rate: str | float | Unset | None = UNSET,
        by: str = "client",
    ) -> None:
        """Override an agent's limits live, on this client's queue (or `queue`): a value, or
        None for "no limit" whatever its code declares. Rates as "60/min" or units per second.
        Only the arguments given change; `reset_limits` goes back to the code's."""
        changes: dict[str, float | int | None] = {}
        for name, value in (("concurrency", concurrency), ("per_key", per_key)):
            if not isinstance(value, Unset):
                changes[name] = NO_LIMIT if value is None else value
        for name, rate_value in (("rate", rate), ("key_rate", key_rate)):
            if not isinstance(rate_value, Unset):
                changes[name] = _per_second(rate_value)
        if not changes:
            raise InvalidInputError("set_limits: give at least one limit to change")
        async with UnitOfWork(self.session_factory) as uow:
            await uow.flow.set_limits(
                queue or self.settings.queue, check_agent_id(agent_id), changes, by=by
            )
            await uow.commit()

    async def reset_limits(self, agent_id: str, *, queue: str | None = None) -> int:
        """Drop every override of the agent's limits (on `queue`, or on every queue)."""
        async with UnitOfWork(self.session_factory) as uow:
            reset = await uow.flow.reset_limits(agent_id, queue=queue)
            await uow.commit()
        return reset

    async def limits(self, *, queue: str | None = None) -> list[dict[str, Any]]:
        """Every agent's limits (declared, overridden, effective) and how many run now."""
        async with UnitOfWork(self.session_factory) as uow:
            return await uow.flow.limits(queue=queue)

    async def pauses(self, *, queue: str | None = None) -> list[dict[str, Any]]:
        async with UnitOfWork(self.session_factory) as uow:
            return await uow.flow.pauses(queue=queue)

    async def subtasks(self, task_id: UUID | str) -> list[Task]:
        async with UnitOfWork(self.session_factory) as uow:
            return await uow.tasks.get_subtasks(parse_task_id(task_id))

    async def attempts(self, task_id: UUID | str) -> list[TaskAttempt]:
        async with UnitOfWork(self.session_factory) as uow:
            return await uow.tasks.list_attempts(parse_task_id(task_id))


class _AfterCommit:
    """Doorbells waiting for a caller's transaction. Attached once per session and client; the
    session's events settle each transaction's doorbells (listeners cannot be removed while
    SQLAlchemy is dispatching them, so they stay for the session's life)."""

    def __init__(self, client: TaskClient, sync_session: Any) -> None:
        self.client = client
        self.doorbells: list[Doorbell] = []
        event.listen(sync_session, "after_commit", self.committed)
        event.listen(sync_session, "after_rollback", self.rolled_back)

    def committed(self, _: Any) -> None:
        doorbells, self.doorbells = self.doorbells, []
        if doorbells:
            self.client._ring_later(doorbells)

    def rolled_back(self, _: Any) -> None:
        self.doorbells = []
