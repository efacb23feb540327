"""The producer API against real Postgres and Redis."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from redis.asyncio import Redis
from sqlalchemy import event

from domain.entities import Conversation
from domain.exceptions import (
    EntityNotFoundError,
    IdempotencyConflictError,
    InvalidInputError,
)
from domain.value_objects import TaskStatus
from persistence.session import UnitOfWork
from tests.support import db
from worker.client import TaskClient, TaskSpec
from worker.config import Settings
from worker.runtime import WorkerRuntime


async def queued(settings: Settings) -> int:
    redis = Redis.from_url(settings.redis_url)
    try:
        return int(await redis.zcard(settings.queue))
    finally:
        await redis.aclose()


async def count_tasks(database_url: str) -> int:
    return int(await db.value(database_url, "SELECT count(*) FROM tasks"))


@pytest.mark.parametrize(
    ("agent_id", "payload", "message"),
    [
        ("", {}, "agent_id must be a non-empty string"),
        ("   ", {}, "agent_id must be a non-empty string"),
        ("echo", {"when": datetime.now(UTC)}, "not JSON-serialisable"),
        ("echo", {"x": float("nan")}, "not valid JSON"),
        ("echo", {"x": float("inf")}, "not valid JSON"),
        ("echo", {"s": "a\x00b"}, "NUL character"),
        ("echo", {"s": "\ud800"}, "lone surrogate"),
        ("echo", "x" * (256 * 1024 + 1), "over the limit of 262144 bytes"),
        ("echo", {b"bytes-key": 1}, "not JSON-serialisable"),
    ],
)
async def test_bad_input_is_refused_before_anything_is_written(
    client: TaskClient,
    conversation: Conversation,
    settings: Settings,
    database_url: str,
    agent_id: str,
    payload: object,
    message: str,
) -> None:
    with pytest.raises(InvalidInputError, match=message):
        await client.submit(agent_id, payload, conversation_id=conversation.id)
    assert await count_tasks(database_url) == 0
    assert await queued(settings) == 0


async def test_deeply_nested_input_is_refused(
    client: TaskClient, conversation: Conversation, database_url: str
) -> None:
    nested: object = []
    for _ in range(100_000):
        nested = [nested]
    with pytest.raises(InvalidInputError, match="nested too deeply"):
        await client.submit("echo", nested, conversation_id=conversation.id)
    assert await count_tasks(database_url) == 0


async def test_other_bad_arguments(
    client: TaskClient, conversation: Conversation, database_url: str
) -> None:
    with pytest.raises(InvalidInputError, match="timezone-aware"):
        await client.submit("echo", {}, conversation_id=conversation.id, run_after=datetime.now())
    with pytest.raises(InvalidInputError, match="max_attempts must be at least 1"):
        await client.submit("echo", {}, conversation_id=conversation.id, max_attempts=0)
    with pytest.raises(InvalidInputError, match="idempotency_key"):
        await client.submit("echo", {}, conversation_id=conversation.id, idempotency_key=" ")
    with pytest.raises(InvalidInputError, match="not a task id"):
        await client.submit("echo", {}, conversation_id="not-a-uuid")
    with pytest.raises(InvalidInputError, match="not a task id"):
        await client.get("12345")
    assert await count_tasks(database_url) == 0


async def test_unknown_conversation_is_a_not_found_error_naming_it(
    client: TaskClient, database_url: str
) -> None:
    missing = uuid.uuid4()
    with pytest.raises(EntityNotFoundError, match=f"Conversation {missing} not found"):
        await client.submit("echo", {}, conversation_id=missing)
    assert await count_tasks(database_url) == 0


async def test_unknown_task(client: TaskClient) -> None:
    missing = uuid.uuid4()
    with pytest.raises(EntityNotFoundError, match=str(missing)):
        await client.get(missing)
    with pytest.raises(EntityNotFoundError):
        await client.cancel(missing)
    with pytest.raises(EntityNotFoundError):
        await client.retry(missing)


async def test_idempotency_key(
    client: TaskClient, conversation: Conversation, settings: Settings, database_url: str
) -> None:
    first = await client.submit(
        "echo", {"n": 1}, conversation_id=conversation.id, idempotency_key="k1"
    )
    again = await client.submit(
        "echo", {"n": 1}, conversation_id=conversation.id, idempotency_key="k1"
    )
    assert again.id == first.id
    assert await count_tasks(database_url) == 1
    assert await queued(settings) == 1  # rung once
    with pytest.raises(IdempotencyConflictError, match=str(first.id)):
        await client.submit("echo", {"n": 2}, conversation_id=conversation.id, idempotency_key="k1")
    with pytest.raises(IdempotencyConflictError):
        await client.submit(
            "square", {"n": 1}, conversation_id=conversation.id, idempotency_key="k1"
        )
    assert await count_tasks(database_url) == 1

    batch = await client.submit_many(
        [
            TaskSpec("echo", {"n": 1}, conversation.id, idempotency_key="k1"),
            TaskSpec("echo", {"n": 3}, conversation.id, idempotency_key="k3"),
            TaskSpec("echo", {"n": 3}, conversation.id, idempotency_key="k3"),
        ]
    )
    assert batch[0].id == first.id
    assert batch[1].id == batch[2].id
    assert await count_tasks(database_url) == 2


async def test_transactional_submit_dispatches_only_after_commit(
    client: TaskClient,
    conversation: Conversation,
    settings: Settings,
    database_url: str,
    worker: WorkerRuntime,
) -> None:
    async with UnitOfWork(client.session_factory) as uow:
        rolled_back = await client.submit(
            "echo", {"n": 1}, conversation_id=conversation.id, session=uow.session
        )
        await uow.rollback()
    async with UnitOfWork(client.session_factory) as uow:
        committed = await client.submit(
            "echo", {"n": 2}, conversation_id=conversation.id, session=uow.session
        )
        assert await queued(settings) == 0  # nothing is rung before the commit
        assert await db.value(database_url, "SELECT count(*) FROM tasks") == 0  # not visible yet
        await uow.commit()
    done = await client.wait(committed.id, timeout=10)
    assert done.output == {"echo": {"n": 2}}
    with pytest.raises(EntityNotFoundError):
        await client.get(rolled_back.id)

    # Leaving the unit of work without committing also rolls back: nothing runs.
    async with UnitOfWork(client.session_factory) as uow:
        abandoned = await client.submit(
            "echo", {"n": 3}, conversation_id=conversation.id, session=uow.session
        )
    with pytest.raises(EntityNotFoundError):
        await client.get(abandoned.id)


async def test_submit_many_one_insert_per_batch(
    client: TaskClient, conversation: Conversation, settings: Settings, database_url: str
) -> None:
    inserts: list[str] = []

    def count(conn: object, cursor: object, statement: str, *args: object) -> None:
        if statement.lstrip().upper().startswith("INSERT INTO TASKS"):
            inserts.append(statement)

    event.listen(client.engine.sync_engine, "before_cursor_execute", count)
    try:
        tasks = await client.submit_many(
            [TaskSpec("square", {"x": i}, conversation.id) for i in range(2500)]
        )
    finally:
        event.remove(client.engine.sync_engine, "before_cursor_execute", count)
    assert len(tasks) == 2500
    assert len(inserts) == 3  # batches of 1000
    assert [t.input for t in tasks[:3]] == [{"x": 0}, {"x": 1}, {"x": 2}]
    assert await count_tasks(database_url) == 2500
    assert await queued(settings) == 2500


async def test_submit_many_validates_every_spec_first(
    client: TaskClient, conversation: Conversation, database_url: str
) -> None:
    specs = [TaskSpec("square", {"x": i}, conversation.id) for i in range(1500)]
    specs.append(TaskSpec("square", {"x": float("nan")}, conversation.id))
    with pytest.raises(InvalidInputError):
        await client.submit_many(specs)
    assert await count_tasks(database_url) == 0


async def test_scheduled_task_waits_for_its_time(
    client: TaskClient, conversation: Conversation, settings: Settings, worker: WorkerRuntime
) -> None:
    later = datetime.now(UTC) + timedelta(seconds=1)
    task = await client.submit("echo", {}, conversation_id=conversation.id, run_after=later)
    assert (await client.get(task.id)).status is TaskStatus.PENDING
    done = await client.wait(task.id, timeout=10)
    assert done.started_at is not None
    assert done.started_at >= later


async def test_cancel_pending_and_finished(
    client: TaskClient, conversation: Conversation, worker: WorkerRuntime
) -> None:
    later = datetime.now(UTC) + timedelta(hours=1)
    pending = await client.submit("echo", {}, conversation_id=conversation.id, run_after=later)
    result = await client.cancel(pending.id)
    assert result.changed
    assert result.cancelled == 1
    assert result.task.status is TaskStatus.CANCELLED

    done = await client.submit("echo", {}, conversation_id=conversation.id)
    await client.wait(done.id, timeout=10)
    again = await client.cancel(done.id)
    assert not again.changed
    assert again.task.status is TaskStatus.COMPLETED


async def test_operator_retry_of_a_failed_task(
    client: TaskClient, conversation: Conversation, worker: WorkerRuntime, database_url: str
) -> None:
    task = await client.submit(
        "fail", {"fail_times": 1}, conversation_id=conversation.id, max_attempts=1
    )
    failed = await client.wait(task.id, timeout=10)
    assert failed.status is TaskStatus.FAILED
    result = await client.retry(task.id)
    assert result.retried
    assert (result.task.status, result.task.attempts, result.task.error) == (
        TaskStatus.PENDING,
        0,
        None,
    )
    # a fresh attempt count: the handler's first attempt again, which fails again
    again = await client.wait(task.id, timeout=10)
    assert (again.status, again.attempts) == (TaskStatus.FAILED, 1)
    assert [a["run"] for a in await db.attempts(database_url, task.id)] == [1, 2]

    completed = await client.submit("echo", {}, conversation_id=conversation.id)
    await client.wait(completed.id, timeout=10)
    unchanged = await client.retry(completed.id)
    assert not unchanged.retried
    assert unchanged.task.status is TaskStatus.COMPLETED


async def test_wait_times_out(client: TaskClient, conversation: Conversation) -> None:
    task = await client.submit("echo", {}, conversation_id=conversation.id)  # no worker running
    with pytest.raises(TimeoutError, match="still pending"):
        await client.wait(task.id, timeout=0.3)
