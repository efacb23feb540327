"""The worker's hot path to PostgreSQL: lifecycle operations on a plain asyncpg pool.

Claims and root-task completions of concurrent jobs are grouped into one statement when the
worker is busy (`Batcher`). Everything touching a subtask runs in a short transaction that locks
the parent first. Deadlocks, serialization failures and dropped connections are retried: every
statement here is fenced (status + run number), so running one twice never applies it twice.
A write retried after its answer was lost must also recognise its own success: the next claim of
tasks whose claim got no answer adopts those already running under this worker, and a finish that
finds nothing to change checks whether its run's history already holds the outcome it was writing.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar
from uuid import UUID

import asyncpg

from domain.entities import Doorbell, Task
from domain.value_objects import AttemptOutcome
from persistence import batching, lifecycle
from persistence.batching import Batcher
from persistence.errors import CONNECTION_ERRORS, RETRYABLE_SQLSTATES
from persistence.sql import ConnectionExecutor, Executor

log = logging.getLogger(__name__)

T = TypeVar("T")

_ATTEMPTS = 4


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, asyncpg.PostgresError) and exc.sqlstate in RETRYABLE_SQLSTATES:
        return True
    return isinstance(exc, CONNECTION_ERRORS)


async def _landed_before(ex: Executor, task: Task, outcome: AttemptOutcome) -> bool:
    """A fenced finish found nothing to change: had this very run's write already landed (a
    retry whose first try lost its answer with its connection)?"""
    return bool(await lifecycle.runs_with_outcome(ex, [(task.id, task.runs)], outcome))


@dataclass(frozen=True, slots=True)
class LifecycleConfig:
    worker_id: str
    lease_seconds: float
    default_max_attempts: int
    retry_base_seconds: float
    retry_max_seconds: float
    redispatch_seconds: float
    queue: str | None = None  # the only queue whose tasks this worker claims (None: any)


@dataclass(frozen=True, slots=True)
class Finish:
    """The result of a run's final write: did it land, and which tasks to dispatch now."""

    landed: bool
    doorbells: list[Doorbell] = field(default_factory=list)


