"""What the runtime calls at each point of a run, for metrics (worker/metrics.py) and traces
(worker/tracing.py).

`claiming` before a claim, `run_started` once the task is claimed, `step` as the run enters its
handler and its finish, `outcome` where the runtime logs how the run ended (the event name it
already logs, see metrics.RUN_OUTCOMES), and `run_ended` as the run leaves. The run in progress is
kept in a context variable: each run is its own asyncio task (an arq job), so runs never see each
other's. With metrics and tracing off, each call is a check or two and returns.
"""

from __future__ import annotations

import time
from contextvars import ContextVar
from dataclasses import dataclass

from domain.entities import Task
from worker import metrics, tracing
from worker.metrics import LOST, RUN_OUTCOMES


@dataclass(slots=True)
class _Run:
    agent: str | None  # the metrics' agent label; None with metrics off
    started: float  # time.monotonic()
    spans: tracing.RunSpans | None = None
    outcome: str | None = None
    error: str | None = None


_current: ContextVar[_Run | None] = ContextVar("tasklane_run", default=None)
_claim_started: ContextVar[int | None] = ContextVar("tasklane_claim_started", default=None)


def claiming() -> None:
    """A claim starts (its span is written once the claim tells which task it was)."""
    if tracing.enabled():
        _claim_started.set(time.time_ns())


def run_started(task: Task) -> None:
    served = metrics.current()
    traced = tracing.enabled()
    if served is None and not traced:
        return
    run = _Run(None, time.monotonic())
    if served is not None:
        run.agent = agent = served.agent_label(task.agent_id)
        started, queue_wait = served.started(agent)
        started.inc()
        if task.started_at is not None and task.run_after is not None:
            queue_wait.observe(max(0.0, (task.started_at - task.run_after).total_seconds()))
    if traced:
        run.spans = tracing.RunSpans(task, _claim_started.get())
        _claim_started.set(None)
    _current.set(run)


def step(name: str) -> None:
    """The run enters `name` (handler, finish): a child span of the run, current meanwhile."""
    run = _current.get()
    if run is not None and run.spans is not None:
        run.spans.begin(name)


def outcome(event: str, landed: bool, error: str | None = None) -> None:
    """The runtime logged `event` as the run's end; `landed`: its write took effect."""
    run = _current.get()
    if run is not None:
        run.outcome = RUN_OUTCOMES.get(event, LOST) if landed else LOST
        run.error = error


def run_ended() -> None:
    run = _current.get()
    if run is None:
        return
    _current.set(None)
    outcome_label = run.outcome or LOST
    served = metrics.current()
    if served is not None and run.agent is not None:
        finished, duration = served.finished(run.agent, outcome_label)
        finished.inc()
        duration.observe(time.monotonic() - run.started)
    if run.spans is not None:
        run.spans.outcome(outcome_label, run.error)
        run.spans.end()
