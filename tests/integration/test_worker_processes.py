"""Real worker processes: killed, terminated, misconfigured, racing."""

from __future__ import annotations

import signal
import subprocess
import sys
import uuid
from dataclasses import replace

import pytest
from redis.asyncio import Redis

from domain.entities import Conversation, Doorbell
from domain.value_objects import TaskStatus
from tests.support import db
from tests.support.databases import ROOT, create_database, drop_database, unique_name, url_for
from tests.support.services import PrivateRedis
from tests.support.workers import WorkerProcess, make_settings, settings_env, start_process
from worker.client import TaskClient
from worker.config import Settings
from worker.dispatch import Dispatcher

pytestmark = pytest.mark.slow


async def test_sigkill_mid_task_runs_it_again_once(
    client: TaskClient,
    conversation: Conversation,
    settings: Settings,
    database_url: str,
    processes: list[WorkerProcess],
) -> None:
    first = start_process(processes, settings)
    task = await client.submit("t_marked_sleep", {"seconds": 1.5}, conversation_id=conversation.id)
    await db.eventually(
        lambda: db.marks(database_url, task.id, "started"), bool, what="handler started"
    )
    first.kill()

    second = start_process(processes, settings)
    done = await client.wait(task.id, timeout=30)
    assert done.status is TaskStatus.COMPLETED
    assert done.attempts == 2
    assert done.worker_id is not None
    assert done.worker_id.split("-")[-2] == str(second.pid)
    history = await db.attempts(database_url, task.id)
    assert [(a["run"], a["outcome"]) for a in history] == [(1, "lost"), (2, "completed")]
    assert "lease expired" in history[0]["error"]
    assert (
        len(await db.marks(database_url, task.id, "finished")) == 1
    )  # the killed run never finished


async def test_sigterm_lets_a_short_handler_finish(
    client: TaskClient,
    conversation: Conversation,
    settings: Settings,
    database_url: str,
    processes: list[WorkerProcess],
) -> None:
    worker = start_process(processes, settings)  # grace period: 2 s
    task = await client.submit("t_marked_sleep", {"seconds": 0.5}, conversation_id=conversation.id)
    await db.eventually(
        lambda: db.marks(database_url, task.id, "started"), bool, what="handler started"
    )
    worker.signal(signal.SIGTERM)
    assert worker.wait(timeout=20) == 0
    row = await db.task_row(database_url, task.id)
    assert (row["status"], row["attempts"]) == ("completed", 1)


async def test_sigterm_releases_a_long_handler_without_spending_an_attempt(
    client: TaskClient,
    conversation: Conversation,
    settings: Settings,
    database_url: str,
    processes: list[WorkerProcess],
) -> None:
    worker = start_process(processes, settings)
    task = await client.submit("t_marked_sleep", {"seconds": 6}, conversation_id=conversation.id)
    await db.eventually(
        lambda: db.marks(database_url, task.id, "started"), bool, what="handler started"
    )
    worker.signal(signal.SIGTERM)
    assert worker.wait(timeout=20) == 0
    row = await db.task_row(database_url, task.id)
    assert (row["status"], row["attempts"]) == ("pending", 0)
    assert [a["outcome"] for a in await db.attempts(database_url, task.id)] == ["released"]
    assert '"task.released"' in worker.output()

    start_process(processes, settings)
    done = await client.wait(task.id, timeout=30)
    assert (done.status, done.attempts) == (TaskStatus.COMPLETED, 1)
    assert [a["outcome"] for a in await db.attempts(database_url, task.id)] == [
        "released",
        "completed",
    ]


async def test_two_workers_racing_on_one_task_write_it_once(
    client: TaskClient,
    conversation: Conversation,
    settings: Settings,
    database_url: str,
    processes: list[WorkerProcess],
) -> None:
    start_process(processes, settings)
    start_process(processes, settings)
    tasks = [
        await client.submit("t_count_runs", {"seconds": 0.1}, conversation_id=conversation.id)
        for _ in range(20)
    ]
    redis = Redis.from_url(settings.redis_url)
    try:
        dispatcher = Dispatcher(redis, settings.queue)
        for round_ in range(1, 4):  # doorbells for runs that never happen, three times over
            await dispatcher.ring([Doorbell(t.id, round_) for t in tasks])
    finally:
        await redis.aclose()
    rows = await db.wait_final(database_url, [t.id for t in tasks], timeout=30)
    assert all(r["status"] == "completed" and r["attempts"] == 1 for r in rows)
    for task in tasks:
        assert len(await db.marks(database_url, task.id, "run")) == 1
        assert len(await db.attempts(database_url, task.id)) == 1


async def test_flushdb_while_tasks_are_pending(
    conversation: Conversation,
    database_url: str,
    private_redis: PrivateRedis,
    processes: list[WorkerProcess],
) -> None:
    settings = make_settings(database_url, private_redis.url, "tasklane")
    async with TaskClient.from_settings(settings) as client:
        tasks = [
            await client.submit("square", {"x": i}, conversation_id=conversation.id)
            for i in range(30)
        ]
        redis = Redis.from_url(private_redis.url)
        try:
            assert await redis.zcard("tasklane") == 30
            await redis.flushdb()
        finally:
            await redis.aclose()
    start_process(processes, settings)
    rows = await db.wait_final(database_url, [t.id for t in tasks], timeout=30)
    assert sorted(r["output"]["y"] for r in rows) == sorted(i * i for i in range(30))


