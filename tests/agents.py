"""Agents used by the tests (load with TASKLANE_AGENTS=worker.demo_agents,tests.agents).

Several write marker rows into `test_marks` so tests can synchronise on "the handler is running
now" and count handler runs without sleeping: the marker is written by the handler itself,
through its own connection, outside the lifecycle.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import asyncpg

from domain.value_objects import TaskStatus
from worker.agents import PermanentError, Retry, TaskContext, WaitForSubtasks, agent

# Created in the test template database (tests/support/databases.py), never by migrations.
MARKS_DDL = """
CREATE TABLE test_marks (
    id bigserial PRIMARY KEY,
    task_id uuid NOT NULL,
    label text NOT NULL,
    attempt int NOT NULL,
    pid int NOT NULL,
    at timestamptz NOT NULL DEFAULT clock_timestamp()
)
"""


async def mark(ctx: TaskContext, label: str) -> None:
    """Record that this handler reached `label` (committed at once, visible to the test)."""
    url = os.environ.get("DATABASE_URL", "")
    dsn = url.replace("postgresql+asyncpg://", "postgresql://")
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "INSERT INTO test_marks (task_id, label, attempt, pid) VALUES ($1, $2, $3, $4)",
            ctx.task.id,
            label,
            ctx.attempt,
            os.getpid(),
        )
    finally:
        await conn.close()


@agent("t_marked_sleep")
async def marked_sleep(ctx: TaskContext) -> dict[str, Any]:
    """Marks 'started', sleeps input.seconds, marks 'finished'."""
    await mark(ctx, "started")
    await asyncio.sleep(float(ctx.input["seconds"]))
    await mark(ctx, "finished")
    return {"slept": ctx.input["seconds"], "attempt": ctx.attempt}


@agent("t_retry_after")
async def retry_after(ctx: TaskContext) -> dict[str, Any]:
    """Asks for a retry after input.after seconds on its first attempt."""
    if ctx.attempt == 1:
        raise Retry(after=float(ctx.input["after"]), reason="come back later")
    return {"attempt": ctx.attempt}


@agent("t_permanent")
async def permanent(ctx: TaskContext) -> dict[str, Any]:
    raise PermanentError("this can never work")


@agent("t_bad_output")
async def bad_output(ctx: TaskContext) -> Any:
    return {"value": float("nan")}


@agent("t_block_loop")
async def block_loop(ctx: TaskContext) -> dict[str, Any]:
    """Blocks the event loop (time.sleep) for input.seconds on its first attempt only."""
    await mark(ctx, "started")
    if ctx.attempt == 1:
        time.sleep(float(ctx.input["seconds"]))  # noqa: ASYNC251 - blocking is the point
    return {"attempt": ctx.attempt, "pid": os.getpid()}


@agent("t_nest")
async def nest(ctx: TaskContext) -> dict[str, Any] | WaitForSubtasks:
    """A tree: input.depth levels below this one, input.width children each; returns its leaves."""
    depth, width = int(ctx.input["depth"]), int(ctx.input["width"])
    if depth == 0:
        return {"leaves": 1}
    if ctx.step == 0:
        for _ in range(width):
            await ctx.spawn("t_nest", {"depth": depth - 1, "width": width})
        return ctx.wait_for_subtasks()
    children = await ctx.subtasks()
    return {"leaves": sum(c.output["leaves"] for c in children)}


@agent("t_collect")
async def collect(ctx: TaskContext) -> dict[str, Any] | WaitForSubtasks:
    """Spawns the subtasks listed in input.children ([{agent, input}]), waits, and reports
    each one's status, output and error."""
    if ctx.step == 0:
        for child in ctx.input["children"]:
            await ctx.spawn(child["agent"], child["input"])
        return ctx.wait_for_subtasks()
    await mark(ctx, "resumed")
    children = await ctx.subtasks()
    return {
        "children": [
            {"status": c.status.value, "output": c.output, "error": c.error} for c in children
        ]
    }


@agent("t_fire_and_forget")
async def fire_and_forget(ctx: TaskContext) -> dict[str, Any]:
    """Spawns input.n `square` subtasks without waiting for them."""
    for i in range(int(ctx.input["n"])):
        await ctx.spawn("square", {"x": i})
    return {"spawned": int(ctx.input["n"])}


@agent("t_spawn_then_fail")
async def spawn_then_fail(ctx: TaskContext) -> dict[str, Any]:
    """Spawns a subtask, then raises: the subtask must never exist."""
    await ctx.spawn("square", {"x": 1})
    raise PermanentError("failed after spawning")


@agent("t_count_runs")
async def count_runs(ctx: TaskContext) -> dict[str, Any]:
    """Marks every run, sleeps input.seconds (default 0), returns the attempt number."""
    await mark(ctx, "run")
    await asyncio.sleep(float(ctx.input.get("seconds", 0)))
    return {"attempt": ctx.attempt}


def statuses(children: list[Any]) -> list[str]:
    return [c.status.value if isinstance(c.status, TaskStatus) else c.status for c in children]


@agent("t_twice", max_attempts=2, timeout=5)
async def twice(ctx: TaskContext) -> dict[str, Any]:
    """Always fails; its decorator allows 2 attempts."""
    raise RuntimeError(f"attempt {ctx.attempt} failed")


