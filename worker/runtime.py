"""One doorbell, one run: claim → run the handler → finish. The body of the arq job `run_task`.

Each step is its own short statement or transaction; no transaction is open while a handler
runs. Whatever happens (malformed doorbell, missing task, unknown agent, a handler that crashes,
times out or returns garbage), the job returns normally and the worker keeps going. The only
exception that leaves `run` is cancellation on shutdown, after the task was handed back.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar
from uuid import UUID

import structlog

from domain.entities import Doorbell, Task
from domain.exceptions import InvalidInputError
from domain.interfaces import Finish, FlowClaim
from domain.payload import UnreadableJson, encode_json, storable_text
from persistence.lifecycle import Lifecycle
from worker import metrics, observe  # observability
from worker.agents import (
    MAX_RETRY_AFTER_SECONDS,
    AgentSpec,
    Limits,
    PermanentError,
    RateLimited,
    Retry,
    Signal,
    TaskContext,
    WaitFor,
    WaitForSubtasks,
)
from worker.config import Settings
from worker.dispatch import Dispatcher, parse_flow_argument
from worker.heartbeat import Heartbeat
from worker.redaction import redact_text
from worker.watch import Watched

T = TypeVar("T")

# Above this many runs in flight, claims and root completions are grouped into batch statements
# (`persistence.batching`, 2 ms window). Measured with bench/run.py: batching from two runs on
# cut PostgreSQL's CPU per echo task from 0.57 to ~0.07 ms and lifted throughput ~25 %, while a
# lone run (light load) still goes straight through with no wait.
BATCH_ABOVE_IN_FLIGHT = 1
MAX_ERROR_CHARS = 4000
# How long a cancelled handler may take to unwind (past its timeout, or at shutdown) before its
# run stops waiting for it: a handler that ignores cancellation is abandoned then, its slot freed.
HANDLER_UNWIND_SECONDS = 5.0
# Claims this worker may have waiting for Postgres's answer at once. Answered in milliseconds,
# they never come near it; when Postgres hangs, the worker stops taking doorbells here instead
# of filling every slot (and marking every queued doorbell in progress) behind it.
CLAIM_WINDOW = 20
# A task handed back because this worker lacks its agent is due again after this long, so that
# a worker that has the agent (a rolling deploy) picks it up rather than this one again.
HAND_BACK_SECONDS = 1.0


# -- what a handler run came to ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Completed:
    output_json: str
    children: list[Task] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Waiting:
    children: list[Task]
    signals: tuple[str, ...] = ()
    deadline_seconds: float | None = None  # a timer, or the signals' timeout
    on_timeout: str | None = None


@dataclass(frozen=True, slots=True)
class Failed:
    error: str
    permanent: bool = False
    retry_after: float | None = None  # set by Retry(after=…)
    exc: BaseException | None = None  # what the handler raised: its traceback goes in the log


@dataclass(frozen=True, slots=True)
class HandedBack:
    """Another worker should run it: pending again, the attempt not spent."""

    reason: str


@dataclass(frozen=True, slots=True)
class Throttled:
    """The handler met its provider's rate limit (`RateLimited`): pending again after `after`
    seconds, the attempt not spent, its key paused as long."""

    after: float
    reason: str


@dataclass(frozen=True, slots=True)
class Lost:
    """The task is no longer ours (cancelled or rescued): write nothing."""


Outcome = Completed | Waiting | Failed | HandedBack | Throttled | Lost


# How long a flow claim's "no room" spares held tasks' own doorbells theirs
# (`WorkerRuntime._spare_flow_claim`).
FULL_FOR_SECONDS = 0.5


class WorkerRuntime:
    def __init__(
        self,
        *,
        settings: Settings,
        worker_id: str,
        lifecycle: Lifecycle,
        dispatcher: Dispatcher,
        agents: Mapping[str, AgentSpec],
        watched: Watched | None = None,
    ) -> None:
        self.settings = settings
        self.watched = watched  # tasks someone follows (worker.watch): their changes published
        self.worker_id = worker_id
        self.lifecycle = lifecycle
        self.dispatcher = dispatcher
        self.agents = dict(agents)
        self.log = structlog.get_logger("tasklane.worker")
        self.heartbeat = Heartbeat(lifecycle, interval=settings.heartbeat_seconds, log=self.log)
        self.in_flight = 0
        self.unanswered_claims = 0
        self.starting: set[str] = set()  # doorbells started whose job has not begun (app.py)
        self._running: dict[UUID, int] = {}  # task id → the run this process is running
        # What runs of limited agents reported with `ctx.consume`, by task id.
        self._consumed: dict[UUID, dict[str, float]] = {}
        # Limited agents with a flow claim in flight here, and those a flow claim here found
        # with no room, and when (loop time): see `_spare_flow_claim`.
        self._flow_claiming: Counter[tuple[str, str]] = Counter()
        self._found_full: dict[tuple[str, str], float] = {}
        # Handlers that ignored cancellation past their timeout, left running (health shows it).
        self.abandoned: set[asyncio.Future[Any]] = set()
        self.limits = Limits(
            max_input_bytes=settings.max_input_bytes, max_children=settings.max_children
        )

    def busy(self) -> bool:
        return self.in_flight > BATCH_ABOVE_IN_FLIGHT

    def doorbells_wanted(self, free_slots: int) -> int:
        """How many doorbells to start now: the free slots, within the claim window."""
        waiting = self.unanswered_claims + len(self.starting)
        return max(0, min(free_slots, CLAIM_WINDOW - waiting))

    # -- the job -----------------------------------------------------------------------------------

    async def run(self, raw_task_id: object) -> None:
        """A doorbell: claim the task, run it, write how it ended. A flow doorbell (for a
        limited agent, see worker.dispatch) starts whichever of its tasks' turn it is."""
        flow = parse_flow_argument(raw_task_id)
        task_id = None if flow is not None else _parse_task_id(raw_task_id)
        if flow is None and task_id is None:
            self.log.warning("doorbell.malformed", value=repr(raw_task_id)[:200])
            return
        self.in_flight += 1
        try:
            observe.claiming()  # observability
            if flow is not None:
                await self._run_flow(*flow)
                return
            assert task_id is not None
            task = await self._claim(task_id)
            if isinstance(task, tuple):
                if not self._spare_flow_claim(*task):
                    await self._run_flow(*task)
            elif task is not None:
                await self._run_once(task)
        finally:
            self.in_flight -= 1

    # -- flow control ------------------------------------------------------------------------------

    async def _run_flow(self, queue: str, agent_id: str) -> None:
        """A limited agent's next start, if its limits allow one; when it ends, its slot is
        offered at once (a flow doorbell) rather than at the next reconcile tick."""
        if queue != self.settings.queue:
            self.log.info("doorbell.ignored", reason=f"flow doorbell of queue {queue!r}")
            return
        flow = (queue, agent_id)
        self._flow_claiming[flow] += 1
        try:
            claim = await self.lifecycle.claim_limited(queue, agent_id)
        except Exception as exc:
            # The sweeper rings the agent's flow again at its next tick.
            self.log.error("claim.failed", agent_id=agent_id, error=repr(exc))
            return
        finally:
            self._flow_claiming[flow] -= 1
        if claim.retry_at is not None:
            await self._ring_flow(queue, agent_id, at=claim.retry_at)
        if claim.task is None:
            self.log.debug("flow.held", agent_id=agent_id, reason=claim.held)
            self._found_full[flow] = asyncio.get_running_loop().time()
            return
        self._found_full.pop(flow, None)
        if claim.more:
            await self._ring_flow(queue, agent_id)
        await self._run_once(claim.task, claim)

    def _spare_flow_claim(self, queue: str, agent_id: str) -> bool:
        """Whether a held task's own doorbell (its claim missed: its agent is limited) may skip
        the flow claim it would make: yes while one for that agent is in flight here, or one
        here found it without room less than FULL_FOR_SECONDS ago and none of its runs ended
        here since. Every freed slot is offered by a flow doorbell of its own, and the sweeper
        rings limited agents with room every tick: no start is lost, and a burst of held tasks
        no longer queues a transaction each on the agent's `flow_limits` lock, holding the
        worker's pooled connections while it waits."""
        flow = (queue, agent_id)
        if self._flow_claiming[flow] > 0:
            return True
        found = self._found_full.get(flow)
        return found is not None and asyncio.get_running_loop().time() - found < FULL_FOR_SECONDS

    async def _settle_flow(self, claim: FlowClaim, used: Mapping[str, float]) -> None:
        """After a limited run: what it reported using (`ctx.consume`), then its slot offered."""
        task = claim.task
        assert task is not None
        self._found_full.pop((task.queue, task.agent_id), None)
        spec = self.agents.get(task.agent_id)
        units = spec.flow.units if spec is not None and spec.flow is not None else "tasks"
        if units in used:
            try:
                await self.lifecycle.consumed(claim, task.queue, task.agent_id, used[units])
            except Exception as exc:
                self.log.warning("flow.consume_failed", error=repr(exc))
        await self._ring_flow(task.queue, task.agent_id)

    async def _ring_flow(self, queue: str, agent_id: str, *, at: Any = None) -> None:
        try:
            await self.dispatcher.ring_flow(queue, agent_id, at=at)
        except Exception as exc:
            # The sweeper rings limited agents with room every tick.
            self.log.warning("dispatch.failed", error=repr(exc), flow=agent_id)

    async def run_claimed(self, task: Task) -> None:
        """A task this worker claimed straight from Postgres (while Redis is away): run it and
        write how it ended."""
        self.in_flight += 1
        try:
            await self._run_once(task)
        finally:
            self.in_flight -= 1

    async def claim_due(self, limit: int) -> list[Task]:
        """Claim up to `limit` due tasks of the agents this worker serves, from Postgres."""
        return await self.lifecycle.claim_due(sorted(self.agents), limit=limit)

    async def _run_once(self, task: Task, flow: FlowClaim | None = None) -> None:
        if self._running.get(task.id) == task.runs:
            # A claim adopted after a dropped connection (Lifecycle.claim) can hand back a run
            # that a duplicate doorbell is already running here.
            self.log.info("doorbell.ignored", task_id=str(task.id), reason="running here")
            return
        self._running[task.id] = task.runs
        try:
            await self._run_claimed(task)
        finally:
            if self._running.get(task.id) == task.runs:
                del self._running[task.id]
            used = self._consumed.pop(task.id, {})
            if flow is not None:
                await self._settle_flow(flow, used)

    async def _claim(self, task_id: UUID) -> Task | tuple[str, str] | None:
        """The task claimed; or, for a due task of a limited agent, (queue, agent): a flow
        claim decides what starts; or None."""
        self.unanswered_claims += 1
        claiming = asyncio.ensure_future(self.lifecycle.claim(task_id))
        claiming.add_done_callback(self._claim_answered)
        try:
            task = await asyncio.shield(claiming)
        except asyncio.CancelledError:
            # Shutting down mid-claim: whatever the claim got is handed straight back.
            task, _ = await _finish_regardless(claiming)
            if task is not None:
                await _finish_regardless(self.lifecycle.release(task))
            raise
        except Exception as exc:
            # Postgres unreachable: the doorbell is spent, the task stays pending and the
            # reconciler rings it again.
            self.log.error("claim.failed", task_id=str(task_id), error=repr(exc))
            metrics.backend_error("postgres", "claim")  # observability
            return None
        if task is None:
            return await self._explain_miss(task_id)
        return task

    def _claim_answered(self, _: asyncio.Future[Task | None]) -> None:
        self.unanswered_claims -= 1

    async def _explain_miss(self, task_id: UUID) -> tuple[str, str] | None:
        try:
            miss = await self.lifecycle.explain_miss(task_id)
        except Exception as exc:
            self.log.warning("doorbell.ignored", task_id=str(task_id), reason=repr(exc))
            return None
        if miss.flow is not None:
            return miss.flow
        self.log.info("doorbell.ignored", task_id=str(task_id), reason=miss.reason)
        return None

    async def _run_claimed(self, task: Task) -> None:
        structlog.contextvars.bind_contextvars(
            task_id=str(task.id),
            agent_id=task.agent_id,
            attempt=task.attempts,
            worker_id=self.worker_id,
        )
        observe.run_started(task)  # observability
        started = time.monotonic()
        await self._publish(task, {"event": "running", "attempt": task.attempts, "run": task.runs})
        try:
            observe.step("handler")  # observability
            spec = self.agents.get(task.agent_id)
            try:
                unreadable = _unreadable(task)
                if spec is None:
                    outcome: Outcome = await self._without_agent(task)
                elif task.woke_by == "timeout_fail":
                    names = ", ".join(task.wait_signals or ())
                    outcome = Failed(f"timed out waiting for signal {names}", permanent=True)
                elif unreadable is not None:
                    outcome = Failed(unreadable, permanent=True)
                else:
                    outcome = await self._execute(task, spec)
            except asyncio.CancelledError:
                # Shutdown past its grace period: the run is handed back, attempt and all.
                await _finish_regardless(self._release(task))
                raise
            observe.step("finish")  # observability
            _, cancelled = await _finish_regardless(self._finish(task, outcome, started))
            await self._publish(task, {"event": "ended", "outcome": type(outcome).__name__})
            if cancelled:
                raise asyncio.CancelledError
        finally:
            observe.run_ended()  # observability
            structlog.contextvars.unbind_contextvars("task_id", "agent_id", "attempt", "worker_id")

    async def _without_agent(self, task: Task) -> Outcome:
        """A task for an agent this worker does not serve. During a rolling deploy another live
        worker of its queue may: the task goes back, its attempt unspent, for that one to run.
        Only when no live worker of the queue serves it does it fail, naming the agent."""
        if await self.lifecycle.agent_served_elsewhere(task.agent_id, task.queue):
            return HandedBack(
                f"agent {task.agent_id!r} is not served by worker {self.worker_id}; "
                "another live worker of the queue serves it"
            )
        served = ", ".join(sorted(self.agents)) or "none"
        return Failed(
            f"unknown agent {task.agent_id!r}: no live worker of queue {task.queue!r} serves it "
            f"(worker {self.worker_id} serves: {served})",
            permanent=True,
        )

    # -- running the handler -----------------------------------------------------------------------

    async def _execute(self, task: Task, spec: AgentSpec) -> Outcome:
        ctx = TaskContext(
            task,
            log=self.log.bind(run=task.runs),
            load_subtasks=self._subtasks,
            limits=self.limits,
            signals=await self._signals_of(task),
            report_progress=lambda document: self._progress(task, document),
        )
        if spec.flow is not None:
            self._consumed[task.id] = ctx.consumed
        timeout = spec.timeout if spec.timeout is not None else self.settings.task_timeout
        handler = asyncio.ensure_future(self._call(spec, ctx, timeout))
        tracked = self.heartbeat.track(task, handler)
        try:
            # Not `await handler`: cancelling this job must not wait on a handler that ignores
            # cancellation, and neither must losing the task or its timeout.
            waiting: set[asyncio.Future[Any]] = {handler, tracked.lost_signal}
            await asyncio.wait(
                waiting,
                timeout=timeout + HANDLER_UNWIND_SECONDS,
                return_when=asyncio.FIRST_COMPLETED,
            )
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
        if ctx.pending_progress is not None:  # the last progress always lands
            await self._progress(task, ctx.pending_progress)
        if not handler.done():
            return self._abandon(handler, timeout)
        if handler.cancelled():
            return Failed("the handler was cancelled")
        return handler.result()

    def _abandon(self, handler: asyncio.Future[Any], timeout: float) -> Failed:
        """The handler ran past its timeout and did not unwind when cancelled: leave it behind
        (it cannot be killed, but it holds no claim: nothing it writes can land), spend the
        attempt, free the slot."""
        self.abandoned.add(handler)
        handler.add_done_callback(self.abandoned.discard)
        self.log.error(
            "handler.abandoned",
            timeout_seconds=timeout,
            waited_seconds=timeout + HANDLER_UNWIND_SECONDS,
            abandoned_in_this_worker=len(self.abandoned),
        )
        return Failed(
            f"timed out after {timeout:g}s; the handler ignored its cancellation for "
            f"{HANDLER_UNWIND_SECONDS:g}s more and was abandoned on worker {self.worker_id}"
        )

    async def _call(self, spec: AgentSpec, ctx: TaskContext, limit_seconds: float) -> Outcome:
        self.log.debug("task.started", run=ctx.task.runs, step=ctx.step)
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
        except RateLimited as exc:
            reason = redact_text(exc.reason) if exc.reason else "rate limited by its provider"
            return Throttled(exc.after, f"rate limited: {reason}")
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # even a handler's SystemExit must not end the worker
            return self._error(exc)
        if isinstance(result, WaitFor):
            return Waiting(ctx.spawned, result.signals, result.deadline_seconds, result.on_timeout)
        if isinstance(result, WaitForSubtasks):
            if not ctx.spawned:
                return Failed(
                    "wait_for_subtasks() with no subtask spawned in this step: there is nothing "
                    "to wait for (it would resume at once, again and again)",
                    permanent=True,
                )
            return Waiting(ctx.spawned)
        try:
            output = encode_json(
                result,
                what="the handler's return value",
                max_bytes=self.settings.max_output_bytes,
            )
        except InvalidInputError as exc:
            return Failed(f"{exc} (TASKLANE_MAX_OUTPUT_BYTES)", permanent=True)
        return Completed(output, ctx.spawned)

    def _error(self, exc: BaseException) -> Failed:
        return Failed(_describe(exc), exc=exc)

    async def _signals_of(self, task: Task) -> dict[str, Signal]:
        """The signals a step resumed by its signal wait reads (none for any other run)."""
        if not task.wait_signals or task.woke_by not in ("signal", "timeout"):
            return {}
        rows = await self.lifecycle.take_signals(task)
        return {
            str(r["name"]): Signal(
                str(r["name"]),
                r["payload"],
                str(r["sent_by"]),
                r["sent_at"],  # type: ignore[arg-type]
            )
            for r in rows
        }

    async def _progress(self, task: Task, document: str) -> None:
        try:
            await self.lifecycle.progress(task, document)
        except Exception as exc:  # progress is a courtesy: never the run's failure
            self.log.warning("progress.failed", error=repr(exc))
            return
        await self._publish(task, {"event": "progress", "progress": json.loads(document)})

    async def _publish(self, task: Task, event: dict[str, Any]) -> None:
        """Tell a task's followers (worker.watch); nothing when nobody follows it."""
        if self.watched is None or task.id not in self.watched:
            return
        try:
            await self.watched.publish(task.id, {"task_id": str(task.id), **event})
        except Exception as exc:  # followers re-read Postgres: a lost event is only late
            self.log.debug("watch.publish_failed", error=repr(exc))

    async def _subtasks(self, task_id: UUID) -> list[Task]:
        return await self.lifecycle.subtasks(task_id)

    # -- finishing ---------------------------------------------------------------------------------

    async def _finish(self, task: Task, outcome: Outcome, started: float) -> None:
        try:
            finish = await self._write_outcome(task, outcome, started)
        except InvalidInputError as exc:
            # Postgres refused what the run came to (a value jsonb cannot hold, a subtask a
            # constraint refuses): trying again cannot help, and leaving the task running would
            # run the handler again on lease expiry and lose the reason. Fail it with the reason.
            finish = await self._fail_refused(task, outcome, exc)
        except Exception as exc:
            # Postgres stayed unreachable through the retries: the lease will run out and the
            # rescuer hands the task to another run (handlers run at least once).
            self.log.error("finish.failed", error=repr(exc), outcome=type(outcome).__name__)
            metrics.backend_error("postgres", "finish")  # observability
            return
        await self._ring(finish.doorbells)

    async def _fail_refused(self, task: Task, outcome: Outcome, exc: Exception) -> Finish:
        what = type(outcome).__name__.lower()
        error = storable_text(
            f"the run's result ({what}) could not be stored: {_describe(exc)}",
            max_chars=MAX_ERROR_CHARS,
        )
        try:
            finish = await self.lifecycle.fail(task, error)
        except Exception as again:
            self.log.error("finish.failed", error=repr(again), outcome=what, refused=repr(exc))
            metrics.backend_error("postgres", "finish")  # observability
            return Finish(False)
        self._report(finish, "task.failed", error=error, attempts=task.attempts)
        return finish

    async def _write_outcome(self, task: Task, outcome: Outcome, started: float) -> Finish:
        elapsed_ms = round((time.monotonic() - started) * 1000, 1)
        match outcome:
            case Lost():
                return Finish(False)
            case Completed(output_json, children):
                finish = await self.lifecycle.complete(task, output_json, children)
                self._report(finish, "task.completed", duration_ms=elapsed_ms)
                return finish
            case Waiting(children, signals, deadline_seconds, on_timeout):
                finish = await self.lifecycle.wait(
                    task,
                    children,
                    signals=signals,
                    deadline_seconds=deadline_seconds,
                    on_timeout=on_timeout,
                )
                self._report(finish, "task.waiting", subtasks=len(children), duration_ms=elapsed_ms)
                return finish
            case Failed(error, permanent, retry_after, exc):
                error = storable_text(error, max_chars=MAX_ERROR_CHARS)
                return await self._fail_or_retry(
                    task, error, permanent, retry_after, exc, duration_ms=elapsed_ms
                )
            case Throttled(after, reason):
                landed = await self.lifecycle.rate_limited(task, delay_seconds=after, reason=reason)
                finish = Finish(landed)
                self._report(
                    finish, "task.rate_limited", paused_seconds=after, duration_ms=elapsed_ms
                )
                return finish
            case HandedBack(reason):
                landed = await self.lifecycle.release(
                    task, delay_seconds=HAND_BACK_SECONDS, reason=reason
                )
                finish = Finish(landed)
                self._report(finish, "task.handed_back", reason=reason, duration_ms=elapsed_ms)
                return finish

    async def _fail_or_retry(
        self,
        task: Task,
        error: str,
        permanent: bool,
        retry_after: float | None,
        exc: BaseException | None,
        *,
        duration_ms: float,
    ) -> Finish:
        delay = task.retry_delay_after_failure(
            permanent=permanent,
            retry_after=retry_after,
            default_max_attempts=self.settings.max_attempts,
            backoff=self.settings.backoff,
        )
        if delay is None:
            finish = await self.lifecycle.fail(task, error)
            self._report(
                finish,
                "task.failed",
                error=error,
                attempts=task.attempts,
                duration_ms=duration_ms,
                exc_info=exc,
            )
            return finish
        delay = min(delay, MAX_RETRY_AFTER_SECONDS)
        landed = await self.lifecycle.retry_later(task, error, delay_seconds=delay)
        finish = Finish(landed)
        self._report(
            finish,
            "task.retrying",
            error=error,
            retry_in_seconds=round(delay, 3),
            duration_ms=duration_ms,
            exc_info=exc,
        )
        return finish

    def _report(self, finish: Finish, event: str, **fields: Any) -> None:
        """The one INFO line of a run: how it ended."""
        if fields.get("exc_info") is None:
            fields.pop("exc_info", None)
        observe.outcome(event, finish.landed, fields.get("error"))  # observability
        if finish.landed:
            self.log.info(event, **fields)
        else:
            self.log.warning(
                "run.discarded", would_have_been=event, reason="the task is no longer ours"
            )

    async def _release(self, task: Task) -> None:
        try:
            released = await self.lifecycle.release(task)
        except Exception as exc:
            self.log.error("task.release_failed", error=repr(exc))
            metrics.backend_error("postgres", "release")  # observability
            return
        observe.outcome("task.released", released)  # observability
        if released:
            self.log.info("task.released", reason="worker shutting down")

    async def _ring(self, doorbells: list[Doorbell]) -> None:
        try:
            await self.dispatcher.ring(doorbells)
        except Exception as exc:
            self.log.warning("dispatch.failed", error=repr(exc), doorbells=len(doorbells))
            metrics.backend_error("redis", "ring")  # observability


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
    """`Type: message`, secrets redacted, whatever the exception does: one whose str() raises
    is described by what it raised instead."""
    name = type(exc).__name__
    try:
        text = redact_text(str(exc))
    except Exception as broken:
        return f"{name} (its message could not be read: str() raised {type(broken).__name__})"
    return f"{name}: {text}" if text else name


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
