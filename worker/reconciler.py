"""The reconciler: a loop in every worker that makes Postgres and Redis agree again.

Each tick (TASKLANE_RECONCILE_SECONDS) it refreshes this worker's row in `workers`, rescues
running tasks whose lease expired, resumes waiting parents nobody resumed, and rings the
doorbells of due pending tasks that have none (inserted by plain SQL, a producer that died after
commit, Redis that lost its data, a retry whose backoff has passed) or whose doorbell a worker
took and died before claiming the task. Every step takes a bounded batch with SKIP LOCKED, so
any number of workers reconcile at once without stepping on each other, and a backlog of any
size is worked through a batch at a time.

It runs as its own asyncio task, never in a job slot: busy slots never delay it.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Sequence
from typing import Any

from domain.entities import Doorbell
from persistence.store import LifecycleStore
from worker.config import Settings
from worker.dispatch import Dispatcher

RESCUE_BATCH = 500
DISPATCH_BATCH = 1000
DISPATCH_BATCHES_PER_TICK = 5
STRANDED_BATCH = 100
FORGET_OLD_WORKERS_EVERY = 3600.0  # seconds


class Reconciler:
    def __init__(
        self,
        *,
        store: LifecycleStore,
        dispatcher: Dispatcher,
        settings: Settings,
        agents: Sequence[str],
        log: Any,
    ) -> None:
        self.store = store
        self.dispatcher = dispatcher
        self.settings = settings
        self.agents = sorted(agents)
        self.log = log
        self.hostname = socket.gethostname()
        self.pid = os.getpid()
        self._last_forget = 0.0
        self._failing = False

    async def run_forever(self) -> None:
        interval = self.settings.reconcile_seconds
        while True:
            started = time.monotonic()
            try:
                await self.tick()
                if self._failing:
                    self.log.info("reconcile.recovered")
                    self._failing = False
            except Exception as exc:
                # Postgres or Redis is away; say so once, then keep trying every tick.
                if not self._failing:
                    self.log.error("reconcile.failed", error=repr(exc))
                    self._failing = True
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))

    async def tick(self) -> None:
        await self.store.touch_worker(
            hostname=self.hostname, pid=self.pid, queue=self.settings.queue, agents=self.agents
        )
        await self.rescue()
        await self.resume_stranded()
        await self.dispatch()
        if time.monotonic() - self._last_forget > FORGET_OLD_WORKERS_EVERY:
            await self.store.forget_old_workers()
            self._last_forget = time.monotonic()

    async def rescue(self) -> None:
        rescued, resumed = await self.store.rescue_expired(limit=RESCUE_BATCH)
        # The doorbell that started each lost run is still queued if its worker died: arq keeps
        # a job queued until it ends, behind an in-progress key that outlives any handler. Left
        # there, it would be read and skipped by every poll for minutes, and a dead worker's
        # worth of them at the head of the queue would hide everything behind them. (Rescue
        # spans queues: a queue whose workers all died is rescued by the others.)
        for task in rescued:
            self.log.warning(
                "task.rescued", task_id=str(task.task_id), run=task.runs, now=task.status.value
            )
        await self.dispatcher.ring(resumed)
        await self.dispatcher.forget(
            [Doorbell(task.task_id, task.runs - 1, task.queue) for task in rescued]
        )

    async def resume_stranded(self) -> None:
        doorbells = await self.store.resume_stranded(
            min_age_seconds=max(5.0, 5 * self.settings.reconcile_seconds), limit=STRANDED_BATCH
        )
        for doorbell in doorbells:
            self.log.warning("task.resumed_by_reconciler", task_id=str(doorbell.task_id))
        await self.dispatcher.ring(doorbells)

    async def dispatch(self) -> int:
        # Backpressure: with this many doorbells already queued the workers are busy anyway,
        # and re-marking a large backlog every tick would only load Postgres.
        if await self.dispatcher.queued() >= DISPATCH_BATCH * DISPATCH_BATCHES_PER_TICK:
            return 0
        total = 0
        for _ in range(DISPATCH_BATCHES_PER_TICK):
            rung = await self.store.dispatch_due(
                queue=self.settings.queue, limit=DISPATCH_BATCH, ring=self._ring_due
            )
            total += rung
            if rung < DISPATCH_BATCH:
                break
        if total:
            self.log.info("reconcile.dispatched", doorbells=total)
        return total

    async def _ring_due(self, doorbells: list[Doorbell]) -> None:
        # A due task was either never rung (inserted by SQL, its producer died, Redis lost it)
        # or rung at least redispatch_seconds ago and still not claimed.
        unblocked = await self.dispatcher.ring_again(
            doorbells, stale_after_seconds=self.settings.redispatch_seconds
        )
        for doorbell in unblocked:
            self.log.warning(
                "doorbell.unblocked",
                task_id=str(doorbell.task_id),
                reason="a worker started it and never claimed the task",
            )
