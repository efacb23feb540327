"""The worker's lifecycle steps on its pool: a unit of work per step, `TaskRepository` inside.

This is a thin policy around the repository, which owns every statement and transaction:
- each step opens a `PooledUnitOfWork` and calls one repository step in it;
- deadlocks, serialization failures and dropped connections are retried with a jittered backoff
  (every lifecycle statement is fenced by status and run, so running one twice never applies it
  twice; the repository recognises its own write whose answer was lost). A run's final write is
  retried for as long as its lease lasts: past that the task is rescued and the write would be
  fenced off anyway;
- claims and root completions of concurrent jobs are grouped into one statement when the worker
  is busy (`Batcher`); a batch that fails is retried item by item, so one bad row never fails
  its neighbours;
- a claim whose connection died around its commit may have claimed: the next claim of those
  tasks adopts the ones already running under this worker.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar
from uuid import UUID, uuid4

import asyncpg

from domain.entities import Doorbell, Task
from domain.interfaces import Finish, FlowClaim, Miss, Rescued
from domain.policies import Backoff
from persistence import batching
from persistence.batching import Batcher
from persistence.errors import CONNECTION_ERRORS, RETRYABLE_SQLSTATES
from persistence.session import PooledUnitOfWork

log = logging.getLogger(__name__)

T = TypeVar("T")
K = TypeVar("K")

# A row a reconciler step keeps failing on is logged again after this long.
ROW_FAILURE_LOG_SECONDS = 60.0

_ATTEMPTS = 4
# How long closing the pool may wait for connections still in use before it drops them.
POOL_CLOSE_SECONDS = 5.0


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, asyncpg.PostgresError) and exc.sqlstate in RETRYABLE_SQLSTATES:
        return True
    return isinstance(exc, CONNECTION_ERRORS)


@dataclass(frozen=True, slots=True)
class LifecycleConfig:
    worker_id: str
    lease_seconds: float
    default_max_attempts: int
    retry_base_seconds: float
    retry_max_seconds: float
    redispatch_seconds: float
    queue: str | None = None  # the only queue whose tasks this worker claims (None: any)

    @property
    def backoff(self) -> Backoff:
        return Backoff(self.retry_base_seconds, self.retry_max_seconds)


Step = Callable[[PooledUnitOfWork], Awaitable[T]]


class Lifecycle:
    def __init__(
        self,
        pool: asyncpg.Pool,
        config: LifecycleConfig,
        *,
        busy: Callable[[], bool] = lambda: False,
        batch_window: float = batching.WINDOW_SECONDS,
        batch_max: int = batching.MAX_SIZE,
    ) -> None:
        self.pool = pool
        self.config = config
        self._claims: Batcher[UUID, Task | None] = Batcher(
            "claim", self._claim_batch, busy=busy, window=batch_window, max_size=batch_max
        )
        self._completions: Batcher[tuple[Task, str], bool] = Batcher(
            "complete", self._complete_batch, busy=busy, window=batch_window, max_size=batch_max
        )
        self._child_completions: Batcher[tuple[Task, str], Finish] = Batcher(
            "complete-children",
            self._complete_children_batch,
            busy=busy,
            window=batch_window,
            max_size=batch_max,
        )
        self._finish_patience = config.lease_seconds
        self._row_failures: dict[tuple[str, object], float] = {}
        # Tasks whose claim statements got no answer (they may have committed all the same),
        # with those statements' claim tokens.
        self._unsure_claims: dict[UUID, set[UUID]] = {}

    async def close(self) -> None:
        await self._claims.drain()
        await self._completions.drain()
        await self._child_completions.drain()
        # asyncpg's close waits for every connection to come back: one that never does (its
        # holder lost to a dropped connection or a cancellation) must not hang the shutdown.
        try:
            await asyncio.wait_for(self.pool.close(), timeout=POOL_CLOSE_SECONDS)
        except TimeoutError:
            log.warning("pool close timed out after %ss; terminating", POOL_CLOSE_SECONDS)
            self.pool.terminate()

    # -- plumbing -------------------------------------------------------------------------------

    async def run(
        self,
        name: str,
        step: Step[T],
        *,
        transaction: bool = False,
        patience: float | None = None,
    ) -> T:
        """Run `step` in a unit of work on a pooled connection, retrying transient failures
        with a jittered backoff: `_ATTEMPTS` tries, or for `patience` seconds."""
        deadline = None if patience is None else asyncio.get_running_loop().time() + patience
        attempt = 0
        while True:
            attempt += 1
            answered = False
            try:
                async with PooledUnitOfWork(self.pool, transaction=transaction) as uow:
                    result = await step(uow)
                    if transaction:
                        await uow.commit()
                    answered = True
            except Exception as exc:
                if answered:
                    # The answer (and the commit) arrived; only handing the connection back failed,
                    # the server having dropped it just then (the pool opens another). Run again,
                    # the step would find its own write and miss it.
                    log.warning("%s: connection lost after its answer (%r)", name, exc)
                    return result
                delay = min(2.0, 0.05 * 2**attempt) * (0.5 + random.random())
                out_of_time = (
                    attempt >= _ATTEMPTS
                    if deadline is None
                    else asyncio.get_running_loop().time() + delay > deadline
                )
                if out_of_time or not _retryable(exc):
                    raise
                log.warning("%s failed (%r); retry %d in %.2fs", name, exc, attempt, delay)
                await asyncio.sleep(delay)
            else:
                return result

    # -- claim and heartbeat --------------------------------------------------------------------

    async def claim(self, task_id: UUID) -> Task | None:
        """pending → running for this worker, or None (a duplicate or stale doorbell)."""
        return await self._claims.submit(task_id)

    async def _claim_batch(self, ids: list[UUID]) -> list[Task | None]:
        cfg = self.config
        wanted = sorted(set(ids))

        async def step(uow: PooledUnitOfWork) -> list[Task]:
            # A claim whose connection died around its commit may have claimed: retried, it
            # would miss its own claim, and the task would sit running until its lease ran out,
            # an attempt spent and its handler never run. Take up what it got first.
            unsure = [
                (task_id, token)
                for task_id in wanted
                for token in self._unsure_claims.get(task_id, ())
            ]
            token = uuid4()
            try:
                adopted = await uow.tasks.adopt(unsure, lease_seconds=cfg.lease_seconds)
                claimed = await uow.tasks.claim(
                    wanted,
                    worker_id=cfg.worker_id,
                    lease_seconds=cfg.lease_seconds,
                    default_max_attempts=cfg.default_max_attempts,
                    queue=cfg.queue,
                    claim_token=token,
                )
            except BaseException:
                for task_id in wanted:
                    self._unsure_claims.setdefault(task_id, set()).add(token)
                raise
            for task_id in wanted:
                self._unsure_claims.pop(task_id, None)
            if adopted:
                log.warning("adopted %d claim(s) that committed without an answer", len(adopted))
            return adopted + claimed

        claimed = {task.id: task for task in await self.run("claim", step)}
        # Duplicate doorbells for one task inside a batch: only the first gets the claim.
        return [claimed.pop(task_id, None) for task_id in ids]

    async def claim_due(self, agents: Sequence[str], *, limit: int) -> list[Task]:
        """Claim up to `limit` due tasks of these agents straight from Postgres, oldest due
        first: how a worker keeps working while Redis (the doorbells) is away."""
        cfg = self.config

        async def step(uow: PooledUnitOfWork) -> list[Task]:
            due = await uow.tasks.find_pending_for_agent(
                agents, limit=limit, queue=cfg.queue, skip_locked=True
            )
            return await uow.tasks.claim(
                [task.id for task in due],
                worker_id=cfg.worker_id,
                lease_seconds=cfg.lease_seconds,
                default_max_attempts=cfg.default_max_attempts,
                queue=cfg.queue,
            )

        if limit <= 0 or not agents:
            return []
        claimed = await self.run("claim-due", step, transaction=True)
        if cfg.queue is None:
            return claimed
        # Limited agents' tasks start only through flow claims, their limits held.
        for agent_id in agents:
            while len(claimed) < limit:
                flow = await self.claim_limited(cfg.queue, agent_id)
                if flow.task is None:
                    break
                claimed.append(flow.task)
                if not flow.more:
                    break
        return claimed

    async def claim_limited(self, queue: str, agent_id: str) -> FlowClaim:
        """A limited agent's next start, if its limits allow one (flow control)."""
        cfg = self.config
        return await self.run(
            "claim-limited",
            lambda uow: uow.tasks.claim_limited(
                queue=queue,
                agent_id=agent_id,
                worker_id=cfg.worker_id,
                lease_seconds=cfg.lease_seconds,
                default_max_attempts=cfg.default_max_attempts,
            ),
        )

    async def consumed(self, claim: FlowClaim, queue: str, agent_id: str, used: float) -> None:
        """A run used `used` units against its claim's estimate (`ctx.consume`)."""
        extra = used - claim.estimate
        step = None if claim.unit_seconds is None else extra * claim.unit_seconds
        key_step = None if claim.key_unit_seconds is None else extra * claim.key_unit_seconds
        if step is None and key_step is None:
            return
        await self.run(
            "consumed",
            lambda uow: uow.tasks.consumed(
                queue=queue, agent_id=agent_id, key=claim.key, step=step, key_step=key_step
            ),
        )

    async def rate_limited(self, task: Task, *, delay_seconds: float, reason: str) -> bool:
        return await self._finish(
            "rate-limited",
            lambda uow: uow.tasks.rate_limited(
                task, delay_seconds=delay_seconds, reason=reason, paused_by=self.config.worker_id
            ),
        )

    async def expire_pauses(self, queue: str) -> int:
        return await self.run("expire-pauses", lambda uow: uow.flow.expire_pauses(queue))

    async def ready_limited(self, queue: str) -> list[str]:
        return await self.run("flow-ready", lambda uow: uow.flow.ready(queue))

    async def explain_miss(self, task_id: UUID) -> Miss:
        return await self.run(
            "explain", lambda uow: uow.tasks.explain_miss(task_id, queue=self.config.queue)
        )

    async def heartbeat(self, held: Mapping[UUID, int]) -> set[UUID]:
        """Extend the leases of the runs in `held`; return the task ids that are no longer ours."""
        return await self.run(
            "heartbeat",
            lambda uow: uow.tasks.heartbeat(held, lease_seconds=self.config.lease_seconds),
        )

    async def subtasks(self, task_id: UUID) -> list[Task]:
        return await self.run("subtasks", lambda uow: uow.tasks.get_subtasks(task_id))

    # -- finish ---------------------------------------------------------------------------------

    async def complete(self, task: Task, output_json: str, children: Sequence[Task] = ()) -> Finish:
        """running → completed (with any fire-and-forget subtasks). Roots and subtasks that
        spawned nothing take the batched paths (a fan-out's children finish in batches)."""
        if not children and task.parent_task_id is None:
            return Finish(await self._completions.submit((task, output_json)))
        if not children:
            return await self._child_completions.submit((task, output_json))
        return await self._finish(
            "complete",
            lambda uow: uow.tasks.complete(
                task, output_json, children, dispatch_delay=self.config.redispatch_seconds
            ),
        )

    async def _complete_batch(self, items: list[tuple[Task, str]]) -> list[bool]:
        landed = await self._finish("complete", lambda uow: uow.tasks.complete_roots(items))
        return [task.id in landed for task, _ in items]

    async def _complete_children_batch(self, items: list[tuple[Task, str]]) -> list[Finish]:
        landed, doorbells = await self._finish(
            "complete-children",
            lambda uow: uow.tasks.complete_children(
                items, dispatch_delay=self.config.redispatch_seconds
            ),
        )
        # A resumed parent's doorbell goes with one of its children's finishes (rung once).
        by_parent = {d.task_id: d for d in doorbells}
        finishes = []
        for task, _ in items:
            parent = None
            if task.id in landed and task.parent_task_id is not None:
                parent = by_parent.pop(task.parent_task_id, None)
            finishes.append(Finish(task.id in landed, [parent] if parent else []))
        return finishes

    async def fail(self, task: Task, error: str) -> Finish:
        return await self._finish(
            "fail",
            lambda uow: uow.tasks.fail(task, error, dispatch_delay=self.config.redispatch_seconds),
        )

    async def retry_later(self, task: Task, error: str, *, delay_seconds: float) -> bool:
        return await self._finish(
            "retry",
            lambda uow: uow.tasks.retry_later(task, error, delay_seconds=delay_seconds),
        )

    async def release(
        self, task: Task, *, delay_seconds: float = 0.0, reason: str | None = None
    ) -> bool:
        return await self._finish(
            "release",
            lambda uow: uow.tasks.release(task, delay_seconds=delay_seconds, reason=reason),
        )

    async def agent_served_elsewhere(self, agent_id: str, queue: str) -> bool:
        """Does another live worker of `queue` serve `agent_id` (a rolling deploy)?"""
        return await self.run(
            "agent-served",
            lambda uow: uow.workers.serves(agent_id, queue=queue, other_than=self.config.worker_id),
        )

    async def wait(
        self,
        task: Task,
        children: Sequence[Task],
        *,
        signals: Sequence[str] | None = None,
        deadline_seconds: float | None = None,
        on_timeout: str | None = None,
    ) -> Finish:
        return await self._finish(
            "wait",
            lambda uow: uow.tasks.wait(
                task,
                children,
                dispatch_delay=self.config.redispatch_seconds,
                signals=signals,
                deadline_seconds=deadline_seconds,
                on_timeout=on_timeout,
            ),
        )

    async def wake_due(self, *, queue: str, limit: int) -> list[Doorbell]:
        return await self.run(
            "wake",
            lambda uow: uow.tasks.wake_due(queue=queue, limit=limit, dispatch_delay=0.0),
        )

    async def take_signals(self, task: Task) -> list[dict[str, object]]:
        return await self.run("signals", lambda uow: uow.tasks.take_signals(task))

    async def progress(self, task: Task, progress_json: str) -> bool:
        return await self.run("progress", lambda uow: uow.tasks.progress(task, progress_json))

    async def _finish(self, name: str, step: Step[T]) -> T:
        return await self.run(name, step, patience=self._finish_patience)

    # -- reconciler -----------------------------------------------------------------------------

    async def rescue_expired(self, *, limit: int) -> tuple[list[Rescued], list[Doorbell]]:
        """Rescue running tasks whose lease expired: roots in one statement, subtasks one by one
        (each under its parent's lock). Returns what was rescued and the parents that resumed
        because a rescued child failed for good."""
        backoff = self.config.backoff
        delay = self.config.redispatch_seconds
        rescued = await self._set_or_rows(
            "rescue",
            lambda uow: uow.tasks.rescue_roots(limit=limit, backoff=backoff),
            lambda uow: uow.tasks.expired_roots(limit=limit),
            lambda root: lambda uow: uow.tasks.rescue_root(*root, backoff=backoff),
        )
        doorbells: list[Doorbell] = []
        for expired in await self.run(
            "rescue", lambda uow: uow.tasks.expired_children(limit=limit)
        ):
            try:
                one, resumed = await self.run(
                    "rescue-child",
                    lambda uow, expired=expired: uow.tasks.rescue_child(  # type: ignore[misc]
                        expired, backoff=backoff, dispatch_delay=delay
                    ),
                )
            except Exception as exc:
                self._row_failed("rescue-child", expired.task_id, exc)
                continue
            rescued.extend([one] if one else [])
            doorbells.extend([resumed] if resumed else [])
        return rescued, doorbells

    async def resume_stranded(self, *, min_age_seconds: float, limit: int) -> list[Doorbell]:
        stranded = await self.run(
            "resume-stranded",
            lambda uow: uow.tasks.stranded_waiting(min_age_seconds=min_age_seconds, limit=limit),
        )
        doorbells: list[Doorbell] = []
        for parent_id in stranded:
            try:
                doorbells += await self.run(
                    "resume-stranded",
                    lambda uow, parent_id=parent_id: uow.tasks.resume_parent(  # type: ignore[misc]
                        parent_id, dispatch_delay=self.config.redispatch_seconds
                    ),
                )
            except Exception as exc:
                self._row_failed("resume-stranded", parent_id, exc)
        return doorbells

    async def mark_due_dispatched(self, *, queue: str, limit: int) -> list[Doorbell]:
        redispatch = self.config.redispatch_seconds
        return await self._set_or_rows(
            "dispatch",
            lambda uow: uow.tasks.mark_due_dispatched(
                queue=queue, limit=limit, redispatch_seconds=redispatch
            ),
            lambda uow: uow.tasks.due_for_dispatch(queue=queue, limit=limit),
            lambda task_id: (
                lambda uow: uow.tasks.mark_dispatched(task_id, redispatch_seconds=redispatch)
            ),
        )

    async def _set_or_rows(
        self,
        name: str,
        whole: Step[list[T]],
        candidates: Step[list[K]],
        one: Callable[[K], Step[T | None]],
    ) -> list[T]:
        """Run a set-based step; if it fails on a row (not a transient failure, which `run`
        retries), run it row by row instead, so one bad row never holds up the others."""
        try:
            return await self.run(name, whole)
        except Exception as exc:
            if _retryable(exc):
                raise
            log.warning("%s failed (%r); going row by row", name, exc)
        done: list[T] = []
        for key in await self.run(name, candidates):
            try:
                result = await self.run(name, one(key))
            except Exception as exc:
                self._row_failed(name, key, exc)
                continue
            if result is not None:
                done.append(result)
        return done

    def _row_failed(self, name: str, key: object, exc: BaseException) -> None:
        """One row a step could not handle: logged when it first fails and then at most once a
        minute while it goes on failing."""
        now = time.monotonic()
        last = self._row_failures.get((name, key))
        if last is None or now - last >= ROW_FAILURE_LOG_SECONDS:
            self._row_failures[(name, key)] = now
            log.error("%s failed for %s, which is left for the next tick: %r", name, key, exc)

    async def unmark_dispatched(self, doorbells: Sequence[Doorbell]) -> None:
        ids = [d.task_id for d in doorbells]
        await self.run("undispatch", lambda uow: uow.tasks.unmark_dispatched(ids))

    # -- this worker's row ----------------------------------------------------------------------

    async def touch_worker(
        self,
        *,
        hostname: str,
        pid: int,
        queue: str,
        agents: Sequence[str],
        abandoned: int = 0,
        sweep_seconds: float,
    ) -> bool:
        """This worker's row refreshed; True when it sweeps its queue until the next tick."""
        return await self.run(
            "touch-worker",
            lambda uow: uow.workers.touch(
                worker_id=self.config.worker_id,
                hostname=hostname,
                pid=pid,
                queue=queue,
                agents=agents,
                abandoned=abandoned,
                sweep_seconds=sweep_seconds,
            ),
        )

    async def forget_worker(self) -> None:
        await self.run("forget-worker", lambda uow: uow.workers.forget(self.config.worker_id))

    async def forget_old_workers(self) -> None:
        await self.run("forget-old-workers", lambda uow: uow.workers.forget_old())
