"""A `Lifecycle` on its own small pool, for tests that drive the lifecycle without a worker."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from persistence import pg
from persistence.lifecycle import Lifecycle, LifecycleConfig


@asynccontextmanager
async def pooled_lifecycle(
    database_url: str,
    *,
    worker_id: str,
    queue: str | None = None,
    pool_size: int = 3,
    **options: Any,
) -> AsyncIterator[Lifecycle]:
    """Test defaults: a 30 s lease and redispatch delay, three attempts, backoff 1–60 s.
    `options` go to `Lifecycle` (busy, batch_window, …). Closed (pool included) on exit."""
    pool = await pg.create_pool(database_url, max_size=pool_size)
    lifecycle = Lifecycle(
        pool,
        LifecycleConfig(
            worker_id=worker_id,
            lease_seconds=30.0,
            default_max_attempts=3,
            retry_base_seconds=1.0,
            retry_max_seconds=60.0,
            redispatch_seconds=30.0,
            queue=queue,
        ),
        **options,
    )
    try:
        yield lifecycle
    finally:
        await lifecycle.close()
