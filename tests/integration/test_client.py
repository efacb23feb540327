"""The producer API against real Postgres and Redis."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from redis.asyncio import Redis
from sqlalchemy import event

from domain.entities import Conversation
from domain.exceptions import (
    ConcurrentUpdateError,
    EntityNotFoundError,
    IdempotencyConflictError,
    InvalidInputError,
    TaskNotEditableError,
)
from domain.value_objects import TaskStatus
from persistence import pg
from persistence.session import UnitOfWork
from tests.support import databases, db, servers
from tests.support.pgproxy import PgProxy
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
        ("   ", {}, "is not a valid agent id"),
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
    with pytest.raises(InvalidInputError, match="max_attempts must be between 1 and 10000"):
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


# -- a plain submit: one INSERT in autocommit, the unit-of-work way when anything is unusual -------


def autocommit_checked_out(client: TaskClient) -> int:
    pool = client.autocommit_pool
    return 0 if pool is None else pool.get_size() - pool.get_idle_size()


async def test_plain_submit_errors_name_what_is_missing_and_leave_no_connection_out(
    client: TaskClient, conversation: Conversation, database_url: str
) -> None:
    missing = uuid.uuid4()
    with pytest.raises(EntityNotFoundError, match=f"Conversation {missing} not found"):
        await client.submit("echo", {}, conversation_id=missing)
    with pytest.raises(EntityNotFoundError, match=f"Task {missing} not found"):
        await client.submit("echo", {}, conversation_id=conversation.id, parent_task_id=missing)
    with pytest.raises(InvalidInputError, match="not valid JSON"):
        await client.submit("echo", {"x": float("nan")}, conversation_id=conversation.id)
    assert autocommit_checked_out(client) == 0
    # The connection that met the errors is fine and back in the pool.
    task = await client.submit("echo", {"n": 1}, conversation_id=conversation.id)
    assert (await client.get(task.id)).input == {"n": 1}
    assert await count_tasks(database_url) == 1
    assert autocommit_checked_out(client) == 0


async def test_plain_submit_returns_the_stored_task_and_rings_once(
    client: TaskClient, conversation: Conversation, settings: Settings
) -> None:
    task = await client.submit(
        "echo", {"n": 1}, conversation_id=conversation.id, metadata={"m": 1}, max_attempts=2
    )
    assert task == await client.get(task.id)
    assert (task.status, task.queue, task.metadata, task.max_attempts) == (
        TaskStatus.PENDING,
        settings.queue,
        {"m": 1},
        2,
    )
    assert await queued(settings) == 1
    later = datetime.now(UTC) + timedelta(hours=1)
    await client.submit("echo", {}, conversation_id=conversation.id, run_after=later)
    assert await queued(settings) == 1  # a scheduled task is left to the reconciler


async def test_submit_while_redis_is_down_is_committed(
    settings: Settings, conversation: Conversation, database_url: str
) -> None:
    down = replace(settings, redis_url="redis://127.0.0.1:1/0")  # nothing listens there
    async with TaskClient.from_settings(down) as client:
        task = await client.submit("echo", {"n": 1}, conversation_id=conversation.id)
        keyed = await client.submit(
            "echo", {"n": 2}, conversation_id=conversation.id, idempotency_key="k"
        )
    assert (await db.value(database_url, "SELECT count(*) FROM tasks")) == 2
    rows = await db.value(
        database_url,
        "SELECT count(*) FROM tasks WHERE id = ANY($1::uuid[])"
        " AND status = 'pending' AND dispatch_after > now()",
        [task.id, keyed.id],
    )
    assert rows == 2  # left to the reconciler after its redispatch period


async def test_plain_submit_after_its_pooled_connection_was_terminated(
    client: TaskClient, conversation: Conversation, database_url: str, database: str
) -> None:
    await client.submit("echo", {"n": 1}, conversation_id=conversation.id)
    terminated = await db.value(
        database_url,
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
        " WHERE datname = $1 AND application_name = 'tasklane-client'",
        database,
    )
    assert terminated >= 1
    await asyncio.sleep(0.1)  # the goodbye reaches the idle pooled connections
    task = await client.submit("echo", {"n": 2}, conversation_id=conversation.id)
    assert (await client.get(task.id)).input == {"n": 2}
    assert await count_tasks(database_url) == 2
    assert autocommit_checked_out(client) == 0


@pytest.fixture
def proxy() -> Iterator[PgProxy]:
    server = PgProxy(servers.postgres_url()).start()
    yield server
    server.stop()


@pytest.mark.parametrize("key", [None, "k1"])
async def test_plain_submit_whose_answer_is_lost_after_commit_is_found_not_duplicated(
    settings: Settings,
    database: str,
    database_url: str,
    conversation: Conversation,
    proxy: PgProxy,
    key: str | None,
) -> None:
    proxied = replace(settings, database_url=databases.url_for(database, proxy.server_url()))
    async with TaskClient.from_settings(proxied) as client:
        fired = proxy.drop_after_commit("INSERT INTO tasks")
        task = await client.submit(
            "echo", {"n": 1}, conversation_id=conversation.id, idempotency_key=key
        )
        assert fired.is_set()
        assert autocommit_checked_out(client) == 0
        assert (await client.get(task.id)).input == {"n": 1}
    assert await count_tasks(database_url) == 1


async def test_plain_submit_on_a_connection_the_server_just_dropped(
    settings: Settings,
    database: str,
    database_url: str,
    conversation: Conversation,
    proxy: PgProxy,
) -> None:
    proxied = replace(settings, database_url=databases.url_for(database, proxy.server_url()))
    proxy.linger = 0.5  # the connection looks open although the server said goodbye
    async with TaskClient.from_settings(proxied) as client:
        fired = proxy.terminate_after_answer("INSERT INTO tasks")
        first = await client.submit("echo", {"n": 1}, conversation_id=conversation.id)
        assert fired.is_set()
        second = await client.submit("echo", {"n": 2}, conversation_id=conversation.id)
        assert autocommit_checked_out(client) == 0
        assert [(await client.get(t.id)).input for t in (first, second)] == [{"n": 1}, {"n": 2}]
    assert await count_tasks(database_url) == 2
    # Let the proxy finish lingering: stopping it mid-linger prints a traceback from its thread,
    # and Python 3.11 may then fail an AST compile in ours (a race in its recursion counter).
    await asyncio.sleep(proxy.linger + 0.1)


async def test_a_client_holds_at_most_twenty_connections(
    client: TaskClient, conversation: Conversation, database_url: str
) -> None:
    """What the README's Deployment section promises: 10 connections for plain submits, 10 for
    everything else. Inserts are held behind a table lock so that every submit keeps its
    connection; 60 at once fill both pools and no more."""
    lock = await pg.connect(database_url)
    await lock.execute("BEGIN; LOCK TABLE tasks IN EXCLUSIVE MODE")
    try:
        submits = [
            asyncio.ensure_future(client.submit("echo", {}, conversation_id=conversation.id))
            for _ in range(30)
        ] + [
            asyncio.ensure_future(client.submit_many([TaskSpec("echo", {}, conversation.id)]))
            for _ in range(30)
        ]
        blocked = await db.eventually(
            lambda: client_backends(database_url), lambda n: n >= 20, what="both pools full"
        )
        await asyncio.sleep(0.5)  # time for any connection beyond the bound to show up
        assert (blocked, await client_backends(database_url)) == (20, 20)
    finally:
        await lock.execute("ROLLBACK")
        await lock.close()
        await asyncio.gather(*submits)  # every submit ends, and returns its connections
    assert await db.value(database_url, "SELECT count(*) FROM tasks") == 60


async def client_backends(url: str) -> int:
    count: int = await db.value(
        url,
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE datname = current_database() AND application_name = 'tasklane-client'",
    )
    return count


# -- an operator's edit ---------------------------------------------------------------------------


async def test_update_edits_a_pending_task_and_leaves_the_rest(
    client: TaskClient, conversation: Conversation
) -> None:
    later = datetime.now(UTC) + timedelta(hours=2)
    task = await client.submit(
        "echo", {"x": 1}, conversation_id=conversation.id, run_after=later, metadata={"a": 1}
    )
    edited = await client.update(task.id, max_attempts=7)
    assert (edited.max_attempts, edited.metadata, edited.run_after) == (7, {"a": 1}, later)
    assert edited.version == task.version + 1
    edited = await client.update(task.id, metadata={"b": 2}, expected_version=edited.version)
    assert (edited.max_attempts, edited.metadata) == (7, {"b": 2})
    assert await client.get(task.id) == edited


async def test_update_refuses_a_stale_version_and_writes_nothing(
    client: TaskClient, conversation: Conversation
) -> None:
    later = datetime.now(UTC) + timedelta(hours=2)
    task = await client.submit("echo", {}, conversation_id=conversation.id, run_after=later)
    await client.update(task.id, max_attempts=5)  # somebody else's edit
    with pytest.raises(ConcurrentUpdateError, match=f"expected version {task.version}"):
        await client.update(task.id, max_attempts=9, expected_version=task.version)
    assert (await client.get(task.id)).max_attempts == 5


async def test_update_refuses_a_task_that_started_and_bad_values(
    client: TaskClient, conversation: Conversation, worker: WorkerRuntime
) -> None:
    task = await client.submit("echo", {}, conversation_id=conversation.id)
    done = await client.wait(task.id, timeout=20)
    with pytest.raises(TaskNotEditableError, match="is completed"):
        await client.update(task.id, max_attempts=9)
    assert await client.get(task.id) == done
    later = datetime.now(UTC) + timedelta(hours=2)
    pending = await client.submit("echo", {}, conversation_id=conversation.id, run_after=later)
    with pytest.raises(InvalidInputError, match="max_attempts"):
        await client.update(pending.id, max_attempts=0)
    with pytest.raises(InvalidInputError, match="timezone-aware"):
        await client.update(pending.id, run_after=datetime(2030, 1, 1))
    with pytest.raises(EntityNotFoundError):
        await client.update(uuid.uuid4(), max_attempts=2)
    assert await client.get(pending.id) == pending


async def test_update_run_after_none_runs_a_scheduled_task_now(
    client: TaskClient, conversation: Conversation, worker: WorkerRuntime
) -> None:
    later = datetime.now(UTC) + timedelta(hours=2)
    task = await client.submit("echo", {"x": 2}, conversation_id=conversation.id, run_after=later)
    await client.update(task.id, run_after=None)
    done = await client.wait(task.id, timeout=20)
    assert (done.status, done.output) == (TaskStatus.COMPLETED, {"echo": {"x": 2}})


@contextlib.asynccontextmanager
async def silent_redis() -> AsyncIterator[str]:
    """The URL of a "Redis" that accepts connections, reads everything and answers nothing."""
    writers: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        await reader.read(-1)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        server.close()
        for writer in writers:
            writer.close()
        await server.wait_closed()


async def test_submit_returns_within_about_a_second_when_redis_never_answers(
    settings: Settings, conversation: Conversation, database_url: str
) -> None:
    """A Redis that accepts connections and never answers: the submit commits, returns soon
    after, and leaves the doorbell to the reconciler."""
    async with (
        silent_redis() as redis_url,
        TaskClient.from_settings(replace(settings, redis_url=redis_url)) as client,
    ):
        began = time.monotonic()
        task = await client.submit("echo", {}, conversation_id=conversation.id)
        took = time.monotonic() - began
    assert took < 3  # RING_PATIENCE_SECONDS (1 s) after the commit, with slack for a busy host
    row = await db.task_row(database_url, task.id)
    assert row["status"] == "pending"


async def test_watch_follows_postgres_when_redis_never_answers(
    settings: Settings, conversation: Conversation, database_url: str
) -> None:
    """A producer's Redis client has no socket timeout: `watch` bounds its own Redis calls
    (TASKLANE_REDIS_TIMEOUT_SECONDS), so a silent Redis cannot hang it, and the task's states
    still come from Postgres."""
    async with (
        silent_redis() as redis_url,
        TaskClient.from_settings(
            replace(settings, redis_url=redis_url, redis_timeout_seconds=0.3)
        ) as client,
    ):
        task = await client.submit("echo", {}, conversation_id=conversation.id)
        await db.query(
            database_url,
            "UPDATE tasks SET status = 'completed', output = '{}', completed_at = now()"
            " WHERE id = $1",
            task.id,
        )
        async with asyncio.timeout(15):
            states = [e async for e in client.watch(task.id, safety_poll_seconds=0.2)]
    assert states[-1]["status"] == "completed"
