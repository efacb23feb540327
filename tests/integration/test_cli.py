"""The `tasklane` CLI as operators run it: a real subprocess against real Postgres and Redis,
its output read from `--json`.

The CLI runs through asyncio's subprocess API so that an in-process worker (the `worker`
fixture) keeps running in the test's event loop meanwhile.
"""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import pytest

from domain.entities import Conversation
from persistence.models import TaskModel
from tests.support import databases, db
from tests.support.databases import ROOT
from tests.support.services import free_port
from tests.support.workers import make_settings, running_worker, settings_env
from worker.client import TaskClient
from worker.config import Settings
from worker.runtime import WorkerRuntime

TASK_COLUMNS = {c.name for c in TaskModel.__table__.columns}
# Nothing listens here: a command given these settings must fail before it connects.
OFFLINE = make_settings(
    "postgresql+asyncpg://postgres@127.0.0.1:1/offline", "redis://127.0.0.1:1/0", "offline"
)


@dataclass(frozen=True)
class Run:
    code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)  # the whole of stdout: exactly one document

    @property
    def explained(self) -> str:
        return f"exit {self.code}\nstdout:\n{self.stdout}\nstderr:\n{self.stderr}"


async def tasklane(
    settings: Settings, *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> Run:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "worker.cli",
        *args,
        env=settings_env(settings, env),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return Run(process.returncode, out.decode(), err.decode())


async def ok_json(settings: Settings, *args: str) -> Any:
    run = await tasklane(settings, *args, "--json")
    assert run.code == 0, run.explained
    return run.json()


def assert_one_line_error(run: Run, code: int, *fragments: str) -> None:
    assert run.code == code, run.explained
    assert "Traceback" not in run.stderr, run.explained
    lines = run.stderr.strip().splitlines()
    if code == 1:
        assert len(lines) == 1, run.explained
    for fragment in fragments:
        assert fragment in run.stderr, run.explained


def assert_task_document(document: dict[str, Any]) -> None:
    assert document.keys() >= TASK_COLUMNS
    assert isinstance(document["id"], str)
    UUID(document["id"])
    UUID(document["conversation_id"])
    for column in ("created_at", "updated_at", "run_after"):
        assert datetime.fromisoformat(document[column]).tzinfo is not None


async def sql(settings: Settings, statement: str, *args: Any) -> Any:
    return await db.query(settings.database_url, statement, *args)


# -- submit ---------------------------------------------------------------------------------------


async def test_submit_prints_the_task_row(settings: Settings, conversation: Conversation) -> None:
    task = await ok_json(
        settings,
        "submit",
        "echo",
        "--input",
        '{"x": [1, "two"]}',
        "--conversation",
        str(conversation.id),
        "--idempotency-key",
        "cli-key-1",
    )
    assert_task_document(task)
    assert set(task) == TASK_COLUMNS
    assert task["status"] == "pending"
    assert task["agent_id"] == "echo"
    assert task["input"] == {"x": [1, "two"]}
    assert task["conversation_id"] == str(conversation.id)
    assert task["idempotency_key"] == "cli-key-1"
    assert task["queue"] == settings.queue

    again = await ok_json(
        settings,
        "submit",
        "echo",
        "--input",
        '{"x": [1, "two"]}',
        "--conversation",
        str(conversation.id),
        "--idempotency-key",
        "cli-key-1",
    )
    assert again["id"] == task["id"]
    assert await db.value(settings.database_url, "SELECT count(*) FROM tasks") == 1


async def test_submit_without_conversation_makes_one_for_user_cli(settings: Settings) -> None:
    task = await ok_json(settings, "submit", "echo")
    assert task["input"] == {}
    user = await db.value(
        settings.database_url,
        "SELECT user_id FROM conversations WHERE id = $1",
        UUID(task["conversation_id"]),
    )
    assert user == "cli"


async def test_submit_wait_returns_the_finished_task(
    settings: Settings, worker: WorkerRuntime
) -> None:
    task = await ok_json(settings, "submit", "square", "--input", '{"x": 7}', "--wait")
    assert task["status"] == "completed"
    assert task["output"] == {"y": 49}
    assert task["completed_at"] is not None

    run = await tasklane(settings, "submit", "square", "--input", '{"x": 3}', "--wait")
    assert run.code == 0, run.explained
    assert "completed" in run.stdout
    assert '{"y": 9}' in run.stdout


async def test_submit_wait_exits_1_when_the_task_fails(
    settings: Settings, worker: WorkerRuntime
) -> None:
    run = await tasklane(
        settings, "submit", "fail", "--input", '{"message": "boom"}', "--wait", "--json"
    )
    assert run.code == 1, run.explained
    task = run.json()
    assert task["status"] == "failed"
    assert "boom" in task["error"]
    assert_one_line_error(run, 1, "failed")


async def test_submit_wait_times_out_with_exit_1(settings: Settings) -> None:
    run = await tasklane(settings, "submit", "echo", "--wait", "--timeout", "0.5", "--json")
    assert run.code == 1, run.explained
    assert "Traceback" not in run.stderr
    assert "still pending after 0.5s" in run.stderr
    # nothing serves `echo` on this queue yet: the CLI says so
    assert "no worker has registered agent 'echo'" in run.stderr
    assert run.json()["status"] == "pending"


# -- show -----------------------------------------------------------------------------------------


async def test_show_has_history_oldest_first_and_the_reason_it_failed(
    settings: Settings, client: TaskClient, conversation: Conversation, worker: WorkerRuntime
) -> None:
    task = await client.submit("fail", {"message": "kaput"}, conversation_id=conversation.id)
    assert (await client.wait(task.id, timeout=20)).status.value == "failed"

    shown = await ok_json(settings, "show", str(task.id))
    assert_task_document(shown)
    assert shown["id"] == str(task.id)
    assert shown["status"] == "failed"
    history = shown["history"]
    assert [h["run"] for h in history] == [1, 2, 3]
    assert [h["outcome"] for h in history] == ["retry", "retry", "failed"]
    assert all("kaput" in h["error"] for h in history)
    assert all(h["worker_id"] == worker.worker_id for h in history)
    assert datetime.fromisoformat(history[0]["started_at"]) <= datetime.fromisoformat(
        history[-1]["started_at"]
    )
    assert "failed after 3 attempts" in shown["reason"]
    assert "kaput" in shown["reason"]

    text = await tasklane(settings, "show", str(task.id))
    assert text.code == 0, text.explained
    assert "history (3 runs)" in text.stdout
    assert "kaput" in text.stdout


async def test_show_reason_for_a_pending_task_with_no_worker(
    settings: Settings, client: TaskClient, conversation: Conversation
) -> None:
    task = await client.submit("echo", {}, conversation_id=conversation.id)
    shown = await ok_json(settings, "show", str(task.id))
    assert shown["history"] == []
    assert "no live worker" in shown["reason"]
    assert settings.queue in shown["reason"]


async def test_show_reason_for_a_task_not_due_yet(
    settings: Settings, client: TaskClient, conversation: Conversation
) -> None:
    task = await client.submit("echo", {}, conversation_id=conversation.id)
    await sql(
        settings, "UPDATE tasks SET run_after = now() + interval '1 hour' WHERE id = $1", task.id
    )
    shown = await ok_json(settings, "show", str(task.id))
    assert shown["reason"].startswith("pending: not due yet, runs in ")


async def test_show_reason_for_a_waiting_parent(
    settings: Settings, client: TaskClient, conversation: Conversation
) -> None:
    parent = await client.submit("fanout", {"n": 3}, conversation_id=conversation.id)
    await sql(settings, "UPDATE tasks SET status = 'waiting' WHERE id = $1", parent.id)
    for i in range(3):  # a subtask is attached to a running or waiting parent only
        await client.submit(
            "square", {"x": i}, conversation_id=conversation.id, parent_task_id=parent.id
        )
    await sql(
        settings,
        "UPDATE tasks SET status = 'cancelled', completed_at = now()"
        " WHERE id = (SELECT id FROM tasks WHERE parent_task_id = $1 LIMIT 1)",
        parent.id,
    )
    shown = await ok_json(settings, "show", str(parent.id))
    assert shown["reason"] == "waiting: 2 of 3 children unfinished (2 pending)"


async def test_show_reason_for_a_running_task_whose_lease_expired(
    settings: Settings, client: TaskClient, conversation: Conversation
) -> None:
    task = await client.submit("echo", {}, conversation_id=conversation.id)
    await sql(
        settings,
        "UPDATE tasks SET status = 'running', attempts = 1, runs = 1, worker_id = 'gone-1',"
        " started_at = now() - interval '60 seconds',"
        " lease_expires_at = now() - interval '40 seconds' WHERE id = $1",
        task.id,
    )
    shown = await ok_json(settings, "show", str(task.id))
    assert shown["reason"].startswith("running: lease expired 4"), shown["reason"]
    assert "rescued" in shown["reason"]


# -- list and tree --------------------------------------------------------------------------------


async def test_list_filters_and_limits(
    settings: Settings, client: TaskClient, conversation: Conversation
) -> None:
    other = await client.create_conversation(user_id="someone-else")
    first = await client.submit("echo", {"i": 1}, conversation_id=conversation.id)
    second = await client.submit("echo", {"i": 2}, conversation_id=conversation.id)
    sleeper = await client.submit("sleep", {"seconds": 1}, conversation_id=other.id)
    await client.cancel(first.id)

    everything = await ok_json(settings, "list")
    assert [t["id"] for t in everything] == [str(sleeper.id), str(second.id), str(first.id)]
    for task in everything:
        assert_task_document(task)

    echo = await ok_json(settings, "list", "--agent", "echo")
    assert {t["id"] for t in echo} == {str(first.id), str(second.id)}
    pending = await ok_json(settings, "list", "--status", "pending")
    assert {t["id"] for t in pending} == {str(second.id), str(sleeper.id)}
    mine = await ok_json(settings, "list", "--conversation", str(other.id))
    assert [t["id"] for t in mine] == [str(sleeper.id)]
    newest = await ok_json(
        settings, "list", "--agent", "echo", "--status", "pending", "--limit", "1"
    )
    assert [t["id"] for t in newest] == [str(second.id)]

    text = await tasklane(settings, "list")
    assert text.code == 0, text.explained
    header, *rows = text.stdout.splitlines()
    assert header.split() == ["ID", "AGENT", "STATUS", "ATTEMPTS", "CREATED", "TOOK", "ERROR"]
    assert len(rows) == 3
    # aligned: every row's status starts in the header's STATUS column
    column = header.index("STATUS")
    assert {row[column:].split()[0] for row in rows} == {"pending", "cancelled"}


async def test_tree_nests_children_recursively(
    settings: Settings, client: TaskClient, conversation: Conversation, worker: WorkerRuntime
) -> None:
    task = await client.submit("fanout", {"n": 4}, conversation_id=conversation.id)
    assert (await client.wait(task.id, timeout=20)).status.value == "completed"

    tree = await ok_json(settings, "tree", str(task.id))
    assert_task_document(tree)
    assert tree["id"] == str(task.id)
    assert tree["status"] == "completed"
    assert tree["output"] == {"sum": 0 + 1 + 4 + 9}
    children = tree["children"]
    assert len(children) == 4
    assert sorted(c["output"]["y"] for c in children) == [0, 1, 4, 9]
    for child in children:
        assert_task_document(child)
        assert child["parent_task_id"] == str(task.id)
        assert child["agent_id"] == "square"
        assert child["children"] == []

    # the subtree of a child is the child alone
    leaf = await ok_json(settings, "tree", children[0]["id"])
    assert leaf["id"] == children[0]["id"]
    assert leaf["children"] == []

    text = await tasklane(settings, "tree", str(task.id))
    assert text.code == 0, text.explained
    lines = text.stdout.splitlines()
    assert lines[0].startswith("fanout")
    assert "completed" in lines[0]
    assert "took " in lines[0]
    assert [line[:9] for line in lines[1:]] == ["├─ square"] * 3 + ["└─ square"]


# -- cancel and retry -----------------------------------------------------------------------------


async def test_cancel_cancels_and_a_second_cancel_changes_nothing(
    settings: Settings, client: TaskClient, conversation: Conversation
) -> None:
    parent = await client.submit("fanout", {"n": 1}, conversation_id=conversation.id)
    await sql(settings, "UPDATE tasks SET status = 'waiting' WHERE id = $1", parent.id)
    child = await client.submit(
        "square", {"x": 1}, conversation_id=conversation.id, parent_task_id=parent.id
    )

    run = await tasklane(settings, "cancel", str(parent.id), "--json")
    assert run.code == 0, run.explained
    cancelled = run.json()
    assert cancelled["status"] == "cancelled"
    assert "1 unfinished subtask" in run.stderr
    assert (await db.task_row(settings.database_url, child.id))["status"] == "cancelled"

    again = await tasklane(settings, "cancel", str(parent.id), "--json")
    assert again.code == 0, again.explained
    assert again.json() == cancelled  # printed unchanged
    assert "nothing to cancel" in again.stderr


async def test_cancel_of_a_completed_task_exits_0_and_leaves_it(
    settings: Settings, client: TaskClient, conversation: Conversation
) -> None:
    async with running_worker(settings):
        task = await client.submit("echo", {"a": 1}, conversation_id=conversation.id)
        await client.wait(task.id, timeout=10)
    before = await ok_json(settings, "show", str(task.id))

    run = await tasklane(settings, "cancel", str(task.id))
    assert run.code == 0, run.explained
    assert "already completed: nothing to cancel" in run.stdout
    after = await ok_json(settings, "show", str(task.id))
    assert after == before


async def test_retry_runs_a_failed_task_again(
    settings: Settings, client: TaskClient, conversation: Conversation
) -> None:
    task = await client.submit("echo", {"again": True}, conversation_id=conversation.id)
    await sql(
        settings,
        "UPDATE tasks SET status = 'failed', error = 'boom', attempts = 3, max_attempts = 3,"
        " completed_at = now() WHERE id = $1",
        task.id,
    )

    run = await tasklane(settings, "retry", str(task.id), "--json")
    assert run.code == 0, run.explained
    retried = run.json()
    assert retried["status"] == "pending"
    assert retried["attempts"] == 0
    assert retried["error"] is None
    assert retried["completed_at"] is None
    assert "pending again" in run.stderr

    async with running_worker(settings):
        done = await client.wait(task.id, timeout=20)
    assert done.status.value == "completed"
    assert done.output == {"echo": {"again": True}}


async def test_retry_of_a_task_that_is_not_failed_exits_0_unchanged(
    settings: Settings, client: TaskClient, conversation: Conversation
) -> None:
    task = await client.submit("echo", {}, conversation_id=conversation.id)
    before = await ok_json(settings, "show", str(task.id))

    run = await tasklane(settings, "retry", str(task.id), "--json")
    assert run.code == 0, run.explained
    assert "only a failed task can be retried" in run.stderr
    printed = run.json()
    assert printed["status"] == "pending"
    assert printed["version"] == before["version"]
    assert printed == {k: v for k, v in before.items() if k not in ("history", "reason")}


# -- stats ----------------------------------------------------------------------------------------


async def test_stats_counts_by_agent_and_status(
    settings: Settings, client: TaskClient, conversation: Conversation
) -> None:
    echo = [
        await client.submit("echo", {"i": i}, conversation_id=conversation.id) for i in range(3)
    ]
    await client.submit("sleep", {"seconds": 1}, conversation_id=conversation.id)
    await client.cancel(echo[0].id)
    await sql(
        settings,
        "UPDATE tasks SET run_after = now() - interval '90 seconds' WHERE id = $1",
        echo[1].id,
    )

    stats = await ok_json(settings, "stats")
    assert stats["by_status"] == {
        "pending": 3,
        "running": 0,
        "waiting": 0,
        "completed": 0,
        "failed": 0,
        "cancelled": 1,
    }
    assert stats["by_agent"]["echo"]["pending"] == 2
    assert stats["by_agent"]["echo"]["cancelled"] == 1
    assert stats["by_agent"]["sleep"]["pending"] == 1
    assert stats["total"] == 4
    assert 90 <= stats["oldest_pending_seconds"] < 120
    assert stats["finished_last_minute"] == 1
    assert stats["live_workers"] == 0

    async with running_worker(settings) as runtime:
        live = await ok_json(settings, "stats")
        assert live["live_workers"] == 1
        assert [w["id"] for w in live["workers"]] == [runtime.worker_id]

    text = await tasklane(settings, "stats")
    assert text.code == 0, text.explained
    assert text.stdout.splitlines()[0].split()[:3] == ["AGENT", "PENDING", "RUNNING"]
    assert "live workers" in text.stdout


# -- prune ----------------------------------------------------------------------------------------


async def test_prune_deletes_only_old_finished_tasks_in_batches(
    settings: Settings, client: TaskClient, conversation: Conversation
) -> None:
    async with running_worker(settings):
        old_done = [
            await client.submit("echo", {"i": i}, conversation_id=conversation.id) for i in range(3)
        ]
        old_failed = await client.submit("fail", {}, conversation_id=conversation.id)
        await db.wait_final(settings.database_url, [t.id for t in [*old_done, old_failed]])
    recent_done = await client.submit("echo", {"recent": True}, conversation_id=conversation.id)
    await client.cancel(recent_done.id)
    old_pending = await client.submit("echo", {"pending": True}, conversation_id=conversation.id)
    old = [t.id for t in [*old_done, old_failed]]
    await sql(
        settings,
        "UPDATE tasks SET completed_at = now() - interval '8 days' WHERE id = ANY($1::uuid[])",
        old,
    )
    await sql(
        settings,
        "UPDATE tasks SET created_at = now() - interval '30 days' WHERE id = $1",
        old_pending.id,
    )

    dry = await ok_json(settings, "prune", "--older-than", "7d", "--dry-run")
    assert dry["dry_run"] is True
    assert dry["matched"] == 4
    assert dry["deleted"] == 0
    assert await db.value(settings.database_url, "SELECT count(*) FROM tasks") == 6

    only_failed = await ok_json(settings, "prune", "--older-than", "7d", "--status", "failed")
    assert only_failed["deleted"] == 1
    assert only_failed["statuses"] == ["failed"]

    pruned = await ok_json(settings, "prune", "--older-than", "1w", "--batch-size", "2")
    assert pruned["deleted"] == 3
    assert pruned["batches"] == 2
    left = {UUID(str(r["id"])) for r in await sql(settings, "SELECT id FROM tasks")}
    assert left == {recent_done.id, old_pending.id}
    attempts = await db.value(
        settings.database_url,
        "SELECT count(*) FROM task_attempts WHERE task_id = ANY($1::uuid[])",
        old,
    )
    assert attempts == 0


# -- health ---------------------------------------------------------------------------------------


async def test_health_passes_with_a_live_worker(settings: Settings, worker: WorkerRuntime) -> None:
    report = await ok_json(settings, "health")
    assert report["ok"] is True
    assert set(report["checks"]) == {"postgres", "redis", "schema", "workers"}
    assert all(check["ok"] for check in report["checks"].values())
    local = await ok_json(settings, "health", "--local")  # the in-process worker is on this host
    assert local["ok"] is True


async def test_health_fails_without_a_live_worker(settings: Settings) -> None:
    run = await tasklane(settings, "health", "--json")
    assert run.code == 1, run.explained
    report = run.json()
    assert report["ok"] is False
    checks = report["checks"]
    assert checks["postgres"]["ok"]
    assert checks["redis"]["ok"]
    assert checks["schema"]["ok"]
    assert checks["workers"]["ok"] is False
    assert settings.queue in checks["workers"]["detail"]


async def test_health_reports_every_unreachable_service(settings: Settings) -> None:
    broken = replace(
        settings,
        database_url=f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/tasklane",
        redis_url=f"redis://127.0.0.1:{free_port()}/0",
    )
    run = await tasklane(broken, "health", "--json")
    assert run.code == 1, run.explained
    checks = run.json()["checks"]
    assert not any(check["ok"] for check in checks.values())
    assert "cannot connect to PostgreSQL" in checks["postgres"]["detail"]
    assert "cannot connect to Redis" in checks["redis"]["detail"]


# -- demo -----------------------------------------------------------------------------------------


async def test_demo_runs_a_fanout_to_completion(settings: Settings) -> None:
    tree = await ok_json(settings, "demo", "--n", "5")
    assert tree["agent_id"] == "fanout"
    assert tree["status"] == "completed"
    assert tree["output"] == {"sum": 0 + 1 + 4 + 9 + 16}
    assert len(tree["children"]) == 5
    assert {c["status"] for c in tree["children"]} == {"completed"}


async def test_demo_migrates_an_empty_database_and_prints_the_tree(settings: Settings) -> None:
    name = databases.unique_name()
    await databases.create_database(name)
    try:
        fresh = replace(settings, database_url=databases.url_for(name))
        run = await tasklane(fresh, "demo", "--n", "3")
        assert run.code == 0, run.explained
        lines = run.stdout.splitlines()
        root = next(line for line in lines if line.startswith("fanout"))
        assert "completed" in root
        assert "took " in root
        assert sum(line.startswith(("├─ square", "└─ square")) for line in lines) == 3
        assert 'fanout of 3 completed: {"sum": 5}' in run.stdout
    finally:
        await databases.drop_database(name)


# -- errors: one line on stderr, never a traceback ------------------------------------------------


@pytest.mark.parametrize("command", ["show", "tree", "cancel", "retry"])
async def test_unknown_id_is_exit_1(settings: Settings, command: str) -> None:
    missing = str(uuid.uuid4())
    run = await tasklane(settings, command, missing, "--json")
    assert_one_line_error(run, 1, f"no task with id {missing}")
    assert run.stdout == ""


@pytest.mark.parametrize("command", ["show", "tree", "cancel", "retry"])
async def test_malformed_id_is_exit_1(command: str) -> None:
    run = await tasklane(OFFLINE, command, "not-a-uuid")
    assert_one_line_error(run, 1, "not a task id", "not-a-uuid")


async def test_malformed_conversation_id_is_exit_1() -> None:
    run = await tasklane(OFFLINE, "submit", "echo", "--conversation", "42")
    assert_one_line_error(run, 1, "not a conversation id")
    run = await tasklane(OFFLINE, "list", "--conversation", "42")
    assert_one_line_error(run, 1, "not a conversation id")


async def test_unknown_conversation_is_exit_1(settings: Settings) -> None:
    run = await tasklane(settings, "submit", "echo", "--conversation", str(uuid.uuid4()))
    assert_one_line_error(run, 1, "Conversation")
    assert await db.value(settings.database_url, "SELECT count(*) FROM tasks") == 0


@pytest.mark.parametrize(
    "args",
    [
        ("stats",),
        ("show", str(uuid.uuid4())),
        ("submit", "echo"),
    ],
    ids=["stats", "show", "submit"],
)
async def test_unreachable_postgres_is_exit_1(settings: Settings, args: tuple[str, ...]) -> None:
    broken = replace(
        settings, database_url=f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/tasklane"
    )
    run = await tasklane(broken, *args)
    assert_one_line_error(run, 1, "cannot connect to PostgreSQL")


@pytest.mark.parametrize("command", ["submit", "retry", "demo"])
async def test_unreachable_redis_is_exit_1_and_writes_nothing(
    settings: Settings, command: str
) -> None:
    broken = replace(settings, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    args = {"submit": ["submit", "echo"], "retry": ["retry", str(uuid.uuid4())], "demo": ["demo"]}
    run = await tasklane(broken, *args[command])
    assert_one_line_error(run, 1, "cannot connect to Redis")
    assert await db.value(settings.database_url, "SELECT count(*) FROM tasks") == 0


async def test_unmigrated_database_is_exit_1(settings: Settings) -> None:
    name = databases.unique_name()
    await databases.create_database(name)
    try:
        empty = replace(settings, database_url=databases.url_for(name))
        for args in (("show", str(uuid.uuid4())), ("stats",), ("submit", "echo")):
            run = await tasklane(empty, *args)
            assert_one_line_error(run, 1, "not migrated", "tasklane migrate")
        health = await tasklane(empty, "health", "--json")
        assert health.code == 1
        assert health.json()["checks"]["schema"]["ok"] is False
    finally:
        await databases.drop_database(name)


@pytest.mark.parametrize("raw", ['{"x": ', "{'x': 1}", "NaN", ""])
async def test_bad_input_json_is_exit_1_and_writes_nothing(settings: Settings, raw: str) -> None:
    run = await tasklane(settings, "submit", "echo", "--input", raw)
    assert_one_line_error(run, 1, "--input is not valid JSON")
    assert await db.value(settings.database_url, "SELECT count(*) FROM tasks") == 0


@pytest.mark.parametrize(
    "args",
    [
        (),
        ("frobnicate",),
        ("show",),
        ("submit",),
        ("list", "--status", "sleeping"),
        ("list", "--limit", "0"),
        ("prune",),
        ("prune", "--older-than", "soon"),
        ("prune", "--older-than", "7d", "--status", "pending"),
        ("submit", "echo", "--wait", "--timeout", "-1"),
    ],
    ids=lambda args: " ".join(args) or "nothing",
)
async def test_usage_errors_exit_2(args: tuple[str, ...]) -> None:
    """One line, which says where the usage is (more cases: test_cli_input.py)."""
    run = await tasklane(OFFLINE, *args)
    assert run.code == 2, run.explained
    assert "Traceback" not in run.stderr
    [line] = run.stderr.splitlines()
    assert line.startswith("tasklane")
    assert line.endswith("--help)")


# -- edit -----------------------------------------------------------------------------------------


async def test_edit_changes_a_pending_task_and_refuses_a_stale_version(
    settings: Settings, client: TaskClient, conversation: Conversation
) -> None:
    later = datetime.now(UTC) + timedelta(hours=2)
    task = await client.submit("echo", {}, conversation_id=conversation.id, run_after=later)
    edited = await ok_json(
        settings,
        "edit",
        str(task.id),
        "--max-attempts",
        "7",
        "--metadata",
        '{"why": "ops"}',
        "--run-after",
        "+3h",
    )
    assert (edited["max_attempts"], edited["metadata"]) == (7, {"why": "ops"})
    assert edited["version"] == task.version + 1
    run_after = datetime.fromisoformat(edited["run_after"])
    assert later < run_after < later + timedelta(hours=2)  # three hours from the database's now

    stale = await tasklane(
        settings, "edit", str(task.id), "--max-attempts", "2", "--if-version", "1"
    )
    assert stale.code == 1
    assert "was changed concurrently (expected version 1)" in stale.stderr
    nothing = await tasklane(settings, "edit", str(task.id))
    assert (nothing.code, "nothing to edit" in nothing.stderr) == (1, True)
    bad = await tasklane(settings, "edit", str(task.id), "--run-after", "tomorrow")
    assert bad.code == 2
    assert "expected now, +30m or an ISO-8601 time" in bad.stderr
    assert (await client.get(task.id)).max_attempts == 7