class LifecycleStore:
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
        self._completions: Batcher[tuple[UUID, int, str], bool] = Batcher(
            "complete", self._complete_batch, busy=busy, window=batch_window, max_size=batch_max
        )
        # A run's final write is worth retrying for as long as its lease lasts: past that, the
        # task is rescued and the write would be fenced off anyway.
        self._finish_patience = config.lease_seconds
        # Tasks whose last claim statement got no answer: it may have committed all the same.
        self._unsure_claims: set[UUID] = set()

    async def close(self) -> None:
        await self._claims.drain()
        await self._completions.drain()
        await self.pool.close()

    # -- plumbing -------------------------------------------------------------------------------

    async def _run(
        self,
        name: str,
        op: Callable[[Executor], Awaitable[T]],
        *,
        tx: bool,
        patience: float | None = None,
    ) -> T:
        """Run `op` on a pooled connection (in a transaction if `tx`), retrying transient
        failures with a jittered backoff: `_ATTEMPTS` tries, or for `patience` seconds."""
        deadline = None if patience is None else asyncio.get_running_loop().time() + patience
        attempt = 0
        while True:
            attempt += 1
            answered = False
            try:
                async with self.pool.acquire() as conn:
                    ex = ConnectionExecutor(conn)
                    if tx:
                        async with conn.transaction():
                            result = await op(ex)
                    else:
                        result = await op(ex)
                    answered = True
            except Exception as exc:
                if answered:
                    # The answer (and the commit) arrived; only handing the connection back failed,
                    # the server having dropped it just then (the pool opens another). Run again,
                    # the op would find its own write and miss it.
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
        wanted = sorted(set(ids))

        async def op(ex: Executor) -> list[Task]:
            # A claim whose connection died around its commit may have claimed: retried, it
            # would miss its own claim, and the task would sit running until its lease ran out,
            # an attempt spent and its handler never run. Take up what it got first.
            unsure = [task_id for task_id in wanted if task_id in self._unsure_claims]
            try:
                adopted = await lifecycle.adopt(
                    ex,
                    unsure,
                    worker_id=self.config.worker_id,
                    lease_seconds=self.config.lease_seconds,
                )
                claimed = await lifecycle.claim(
                    ex,
                    wanted,
                    worker_id=self.config.worker_id,
                    lease_seconds=self.config.lease_seconds,
                    default_max_attempts=self.config.default_max_attempts,
                    queue=self.config.queue,
                )
            except BaseException:
                self._unsure_claims.update(wanted)
                raise
            self._unsure_claims.difference_update(wanted)
            if adopted:
                log.warning("adopted %d claim(s) that committed without an answer", len(adopted))
            return adopted + claimed

        claimed = {task.id: task for task in await self._run("claim", op, tx=False)}
        # Duplicate doorbells for one task inside a batch: only the first gets the claim.
        return [claimed.pop(task_id, None) for task_id in ids]

    async def explain_miss(self, task_id: UUID) -> lifecycle.Miss:
        return await self._run(
            "explain",
            lambda ex: lifecycle.explain_miss(ex, task_id, queue=self.config.queue),
            tx=False,
        )

    async def heartbeat(self, held: Mapping[UUID, int]) -> set[UUID]:
        """Extend the leases of the runs in `held`; return the task ids that are no longer ours."""

        async def op(ex: Executor) -> set[UUID]:
            return await lifecycle.heartbeat(ex, held, lease_seconds=self.config.lease_seconds)

        return await self._run("heartbeat", op, tx=False)

    # -- finish ---------------------------------------------------------------------------------

    async def complete(self, task: Task, output_json: str, children: Sequence[Task] = ()) -> Finish:
        """running → completed, with any fire-and-forget subtasks created in the same
        transaction. Plain root tasks take the batched path."""
        if task.parent_task_id is None and not children:
            return Finish(await self._completions.submit((task.id, task.runs, output_json)))

        async def change(ex: Executor) -> bool:
            return bool(await lifecycle.complete(ex, [(task.id, task.runs, output_json)]))

        return await self._finish_in_tree(task, change, AttemptOutcome.COMPLETED, children)

    async def _complete_batch(self, items: list[tuple[UUID, int, str]]) -> list[bool]:
        async def op(ex: Executor) -> set[UUID]:
            landed = {f.task_id for f in await lifecycle.complete(ex, items)}
            missed = [(task_id, run) for task_id, run, _ in items if task_id not in landed]
            return landed | await lifecycle.runs_with_outcome(ex, missed, AttemptOutcome.COMPLETED)

        landed = await self._run("complete", op, tx=False, patience=self._finish_patience)
        return [task_id in landed for task_id, _, _ in items]

    async def fail(self, task: Task, error: str) -> Finish:
        async def change(ex: Executor) -> bool:
            return await lifecycle.fail(ex, task.id, task.runs, error) is not None

        if task.parent_task_id is not None:
            return await self._finish_in_tree(task, change, AttemptOutcome.FAILED)

        async def op(ex: Executor) -> bool:
            return await change(ex) or await _landed_before(ex, task, AttemptOutcome.FAILED)

        return Finish(await self._run("fail", op, tx=False, patience=self._finish_patience))

    async def _finish_in_tree(
        self,
        task: Task,
        change: Callable[[Executor], Awaitable[bool]],
        outcome: AttemptOutcome,
        children: Sequence[Task] = (),
    ) -> Finish:
        """One transaction: lock the parent (if any) first, then change the task, create its
        children, and resume the parent if this task was its last unfinished child."""
        parent_id = task.parent_task_id
        delay = self.config.redispatch_seconds

        async def op(ex: Executor) -> Finish:
            if parent_id is not None:
                await lifecycle.lock_task(ex, parent_id)
            if not await change(ex):
                # The run lost its claim, or this is a retry whose first try landed (children,
                # parent and all: the reconciler rings their doorbells).
                return Finish(await _landed_before(ex, task, outcome))
            doorbells = await lifecycle.insert_children(ex, children, dispatch_delay=delay)
            if parent_id is not None:
                resumed = await lifecycle.resume_if_done(ex, parent_id, dispatch_delay=delay)
                doorbells.extend([resumed] if resumed else [])
            return Finish(True, doorbells)

        return await self._run("finish", op, tx=True, patience=self._finish_patience)

    async def retry_later(self, task: Task, error: str, *, delay_seconds: float) -> bool:
        async def op(ex: Executor) -> bool:
            return await lifecycle.retry_later(
                ex, task.id, task.runs, error, delay_seconds=delay_seconds
            ) or await _landed_before(ex, task, AttemptOutcome.RETRY)

        return await self._run("retry", op, tx=False, patience=self._finish_patience)

    async def release(self, task: Task) -> bool:
        async def op(ex: Executor) -> bool:
            return await lifecycle.release(ex, task.id, task.runs) or await _landed_before(
                ex, task, AttemptOutcome.RELEASED
            )

        return await self._run("release", op, tx=False, patience=self._finish_patience)

    async def wait_for_children(
        self, task: Task, children: Sequence[Task]
    ) -> list[Doorbell] | None:
        async def op(ex: Executor) -> list[Doorbell] | None:
            doorbells = await lifecycle.wait_for_children(
                ex, task.id, task.runs, children, dispatch_delay=self.config.redispatch_seconds
            )
            if doorbells is None and await _landed_before(ex, task, AttemptOutcome.WAITING):
                return []  # the reconciler rings the children the first try created
            return doorbells

        return await self._run("wait", op, tx=True, patience=self._finish_patience)

    # -- reconciler -----------------------------------------------------------------------------

    async def rescue_expired(self, *, limit: int) -> tuple[list[lifecycle.Rescued], list[Doorbell]]:
        """Rescue running tasks whose lease expired. Returns what was rescued and the parents
        that resumed because a rescued child failed for good."""
        cfg = self.config

        async def roots(ex: Executor) -> list[lifecycle.Rescued]:
            return await lifecycle.rescue_roots(
                ex,
                limit=limit,
                retry_base_seconds=cfg.retry_base_seconds,
                retry_max_seconds=cfg.retry_max_seconds,
            )

        rescued = await self._run("rescue", roots, tx=False)
        doorbells: list[Doorbell] = []
        children = await self._run(
            "rescue", lambda ex: lifecycle.expired_children(ex, limit=limit), tx=False
        )
        for task_id, run, parent_id in children:

            async def child(
                ex: Executor, task_id: UUID = task_id, run: int = run, parent_id: UUID = parent_id
            ) -> tuple[lifecycle.Rescued | None, Doorbell | None]:
                return await lifecycle.rescue_child(
                    ex,
                    task_id,
                    run,
                    parent_id,
                    retry_base_seconds=cfg.retry_base_seconds,
                    retry_max_seconds=cfg.retry_max_seconds,
                    dispatch_delay=cfg.redispatch_seconds,
                )

            one, resumed = await self._run("rescue-child", child, tx=True)
            rescued.extend([one] if one else [])
            doorbells.extend([resumed] if resumed else [])
        return rescued, doorbells

    async def resume_stranded(self, *, min_age_seconds: float, limit: int) -> list[Doorbell]:
        stranded = await self._run(
            "stranded",
            lambda ex: lifecycle.stranded_waiting(ex, min_age_seconds=min_age_seconds, limit=limit),
            tx=False,
        )
        doorbells: list[Doorbell] = []
        for parent_id in stranded:

            async def resume(ex: Executor, parent_id: UUID = parent_id) -> Doorbell | None:
                await lifecycle.lock_task(ex, parent_id)
                return await lifecycle.resume_if_done(
                    ex, parent_id, dispatch_delay=self.config.redispatch_seconds
                )

            resumed = await self._run("resume", resume, tx=True)
            doorbells.extend([resumed] if resumed else [])
        return doorbells

    async def dispatch_due(
        self, *, queue: str, limit: int, ring: Callable[[list[Doorbell]], Awaitable[None]]
    ) -> int:
        async def op(ex: Executor) -> list[Doorbell]:
            return await lifecycle.dispatch_due(
                ex,
                queue=queue,
                limit=limit,
                redispatch_seconds=self.config.redispatch_seconds,
                ring=ring,
            )

        return len(await self._run("dispatch", op, tx=True))

    async def touch_worker(
        self, *, hostname: str, pid: int, queue: str, agents: Sequence[str]
    ) -> None:
        async def op(ex: Executor) -> None:
            await lifecycle.touch_worker(
                ex,
                worker_id=self.config.worker_id,
                hostname=hostname,
                pid=pid,
                queue=queue,
                agents=agents,
            )

        await self._run("touch-worker", op, tx=False)

    async def forget_worker(self) -> None:
        await self._run(
            "forget-worker", lambda ex: lifecycle.forget_worker(ex, self.config.worker_id), tx=False
        )

    async def forget_old_workers(self) -> None:
        await self._run("forget-old-workers", lifecycle.forget_old_workers, tx=False)
