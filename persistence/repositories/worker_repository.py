"""Registered worker processes: each refreshes its own row at every reconcile tick."""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

from domain.entities import WorkerInfo
from persistence.mappers import worker_from_row
from persistence.models import WorkerModel
from persistence.repositories.base_repository import BaseRepository
from persistence.repositories.worker_sql import LIVE, LIVE_WITHIN_SECONDS
from persistence.sql import Executor, Row, Sql

__all__ = ["LIVE_WITHIN_SECONDS", "WorkerRepository"]


# A worker's tick: its row refreshed, and its queue's sweeper role taken (or kept) when nobody
# else holds it, in one statement. The role lapses :sweep_seconds after its last renewal.
TOUCH = Sql("""
WITH worker AS (
    INSERT INTO workers (id, hostname, pid, queue, agents, started_at, last_seen_at,
                         abandoned_handlers)
    VALUES (:id, :hostname, :pid, :queue, CAST(:agents AS text[]), now(), now(), :abandoned)
    ON CONFLICT (id) DO UPDATE SET last_seen_at = now(), abandoned_handlers = :abandoned
), sweeper AS (
    INSERT INTO sweepers (queue, worker_id, expires_at)
    VALUES (:queue, :id, now() + make_interval(secs => :sweep_seconds))
    ON CONFLICT (queue) DO UPDATE
        SET worker_id = excluded.worker_id, expires_at = excluded.expires_at
        WHERE sweepers.worker_id = excluded.worker_id OR sweepers.expires_at < now()
    RETURNING worker_id
)
SELECT EXISTS (SELECT 1 FROM sweeper) AS sweeps
""")

# A worker that stops: its row goes, and its sweeper role, so another takes it at once.
FORGET = Sql("""
WITH sweeper AS (DELETE FROM sweepers WHERE worker_id = :id)
DELETE FROM workers WHERE id = :id
""")

# Rows of workers not seen for a day are history nobody reads.
FORGET_OLD = Sql("DELETE FROM workers WHERE last_seen_at < now() - make_interval(days => 1)")


SERVES = Sql("""
SELECT EXISTS (
    SELECT 1 FROM workers
    WHERE queue = :queue AND :agent_id = ANY(agents) AND id <> :other_than
      AND last_seen_at > now() - make_interval(secs => :within_seconds)
) AS served
""")


class WorkerRepository(BaseRepository[WorkerModel, WorkerInfo]):
    filterable_fields: ClassVar[frozenset[str]] = frozenset({"id", "queue", "hostname"})

    def __init__(self, ex: Executor) -> None:
        super().__init__(ex, WorkerModel, "Worker")

    def _to_entity(self, row: Row) -> WorkerInfo:
        return worker_from_row(row)

    async def touch(
        self,
        *,
        worker_id: str,
        hostname: str,
        pid: int,
        queue: str,
        agents: Iterable[str],
        abandoned: int = 0,
        sweep_seconds: float = 3.0,
    ) -> bool:
        """Register this worker, or say it is still alive (and how many handlers it abandoned);
        True when it is its queue's sweeper for the next `sweep_seconds`."""
        [row] = await self._fetch(
            TOUCH,
            id=worker_id,
            hostname=hostname,
            pid=pid,
            queue=queue,
            agents=sorted(agents),
            abandoned=abandoned,
            sweep_seconds=float(sweep_seconds),
        )
        return bool(row["sweeps"])

    async def forget(self, worker_id: str) -> None:
        await self._fetch(FORGET, id=worker_id)

    async def forget_old(self) -> None:
        await self._fetch(FORGET_OLD)

    async def serves(
        self,
        agent_id: str,
        *,
        queue: str,
        other_than: str = "",
        within_seconds: float = LIVE_WITHIN_SECONDS,
    ) -> bool:
        """Does a live worker of `queue` (other than `other_than`) serve `agent_id`?"""
        [row] = await self._fetch(
            SERVES,
            agent_id=agent_id,
            queue=queue,
            other_than=other_than,
            within_seconds=float(within_seconds),
        )
        return bool(row["served"])

    async def list_live(
        self, *, queue: str | None = None, within_seconds: float = LIVE_WITHIN_SECONDS
    ) -> list[WorkerInfo]:
        """Workers seen in the last `within_seconds`, by the database clock."""
        return await self._entities(LIVE, within_seconds=float(within_seconds), queue=queue)
