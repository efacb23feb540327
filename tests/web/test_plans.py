"""Every dashboard page at 1,000,000 tasks: answered in under 200 ms, every query on an index.

The table is filled in SQL (INSERT … SELECT generate_series): a realistic spread of statuses
(mostly finished), 20 agents, 3 queues, 10,000 conversations, 1,000 parents with 20 children
each, ten days of history and a day of runs. Each page is rendered through the app (HTML and
JSON); every statement the dashboard's repository ran is explained again with its parameters,
both as the planner plans it for those values and as a generic plan (what a prepared statement
gets after a few executions), and neither may read `tasks` or `task_attempts` whole.

Run with `-s` to see the timings table (the README quotes it).
"""

from __future__ import annotations

import json
import statistics
import time
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg
import pytest

from persistence import pg
from persistence.repositories.dashboard_repository import RECORDED
from persistence.sql import Sql
from persistence.timeouts import MIGRATION_TIMEOUTS
from tests.support import big_table
from tests.web.conftest import Web

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

N = 1_000_000
BUDGET_MS = 200.0
RUNS = 5

FILL = [
    """
INSERT INTO conversations (id, user_id, title)
SELECT md5('c' || c)::uuid, 'user-' || (c % 500), 'conversation ' || c
FROM generate_series(0, 9999) AS c
""",
    """
INSERT INTO agents (id) SELECT 'a' || lpad(a::text, 2, '0') FROM generate_series(0, 19) AS a
""",
    # Statuses by i % 1000: 850 completed, 50 failed, 20 cancelled, 50 pending (half due, half
    # later), 20 waiting, 10 running (of which 4% stay running: 400, like real slots).
    """
INSERT INTO tasks (id, conversation_id, parent_task_id, agent_id, queue, status, input, output,
                   error, attempts, max_attempts, run_after, created_at, started_at,
                   completed_at, worker_id, lease_expires_at, limit_key, due_rank)
SELECT md5('t' || i)::uuid,
       md5('c' || (i % 10000))::uuid,
       CASE WHEN i % 1000 BETWEEN 1 AND 20 THEN md5('t' || (i - i % 1000))::uuid END,
       'a' || lpad((i % 20)::text, 2, '0'),
       'q' || (i % 3),
       s.status,
       jsonb_build_object('n', i, 'prompt', 'summarise document ' || i),
       CASE WHEN s.status = 'completed' THEN jsonb_build_object('ok', true) END,
       CASE WHEN s.status = 'failed' THEN 'upstream timeout after 30s (' || (i % 97) || ')' END,
       CASE WHEN s.status IN ('completed', 'failed', 'running') THEN 1 ELSE 0 END,
       3,
       d.due,
       created,
       CASE WHEN s.status NOT IN ('pending') THEN created + interval '1 second' END,
       CASE WHEN s.status IN ('completed', 'failed', 'cancelled')
            THEN created + interval '3 seconds' END,
       CASE WHEN s.status = 'running' THEN 'worker-' || (i % 5) END,
       CASE WHEN s.status = 'running' THEN now() + interval '30 seconds' END,
       '', d.due  -- priority 0: the due rank is the due time
FROM generate_series(0, :n - 1) AS i,
     LATERAL (SELECT now() - (:n - i) * interval '864 milliseconds' AS created) AS c,
     LATERAL (SELECT CASE
         WHEN i % 1000 < 850 THEN 'completed'
         WHEN i % 1000 < 900 THEN 'failed'
         WHEN i % 1000 < 920 THEN 'cancelled'
         WHEN i % 1000 < 970 THEN 'pending'
         WHEN i % 1000 < 990 THEN 'waiting'
         WHEN i % 250000 < 10000 THEN 'running'
         ELSE 'completed' END AS status) AS s,
     LATERAL (SELECT created + CASE WHEN s.status = 'pending' AND i % 2 = 0
                                    THEN interval '30 days' ELSE interval '0' END AS due) AS d
""",
    """
INSERT INTO task_attempts (task_id, run, attempt, worker_id, started_at, finished_at, outcome,
                           error)
SELECT id, 1, 1, 'worker-1', started_at, completed_at, status, error
FROM tasks WHERE completed_at > now() - interval '1 day' AND status IN ('completed', 'failed')
""",
    """
INSERT INTO workers (id, hostname, pid, queue, agents, last_seen_at)
SELECT 'worker-' || w, 'host-' || w, 1000 + w, 'q' || (w % 3),
       ARRAY(SELECT 'a' || lpad(a::text, 2, '0') FROM generate_series(0, 19) AS a),
       now() - CASE WHEN w < 4 THEN interval '1 second' ELSE interval '2 hours' END
FROM generate_series(0, 5) AS w
""",
]


async def fill(url: str) -> None:
    conn = await pg.connect(url, timeouts=MIGRATION_TIMEOUTS)  # no statement limit
    try:
        await conn.execute("SET maintenance_work_mem = '256MB'")
        async with big_table.bulk_load(conn):  # indexes built once the rows are in
            for statement in FILL:
                await conn.execute(statement.replace(":n", str(N)))
        await conn.execute("VACUUM ANALYZE")
    finally:
        await conn.close()


def relations_scanned_whole(plan: dict[str, Any]) -> list[str]:
    """Relations a plan reads with a sequential scan (the small ones are allowed)."""
    found = []
    if plan.get("Node Type") == "Seq Scan" and plan.get("Relation Name") in (
        "tasks",
        "task_attempts",
    ):
        found.append(plan["Relation Name"])
    for child in plan.get("Plans", []):
        found += relations_scanned_whole(child)
    return found