@agent("t_cancellable")
async def cancellable(ctx: TaskContext) -> dict[str, Any]:
    """Marks 'started', sleeps input.seconds; marks 'interrupted' if cancelled meanwhile."""
    await mark(ctx, "started")
    try:
        await asyncio.sleep(float(ctx.input["seconds"]))
    except asyncio.CancelledError:
        await asyncio.shield(mark(ctx, "interrupted"))
        raise
    await mark(ctx, "finished")
    return {"finished": True}


@agent("t_graceful")
async def graceful(ctx: TaskContext) -> dict[str, Any]:
    """Marks 'started', sleeps input.seconds on the task's first run (input.then, default 0, on
    later runs), marks 'finished'; marks 'interrupted' if cancelled meanwhile."""
    await mark(ctx, "started")
    seconds = ctx.input["seconds"] if ctx.task.runs == 1 else ctx.input.get("then", 0)
    try:
        await asyncio.sleep(float(seconds))
    except asyncio.CancelledError:
        await asyncio.shield(mark(ctx, "interrupted"))
        raise
    await mark(ctx, "finished")
    return {"run": ctx.task.runs, "pid": os.getpid()}


@agent("t_block_until")
async def block_until(ctx: TaskContext) -> dict[str, Any]:
    """On the task's first run, marks 'started' and blocks the event loop (time.sleep) until the
    file input.release exists (at most input.max_seconds, default 60); other runs return at once.
    Returns the run and the pid that produced the output."""
    await mark(ctx, "started")
    if ctx.task.runs == 1:
        deadline = time.monotonic() + float(ctx.input.get("max_seconds", 60))
        release = ctx.input["release"]
        while not os.path.exists(release) and time.monotonic() < deadline:  # noqa: ASYNC240
            time.sleep(0.05)  # noqa: ASYNC251 - blocking the loop is the point
    return {"run": ctx.task.runs, "pid": os.getpid()}


@agent("t_long_first_run")
async def long_first_run(ctx: TaskContext) -> dict[str, Any]:
    """Sleeps input.seconds on the task's first run, input.then (default 0) on later runs; no
    marks (no connection of its own), so hundreds can run at once."""
    seconds = ctx.input["seconds"] if ctx.task.runs == 1 else ctx.input.get("then", 0)
    await asyncio.sleep(float(seconds))
    return {"run": ctx.task.runs, "pid": os.getpid()}


@agent("t_stubborn")
async def stubborn(ctx: TaskContext) -> dict[str, Any]:
    """Ignores cancellation: keeps sleeping until input.seconds have passed in all."""
    await mark(ctx, "started")
    deadline = time.monotonic() + float(ctx.input["seconds"])
    while time.monotonic() < deadline:
        try:
            await asyncio.sleep(deadline - time.monotonic())
        except asyncio.CancelledError:
            await mark(ctx, "ignored-cancel")
    return {"stubborn": True}


@agent("t_raise")
async def raise_(ctx: TaskContext) -> dict[str, Any]:
    """Raises what input.kind says: a message with NUL and a lone surrogate, a huge message, or
    an exception whose str() itself raises. Marks every run."""
    await mark(ctx, "run")
    kind = ctx.input["kind"]
    if kind == "unstorable":
        raise RuntimeError("nul \x00 and a lone surrogate \udc80 in the message")
    if kind == "huge":
        raise RuntimeError("x" * 100_000)
    raise _Unprintable()


class _Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no message for you")


@agent("t_return")
async def return_(ctx: TaskContext) -> Any:
    """Returns input.value, or input.bytes characters of text. Marks every run."""
    await mark(ctx, "run")
    if "bytes" in ctx.input:
        return "y" * int(ctx.input["bytes"])
    return ctx.input["value"]


@agent("t_spawn_many")
async def spawn_many(ctx: TaskContext) -> Any:
    """Spawns input.n `echo` subtasks (with metadata of input.metadata_bytes) and waits."""
    await mark(ctx, "run")
    if ctx.step == 0:
        metadata = {"big": "z" * int(ctx.input.get("metadata_bytes", 0))}
        for _ in range(int(ctx.input["n"])):
            await ctx.spawn("echo", {}, metadata=metadata)
        return ctx.wait_for_subtasks()
    return {"done": True}


@agent("t_wait_for_nothing")
async def wait_for_nothing(ctx: TaskContext) -> Any:
    """Waits for subtasks without spawning any."""
    await mark(ctx, "run")
    return ctx.wait_for_subtasks()


@agent("t_retry_forever_later")
async def retry_forever_later(ctx: TaskContext) -> Any:
    """Asks for a retry after an infinite delay."""
    await mark(ctx, "run")
    raise Retry(after=float("inf"))


@agent("t_deaf", timeout=1)
async def deaf(ctx: TaskContext) -> dict[str, Any]:
    """Times out after 1 s and ignores every cancellation, for input.seconds in all."""
    await mark(ctx, "started")
    deadline = time.monotonic() + float(ctx.input["seconds"])
    while time.monotonic() < deadline:
        try:
            await asyncio.sleep(deadline - time.monotonic())
        except asyncio.CancelledError:
            continue
    return {"deaf": True}
