"""Agents for the fuzz tests (loaded by their worker only): a handler that spawns a subtask
built from bad input, picked by name since the bad values cannot travel as JSON input."""

from __future__ import annotations

import math
from typing import Any

from worker.agents import TaskContext, WaitForSubtasks, agent


def _deep(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


BAD_CHILDREN: dict[str, tuple[Any, Any]] = {
    # name: (agent id, input)
    "nan-input": ("echo", {"x": math.nan}),
    "int-key": ("echo", {1: "a", "1": "b"}),
    "bytes-input": ("echo", b"\xff"),
    "lone-surrogate": ("echo", "\ud800"),
    "nul-input": ("echo", "a\x00b"),
    "deep-input": ("echo", _deep(100_000)),
    "long-agent-id": ("a" * 150 + "ø" * 1000, {}),
    "blank-agent-id": ("  ", {}),
    "int-agent-id": (5, {}),
}


@agent("t_fuzz_spawn")
async def spawn_bad_child(ctx: TaskContext) -> dict[str, Any] | WaitForSubtasks:
    """Spawns the bad subtask named by input.child; waits for it if input.wait."""
    if ctx.step > 0:
        return {"resumed": True}
    agent_id, child_input = BAD_CHILDREN[ctx.input["child"]]
    await ctx.spawn(agent_id, child_input)
    return ctx.wait_for_subtasks() if ctx.input["wait"] else {"spawned": True}
