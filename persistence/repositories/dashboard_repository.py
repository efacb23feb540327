"""The dashboard's read model (`tasklane web`): bounded, index-backed reads of a busy `tasks` table.

Every query here is cut to a fixed amount of work whatever the table holds, so that a person
refreshing a page never slows the workers down:
- counts stop at COUNT_CAP exact rows (an index-only scan of one status); beyond it the planner's
  estimate is given, marked approximate;
- the task list pages by keyset (created_at, id), newest first, never OFFSET. One index drives the
  scan: a conversation's or a parent's index when the filter names one, else one scan per status
  of the status index (or of the agent index) merged. Filters the driving index cannot answer
  (queue, error text, …) are applied to a window of at most WINDOW rows; a page may then come
  back short with a cursor to search further;
- the per-minute and last-hour figures read index ranges of the last hour only.

Which indexes: migration 0007 (`ix_tasks_by_status`, `ix_tasks_by_agent`, `ix_tasks_finished`,
`ix_task_attempts_finished`) and the older ones (`ix_tasks_conversation`, `ix_tasks_parent`,
`ix_tasks_pending_agent`). tests/web/test_plans.py checks the plans at 1,000,000 tasks.
"""

from __future__ import annotations

import contextvars
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from uuid import UUID

from domain.value_objects import TaskStatus
from persistence.errors import translated
from persistence.repositories.report_repository import TaskRow
from persistence.repositories.worker_repository import LIVE_WITHIN_SECONDS
from persistence.sql import Executor, Row, Sql

COUNT_CAP = 10_000  # counts above this are the planner's estimate
WINDOW = 2_000  # rows a filtered page examines at most
MAX_PAGE = 500
RECENT_WORKERS_SECONDS = 86_400.0  # the workers page lists those seen in the last day
MAX_WORKERS = 500
MAX_CHILDREN = 200

ALL_STATUSES: tuple[str, ...] = tuple(s.value for s in TaskStatus)

# Every statement this repository runs, with its parameters, when a test asks for them
# (tests/web/test_plans.py explains each one at 1,000,000 rows).
RECORDED: contextvars.ContextVar[list[tuple[Sql, dict[str, Any]]] | None] = contextvars.ContextVar(
    "tasklane_dashboard_recorded", default=None
)


@dataclass(frozen=True, slots=True)
class Count:
    value: int
    approximate: bool  # above COUNT_CAP: the planner's estimate


@dataclass(frozen=True, slots=True)
class TaskFilter:
    """What the task list shows. Every field is optional; they combine with AND."""

    statuses: tuple[str, ...] = ()  # empty: every status
    agent_id: str | None = None
    queue: str | None = None
    conversation_id: UUID | None = None
    parent_task_id: UUID | None = None
    error: str | None = None  # a substring of the error, case-insensitive
    created_from: datetime | None = None
    created_to: datetime | None = None

    def restricted_to(self, statuses: Sequence[str]) -> TaskFilter:
        """This filter, further limited to `statuses` (what a bulk action can change)."""
        allowed = [s for s in (self.statuses or ALL_STATUSES) if s in statuses]
        from dataclasses import replace

        # No allowed status: a status that no row has, so the filter matches nothing.
        return replace(self, statuses=tuple(allowed) or ("-",))


@dataclass(frozen=True, slots=True)
class Cursor:
    """Where the next page starts: strictly older than (created_at, id)."""

    created_at: datetime
    id: UUID


@dataclass(frozen=True, slots=True)
class TaskPage:
    rows: list[TaskRow]
    next: Cursor | None  # None: nothing further matches
    examined: int  # rows of the driving scan looked at
    short: bool  # the window ran out before the page filled: more may match further on


@dataclass(frozen=True, slots=True)
class AgentLine:
    agent_id: str
    queues: list[str]
    due: Count
    scheduled: Count
    running: Count
    waiting: Count
    oldest_due_seconds: float | None
    finished_last_hour: int
    failed_last_hour: int

    @property
    def failure_rate(self) -> float | None:
        if not self.finished_last_hour:
            return None
        return self.failed_last_hour / self.finished_last_hour


