"""The worker lifecycle with an in-process worker on real Postgres and Redis."""

from __future__ import annotations

import asyncio
import pickle
import uuid
from datetime import timedelta

import pytest
from arq.connections import ArqRedis
from arq.constants import job_key_prefix
from redis.asyncio import Redis

from domain.entities import Conversation, Doorbell
from domain.value_objects import TaskStatus
from tests.support import db
from tests.support.services import PrivateRedis
from tests.support.workers import make_settings, running_worker
from worker.client import TaskClient, TaskSpec
from worker.config import Settings
from worker.dispatch import Dispatcher
from worker.runtime import WorkerRuntime
from worker.serialization import serialize


async def test_echo_square_and_sleep_complete(
    client: TaskClient, conversation: Conversation, worker: WorkerRuntime, database_url: str
) -> None:
    echo = await client.submit("echo", {"x": [1, "two"]}, conversation_id=conversation.id)
    square = await client.submit("square", {"x": 7}, conversation_id=conversation.id)
    sleep = await client.submit("sleep", {"seconds": 0.05}, conversation_id=conversation.id)

    assert (await client.wait(echo.id, timeout=10)).output == {"echo": {"x": [1, "two"]}}
    assert (await client.wait(square.id, timeout=10)).output == {"y": 49}
    done = await client.wait(sleep.id, timeout=10)
    assert done.output == {"slept": 0.05}
    assert done.status is TaskStatus.COMPLETED
    assert done.attempts == 1
    assert done.worker_id == worker.worker_id
    assert done.started_at is not None
    assert done.completed_at is not None
    assert done.completed_at >= done.started_at
    history = await db.attempts(database_url, sleep.id)
    assert [(a["run"], a["attempt"], a["outcome"]) for a in history] == [(1, 1, "completed")]


async def test_task_inserted_with_plain_sql_runs(
    conversation: Conversation, database_url: str, private_redis: PrivateRedis
) -> None:
    # Exactly the statement the README promises another service can use: no queue given, so the
    # default queue; the worker runs on a Redis of its own, where nobody else uses that name.
    settings = make_settings(database_url, private_redis.url, "tasklane")
    async with running_worker(settings):
        task_id = await db.value(
            database_url,
            "INSERT INTO tasks (conversation_id, agent_id, input)"
            " VALUES ($1, 'echo', '{\"x\":1}') RETURNING id",
            conversation.id,
        )
        [row] = await db.wait_final(database_url, [task_id], timeout=10)
    assert row["status"] == "completed"
    assert row["output"] == {"echo": {"x": 1}}
    assert row["max_attempts"] == 3  # resolved at the first claim from TASKLANE_MAX_ATTEMPTS


async def test_retries_until_success(
    client: TaskClient, conversation: Conversation, worker: WorkerRuntime, database_url: str
) -> None:
    task = await client.submit("fail", {"fail_times": 2}, conversation_id=conversation.id)
    done = await client.wait(task.id, timeout=15)
    assert done.status is TaskStatus.COMPLETED
    assert done.output == {"attempts": 3}
    assert done.attempts == 3
    outcomes = [a["outcome"] for a in await db.attempts(database_url, task.id)]
    assert outcomes == ["retry", "retry", "completed"]


async def test_always_failing_task_fails_after_max_attempts(
    client: TaskClient, conversation: Conversation, worker: WorkerRuntime, database_url: str
) -> None:
    task = await client.submit("fail", {"message": "boom"}, conversation_id=conversation.id)
    done = await client.wait(task.id, timeout=15)
    assert done.status is TaskStatus.FAILED
    assert done.attempts == done.max_attempts == 3
    assert done.error == "RuntimeError: boom (attempt 3)"
    history = await db.attempts(database_url, task.id)
    assert [a["outcome"] for a in history] == ["retry", "retry", "failed"]
    assert history[0]["error"] == "RuntimeError: boom (attempt 1)"


async def test_task_max_attempts_and_agent_default(
    client: TaskClient, conversation: Conversation, worker: WorkerRuntime
) -> None:
    own = await client.submit("fail", {}, conversation_id=conversation.id, max_attempts=1)
    agent_default = await client.submit("t_twice", {}, conversation_id=conversation.id)
    own_done = await client.wait(own.id, timeout=10)
    default_done = await client.wait(agent_default.id, timeout=10)
    assert (own_done.status, own_done.attempts, own_done.max_attempts) == (TaskStatus.FAILED, 1, 1)
    assert (default_done.status, default_done.attempts) == (TaskStatus.FAILED, 2)
    assert default_done.max_attempts == 2  # from @agent(max_attempts=2)