async def explain(conn: asyncpg.Connection, stmt: Sql, params: dict[str, Any]) -> list[Any]:
    """The custom plan, and the generic one, of a recorded statement."""
    args = stmt.args(params)
    raw = await conn.fetchval(f"EXPLAIN (FORMAT JSON) {stmt.pg}", *args)
    plans = [json.loads(raw)[0]["Plan"]]
    if args:
        # What a prepared statement is planned as once PostgreSQL stops planning it per call.
        await conn.execute(f"PREPARE dashboard_query AS {stmt.pg}")
        try:
            await conn.execute("SET plan_cache_mode = force_generic_plan")
            values = ", ".join(_literal(a) for a in args)
            raw = await conn.fetchval(f"EXPLAIN (FORMAT JSON) EXECUTE dashboard_query({values})")
            plans.append(json.loads(raw)[0]["Plan"])
        finally:
            await conn.execute("RESET plan_cache_mode")
            await conn.execute("DEALLOCATE dashboard_query")
    return plans


async def test_every_page_is_fast_and_index_backed_at_a_million_tasks(web: Web) -> None:
    await fill(web.url)
    assert await _count(web.url) == N
    parent = UUID(await _scalar(web.url, "SELECT md5('t' || 5000)::uuid::text"))
    failed = await _scalar(web.url, "SELECT md5('t' || 1880)::uuid::text")
    conversation = await _scalar(web.url, "SELECT md5('c' || 77)::uuid::text")
    first = (await web.get("/api/tasks?limit=50")).headers["link"]
    second_page = first[1 : first.index(">")]
    pages = [
        "/",
        "/api/overview",
        "/tasks",
        "/api/tasks",
        second_page,
        "/tasks?status=failed",
        "/tasks?status=pending&status=waiting",
        "/tasks?agent=a03",
        "/tasks?agent=a03&status=failed",
        "/tasks?queue=q1",
        "/tasks?error=timeout",
        "/tasks?status=failed&error=(42)",
        f"/tasks?conversation={conversation}",
        f"/tasks?parent={parent}",
        "/tasks?from=2026-01-01T00:00:00%2B00:00&status=completed",
        f"/tasks/{parent}",
        f"/api/tasks/{failed}",
        f"/tasks/{parent}/children",
        f"/api/tasks/{parent}/tree",
        "/queues",
        "/api/queues",
        "/workers",
        "/audit",
    ]
    recorded: list[tuple[Sql, dict[str, Any]]] = []
    token = RECORDED.set(recorded)
    try:
        for path in pages:
            response = await web.get(path)  # warm: caches, the first plan
            assert response.status_code == 200, (path, response.text[:300])
        timings = {path: await _time(web, path) for path in pages}
    finally:
        RECORDED.reset(token)
    # The machine is shared (the suite runs tests in parallel): a page over the budget is
    # measured again, twice at most, and keeps its best round.
    for _ in range(2):
        for path in [p for p, ms in timings.items() if statistics.median(ms) > BUDGET_MS]:
            again = await _time(web, path)
            if statistics.median(again) < statistics.median(timings[path]):
                timings[path] = again

    print(f"\npage timings at {N:,} tasks (ms, {RUNS} runs after a warm-up):")
    print(f"{'page':60} {'median':>8} {'max':>8}")
    for path, ms in timings.items():
        print(f"{path[:60]:60} {statistics.median(ms):8.1f} {max(ms):8.1f}")
    slow = {p: statistics.median(ms) for p, ms in timings.items()}
    slow = {p: ms for p, ms in slow.items() if ms > BUDGET_MS}
    assert not slow, f"pages over {BUDGET_MS} ms: {slow}"

    # Every statement, with the values it ran with: custom and generic plans.
    conn = await pg.connect(web.url)
    try:
        seen = set()
        for stmt, params in recorded:
            if stmt.source.startswith("EXPLAIN"):  # the estimate of a count above the cap
                continue
            key = (stmt.source, json.dumps(params, default=str, sort_keys=True))
            if key in seen:
                continue
            seen.add(key)
            for plan in await explain(conn, stmt, params):
                whole = relations_scanned_whole(plan)
                assert not whole, f"{whole} read whole by:\n{stmt.source}\nplan: {plan}"
    finally:
        await conn.close()
    assert len({s.source for s, _ in recorded}) >= 10  # the check saw the dashboard's queries


async def _time(web: Web, path: str) -> list[float]:
    """Milliseconds of RUNS requests of `path`."""
    times = []
    for _ in range(RUNS):
        started = time.perf_counter()
        response = await web.get(path)
        times.append((time.perf_counter() - started) * 1000)
        assert response.status_code == 200, path
    return times


def _literal(value: Any) -> str:
    """A parameter as an SQL literal of unknown type (EXECUTE casts it to the parameter's)."""
    if value is None:
        return "NULL"
    if isinstance(value, bool | int | float):
        return str(value).lower() if isinstance(value, bool) else str(value)
    if isinstance(value, list):
        value = "{" + ",".join(str(v) for v in value) + "}"
    elif isinstance(value, datetime):
        value = value.isoformat()
    return "'" + str(value).replace("'", "''") + "'"


async def _scalar(url: str, sql: str) -> Any:
    conn = await pg.connect(url)
    try:
        return await conn.fetchval(sql)
    finally:
        await conn.close()


async def _count(url: str) -> int:
    return int(await _scalar(url, "SELECT count(*) FROM tasks"))
