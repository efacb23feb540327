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
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeAlias
from uuid import UUID

from domain.entities import Task, check_agent_id, check_max_attempts
from domain.exceptions import InvalidInputError
from domain.payload import JsonValue, encode_json
from persistence.repositories.flow_repository import Declared, parse_key
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


class RateLimited(Exception):
    """Raised by a handler whose provider said "too many requests" (an HTTP 429): the task goes
    back to pending without spending an attempt, due after `after` seconds, and its key (its
    agent, for an agent without keys) is paused as long: nothing else of it starts meanwhile."""

    def __init__(self, after: float, reason: str | None = None) -> None:
        if isinstance(after, bool) or not isinstance(after, int | float):
            raise ValueError(f"RateLimited(after=…) must be a number of seconds, got {after!r}")
        if not 0 < after <= MAX_RETRY_AFTER_SECONDS:
            raise ValueError(
                f"RateLimited(after=…) must be between 0 and {MAX_RETRY_AFTER_SECONDS:g} "
                f"seconds, got {after!r}"
            )
        self.after = float(after)
        self.reason = reason
        super().__init__(reason or f"rate limited for {after:g}s")


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
    # Flow control's defaults for this agent (operators override them live): see `agent`.
    flow: Declared | None = None


_registry: dict[str, AgentSpec] = {}

_PER = {"s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60, "h": 3600,
        "hour": 3600, "d": 86400, "day": 86400}  # fmt: skip


def parse_rate(rate: str) -> float:
    """ "60/min" → 1.0: units per second. Periods: s, min, h, day (or second, minute, hour)."""
    amount, slash, per = str(rate).strip().partition("/")
    try:
        value = float(amount)
    except ValueError:
        value = float("nan")
    seconds = _PER.get(per.strip().lower().rstrip("s") or "s") if slash else None
    if not slash or seconds is None or not 0 < value < 1e12:
        raise ValueError(f"a rate is 'N/s', 'N/min', 'N/h' or 'N/day' with N > 0, got {rate!r:.40}")
    return value / seconds


def _flow(
    agent_id: str,
    *,
    concurrency: int | None,
    per_key: int | None,
    key: str | None,
    rate: str | None,
    key_rate: str | None,
    units: str,
    estimate: float,
) -> Declared | None:
    for name, value in (("concurrency", concurrency), ("per_key", per_key)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 1):  # fmt: skip
            raise ValueError(f"@agent({agent_id!r}): {name} must be a whole number ≥ 1")
    if (per_key is not None or key_rate is not None) and key is None:
        raise ValueError(f"@agent({agent_id!r}): per_key and key_rate need key='metadata.<field>'")
    if key is not None:
        parse_key(key)
    if not isinstance(estimate, int | float) or not 0 < estimate < 1e12:
        raise ValueError(f"@agent({agent_id!r}): estimate must be a positive number of {units}")
    declared = Declared(
        agent_id,
        concurrency=concurrency,
        per_key=per_key,
        rate=None if rate is None else parse_rate(rate),
        key_rate=None if key_rate is None else parse_rate(key_rate),
        key=key,
        units=units,
        estimate=float(estimate),
    )
    return declared if declared.declares or key is not None else None


def agent(
    agent_id: str,
    *,
    timeout: float | None = None,
    max_attempts: int | None = None,
    description: str | None = None,
    concurrency: int | None = None,
    per_key: int | None = None,
    key: str | None = None,
    rate: str | None = None,
    key_rate: str | None = None,
    units: str = "tasks",
    estimate: float = 1.0,
) -> Callable[[Handler], Handler]:
    """Register an async handler for `agent_id` when its module is imported.

    Flow control (enforced in Postgres across every worker; operators override it live with
    `tasklane limits set`): at most `concurrency` of its tasks run at once, at most `per_key`
    of one key, the key read from each task at `key` ("metadata.tenant", "input.user"); at most
    `rate` starts ("60/min"), or `units` ("tokens": `rate="90000/min"`, `estimate` tokens per
    task at its claim, corrected by `ctx.consume(tokens=…)`), and `key_rate` per key.
    """
    try:
        check_agent_id(agent_id)
    except InvalidInputError as exc:
        raise ValueError(f"@agent: {exc}") from None
    if timeout is not None and not timeout > 0:
        raise ValueError(f"@agent({agent_id!r}): timeout must be > 0 seconds, got {timeout!r}")
    try:
        check_max_attempts(max_attempts)
        flow = _flow(
            agent_id,
            concurrency=concurrency,
            per_key=per_key,
            key=key,
            rate=rate,
            key_rate=key_rate,
            units=units,
            estimate=estimate,
        )
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
        _registry[agent_id] = AgentSpec(agent_id, handler, timeout, max_attempts, doc, flow)
        return handler

    return register


def _wait_seconds(seconds: float | None) -> float | None:
    if seconds is None:
        return None
    if isinstance(seconds, bool) or not isinstance(seconds, int | float):
        raise ValueError(f"a wait is a number of seconds, got {seconds!r}")
    if not 0 <= seconds <= MAX_WAIT_SECONDS:
        raise ValueError(f"a wait is between 0 and {MAX_WAIT_SECONDS:g} seconds, got {seconds!r}")
    return float(seconds)


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

# The longest durable wait: a year.
MAX_WAIT_SECONDS = 365 * 24 * 3600.0
# A task's progress is written at most this often (the last one always lands, at the run's end).
PROGRESS_EVERY_SECONDS = 0.25


