"""An agent for tests/integration/test_tracing.py (TASKLANE_AGENTS=…,tests.tracing_agents)."""

from __future__ import annotations

from typing import Any

from worker.agents import Retry, TaskContext, WaitForSubtasks, agent


@agent("t_retry_then_spawn")
async def retry_then_spawn(ctx: TaskContext) -> dict[str, Any] | WaitForSubtasks:
    """Attempt 1 asks for a retry; attempt 2 spawns one `echo` and waits; resumed, returns."""
    if ctx.attempt == 1 and ctx.step == 0:
        raise Retry(after=0, reason="once more")
    if ctx.step == 0:
        await ctx.spawn("echo", {"from": "parent"})
        return ctx.wait_for_subtasks()
    return {"done": True}