@pytest.mark.parametrize("settings_overrides", [{"task_timeout": 0.2, "max_attempts": 2}])
async def test_timeout_is_a_failed_attempt(
    database_url: str,
    redis_url: str,
    queue: str,
    conversation: Conversation,
    client: TaskClient,
    settings_overrides: dict[str, float],
) -> None:
    settings = make_settings(database_url, redis_url, queue, **settings_overrides)
    async with running_worker(settings):
        task = await client.submit("sleep", {"seconds": 30}, conversation_id=conversation.id)
        done = await client.wait(task.id, timeout=15)
    assert done.status is TaskStatus.FAILED
    assert done.attempts == 2
    assert done.error == "timed out after 0.2s"
    outcomes = [a["outcome"] for a in await db.attempts(database_url, task.id)]
    assert outcomes == ["retry", "failed"]


async def test_unknown_agent_fails_naming_it(
    client: TaskClient, conversation: Conversation, worker: WorkerRuntime
) -> None:
    task = await client.submit("no-such-agent", {}, conversation_id=conversation.id)
    done = await client.wait(task.id, timeout=10)
    assert done.status is TaskStatus.FAILED
    assert done.attempts == 1
    assert done.error is not None
    assert "unknown agent 'no-such-agent'" in done.error


async def test_retry_after_and_permanent_error(
    client: TaskClient, conversation: Conversation, worker: WorkerRuntime, database_url: str
) -> None:
    later = await client.submit("t_retry_after", {"after": 0.5}, conversation_id=conversation.id)
    permanent = await client.submit("t_permanent", {}, conversation_id=conversation.id)
    bad_output = await client.submit("t_bad_output", {}, conversation_id=conversation.id)

    done = await client.wait(later.id, timeout=10)
    assert (done.status, done.output) == (TaskStatus.COMPLETED, {"attempt": 2})
    first, second = await db.attempts(database_url, later.id)
    assert first["outcome"] == "retry"
    assert first["error"] == "retry requested: come back later"
    assert second["started_at"] - first["finished_at"] >= timedelta(seconds=0.5)

    failed = await client.wait(permanent.id, timeout=10)
    assert (failed.status, failed.attempts) == (TaskStatus.FAILED, 1)
    assert failed.error == "PermanentError: this can never work"

    garbage = await client.wait(bad_output.id, timeout=10)
    assert (garbage.status, garbage.attempts) == (TaskStatus.FAILED, 1)
    assert garbage.error is not None
    assert "not valid JSON" in garbage.error


async def test_duplicate_doorbells_run_the_handler_once(
    client: TaskClient, conversation: Conversation, settings: Settings, database_url: str
) -> None:
    task = await client.submit("t_count_runs", {"seconds": 0.2}, conversation_id=conversation.id)
    redis = Redis.from_url(settings.redis_url)
    try:
        # The same task's doorbell, under other job ids too: as if re-sent by everybody at once.
        dispatcher = Dispatcher(redis, settings.queue)
        await dispatcher.ring([Doorbell(task.id, 0)] * 3)
        arq = ArqRedis(connection_pool=redis.connection_pool)
        for _ in range(5):
            await arq.enqueue_job(
                "run_task", str(task.id), _queue_name=settings.queue, _job_id=uuid.uuid4().hex
            )
        async with running_worker(settings):
            done = await client.wait(task.id, timeout=10)
    finally:
        await redis.aclose()
    assert done.status is TaskStatus.COMPLETED
    assert done.attempts == 1
    assert len(await db.attempts(database_url, task.id)) == 1
    assert len(await db.marks(database_url, task.id, "run")) == 1