class WaitFor(WaitForSubtasks):
    """What `ctx.wait_for_signal()` and `ctx.sleep()` return: park the task until a signal, a
    time, and (with subtasks spawned in this step) its subtasks."""

    __slots__ = ("deadline_seconds", "on_timeout", "signals")

    def __init__(
        self, signals: tuple[str, ...], deadline_seconds: float | None, on_timeout: str
    ) -> None:
        self.signals = signals
        self.deadline_seconds = deadline_seconds
        self.on_timeout = on_timeout


@dataclass(frozen=True, slots=True)
class Signal:
    """A signal a resumed step reads in `ctx.signals[name]`."""

    name: str
    payload: Any
    sent_by: str
    sent_at: datetime


SubtaskLoader = Callable[[UUID], Awaitable[list[Task]]]


class TaskContext:
    """What a handler gets: the task, its input, a logger, and the subtask operations."""

    def __init__(
        self,
        task: Task,
        *,
        log: Any,
        load_subtasks: SubtaskLoader,
        limits: Limits = Limits(),
        signals: Mapping[str, Signal] | None = None,
        report_progress: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        self.task = task
        self.log = log
        self._load_subtasks = load_subtasks
        self._limits = limits
        self._spawned: list[Task] = []
        self.consumed: dict[str, float] = {}
        self._signals = dict(signals or {})
        self._report_progress = report_progress
        self._progress_at = 0.0
        self.pending_progress: str | None = None  # throttled: written at the run's end

    @property
    def signals(self) -> dict[str, Signal]:
        """The signals this step resumed with, by name (`ctx.wait_for_signal`)."""
        return dict(self._signals)

    @property
    def timed_out(self) -> bool:
        """This step resumed because its signal wait timed out (no signal arrived)."""
        return self.task.woke_by == "timeout"

    def wait_for_signal(
        self, *names: str, timeout: float | None = None, on_timeout: str = "resume"
    ) -> WaitFor:
        """`return ctx.wait_for_signal("approval", timeout=3600)`: the task waits, holding no
        slot and no lease, until one of `names` is signalled (`TaskClient.signal`, `tasklane
        signal`, or an INSERT into task_signals); then its handler runs again with
        `ctx.signals[name]`. After `timeout` seconds with none, it resumes with
        `ctx.timed_out` set — or fails, with `on_timeout="fail"`. Subtasks spawned in this step
        are waited for too."""
        if not names or not all(isinstance(n, str) and 0 < len(n) <= 200 for n in names):
            raise ValueError("wait_for_signal needs one or more names of 1 to 200 characters")
        if on_timeout not in ("resume", "fail"):
            raise ValueError(f"on_timeout must be 'resume' or 'fail', got {on_timeout!r}")
        return WaitFor(tuple(dict.fromkeys(names)), _wait_seconds(timeout), on_timeout)

    def sleep(self, seconds: float | None = None, *, until: datetime | None = None) -> WaitFor:
        """`return ctx.sleep(3600)` (or `until=` an aware datetime): the task waits until then,
        holding nothing, across restarts of every worker; then its handler runs again."""
        if (seconds is None) == (until is None):
            raise ValueError("ctx.sleep takes seconds or until=, one of them")
        if until is not None:
            if until.tzinfo is None:
                raise ValueError("ctx.sleep(until=…) must be timezone-aware")
            seconds = max(0.0, (until - datetime.now(until.tzinfo)).total_seconds())
        return WaitFor((), _wait_seconds(seconds), "resume")

    async def progress(
        self, fraction: float | None = None, message: str | None = None, *, data: Any = None
    ) -> None:
        """Keep this run's progress on the task (`show`, `--json`): a fraction from 0 to 1, a
        message, any JSON data. Written at most four times a second; the last always lands."""
        if fraction is not None and not (isinstance(fraction, int | float) and 0 <= fraction <= 1):
            raise ValueError(f"progress must be between 0 and 1, got {fraction!r}")
        document = {"fraction": fraction, "message": message, "data": data, "step": self.step}
        self.pending_progress = encode_json(document, what="progress", max_bytes=64 * 1024)
        now = time.monotonic()
        if self._report_progress is not None and now - self._progress_at >= PROGRESS_EVERY_SECONDS:
            self._progress_at = now
            written, self.pending_progress = self.pending_progress, None
            await self._report_progress(written)

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
        priority: int | None = None,
    ) -> Task:
        """Create a subtask of this task (same conversation). It is written when the handler
        returns: together with the parent's wait (`return ctx.wait_for_subtasks()`) or with its
        completion (fire-and-forget). If the handler raises, no subtask is created. The subtask
        has this task's priority unless `priority` says otherwise."""
        try:
            child = self._new_child(
                agent_id,
                input,
                metadata,
                max_attempts,
                run_after,
                self.task.priority if priority is None else priority,
            )
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
        priority: int,
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
            priority=priority,
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

    def consume(self, **units: float) -> None:
        """Report what this run really used against its agent's weighted rate limit
        (`ctx.consume(tokens=1234)`): the estimate taken at its claim is corrected by the
        difference when the run ends. Calls add up."""
        for name, amount in units.items():
            if isinstance(amount, bool) or not isinstance(amount, int | float) or amount < 0:
                raise ValueError(f"ctx.consume({name}=…) must be a number ≥ 0, got {amount!r}")
            self.consumed[name] = self.consumed.get(name, 0.0) + float(amount)

    def wait_for_subtasks(self) -> WaitForSubtasks:
        """`return ctx.wait_for_subtasks()`: the task waits until every subtask has finished,
        then its handler runs again (with `ctx.step` one higher)."""
        return _WAIT

    async def subtasks(self) -> list[Task]:
        """This task's subtasks as they are now, in creation order (status, output, error)."""
        return await self._load_subtasks(self.task.id)
