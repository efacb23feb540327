"""The operators' read model: what `tasklane show/list/tree/stats` read.

These are reports, not entities: rows of `tasks` keyed by column name (so that the CLI prints
every column, bookkeeping included) and aggregates computed by the database. Every age is
computed with the database clock, like every other time decision in tasklane.

Every statement here reads index ranges, so that it costs the same with five million finished
tasks as with fifty (tests/integration/test_scale.py checks the plans):
- `list` reads one range of `ix_tasks_by_status`, `ix_tasks_by_agent` or
  `ix_tasks_by_conversation` backwards; without a status filter, one range per status, each cut
  at the limit, merged by the database.
- Counts stop at COUNT_CAP. Past it, the count is the planner's estimate (never below the cap)
  and says so (`Count.estimated`): counting millions of rows exactly would read them all.
- The distinct agents come from a skip scan of `ix_tasks_by_agent` (one index probe per agent),
  at most MAX_AGENTS of them.

Plain SQL, no ORM: the CLI runs these on one asyncpg connection (persistence.sql.Sql).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from domain.entities import TaskAttempt, WorkerInfo
from domain.value_objects import FINISHED_STATUSES, TaskStatus
from persistence.errors import translated
from persistence.mappers import attempt_from_row, worker_from_row
from persistence.repositories.task_sql import ATTEMPTS_OF, SUBTREE
from persistence.repositories.worker_sql import LIVE, LIVE_WITHIN_SECONDS
from persistence.sql import Executor, Row, Sql

# A row of `tasks`: {column name: value}, uuids as UUID, timestamps as aware datetimes.
TaskRow = dict[str, Any]

# Counts are exact up to here; past it, estimated.
COUNT_CAP = 10_000
# In a status with more than COUNT_CAP tasks, an agent's count is estimated past this.
EXACT_WITHIN_BIG = 1_000
# `stats` shows at most this many agents (the rest are summed in the totals).
MAX_AGENTS = 1_000

STATUSES: tuple[str, ...] = tuple(s.value for s in TaskStatus)
FINISHED: tuple[str, ...] = tuple(s.value for s in TaskStatus if s in FINISHED_STATUSES)
# Repeated in every statement on finished tasks, so that the planner may use the partial
# `ix_tasks_finished` whatever status value is bound.
_IS_FINISHED = "status IN (" + ", ".join(f"'{s}'" for s in FINISHED) + ")"
_NEWEST_FIRST = "ORDER BY created_at DESC, id DESC"


@dataclass(frozen=True, slots=True)
class Count:
    """A count, exact up to COUNT_CAP; past it the planner's estimate (`estimated`)."""

    value: int
    estimated: bool = False

    def __add__(self, other: Count) -> Count:
        return Count(self.value + other.value, self.estimated or other.estimated)


@dataclass(frozen=True, slots=True)
class TreeNode:
    """One task of a tree, with its depth (the root is 0) and how long its handler runs took."""

    row: TaskRow
    depth: int
    run_seconds: float


@dataclass(frozen=True, slots=True)
class AgentCounts:
    """Each agent's count in each status; `truncated`: there are more than MAX_AGENTS agents."""

    by_agent: dict[str, dict[TaskStatus, Count]]
    truncated: bool


# -- statements -----------------------------------------------------------------------------------

NOW = Sql("SELECT now() AS now")
TASK = Sql("SELECT * FROM tasks WHERE id = :id")
AGENT_KNOWN = Sql("SELECT EXISTS (SELECT FROM agents WHERE id = :id) AS known")

# A tree with how long each task's handler runs took (running ones count until now).
TREE = Sql(
    SUBTREE
    + """
SELECT t.*, tree.depth AS _depth,
       (SELECT COALESCE(sum(EXTRACT(EPOCH FROM COALESCE(a.finished_at, now()) - a.started_at)), 0)
        FROM task_attempts AS a WHERE a.task_id = t.id) AS _run_seconds
FROM tasks AS t JOIN tree ON t.id = tree.id
WHERE NOT tree.is_cycle
ORDER BY tree.depth, t.created_at, t.id
"""
)

CHILDREN_BY_STATUS = Sql("""
SELECT status, count(*) AS n FROM tasks WHERE parent_task_id = :id GROUP BY status
""")

# Per status, the rows up to the cap (ix_tasks_by_status).
STATUS_COUNTS = Sql("""
SELECT s.status,
       (SELECT count(*) FROM (SELECT 1 FROM tasks AS t WHERE t.status = s.status
                              LIMIT :cap) AS capped) AS n
FROM unnest(CAST(:statuses AS text[])) AS s(status)
""")

