from __future__ import annotations

from domain.entities import Conversation
from domain.value_objects import TaskStatus
from worker.client import TaskClient
from worker.runtime import WorkerRuntime


async def test_echo_completes(
    client: TaskClient, conversation: Conversation, worker: WorkerRuntime
) -> None:
    task = await client.submit("echo", {"x": 1}, conversation_id=conversation.id)
    done = await client.wait(task.id, timeout=10)
    assert done.status is TaskStatus.COMPLETED
    assert done.output == {"echo": {"x": 1}}
    assert done.attempts == 1
