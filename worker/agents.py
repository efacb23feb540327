"""The public API for writing agents: `@agent`, `TaskContext`, `Retry`, `PermanentError`.

```python
from worker.agents import agent, TaskContext

@agent("echo", timeout=30, max_attempts=3)
async def echo(ctx: TaskContext) -> dict:
    ctx.log.info("echoing")
    return {"echo": ctx.input}
```
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeAlias
from uuid import UUID

from domain.entities import Task, check_agent_id, check_max_attempts
from domain.exceptions import InvalidInputError
from domain.payload import JsonValue, encode_json
from worker import tracing  # observability

Handler: TypeAlias = Callable[["TaskContext"], Awaitable[Any]]


# The longest a handler may ask to be retried after: a year.
MAX_RETRY_AFTER_SECONDS = 365 * 24 * 3600.0


class Retry(Exception):
    """Raised by a handler: run me again after `after` seconds (default: the backoff)."""

    def __init__(self, after: float | None = None, reason: str | None = None) -> None:
        if after is not None and not 0 <= after <= MAX_RETRY_AFTER_SECONDS:
            raise ValueError(
                f"Retry(after=…) must be between 0 and {MAX_RETRY_AFTER_SECONDS:g} seconds, "
                f"got {after!r}"
            )
        self.after = after
        self.reason = reason
        super().__init__(reason or "retry requested")


class PermanentError(Exception):
    """Raised by a handler: this task can never succeed; fail it now, without retrying."""


class SpawnRefused(PermanentError, InvalidInputError):
    """`ctx.spawn` refused a subtask (a bad agent id or input, over a limit): the same spawn
    would be refused on every retry, so the run fails at once, with the reason."""


@dataclass(frozen=True, slots=True)
class Limits:
    """What a handler's run may produce (the TASKLANE_MAX_* settings)."""

    max_input_bytes: int | None = None  # a subtask's input
    max_children: int | None = None  # subtasks one step may spawn


@dataclass(frozen=True, slots=True)
class AgentSpec:
    id: str
    handler: Handler
    timeout: float | None = None  # None: TASKLANE_TASK_TIMEOUT
    max_attempts: int | None = None  # None: TASKLANE_MAX_ATTEMPTS
    description: str | None = None


_registry: dict[str, AgentSpec] = {}


def agent(
    agent_id: str,
    *,
    timeout: float | None = None,
    max_attempts: int | None = None,
    description: str | None = None,
) -> Callable[[Handler], Handler]:
    """Register an async handler for `agent_id` when its module is imported."""
    try:
        check_agent_id(agent_id)
    except InvalidInputError as exc:
        raise ValueError(f"@agent: {exc}") from None
    if timeout is not None and not timeout > 0:
        raise ValueError(f"@agent({agent_id!r}): timeout must be > 0 seconds, got {timeout!r}")
    try:
        check_max_attempts(max_attempts)
    except InvalidInputError as exc:
        raise ValueError(f"@agent({agent_id!r}): {exc}") from None

    def register(handler: Handler) -> Handler:
        if not inspect.iscoroutinefunction(handler):
            raise TypeError(f"@agent({agent_id!r}): {handler.__qualname__} must be `async def`")
        existing = _registry.get(agent_id)
        if existing is not None and existing.handler is not handler:
            where = f"{existing.handler.__module__}.{existing.handler.__qualname__}"
            raise ValueError(f"agent {agent_id!r} is already registered by {where}")
        doc = description or (inspect.getdoc(handler) or "").split("\n")[0] or None
        _registry[agent_id] = AgentSpec(agent_id, handler, timeout, max_attempts, doc)
        return handler

    return register


def load_agents(modules: Iterable[str]) -> dict[str, AgentSpec]:
    """Import the handler modules and return the agents registered so far, by id."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ImportError(
                f"cannot import agent module {module!r} (TASKLANE_AGENTS): {exc}"
            ) from exc
    return dict(_registry)


class WaitForSubtasks:
    """What `ctx.wait_for_subtasks()` returns: tells the worker to park the task."""

    __slots__ = ()


_WAIT = WaitForSubtasks()

SubtaskLoader = Callable[[UUID], Awaitable[list[Task]]]


class TaskContext:
    """What a handler gets: the task, its input, a logger, and the subtask operations."""

    def __init__(
        self, task: Task, *, log: Any, load_subtasks: SubtaskLoader, limits: Limits = Limits()
    ) -> None:
        self.task = task
        self.log = log
        self._load_subtasks = load_subtasks
        self._limits = limits
        self._spawned: list[Task] = []

    @property
    def input(self) -> JsonValue:
        return self.task.input

    @property
    def attempt(self) -> int:
        """1 on the first run of the current step, 2 on its first retry…"""
        return self.task.attempts

    @property
    def step(self) -> int:
        """0 on the first run; +1 each time the task resumes after its subtasks finished."""
        return self.task.step

    @property
    def spawned(self) -> list[Task]:
        return list(self._spawned)

    async def spawn(
        self,
        agent_id: str,
        input: JsonValue,
        *,
        metadata: Mapping[str, Any] | None = None,
        max_attempts: int | None = None,
        run_after: datetime | None = None,
    ) -> Task:
        """Create a subtask of this task (same conversation). It is written when the handler
        returns: together with the parent's wait (`return ctx.wait_for_subtasks()`) or with its
        completion (fire-and-forget). If the handler raises, no subtask is created."""
        try:
            child = self._new_child(agent_id, input, metadata, max_attempts, run_after)
        except InvalidInputError as exc:
            raise SpawnRefused(f"cannot spawn a subtask: {exc}") from None
        self._spawned.append(child)
        return child

    def _new_child(
        self,
        agent_id: str,
        input: JsonValue,
        metadata: Mapping[str, Any] | None,
        max_attempts: int | None,
        run_after: datetime | None,
    ) -> Task:
        limit = self._limits.max_children
        if limit is not None and len(self._spawned) >= limit:
            raise InvalidInputError(
                f"one step may spawn at most {limit} subtasks (TASKLANE_MAX_CHILDREN)"
            )
        if run_after is not None and run_after.tzinfo is None:
            raise InvalidInputError("run_after must be timezone-aware")
        if metadata is not None and not isinstance(metadata, Mapping):
            raise InvalidInputError("metadata must be a JSON object (a dict)")
        child = Task(
            conversation_id=self.task.conversation_id,
            agent_id=agent_id,
            input=input,
            parent_task_id=self.task.id,
            metadata=dict(metadata or {}),
            max_attempts=max_attempts,
            run_after=run_after,
            queue=self.task.queue,
            trace_context=tracing.carrier() or self.task.trace_context,  # observability
        )
        # Refused here, where the handler can see it: found only when the run's result is
        # written, the whole write would fail and the run be abandoned until its lease ran out.
        child.check_new()
        what = f"subtask {agent_id!r:.60}"
        size = self._limits.max_input_bytes
        encode_json(child.input, what=f"input of {what}", max_bytes=size)
        encode_json(child.metadata, what=f"metadata of {what}", max_bytes=size)
        return child

    def wait_for_subtasks(self) -> WaitForSubtasks:
        """`return ctx.wait_for_subtasks()`: the task waits until every subtask has finished,
        then its handler runs again (with `ctx.step` one higher)."""
        return _WAIT

    async def subtasks(self) -> list[Task]:
        """This task's subtasks as they are now, in creation order (status, output, error)."""
        return await self._load_subtasks(self.task.id)
