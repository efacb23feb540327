"""Lease extension for every run in this worker, in one statement per beat.

A run whose task is no longer ours (cancelled, or rescued after our lease expired) has its
handler cancelled: it must not keep working on, or write to, a task it no longer holds.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from domain.entities import Task
from persistence.lifecycle import Lifecycle
from worker.loops import raise_if_cancelled


@dataclass(slots=True)
class TrackedRun:
    task_id: UUID
    run: int
    handler: asyncio.Future[Any]
    # Resolved when the heartbeat finds the task no longer ours: the job stops waiting for a
    # handler that might ignore its cancellation.
    lost_signal: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )

    @property
    def lost(self) -> bool:
        return self.lost_signal.done()


class Heartbeat:
    def __init__(self, lifecycle: Lifecycle, *, interval: float, log: Any) -> None:
        self.lifecycle = lifecycle
        self.interval = interval
        self.log = log
        self._runs: dict[UUID, TrackedRun] = {}

    def track(self, task: Task, handler: asyncio.Future[Any]) -> TrackedRun:
        tracked = TrackedRun(task.id, task.runs, handler)
        self._runs[task.id] = tracked
        return tracked

    def untrack(self, tracked: TrackedRun) -> None:
        if self._runs.get(tracked.task_id) is tracked:
            del self._runs[tracked.task_id]

    @property
    def running(self) -> int:
        return len(self._runs)

    async def run_forever(self) -> None:
        while True:
            raise_if_cancelled()  # see worker.loops
            await asyncio.sleep(self.interval)
            try:
                await self.beat()
            except Exception as exc:
                # The lease has two more beats of slack; the next one may get through.
                self.log.warning("heartbeat.failed", error=repr(exc), runs=len(self._runs))

    async def beat(self) -> None:
        held = {task_id: tracked.run for task_id, tracked in self._runs.items()}
        if not held:
            return
        for task_id in await self.lifecycle.heartbeat(held):
            tracked = self._runs.get(task_id)
            if tracked is not None and tracked.run == held[task_id] and not tracked.handler.done():
                tracked.lost_signal.set_result(None)
                tracked.handler.cancel()
                self.log.warning("run.claim_lost", task_id=str(task_id), run=tracked.run)
