"""Agents that wait durably, for tests/integration/test_waits.py."""

from __future__ import annotations

import asyncio
from typing import Any

from tests.agents import mark
from worker.agents import TaskContext, agent


@agent("w_signal")
async def wait_signal(ctx: TaskContext) -> Any:
    """Step 0 waits for input.names (timeout input.timeout, on_timeout input.on_timeout, with
    input.children subtasks spawned alongside); step 1 returns what it resumed with."""
    await mark(ctx, f"step{ctx.step}")
    spec: dict[str, Any] = ctx.input  # type: ignore[assignment]
    if ctx.step == 0:
        for i in range(int(spec.get("children", 0))):
            await ctx.spawn("echo", {"i": i})
        return ctx.wait_for_signal(
            *spec.get("names", ["approval"]),
            timeout=spec.get("timeout"),
            on_timeout=spec.get("on_timeout", "resume"),
        )
    return {
        "step": ctx.step,
        "timed_out": ctx.timed_out,
        "signals": {n: [s.payload, s.sent_by] for n, s in ctx.signals.items()},
    }


@agent("w_sleep")
async def wait_sleep(ctx: TaskContext) -> Any:
    """Sleeps input.seconds durably, then returns."""
    if ctx.step == 0:
        return ctx.sleep(float(ctx.input["seconds"]))  # type: ignore[index]
    return {"woke": True}


@agent("w_progress")
async def progress(ctx: TaskContext) -> Any:
    """Reports progress input.n times in a burst: the throttle keeps some, the last lands."""
    n = int(ctx.input["n"])  # type: ignore[index]
    for i in range(n):
        await ctx.progress((i + 1) / n, f"item {i + 1} of {n}", data={"i": i})
    return {"done": n}


@agent("w_progress_slow")
async def progress_slow(ctx: TaskContext) -> Any:
    """Reports progress input.n times, input.every seconds apart (slower than the throttle)."""
    n = int(ctx.input["n"])  # type: ignore[index]
    for i in range(n):
        await asyncio.sleep(float(ctx.input["every"]))  # type: ignore[index]
        await ctx.progress((i + 1) / n, f"item {i + 1} of {n}")
    return {"done": n}
