"""Why a task is where it is (`tasklane show`'s reason), reasoned from plain data: no services.

Every branch of `worker.diagnosis.explain` has its case here; tests/integration/test_cli.py
checks that `show` reads the right facts from a real database and prints the reason.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import pytest

from domain.entities import WorkerInfo
from domain.value_objects import TaskStatus
from worker.cli_format import counted, duration, first_line
from worker.diagnosis import explain

NOW = datetime(2026, 12, 3, 12, 0, 0, tzinfo=UTC)
TASK_ID = UUID("01a21660-459d-762f-be9c-8e417817c5f1")


def row(**changes: Any) -> dict[str, Any]:
    """A task's row as the report repository reads it (only what a reason may look at)."""
    values: dict[str, Any] = {
        "id": TASK_ID,
        "status": "pending",
        "queue": "tasklane",
        "agent_id": "echo",
        "attempts": 0,
        "max_attempts": 3,
        "error": None,
        "run_after": NOW - timedelta(seconds=5),
        "started_at": None,
        "lease_expires_at": None,
        "worker_id": None,
    }
    unknown = set(changes) - set(values)
    assert not unknown, f"not a column this test models: {unknown}"
    return values | changes


def worker(
    id: str = "w1", queue: str = "tasklane", agents: tuple[str, ...] = ("echo",)
) -> WorkerInfo:
    return WorkerInfo(
        id=id,
        hostname="host",
        pid=1,
        queue=queue,
        agents=agents,
        started_at=NOW - timedelta(minutes=5),
        last_seen_at=NOW - timedelta(seconds=1),
    )


def why(
    task: dict[str, Any],
    workers: tuple[WorkerInfo, ...] = (),
    children: dict[TaskStatus, int] | None = None,
) -> str | None:
    return explain(task, now=NOW, workers=workers, children=children or {})


# -- pending --------------------------------------------------------------------------------------


def test_pending_not_due_yet() -> None:
    task = row(run_after=NOW + timedelta(minutes=4, seconds=5))
    assert why(task, (worker(),)) == "pending: not due yet, runs in 4m05s"


def test_pending_after_a_failed_attempt_quotes_the_error_and_the_backoff() -> None:
    task = row(attempts=1, error="RuntimeError: flaky\nTraceback …", run_after=NOW + timedelta(1))
    assert why(task, (worker(),)) == (
        "pending: attempt 1 of 3 failed (RuntimeError: flaky); next attempt in 1d00h"
    )


def test_pending_with_no_max_attempts_resolved_yet_says_so() -> None:
    task = row(attempts=1, max_attempts=None, error="boom", run_after=NOW + timedelta(seconds=2))
    assert why(task) == "pending: attempt 1 of ? failed (boom); next attempt in 2.0s"


def test_pending_with_no_live_worker_names_the_queues_that_have_one() -> None:
    others = (worker(queue="emails"), worker(queue="gpu"), worker(queue="emails"))
    assert why(row(), others) == (
        "pending: due 5.0s ago but no live worker for queue 'tasklane' "
        "(live workers serve: emails, gpu) — is a worker running for this queue?"
    )
    assert why(row()) == (
        "pending: due 5.0s ago but no live worker for queue 'tasklane' "
        "— is a worker running for this queue?"
    )


def test_pending_for_an_agent_no_live_worker_serves() -> None:
    workers = (worker(agents=("square", "echo")), worker(id="w2", agents=("fanout",)))
    assert why(row(agent_id="summarise"), workers) == (
        "pending: due 5.0s ago; no live worker on queue 'tasklane' serves agent 'summarise' "
        "(they serve: echo, fanout, square), so it will fail as an unknown agent"
    )


def test_pending_and_served_counts_the_workers_of_its_queue_only() -> None:
    assert why(row(), (worker(),)) == (
        "pending: due 5.0s ago, not claimed yet by the 1 live worker on queue 'tasklane'"
    )
    workers = (worker(), worker(id="w2"), worker(id="w3", queue="other"))
    assert why(row(), workers) == (
        "pending: due 5.0s ago, not claimed yet by the 2 live workers on queue 'tasklane'"
    )


# -- running --------------------------------------------------------------------------------------


def running(**changes: Any) -> dict[str, Any]:
    facts: dict[str, Any] = {
        "status": "running",
        "attempts": 2,
        "worker_id": "w1",
        "started_at": NOW - timedelta(seconds=12.3),
        "lease_expires_at": NOW + timedelta(seconds=20),
    }
    return row(**(facts | changes))


def test_running_on_a_live_worker() -> None:
    assert why(running(), (worker(),)) == (
        "running on w1 for 12.3s (attempt 2 of 3), lease expires in 20.0s"
    )


def test_running_on_a_worker_not_seen_lately() -> None:
    assert why(running(), (worker(id="w2"),)) == (
        "running: worker w1 has not been seen for a while, lease expires in 20.0s; "
        "the task is rescued when the lease runs out"
    )


def test_running_with_an_expired_lease_is_rescued_by_a_live_worker_of_its_queue() -> None:
    expired = running(lease_expires_at=NOW - timedelta(seconds=3))
    assert why(expired, (worker(id="w2"),)) == (
        "running: lease expired 3.0s ago (attempt 2 of 3), "
        "will be rescued at the next reconcile tick"
    )
    assert why(expired, (worker(queue="other"),)) == (
        "running: lease expired 3.0s ago (attempt 2 of 3), "
        "will be rescued once a worker runs for queue 'tasklane' (none is live)"
    )


# -- waiting, failed, cancelled, completed --------------------------------------------------------


