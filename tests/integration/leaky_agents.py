"""Agents whose errors carry whatever text the test hands them (test_secrets.py): an exception
with a cause, a PermanentError, and a Retry's reason."""

from __future__ import annotations

from typing import Any

from worker.agents import PermanentError, Retry, TaskContext, agent


@agent("t_leak_raise")
async def leak_raise(ctx: TaskContext) -> Any:
    try:
        raise KeyError(ctx.input["text"])
    except KeyError as cause:
        raise RuntimeError(ctx.input["text"]) from cause


@agent("t_leak_permanent")
async def leak_permanent(ctx: TaskContext) -> Any:
    raise PermanentError(ctx.input["text"])


@agent("t_leak_retry")
async def leak_retry(ctx: TaskContext) -> Any:
    raise Retry(after=0, reason=ctx.input["text"])
