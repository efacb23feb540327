"""The invariant checker itself must catch what it claims to catch."""

from __future__ import annotations

import pytest

from domain.entities import Conversation
from tests.support import db
from tests.support.invariants import check_invariants
from worker.client import TaskClient
from worker.runtime import WorkerRuntime


async def finished_task(client: TaskClient, conversation: Conversation) -> str:
    task = await client.submit("echo", {}, conversation_id=conversation.id)
    await client.wait(task.id, timeout=10)
    return str(task.id)


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        ("UPDATE tasks SET status = 'pending' WHERE id = $1", "is still pending"),
        ("UPDATE tasks SET status = 'running' WHERE id = $1", "not in the transition table"),
        ("UPDATE tasks SET status = 'failed' WHERE id = $1", "not in the transition table"),
        ("UPDATE tasks SET attempts = 0 WHERE id = $1", "attempts went down"),
        ("UPDATE task_attempts SET outcome = NULL WHERE task_id = $1", "unfinished run"),
        ("DELETE FROM task_attempts WHERE task_id = $1", "0 attempt rows but runs = 1"),
    ],
)
async def test_the_checker_catches_tampering(
    client: TaskClient,
    conversation: Conversation,
    worker: WorkerRuntime,
    database_url: str,
    tamper: str,
    message: str,
) -> None:
    task_id = await finished_task(client, conversation)
    await check_invariants(database_url)  # clean before
    await db.query(database_url, tamper, task_id)
    with pytest.raises(AssertionError, match=message):
        await check_invariants(database_url)


async def test_the_checker_catches_secrets(database_url: str) -> None:
    with pytest.raises(AssertionError, match="secret"):
        await check_invariants(database_url, logs=["connecting with hunter2"], secrets=["hunter2"])
