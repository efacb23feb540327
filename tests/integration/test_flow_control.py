"""Flow control against real worker processes: limits hold across workers, keys take turns,
rates hold, a provider's 429 spends no attempt, pauses stop starts, operators change limits live.

Every claim is measured from `task_attempts` (the database clock): a run's interval is its
started_at to finished_at.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

import asyncpg
import pytest

from domain.entities import Conversation
from tests.integration.test_cli import ok_json, tasklane
from tests.support import db
from tests.support.lifecycles import pooled_lifecycle
from tests.support.workers import WorkerProcess
from worker.client import TaskClient, TaskSpec
from worker.config import Settings

AGENTS = ("worker.demo_agents", "tests.agents", "tests.flow_agents")


@pytest.fixture
def flow_settings(settings: Settings) -> Settings:
    return replace(settings, agent_modules=AGENTS)


def start(processes: list[WorkerProcess], settings: Settings, n: int = 1) -> list[WorkerProcess]:
    settings = replace(settings, log_level="INFO")  # "worker.started" says it serves
    started = [WorkerProcess(settings) for _ in range(n)]
    processes.extend(started)
    for process in started:
        process.wait_started(timeout=60)
    return started


async def submit(
    client: TaskClient,
    conversation: Conversation,
    agent_id: str,
    n: int,
    *,
    seconds: float = 0.0,
    tenant: str | None = None,
    **input_: Any,
) -> list[Any]:
    metadata = {"tenant": tenant} if tenant is not None else None
    specs = [
        TaskSpec(agent_id, {"seconds": seconds, **input_}, conversation.id, metadata=metadata)
        for _ in range(n)
    ]
    return [t.id for t in await client.submit_many(specs)]


async def runs(url: str, ids: Sequence[Any]) -> list[asyncpg.Record]:
    return await db.query(
        url,
        "SELECT a.task_id, a.started_at, a.finished_at, a.outcome,"
        " t.metadata ->> 'tenant' AS tenant, a.worker_id"
        " FROM task_attempts AS a JOIN tasks AS t ON t.id = a.task_id"
        " WHERE a.task_id = ANY($1) ORDER BY a.started_at",
        list(ids),
    )


def deepest_overlap(intervals: Sequence[tuple[datetime, datetime]]) -> int:
    """How many intervals were open at once, at most (an end before a start at the same time)."""
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    depth = deepest = 0
    for _, change in events:
        depth += change
        deepest = max(deepest, depth)
    return deepest


def intervals(rows: Sequence[asyncpg.Record]) -> list[tuple[datetime, datetime]]:
    return [(r["started_at"], r["finished_at"]) for r in rows]


async def test_a_concurrency_limit_holds_across_three_workers(
    flow_settings: Settings,
    client: TaskClient,
    conversation: Conversation,
    processes: list[WorkerProcess],
    database_url: str,
) -> None:
    start(processes, flow_settings, 3)
    ids = await submit(client, conversation, "f_five", 30, seconds=0.4)
    rows = await db.wait_final(database_url, ids, timeout=90)
    assert {r["status"] for r in rows} == {"completed"}
    assert all(r["attempts"] == 1 for r in rows), "held tasks spend no attempt"
    history = await runs(database_url, ids)
    assert len(history) == 30
    depth = deepest_overlap(intervals(history))
    assert 3 <= depth <= 5, depth  # limited to 5, and the limit was actually reached for
    assert len({r["worker_id"] for r in rows}) >= 2, "the work spread over the workers"


async def test_a_per_key_limit_of_one_with_three_keys(
    flow_settings: Settings,
    client: TaskClient,
    conversation: Conversation,
    processes: list[WorkerProcess],
    database_url: str,
) -> None:
    start(processes, flow_settings, 2)
    ids = []
    for tenant in ("a", "b", "c"):
        ids += await submit(client, conversation, "f_per_tenant", 6, seconds=0.2, tenant=tenant)
    rows = await db.wait_final(database_url, ids, timeout=90)
    assert {r["status"] for r in rows} == {"completed"}
    history = await runs(database_url, ids)
    for tenant in ("a", "b", "c"):
        mine = [r for r in history if r["tenant"] == tenant]
        assert deepest_overlap(intervals(mine)) == 1, [tuple(r) for r in mine]
    assert deepest_overlap(intervals(history)) >= 2, "keys run side by side"


async def test_a_rate_of_ten_a_second_over_three_workers(
    flow_settings: Settings,
    client: TaskClient,
    conversation: Conversation,
    processes: list[WorkerProcess],
    database_url: str,
) -> None:
    start(processes, flow_settings, 3)
    ids = await submit(client, conversation, "f_ten_per_second", 35)
    rows = await db.wait_final(database_url, ids, timeout=90)
    assert {r["status"] for r in rows} == {"completed"}
    starts = [r["started_at"] for r in await runs(database_url, ids)]
    second = timedelta(seconds=1)
    busiest = max(sum(1 for s in starts if t <= s < t + second) for t in starts)
    assert busiest <= 11, busiest  # 10 a second, +1 for the window's edges
    assert starts[-1] - starts[0] >= timedelta(seconds=3.0), "35 starts at 10/s take ≥ 3.4 s"


async def test_a_killed_workers_slots_return_within_its_lease(
    flow_settings: Settings,
    client: TaskClient,
    conversation: Conversation,
    processes: list[WorkerProcess],
    database_url: str,
) -> None:
    [first] = start(processes, flow_settings)
    long_ones = [
        t.id
        for t in await client.submit_many(
            [
                TaskSpec("f_five", {"seconds": 600}, conversation.id, max_attempts=1)
                for _ in range(5)
            ]
        )
    ]
    await db.eventually(
        lambda: db.value(
            database_url,
            "SELECT count(*) FROM tasks WHERE status = 'running' AND id = ANY($1)",
            long_ones,
        ),
        lambda n: n == 5,
        what="five long runs holding every slot",
    )
    short = await submit(client, conversation, "f_five", 3, seconds=0.1)
    await asyncio.sleep(1.0)
    held = await db.value(
        database_url, "SELECT count(*) FROM tasks WHERE status = 'pending' AND id = ANY($1)", short
    )
    assert held == 3, "the limit holds them while the slots are taken"
    first.kill()
    start(processes, flow_settings)
    # Lease 3 s, then the rescue (every 0.2 s) frees the slots: the short ones run.
    rows = await db.wait_final(database_url, short, timeout=20)
    assert {r["status"] for r in rows} == {"completed"}
    lost = await db.wait_final(database_url, long_ones, timeout=20)
    assert {r["status"] for r in lost} == {"failed"}


async def test_one_tenants_burst_delays_anothers_task_by_two_slot_turns_at_most(
    flow_settings: Settings,
    client: TaskClient,
    conversation: Conversation,
    processes: list[WorkerProcess],
    database_url: str,
) -> None:
    start(processes, flow_settings)
    burst = await submit(client, conversation, "f_fair", 1000, seconds=0.05, tenant="a")
    await db.eventually(
        lambda: db.value(
            database_url, "SELECT count(*) FROM task_attempts WHERE task_id = ANY($1)", burst
        ),
        lambda n: n >= 10,
        what="tenant a's burst under way",
    )
    [single] = await submit(client, conversation, "f_fair", 1, tenant="b")
    [b] = await db.wait_final(database_url, [single], timeout=30)
    assert b["status"] == "completed"
    a_started_meanwhile = await db.value(
        database_url,
        "SELECT count(*) FROM task_attempts WHERE task_id = ANY($1)"
        " AND started_at > $2 AND started_at < $3",
        burst,
        b["created_at"],
        b["started_at"],
    )
    # Concurrency 2: a slot's turn is one start per slot; B waits two turns at most.
    assert a_started_meanwhile <= 4, a_started_meanwhile
    await db.query(database_url, "UPDATE tasks SET status = 'cancelled' WHERE status = 'pending'")


async def test_rate_limited_spends_no_attempt_and_pauses_its_key(
    flow_settings: Settings,
    client: TaskClient,
    conversation: Conversation,
    processes: list[WorkerProcess],
    database_url: str,
) -> None:
    start(processes, flow_settings)
    [limited] = await submit(client, conversation, "f_provider", 1, tenant="t1", after=2.0)
    await db.eventually(
        lambda: db.query(database_url, "SELECT * FROM pauses"),
        lambda rows: len(rows) == 1,
        what="the key paused",
    )
    [pause] = await db.query(database_url, "SELECT * FROM pauses")
    assert (pause["agent_id"], pause["key"]) == ("f_provider", "t1")
    assert "429" in pause["reason"]
    same_key = await submit(client, conversation, "f_provider", 2, tenant="t1")
    other_key = await submit(client, conversation, "f_provider", 2, tenant="t2")
    others = await db.wait_final(database_url, other_key, timeout=10)
    assert {r["status"] for r in others} == {"completed"}, "another key runs meanwhile"
    rows = await db.wait_final(database_url, [limited, *same_key], timeout=20)
    assert {r["status"] for r in rows} == {"completed"}
    by_id = {r["id"]: r for r in rows}
    assert (by_id[limited]["attempts"], by_id[limited]["runs"]) == (1, 2), "no attempt spent"
    for task_id in same_key:
        assert by_id[task_id]["started_at"] >= pause["until"], "nothing of the key started"
    history = await runs(database_url, [limited])
    assert [r["outcome"] for r in history] == ["released", "completed"]


async def test_a_pause_stops_new_starts_within_a_second_and_resume_restarts_them(
    flow_settings: Settings,
    client: TaskClient,
    conversation: Conversation,
    processes: list[WorkerProcess],
    database_url: str,
) -> None:
    start(processes, flow_settings)
    submitted: list[Any] = []
    pause_at: list[datetime] = []

    async def produce() -> None:
        for i in range(150):
            submitted.extend(await submit(client, conversation, "f_open", 1))
            if i == 40:
                pause = await client.pause(agent_id="f_open", reason="provider outage", by="ops")
                pause_at.append(pause["paused_at"])
            await asyncio.sleep(0.02)

    await produce()
    await asyncio.sleep(1.5)
    late = await db.value(
        database_url,
        "SELECT count(*) FROM task_attempts WHERE task_id = ANY($1) AND started_at > $2",
        submitted,
        pause_at[0] + timedelta(seconds=1),
    )
    assert late == 0, "nothing started more than a second after the pause"
    pending = await db.value(
        database_url,
        "SELECT count(*) FROM tasks WHERE id = ANY($1) AND status = 'pending'",
        submitted,
    )
    assert pending >= 100
    assert await client.resume(agent_id="f_open")
    rows = await db.wait_final(database_url, submitted, timeout=30)
    assert {r["status"] for r in rows} == {"completed"}
    assert not await client.resume(agent_id="f_open"), "nothing left to resume"


async def test_operators_change_limits_live_and_reset_them(
    flow_settings: Settings,
    client: TaskClient,
    conversation: Conversation,
    processes: list[WorkerProcess],
    database_url: str,
) -> None:
    start(processes, flow_settings, 2)
    await client.set_limits("f_open", concurrency=1, by="ops")
    [limits] = [row for row in await client.limits() if row["agent_id"] == "f_open"]
    assert (limits["eff_concurrency"], limits["overridden_by"]) == (1, "ops")
    ids = await submit(client, conversation, "f_open", 8, seconds=0.15)
    await db.wait_final(database_url, ids, timeout=30)
    assert deepest_overlap(intervals(await runs(database_url, ids))) == 1
    # The code's limit of f_five, lifted live; another queue's limits are not touched.
    await client.set_limits("f_five", concurrency=None, by="ops")
    [five] = [row for row in await client.limits() if row["agent_id"] == "f_five"]
    assert (five["declared_concurrency"], five["eff_concurrency"]) == (5, None)
    assert await client.reset_limits("f_five") == 1
    [five] = [row for row in await client.limits() if row["agent_id"] == "f_five"]
    assert five["eff_concurrency"] == 5
    assert await client.reset_limits("f_open") == 1
    ids = await submit(client, conversation, "f_open", 8, seconds=0.3)
    await db.wait_final(database_url, ids, timeout=30)
    assert deepest_overlap(intervals(await runs(database_url, ids))) >= 2, "no limit any more"


async def test_a_weighted_rate_is_corrected_by_what_handlers_consume(
    flow_settings: Settings,
    client: TaskClient,
    conversation: Conversation,
    processes: list[WorkerProcess],
    database_url: str,
) -> None:
    start(processes, flow_settings)
    # 100 tokens a second, 10 estimated per task, 50 really used: about two tasks a second.
    ids = await submit(client, conversation, "f_tokens", 6, tokens=50)
    await db.wait_final(database_url, ids, timeout=30)
    starts = [r["started_at"] for r in await runs(database_url, ids)]
    assert starts[-1] - starts[0] >= timedelta(seconds=1.5), starts[-1] - starts[0]


# -- the CLI ------------------------------------------------------------------------------------


async def test_the_cli_pauses_resumes_and_overrides_limits_and_show_says_why(
    flow_settings: Settings, client: TaskClient, conversation: Conversation
) -> None:
    run = await tasklane(
        flow_settings, "limits", "set", "f_open", "--concurrency", "2", "--by", "ops"
    )
    assert run.code == 0, run.explained
    listed = await ok_json(flow_settings, "limits")
    [limit] = [row for row in listed["limits"] if row["agent_id"] == "f_open"]
    assert (limit["eff_concurrency"], limit["overridden_by"], limit["running"]) == (2, "ops", 0)

    run = await tasklane(
        flow_settings, "pause", "agent", "f_open", "--reason", "provider outage", "--for", "10m"
    )
    assert run.code == 0, run.explained
    task = await client.submit("f_open", {}, conversation_id=conversation.id)
    shown = await ok_json(flow_settings, "show", str(task.id))
    assert "agent 'f_open' paused since" in shown["reason"], shown["reason"]
    assert "provider outage" in shown["reason"]
    stats = await ok_json(flow_settings, "stats")
    assert [(p["agent_id"], p["reason"]) for p in stats["pauses"]] == [
        ("f_open", "provider outage")
    ]
    assert any(row["agent_id"] == "f_open" for row in stats["limits"])
    text = await tasklane(flow_settings, "limits")
    assert "f_open" in text.stdout, text.explained
    assert "provider outage" in text.stdout, text.explained

    run = await tasklane(flow_settings, "resume", "agent", "f_open")
    assert (run.code, run.stdout.strip()) == (0, "resumed agent f_open"), run.explained
    run = await tasklane(flow_settings, "resume", "agent", "f_open")
    assert run.stdout.strip() == "agent f_open was not paused"
    run = await tasklane(flow_settings, "limits", "reset", "f_open")
    assert run.code == 0, run.explained
    listed = await ok_json(flow_settings, "limits")
    [limit] = [row for row in listed["limits"] if row["agent_id"] == "f_open"]
    assert limit["eff_concurrency"] is None


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("pause", "key", "f_open"), "expected `pause key AGENT KEY`"),
        (("pause", "agent"), "expected `pause agent AGENT`"),
        (("pause", "agent", "bad agent!"), "not a valid agent id"),
        (("pause", "queue", "--for", "0s"), "longer than 0s"),
        (("pause", "queue", "--reason", ""), "1 to 1000 characters"),
        (("limits", "set", "f_open", "--rate", "fast"), "a rate is"),
        (("limits", "set", "f_open", "--concurrency", "0"), "between 1 and"),
        (("limits", "set", "f_open"), "nothing to set"),
        (("submit", "echo", "--priority", "1001"), "between -1000 and 1000"),
    ],
)
async def test_bad_flow_arguments_are_one_line(
    flow_settings: Settings, args: tuple[str, ...], fragment: str
) -> None:
    run = await tasklane(flow_settings, *args)
    assert run.code in (1, 2), run.explained
    assert "Traceback" not in run.stderr, run.explained
    assert fragment in run.stderr, run.explained


async def test_priority_starts_first_among_due_tasks(
    flow_settings: Settings,
    client: TaskClient,
    conversation: Conversation,
    processes: list[WorkerProcess],
    database_url: str,
) -> None:
    # Queued before any worker runs: 30 ordinary tasks, then one of priority 100 (it counts as
    # due 100 minutes earlier). One slot: it runs first, although submitted last.
    ordinary = await submit(client, conversation, "f_open", 30, seconds=0.01)
    urgent = await client.submit("f_open", {}, conversation_id=conversation.id, priority=100)
    start(processes, replace(flow_settings, concurrency=1))
    rows = await db.wait_final(database_url, [*ordinary, urgent.id], timeout=30)
    order = sorted(rows, key=lambda r: r["started_at"])
    assert order[0]["id"] == urgent.id, [r["priority"] for r in order[:5]]


async def test_claims_from_postgres_hold_the_limits_while_redis_is_away(
    client: TaskClient, conversation: Conversation, settings: Settings, database_url: str
) -> None:
    """The Redis-outage claim path (`Lifecycle.claim_due`) starts a limited agent's tasks through
    flow claims: within its limit, and none of a paused agent."""
    await client.set_limits("f_open", concurrency=2, by="ops")
    ids = await submit(client, conversation, "f_open", 5)
    async with pooled_lifecycle(
        database_url, worker_id="outage-test", queue=settings.queue
    ) as lifecycle:
        first = await lifecycle.claim_due(["f_open"], limit=10)
        assert len(first) == 2, "the limit holds in the outage mode too"
        assert await lifecycle.claim_due(["f_open"], limit=10) == []
        await client.reset_limits("f_open")
        await client.pause(agent_id="f_open", reason="provider outage")
        assert await lifecycle.claim_due(["f_open"], limit=10) == [], "paused: nothing starts"
        await client.resume(agent_id="f_open")
        rest = await lifecycle.claim_due(["f_open"], limit=10)
        assert {t.id for t in first + rest} == set(ids)