def test_waiting_counts_unfinished_children_by_status() -> None:
    children = {TaskStatus.COMPLETED: 3, TaskStatus.RUNNING: 1, TaskStatus.PENDING: 2}
    assert why(row(status="waiting"), (worker(),), children) == (
        "waiting: 3 of 6 children unfinished (2 pending, 1 running)"
    )


def test_waiting_with_all_children_finished_says_who_resumes_it() -> None:
    children = {TaskStatus.COMPLETED: 2, TaskStatus.FAILED: 1}
    assert why(row(status="waiting"), (worker(),), children) == (
        "waiting: all 3 children finished; the reconciler resumes it at its next tick"
    )
    assert why(row(status="waiting"), (), children) == (
        "waiting: all 3 children finished; it resumes once a worker runs for "
        "queue 'tasklane' (none is live)"
    )


def test_failed_quotes_the_first_line_of_the_error_and_how_to_retry() -> None:
    task = row(status="failed", attempts=1, error="ValueError: bad\n  more")
    assert why(task) == (
        f"failed after 1 attempt: ValueError: bad — `tasklane retry {TASK_ID}` runs it again"
    )
    long = row(status="failed", attempts=3, error="x" * 500)
    reason = why(long)
    assert reason is not None
    assert f"failed after 3 attempts: {'x' * 119}… —" in reason
    assert why(row(status="failed", attempts=3)) == (
        f"failed after 3 attempts: no error recorded — `tasklane retry {TASK_ID}` runs it again"
    )


def test_cancelled_and_completed() -> None:
    assert why(row(status="cancelled")) == "cancelled: it will not run again"
    assert why(row(status="completed")) is None


def test_an_unknown_status_is_refused() -> None:
    with pytest.raises(ValueError, match="sleeping"):
        why(row(status="sleeping"))


# -- the text building blocks ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (-3, "0ms"),
        (0.85, "850ms"),
        (12.34, "12.3s"),
        (245, "4m05s"),
        (7380, "2h03m"),
        (3 * 86400 + 4 * 3600 + 59, "3d04h"),
    ],
)
def test_duration(seconds: float, text: str) -> None:
    assert duration(seconds) == text
    assert duration(timedelta(seconds=seconds)) == text


def test_first_line_and_counted() -> None:
    assert first_line(None, 10) == ""
    assert first_line("  \n ", 10) == ""
    assert first_line("  one\ntwo", 10) == "one"
    assert first_line("abcdefghijk", 5) == "abcd…"
    assert counted(1, "run") == "1 run"
    assert counted(0, "run") == "0 runs"


# -- held by flow control -------------------------------------------------------------------------


def hold(**changes: Any) -> dict[str, Any]:
    """What `FlowRepository.hold_of` reads: nothing holds the task unless a test says so."""
    values: dict[str, Any] = {
        "pause_reason": None,
        "paused_by": None,
        "paused_at": None,
        "paused_until": None,
        "paused_agent": None,
        "paused_key": None,
        "eff_concurrency": None,
        "eff_per_key": None,
        "eff_rate": None,
        "eff_key_rate": None,
        "agent_tat": None,
        "key_tat": None,
        "limit_key": "",
        "running": 0,
        "key_running": 0,
    }
    return values | changes


def held(h: dict[str, Any], task: dict[str, Any] | None = None) -> str | None:
    task = task or row(run_after=NOW - timedelta(seconds=3))
    return explain(task, now=NOW, workers=(worker(),), children={}, hold=h)


def test_a_paused_agent_says_since_when_by_whom_and_why() -> None:
    reason = held(
        hold(
            pause_reason="provider outage",
            paused_by="ops",
            paused_at=NOW - timedelta(minutes=2),
            paused_until=NOW + timedelta(minutes=8),
            paused_agent="echo",
            paused_key="",
        )
    )
    assert reason == (
        "pending: agent 'echo' paused since 2026-12-03 11:58:00Z by ops: provider outage "
        "(until 2026-12-03 12:08:00Z) — `tasklane resume` lifts it"
    )


def test_a_paused_key_and_a_paused_queue_name_their_scope() -> None:
    common = {"pause_reason": "429", "paused_by": "w1", "paused_at": NOW}
    key = held(hold(**common, paused_agent="echo", paused_key="acme"))
    assert key is not None
    assert key.startswith("pending: key 'acme' of agent 'echo' paused since")
    queue = held(hold(**common, paused_agent="", paused_key=""))
    assert queue is not None
    assert queue.startswith("pending: queue 'tasklane' paused since")


def test_an_agent_at_its_limit_says_how_many_run() -> None:
    reason = held(hold(eff_concurrency=5, running=5))
    assert reason == "pending: agent 'echo' at its limit, 5 of 5 running"


def test_a_key_at_its_limit() -> None:
    reason = held(hold(eff_per_key=2, key_running=2, running=2, limit_key="acme"))
    assert reason == "pending: key 'acme' of agent 'echo' at its limit, 2 of 2 running"


def test_rate_limited_until_its_next_start() -> None:
    reason = held(hold(eff_rate=1.0, agent_tat=NOW + timedelta(seconds=30)))
    assert reason == "pending: agent 'echo' rate limited until 12:00:30Z"


def test_room_under_every_limit_falls_back_to_the_usual_reason() -> None:
    reason = held(hold(eff_concurrency=5, running=2))
    assert reason is not None
    assert reason.startswith("pending: due 3.0s ago, not claimed yet")


def test_a_task_not_yet_due_is_not_held() -> None:
    task = row(run_after=NOW + timedelta(minutes=1))
    reason = held(hold(pause_reason="x", paused_by="o", paused_at=NOW, paused_agent="echo"), task)
    assert reason == "pending: not due yet, runs in 1m00s"
