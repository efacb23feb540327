"""The reconciler: a loop in every worker that makes Postgres and Redis agree again.

Each tick (TASKLANE_RECONCILE_SECONDS) it refreshes this worker's row in `workers`, rescues
running tasks whose lease expired, resumes waiting parents nobody resumed, and rings the
doorbells of due pending tasks that have none (inserted by plain SQL, a producer that died after
commit, Redis that lost its data, a retry whose backoff has passed) or whose doorbell a worker
took and died before claiming the task. Every step takes a bounded batch with SKIP LOCKED, so
any number of workers reconcile at once without stepping on each other, and a backlog of any
size is worked through a batch at a time.

The steps run and fail on their own: one that fails (Redis away, a row Postgres refuses) does not
stop the others, and each says so in the log when it starts failing, at least once a minute while
it keeps failing, and when it recovers. No Redis call is made while a Postgres transaction is
open: due tasks are marked dispatched and committed, then rung.

It runs as its own asyncio task, never in a job slot: busy slots never delay it.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from domain.entities import Doorbell
from persistence.lifecycle import Lifecycle
from worker import metrics  # observability
from worker.config import Settings
from worker.dispatch import Dispatcher
from worker.loops import raise_if_cancelled
from worker.watch import Watched

RESCUE_BATCH = 500
DISPATCH_BATCH = 1000
DISPATCH_BATCHES_PER_TICK = 5
STRANDED_BATCH = 100
FORGET_OLD_WORKERS_EVERY = 3600.0  # seconds
# A step that keeps failing is logged again after this long (and when it recovers).
REPEAT_FAILURE_LOG_SECONDS = 60.0
# A queue's sweeper role lapses this many ticks after its holder's last one (a worker killed):
# another worker of the queue then takes it.
SWEEPER_TICKS = 3


class _StepHealth:
    """Whether one reconciler step is failing, and when that was last logged."""

    def __init__(self, name: str, log: Any, clock: Callable[[], float]) -> None:
        self.name = name
        self.log = log
        self.clock = clock
        self.failing_since: float | None = None
        self.last_logged = 0.0
        self.failures = 0

    def failed(self, exc: BaseException) -> None:
        now = self.clock()
        self.failures += 1
        metrics.reconcile_failed(self.name)  # observability
        if self.failing_since is None:
            self.failing_since = now
        elif now - self.last_logged < REPEAT_FAILURE_LOG_SECONDS:
            return
        self.last_logged = now
        self.log.error(
            "reconcile.step_failed",
            step=self.name,
            error=repr(exc)[:500],
            failing_for_seconds=round(now - self.failing_since, 1),
            failures=self.failures,
        )

    def succeeded(self) -> None:
        if self.failing_since is not None:
            self.log.info(
                "reconcile.step_recovered",
                step=self.name,
                failed_for_seconds=round(self.clock() - self.failing_since, 1),
            )
        self.failing_since = None
        self.failures = 0


class Reconciler:
    def __init__(
        self,
        *,
        lifecycle: Lifecycle,
        dispatcher: Dispatcher,
        settings: Settings,
        agents: Sequence[str],
        log: Any,
        redis_away: Callable[[], bool] = lambda: False,
        abandoned: Callable[[], int] = lambda: 0,
        watched: Watched | None = None,
    ) -> None:
        self.lifecycle = lifecycle
        self.watched = watched
        self.redis_away = redis_away
        self.abandoned = abandoned
        self.dispatcher = dispatcher
        self.settings = settings
        self.agents = sorted(agents)
        self.log = log
        self.hostname = socket.gethostname()
        self.pid = os.getpid()
        self._last_forget = 0.0
        self.clock: Callable[[], float] = time.monotonic  # steps' failure logging goes by it
        self.sweeping = False  # this worker sweeps its queue (see `touch`)
        self._touch = _StepHealth("worker-row", log, lambda: self.clock())
        self._watch = _StepHealth("followed-tasks", log, lambda: self.clock())
        self._sweeps: list[tuple[_StepHealth, Callable[[], Awaitable[Any]]]] = [
            (_StepHealth(name, log, lambda: self.clock()), step)
            for name, step in (
                ("rescue", self.rescue),
                ("resume-stranded", self.resume_stranded),
                ("dispatch", self.dispatch),
                ("flow", self.flow),
                ("wake", self.wake),
            )
        ]

    async def run_forever(self) -> None:
        interval = self.settings.reconcile_seconds
        while True:
            raise_if_cancelled()  # see worker.loops
            started = time.monotonic()
            await self.tick()
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))

    async def tick(self) -> None:
        """This worker's row, then — if it is its queue's sweeper — every sweep. A failing step
        is logged and the others still run (a worker that cannot reach Postgres to say it is
        alive keeps sweeping until its role would have lapsed)."""
        await self._run(self._touch, self.touch)
        if self.watched is not None and not self.redis_away():
            await self._run(self._watch, self.watched.refresh)
        if self.sweeping:
            for health, step in self._sweeps:
                await self._run(health, step)

    @staticmethod
    async def _run(health: _StepHealth, step: Callable[[], Awaitable[Any]]) -> None:
        try:
            await step()
        except Exception as exc:
            health.failed(exc)
        else:
            health.succeeded()

    async def touch(self) -> None:
        """Refresh this worker's row; take or keep its queue's sweeper role if free. Only one
        worker per queue sweeps, so the reconciler's cost does not grow with the workers."""
        self.sweeping = await self.lifecycle.touch_worker(
            hostname=self.hostname,
            pid=self.pid,
            queue=self.settings.queue,
            agents=self.agents,
            abandoned=self.abandoned(),
            sweep_seconds=SWEEPER_TICKS * self.settings.reconcile_seconds,
        )
        if time.monotonic() - self._last_forget > FORGET_OLD_WORKERS_EVERY:
            await self.lifecycle.forget_old_workers()
            self._last_forget = time.monotonic()

    async def rescue(self) -> None:
        rescued, resumed = await self.lifecycle.rescue_expired(limit=RESCUE_BATCH)
        metrics.reconciled("rescued", len(rescued))  # observability
        for task in rescued:
            self.log.warning(
                "task.rescued", task_id=str(task.task_id), run=task.runs, now=task.status.value
            )
        await self.dispatcher.ring(resumed)
        # A doorbell for each lost run may be queued again (rung while it ran), behind the dead
        # worker's in-progress key, which outlives any handler: left there, it would be read and
        # skipped by every poll for minutes, and it can only miss now (the run is over). (Rescue
        # spans queues: a queue whose workers all died is rescued by the others.)
        await self.dispatcher.forget(
            [Doorbell(task.task_id, task.runs - 1, task.queue) for task in rescued]
        )

    async def resume_stranded(self) -> None:
        doorbells = await self.lifecycle.resume_stranded(
            min_age_seconds=max(5.0, 5 * self.settings.reconcile_seconds), limit=STRANDED_BATCH
        )
        metrics.reconciled("resumed", len(doorbells))  # observability
        for doorbell in doorbells:
            self.log.warning("task.resumed_by_reconciler", task_id=str(doorbell.task_id))
        await self.dispatcher.ring(doorbells)

    async def dispatch(self) -> int:
        if self.redis_away():  # the worker claims from Postgres meanwhile (worker.outage)
            return 0
        # Backpressure: with this many doorbells already queued the workers are busy anyway,
        # and re-marking a large backlog every tick would only load Postgres.
        if await self.dispatcher.queued() >= DISPATCH_BATCH * DISPATCH_BATCHES_PER_TICK:
            return 0
        total = 0
        for _ in range(DISPATCH_BATCHES_PER_TICK):
            doorbells = await self.lifecycle.mark_due_dispatched(
                queue=self.settings.queue, limit=DISPATCH_BATCH
            )
            await self._ring_due(doorbells)
            total += len(doorbells)
            metrics.reconciled("dispatched", len(doorbells))  # observability
            if len(doorbells) < DISPATCH_BATCH:
                break
        if total:
            self.log.info("reconcile.dispatched", doorbells=total)
        return total

    async def flow(self) -> None:
        """Flow control's safety net: pauses whose time is up are lifted (their due tasks rung
        by the dispatch step), and each limited agent with due work and room to start gets a
        flow doorbell — slots freed by a rescue, a crashed worker or a raised limit are offered
        within a tick. (Finishing runs offer theirs at once.)"""
        queue = self.settings.queue
        expired = await self.lifecycle.expire_pauses(queue)
        if expired:
            self.log.info("flow.pauses_expired", pauses=expired)
        if self.redis_away():
            return
        for agent_id in await self.lifecycle.ready_limited(queue):
            await self.dispatcher.ring_flow(queue, agent_id)

    async def wake(self) -> None:
        """Durable timers and signal timeouts whose time came: pending again, rung now."""
        doorbells = await self.lifecycle.wake_due(queue=self.settings.queue, limit=DISPATCH_BATCH)
        if doorbells and not self.redis_away():
            await self.dispatcher.ring(doorbells)

    async def _ring_due(self, doorbells: list[Doorbell]) -> None:
        """Ring doorbells marked dispatched (committed). A due task was either never rung
        (inserted by SQL, its producer died, Redis lost it) or rung at least redispatch_seconds
        ago and still not claimed. If Redis fails us, the marks are taken back so the next tick
        tries again instead of waiting out the redispatch interval."""
        try:
            unblocked = await self.dispatcher.ring_again(
                doorbells, stale_after_seconds=self.settings.redispatch_seconds
            )
        except Exception:
            await self.lifecycle.unmark_dispatched(doorbells)
            raise
        metrics.reconciled("unblocked", len(unblocked))  # observability
        for doorbell in unblocked:
            self.log.warning(
                "doorbell.unblocked",
                task_id=str(doorbell.task_id),
                reason="a worker started it and never claimed the task",
            )
