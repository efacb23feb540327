"""Durable waits against a real database and Redis: signals (sent before the wait, raced, by
SQL, refused when finished), timeouts, timers, progress, and a wait that outlives its worker."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import asyncpg
import pytest

from domain.entities import Conversation
from domain.exceptions import EntityNotFoundError, SignalRefusedError
from domain.value_objects import TaskStatus
from tests.integration.test_cli import ok_json, tasklane
from tests.support import db
from tests.support.workers import WorkerProcess, running_worker
from worker.client import TaskClient, TaskSpec
from worker.config import Settings
from worker.runtime import WorkerRuntime
from worker.watch import WATCHED_KEY

AGENTS = ("worker.demo_agents", "tests.agents", "tests.wait_agents")


@pytest.fixture
def wait_settings(settings: Settings) -> Settings:
    return replace(settings, agent_modules=AGENTS)


@pytest.fixture
async def waiter(wait_settings: Settings) -> AsyncIterator[WorkerRuntime]:
    async with running_worker(wait_settings) as runtime:
        yield runtime


async def waiting(url: str, task_id: Any) -> None:
    await db.eventually(
        lambda: db.value(url, "SELECT status FROM tasks WHERE id = $1", task_id),
        lambda status: status == "waiting",
        what="the task waiting",
    )


async def test_a_signal_resumes_a_waiting_task_with_its_payload(
    client: TaskClient, conversation: Conversation, waiter: WorkerRuntime, database_url: str
) -> None:
    task = await client.submit("w_signal", {}, conversation_id=conversation.id)
    await waiting(database_url, task.id)
    row = (await db.query(database_url, "SELECT * FROM tasks WHERE id = $1", task.id))[0]
    assert (row["wait_signals"], row["lease_expires_at"], row["attempts"]) == (
        ["approval"],
        None,
        1,
    )
    await client.signal(task.id, "approval", {"approved": True}, sent_by="alice")
    done = await client.wait(task.id, timeout=10)
    assert done.status is TaskStatus.COMPLETED
    assert done.output == {
        "step": 1,
        "timed_out": False,
        "signals": {"approval": [{"approved": True}, "alice"]},
    }
    history = await client.attempts(task.id)
    assert [a.outcome.value for a in history if a.outcome] == ["waiting", "completed"]


async def test_a_signal_sent_before_the_wait_is_consumed_by_it(
    client: TaskClient, conversation: Conversation, wait_settings: Settings, database_url: str
) -> None:
    task = await client.submit("w_signal", {}, conversation_id=conversation.id)
    await client.signal(task.id, "approval", "early", sent_by="bob")  # no worker yet: pending
    async with running_worker(wait_settings):
        done = await client.wait(task.id, timeout=10)
    assert done.output == {"step": 1, "timed_out": False, "signals": {"approval": ["early", "bob"]}}
    consumed = await db.query(database_url, "SELECT consumed_step FROM task_signals")
    assert [r["consumed_step"] for r in consumed] == [1]


async def test_two_senders_racing_resume_the_task_exactly_once(
    client: TaskClient, conversation: Conversation, waiter: WorkerRuntime, database_url: str
) -> None:
    task = await client.submit(
        "w_signal", {"names": ["yes", "no"]}, conversation_id=conversation.id
    )
    await waiting(database_url, task.id)
    await asyncio.gather(client.signal(task.id, "yes", 1), client.signal(task.id, "no", 2))
    done = await client.wait(task.id, timeout=10)
    assert done.status is TaskStatus.COMPLETED
    assert done.step == 1, "one resume, one step"
    steps = await db.marks(database_url, task.id)
    assert [m["label"] for m in steps] == ["step0", "step1"]
    assert set(done.output["signals"]) <= {"yes", "no"}  # type: ignore[index]
    assert done.output["signals"]  # type: ignore[index]


async def test_a_timeout_resumes_with_timed_out_or_fails_when_asked(
    client: TaskClient, conversation: Conversation, waiter: WorkerRuntime
) -> None:
    resumed = await client.submit("w_signal", {"timeout": 0.5}, conversation_id=conversation.id)
    failing = await client.submit(
        "w_signal", {"timeout": 0.5, "on_timeout": "fail"}, conversation_id=conversation.id
    )
    done = await client.wait(resumed.id, timeout=10)
    assert done.output == {"step": 1, "timed_out": True, "signals": {}}
    failed = await client.wait(failing.id, timeout=10)
    assert failed.status is TaskStatus.FAILED
    assert failed.error == "timed out waiting for signal approval"


async def test_signals_and_subtasks_together_need_both(
    client: TaskClient, conversation: Conversation, waiter: WorkerRuntime, database_url: str
) -> None:
    task = await client.submit("w_signal", {"children": 3}, conversation_id=conversation.id)
    await waiting(database_url, task.id)
    await db.eventually(
        lambda: db.value(
            database_url,
            "SELECT count(*) FROM tasks WHERE parent_task_id = $1 AND status = 'completed'",
            task.id,
        ),
        lambda n: n == 3,
        what="the subtasks finished",
    )
    await asyncio.sleep(0.5)
    assert (await client.get(task.id)).status is TaskStatus.WAITING, "the signal is missing"
    await client.signal(task.id, "approval", "go")
    done = await client.wait(task.id, timeout=10)
    assert done.output["signals"] == {"approval": ["go", "client"]}  # type: ignore[index]


async def test_signals_inserted_with_sql_by_another_service(
    client: TaskClient, conversation: Conversation, waiter: WorkerRuntime, database_url: str
) -> None:
    task = await client.submit("w_signal", {}, conversation_id=conversation.id)
    await waiting(database_url, task.id)
    await db.query(
        database_url,
        "INSERT INTO task_signals (task_id, name, payload, sent_by)"
        " VALUES ($1, 'approval', '{\"ok\": 1}', 'billing-service')",
        task.id,
    )
    done = await client.wait(task.id, timeout=10)
    assert done.output["signals"] == {"approval": [{"ok": 1}, "billing-service"]}  # type: ignore[index]


async def test_a_signal_for_a_finished_or_missing_task_is_refused_clearly(
    client: TaskClient, conversation: Conversation, waiter: WorkerRuntime, database_url: str
) -> None:
    task = await client.submit("echo", {}, conversation_id=conversation.id)
    await client.wait(task.id, timeout=10)
    with pytest.raises(SignalRefusedError, match="is completed: a finished task takes no signal"):
        await client.signal(task.id, "approval")
    with pytest.raises(asyncpg.CheckViolationError, match="takes no signal"):
        await db.query(
            database_url, "INSERT INTO task_signals (task_id, name) VALUES ($1, 'x')", task.id
        )
    with pytest.raises(EntityNotFoundError):
        await client.signal("01a23f51-191c-73dd-a184-3a2a2bfab678", "approval")
    assert await db.value(database_url, "SELECT count(*) FROM task_signals") == 0


async def test_durable_timers_wake_tasks_at_their_time(
    client: TaskClient, conversation: Conversation, waiter: WorkerRuntime, database_url: str
) -> None:
    tasks = [
        await client.submit("w_sleep", {"seconds": 1.0}, conversation_id=conversation.id)
        for _ in range(20)
    ]
    rows = await db.wait_final(database_url, [t.id for t in tasks], timeout=20)
    assert {r["status"] for r in rows} == {"completed"}
    runs = await db.query(
        database_url,
        "SELECT a.task_id, a.started_at, a.finished_at, a.outcome, a.attempt FROM task_attempts a"
        " WHERE a.task_id = ANY($1) ORDER BY a.task_id, a.run",
        [t.id for t in tasks],
    )
    by_task: dict[Any, list[Any]] = {}
    for r in runs:
        by_task.setdefault(r["task_id"], []).append(r)
    for first, second in by_task.values():
        assert (first["outcome"], second["outcome"]) == ("waiting", "completed")
        late = (second["started_at"] - first["finished_at"]).total_seconds() - 1.0
        assert -0.01 <= late < 2.0, late  # the sweeper ticks every 0.2 s here
        assert second["attempt"] == 1, "a wait spends no attempt"


async def test_progress_keeps_the_latest_and_show_prints_it(
    client: TaskClient, conversation: Conversation, waiter: WorkerRuntime, settings: Settings
) -> None:
    task = await client.submit("w_progress", {"n": 50}, conversation_id=conversation.id)
    await client.wait(task.id, timeout=10)
    shown = await ok_json(settings, "show", str(task.id))
    assert shown["progress"] == {
        "fraction": 1.0,
        "message": "item 50 of 50",
        "data": {"i": 49},
        "step": 0,
    }


async def test_the_cli_signals_and_refuses_clearly(
    client: TaskClient, conversation: Conversation, waiter: WorkerRuntime, settings: Settings
) -> None:
    task = await client.submit("approval", {"request": "deploy"}, conversation_id=conversation.id)
    await waiting(settings.database_url, task.id)
    run = await tasklane(
        settings, "signal", str(task.id), "approval", "--payload", '{"approved": true}'
    )
    assert run.code == 0, run.explained
    done = await client.wait(task.id, timeout=10)
    assert done.output["approved"] is True  # type: ignore[index]
    run = await tasklane(settings, "signal", str(task.id), "approval")
    assert run.code == 1
    assert "a finished task takes no signal" in run.stderr
    assert "Traceback" not in run.stderr


async def test_a_wait_outlives_a_killed_worker_and_spends_no_attempt(
    client: TaskClient,
    conversation: Conversation,
    wait_settings: Settings,
    processes: list[WorkerProcess],
    database_url: str,
) -> None:
    info = replace(wait_settings, log_level="INFO")
    first = WorkerProcess(info)
    processes.append(first)
    first.wait_started(timeout=60)
    task = await client.submit("w_signal", {}, conversation_id=conversation.id)
    await waiting(database_url, task.id)
    first.kill()
    await client.signal(task.id, "approval", "after the crash")
    second = WorkerProcess(info)
    processes.append(second)
    second.wait_started(timeout=60)
    done = await client.wait(task.id, timeout=20)
    assert done.output["signals"] == {"approval": ["after the crash", "client"]}  # type: ignore[index]
    assert (done.attempts, done.runs) == (1, 2)


async def test_list_waiting_is_an_inbox(
    client: TaskClient, conversation: Conversation, waiter: WorkerRuntime, settings: Settings
) -> None:
    signal = await client.submit("w_signal", {"timeout": 3600}, conversation_id=conversation.id)
    timer = await client.submit("w_sleep", {"seconds": 600}, conversation_id=conversation.id)
    await waiting(settings.database_url, signal.id)
    await waiting(settings.database_url, timer.id)
    inbox = await ok_json(settings, "list", "--waiting")
    waits = {row["id"]: row["waits_for"] for row in inbox}
    assert waits[str(signal.id)].startswith("signal approval, timeout in 59m")
    assert waits[str(timer.id)].startswith("timer, wakes in 9m")
    text = await tasklane(settings, "list", "--waiting")
    assert "WAITS FOR" in text.stdout
    assert "signal approval" in text.stdout


async def test_watch_delivers_progress_in_order_and_always_the_last(
    client: TaskClient, conversation: Conversation, waiter: WorkerRuntime, database_url: str
) -> None:
    # Held back until the watcher follows it and the worker has read that (its next tick).
    task = await client.submit(
        "w_progress_slow", {"n": 8, "every": 0.3}, conversation_id=conversation.id
    )
    events = [event async for event in client.watch(task.id, safety_poll_seconds=30)]
    progress = [e["progress"]["fraction"] for e in events if e["event"] == "progress"]
    assert progress == sorted(progress), "in order"
    assert progress[-1] == 1.0, "the last one always arrives"
    assert len(progress) >= 4, progress  # most of them live, not only the final state
    states = [e["status"] for e in events if e["event"] == "state"]
    assert states[-1] == "completed"
    assert events[-1]["event"] == "state"


async def test_show_follow_prints_each_change_until_final(
    client: TaskClient, conversation: Conversation, waiter: WorkerRuntime, settings: Settings
) -> None:
    task = await client.submit("w_signal", {}, conversation_id=conversation.id)
    await waiting(settings.database_url, task.id)
    follow = asyncio.create_task(tasklane(settings, "show", str(task.id), "--follow"))
    await db.eventually(  # the follower is following (it read the task's state first)
        lambda: client.redis.zscore(WATCHED_KEY, str(task.id)),
        lambda score: score is not None,
        what="the follower following",
        timeout=30,
    )
    await asyncio.sleep(0.5)
    await client.signal(task.id, "approval", "ok")
    run = await asyncio.wait_for(follow, timeout=30)
    assert run.code == 0, run.explained
    lines = run.stdout.strip().splitlines()
    assert lines[0].startswith("waiting"), lines
    assert lines[-1].startswith("completed"), lines
    assert "resumed by signal" in lines[-1]


async def test_a_thousand_sleepers_on_ten_slots_wake_within_a_second_of_their_time(
    client: TaskClient, conversation: Conversation, wait_settings: Settings, database_url: str
) -> None:
    specs = [TaskSpec("w_sleep", {"seconds": 2.0}, conversation.id) for _ in range(1000)]
    async with running_worker(replace(wait_settings, concurrency=10)):
        ids = [t.id for t in await client.submit_many(specs)]
        rows = await db.wait_final(database_url, ids, timeout=120)
    assert {r["status"] for r in rows} == {"completed"}
    # When each went to sleep and woke, from the test database's record of every transition.
    late = await db.query(
        database_url,
        "SELECT EXTRACT(EPOCH FROM w.at - s.at) - 2.0 AS late FROM test_transitions AS s"
        " JOIN test_transitions AS w ON w.task_id = s.task_id"
        " AND w.old_status = 'waiting' AND w.new_status = 'pending'"
        " WHERE s.new_status = 'waiting' AND s.task_id = ANY($1)",
        ids,
    )
    assert len(late) == 1000
    worst = max(float(r["late"]) for r in late)
    assert -0.01 <= worst < 1.0, worst
    assert all(r["attempts"] == 1 for r in rows), "a sleep spends no attempt"


async def test_cancelling_a_waiting_task_ends_its_wait_and_refuses_later_signals(
    client: TaskClient, conversation: Conversation, waiter: WorkerRuntime, database_url: str
) -> None:
    task = await client.submit("w_signal", {"children": 2}, conversation_id=conversation.id)
    await waiting(database_url, task.id)
    result = await client.cancel(task.id)
    assert result.changed
    assert (await client.get(task.id)).status is TaskStatus.CANCELLED
    unfinished = await db.value(
        database_url,
        "SELECT count(*) FROM tasks WHERE parent_task_id = $1"
        " AND status IN ('pending', 'running', 'waiting')",
        task.id,
    )
    assert unfinished == 0, "its unfinished subtasks are cancelled with it"
    with pytest.raises(SignalRefusedError, match="is cancelled"):
        await client.signal(task.id, "approval")


async def test_watch_rides_out_a_lost_redis_connection_with_postgres_as_the_truth(
    client: TaskClient, conversation: Conversation, waiter: WorkerRuntime, database_url: str
) -> None:
    task = await client.submit("w_signal", {}, conversation_id=conversation.id)
    await waiting(database_url, task.id)
    events = client.watch(task.id, safety_poll_seconds=1.0)
    first = await anext(events)
    assert first["status"] == "waiting"
    # Every Redis connection of the client dropped under the follower (its subscription too).
    await client.redis.connection_pool.disconnect()
    await client.signal(task.id, "approval", "through the outage")
    rest = [event async for event in events]
    assert rest[-1]["event"] == "state"
    assert rest[-1]["status"] == "completed"
