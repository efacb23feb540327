"""Deleting old finished tasks (`tasklane prune`) through an index, batch by batch.

One status at a time, oldest finish first, along `ix_tasks_finished (status, completed_at, id)`:
each batch is one statement that continues from where the previous one stopped (a keyset, so
that no batch re-reads the rows an earlier one kept), deletes what it may, and says where it got
to. Nothing counts the whole table first; a dry run counts up to COUNT_CAP candidates and
estimates beyond.

What is kept, though old and finished:
- a task with an unfinished child (that child still runs, and may add to its family);
- a child whose parent can still run: unfinished, or failed (an operator's retry runs the parent
  again, and it reads its subtasks' results). Such children go once the parent completes, is
  cancelled or is pruned itself (its children are then roots, and go on the next prune).
The attempts of a deleted task go with it (ON DELETE CASCADE).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from domain.exceptions import InvalidInputError
from domain.value_objects import FINISHED_STATUSES, UNFINISHED_STATUSES, TaskStatus
from persistence.errors import translated
from persistence.repositories.report_repository import COUNT_CAP, FINISHED, ReportRepository
from persistence.sql import Executor, Sql

_IS_FINISHED = "t.status IN (" + ", ".join(f"'{s}'" for s in FINISHED) + ")"
# The parents whose children stay: they can still run and read them.
_KEEPS_CHILDREN = (
    "("
    + ", ".join(
        f"'{s.value}'" for s in TaskStatus if s in UNFINISHED_STATUSES or s is TaskStatus.FAILED
    )
    + ")"
)
_UNFINISHED = "(" + ", ".join(f"'{s.value}'" for s in TaskStatus if s in UNFINISHED_STATUSES) + ")"

_CANDIDATE = f"""
t.status = :status AND {_IS_FINISHED} AND t.completed_at < :cutoff
AND (t.completed_at, t.id) > (CAST(:after_at AS timestamptz), CAST(:after_id AS uuid))
"""
_OLDEST_FIRST = "ORDER BY t.completed_at, t.id"
_PRUNABLE = f"""
NOT EXISTS (SELECT 1 FROM tasks AS p
            WHERE p.id = t.parent_task_id AND p.status IN {_KEEPS_CHILDREN})
AND NOT EXISTS (SELECT 1 FROM tasks AS c
                WHERE c.parent_task_id = t.id AND c.status IN {_UNFINISHED})
"""

# One batch: up to :n candidates after the keyset position, those that may go deleted; returns
# how many went, how many it read and where it stopped (NULL: no candidate was left).
PRUNE_BATCH = Sql(f"""
WITH batch AS (
    SELECT t.id, t.completed_at FROM tasks AS t
    WHERE {_CANDIDATE} {_OLDEST_FIRST} LIMIT :n FOR UPDATE OF t SKIP LOCKED
), gone AS (
    DELETE FROM tasks AS t USING batch WHERE t.id = batch.id AND {_PRUNABLE}
    RETURNING t.id
), last AS (
    SELECT completed_at, id FROM batch ORDER BY completed_at DESC, id DESC LIMIT 1
)
SELECT (SELECT count(*) FROM gone) AS deleted, (SELECT count(*) FROM batch) AS scanned,
       (SELECT completed_at FROM last) AS last_at, (SELECT id FROM last) AS last_id
""")

# A dry run: the candidates that may go, up to the cap.
PRUNABLE_COUNT = Sql(f"""
SELECT count(*) AS n FROM (
    SELECT 1 FROM tasks AS t WHERE {_CANDIDATE} AND {_PRUNABLE} {_OLDEST_FIRST} LIMIT :cap
) AS capped
""")
OLD_FINISHED = (
    f"SELECT 1 FROM tasks AS t WHERE t.status = :status AND {_IS_FINISHED} "
    "AND t.completed_at < :cutoff"
)

# Where a status's walk starts: before every (completed_at, id).
START = (datetime(1, 1, 1, tzinfo=UTC), UUID(int=0))


@dataclass(frozen=True, slots=True)
class Batch:
    deleted: int
    scanned: int  # candidates read (the deleted and the kept); fewer than asked: the last batch
    # Where the batch stopped; None: no candidate was left in this status.
    position: tuple[datetime, UUID] | None


@dataclass(frozen=True, slots=True)
class Matched:
    """A dry run's answer: exact up to COUNT_CAP, the planner's estimate past it."""

    count: int
    estimated: bool


def check_statuses(statuses: Sequence[TaskStatus]) -> None:
    unfinished = [s for s in statuses if s not in FINISHED_STATUSES]
    if unfinished or not statuses:
        raise InvalidInputError(
            "prune only deletes finished tasks (completed, failed, cancelled); "
            f"got {', '.join(s.value for s in unfinished) or 'no status'}"
        )


class PruneRepository:
    def __init__(self, ex: Executor) -> None:
        self._ex = ex

    async def batch(
        self,
        *,
        status: TaskStatus,
        cutoff: datetime,
        after: tuple[datetime, UUID] = START,
        size: int,
    ) -> Batch:
        """Delete what may go among the next `size` tasks of `status` finished before `cutoff`,
        after `after` in (completed_at, id) order. The caller commits between batches (or
        runs each on an autocommit connection), so that locks stay short."""
        check_statuses([status])
        [row] = await self._fetch(
            PRUNE_BATCH,
            status=status.value,
            cutoff=cutoff,
            after_at=after[0],
            after_id=after[1],
            n=size,
        )
        position = None if row["last_at"] is None else (row["last_at"], _uuid(row["last_id"]))
        return Batch(int(row["deleted"]), int(row["scanned"]), position)

    async def count(self, *, statuses: Sequence[TaskStatus], cutoff: datetime) -> Matched:
        """How many tasks a prune would delete now: exact up to COUNT_CAP, else estimated."""
        check_statuses(statuses)
        total, estimated = 0, False
        reports = ReportRepository(self._ex)
        for status in statuses:
            # Past the cap, the planner's estimate: counting what may go checks each row's
            # family, which is what made a dry run slow at millions of rows.
            old = await reports.capped_count(OLD_FINISHED, status=status.value, cutoff=cutoff)
            if old.estimated:
                total += old.value
                estimated = True
                continue
            [row] = await self._fetch(
                PRUNABLE_COUNT,
                status=status.value,
                cutoff=cutoff,
                after_at=START[0],
                after_id=START[1],
                cap=COUNT_CAP + 1,
            )
            total += int(row["n"])
        return Matched(total, estimated)

    async def _fetch(self, stmt: Sql, **params: Any) -> Any:
        with translated("Task"):
            return await self._ex.fetch(stmt, **params)


def _uuid(value: Any) -> UUID:
    return value if type(value) is UUID else UUID(str(value))
