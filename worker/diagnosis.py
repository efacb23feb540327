"""Why a task is where it is: the one-line reason `tasklane show` prints.

Pure: the caller reads the facts (the task's row, the database clock, the live workers, its
children's statuses) and this module only reasons about them, so every reason can be tested
without a database (tests/unit/test_diagnosis.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from domain.entities import WorkerInfo
from domain.value_objects import FINISHED_STATUSES, TaskStatus
from worker.cli_format import counted, duration, first_line

ERROR_LIMIT = 120  # characters of an error's first line quoted in a reason


def explain(
    row: Mapping[str, Any],
    *,
    now: datetime,
    workers: Sequence[WorkerInfo],
    children: Mapping[TaskStatus, int],
    hold: Mapping[str, Any] | None = None,
) -> str | None:
    """One line saying why a task is not progressing, or what it is doing (None: completed).

    `row` is the task's row of `tasks` by column name, `now` the database clock, `workers` the
    live workers of every queue, `children` the task's children counted by status (read only
    for a waiting task), `hold` what flow control may hold a pending task by (its scope's
    pause, its agent's limits and their use: `FlowRepository.hold_of`)."""
    status = TaskStatus(row["status"])
    queue = row["queue"]
    on_queue = [w for w in workers if w.queue == queue]
    if status is TaskStatus.PENDING:
        held = _held(row, now, hold) if hold and row["run_after"] <= now else None
        return held or _explain_pending(row, now, on_queue, workers)
    if status is TaskStatus.RUNNING:
        return _explain_running(row, now, on_queue)
    if status is TaskStatus.WAITING:
        return _explain_waiting(children, queue, on_queue)
    if status is TaskStatus.FAILED:
        error = first_line(row["error"], ERROR_LIMIT) or "no error recorded"
        return (
            f"failed after {counted(row['attempts'], 'attempt')}: {error} "
            f"— `tasklane retry {row['id']}` runs it again"
        )
    if status is TaskStatus.CANCELLED:
        return "cancelled: it will not run again"
    return None


def _explain_pending(
    row: Mapping[str, Any],
    now: datetime,
    on_queue: Sequence[WorkerInfo],
    workers: Sequence[WorkerInfo],
) -> str:
    queue = row["queue"]
    run_after: datetime = row["run_after"]
    if run_after > now:
        wait = duration(run_after - now)
        if row["attempts"] and row["error"]:
            limit = row["max_attempts"] or "?"
            return (
                f"pending: attempt {row['attempts']} of {limit} failed "
                f"({first_line(row['error'], ERROR_LIMIT)}); next attempt in {wait}"
            )
        return f"pending: not due yet, runs in {wait}"
    due = duration(now - run_after)
    if not on_queue:
        others = sorted({w.queue for w in workers})
        elsewhere = f" (live workers serve: {', '.join(others)})" if others else ""
        return (
            f"pending: due {due} ago but no live worker for queue {queue!r}{elsewhere} "
            "— is a worker running for this queue?"
        )
    agent = row["agent_id"]
    if not any(agent in w.agents for w in on_queue):
        served = sorted({a for w in on_queue for a in w.agents})
        return (
            f"pending: due {due} ago; no live worker on queue {queue!r} serves agent {agent!r} "
            f"(they serve: {', '.join(served) or 'none'}), so it will fail as an unknown agent"
        )
    return (
        f"pending: due {due} ago, not claimed yet by the {counted(len(on_queue), 'live worker')} "
        f"on queue {queue!r}"
    )


def _held(row: Mapping[str, Any], now: datetime, hold: Mapping[str, Any]) -> str | None:
    """What flow control holds a due task by, if anything: a pause, a limit, a rate."""
    agent = row["agent_id"]
    if hold.get("pause_reason") is not None:
        scope = (
            f"key {hold['paused_key']!r} of agent {agent!r}"
            if hold["paused_key"]
            else f"agent {agent!r}"
            if hold["paused_agent"]
            else f"queue {row['queue']!r}"
        )
        until = hold["paused_until"]
        ends = f" (until {until:%Y-%m-%d %H:%M:%S}Z)" if until is not None else ""
        return (
            f"pending: {scope} paused since {hold['paused_at']:%Y-%m-%d %H:%M:%S}Z by "
            f"{hold['paused_by']}: {first_line(hold['pause_reason'], ERROR_LIMIT)}{ends} "
            "— `tasklane resume` lifts it"
        )
    concurrency, running = hold.get("eff_concurrency"), hold.get("running", 0)
    if concurrency is not None and running >= concurrency:
        return f"pending: agent {agent!r} at its limit, {running} of {concurrency} running"
    per_key, key_running = hold.get("eff_per_key"), hold.get("key_running", 0)
    if per_key is not None and key_running >= per_key:
        return (
            f"pending: key {hold['limit_key']!r} of agent {agent!r} at its limit, "
            f"{key_running} of {per_key} running"
        )
    for rate, tat, what in (
        ("eff_rate", "agent_tat", f"agent {agent!r}"),
        ("eff_key_rate", "key_tat", f"key {hold.get('limit_key')!r} of agent {agent!r}"),
    ):
        if hold.get(rate) is not None and hold.get(tat) is not None and hold[tat] > now:
            return f"pending: {what} rate limited until {hold[tat]:%H:%M:%S}Z"
    return None


def _explain_running(row: Mapping[str, Any], now: datetime, on_queue: Sequence[WorkerInfo]) -> str:
    lease: datetime | None = row["lease_expires_at"]
    worker = row["worker_id"] or "?"
    attempt = f"attempt {row['attempts']} of {row['max_attempts'] or '?'}"
    if lease is not None and lease <= now:
        rescuer = (
            "will be rescued at the next reconcile tick"
            if on_queue
            else f"will be rescued once a worker runs for queue {row['queue']!r} (none is live)"
        )
        return f"running: lease expired {duration(now - lease)} ago ({attempt}), {rescuer}"
    since = f" for {duration(now - row['started_at'])}" if row["started_at"] else ""
    left = f", lease expires in {duration(lease - now)}" if lease is not None else ""
    if not any(w.id == worker for w in on_queue):
        return (
            f"running: worker {worker} has not been seen for a while{left}; "
            "the task is rescued when the lease runs out"
        )
    return f"running on {worker}{since} ({attempt}){left}"


def _explain_waiting(
    children: Mapping[TaskStatus, int], queue: str, on_queue: Sequence[WorkerInfo]
) -> str:
    total = sum(children.values())
    unfinished = {s: n for s, n in children.items() if s not in FINISHED_STATUSES and n}
    if unfinished:
        parts = ", ".join(f"{n} {s.value}" for s, n in sorted(unfinished.items()))
        return f"waiting: {sum(unfinished.values())} of {total} children unfinished ({parts})"
    if not on_queue:
        return (
            f"waiting: all {total} children finished; it resumes once a worker runs for "
            f"queue {queue!r} (none is live)"
        )
    return f"waiting: all {total} children finished; the reconciler resumes it at its next tick"