# The distinct agents, one index probe each (a skip scan of ix_tasks_by_agent): the recursion
# is evaluated only as far as the LIMIT asks.
AGENTS = Sql("""
WITH RECURSIVE agents(agent_id) AS (
    (SELECT agent_id FROM tasks ORDER BY agent_id LIMIT 1)
    UNION ALL
    SELECT (SELECT t.agent_id FROM tasks AS t WHERE t.agent_id > a.agent_id
            ORDER BY t.agent_id LIMIT 1)
    FROM agents AS a WHERE a.agent_id IS NOT NULL
)
SELECT agent_id FROM agents WHERE agent_id IS NOT NULL LIMIT :limit
""")

# Per agent and status, the rows up to the cap (ix_tasks_by_agent).
AGENT_COUNTS = Sql("""
SELECT a.agent_id, s.status,
       (SELECT count(*) FROM (SELECT 1 FROM tasks AS t
                              WHERE t.agent_id = a.agent_id AND t.status = s.status
                              LIMIT :cap) AS capped) AS n
FROM unnest(CAST(:agents AS text[])) AS a(agent_id)
CROSS JOIN unnest(CAST(:statuses AS text[])) AS s(status)
""")

_AGENT_STATUS = "SELECT 1 FROM tasks WHERE agent_id = :agent_id AND status = :status"

# The planner's most common (agent, status) pairs and how many tasks each holds (migration 0010's
# `mcv` list on `stx_tasks_agent_status`, as of the last ANALYZE), scaled to the table's current
# size as the planner scales it: every agent's estimate in one statement, not an EXPLAIN each.
COMMON_AGENT_STATUS = Sql("""
SELECT e.most_common_vals[i][array_position(e.attnames, 'agent_id')] AS agent_id,
       e.most_common_vals[i][array_position(e.attnames, 'status')] AS status,
       round(e.most_common_freqs[i] * c.reltuples / c.relpages
             * (pg_relation_size(c.oid) / current_setting('block_size')::int)) AS n
FROM pg_stats_ext AS e
JOIN pg_class AS c ON c.oid = to_regclass(quote_ident(e.schemaname) || '.tasks')
CROSS JOIN LATERAL generate_subscripts(e.most_common_vals, 1) AS i
WHERE e.statistics_name = 'stx_tasks_agent_status' AND e.schemaname = current_schema()
  AND c.relpages > 0 AND c.reltuples > 0
""")

# The same, for given (agent, status) pairs.
PAIR_COUNTS = Sql("""
SELECT p.agent_id, p.status,
       (SELECT count(*) FROM (SELECT 1 FROM tasks AS t
                              WHERE t.agent_id = p.agent_id AND t.status = p.status
                              LIMIT :cap) AS capped) AS n
FROM unnest(CAST(:agents AS text[]), CAST(:statuses AS text[])) AS p(agent_id, status)
""")

# How long the longest-waiting due pending task has been due (ix_tasks_pending_agent).
OLDEST_DUE = Sql("""
SELECT EXTRACT(EPOCH FROM now() - min(run_after)) AS seconds
FROM tasks WHERE status = 'pending' AND run_after <= now()
""")

NOT_DUE = "SELECT 1 FROM tasks WHERE status = 'pending' AND run_after > now()"
NOT_DUE_COUNT = Sql(f"SELECT count(*) AS n FROM ({NOT_DUE} LIMIT :cap) AS capped")

FINISHED_SINCE = f"""
SELECT 1 FROM tasks
WHERE status = :status AND {_IS_FINISHED} AND completed_at > now() - make_interval(secs => :seconds)
"""
FINISHED_SINCE_COUNT = Sql(f"SELECT count(*) AS n FROM ({FINISHED_SINCE} LIMIT :cap) AS capped")
# The finish time of the status's n-th most recent finish: past the cap, the last `seconds` are
# estimated at that rate.
NTH_LATEST_FINISH = Sql(f"""
SELECT EXTRACT(EPOCH FROM now() - completed_at) AS ago FROM tasks
WHERE status = :status AND {_IS_FINISHED} AND completed_at IS NOT NULL
ORDER BY completed_at DESC, id DESC OFFSET :n - 1 LIMIT 1
""")


