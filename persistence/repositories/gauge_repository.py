"""Queue-level gauges for `tasklane metrics` (worker/exporter.py): one statement per scrape.

Due pending tasks and the oldest one's age per queue and agent, waiting parents per queue, live
workers per queue. Each part reads a partial index (`status = 'pending'` / `'waiting'`) or the
small `workers` table, so its cost follows the unfinished work, never the finished history that
makes up most of `tasks` (tests/integration/test_exporter.py checks the plan on a large table).
Every age is measured by the database clock.
"""

from __future__ import annotations

from dataclasses import dataclass

from domain.value_objects import TaskStatus
from persistence.repositories.worker_repository import LIVE_WITHIN_SECONDS
from persistence.sql import Executor, Sql

GAUGES = Sql(f"""
WITH due AS (
    SELECT queue, agent_id, count(*) AS n,
           EXTRACT(EPOCH FROM now() - min(run_after)) AS oldest_seconds
    FROM tasks
    WHERE status = '{TaskStatus.PENDING.value}' AND run_after <= now()
    GROUP BY queue, agent_id
), waiting AS (
    SELECT queue, count(*) AS n FROM tasks
    WHERE status = '{TaskStatus.WAITING.value}'
    GROUP BY queue
), live AS (
    SELECT queue, count(*) AS n FROM workers
    WHERE last_seen_at > now() - make_interval(secs => :live_within_seconds)
    GROUP BY queue
)
SELECT 'due' AS kind, queue, agent_id, n, oldest_seconds FROM due
UNION ALL
SELECT 'waiting', queue, NULL, n, NULL FROM waiting
UNION ALL
SELECT 'live', queue, NULL, n, NULL FROM live
""")


@dataclass(frozen=True, slots=True)
class DueGauge:
    queue: str
    agent_id: str
    count: int
    oldest_seconds: float


@dataclass(frozen=True, slots=True)
class QueueGauges:
    due: list[DueGauge]
    waiting: dict[str, int]  # queue → parents waiting for subtasks
    live_workers: dict[str, int]  # queue → workers seen within LIVE_WITHIN_SECONDS


class GaugeRepository:
    def __init__(self, ex: Executor) -> None:
        self._ex = ex

    async def read(self, *, live_within_seconds: float = LIVE_WITHIN_SECONDS) -> QueueGauges:
        gauges = QueueGauges(due=[], waiting={}, live_workers={})
        rows = await self._ex.fetch(GAUGES, live_within_seconds=float(live_within_seconds))
        for row in rows:
            kind, queue, count = row["kind"], str(row["queue"]), int(row["n"])
            if kind == "due":
                oldest = max(0.0, float(row["oldest_seconds"]))
                gauges.due.append(DueGauge(queue, str(row["agent_id"]), count, oldest))
            elif kind == "waiting":
                gauges.waiting[queue] = count
            else:
                gauges.live_workers[queue] = count
        return gauges
