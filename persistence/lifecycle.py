"""Lifecycle operations: the statements of `lifecycle_sql` with their arguments and results.

Every function takes an `Executor` and runs in whatever transaction the caller opened: the
worker's hot path passes a plain asyncpg connection, a unit of work passes its session. Functions
whose docstring says "in a transaction" issue several statements that must commit together.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from domain.entities import Doorbell, Task
from domain.value_objects import AttemptOutcome, TaskStatus
from persistence import lifecycle_sql as q
from persistence.mappers import insert_params, task_from_row
from persistence.sql import Executor, Row


@dataclass(frozen=True, slots=True)
class Finished:
    """A run's final write landed. `parent_id` is set when the task is somebody's subtask."""

    task_id: UUID
    parent_id: UUID | None


@dataclass(frozen=True, slots=True)
class Rescued:
    task_id: UUID
    runs: int
    status: TaskStatus
    queue: str


def _uuid(value: Any) -> UUID:
    return value if type(value) is UUID else UUID(str(value))


# -- insert -------------------------------------------------------------------------------------


async def insert_tasks(
    ex: Executor,
    tasks: Sequence[Task],
    *,
    dispatch_delays: Sequence[float],
    skip_taken_keys: bool = False,
    max_input_bytes: int | None = None,
) -> list[Task]:
    """Insert tasks in one statement; returns the inserted rows in the order of `tasks`.

    With `skip_taken_keys`, a task whose idempotency key is already taken is left out of the
    result (the caller reads the existing task instead).
    """
    if not tasks:
        return []
    params = insert_params(tasks, dispatch_delays=dispatch_delays, max_input_bytes=max_input_bytes)
    stmt = q.INSERT_TASKS_SKIP_TAKEN_KEYS if skip_taken_keys else q.INSERT_TASKS
    rows = await ex.fetch(stmt, **params)
    by_id = {task.id: task for task in map(task_from_row, rows)}
    return [by_id[t.id] for t in tasks if t.id in by_id]


# -- claim and heartbeat ------------------------------------------------------------------------


async def claim(
    ex: Executor,
    ids: Sequence[UUID],
    *,
    worker_id: str,
    lease_seconds: float,
    default_max_attempts: int,
    queue: str | None = None,
) -> list[Task]:
    """pending (and due) → running for each id that still can be (and is in `queue`, if
    given); the others are skipped."""
    rows = await ex.fetch(
        q.CLAIM,
        ids=list(ids),
        worker_id=worker_id,
        lease_seconds=float(lease_seconds),
        default_max_attempts=default_max_attempts,
        queue=queue,
    )
    return [task_from_row(row) for row in rows]


async def adopt(
    ex: Executor, ids: Sequence[UUID], *, worker_id: str, lease_seconds: float
) -> list[Task]:
    """The tasks among `ids` running under `worker_id`, their leases renewed: claims of ours that
    committed although we never heard back."""
    if not ids:
        return []
    rows = await ex.fetch(
        q.ADOPT, ids=list(ids), worker_id=worker_id, lease_seconds=float(lease_seconds)
    )
    return [task_from_row(row) for row in rows]


@dataclass(frozen=True, slots=True)
class Miss:
    """Why a doorbell claimed nothing."""

    reason: str
    due_in_seconds: float | None = None  # set when the task is pending but not due yet


async def explain_miss(ex: Executor, task_id: UUID, *, queue: str | None = None) -> Miss:
    rows = await ex.fetch(q.EXPLAIN_MISS, id=task_id)
    if not rows:
        return Miss("no such task")
    row = rows[0]
    if queue is not None and row["queue"] != queue:
        return Miss(f"belongs to queue {row['queue']!r}, not {queue!r}: left to its workers")
    status = row["status"]
    due_in = float(row["due_in_seconds"])
    if status == TaskStatus.PENDING and due_in > 0:
        return Miss(f"pending but not due for {due_in:.1f}s", due_in_seconds=due_in)
    max_attempts = row["max_attempts"]
    if (
        status == TaskStatus.PENDING
        and max_attempts is not None
        and row["attempts"] >= max_attempts
    ):
        return Miss(
            f"pending with all {max_attempts} attempts used; raise max_attempts or cancel it"
        )
    return Miss(f"already {status} (run {row['runs']})")


async def heartbeat(ex: Executor, held: Mapping[UUID, int], *, lease_seconds: float) -> set[UUID]:
    """Extend the lease of every run in `held` (task id → run); return the ids no longer ours."""
    if not held:
        return set()
    ids = list(held)
    rows = await ex.fetch(
        q.HEARTBEAT,
        ids=ids,
        runs=[held[i] for i in ids],
        lease_seconds=float(lease_seconds),
    )
    return {_uuid(row["id"]) for row in rows if not row["ours"]}


# -- finish -------------------------------------------------------------------------------------


async def complete(ex: Executor, items: Sequence[tuple[UUID, int, str]]) -> list[Finished]:
    """running → completed for each (task id, run, output JSON) whose run still holds the task."""
    rows = await ex.fetch(
        q.COMPLETE,
        ids=[i[0] for i in items],
        runs=[i[1] for i in items],
        outputs=[i[2] for i in items],
    )
    return [_finished(row) for row in rows]


async def fail(ex: Executor, task_id: UUID, run: int, error: str) -> Finished | None:
    rows = await ex.fetch(q.FAIL, id=task_id, run=run, error=error)
    return _finished(rows[0]) if rows else None


async def retry_later(
    ex: Executor, task_id: UUID, run: int, error: str, *, delay_seconds: float
) -> bool:
    rows = await ex.fetch(
        q.RETRY_LATER, id=task_id, run=run, error=error, delay_seconds=float(delay_seconds)
    )
    return bool(rows)


async def release(ex: Executor, task_id: UUID, run: int) -> bool:
    return bool(await ex.fetch(q.RELEASE, id=task_id, run=run))


async def runs_with_outcome(
    ex: Executor, runs: Sequence[tuple[UUID, int]], outcome: AttemptOutcome
) -> set[UUID]:
    """The tasks among `runs` (task id, run) whose run already ended with `outcome`: a fenced
    finish that found nothing to change had in fact landed, its answer lost with its connection."""
    if not runs:
        return set()
    rows = await ex.fetch(
        q.RUNS_WITH_OUTCOME,
        ids=[task_id for task_id, _ in runs],
        runs=[run for _, run in runs],
        outcome=outcome.value,
    )
    return {_uuid(row["task_id"]) for row in rows}


def _finished(row: Row) -> Finished:
    parent = row["parent_task_id"]
    return Finished(_uuid(row["id"]), _uuid(parent) if parent is not None else None)


# -- subtasks -----------------------------------------------------------------------------------


async def lock_task(ex: Executor, task_id: UUID) -> Row | None:
    rows = await ex.fetch(q.LOCK_TASK, id=task_id)
    return rows[0] if rows else None


async def resume_if_done(
    ex: Executor, parent_id: UUID, *, dispatch_delay: float
) -> Doorbell | None:
    """waiting → pending when no child of `parent_id` is unfinished. In the parent-locked
    transaction that just changed a child."""
    rows = await ex.fetch(q.RESUME_IF_DONE, id=parent_id, dispatch_delay=float(dispatch_delay))
    if not rows:
        return None
    return Doorbell(_uuid(rows[0]["id"]), rows[0]["runs"], rows[0]["queue"])


async def insert_children(
    ex: Executor, children: Sequence[Task], *, dispatch_delay: float
) -> list[Doorbell]:
    """Insert spawned subtasks; returns the doorbells to ring once the transaction commits.

    A child scheduled for later (`run_after` set) is left to the reconciler, which rings it
    once it is due."""
    delays = [0.0 if child.run_after is not None else dispatch_delay for child in children]
    inserted = await insert_tasks(ex, children, dispatch_delays=delays)
    return [Doorbell(t.id, t.runs, t.queue) for t, d in zip(inserted, delays, strict=True) if d]


async def wait_for_children(
    ex: Executor,
    task_id: UUID,
    run: int,
    children: Sequence[Task],
    *,
    dispatch_delay: float,
) -> list[Doorbell] | None:
    """In a transaction: running → waiting and the children inserted; `None` if the run had lost
    its claim (then nothing is written). With no children the task resumes at once."""
    if not await ex.fetch(q.WAIT, id=task_id, run=run):
        return None
    doorbells = await insert_children(ex, children, dispatch_delay=dispatch_delay)
    if not children:
        resumed = await resume_if_done(ex, task_id, dispatch_delay=dispatch_delay)
        doorbells.extend([resumed] if resumed else [])
    return doorbells


async def children_of(ex: Executor, task_id: UUID) -> list[Task]:
    return [task_from_row(row) for row in await ex.fetch(q.CHILDREN, id=task_id)]


async def stranded_waiting(ex: Executor, *, min_age_seconds: float, limit: int) -> list[UUID]:
    rows = await ex.fetch(q.STRANDED_WAITING, min_age_seconds=float(min_age_seconds), limit=limit)
    return [_uuid(row["id"]) for row in rows]


# -- cancel and operator retry ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Cancelled:
    cancelled: int  # tasks that changed, the target included
    resumed_parent: Doorbell | None


async def cancel_tree(ex: Executor, task_id: UUID, *, dispatch_delay: float) -> Cancelled | None:
    """In a transaction: cancel the task and every unfinished descendant. Locks the parent
    first, then the subtree by depth and id. `None` if there is no such task."""
    rows = await ex.fetch(q.PARENT_OF, id=task_id)
    if not rows:
        return None
    parent = rows[0]["parent_task_id"]
    parent_id = _uuid(parent) if parent is not None else None
    if parent_id is not None:
        await lock_task(ex, parent_id)
    subtree = await ex.fetch(q.LOCK_SUBTREE, id=task_id)
    ids = [_uuid(row["id"]) for row in subtree]
    done = await ex.fetch(q.CANCEL_MANY, ids=ids, root_id=task_id)
    resumed = None
    if parent_id is not None and any(_uuid(row["id"]) == task_id for row in done):
        resumed = await resume_if_done(ex, parent_id, dispatch_delay=dispatch_delay)
    return Cancelled(cancelled=len(done), resumed_parent=resumed)


async def operator_retry(ex: Executor, task_id: UUID, *, dispatch_delay: float) -> Task | None:
    """failed → pending with fresh attempts; `None` if the task is not failed."""
    rows = await ex.fetch(q.OPERATOR_RETRY, id=task_id, dispatch_delay=float(dispatch_delay))
    return task_from_row(rows[0]) if rows else None


# -- reconciler ---------------------------------------------------------------------------------


async def rescue_roots(
    ex: Executor, *, limit: int, retry_base_seconds: float, retry_max_seconds: float
) -> list[Rescued]:
    rows = await ex.fetch(
        q.RESCUE_ROOTS,
        limit=limit,
        retry_base_seconds=float(retry_base_seconds),
        retry_max_seconds=float(retry_max_seconds),
    )
    return [_rescued(row) for row in rows]


async def expired_children(ex: Executor, *, limit: int) -> list[tuple[UUID, int, UUID]]:
    rows = await ex.fetch(q.EXPIRED_CHILDREN, limit=limit)
    return [(_uuid(r["id"]), r["runs"], _uuid(r["parent_task_id"])) for r in rows]


async def rescue_child(
    ex: Executor,
    task_id: UUID,
    run: int,
    parent_id: UUID,
    *,
    retry_base_seconds: float,
    retry_max_seconds: float,
    dispatch_delay: float,
) -> tuple[Rescued | None, Doorbell | None]:
    """In a transaction: rescue one expired child under its parent's lock; resume the parent
    if the child failed for good and was the last one unfinished."""
    await lock_task(ex, parent_id)
    rows = await ex.fetch(
        q.RESCUE_ONE,
        id=task_id,
        run=run,
        retry_base_seconds=float(retry_base_seconds),
        retry_max_seconds=float(retry_max_seconds),
    )
    if not rows:
        return None, None
    rescued = _rescued(rows[0])
    resumed = None
    if rescued.status is TaskStatus.FAILED:
        resumed = await resume_if_done(ex, parent_id, dispatch_delay=dispatch_delay)
    return rescued, resumed


def _rescued(row: Row) -> Rescued:
    return Rescued(_uuid(row["id"]), row["runs"], TaskStatus(row["status"]), row["queue"])


async def dispatch_due(
    ex: Executor,
    *,
    queue: str,
    limit: int,
    redispatch_seconds: float,
    ring: Callable[[list[Doorbell]], Awaitable[None]],
) -> list[Doorbell]:
    """In a transaction: ring the doorbells of up to `limit` due pending tasks of `queue` and
    mark them dispatched. If `ring` fails nothing is marked, and the next tick tries again."""
    rows = await ex.fetch(q.DUE_FOR_DISPATCH, queue=queue, limit=limit)
    doorbells = [Doorbell(_uuid(row["id"]), row["runs"], queue) for row in rows]
    if doorbells:
        await ring(doorbells)
        await ex.execute(
            q.MARK_DISPATCHED,
            ids=[d.task_id for d in doorbells],
            redispatch_seconds=float(redispatch_seconds),
        )
    return doorbells


# -- workers ------------------------------------------------------------------------------------


async def touch_worker(
    ex: Executor, *, worker_id: str, hostname: str, pid: int, queue: str, agents: Iterable[str]
) -> None:
    await ex.execute(
        q.TOUCH_WORKER,
        id=worker_id,
        hostname=hostname,
        pid=pid,
        queue=queue,
        agents=sorted(agents),
    )


async def forget_worker(ex: Executor, worker_id: str) -> None:
    await ex.execute(q.FORGET_WORKER, id=worker_id)


async def forget_old_workers(ex: Executor) -> None:
    await ex.execute(q.FORGET_OLD_WORKERS)
