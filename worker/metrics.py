"""Prometheus metrics of one worker process, served on /metrics (TASKLANE_METRICS_PORT).

Off by default: with no port set, `METRICS` stays None and every hook is one attribute test.
Each worker counts what it does itself (runs started and how they ended, their durations and
queue waits, its slots, its reconciler's actions, the backend errors it met). Queue-level gauges
read from PostgreSQL (due tasks, oldest due task, live workers) are served once per scrape by
`tasklane metrics` (worker/exporter.py) instead, so that N workers do not run that query N times.

Label values are bounded: queue (chosen by the operator), agent (only agents this worker serves;
any other id, which a producer chooses freely, is counted as UNKNOWN_AGENT), outcome, kind,
backend and operation (fixed sets). No task ids.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    start_http_server,
)

UNKNOWN_AGENT = "(unknown)"
# Run outcomes: the runtime's closing log event → the `outcome` label. A run that ends with no
# such event (its write failed, or it was abandoned as no longer ours) counts as "lost".
RUN_OUTCOMES = {
    "task.completed": "completed",
    "task.failed": "failed",
    "task.retrying": "retry",
    "task.waiting": "waiting",
    "task.handed_back": "handed_back",
    "task.released": "released",
}
LOST = "lost"
RECONCILER_KINDS = ("rescued", "resumed", "dispatched", "unblocked")
# Seconds: runs of agent handlers range from milliseconds to many minutes.
DURATION_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600,
)  # fmt: skip


class MetricsError(RuntimeError):
    """The metrics cannot be served (the port is taken); the message says so in one line."""


class WorkerMetrics:
    """The series of one worker, in their own registry (never the global one: tests and
    embedding applications may build several)."""

    def __init__(self, queue: str, agents: frozenset[str]) -> None:
        self.queue = queue
        self.agents = agents
        self.registry = registry = CollectorRegistry(auto_describe=True)
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            registry.register(collector)
        self.runs_started = Counter(
            "tasklane_runs_started",
            "Handler runs started (tasks claimed), by queue and agent.",
            ["queue", "agent"],
            registry=registry,
        )
        self.runs_finished = Counter(
            "tasklane_runs_finished",
            "Runs ended, by outcome: completed, failed, retry, waiting, handed_back, released, "
            "lost (the outcome could not be written, or the task was no longer this run's).",
            ["queue", "agent", "outcome"],
            registry=registry,
        )
        self.run_duration = Histogram(
            "tasklane_run_duration_seconds",
            "From claim to the run's outcome written.",
            ["queue", "agent"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.queue_wait = Histogram(
            "tasklane_queue_wait_seconds",
            "From when a task was due to when a run claimed it (PostgreSQL's clock both).",
            ["queue", "agent"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.reconciler_actions = Counter(
            "tasklane_reconciler_actions",
            "Reconciler actions of this worker: rescued (lease expired), resumed (a waiting "
            "parent nobody resumed), dispatched (doorbells rung for due tasks), unblocked.",
            ["queue", "kind"],
            registry=registry,
        )
        self.backend_errors = Counter(
            "tasklane_backend_errors",
            "Calls to PostgreSQL or Redis that failed, by backend and operation.",
            ["backend", "operation"],
            registry=registry,
        )
        self.reconcile_failures = Counter(
            "tasklane_reconcile_failures",
            "Reconciler steps that failed (PostgreSQL or Redis away), by step.",
            ["queue", "step"],
            registry=registry,
        )
        self.slots = Gauge(
            "tasklane_worker_slots",
            "This worker's job slots, busy or free, read at scrape time.",
            ["queue", "state"],
            registry=registry,
        )
        self._started: dict[str, tuple[Any, Any]] = {}
        self._finished: dict[tuple[str, str], tuple[Any, Any]] = {}
        for kind in RECONCILER_KINDS:  # present at 0 from the start: rate() needs a baseline
            self.reconciler_actions.labels(queue, kind)

    def agent_label(self, agent_id: str) -> str:
        return agent_id if agent_id in self.agents else UNKNOWN_AGENT

    # The labelled series of the hot path, looked up once: prometheus_client's `labels()`
    # validates and locks on every call (most of a run's metrics cost before these caches).

    def started(self, agent: str) -> tuple[Any, Any]:
        """(runs_started, queue_wait) of `agent`."""
        found = self._started.get(agent)
        if found is None:
            found = self._started[agent] = (
                self.runs_started.labels(self.queue, agent),
                self.queue_wait.labels(self.queue, agent),
            )
        return found

    def finished(self, agent: str, outcome: str) -> tuple[Any, Any]:
        """(runs_finished of the outcome, run_duration) of `agent`."""
        found = self._finished.get((agent, outcome))
        if found is None:
            found = self._finished[(agent, outcome)] = (
                self.runs_finished.labels(self.queue, agent, outcome),
                self.run_duration.labels(self.queue, agent),
            )
        return found

    def watch_slots(self, concurrency: int, busy: Callable[[], int]) -> None:
        self.slots.labels(self.queue, "busy").set_function(lambda: float(busy()))
        self.slots.labels(self.queue, "free").set_function(
            lambda: float(max(0, concurrency - busy()))
        )

    def reconciled(self, kind: str, count: int = 1) -> None:
        if count:
            self.reconciler_actions.labels(self.queue, kind).inc(count)


class _Served:
    """The process's metrics and the HTTP server that serves them."""

    metrics: WorkerMetrics | None = None
    server: WSGIServer | None = None
    thread: threading.Thread | None = None


def current() -> WorkerMetrics | None:
    """This process's metrics, or None when they are off."""
    return _Served.metrics


def start(
    *,
    port: int,
    host: str,
    queue: str,
    agents: Iterable[str],
    concurrency: int,
    busy: Callable[[], int],
) -> WorkerMetrics:
    """Serve this worker's metrics on host:port from a thread (prometheus_client's server)."""
    disable_created_metrics()  # type: ignore[no-untyped-call]  # no *_created series: half the lines, nothing a dashboard reads
    served = WorkerMetrics(queue, frozenset(agents))
    served.watch_slots(concurrency, busy)
    try:
        server, thread = start_http_server(port, host, registry=served.registry)
    except OSError as exc:
        raise MetricsError(
            f"cannot serve metrics on {host}:{port} (TASKLANE_METRICS_PORT): {exc.strerror or exc}"
        ) from None
    _Served.metrics, _Served.server, _Served.thread = served, server, thread
    return served


def stop() -> None:
    server, thread = _Served.server, _Served.thread
    _Served.metrics = _Served.server = _Served.thread = None
    if server is not None:
        server.shutdown()
        server.server_close()
    if thread is not None:
        thread.join(timeout=5)


# -- hooks for the worker's code (each a no-op while metrics are off) ------------------------------


def backend_error(backend: str, operation: str) -> None:
    metrics = _Served.metrics
    if metrics is not None:
        metrics.backend_errors.labels(backend, operation).inc()


def reconciled(kind: str, count: int = 1) -> None:
    metrics = _Served.metrics
    if metrics is not None:
        metrics.reconciled(kind, count)


def reconcile_failed(step: str) -> None:
    metrics = _Served.metrics
    if metrics is not None:
        metrics.reconcile_failures.labels(metrics.queue, step).inc()
