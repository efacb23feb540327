"""Rows ↔ entities. One place that knows the column names of each table."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from uuid import UUID

from domain.entities import Task, TaskAttempt, WorkerInfo
from domain.payload import encode_json
from domain.value_objects import AttemptOutcome, TaskStatus
from persistence.sql import Row


def _uuid(value: Any) -> UUID:
    # asyncpg returns its own UUID type; entities hold the standard library's.
    return value if type(value) is UUID else UUID(str(value))


def _maybe_uuid(value: Any) -> UUID | None:
    return None if value is None else _uuid(value)


def task_from_row(row: Row) -> Task:
    """Build a Task from a row of `tasks` (a Record, a RowMapping or a dict by column name)."""
    return Task(
        id=_uuid(row["id"]),
        conversation_id=_uuid(row["conversation_id"]),
        parent_task_id=_maybe_uuid(row["parent_task_id"]),
        agent_id=row["agent_id"],
        queue=row["queue"],
        status=TaskStatus(row["status"]),
        input=row["input"],
        output=row["output"],
        error=row["error"],
        metadata=row["metadata"] if row["metadata"] is not None else {},
        attempts=row["attempts"],
        max_attempts=row["max_attempts"],
        run_after=row["run_after"],
        worker_id=row["worker_id"],
        lease_expires_at=row["lease_expires_at"],
        idempotency_key=row["idempotency_key"],
        runs=row["runs"],
        step=row["step"],
        version=row["version"],
        priority=row["priority"],
        wait_signals=row["wait_signals"],
        woke_by=row["woke_by"],
        created_at=row["created_at"],
        started_at=row["started_at"],
        completed_at=row["completed_at"],
        updated_at=row["updated_at"],
        trace_context=_trace_context(row),  # observability
    )


def _trace_context(row: Row) -> dict[str, str] | None:
    """Observability: the task's trace context; None where a statement did not select it."""
    try:
        value = row["trace_context"]
    except KeyError:
        return None
    return value if isinstance(value, dict) else None


def attempt_from_row(row: Row) -> TaskAttempt:
    outcome = row["outcome"]
    return TaskAttempt(
        task_id=_uuid(row["task_id"]),
        run=row["run"],
        attempt=row["attempt"],
        worker_id=row["worker_id"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        outcome=AttemptOutcome(outcome) if outcome is not None else None,
        error=row["error"],
    )


def insert_params(
    tasks: Sequence[Task],
    *,
    dispatch_delays: Sequence[float],
    max_input_bytes: int | None = None,
) -> dict[str, list[Any]]:
    """Column arrays for `INSERT_TASKS` (one unnest insert for any number of tasks).

    `dispatch_delays[i]`: seconds before the reconciler may send task i's doorbell — the
    redispatch interval when the caller sends it right after commit, 0 when it leaves that to
    the reconciler.
    """
    if len(dispatch_delays) != len(tasks):  # unnest would pad the shorter array with NULLs
        raise ValueError(f"{len(tasks)} tasks, {len(dispatch_delays)} dispatch delays")
    for task in tasks:
        task.check_new()
    return {
        "ids": [t.id for t in tasks],
        "conversation_ids": [t.conversation_id for t in tasks],
        "parent_ids": [t.parent_task_id for t in tasks],
        "agent_ids": [t.agent_id for t in tasks],
        "queues": [t.queue for t in tasks],
        "inputs": [encode_json(t.input, what="input", max_bytes=max_input_bytes) for t in tasks],
        "metadatas": [encode_json(t.metadata, what="metadata") for t in tasks],
        "max_attempts": [t.max_attempts for t in tasks],
        "priorities": [t.priority for t in tasks],
        "run_afters": [t.run_after for t in tasks],
        "idempotency_keys": [t.idempotency_key for t in tasks],
        "dispatch_delays": [float(d) for d in dispatch_delays],
        "trace_contexts": [  # observability
            encode_json(t.trace_context, what="trace context") if t.trace_context else None
            for t in tasks
        ],
    }


def worker_from_row(row: Row) -> WorkerInfo:
    """Build a WorkerInfo from a row of `workers`."""
    return WorkerInfo(
        id=row["id"],
        hostname=row["hostname"],
        pid=row["pid"],
        queue=row["queue"],
        agents=tuple(row["agents"]),
        started_at=row["started_at"],
        last_seen_at=row["last_seen_at"],
        abandoned_handlers=row["abandoned_handlers"],
    )
