"""`tasklane demo`: a fan-out task end to end on the configured services.

The caller has migrated the database. This starts a worker in this process (other workers on
the same queue may take part: that is the point of a queue), submits a `fanout` task, waits for
it and returns its tree.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

from worker.app import TasklaneWorker, worker_options
from worker.config import Settings
from worker.operator import Operator, OperatorError, Tree

DEMO_USER = "demo"
WORKER_START_TIMEOUT_SECONDS = 30.0


@contextlib.asynccontextmanager
async def in_process_worker(settings: Settings) -> AsyncIterator[TasklaneWorker]:
    """An arq worker running in this event loop until the block ends."""
    options: dict[str, Any] = {**worker_options(settings), "handle_signals": False}
    worker = TasklaneWorker(**options)
    run = asyncio.create_task(worker.async_run(), name="tasklane-demo-worker")
    try:
        deadline = time.monotonic() + WORKER_START_TIMEOUT_SECONDS
        while "tasklane" not in worker.ctx:
            if run.done():
                run.result()  # startup failed: its error is raised here
                raise OperatorError("the demo worker stopped before it started")
            if time.monotonic() > deadline:
                raise OperatorError(
                    f"the demo worker did not start within {WORKER_START_TIMEOUT_SECONDS:g}s"
                )
            await asyncio.sleep(0.02)
        yield worker
    finally:
        with contextlib.suppress(Exception):
            await worker.close()
        run.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await run


async def run_demo(settings: Settings, *, n: int, timeout: float) -> Tree:  # noqa: ASYNC109
    """Submit `fanout` with `n` children, wait for it (at most `timeout` seconds), return its
    tree. Raises `OperatorError` if it does not finish in time."""
    async with (
        Operator.open(settings, redis=True) as operator,
        in_process_worker(settings),
    ):
        conversation = await operator.client.create_conversation(
            user_id=DEMO_USER, title="tasklane demo"
        )
        task = await operator.client.submit("fanout", {"n": n}, conversation_id=conversation.id)
        try:
            await operator.client.wait(task.id, timeout=timeout)
        except TimeoutError:
            tree = await operator.tree(task.id)
            status = tree.nodes[0].row["status"]
            raise OperatorError(
                f"the demo task {task.id} is still {status} after {timeout:g}s; "
                f"`tasklane show {task.id}` says why"
            ) from None
        return await operator.tree(task.id)
