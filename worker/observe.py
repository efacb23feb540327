"""What the runtime calls at each point of a run, for metrics (worker/metrics.py).

Three calls per run: `run_started` once the task is claimed, `outcome` where the runtime logs how
the run ended (the event name it already logs, see metrics.RUN_OUTCOMES), and `run_ended` as the
run leaves. The run in progress is kept in a context variable: each run is its own asyncio task
(an arq job), so runs never see each other's. While metrics are off each call returns at once.
"""

from __future__ import annotations

import time
from contextvars import ContextVar
from dataclasses import dataclass

from domain.entities import Task
from worker import metrics
from worker.metrics import LOST, RUN_OUTCOMES


@dataclass(slots=True)
class _Run:
    agent: str
    started: float  # time.monotonic()
    outcome: str | None = None


_current: ContextVar[_Run | None] = ContextVar("tasklane_run", default=None)


def run_started(task: Task) -> None:
    served = metrics.current()
    if served is None:
        return
    agent = served.agent_label(task.agent_id)
    _current.set(_Run(agent, time.monotonic()))
    served.runs_started.labels(served.queue, agent).inc()
    if task.started_at is not None and task.run_after is not None:
        wait = (task.started_at - task.run_after).total_seconds()
        served.queue_wait.labels(served.queue, agent).observe(max(0.0, wait))


def outcome(event: str, landed: bool) -> None:
    """The runtime logged `event` as the run's end; `landed`: its write took effect."""
    run = _current.get()
    if run is not None:
        run.outcome = RUN_OUTCOMES.get(event, LOST) if landed else LOST


def run_ended() -> None:
    run = _current.get()
    served = metrics.current()
    if run is None or served is None:
        return
    _current.set(None)
    outcome_label = run.outcome or LOST
    served.runs_finished.labels(served.queue, run.agent, outcome_label).inc()
    served.run_duration.labels(served.queue, run.agent).observe(time.monotonic() - run.started)
