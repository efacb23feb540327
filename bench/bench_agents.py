"""The bench's limited agent (`bench/run.py --cases limited`): echo, at most 10 at once across
every worker, its tasks keyed by metadata.tenant (the bench submits 20 tenants)."""

from __future__ import annotations

from typing import Any

from worker.agents import TaskContext, agent


@agent("limited_echo", concurrency=10, key="metadata.tenant")
async def limited_echo(ctx: TaskContext) -> dict[str, Any]:
    return {"echo": ctx.input}