async def test_junk_bytes_in_the_queue_leave_the_process_running(
    client: TaskClient,
    conversation: Conversation,
    settings: Settings,
    processes: list[WorkerProcess],
) -> None:
    worker = start_process(processes, settings)
    redis = Redis.from_url(settings.redis_url)
    try:
        for i in range(20):
            junk = uuid.uuid4().bytes * (i + 1)
            await redis.set(f"arq:job:junk{i}", b"\x80\x04" + junk if i % 2 else junk)
            await redis.zadd(settings.queue, {f"junk{i}": 1})
    finally:
        await redis.aclose()
    task = await client.submit("echo", "after the junk", conversation_id=conversation.id)
    assert (await client.wait(task.id, timeout=15)).status is TaskStatus.COMPLETED
    assert worker.process.poll() is None


async def test_logs_carry_task_context_and_no_password(
    client: TaskClient,
    conversation: Conversation,
    database: str,
    redis_url: str,
    queue: str,
    processes: list[WorkerProcess],
) -> None:
    # trust authentication ignores the password, so the worker connects all the same
    secret = "s3cr3t-Pa55word"
    url = url_for(database).replace("postgres@", f"postgres:{secret}@")
    settings = make_settings(url, redis_url, queue, log_level="INFO")
    worker = start_process(processes, settings)
    task = await client.submit("fail", {"fail_times": 1}, conversation_id=conversation.id)
    await client.wait(task.id, timeout=15)
    worker.stop()
    output = worker.output()
    assert secret not in output
    assert "postgres:***@" in output
    lines = [line for line in output.splitlines() if str(task.id) in line]
    assert any('"task.retrying"' in line for line in lines)
    assert any('"task.completed"' in line for line in lines)
    for line in lines:
        for key in ('"agent_id": "fail"', '"attempt": ', f'"worker_id": "{worker_id(output)}"'):
            assert key in line, f"{key} missing from {line}"


def worker_id(output: str) -> str:
    import json

    for line in output.splitlines():
        if '"worker.started"' in line:
            return str(json.loads(line)["worker_id"])
    raise AssertionError("no worker.started line")


def run_cli(
    settings: Settings, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", *args],
        env=env or settings_env(settings),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_startup_fails_with_one_clear_line(
    settings: Settings, redis_url: str, queue: str
) -> None:
    unreachable = make_settings(
        "postgresql://postgres:hunter2@127.0.0.1:1/nowhere", redis_url, queue
    )
    result = run_cli(unreachable, "worker")
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert "cannot connect to PostgreSQL at postgresql://postgres:***@127.0.0.1:1/nowhere" in line
    assert "hunter2" not in result.stderr + result.stdout

    bad_redis = make_settings(settings.database_url, "redis://127.0.0.1:1/0", queue)
    result = run_cli(bad_redis, "worker")
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert "cannot connect to Redis at redis://127.0.0.1:1/0" in line

    empty = unique_name()
    await create_database(empty)
    try:
        result = run_cli(make_settings(url_for(empty), redis_url, queue), "worker")
    finally:
        await drop_database(empty)
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert "not migrated" in line
    assert "tasklane migrate" in line

    bad_env = settings_env(settings, {"TASKLANE_CONCURRENCY": "lots"})
    result = run_cli(settings, "worker", env=bad_env)
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert "TASKLANE_CONCURRENCY" in line


async def test_arq_cli_runs_the_worker_settings(
    client: TaskClient, conversation: Conversation, settings: Settings
) -> None:
    task = await client.submit("square", {"x": 12}, conversation_id=conversation.id)
    result = subprocess.run(
        [sys.executable, "-m", "arq", "worker.settings.WorkerSettings", "--burst"],
        env=settings_env(settings),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert (await client.get(task.id)).output == {"y": 144}


async def test_a_handler_that_ignores_cancellation_cannot_hold_up_shutdown(
    client: TaskClient,
    conversation: Conversation,
    settings: Settings,
    database_url: str,
    processes: list[WorkerProcess],
) -> None:
    worker = start_process(processes, settings)  # grace 2 s; a cancelled handler gets 5 s to unwind
    task = await client.submit("t_stubborn", {"seconds": 120}, conversation_id=conversation.id)
    await db.eventually(lambda: db.marks(database_url, task.id, "started"), bool, what="started")
    worker.signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 0  # not the handler's 120 s
    assert await db.marks(database_url, task.id, "ignored-cancel")
    row = await db.task_row(database_url, task.id)
    assert (row["status"], row["attempts"]) == ("pending", 0)
    assert [a["outcome"] for a in await db.attempts(database_url, task.id)] == ["released"]


async def test_cancelling_a_handler_that_ignores_it_frees_its_slot(
    client: TaskClient,
    conversation: Conversation,
    settings: Settings,
    database_url: str,
    processes: list[WorkerProcess],
) -> None:
    start_process(processes, replace(settings, concurrency=1))
    stubborn = await client.submit("t_stubborn", {"seconds": 120}, conversation_id=conversation.id)
    await db.eventually(lambda: db.marks(database_url, stubborn.id, "started"), bool)
    await client.cancel(stubborn.id)
    # With its only slot taken by a handler that never ends, the worker could run nothing else
    # if it waited for it; it stops waiting once the heartbeat finds the task cancelled.
    after = await client.submit("echo", "next", conversation_id=conversation.id)
    assert (await client.wait(after.id, timeout=20)).status is TaskStatus.COMPLETED
    assert (await client.get(stubborn.id)).status is TaskStatus.CANCELLED


async def test_startup_failure_of_any_kind_is_one_line(
    settings: Settings, database_url: str
) -> None:
    # The schema check passes but a table is gone: registering the agents fails.
    await db.query(database_url, "DROP TABLE agents")
    result = run_cli(settings, "worker")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "agents" in lines[0]
    assert "Traceback" not in result.stderr + result.stdout
