"""`prune`: through ix_tasks_finished batch by batch, keeping the families that can still run,
paced by --max-rate, counting at most COUNT_CAP candidates on a dry run."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any
from uuid import UUID, uuid4

import asyncpg
import pytest

from domain.exceptions import InvalidInputError
from domain.value_objects import FINISHED_STATUSES, TaskStatus
from persistence.repositories.report_repository import COUNT_CAP
from tests.support import databases
from tests.support.workers import make_settings
from worker.operator import Operator

ALL = sorted(FINISHED_STATUSES)


@pytest.fixture
async def pg(database: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(databases.plain_url_for(database))
    yield conn
    await conn.close()


@pytest.fixture
def operator(pg: asyncpg.Connection, database: str) -> Operator:
    settings = make_settings(databases.url_for(database), "redis://unused", "unused")
    return Operator(settings, pg)


@pytest.fixture
async def conv(pg: asyncpg.Connection) -> UUID:
    return await pg.fetchval(  # type: ignore[no-any-return]
        "INSERT INTO conversations (user_id) VALUES ('prune') RETURNING id"
    )


async def add(
    pg: asyncpg.Connection,
    conv: UUID,
    status: str,
    *,
    days_ago: float = 10,
    parent: UUID | None = None,
) -> UUID:
    """A task in `status`, finished `days_ago` (if finished), with one attempt."""
    finished = status in {s.value for s in FINISHED_STATUSES}
    task_id = uuid4()
    await pg.execute(
        "INSERT INTO tasks (id, conversation_id, parent_task_id, agent_id, status, attempts, "
        "max_attempts, completed_at) VALUES ($1, $2, $3, 'echo', $4, 1, 3, "
        "CASE WHEN $5 THEN now() - make_interval(secs => $6) END)",
        task_id,
        conv,
        parent,
        status,
        finished,
        days_ago * 86400,
    )
    await pg.execute(
        "INSERT INTO task_attempts (task_id, run, attempt, started_at) VALUES ($1, 1, 1, now())",
        task_id,
    )
    return task_id


async def left(pg: asyncpg.Connection) -> set[UUID]:
    return {r["id"] for r in await pg.fetch("SELECT id FROM tasks")}


async def prune(op: Operator, **kwargs: Any) -> Any:
    options: dict[str, Any] = {
        "older_than": timedelta(days=7),
        "statuses": ALL,
        "dry_run": False,
        "batch_size": 1000,
        **kwargs,
    }
    return await op.prune(**options)


async def test_prune_keeps_what_can_still_run_and_its_family(
    pg: asyncpg.Connection, operator: Operator, conv: UUID
) -> None:
    recent = await add(pg, conv, "completed", days_ago=1)
    lone = await add(pg, conv, "completed")
    # A failed parent may be retried, and reads its children's results then: they stay.
    failed_parent = await add(pg, conv, "failed")
    kept_child = await add(pg, conv, "completed", parent=failed_parent)
    # A waiting parent is still running: its finished children stay.
    waiting = await add(pg, conv, "waiting")
    waited_child = await add(pg, conv, "completed", parent=waiting)
    # A finished task with a child still running stays (the child is its family).
    done_parent = await add(pg, conv, "cancelled")
    running_child = await add(pg, conv, "running", parent=done_parent)
    # A completed parent's children go with it.
    completed_parent = await add(pg, conv, "completed")
    gone_child = await add(pg, conv, "failed", parent=completed_parent)

    dry = await prune(operator, dry_run=True)
    assert (dry.matched, dry.matched_estimated, dry.deleted) == (4, False, 0)
    assert len(await left(pg)) == 10

    result = await prune(operator, batch_size=1)
    assert result.deleted == 4
    assert await left(pg) == {
        recent,
        kept_child,
        waiting,
        waited_child,
        done_parent,
        running_child,
    }
    assert lone not in await left(pg)
    assert gone_child not in await left(pg)
    attempts = await pg.fetchval("SELECT count(*) FROM task_attempts")
    assert attempts == 6  # the pruned tasks' history went with them

    # The failed parent went too (its own walk came after the completed one, which kept its
    # child): the child is a root now, and goes on the next prune.
    assert failed_parent not in await left(pg)
    assert (await prune(operator)).deleted == 1
    assert kept_child not in await left(pg)


async def test_each_status_is_walked_oldest_first_past_the_kept_ones(
    pg: asyncpg.Connection, operator: Operator, conv: UUID
) -> None:
    """Batches continue where the last stopped: kept rows are read once, not forever."""
    waiting = await add(pg, conv, "waiting")
    for i in range(5):
        await add(pg, conv, "completed", days_ago=20 + i, parent=waiting)  # the oldest: kept
    victims = {await add(pg, conv, "completed", days_ago=10 + i) for i in range(3)}
    result = await prune(operator, batch_size=2)
    assert result.deleted == 3
    assert result.batches == 4  # 8 candidates, two at a time
    assert not victims & await left(pg)


async def test_max_rate_paces_the_deletes(
    pg: asyncpg.Connection, operator: Operator, conv: UUID
) -> None:
    for _ in range(6):
        await add(pg, conv, "completed")
    started = time.monotonic()
    result = await prune(operator, max_rate=20.0, batch_size=1000)
    elapsed = time.monotonic() - started
    assert result.deleted == 6
    assert result.batches == 1
    assert elapsed >= 6 / 20.0 * 0.95  # the average rate stays under 20/s
    for _ in range(5):
        await add(pg, conv, "completed")
    paced = await prune(operator, max_rate=2.0)
    assert paced.deleted == 5
    assert paced.batches == 3  # no batch larger than the rate


async def test_a_dry_run_counts_up_to_the_cap_and_estimates_beyond(
    pg: asyncpg.Connection, operator: Operator, conv: UUID
) -> None:
    await pg.execute(
        "INSERT INTO tasks (conversation_id, agent_id, status, attempts, max_attempts, "
        "completed_at) SELECT $1, 'echo', 'completed', 1, 3, now() - interval '10 days' "
        "FROM generate_series(1, $2)",
        conv,
        COUNT_CAP + 500,
    )
    await pg.execute("ANALYZE tasks")
    dry = await prune(operator, dry_run=True)
    assert dry.matched_estimated
    assert dry.matched >= COUNT_CAP
    assert await pg.fetchval("SELECT count(*) FROM tasks") == COUNT_CAP + 500
    exact = await prune(operator, dry_run=True, older_than=timedelta(days=11))
    assert (exact.matched, exact.matched_estimated) == (0, False)


@pytest.mark.parametrize(
    "statuses", [[], [TaskStatus.PENDING], [TaskStatus.COMPLETED, TaskStatus.RUNNING]]
)
async def test_prune_refuses_unfinished_statuses(
    pg: asyncpg.Connection, operator: Operator, conv: UUID, statuses: list[TaskStatus]
) -> None:
    await add(pg, conv, "completed")
    for dry_run in (True, False):
        with pytest.raises(InvalidInputError, match="prune only deletes finished tasks"):
            await prune(operator, statuses=statuses, dry_run=dry_run)
    assert len(await left(pg)) == 1
