"""One doorbell, one run: claim → run the handler → finish. The body of the arq job `run_task`.

Each step is its own short statement or transaction; no transaction is open while a handler
runs. Whatever happens (malformed doorbell, missing task, unknown agent, a handler that crashes,
times out or returns garbage), the job returns normally and the worker keeps going. The only
exception that leaves `run` is cancellation on shutdown, after the task was handed back.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar
from uuid import UUID

import structlog
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from domain.entities import Doorbell, Task
from domain.exceptions import InvalidInputError
from domain.payload import UnreadableJson, encode_json
from domain.policies import retry_delay
from persistence.session import UnitOfWork
from persistence.store import Finish, LifecycleStore
from worker.agents import AgentSpec, PermanentError, Retry, TaskContext, WaitForSubtasks
from worker.config import Settings
from worker.dispatch import Dispatcher
from worker.heartbeat import Heartbeat
from worker.redaction import redact_text

T = TypeVar("T")

# Above this many runs in flight, claims and root completions are grouped into batch statements
# (`persistence.batching`, 2 ms window). Measured with bench/run.py: batching from two runs on
# cut PostgreSQL's CPU per echo task from 0.57 to ~0.07 ms and lifted throughput ~25 %, while a
# lone run (light load) still goes straight through with no wait.
BATCH_ABOVE_IN_FLIGHT = 1
MAX_ERROR_CHARS = 4000
# How long a cancelled handler may take to unwind before its job stops waiting for it.
HANDLER_UNWIND_SECONDS = 5.0


# -- what a handler run came to ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Completed:
    output_json: str
    children: list[Task] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Waiting:
    children: list[Task]


@dataclass(frozen=True, slots=True)
class Failed:
    error: str
    permanent: bool = False
    retry_after: float | None = None  # set by Retry(after=…)


@dataclass(frozen=True, slots=True)
class Lost:
    """The task is no longer ours (cancelled or rescued): write nothing."""


Outcome = Completed | Waiting | Failed | Lost


class WorkerRuntime:
    def __init__(
        self,
        *,
        settings: Settings,
        worker_id: str,
        store: LifecycleStore,
        dispatcher: Dispatcher,
        agents: Mapping[str, AgentSpec],
        session_factory: async_sessionmaker[AsyncSession],
    ) -> None:
        self.settings = settings
        self.worker_id = worker_id
        self.store = store
        self.dispatcher = dispatcher
        self.agents = dict(agents)
        self.session_factory = session_factory
        self.log = structlog.get_logger("tasklane.worker")
        self.heartbeat = Heartbeat(store, interval=settings.heartbeat_seconds, log=self.log)
        self.in_flight = 0
        self._running: dict[UUID, int] = {}  # task id → the run this process is running

    def busy(self) -> bool:
        return self.in_flight > BATCH_ABOVE_IN_FLIGHT

    # -- the job -----------------------------------------------------------------------------------

    async def run(self, raw_task_id: object) -> None:
        task_id = _parse_task_id(raw_task_id)
        if task_id is None:
            self.log.warning("doorbell.malformed", value=repr(raw_task_id)[:200])
            return
        self.in_flight += 1
        try:
            task = await self._claim(task_id)
            if task is None:
                return
            if self._running.get(task.id) == task.runs:
                # A claim adopted after a dropped connection (LifecycleStore.claim) can hand
                # back a run that a duplicate doorbell is already running here.
                self.log.info("doorbell.ignored", task_id=str(task_id), reason="running here")
                return
            self._running[task.id] = task.runs
            try:
                await self._run_claimed(task)
            finally:
                if self._running.get(task.id) == task.runs:
                    del self._running[task.id]
        finally:
            self.in_flight -= 1

    async def _claim(self, task_id: UUID) -> Task | None:
        claiming = asyncio.ensure_future(self.store.claim(task_id))
        try:
            task = await asyncio.shield(claiming)
        except asyncio.CancelledError:
            # Shutting down mid-claim: whatever the claim got is handed straight back.
            task, _ = await _finish_regardless(claiming)
            if task is not None:
                await _finish_regardless(self.store.release(task))
            raise
        except Exception as exc:
            # Postgres unreachable: the doorbell is spent, the task stays pending and the
            # reconciler rings it again.
            self.log.error("claim.failed", task_id=str(task_id), error=repr(exc))
            return None
        if task is None:
            await self._explain_miss(task_id)
        return task

    async def _explain_miss(self, task_id: UUID) -> None:
        try:
            miss = await self.store.explain_miss(task_id)
        except Exception as exc:
            self.log.warning("doorbell.ignored", task_id=str(task_id), reason=repr(exc))
            return
        self.log.info("doorbell.ignored", task_id=str(task_id), reason=miss.reason)

    async def _run_claimed(self, task: Task) -> None:
        structlog.contextvars.bind_contextvars(
            task_id=str(task.id),
            agent_id=task.agent_id,
            attempt=task.attempts,
            worker_id=self.worker_id,
        )
        started = time.monotonic()
        try:
            spec = self.agents.get(task.agent_id)
            try:
                unreadable = _unreadable(task)
                if spec is None:
                    outcome: Outcome = Failed(self._unknown_agent(task.agent_id), permanent=True)
                elif unreadable is not None:
                    outcome = Failed(unreadable, permanent=True)
                else:
                    outcome = await self._execute(task, spec)
            except asyncio.CancelledError:
                # Shutdown past its grace period: the run is handed back, attempt and all.
                await _finish_regardless(self._release(task))
                raise
            _, cancelled = await _finish_regardless(self._finish(task, outcome, started))
            if cancelled:
                raise asyncio.CancelledError
        finally:
            structlog.contextvars.unbind_contextvars("task_id", "agent_id", "attempt", "worker_id")

    def _unknown_agent(self, agent_id: str) -> str:
        served = ", ".join(sorted(self.agents)) or "none"
        return (
            f"unknown agent {agent_id!r}: no handler is registered for it on worker "
            f"{self.worker_id} (queue {self.settings.queue!r} serves: {served})"
        )

    # -- running the handler -----------------------------------------------------------------------

    async def _execute(self, task: Task, spec: AgentSpec) -> Outcome:
        ctx = TaskContext(task, log=self.log.bind(run=task.runs), load_subtasks=self._subtasks)
        timeout = spec.timeout if spec.timeout is not None else self.settings.task_timeout
        handler = asyncio.ensure_future(self._call(spec, ctx, timeout))
        tracked = self.heartbeat.track(task, handler)
        try:
            # Not `await handler`: cancelling this job must not wait on a handler that ignores
            # cancellation, and neither must losing the task.
            waiting: set[asyncio.Future[Any]] = {handler, tracked.lost_signal}
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            # Shutdown past its grace period: stop the handler, give it a moment to unwind, and
            # let the caller hand the task back.
            handler.cancel()
            await asyncio.wait({handler}, timeout=HANDLER_UNWIND_SECONDS)
            raise
        finally:
            self.heartbeat.untrack(tracked)
        if tracked.lost:
            self.log.warning("run.abandoned", reason="the task is no longer ours")
            return Lost()
        if handler.cancelled():
            return Failed("the handler was cancelled")
        return handler.result()

    async def _call(self, spec: AgentSpec, ctx: TaskContext, limit_seconds: float) -> Outcome:
        self.log.info("task.started", run=ctx.task.runs, step=ctx.step)
        try:
            async with asyncio.timeout(limit_seconds) as deadline:
                result = await spec.handler(ctx)
        except TimeoutError as exc:
            if deadline.expired():
                return Failed(f"timed out after {limit_seconds:g}s")
            return self._error(exc)
        except Retry as exc:
            reason = (
                f"retry requested: {redact_text(exc.reason)}" if exc.reason else "retry requested"
            )
            return Failed(reason, retry_after=exc.after)
        except PermanentError as exc:
            return Failed(_describe(exc), permanent=True)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # even a handler's SystemExit must not end the worker
            return self._error(exc)
        if isinstance(result, WaitForSubtasks):
            return Waiting(ctx.spawned)
        try:
            output = encode_json(result, what="the handler's return value")
        except InvalidInputError as exc:
            return Failed(str(exc), permanent=True)
        return Completed(output, ctx.spawned)

    def _error(self, exc: BaseException) -> Failed:
        self.log.warning("handler.raised", exc_info=exc)
        return Failed(_describe(exc))

    async def _subtasks(self, task_id: UUID) -> list[Task]:
        async with UnitOfWork(self.session_factory) as uow:
            return await uow.tasks.get_subtasks(task_id)

    # -- finishing ---------------------------------------------------------------------------------

    async def _finish(self, task: Task, outcome: Outcome, started: float) -> None:
        try:
            finish = await self._write_outcome(task, outcome, started)
        except Exception as exc:
            # Postgres stayed unreachable through the retries: the lease will run out and the
            # rescuer hands the task to another run (handlers run at least once).
            self.log.error("finish.failed", error=repr(exc), outcome=type(outcome).__name__)
            return
        await self._ring(finish.doorbells)

    async def _write_outcome(self, task: Task, outcome: Outcome, started: float) -> Finish:
        elapsed_ms = round((time.monotonic() - started) * 1000, 1)
        match outcome:
            case Lost():
                return Finish(False)
            case Completed(output_json, children):
                finish = await self.store.complete(task, output_json, children)
                self._report(finish, "task.completed", duration_ms=elapsed_ms)
                return finish
            case Waiting(children):
                doorbells = await self.store.wait_for_children(task, children)
                finish = Finish(doorbells is not None, doorbells or [])
                self._report(finish, "task.waiting", subtasks=len(children))
                return finish
            case Failed(error, permanent, retry_after):
                error = error[:MAX_ERROR_CHARS]
                return await self._fail_or_retry(task, error, permanent, retry_after)

    async def _fail_or_retry(
        self, task: Task, error: str, permanent: bool, retry_after: float | None
    ) -> Finish:
        max_attempts = task.max_attempts or self.settings.max_attempts
        if permanent or task.attempts >= max_attempts:
            finish = await self.store.fail(task, error)
            self._report(finish, "task.failed", error=error, attempts=task.attempts)
            return finish
        delay = retry_after
        if delay is None:
            delay = retry_delay(
                task.attempts,
                base_seconds=self.settings.retry_base_seconds,
                max_seconds=self.settings.retry_max_seconds,
            )
        landed = await self.store.retry_later(task, error, delay_seconds=delay)
        finish = Finish(landed)
        self._report(finish, "task.retrying", error=error, retry_in_seconds=round(delay, 3))
        return finish

    def _report(self, finish: Finish, event: str, **fields: Any) -> None:
        if finish.landed:
            self.log.info(event, **fields)
        else:
            self.log.warning(
                "run.discarded", would_have_been=event, reason="the task is no longer ours"
            )

    async def _release(self, task: Task) -> None:
        try:
            released = await self.store.release(task)
        except Exception as exc:
            self.log.error("task.release_failed", error=repr(exc))
            return
        if released:
            self.log.info("task.released", reason="worker shutting down")

    async def _ring(self, doorbells: list[Doorbell]) -> None:
        try:
            await self.dispatcher.ring(doorbells)
        except Exception as exc:
            self.log.warning("dispatch.failed", error=repr(exc), doorbells=len(doorbells))


def _parse_task_id(raw: object) -> UUID | None:
    if isinstance(raw, UUID):
        return raw
    if not isinstance(raw, str) or len(raw) > 64:
        return None
    try:
        return uuid.UUID(raw)
    except ValueError:
        return None


def _unreadable(task: Task) -> str | None:
    """Why the handler cannot be given this task: a JSON field Python cannot load (a row written
    with plain SQL, see `UnreadableJson`)."""
    for what, value in (("input", task.input), ("metadata", task.metadata)):
        if isinstance(value, UnreadableJson):
            return f"the task's {what} cannot be loaded in Python: {value.reason}"
    return None


def _describe(exc: BaseException) -> str:
    """What a handler's exception stored in `tasks.error` says, secrets redacted."""
    text = redact_text(str(exc))
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


async def _finish_regardless(aw: Awaitable[T]) -> tuple[T | None, bool]:
    """Run `aw` to the end even if we are cancelled meanwhile (a write half-done is worse than a
    late shutdown). Returns its result (None if it raised) and whether we were cancelled."""
    future = asyncio.ensure_future(aw)
    cancelled = False
    while True:
        try:
            return await asyncio.shield(future), cancelled
        except asyncio.CancelledError:
            if future.done():
                return None, True
            cancelled = True
        except Exception:
            return None, cancelled