def _list_statement(*, agent: bool, status: bool, conversation: bool) -> Sql:
    """Newest first, as one index range; without a status filter (and conversation), one range
    per status, each cut at the limit, merged."""
    where = []
    if conversation:
        where.append("conversation_id = :conversation_id")
    if agent:
        where.append("agent_id = :agent_id")
    if status or conversation:
        if status:
            where.append("status = :status")
        return Sql(f"SELECT * FROM tasks WHERE {' AND '.join(where)} {_NEWEST_FIRST} LIMIT :limit")
    ranges = [
        "(SELECT * FROM tasks WHERE "
        + " AND ".join([*where, f"status = '{s}'"])
        + f" {_NEWEST_FIRST} LIMIT :limit)"
        for s in STATUSES
    ]
    return Sql(
        "SELECT * FROM (\n"
        + "\nUNION ALL\n".join(ranges)
        + f"\n) AS t {_NEWEST_FIRST} LIMIT :limit"
    )


LISTS = {
    (agent, status, conversation): _list_statement(
        agent=agent, status=status, conversation=conversation
    )
    for agent in (False, True)
    for status in (False, True)
    for conversation in (False, True)
}


class ReportRepository:
    def __init__(self, ex: Executor) -> None:
        self._ex = ex

    async def now(self) -> datetime:
        """The database clock."""
        [row] = await self._fetch(NOW)
        return row["now"]  # type: ignore[no-any-return]

    # -- tasks ----------------------------------------------------------------------------------

    async def task(self, task_id: UUID) -> TaskRow | None:
        rows = await self._fetch(TASK, id=task_id)
        return dict(rows[0].items()) if rows else None

    async def agent_known(self, agent_id: str) -> bool:
        """Some worker has registered the agent (`tasklane submit` warns when none has)."""
        [row] = await self._fetch(AGENT_KNOWN, id=agent_id)
        return bool(row["known"])

    async def attempts(self, task_id: UUID) -> list[TaskAttempt]:
        """The task's runs, oldest first."""
        return [attempt_from_row(row) for row in await self._fetch(ATTEMPTS_OF, id=task_id)]

    async def tasks(
        self,
        *,
        agent_id: str | None = None,
        status: TaskStatus | None = None,
        conversation_id: UUID | None = None,
        limit: int = 50,
    ) -> list[TaskRow]:
        """Newest first (ties by id, highest first)."""
        stmt = LISTS[(agent_id is not None, status is not None, conversation_id is not None)]
        params: dict[str, Any] = {"limit": limit}
        if agent_id is not None:
            params["agent_id"] = agent_id
        if status is not None:
            params["status"] = status.value
        if conversation_id is not None:
            params["conversation_id"] = conversation_id
        return [dict(row.items()) for row in await self._fetch(stmt, **params)]

    async def tree(self, task_id: UUID) -> list[TreeNode]:
        """The task and every task below it, breadth first, children in creation order.

        One recursive query (the walk `task_sql.SUBTREE`); empty if the task does not exist.
        """
        nodes: list[TreeNode] = []
        for found in await self._fetch(TREE, id=task_id):
            row = dict(found.items())
            depth, seconds = row.pop("_depth"), row.pop("_run_seconds")
            nodes.append(TreeNode(row, int(depth), float(seconds)))
        return nodes

    async def children_by_status(self, task_id: UUID) -> dict[TaskStatus, int]:
        rows = await self._fetch(CHILDREN_BY_STATUS, id=task_id)
        return {TaskStatus(row["status"]): int(row["n"]) for row in rows}

    async def live_workers(
        self, *, queue: str | None = None, within_seconds: float = LIVE_WITHIN_SECONDS
    ) -> list[WorkerInfo]:
        rows = await self._fetch(LIVE, within_seconds=float(within_seconds), queue=queue)
        return [worker_from_row(row) for row in rows]

    # -- aggregates -----------------------------------------------------------------------------

    async def counts_by_status(self) -> dict[TaskStatus, Count]:
        rows = await self._fetch(STATUS_COUNTS, statuses=list(STATUSES), cap=COUNT_CAP + 1)
        counts: dict[TaskStatus, Count] = {}
        for row in rows:
            status = TaskStatus(row["status"])
            counts[status] = await self._capped(
                int(row["n"]), "SELECT 1 FROM tasks WHERE status = :status", status=status.value
            )
        return counts

    async def counts_by_agent(self, big: Sequence[TaskStatus] = ()) -> AgentCounts:
        """Each agent's tasks in each status (statuses without tasks left out).

        `big`: statuses with more than COUNT_CAP tasks in all (`counts_by_status` estimated
        them). In those, an agent estimated at more than EXACT_WITHIN_BIG tasks gets the
        estimate, not a count: in a status that is itself estimated, counting up to the cap for
        every agent would read most of the time `stats` may take."""
        agents = [row["agent_id"] for row in await self._fetch(AGENTS, limit=MAX_AGENTS + 1)]
        truncated = len(agents) > MAX_AGENTS
        agents = agents[:MAX_AGENTS]
        by_agent: dict[str, dict[TaskStatus, Count]] = {agent: {} for agent in agents}
        counted = [s for s in STATUSES if TaskStatus(s) not in big]
        pairs: list[tuple[str, str]] = []
        common = await self._common_agent_status() if big else {}
        for status in big:
            for agent in agents:
                guess = common.get((agent, status.value))
                if guess is None:  # not among the planner's common pairs: ask it
                    guess = await self.estimate(_AGENT_STATUS, agent_id=agent, status=status.value)
                if guess > EXACT_WITHIN_BIG:
                    by_agent[agent][status] = Count(guess, estimated=True)
                else:
                    pairs.append((agent, status.value))
        rows = list(
            await self._fetch(AGENT_COUNTS, agents=agents, statuses=counted, cap=COUNT_CAP + 1)
        )
        if pairs:
            rows += await self._fetch(
                PAIR_COUNTS,
                agents=[agent for agent, _ in pairs],
                statuses=[status for _, status in pairs],
                cap=COUNT_CAP + 1,
            )
        for row in rows:
            if row["n"]:
                by_agent[row["agent_id"]][TaskStatus(row["status"])] = await self._capped(
                    int(row["n"]), _AGENT_STATUS, agent_id=row["agent_id"], status=row["status"]
                )
        return AgentCounts(by_agent, truncated)

    async def _common_agent_status(self) -> dict[tuple[str, str], int]:
        rows = await self._fetch(COMMON_AGENT_STATUS)
        return {(row["agent_id"], row["status"]): int(row["n"]) for row in rows}

    async def oldest_pending_seconds(self) -> float | None:
        """How long the longest-waiting *due* pending task has been due (None: none is).

        A task scheduled for later, or waiting out a retry backoff, is not late: only the time
        since its `run_after` counts.
        """
        [row] = await self._fetch(OLDEST_DUE)
        return None if row["seconds"] is None else max(0.0, float(row["seconds"]))

    async def scheduled_count(self) -> Count:
        """Pending tasks not due yet (scheduled for later, or waiting out a retry backoff)."""
        [row] = await self._fetch(NOT_DUE_COUNT, cap=COUNT_CAP + 1)
        return await self._capped(int(row["n"]), NOT_DUE)

    async def finished_within(self, seconds: float) -> dict[TaskStatus, Count]:
        """Tasks that reached completed, failed or cancelled in the last `seconds`, by status
        (statuses with none left out). Past the cap, estimated from the rate of the COUNT_CAP
        most recent finishes."""
        counts: dict[TaskStatus, Count] = {}
        for status in FINISHED:
            [row] = await self._fetch(
                FINISHED_SINCE_COUNT, status=status, seconds=float(seconds), cap=COUNT_CAP + 1
            )
            n = int(row["n"])
            if n > COUNT_CAP:
                [nth] = await self._fetch(NTH_LATEST_FINISH, status=status, n=COUNT_CAP)
                ago = max(float(nth["ago"]), 1e-3)
                counts[TaskStatus(status)] = Count(
                    max(COUNT_CAP, round(COUNT_CAP * seconds / ago)), estimated=True
                )
            elif n:
                counts[TaskStatus(status)] = Count(n)
        return counts

    # -- plumbing -------------------------------------------------------------------------------

    async def capped_count(self, query: str, **params: Any) -> Count:
        """How many rows `query` returns: counted up to COUNT_CAP, estimated past it."""
        [row] = await self._fetch(
            Sql(f"SELECT count(*) AS n FROM ({query} LIMIT :cap) AS capped"),
            **params,
            cap=COUNT_CAP + 1,
        )
        return await self._capped(int(row["n"]), query, **params)

    async def _capped(self, n: int, query: str, **params: Any) -> Count:
        """`n` if it is within the cap, else the planner's estimate of `query`'s rows."""
        if n <= COUNT_CAP:
            return Count(n)
        return Count(max(COUNT_CAP, await self.estimate(query, **params)), estimated=True)

    async def estimate(self, query: str, **params: Any) -> int:
        """How many rows the planner expects `query` to return (no row is read)."""
        [row] = await self._fetch(Sql(f"EXPLAIN (FORMAT JSON) {query}"), **params)
        plan = next(value for _, value in row.items())
        if isinstance(plan, str):  # asyncpg hands json over as text
            plan = json.loads(plan)
        return int(plan[0]["Plan"]["Plan Rows"])

    async def _fetch(self, stmt: Sql, **params: Any) -> Sequence[Row]:
        with translated("Task"):
            return await self._ex.fetch(stmt, **params)