async def test_junk_in_the_queue_does_not_stop_the_worker(
    client: TaskClient,
    conversation: Conversation,
    worker: WorkerRuntime,
    settings: Settings,
    database_url: str,
) -> None:
    redis = Redis.from_url(settings.redis_url)
    missing = uuid.uuid4()
    payloads = {
        "pickle": pickle.dumps({"f": "run_task", "a": [str(missing)], "k": {}, "t": 1, "et": 1}),
        "random-bytes": bytes(range(256)),
        "not-json": b"{not json",
        "json-list": b"[1, 2, 3]",
        "bad-shape": serialize({"f": ["run_task"], "a": 1, "k": [], "t": "x", "et": "y"}),
        "unknown-function": serialize(
            {"f": "os.system", "a": ["true"], "k": {}, "t": None, "et": 1}
        ),
        "no-args": serialize({"f": "run_task", "a": [], "k": {}, "t": None, "et": 1}),
        "int-id": serialize({"f": "run_task", "a": [123], "k": {}, "t": None, "et": 1}),
        "bad-uuid": serialize(
            {"f": "run_task", "a": ["'; DROP TABLE tasks; --"], "k": {}, "t": None, "et": 1}
        ),
        "missing-task": serialize(
            {"f": "run_task", "a": [str(missing)], "k": {}, "t": None, "et": 1}
        ),
        "kwargs": serialize(
            {"f": "run_task", "a": [], "k": {"task_id": 1, "x": 2}, "t": None, "et": 1}
        ),
        "huge-id": serialize({"f": "run_task", "a": ["x" * 100_000], "k": {}, "t": None, "et": 1}),
    }
    try:
        for name, payload in payloads.items():
            await redis.set(job_key_prefix + f"junk-{name}", payload)
            await redis.zadd(settings.queue, {f"junk-{name}": 1})
        await redis.zadd(settings.queue, {"junk-no-job-key": 1})
        task = await client.submit("echo", {"still": "alive"}, conversation_id=conversation.id)
        done = await client.wait(task.id, timeout=10)
        assert done.output == {"echo": {"still": "alive"}}

        async def queued() -> int:
            return int(await redis.zcard(settings.queue))

        await db.eventually(queued, lambda n: n == 0, what="junk drained from the queue")
    finally:
        await redis.aclose()
    assert await db.value(database_url, "SELECT count(*) FROM tasks") == 1
    # and the worker still takes new work afterwards
    again = await client.submit("echo", 2, conversation_id=conversation.id)
    assert (await client.wait(again.id, timeout=10)).output == {"echo": 2}


async def test_spawn_then_fail_creates_no_subtask(
    client: TaskClient, conversation: Conversation, worker: WorkerRuntime, database_url: str
) -> None:
    task = await client.submit("t_spawn_then_fail", {}, conversation_id=conversation.id)
    done = await client.wait(task.id, timeout=10)
    assert done.status is TaskStatus.FAILED
    assert (
        await db.value(
            database_url, "SELECT count(*) FROM tasks WHERE parent_task_id = $1", task.id
        )
        == 0
    )


async def test_a_task_inserted_with_sql_keeps_its_place_in_a_burst(
    database_url: str,
    redis_url: str,
    queue: str,
    conversation: Conversation,
    client: TaskClient,
) -> None:
    """Doorbells are served in the order their tasks became due, by the database clock, whoever
    inserted them: a task inserted with SQL during a producer's burst (a random v4 id, rung by
    the reconciler) runs before the tasks submitted after it."""
    settings = make_settings(database_url, redis_url, queue, concurrency=2)
    specs = [TaskSpec("t_count_runs", {"seconds": 0.02}, conversation.id) for _ in range(200)]
    async with running_worker(settings):
        await client.submit_many(specs)
        sql_task = await db.value(
            database_url,
            "INSERT INTO tasks (conversation_id, agent_id, queue) VALUES ($1, 'echo', $2)"
            " RETURNING id",
            conversation.id,
            queue,
        )
        await asyncio.sleep(1.0)  # the reconciler (every 0.2 s here) rings it meanwhile
        after = await client.submit_many(specs[:100])
        await db.wait_final(database_url, [sql_task, *(t.id for t in after)], timeout=60)
    [sql_start] = await db.query(
        database_url, "SELECT started_at FROM tasks WHERE id = $1", sql_task
    )
    later = await db.value(
        database_url,
        "SELECT min(started_at) FROM tasks WHERE id = ANY($1)",
        [t.id for t in after],
    )
    # Equal when both were claimed by one batched claim statement (one transaction time).
    assert sql_start["started_at"] <= later
