"""Operating at millions of rows: every statement the operator commands run reads index ranges.

One table of a million finished tasks (and 20,000 pending) is built once for the module
(tests/support/big_table.py); each command then runs through an executor that EXPLAINs every
statement before running it, and no plan may read `tasks` or `task_attempts` sequentially. The
answers are checked too: newest first, the filters applied, counts past the cap estimated and
said to be.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from datetime import timedelta
from typing import Any

import asyncpg
import pytest

from domain.value_objects import TaskStatus
from persistence.repositories.report_repository import COUNT_CAP
from persistence.sql import ConnectionExecutor, Row, Sql, Statement
from tests.support import big_table, databases
from tests.support.workers import make_settings
from worker.operator import Operator

pytestmark = pytest.mark.slow

FINISHED = 1_000_000
PENDING = 20_000
AGENTS = 8
INDEXED = {"Index Scan", "Index Only Scan", "Bitmap Heap Scan", "ModifyTable"}
BIG_TABLES = {"tasks", "task_attempts"}


@pytest.fixture(scope="module")
def big_database(template_database: str) -> Iterator[str]:
    name = databases.unique_name("tasklane_scale")

    async def create() -> None:
        await databases.create_database(name, template=template_database)
        try:
            await big_table.build(name, finished=FINISHED, pending=PENDING, agents=AGENTS)
        except BaseException:
            await databases.drop_database(name)
            raise

    asyncio.run(create())
    yield name
    asyncio.run(databases.drop_database(name))


class PlanRecorder(ConnectionExecutor):
    """Runs each statement after recording its plan."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        super().__init__(conn)
        self.plans: list[tuple[str, dict[str, Any]]] = []

    async def fetch(self, stmt: Statement, **params: Any) -> Sequence[Row]:
        assert isinstance(stmt, Sql), "the operator's statements are plain SQL"
        if not stmt.source.lstrip().upper().startswith("EXPLAIN"):
            plan = await self.conn.fetchval(f"EXPLAIN (FORMAT JSON) {stmt.pg}", *stmt.args(params))
            self.plans.append((stmt.source, _json(plan)[0]["Plan"]))
        return await super().fetch(stmt, **params)


def _json(value: Any) -> Any:
    import json

    return json.loads(value) if isinstance(value, str) else value


def full_scans(plan: dict[str, Any]) -> list[str]:
    """The nodes of `plan` that read a big table other than through an index."""
    found = []
    if plan.get("Relation Name") in BIG_TABLES and plan["Node Type"] not in INDEXED:
        found.append(f"{plan['Node Type']} on {plan['Relation Name']}")
    for child in plan.get("Plans", []):
        found += full_scans(child)
    return found


def assert_indexed(recorder: PlanRecorder) -> None:
    assert recorder.plans, "no statement was recorded"
    bad = [
        (source.strip()[:300], scans)
        for source, plan in recorder.plans
        if (scans := full_scans(plan))
    ]
    assert not bad, bad


@pytest.fixture
async def operator(big_database: str) -> Any:
    url = databases.plain_url_for(big_database)
    conn = await asyncpg.connect(url)
    recorder = PlanRecorder(conn)
    settings = make_settings(databases.url_for(big_database), "redis://unused", "unused")
    try:
        yield Operator(settings, conn, executor=recorder), recorder
    finally:
        await conn.close()


async def test_the_plan_check_does_see_a_full_scan(operator: Any) -> None:
    _, recorder = operator
    await recorder.fetch(Sql("SELECT count(*) AS n FROM tasks WHERE input IS NOT NULL"))
    assert full_scans(recorder.plans[0][1]), recorder.plans[0][1]


async def test_stats_reads_indexes_and_estimates_past_the_cap(operator: Any) -> None:
    op, recorder = operator
    stats = await op.stats()
    assert_indexed(recorder)

    completed = stats.by_status[TaskStatus.COMPLETED.value]
    assert "completed" in stats.by_status_estimated
    assert 0.8 * FINISHED * 0.9 < completed < 1.2 * FINISHED * 0.9
    assert stats.by_status[TaskStatus.RUNNING.value] == 0
    assert "running" not in stats.by_status_estimated
    assert sorted(stats.by_agent) == [f"{big_table.AGENT_PREFIX}{i}" for i in range(AGENTS)]
    # 20,000 pending in all, past the cap: each agent's 2,500 are the planner's estimate.
    for agent, counts in stats.by_agent.items():
        assert 0.5 * PENDING / AGENTS < counts["pending"] < 1.5 * PENDING / AGENTS
        assert {"pending", "completed"} <= set(stats.by_agent_estimated[agent])
        assert counts["running"] == 0
        assert "running" not in stats.by_agent_estimated[agent]
    assert stats.oldest_pending_seconds is not None
    assert stats.oldest_pending_seconds > 3000
    assert stats.pending_not_due == 0
    assert not stats.pending_not_due_estimated
    assert not stats.agents_truncated


async def test_list_reads_one_index_range_per_filter(operator: Any) -> None:
    op, recorder = operator
    agent = f"{big_table.AGENT_PREFIX}3"
    conversation = "ec99207e-0f45-0034-d822-070430ee31f5"  # md5('bulk-conversation-0')
    cases: list[dict[str, Any]] = [
        {},
        {"status": TaskStatus.FAILED},
        {"agent_id": agent},
        {"agent_id": agent, "status": TaskStatus.PENDING},
        {"conversation_id": conversation},
        {"conversation_id": conversation, "status": TaskStatus.COMPLETED},
    ]
    for filters in cases:
        rows, _ = await op.list_tasks(
            **{"agent_id": None, "status": None, "conversation_id": None, **filters}, limit=50
        )
        assert len(rows) == 50, filters
        keys = [(r["created_at"], r["id"]) for r in rows]
        assert keys == sorted(keys, reverse=True), filters
        for column, value in filters.items():
            expected = value.value if isinstance(value, TaskStatus) else value
            assert {str(r[column]) for r in rows} == {str(expected)}, filters
    newest, _ = await op.list_tasks(agent_id=None, status=None, conversation_id=None, limit=5)
    assert {r["status"] for r in newest} == {"pending"}  # the pending ones are the newest
    assert_indexed(recorder)


async def test_show_and_tree_read_indexes(operator: Any) -> None:
    op, recorder = operator
    rows, _ = await op.list_tasks(
        agent_id=None, status=TaskStatus.FAILED, conversation_id=None, limit=1
    )
    task_id = rows[0]["id"]
    report = await op.show(task_id)
    assert report.row["id"] == task_id
    tree = await op.tree(task_id)
    assert [n.row["id"] for n in tree.nodes] == [task_id]
    assert_indexed(recorder)


async def test_prune_walks_the_finished_index(operator: Any) -> None:
    op, recorder = operator
    dry = await op.prune(
        older_than=timedelta(days=29),
        statuses=[TaskStatus.COMPLETED, TaskStatus.CANCELLED],
        dry_run=True,
        batch_size=1000,
    )
    assert dry.matched_estimated
    assert dry.matched >= COUNT_CAP  # ~30,000 completed
    before = await op._ex.conn.fetchval("SELECT count(*) FROM tasks WHERE status = 'cancelled'")
    pruned = await op.prune(
        older_than=timedelta(days=29, hours=12),
        statuses=[TaskStatus.CANCELLED],
        dry_run=False,
        batch_size=200,
    )
    after = await op._ex.conn.fetchval("SELECT count(*) FROM tasks WHERE status = 'cancelled'")
    assert 0 < pruned.deleted == before - after
    assert pruned.batches == -(-pruned.deleted // 200)
    assert_indexed(recorder)