@dataclass(frozen=True, slots=True)
class WorkerLine:
    id: str
    hostname: str
    pid: int
    queue: str
    agents: list[str]
    started_at: datetime
    last_seen_at: datetime
    last_seen_seconds: float
    live: bool
    running: int  # tasks it runs now: its slots in use
    abandoned_handlers: int


@dataclass(frozen=True, slots=True)
class Overview:
    now: datetime
    counts: dict[str, Count]
    per_minute: list[dict[str, Any]]  # {"minute": datetime, "outcome": str, "runs": int}
    queue_lag: dict[str, float]  # queue -> seconds the oldest due task has waited
    live_workers: int
    slots_in_use: int
    failed_last_hour: int
    rescued_last_hour: int
    agents: list[AgentLine] = field(default_factory=list)


# -- statements ----------------------------------------------------------------------------------

NOW = Sql("SELECT now() AS now")

CAPPED_COUNTS = Sql(
    """
SELECT s.status,
       (SELECT count(*) FROM (SELECT 1 FROM tasks AS t WHERE t.status = s.status
                              LIMIT :cap) AS capped) AS n
FROM unnest(CAST(:statuses AS text[])) AS s(status)
"""
)

PER_MINUTE = Sql(
    """
SELECT date_trunc('minute', a.finished_at) AS minute, a.outcome, count(*) AS runs
FROM task_attempts AS a
WHERE a.finished_at IS NOT NULL AND a.finished_at > now() - interval '1 hour'
GROUP BY 1, 2
ORDER BY 1, 2
"""
)

# The last hour is written into these statements, not passed: with a parameter, the generic plan
# a prepared statement ends up with cannot tell an hour from ten days and reads the whole table.
# One range of `ix_tasks_finished` per status: with `status IN (…)` the planner drops the status
# condition (the index's predicate implies it) and reads the whole index for the time range.
FINISHED_BY_AGENT = Sql(
    "SELECT f.agent_id, f.status, count(*) AS n FROM ("
    + " UNION ALL ".join(
        f"SELECT t.agent_id, t.status FROM tasks AS t WHERE t.status = '{status}'"
        " AND t.completed_at > now() - interval '1 hour'"
        for status in ("completed", "failed", "cancelled")
    )
    + ") AS f GROUP BY 1, 2"
)

LOST_RUNS = Sql(
    """
SELECT count(*) AS n FROM task_attempts AS a
WHERE a.finished_at IS NOT NULL AND a.finished_at > now() - interval '1 hour'
  AND a.outcome = 'lost'
"""
)

# Per registered agent: its pending tasks in one pass (due, not yet due, the oldest due and its
# queue) over at most COUNT_CAP + 1 of them, and its running and waiting ones (ix_tasks_by_agent,
# index-only), each count capped. One pass, not one per figure: the pending rows are read from
# the table (run_after and queue are in no index that every schema revision has).
AGENT_LINES = Sql(
    """
SELECT g.id AS agent_id, p.due, p.scheduled, p.oldest_queue,
  EXTRACT(EPOCH FROM now() - p.oldest_due) AS oldest_due_seconds,
  (SELECT count(*) FROM (SELECT 1 FROM tasks AS t WHERE t.status = 'running'
     AND t.agent_id = g.id LIMIT :cap) AS c) AS running,
  (SELECT count(*) FROM (SELECT 1 FROM tasks AS t WHERE t.status = 'waiting'
     AND t.agent_id = g.id LIMIT :cap) AS c) AS waiting
FROM agents AS g
LEFT JOIN LATERAL (
  SELECT count(*) FILTER (WHERE q.run_after <= now()) AS due,
         count(*) FILTER (WHERE q.run_after > now()) AS scheduled,
         min(q.run_after) FILTER (WHERE q.run_after <= now()) AS oldest_due,
         (array_agg(q.queue ORDER BY q.run_after) FILTER (WHERE q.run_after <= now()))[1]
           AS oldest_queue
  FROM (SELECT t.run_after, t.queue FROM tasks AS t
        WHERE t.status = 'pending' AND t.agent_id = g.id LIMIT :cap) AS q
) AS p ON true
ORDER BY g.id
"""
)

