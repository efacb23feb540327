"""Grouping concurrent lifecycle writes into one statement when the worker is busy.

At light load every request runs alone, at once: a batch would only add latency. When many
jobs are in flight (`busy()` says so), requests wait up to `window` seconds, or until
`max_size` have gathered, and run as one statement. If a batch statement fails, its items are
retried one by one, so one bad row never fails its neighbours.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

Item = TypeVar("Item")
Result = TypeVar("Result")

RunBatch = Callable[[list[Item]], Awaitable[Sequence[Result]]]

# Measured with bench/run.py (windows of 1/2/4/8 ms: 2,372/2,482/1,946/1,389 tasks/s): jobs start
# a poll at a time, so a longer window holds slots without gathering more.
WINDOW_SECONDS = 0.002
MAX_SIZE = 100


class Batcher(Generic[Item, Result]):
    def __init__(
        self,
        name: str,
        run: RunBatch[Item, Result],
        *,
        busy: Callable[[], bool],
        window: float = WINDOW_SECONDS,
        max_size: int = MAX_SIZE,
    ) -> None:
        """`run(items)` executes one statement for all items and returns one result per item,
        in order."""
        self.name = name
        self._run = run
        self._busy = busy
        self._window = window
        self._max_size = max_size
        self._queue: list[tuple[Item, asyncio.Future[Result]]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._running: set[asyncio.Task[None]] = set()

    async def submit(self, item: Item) -> Result:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Result] = loop.create_future()
        self._queue.append((item, future))
        if len(self._queue) >= self._max_size or not self._busy():
            self._flush()
        elif self._timer is None:
            self._timer = loop.call_later(self._window, self._flush)
        return await future

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, self._queue = self._queue, []
        if batch:
            task = asyncio.get_running_loop().create_task(self._execute(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _execute(self, batch: list[tuple[Item, asyncio.Future[Result]]]) -> None:
        try:
            results = await self._run([item for item, _ in batch])
        except Exception as exc:
            if len(batch) == 1:
                _settle(batch[0][1], exc=exc)
                return
            log.warning(
                "%s: batch of %d failed (%r); retrying one by one", self.name, len(batch), exc
            )
            await asyncio.gather(*(self._execute([entry]) for entry in batch))
            return
        for (_, future), result in zip(batch, results, strict=True):
            _settle(future, result=result)

    async def drain(self) -> None:
        """Run whatever is queued and wait for every statement in flight."""
        self._flush()
        while self._running:
            await asyncio.gather(*self._running, return_exceptions=True)


def _settle(
    future: asyncio.Future[Result],
    *,
    result: Result | None = None,
    exc: BaseException | None = None,
) -> None:
    if future.done():  # the submitter gave up waiting; nothing to hand over
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)  # type: ignore[arg-type]
