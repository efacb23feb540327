"""The worker's forever-loops end when they are cancelled — even when a cancel was swallowed.

Python 3.11's `asyncio.wait_for`, which asyncpg and redis-py use under their timeouts, can swallow
a cancel that races the completion of what it waits for (fixed in 3.12, where `wait_for` is built
on `asyncio.timeout`). A loop whose only way out is being cancelled — arq's poll loop, the
reconciler, the heartbeat — then runs on, and the worker ignores SIGTERM until it is killed (seen
under dropping connections and a Redis outage: tests/reliability/test_infrastructure.py,
tests/integration/test_probes.py). The swallowed request still counts in `Task.cancelling()`.
"""

from __future__ import annotations

import asyncio


def raise_if_cancelled() -> None:
    """Call at the top of each turn of a loop that only ends by being cancelled: a cancel
    requested of this task and not taken back (`Task.uncancel`) ends it now."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
