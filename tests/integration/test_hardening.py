"""The guarantees at the edges (an in-process worker on real Postgres and Redis): a run whose
result Postgres refuses, or that the worker cannot store as it is, ends with the real reason
instead of a lease expiry and a second run; limits are named; a handler that ignores its
cancellation is timed out all the same; agents missing during a rolling deploy cost no attempt."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

import pytest

from domain.entities import Conversation
from domain.exceptions import InvalidInputError
from domain.value_objects import TaskStatus
from persistence import pg
from tests.support import db
from tests.support.workers import WorkerProcess, running_worker, start_process
from worker.client import TaskClient
from worker.config import Settings
from worker.health import health
from worker.runtime import HANDLER_UNWIND_SECONDS, MAX_ERROR_CHARS, WorkerRuntime


async def runs(database_url: str, task_id: Any) -> int:
    return len(await db.marks(database_url, task_id))


async def finished(client: TaskClient, task_id: Any, timeout: float = 20) -> Any:
    return await client.wait(task_id, timeout=timeout)


# -- 3. a finish that Postgres refuses, texts it cannot store, limits ------------------------------


async def test_error_texts_postgres_cannot_hold_are_stored_cleaned(
    client: TaskClient, conversation: Conversation, worker: WorkerRuntime, database_url: str
) -> None:
    unstorable = await client.submit(
        "t_raise", {"kind": "unstorable"}, conversation_id=conversation.id, max_attempts=1
    )
    huge = await client.submit(
        "t_raise", {"kind": "huge"}, conversation_id=conversation.id, max_attempts=1
    )
    unprintable = await client.submit(
        "t_raise", {"kind": "unprintable"}, conversation_id=conversation.id, max_attempts=1
    )
    done = await finished(client, unstorable.id)
    assert done.status is TaskStatus.FAILED
    assert done.error == ("RuntimeError: nul \\x00 and a lone surrogate \\udc80 in the message")
    done = await finished(client, huge.id)
    assert done.error is not None
    assert MAX_ERROR_CHARS - 10 < len(done.error) <= MAX_ERROR_CHARS
    assert done.error.endswith("more characters cut]")
    done = await finished(client, unprintable.id)
    assert done.error == "_Unprintable (its message could not be read: str() raised RuntimeError)"
    for task in (unstorable, huge, unprintable):
        assert await runs(database_url, task.id) == 1  # no second run on lease expiry
        [attempt] = await db.attempts(database_url, task.id)
        assert attempt["outcome"] == "failed"


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return replace(settings, max_output_bytes=1000, max_children=5, max_input_bytes=200)


async def test_an_output_over_the_limit_fails_at_once_naming_it(
    client: TaskClient, conversation: Conversation, worker: WorkerRuntime, database_url: str
) -> None:
    task = await client.submit("t_return", {"bytes": 2000}, conversation_id=conversation.id)
    done = await finished(client, task.id)
    assert (done.status, done.attempts) == (TaskStatus.FAILED, 1)
    assert done.error is not None
    assert "over the limit of 1000 bytes (TASKLANE_MAX_OUTPUT_BYTES)" in done.error
    assert await runs(database_url, task.id) == 1


@pytest.mark.parametrize(
    ("task_input", "message"),
    [
        ({"n": 6}, "at most 5 subtasks (TASKLANE_MAX_CHILDREN)"),
        ({"n": 1, "metadata_bytes": 300}, "metadata of subtask 'echo' is"),
    ],
    ids=["too-many-children", "metadata-over-the-input-limit"],
)
async def test_spawns_over_a_limit_fail_the_run_at_once(
    client: TaskClient,
    conversation: Conversation,
    worker: WorkerRuntime,
    database_url: str,
    task_input: dict[str, Any],
    message: str,
) -> None:
    task = await client.submit("t_spawn_many", task_input, conversation_id=conversation.id)
    done = await finished(client, task.id)
    assert (done.status, done.attempts) == (TaskStatus.FAILED, 1)
    assert done.error is not None
    assert message in done.error
    assert await client.subtasks(task.id) == []


async def test_a_retry_after_infinity_is_an_error_that_says_so(
    client: TaskClient, conversation: Conversation, worker: WorkerRuntime
) -> None:
    task = await client.submit(
        "t_retry_forever_later", {}, conversation_id=conversation.id, max_attempts=1
    )
    done = await finished(client, task.id)
    assert done.status is TaskStatus.FAILED
    assert done.error is not None
    assert "Retry(after=…) must be between 0 and" in done.error


async def test_a_result_postgres_refuses_fails_the_run_with_the_reason(
    client: TaskClient, conversation: Conversation, worker: WorkerRuntime, database_url: str
) -> None:
    """Stands for any write Postgres refuses for good (a constraint, a value out of range):
    here a trigger refuses outputs that carry "poison"."""
    await db.query(
        database_url,
        "CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
        " RAISE EXCEPTION 'poisoned output' USING ERRCODE = 'check_violation'; END $$",
    )
    await db.query(
        database_url,
        "CREATE TRIGGER refuse_poison BEFORE UPDATE ON tasks FOR EACH ROW"
        " WHEN (NEW.output ? 'poison') EXECUTE FUNCTION refuse_poison()",
    )
    task = await client.submit(
        "t_return", {"value": {"poison": True}}, conversation_id=conversation.id
    )
    done = await finished(client, task.id)
    assert (done.status, done.attempts) == (TaskStatus.FAILED, 1)
    assert done.error is not None
    assert "the run's result (completed) could not be stored" in done.error
    assert "poisoned output" in done.error
    assert await runs(database_url, task.id) == 1


# -- 4. a handler that ignores its cancellation ----------------------------------------------------


async def test_a_handler_that_ignores_cancellation_is_timed_out_and_frees_its_slot(
    database_url: str, conversation: Conversation, client: TaskClient, settings: Settings
) -> None:
    one_slot = replace(settings, concurrency=1, lease_seconds=30.0)
    async with running_worker(one_slot) as runtime:
        deaf = await client.submit(
            "t_deaf", {"seconds": 10}, conversation_id=conversation.id, max_attempts=1
        )
        behind = await client.submit("echo", {"x": 1}, conversation_id=conversation.id)
        done = await finished(client, deaf.id, timeout=1 + HANDLER_UNWIND_SECONDS + 15)
        assert (done.status, done.attempts) == (TaskStatus.FAILED, 1)
        assert done.error is not None
        assert "ignored its cancellation" in done.error
        assert "abandoned" in done.error
        # Its slot is free: the task behind it runs while the deaf handler still sleeps.
        assert (await finished(client, behind.id)).status is TaskStatus.COMPLETED
        assert len(runtime.abandoned) == 1
        # `tasklane health` says so, from the worker's row (refreshed every reconcile tick).
        report = await db.eventually(
            lambda: health(one_slot),
            lambda r: "1 handler(s) ignored their timeout" in r.checks[-1].detail,
            what="health reporting the abandoned handler",
        )
        assert report.checks[-1].ok


# -- 9. livelocks ----------------------------------------------------------------------------------


async def test_waiting_for_no_subtask_fails_instead_of_resuming_forever(
    client: TaskClient, conversation: Conversation, worker: WorkerRuntime, database_url: str
) -> None:
    task = await client.submit("t_wait_for_nothing", {}, conversation_id=conversation.id)
    done = await finished(client, task.id)
    assert (done.status, done.attempts, done.step) == (TaskStatus.FAILED, 1, 0)
    assert done.error is not None
    assert "nothing to wait for" in done.error
    assert await runs(database_url, task.id) == 1


# -- 6. rolling deploys ----------------------------------------------------------------------------


async def test_a_task_for_an_agent_another_live_worker_serves_is_handed_back_for_free(
    client: TaskClient,
    conversation: Conversation,
    worker: WorkerRuntime,
    database_url: str,
    settings: Settings,
    processes: list[WorkerProcess],
) -> None:
    """A worker without the agent (an old one, mid-deploy) gives the task back, its attempt
    unspent, while a live worker of its queue serves the agent; that worker runs it."""
    await db.query(
        database_url,
        "INSERT INTO workers (id, hostname, pid, queue, agents)"
        " VALUES ('new-worker', 'elsewhere', 1, $1, ARRAY['t_elsewhere'])",
        settings.queue,
    )
    task = await client.submit("t_elsewhere", {}, conversation_id=conversation.id)
    handed_back = await db.eventually(
        lambda: db.attempts(database_url, task.id),
        # Two runs ended (a third may have started: its row has no outcome yet).
        lambda history: len(history) >= 2 and all(a["outcome"] for a in history[:2]),
        what="the task handed back twice",
    )
    assert {a["outcome"] for a in handed_back[:2]} == {"released"}
    assert "is not served by worker" in handed_back[0]["error"]
    assert (await client.get(task.id)).attempts == 0
    start_process(
        processes,
        replace(settings, agent_modules=("worker.demo_agents", "tests.agents_extra")),
    )
    done = await finished(client, task.id)
    assert (done.status, done.attempts) == (TaskStatus.COMPLETED, 1)
    assert done.output == {"served_by_the_new_worker": True, "attempt": 1}


# -- 8. races --------------------------------------------------------------------------------------


async def test_a_cancel_sees_the_children_a_handler_commits_while_it_waits(
    client: TaskClient, conversation: Conversation, database_url: str
) -> None:
    """The cancel takes the parent's lock, then reads its children: a handler's wait that
    committed new children meanwhile cannot leave them running under a cancelled parent."""
    parent = await client.submit("echo", {}, conversation_id=conversation.id)
    conn = await pg.connect(database_url)
    try:
        # A handler's wait, in flight: the parent waiting, its new child inserted, uncommitted.
        transaction = conn.transaction()
        await transaction.start()
        await conn.execute("UPDATE tasks SET status = 'waiting' WHERE id = $1", parent.id)
        child = await conn.fetchval(
            "INSERT INTO tasks (conversation_id, agent_id, parent_task_id, queue)"
            " VALUES ($1, 'echo', $2, $3) RETURNING id",
            conversation.id,
            parent.id,
            parent.queue,
        )
        cancelling = asyncio.ensure_future(client.cancel(parent.id))
        await db.eventually(
            lambda: db.value(
                database_url,
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                " AND datname = current_database()",
            ),
            lambda waiting: waiting > 0,
            what="the cancel waiting for the parent's lock",
        )
        await transaction.commit()
        result = await asyncio.wait_for(cancelling, 10)
    finally:
        await conn.close()
    assert result.cancelled == 2
    assert (await client.get(child)).status is TaskStatus.CANCELLED


async def test_an_operators_retry_of_a_child_takes_its_parents_lock_first(
    client: TaskClient, conversation: Conversation, database_url: str
) -> None:
    parent = await client.submit("echo", {}, conversation_id=conversation.id)
    await db.query(database_url, "UPDATE tasks SET status = 'waiting' WHERE id = $1", parent.id)
    child = await client.submit(
        "echo", {}, conversation_id=conversation.id, parent_task_id=parent.id
    )
    await db.query(database_url, "UPDATE tasks SET status = 'failed' WHERE id = $1", child.id)
    conn = await pg.connect(database_url)
    try:
        transaction = conn.transaction()
        await transaction.start()
        await conn.execute("SELECT 1 FROM tasks WHERE id = $1 FOR UPDATE", parent.id)
        retrying = asyncio.ensure_future(client.retry(child.id))
        await asyncio.sleep(0.5)
        assert not retrying.done()  # it waits behind the parent, as every child's change does
        assert (await client.get(child.id)).status is TaskStatus.FAILED
        await transaction.commit()
        result = await asyncio.wait_for(retrying, 10)
    finally:
        await conn.close()
    assert result.retried


@pytest.mark.parametrize("status", ["pending", "completed", "failed", "cancelled"])
async def test_a_subtask_is_attached_only_to_a_running_or_waiting_parent(
    client: TaskClient, conversation: Conversation, database_url: str, status: str
) -> None:
    parent = await client.submit("echo", {}, conversation_id=conversation.id)
    await db.query(database_url, "UPDATE tasks SET status = $2 WHERE id = $1", parent.id, status)
    with pytest.raises(InvalidInputError, match=f"it is {status}; a parent must be running"):
        await client.submit("echo", {}, conversation_id=conversation.id, parent_task_id=parent.id)
    assert await client.subtasks(parent.id) == []


async def test_a_subtask_attached_to_a_waiting_parent_is_waited_for(
    client: TaskClient, conversation: Conversation, database_url: str
) -> None:
    parent = await client.submit("echo", {}, conversation_id=conversation.id)
    await db.query(database_url, "UPDATE tasks SET status = 'waiting' WHERE id = $1", parent.id)
    child = await client.submit(
        "echo", {}, conversation_id=conversation.id, parent_task_id=parent.id
    )
    assert [t.id for t in await client.subtasks(parent.id)] == [child.id]