WORKERS = Sql(
    """
SELECT w.*, EXTRACT(EPOCH FROM now() - w.last_seen_at) AS last_seen_seconds,
       w.last_seen_at > now() - make_interval(secs => :live_seconds) AS live,
       (SELECT count(*) FROM tasks AS t WHERE t.status = 'running' AND t.worker_id = w.id)
         AS running
FROM workers AS w
WHERE w.last_seen_at > now() - make_interval(secs => :recent_seconds)
ORDER BY w.last_seen_at DESC, w.id
LIMIT :limit
"""
)

CHILDREN = Sql(
    """
SELECT t.* FROM tasks AS t
WHERE t.parent_task_id = :parent
ORDER BY t.created_at, t.id
LIMIT :limit
"""
)

CHILD_COUNTS = Sql(
    """
SELECT t.status, count(*) AS n FROM tasks AS t WHERE t.parent_task_id = :parent GROUP BY 1
"""
)

ROWS_BY_ID = Sql(
    """
SELECT t.* FROM tasks AS t WHERE t.id = ANY(CAST(:ids AS uuid[]))
ORDER BY t.created_at DESC, t.id DESC
"""
)


class DashboardRepository:
    def __init__(self, ex: Executor) -> None:
        self._ex = ex

    # -- overview -------------------------------------------------------------------------------

    async def now(self) -> datetime:
        [row] = await self._fetch(NOW)
        return row["now"]  # type: ignore[no-any-return]

    async def status_counts(self) -> dict[str, Count]:
        """Tasks per status: exact up to COUNT_CAP, the planner's estimate above."""
        rows = await self._fetch(CAPPED_COUNTS, statuses=list(ALL_STATUSES), cap=COUNT_CAP + 1)
        counts: dict[str, Count] = {}
        for row in rows:
            n = int(row["n"])
            if n > COUNT_CAP:
                counts[row["status"]] = Count(max(n, await self._estimate(row["status"])), True)
            else:
                counts[row["status"]] = Count(n, False)
        return {s: counts[s] for s in ALL_STATUSES}

    async def _estimate(self, status: str) -> int:
        # The status is one of TaskStatus's values (the statement is built from the enum only).
        assert status in ALL_STATUSES
        [row] = await self._fetch(
            Sql(f"EXPLAIN (FORMAT JSON) SELECT 1 FROM tasks WHERE status = '{status}'")
        )
        plan = next(value for _, value in row.items())
        document = json.loads(plan) if isinstance(plan, str) else plan
        return int(document[0]["Plan"]["Plan Rows"])

    async def runs_per_minute(self) -> list[dict[str, Any]]:
        """Handler runs that ended in the last hour, per minute and outcome."""
        rows = await self._fetch(PER_MINUTE)
        return [
            {"minute": r["minute"], "outcome": r["outcome"] or "unknown", "runs": int(r["runs"])}
            for r in rows
        ]

    async def finished_by_agent(self) -> dict[str, dict[str, int]]:
        """Tasks finished in the last hour, per agent and status."""
        result: dict[str, dict[str, int]] = {}
        for r in await self._fetch(FINISHED_BY_AGENT):
            result.setdefault(r["agent_id"], {})[r["status"]] = int(r["n"])
        return result

    async def lost_runs(self) -> int:
        """Runs lost in the last hour (their worker died or lost its lease: the task rescued)."""
        [row] = await self._fetch(LOST_RUNS)
        return int(row["n"])

    async def agent_lines(
        self,
        finished: dict[str, dict[str, int]] | None = None,
        workers: list[WorkerLine] | None = None,
    ) -> list[AgentLine]:
        if finished is None:
            finished = await self.finished_by_agent()
        if workers is None:
            workers = await self.workers()
        queues_of: dict[str, set[str]] = {}
        for w in workers:
            if w.live:
                for agent in w.agents:
                    queues_of.setdefault(agent, set()).add(w.queue)
        lines = []
        for r in await self._fetch(AGENT_LINES, cap=COUNT_CAP + 1):
            agent = r["agent_id"]
            queues = set(queues_of.get(agent, ()))
            if r["oldest_queue"] is not None:
                queues.add(r["oldest_queue"])
            done = finished.get(agent, {})
            # Above the cap the pending tasks were not all read: both counts are lower bounds.
            pending_capped = int(r["due"]) + int(r["scheduled"]) > COUNT_CAP
            lines.append(
                AgentLine(
                    agent_id=agent,
                    queues=sorted(queues),
                    due=Count(min(int(r["due"]), COUNT_CAP), pending_capped),
                    scheduled=Count(min(int(r["scheduled"]), COUNT_CAP), pending_capped),
                    running=_capped(r["running"]),
                    waiting=_capped(r["waiting"]),
                    oldest_due_seconds=(
                        None
                        if r["oldest_due_seconds"] is None
                        else max(0.0, float(r["oldest_due_seconds"]))
                    ),
                    finished_last_hour=done.get("completed", 0) + done.get("failed", 0),
                    failed_last_hour=done.get("failed", 0),
                )
            )
        return lines

    async def overview(self) -> Overview:
        counts = await self.status_counts()
        workers = await self.workers()
        finished = await self.finished_by_agent()
        agents = await self.agent_lines(finished, workers)
        lag: dict[str, float] = {}
        for line in agents:
            if line.oldest_due_seconds is None:
                continue
            for queue in line.queues or ["?"]:
                lag[queue] = max(lag.get(queue, 0.0), line.oldest_due_seconds)
        for w in workers:
            if w.live:
                lag.setdefault(w.queue, 0.0)
        return Overview(
            now=await self.now(),
            counts=counts,
            per_minute=await self.runs_per_minute(),
            queue_lag=dict(sorted(lag.items())),
            live_workers=sum(1 for w in workers if w.live),
            slots_in_use=sum(w.running for w in workers if w.live),
            failed_last_hour=sum(d.get("failed", 0) for d in finished.values()),
            rescued_last_hour=await self.lost_runs(),
            agents=agents,
        )

    # -- workers --------------------------------------------------------------------------------

    async def workers(self) -> list[WorkerLine]:
        rows = await self._fetch(
            WORKERS,
            live_seconds=float(LIVE_WITHIN_SECONDS),
            recent_seconds=RECENT_WORKERS_SECONDS,
            limit=MAX_WORKERS,
        )
        return [
            WorkerLine(
                id=r["id"],
                hostname=r["hostname"],
                pid=int(r["pid"]),
                queue=r["queue"],
                agents=list(r["agents"] or []),
                started_at=r["started_at"],
                last_seen_at=r["last_seen_at"],
                last_seen_seconds=max(0.0, float(r["last_seen_seconds"])),
                live=bool(r["live"]),
                running=int(r["running"]),
                abandoned_handlers=int(r["abandoned_handlers"]),
            )
            for r in rows
        ]

    # -- tasks ----------------------------------------------------------------------------------

    async def tasks(
        self, where: TaskFilter, *, after: Cursor | None = None, limit: int = 50
    ) -> TaskPage:
        """One page of the tasks `where` matches, newest first, starting after `after`."""
        limit = max(1, min(limit, MAX_PAGE))
        residual = _residual(where)
        window = WINDOW if residual else limit + 1
        scan, params = _driving_scan(where, after, window)
        if residual:
            clauses, extra = residual
            statement = Sql(
                f"SELECT w.created_at, w.id, ({' AND '.join(clauses)}) AS hit "
                f"FROM ({scan}) AS w JOIN tasks AS t ON t.id = w.id "
                "ORDER BY w.created_at DESC, w.id DESC"
            )
            params.update(extra)
        else:
            statement = Sql(f"SELECT w.created_at, w.id, true AS hit FROM ({scan}) AS w")
        examined = await self._fetch(statement, **params)
        hits = [r for r in examined if r["hit"]]
        shown = hits[:limit]
        rows = await self.rows([r["id"] for r in shown])
        if len(hits) > limit:
            last = shown[-1]
            return TaskPage(rows, Cursor(last["created_at"], last["id"]), len(examined), False)
        if len(examined) >= window:  # the window is full: more may match further on
            last = examined[-1]
            short = bool(residual)
            return TaskPage(rows, Cursor(last["created_at"], last["id"]), len(examined), short)
        return TaskPage(rows, None, len(examined), False)

    async def rows(self, ids: Sequence[UUID]) -> list[TaskRow]:
        if not ids:
            return []
        found = await self._fetch(ROWS_BY_ID, ids=list(ids))
        return [dict(r.items()) for r in found]

    async def children(self, parent: UUID, limit: int = MAX_CHILDREN) -> list[TaskRow]:
        found = await self._fetch(CHILDREN, parent=parent, limit=limit)
        return [dict(r.items()) for r in found]

    async def child_counts(self, parent: UUID) -> dict[str, int]:
        return {r["status"]: int(r["n"]) for r in await self._fetch(CHILD_COUNTS, parent=parent)}

    # -- plumbing -------------------------------------------------------------------------------

    async def _fetch(self, stmt: Sql, **params: Any) -> Sequence[Row]:
        recorded = RECORDED.get()
        if recorded is not None:
            recorded.append((stmt, dict(params)))
        with translated("Task"):
            return await self._ex.fetch(stmt, **params)


