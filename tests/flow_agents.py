"""Agents with flow limits, for tests/integration/test_flow_control.py (load with
TASKLANE_AGENTS=worker.demo_agents,tests.agents,tests.flow_agents)."""

from __future__ import annotations

import asyncio
from typing import Any

from worker.agents import RateLimited, TaskContext, agent


async def _sleep(ctx: TaskContext) -> dict[str, Any]:
    await asyncio.sleep(float(ctx.input.get("seconds", 0)))  # type: ignore[union-attr]
    return {"attempt": ctx.attempt}


@agent("f_five", concurrency=5)
async def five(ctx: TaskContext) -> dict[str, Any]:
    """At most 5 at once across every worker."""
    return await _sleep(ctx)


@agent("f_per_tenant", per_key=1, key="metadata.tenant")
async def per_tenant(ctx: TaskContext) -> dict[str, Any]:
    """At most 1 at once per tenant (metadata.tenant); tenants in parallel."""
    return await _sleep(ctx)


@agent("f_ten_per_second", rate="10/s")
async def ten_per_second(ctx: TaskContext) -> dict[str, Any]:
    """At most 10 starts a second."""
    return await _sleep(ctx)


@agent("f_fair", concurrency=2, key="metadata.tenant")
async def fair(ctx: TaskContext) -> dict[str, Any]:
    """Two at once, tenants served in turn."""
    return await _sleep(ctx)


@agent("f_provider", key="metadata.tenant")
async def provider(ctx: TaskContext) -> dict[str, Any]:
    """Its provider says 429 (retry in input.after seconds) on each task's first run."""
    if ctx.task.runs == 1 and ctx.input.get("after"):  # type: ignore[union-attr]
        raise RateLimited(after=float(ctx.input["after"]), reason="429 Too Many Requests")  # type: ignore[index]
    return await _sleep(ctx)


@agent("f_tokens", rate="100/s", units="tokens", estimate=10)
async def tokens(ctx: TaskContext) -> dict[str, Any]:
    """A weighted rate: 100 tokens a second, 10 estimated per task, what it used reported."""
    ctx.consume(tokens=float(ctx.input.get("tokens", 10)))  # type: ignore[union-attr]
    return {"attempt": ctx.attempt}


@agent("f_open")
async def open_agent(ctx: TaskContext) -> dict[str, Any]:
    """No limit declared: operators pause it or limit it live."""
    return await _sleep(ctx)
