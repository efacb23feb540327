"""Subtask trees: fan-out / fan-in, nesting, failures, cancellation, crashes."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from domain.entities import Conversation
from domain.value_objects import TaskStatus
from persistence.session import UnitOfWork
from tests.support import db
from tests.support.workers import WorkerProcess, start_process
from worker.client import TaskClient
from worker.config import Settings
from worker.runtime import WorkerRuntime


@pytest.mark.parametrize("n", [0, 1, 50])
async def test_fanout_sums_its_children(
    n: int,
    client: TaskClient,
    conversation: Conversation,
    worker: WorkerRuntime,
    database_url: str,
) -> None:
    parent = await client.submit("fanout", {"n": n}, conversation_id=conversation.id)
    done = await client.wait(parent.id, timeout=30)
    assert done.status is TaskStatus.COMPLETED
    assert done.output == {"sum": sum(i * i for i in range(n))}
    assert done.attempts == 1  # the (resumed) step's first attempt
    history = [
        (a["run"], a["attempt"], a["outcome"]) for a in await db.attempts(database_url, parent.id)
    ]
    if n == 0:  # nothing to wait for: done in one run
        assert (done.step, history) == (0, [(1, 1, "completed")])
    else:  # resumed once
        assert (done.step, history) == (1, [(1, 1, "waiting"), (2, 1, "completed")])
    children = await client.subtasks(parent.id)
    assert len(children) == n
    assert all(c.parent_task_id == parent.id for c in children)
    assert all(c.conversation_id == conversation.id for c in children)
    assert [c.input for c in children] == [{"x": i} for i in range(n)]
    assert all(c.status is TaskStatus.COMPLETED and c.attempts == 1 for c in children)


async def test_three_levels_deep(
    client: TaskClient, conversation: Conversation, worker: WorkerRuntime
) -> None:
    root = await client.submit("t_nest", {"depth": 3, "width": 2}, conversation_id=conversation.id)
    done = await client.wait(root.id, timeout=30)
    assert done.output == {"leaves": 8}
    async with UnitOfWork(client.session_factory) as uow:
        descendants = (await uow.reports.tree(root.id))[1:]
        first = await uow.tasks.get_subtasks(root.id)
        second = await uow.tasks.get_subtasks(root.id)
    assert len(descendants) == 2 + 4 + 8
    assert all(node.row["status"] == TaskStatus.COMPLETED for node in descendants)
    assert [t.id for t in first] == [t.id for t in second]
    assert [t.created_at for t in first] == sorted(t.created_at for t in first if t.created_at)


async def test_a_failed_child_does_not_block_its_parent(
    client: TaskClient, conversation: Conversation, worker: WorkerRuntime
) -> None:
    parent = await client.submit(
        "t_collect",
        {
            "children": [
                {"agent": "fail", "input": {"message": "child broke"}},
                {"agent": "square", "input": {"x": 3}},
            ]
        },
        conversation_id=conversation.id,
    )
    done = await client.wait(parent.id, timeout=30)
    assert done.status is TaskStatus.COMPLETED
    failed, completed = done.output["children"]
    assert failed["status"] == "failed"
    assert failed["error"] == "RuntimeError: child broke (attempt 3)"
    assert completed == {"status": "completed", "output": {"y": 9}, "error": None}


async def test_fanout_fails_when_a_child_did_not_complete(
    client: TaskClient, conversation: Conversation, worker: WorkerRuntime
) -> None:
    parent = await client.submit("fanout", {"n": 3}, conversation_id=conversation.id)
    # Cancel one child while the parent waits: the parent resumes, sees it, and fails for good.
    children = await db.eventually(
        lambda: client.subtasks(parent.id), lambda cs: len(cs) == 3, what="children created"
    )
    await client.cancel(children[0].id)
    done = await client.wait(parent.id, timeout=30)
    if done.status is TaskStatus.FAILED:
        assert done.error is not None
        assert "did not complete" in done.error
    else:  # the child had already completed before the cancel reached it
        assert done.output == {"sum": 5}


async def test_fire_and_forget_children_are_created_with_the_completion(
    client: TaskClient, conversation: Conversation, worker: WorkerRuntime, database_url: str
) -> None:
    parent = await client.submit("t_fire_and_forget", {"n": 3}, conversation_id=conversation.id)
    done = await client.wait(parent.id, timeout=10)
    assert done.output == {"spawned": 3}
    assert done.step == 0  # it never waited
    children = await client.subtasks(parent.id)
    assert len(children) == 3
    rows = await db.wait_final(database_url, [c.id for c in children])
    assert sorted(r["output"]["y"] for r in rows) == [0, 1, 4]


async def test_cancel_a_tree_while_children_run(
    client: TaskClient, conversation: Conversation, worker: WorkerRuntime, database_url: str
) -> None:
    parent = await client.submit(
        "t_collect",
        {
            "children": [
                *[{"agent": "t_cancellable", "input": {"seconds": 60}} for _ in range(3)],
                {"agent": "t_nest", "input": {"depth": 1, "width": 2}},
                {"agent": "echo", "input": {"run_after": "later"}},
            ]
        },
        conversation_id=conversation.id,
    )
    children = await db.eventually(
        lambda: client.subtasks(parent.id), lambda cs: len(cs) == 5, what="children created"
    )
    await db.eventually(
        lambda: db.marks(database_url, label="started"),
        lambda ms: len(ms) == 3,
        what="3 handlers running",
    )
    result = await client.cancel(parent.id)
    assert result.changed
    assert result.task.status is TaskStatus.CANCELLED

    # Every unfinished descendant is cancelled in the same transaction.
    async with UnitOfWork(client.session_factory) as uow:
        tree = [node.row for node in await uow.reports.tree(parent.id)]
    for row in tree:
        assert row["status"] in (TaskStatus.CANCELLED, TaskStatus.COMPLETED), row
    assert {r["status"] for r in tree if r["agent_id"] == "t_cancellable"} == {TaskStatus.CANCELLED}

    # The running handlers are interrupted within about one heartbeat (1 s here).
    await db.eventually(
        lambda: db.marks(database_url, label="interrupted"),
        lambda ms: len(ms) == 3,
        timeout=10,
        what="3 handlers interrupted",
    )
    snapshot = await db.query(database_url, "SELECT id, status, version FROM tasks ORDER BY id")
    await asyncio.sleep(2.5)  # two more heartbeats and reconcile ticks: nothing may move
    assert (
        await db.query(database_url, "SELECT id, status, version FROM tasks ORDER BY id")
        == snapshot
    )
    assert await db.marks(database_url, label="finished") == []
    running_children = [c for c in children if c.agent_id == "t_cancellable"]
    for child in running_children:
        [attempt] = await db.attempts(database_url, child.id)
        assert attempt["outcome"] == "cancelled"


async def test_cancelling_the_last_open_child_resumes_the_parent(
    client: TaskClient, conversation: Conversation, worker: WorkerRuntime, database_url: str
) -> None:
    parent = await client.submit(
        "t_collect",
        {"children": [{"agent": "t_cancellable", "input": {"seconds": 60}}]},
        conversation_id=conversation.id,
    )
    [child] = await db.eventually(
        lambda: client.subtasks(parent.id), lambda cs: len(cs) == 1, what="child created"
    )
    await db.eventually(lambda: db.marks(database_url, child.id, "started"), bool)
    await client.cancel(child.id)
    done = await client.wait(parent.id, timeout=15)
    assert done.status is TaskStatus.COMPLETED
    assert done.output["children"][0]["status"] == "cancelled"


# -- several worker processes ------------------------------------------------------------------


@pytest.mark.slow
async def test_fifty_children_finishing_on_two_workers_resume_the_parent_once(
    client: TaskClient,
    conversation: Conversation,
    settings: Settings,
    database_url: str,
    processes: list[WorkerProcess],
) -> None:
    # Few slots each, so that neither worker can take every child alone.
    settings = replace(settings, concurrency=4)
    workers = [start_process(processes, settings), start_process(processes, settings)]
    parents = [
        await client.submit("fanout", {"n": 50}, conversation_id=conversation.id) for _ in range(4)
    ]
    rows = await db.wait_final(database_url, [p.id for p in parents], timeout=60)
    assert all(r["status"] == "completed" for r in rows), rows
    assert all(r["output"] == {"sum": sum(i * i for i in range(50))} for r in rows)
    for parent in parents:
        outcomes = [a["outcome"] for a in await db.attempts(database_url, parent.id)]
        assert outcomes == ["waiting", "completed"]  # resumed exactly once
    finishers = await db.query(
        database_url,
        "SELECT DISTINCT worker_id FROM tasks WHERE parent_task_id = ANY($1::uuid[])",
        [p.id for p in parents],
    )
    assert len(finishers) == 2  # the children really were spread over both workers
    for worker in workers:
        output = worker.output().lower()
        assert "deadlock" not in output
        assert "serializ" not in output
        assert '"level": "error"' not in output


@pytest.mark.slow
async def test_the_tree_finishes_when_workers_are_killed(
    client: TaskClient,
    conversation: Conversation,
    settings: Settings,
    database_url: str,
    processes: list[WorkerProcess],
) -> None:
    first = start_process(processes, settings)
    parent = await client.submit(
        "t_collect",
        {"children": [{"agent": "t_marked_sleep", "input": {"seconds": 1.0}} for _ in range(3)]},
        conversation_id=conversation.id,
    )
    # Kill the worker while the parent waits and its children run.
    await db.eventually(
        lambda: db.marks(database_url, label="started"), bool, what="a child started"
    )
    assert (await client.get(parent.id)).status is TaskStatus.WAITING
    first.kill()
    second = start_process(processes, settings)
    # And once more, while the parent is waiting again or being resumed.
    await db.eventually(
        lambda: db.marks(database_url, label="finished"), bool, timeout=30, what="a child finished"
    )
    second.kill()
    start_process(processes, settings)
    done = await client.wait(parent.id, timeout=60)
    assert done.status is TaskStatus.COMPLETED
    assert [c["status"] for c in done.output["children"]] == ["completed"] * 3


async def test_invariants_hold_after_a_tree(
    client: TaskClient, conversation: Conversation, worker: WorkerRuntime, database_url: str
) -> None:
    from tests.support.invariants import check_invariants

    root = await client.submit("t_nest", {"depth": 2, "width": 3}, conversation_id=conversation.id)
    flaky = await client.submit("fail", {"fail_times": 2}, conversation_id=conversation.id)
    await client.wait(root.id, timeout=30)
    await client.wait(flaky.id, timeout=30)
    await check_invariants(database_url)