def _capped(n: Any) -> Count:
    value = int(n)
    return Count(min(value, COUNT_CAP), value > COUNT_CAP)


def _statuses(where: TaskFilter) -> tuple[str, ...]:
    return tuple(s for s in ALL_STATUSES if not where.statuses or s in where.statuses)


def _driving_scan(
    where: TaskFilter, after: Cursor | None, window: int
) -> tuple[str, dict[str, Any]]:
    """The (created_at, id) of up to `window` candidate rows, newest first, read from one index."""
    params: dict[str, Any] = {"window": window}
    bounds = []
    if after is not None:
        bounds.append("(t.created_at, t.id) < (:after_created, :after_id)")
        params.update(after_created=after.created_at, after_id=after.id)
    if where.created_from is not None:
        bounds.append("t.created_at >= :created_from")
        params["created_from"] = where.created_from
    if where.created_to is not None:
        bounds.append("t.created_at < :created_to")
        params["created_to"] = where.created_to
    order = "ORDER BY t.created_at DESC, t.id DESC LIMIT :window"

    if where.conversation_id is not None or where.parent_task_id is not None:
        if where.conversation_id is not None:
            key = "t.conversation_id = :conversation_id"
            params["conversation_id"] = where.conversation_id
        else:
            key = "t.parent_task_id = :parent_task_id"
            params["parent_task_id"] = where.parent_task_id
        condition = " AND ".join([key, *bounds])
        return f"SELECT t.created_at, t.id FROM tasks AS t WHERE {condition} {order}", params

    # One scan per status (the status index, or the agent index with an agent), merged.
    keys = []
    if where.agent_id is not None:
        keys.append("t.agent_id = :agent_id")
        params["agent_id"] = where.agent_id
    branches = []
    for status in _statuses(where) or ("-",):
        # Statuses are TaskStatus values: written into the statement, they match partial plans.
        condition = " AND ".join([*keys, f"t.status = '{status}'", *bounds])
        branches.append(f"(SELECT t.created_at, t.id FROM tasks AS t WHERE {condition} {order})")
    union = " UNION ALL ".join(branches)
    return f"SELECT u.created_at, u.id FROM ({union}) AS u ORDER BY 1 DESC, 2 DESC LIMIT :window", (
        params
    )


def _residual(where: TaskFilter) -> tuple[list[str], dict[str, Any]] | None:
    """The conditions the driving index does not answer, on `t` (the joined row)."""
    clauses: list[str] = []
    params: dict[str, Any] = {}
    driven_by_owner = where.conversation_id is not None or where.parent_task_id is not None
    if driven_by_owner and where.statuses:
        statuses = ", ".join(f"'{s}'" for s in _statuses(where)) or "'-'"
        clauses.append(f"t.status IN ({statuses})")
    if driven_by_owner and where.agent_id is not None:
        clauses.append("t.agent_id = :r_agent_id")
        params["r_agent_id"] = where.agent_id
    if where.conversation_id is not None and where.parent_task_id is not None:
        clauses.append("t.parent_task_id = :r_parent_task_id")
        params["r_parent_task_id"] = where.parent_task_id
    if where.queue is not None:
        clauses.append("t.queue = :r_queue")
        params["r_queue"] = where.queue
    if where.error:
        clauses.append("t.error ILIKE :r_error ESCAPE '\\'")
        params["r_error"] = "%" + _escape_like(where.error) + "%"
    return (clauses, params) if clauses else None


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
