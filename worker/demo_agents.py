"""The built-in demo agents (loaded by default through TASKLANE_AGENTS=tasklane.demo_agents).

They set no `timeout` or `max_attempts` of their own: TASKLANE_TASK_TIMEOUT and
TASKLANE_MAX_ATTEMPTS apply.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

from domain.value_objects import TaskStatus
from worker.agents import PermanentError, TaskContext, WaitForSubtasks, agent

MAX_FANOUT = 10_000


def _field(ctx: TaskContext, name: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
    """Read `name` from a dict input; a missing or ill-typed value fails the task for good."""
    data = ctx.input
    if not isinstance(data, dict):
        raise PermanentError(f"input must be a JSON object, got {type(data).__name__}")
    if name not in data:
        if default is ...:
            raise PermanentError(f"input needs {name!r}")
        return default
    value = data[name]
    if isinstance(value, bool) or not isinstance(value, kind):
        raise PermanentError(f"input {name!r} has the wrong type: {value!r:.80}")
    return value


@agent("echo")
async def echo(ctx: TaskContext) -> dict[str, Any]:
    """Returns its input: {"echo": input}."""
    return {"echo": ctx.input}


@agent("sleep")
async def sleep(ctx: TaskContext) -> dict[str, Any]:
    """Sleeps for input.seconds, then returns {"slept": seconds}."""
    seconds = _field(ctx, "seconds", (int, float))
    if not math.isfinite(seconds) or seconds < 0:
        raise PermanentError(f"seconds must be a finite number ≥ 0, got {seconds!r}")
    await asyncio.sleep(seconds)
    return {"slept": seconds}


@agent("fail")
async def fail(ctx: TaskContext) -> dict[str, Any]:
    """Raises on its first input.fail_times attempts (always, without it), then succeeds."""
    fail_times = _field(ctx, "fail_times", int, None)
    message = _field(ctx, "message", str, "failing on purpose")
    if fail_times is None or ctx.attempt <= fail_times:
        raise RuntimeError(f"{message} (attempt {ctx.attempt})")
    return {"attempts": ctx.attempt}


@agent("square")
async def square(ctx: TaskContext) -> dict[str, Any]:
    """Returns {"y": x*x} for input.x."""
    x = _field(ctx, "x", (int, float))
    return {"y": x * x}


@agent("fanout")
async def fanout(ctx: TaskContext) -> dict[str, Any] | WaitForSubtasks:
    """Spawns input.n `square` subtasks with x = 0…n-1, waits, returns {"sum": Σ y}."""
    if ctx.step == 0:
        n = _field(ctx, "n", int)
        if not 0 <= n <= MAX_FANOUT:
            raise PermanentError(f"n must be between 0 and {MAX_FANOUT}, got {n}")
        if n == 0:
            return {"sum": 0}  # nothing to wait for
        for i in range(n):
            await ctx.spawn("square", {"x": i})
        return ctx.wait_for_subtasks()
    children = await ctx.subtasks()
    unfinished = [c for c in children if c.status is not TaskStatus.COMPLETED]
    if unfinished:
        states = ", ".join(sorted({c.status.value for c in unfinished}))
        raise PermanentError(
            f"{len(unfinished)} of {len(children)} subtasks did not complete ({states})"
        )
    return {"sum": sum(c.output["y"] for c in children)}


@agent("approval")
async def approval(ctx: TaskContext) -> Any:
    """A human approval: drafts input.request, waits (holding no slot) up to a day for
    `tasklane signal ID approval --payload '{"approved": true}'`, then acts on the answer."""
    if ctx.step == 0:
        await ctx.progress(0.5, "waiting for a person to approve")
        return ctx.wait_for_signal("approval", timeout=24 * 3600)
    if ctx.timed_out:
        return {"approved": False, "reason": "nobody answered within a day"}
    answer = ctx.signals["approval"]
    approved = isinstance(answer.payload, dict) and answer.payload.get("approved") is True
    await ctx.progress(1.0, "approved" if approved else "declined")
    return {"approved": approved, "by": answer.sent_by, "at": answer.sent_at.isoformat()}
