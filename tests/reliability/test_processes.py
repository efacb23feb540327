"""Real worker and producer processes killed, terminated, raced, frozen and misconfigured, on
real Postgres and Redis: the guarantees of the README's table that only a process can show.

Every fault scenario ends with the invariant check (`check_invariants`: the audit trail of every
transition replayed against the transition table) and with no connection left idle in a
transaction. The last sections cover what a process shows at its edges: handlers that ignore
cancellation, its logs, and how it refuses to start.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import subprocess
import sys
import uuid
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any
from uuid import UUID

import asyncpg
import pytest
from arq import create_pool
from arq.connections import ArqRedis, RedisSettings
from arq.constants import job_key_prefix
from redis.asyncio import Redis

from domain.entities import Conversation, Doorbell, Task
from domain.value_objects import TaskStatus
from persistence.session import UnitOfWork
from tests.support import db
from tests.support.databases import ROOT, create_database, drop_database, unique_name, url_for
from tests.support.invariants import check_invariants, idle_in_transaction
from tests.support.producer import STALL_ENV, ProducerProcess
from tests.support.services import PrivateRedis
from tests.support.workers import WorkerProcess, make_settings, settings_env
from worker.app import worker_options
from worker.client import TaskClient, TaskSpec
from worker.config import Settings
from worker.dispatch import JOB_FUNCTION, Dispatcher
from worker.serialization import serialize

pytestmark = [pytest.mark.reliability, pytest.mark.slow]


# -- helpers -------------------------------------------------------------------------------------


def spawn(
    processes: list[WorkerProcess], settings: Settings, n: int = 1, *, wait: bool = True
) -> list[WorkerProcess]:
    """Start `n` worker processes at once (INFO logs: tests read them); wait until all serve."""
    settings = replace(settings, log_level="INFO")
    started = [WorkerProcess(settings) for _ in range(n)]
    processes.extend(started)
    if wait:
        for process in started:
            process.wait_started()
    return started


def by_pid(workers: list[WorkerProcess], pid: int) -> WorkerProcess:
    [found] = [w for w in workers if w.pid == pid]
    return found


def assert_clean(*workers: WorkerProcess) -> None:
    """No traceback and no error-level line in these workers' output."""
    for worker in workers:
        output = worker.output()
        bad = [
            line
            for line in output.splitlines()
            if "Traceback" in line or '"level": "error"' in line or '"level": "critical"' in line
        ]
        assert not bad, f"worker {worker.pid} logged errors:\n" + "\n".join(bad[:20])


def events(worker: WorkerProcess, event: str, task_id: UUID | None = None) -> list[dict[str, Any]]:
    """The worker's log lines for `event` (about `task_id`, if given), parsed."""
    found = []
    for line in worker.output().splitlines():
        if f'"{event}"' not in line:
            continue
        try:
            record = json.loads(line)
        except ValueError:  # not a log line of ours; assert_clean judges those
            continue
        if record.get("event") == event and (
            task_id is None or record.get("task_id") == str(task_id)
        ):
            found.append(record)
    return found


def worker_pid(worker_id: str) -> int:
    return int(worker_id.split("-")[-2])  # f"{hostname}-{pid}-{suffix}"


async def started_marks(url: str, task_id: UUID, count: int) -> list[asyncpg.Record]:
    """Wait until the handler of `task_id` has started `count` times; return those marks."""
    return await db.eventually(
        lambda: db.marks(url, task_id, "started"),
        lambda marks: len(marks) >= count,
        timeout=30,
        what=f"handler start #{count}",
    )


async def transitions(url: str, task_id: UUID) -> list[tuple[str | None, str, int | None, int]]:
    rows = await db.query(
        url,
        "SELECT old_status, new_status, old_attempts, new_attempts FROM test_transitions"
        " WHERE task_id = $1 ORDER BY id",
        task_id,
    )
    return [tuple(r) for r in rows]  # type: ignore[misc]


async def status_counts(url: str) -> dict[str, int]:
    rows = await db.query(url, "SELECT status, count(*) AS n FROM tasks GROUP BY status")
    return {r["status"]: r["n"] for r in rows}


async def assert_invariants(url: str, *workers: WorkerProcess) -> None:
    for worker in workers:
        if worker.process.poll() is None:
            # A worker still starting up may be inside its agent registration's transaction:
            # wait for it to serve before looking for connections left in one.
            worker.wait_started()
    await check_invariants(url, logs=[w.output() for w in workers])
    assert await idle_in_transaction(url) == []


# -- 1. SIGKILL ----------------------------------------------------------------------------------


async def test_sigkill_mid_handler_completes_each_task_exactly_once(
    client: TaskClient,
    conversation: Conversation,
    settings: Settings,
    database_url: str,
    processes: list[WorkerProcess],
) -> None:
    n = 25  # more than one batch's worth of runs in flight (claims and completions batch)
    [victim] = spawn(processes, settings)
    tasks = await client.submit_many(
        [TaskSpec("t_graceful", {"seconds": 60, "then": 0.2}, conversation.id) for _ in range(n)]
    )
    ids = [t.id for t in tasks]
    await db.eventually(
        lambda: db.marks(database_url, label="started"),
        lambda marks: len(marks) == n,
        timeout=30,
        what="every handler started",
    )
    [survivor] = spawn(processes, settings, wait=False)  # it cannot take a running task
    victim.kill()

    rows = await db.wait_final(database_url, ids, timeout=40)
    for row in rows:
        assert (row["status"], row["attempts"], row["runs"]) == ("completed", 2, 2)
        assert row["output"] == {"run": 2, "pid": survivor.pid}
    for task_id in ids:
        history = await db.attempts(database_url, task_id)
        assert [(a["run"], a["attempt"], a["outcome"]) for a in history] == [
            (1, 1, "lost"),
            (2, 2, "completed"),
        ]
        assert "lease expired" in history[0]["error"]
        assert [worker_pid(a["worker_id"]) for a in history] == [victim.pid, survivor.pid]
        assert len(events(survivor, "task.rescued", task_id)) == 1
    # The killed runs never got past their sleep; each handler finished once, in the survivor.
    finished = await db.marks(database_url, label="finished")
    assert sorted((m["task_id"], m["attempt"], m["pid"]) for m in finished) == sorted(
        (t, 2, survivor.pid) for t in ids
    )
    assert_clean(victim, survivor)
    await assert_invariants(database_url, victim, survivor)


async def test_a_killed_workers_doorbells_do_not_block_its_queue(
    conversation: Conversation,
    settings: Settings,
    database_url: str,
    other_queue: str,
    processes: list[WorkerProcess],
) -> None:
    """arq keeps a started job in the queue until it finishes, behind an in-progress key that
    outlives the job's timeout (minutes). Workers read the queue from its head,
    `queue_read_limit` ids at a time (here 100), and skip ids in progress: a dead worker's jobs
    left there would hide everything behind them until those keys expired.

    Here the dead worker had 100 runs in flight on a queue with no other worker; a worker of
    another queue rescues them (rescue spans queues), and must clear that queue's head."""
    n = 100
    queue_b = replace(settings, queue=other_queue)
    victim = WorkerProcess(replace(queue_b, concurrency=n, log_level="INFO"))
    rescuer = WorkerProcess(replace(settings, log_level="INFO"))
    processes.extend([victim, rescuer])
    victim.wait_started()
    rescuer.wait_started()
    async with TaskClient.from_settings(queue_b) as client:
        await client.submit_many(
            [TaskSpec("t_long_first_run", {"seconds": 60}, conversation.id) for _ in range(n)]
        )
        await db.eventually(
            lambda: status_counts(database_url),
            lambda counts: counts == {"running": n},
            timeout=30,
            what="every task running",
        )
        victim.kill()
        redis = Redis.from_url(settings.redis_url)
        try:
            await db.eventually(
                lambda: status_counts(database_url),
                lambda counts: counts == {"pending": n},
                what="every task rescued",
            )
            # No worker of its own, so nobody rang anything on it since: it is empty once the
            # rescuer took the dead worker's doorbells off.
            await db.eventually(
                lambda: redis.zcard(other_queue), lambda left: left == 0, what="dead doorbells gone"
            )
        finally:
            await redis.aclose()

        spawn(processes, replace(queue_b, concurrency=10))  # it reads 100 ids a poll
        later = await client.submit("echo", {"after": "the kill"}, conversation_id=conversation.id)
        await db.eventually(
            lambda: status_counts(database_url),
            lambda counts: counts == {"completed": n + 1},
            timeout=30,
            what="every task completed",
        )
    rows = await db.query(database_url, "SELECT * FROM tasks WHERE id <> $1", later.id)
    assert all((r["status"], r["attempts"], r["runs"]) == ("completed", 2, 2) for r in rows)
    assert (await db.task_row(database_url, later.id))["attempts"] == 1
    assert_clean(*processes)
    await assert_invariants(database_url, *processes)


async def test_workers_together_fill_more_slots_than_one_poll_reads(
    conversation: Conversation,
    settings: Settings,
    database_url: str,
    client: TaskClient,
    processes: list[WorkerProcess],
) -> None:
    """Each poll reads `queue_read_limit` ids from the queue's head (here 120). Were a running
    doorbell kept queued, as arq keeps a running job, the head would hold only running ones once
    the workers together ran that many, and no worker would see the work behind them: three
    workers of 60 slots would never run more than 120 tasks at once."""
    workers = replace(settings, concurrency=60, lease_seconds=30.0)
    assert worker_options(workers)["queue_read_limit"] == 120
    spawn(processes, workers, 3)
    tasks = await client.submit_many(
        [TaskSpec("t_count_runs", {"seconds": 5.0}, conversation.id) for _ in range(180)]
    )
    await db.eventually(
        lambda: status_counts(database_url),
        lambda counts: counts.get("running", 0) == 180,
        timeout=20,
        what="all 180 slots running",
    )
    rows = await db.wait_final(database_url, [t.id for t in tasks], timeout=60)
    assert {(r["status"], r["attempts"]) for r in rows} == {("completed", 1)}


async def test_repeated_sigkills_fail_the_task_when_its_attempts_run_out(
    client: TaskClient,
    conversation: Conversation,
    settings: Settings,
    database_url: str,
    processes: list[WorkerProcess],
) -> None:
    """A root task and a subtask, each killed mid-handler on every attempt. Neither has a
    max_attempts of its own: the default (3) is resolved and stored at the first claim."""
    workers = spawn(processes, settings, 2)
    long = {"seconds": 60, "then": 60}
    root = await client.submit("t_graceful", long, conversation_id=conversation.id)
    parent = await client.submit(
        "t_collect",
        {"children": [{"agent": "t_graceful", "input": long}]},
        conversation_id=conversation.id,
    )
    child_id = await db.eventually(
        lambda: db.value(database_url, "SELECT id FROM tasks WHERE parent_task_id = $1", parent.id),
        bool,
        what="the subtask",
    )
    killed: dict[UUID, list[int]] = {root.id: [], child_id: []}
    for attempt in (1, 2, 3):
        holders = set()
        for task_id, pids in killed.items():
            marks = await started_marks(database_url, task_id, attempt)
            assert [m["attempt"] for m in marks] == list(range(1, attempt + 1))
            pids.append(marks[-1]["pid"])
            holders.add(marks[-1]["pid"])
        for pid in holders:
            victim = by_pid(workers, pid)
            victim.kill()
            workers.remove(victim)
        # Someone must be alive to rescue, and to be killed next time.
        workers.extend(spawn(processes, settings, len(holders), wait=False))

    rows = {r["id"]: r for r in await db.wait_final(database_url, [root.id, child_id, parent.id])}
    for task_id, pids in killed.items():
        row = rows[task_id]
        summary = (row["status"], row["attempts"], row["max_attempts"], row["runs"])
        assert summary == ("failed", 3, 3, 3)
        assert "lease expired" in row["error"]
        history = await db.attempts(database_url, task_id)
        assert [(a["attempt"], a["outcome"]) for a in history] == [
            (1, "lost"),
            (2, "lost"),
            (3, "lost"),
        ]
        assert [worker_pid(a["worker_id"]) for a in history] == pids
        assert [r[1] for r in await transitions(database_url, task_id)] == [
            "pending",
            *["running", "pending"] * 2,
            "running",
            "failed",
        ]
        # Never a fourth run, and no run ever got to the end of its handler.
        assert len(await db.marks(database_url, task_id, "started")) == 3
        assert await db.marks(database_url, task_id, "finished") == []
    # The parent was resumed by the rescue that failed its child, and saw why it failed.
    assert rows[parent.id]["status"] == "completed"
    [child] = rows[parent.id]["output"]["children"]
    assert child["status"] == "failed"
    assert "lease expired" in child["error"]
    assert_clean(*processes)
    await assert_invariants(database_url, *processes)


# -- 2. SIGTERM ----------------------------------------------------------------------------------


@pytest.mark.parametrize("signals", [1, 2], ids=["sigterm", "sigterm-twice"])
async def test_sigterm_finishes_short_handlers_and_releases_long_ones(
    signals: int,
    client: TaskClient,
    conversation: Conversation,
    settings: Settings,
    database_url: str,
    processes: list[WorkerProcess],
) -> None:
    settings = replace(settings, shutdown_grace_seconds=4)
    n = 12  # of each: 24 runs in flight, enough for claims and completions to batch
    [worker] = spawn(processes, settings)
    short = await client.submit_many(
        [TaskSpec("t_graceful", {"seconds": 1.5}, conversation.id) for _ in range(n)]
    )
    long = await client.submit_many(
        [TaskSpec("t_graceful", {"seconds": 60, "then": 0.2}, conversation.id) for _ in range(n)]
    )
    short_ids, long_ids = [t.id for t in short], [t.id for t in long]
    await db.eventually(
        lambda: db.marks(database_url, label="started"),
        lambda marks: len(marks) == 2 * n,
        timeout=30,
        what="every handler started",
    )
    worker.signal(signal.SIGTERM)
    if signals == 2:
        # The short handlers finishing proves the first signal was handled (the loop went
        # round since); the long ones hold the worker in its grace period meanwhile.
        await db.eventually(
            lambda: db.marks(database_url, label="finished"),
            lambda marks: len(marks) == n,
            what="short handlers done",
        )
        assert worker.process.poll() is None
        worker.signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 0

    # The short handlers finished inside the grace period, in this worker.
    for row in await db.query(database_url, "SELECT * FROM tasks WHERE id = ANY($1)", short_ids):
        assert (row["status"], row["attempts"]) == ("completed", 1)
        assert row["output"] == {"run": 1, "pid": worker.pid}
    # The long ones were interrupted at its end and handed back once, their attempt with them.
    for row in await db.query(database_url, "SELECT * FROM tasks WHERE id = ANY($1)", long_ids):
        assert (row["status"], row["attempts"]) == ("pending", 0)
    for task_id in long_ids:
        assert [a["outcome"] for a in await db.attempts(database_url, task_id)] == ["released"]
        assert await transitions(database_url, task_id) == [
            (None, "pending", None, 0),
            ("pending", "running", 0, 1),
            ("running", "pending", 1, 0),
        ]
    released = Counter(e["task_id"] for e in events(worker, "task.released"))
    assert released == {str(t): 1 for t in long_ids}
    interrupted = Counter(m["task_id"] for m in await db.marks(database_url, label="interrupted"))
    assert interrupted == dict.fromkeys(long_ids, 1)

    [other] = spawn(processes, settings)
    rows = await db.wait_final(database_url, long_ids, timeout=30)
    for row in rows:
        assert (row["status"], row["attempts"]) == ("completed", 1)
        assert row["output"] == {"run": 2, "pid": other.pid}
    for task_id in long_ids:
        history = await db.attempts(database_url, task_id)
        assert [(a["run"], a["attempt"], a["outcome"]) for a in history] == [
            (1, 1, "released"),
            (2, 1, "completed"),
        ]
    finished = Counter(m["task_id"] for m in await db.marks(database_url, label="finished"))
    assert finished == dict.fromkeys(short_ids + long_ids, 1)
    assert_clean(worker, other)
    await assert_invariants(database_url, worker, other)


async def test_a_handler_that_ignores_cancellation_cannot_hold_up_shutdown(
    client: TaskClient,
    conversation: Conversation,
    settings: Settings,
    database_url: str,
    processes: list[WorkerProcess],
) -> None:
    [worker] = spawn(processes, settings)  # grace 2 s; a cancelled handler gets 5 s to unwind
    task = await client.submit("t_stubborn", {"seconds": 120}, conversation_id=conversation.id)
    await started_marks(database_url, task.id, 1)
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
    spawn(processes, replace(settings, concurrency=1))
    stubborn = await client.submit("t_stubborn", {"seconds": 120}, conversation_id=conversation.id)
    await started_marks(database_url, stubborn.id, 1)
    await client.cancel(stubborn.id)
    # With its only slot taken by a handler that never ends, the worker could run nothing else
    # if it waited for it; it stops waiting once the heartbeat finds the task cancelled.
    after = await client.submit("echo", "next", conversation_id=conversation.id)
    assert (await client.wait(after.id, timeout=20)).status is TaskStatus.COMPLETED
    assert (await client.get(stubborn.id)).status is TaskStatus.CANCELLED


# -- 5. Duplicate delivery -----------------------------------------------------------------------


async def test_duplicate_doorbells_raced_by_three_workers_write_each_outcome_once(
    client: TaskClient,
    conversation: Conversation,
    settings: Settings,
    database_url: str,
    processes: list[WorkerProcess],
) -> None:
    n = 80
    # Eight slots each: no one process can hold all 80 runs (0.3 s each), so every process
    # takes some of the tasks and meets duplicates of others' — the race the test is about.
    workers = spawn(processes, replace(settings, concurrency=8), 3)
    # Committed without a doorbell, and out of the reconciler's reach for a minute: every
    # doorbell these tasks get is one of the duplicates below.
    async with UnitOfWork(client.session_factory) as uow:
        tasks = await uow.tasks.create_many(
            [
                Task(
                    conversation_id=conversation.id,
                    agent_id="t_count_runs",
                    input={"seconds": 0.3},
                    queue=settings.queue,
                )
                for _ in range(n)
            ],
            dispatch_delays=[60.0] * n,
        )
        await uow.commit()
    ids = [t.id for t in tasks]

    redis = Redis.from_url(settings.redis_url)
    arq: ArqRedis = await create_pool(
        RedisSettings.from_dsn(settings.redis_url),
        job_serializer=serialize,
        default_queue_name=settings.queue,
    )
    try:
        dispatcher = Dispatcher(redis, settings.queue)
        for k in range(4):
            order = random.sample(ids, len(ids))
            # Doorbells for run 1 (the one a producer rings) and for runs that never happen,
            # twice over (the second ring is absorbed while the first is queued)…
            await dispatcher.ring([Doorbell(t, k) for t in order])
            await dispatcher.ring([Doorbell(t, k) for t in order])
            # …and arq jobs for the same tasks under other ids: random, fixed, arq's own.
            await asyncio.gather(
                *(arq.enqueue_job(JOB_FUNCTION, str(t), _job_id=uuid.uuid4().hex) for t in order),
                *(arq.enqueue_job(JOB_FUNCTION, str(t), _job_id=f"dup-{t}") for t in order),
                *(arq.enqueue_job(JOB_FUNCTION, str(t)) for t in order[: n // 4]),
            )
        rows = await db.wait_final(database_url, ids, timeout=60)
        await db.eventually(
            lambda: redis.zcard(settings.queue), lambda left: left == 0, what="queue drained"
        )
    finally:
        await arq.aclose()
        await redis.aclose()

    assert all((r["status"], r["attempts"], r["runs"]) == ("completed", 1, 1) for r in rows)
    marks = Counter(m["task_id"] for m in await db.marks(database_url, label="run"))
    assert marks == dict.fromkeys(ids, 1)
    history = await db.query(
        database_url, "SELECT task_id, outcome FROM task_attempts ORDER BY task_id"
    )
    assert sorted((r["task_id"], r["outcome"]) for r in history) == sorted(
        (t, "completed") for t in ids
    )
    # Each run's one INFO line is its finish (the start is DEBUG).
    completed = Counter(e["task_id"] for w in workers for e in events(w, "task.completed"))
    assert completed == {str(t): 1 for t in ids}
    # The race was real: a task's duplicates reached processes other than the one that ran it.
    claimed_by = {e["task_id"]: w.pid for w in workers for e in events(w, "task.completed")}
    ignored = [(w.pid, e["task_id"]) for w in workers for e in events(w, "doorbell.ignored")]
    assert len(ignored) >= 3 * n
    assert any(pid != claimed_by[task_id] for pid, task_id in ignored)
    assert_clean(*workers)
    await assert_invariants(database_url, *workers)


async def test_doorbells_rung_on_another_queue_are_left_to_that_queues_workers(
    client: TaskClient,
    conversation: Conversation,
    settings: Settings,
    database_url: str,
    other_queue: str,
    processes: list[WorkerProcess],
) -> None:
    """A doorbell can reach a worker of another queue (an operator's CLI configured for the
    default queue, a reconciler resuming a parent across queues, a stray copy): that worker
    must leave the task alone, even more so when it does not serve the task's agent."""
    n = 30
    [mine] = spawn(processes, settings)
    [foreign] = spawn(
        processes, replace(settings, queue=other_queue, agent_modules=("worker.demo_agents",))
    )
    async with UnitOfWork(client.session_factory) as uow:
        tasks = await uow.tasks.create_many(
            [
                Task(
                    conversation_id=conversation.id,
                    agent_id="t_count_runs",
                    input={"seconds": 0.2},
                    queue=settings.queue,
                )
                for _ in range(n)
            ],
            dispatch_delays=[60.0] * n,
        )
        await uow.commit()
    ids = [t.id for t in tasks]
    redis = Redis.from_url(settings.redis_url)
    try:
        # The foreign worker hears first; the task's own queue a moment later.
        doorbells = [Doorbell(t, 0) for t in ids]
        await Dispatcher(redis, other_queue).ring(doorbells)

        async def foreign_left() -> tuple[int, int]:  # queued, and started but not yet ended
            keys = [job_key_prefix + d.job_id for d in doorbells]
            return int(await redis.zcard(other_queue)), int(await redis.exists(*keys))

        await db.eventually(foreign_left, lambda left: left == (0, 0), what="foreign ones ended")
        await Dispatcher(redis, settings.queue).ring([Doorbell(t, 0) for t in ids])
        rows = await db.wait_final(database_url, ids, timeout=30)
    finally:
        await redis.aclose()

    assert [(r["status"], r["error"]) for r in rows if r["status"] != "completed"] == []
    assert all((r["attempts"], r["runs"]) == (1, 1) for r in rows)
    assert {worker_pid(r["worker_id"]) for r in rows} == {mine.pid}
    assert events(foreign, "task.completed") == []
    ignored = events(foreign, "doorbell.ignored")
    assert len(ignored) == n
    assert all(e["reason"].startswith(f"belongs to queue {settings.queue!r}") for e in ignored)
    assert_clean(mine, foreign)
    await assert_invariants(database_url, mine, foreign)


# -- 6. Producer crash between commit and enqueue ------------------------------------------------


async def test_producer_killed_between_commit_and_ring_is_dispatched_by_the_reconciler(
    conversation: Conversation,
    settings: Settings,
    database_url: str,
    processes: list[WorkerProcess],
) -> None:
    env = settings_env(settings, {STALL_ENV: "1"})
    producers = [
        ProducerProcess([mode, str(conversation.id), "t_count_runs", "3"], env)
        for mode in ("many", "session")
    ]
    try:
        ids = [UUID(i) for p in producers for i in p.wait_for_line("committed ").split(",")]
    finally:
        for producer in producers:
            producer.kill()
    assert len(set(ids)) == 6
    redis = Redis.from_url(settings.redis_url)
    try:
        queued = [j.decode() for j in await redis.zrange(settings.queue, 0, -1)]
    finally:
        await redis.aclose()
    # No worker is running yet, so no reconciler: a doorbell here would be the producers'.
    assert queued == [], "a doorbell was rung"
    [worker] = spawn(processes, settings)

    rows = await db.wait_final(database_url, ids, timeout=30)
    assert all((r["status"], r["attempts"], r["runs"]) == ("completed", 1, 1) for r in rows)
    marks = Counter(m["task_id"] for m in await db.marks(database_url, label="run"))
    assert marks == dict.fromkeys(ids, 1)
    # Dispatched by the reconciler once the producer's doorbells were overdue, not before.
    for r in rows:
        waited = (r["started_at"] - r["created_at"]).total_seconds()
        assert waited >= settings.redispatch_seconds, f"{r['id']} started after {waited}s"
    assert events(worker, "reconcile.dispatched")
    assert_clean(worker)
    await assert_invariants(database_url, worker)


async def test_flushdb_while_tasks_are_pending(
    conversation: Conversation,
    database_url: str,
    private_redis: PrivateRedis,
    processes: list[WorkerProcess],
) -> None:
    """Redis loses every doorbell before any worker runs: the reconciler rings them again."""
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
    spawn(processes, settings)
    rows = await db.wait_final(database_url, [t.id for t in tasks], timeout=30)
    assert sorted(r["output"]["y"] for r in rows) == sorted(i * i for i in range(30))


# -- 7. A handler that blocks the event loop past its lease --------------------------------------


async def test_a_run_that_blocks_its_loop_past_the_lease_is_taken_over_and_discarded(
    client: TaskClient,
    conversation: Conversation,
    settings: Settings,
    database_url: str,
    processes: list[WorkerProcess],
    tmp_path: Path,
) -> None:
    [stuck] = spawn(processes, settings)
    # A well-behaved run first, then, in the same worker, one that blocks the event loop: the
    # well-behaved one cannot heartbeat either.
    healthy = await client.submit(
        "t_graceful", {"seconds": 60, "then": 0.2}, conversation_id=conversation.id
    )
    await started_marks(database_url, healthy.id, 1)
    release = tmp_path / "release"
    blocking = await client.submit(
        "t_block_until", {"release": str(release)}, conversation_id=conversation.id
    )
    await started_marks(database_url, blocking.id, 1)

    # Another worker rescues both once their leases run out, and runs them again.
    [other] = spawn(processes, settings)
    rows = {r["id"]: r for r in await db.wait_final(database_url, [healthy.id, blocking.id])}
    for row in rows.values():
        assert (row["status"], row["attempts"], row["runs"]) == ("completed", 2, 2)
        assert row["output"] == {"run": 2, "pid": other.pid}

    release.touch()  # the stuck loop runs again: its results come too late
    stuck.wait_for_output('"run.discarded"')
    stuck.wait_for_output('"run.abandoned"')
    # The blocking run returned a result: its write was fenced off.
    [discarded] = events(stuck, "run.discarded", blocking.id)
    assert discarded["would_have_been"] == "task.completed"
    # The well-behaved run learnt at its next heartbeat that the task was no longer its own,
    # and was cancelled without writing anything.
    assert len(events(stuck, "run.claim_lost", healthy.id)) == 1
    assert len(events(stuck, "run.abandoned", healthy.id)) == 1
    # run.abandoned is logged once the loss is known, without waiting for the handler to unwind:
    # its 'interrupted' mark lands a moment later.
    interrupted = await db.eventually(
        lambda: db.marks(database_url, healthy.id, "interrupted"),
        bool,
        timeout=10,
        what="the cancelled handler's interrupted mark",
    )
    assert [(m["attempt"], m["pid"]) for m in interrupted] == [(1, stuck.pid)]
    finished = await db.marks(database_url, healthy.id, "finished")
    assert [(m["attempt"], m["pid"]) for m in finished] == [(2, other.pid)]
    assert events(stuck, "task.completed") == []

    for task_id, row in rows.items():
        assert dict(await db.task_row(database_url, task_id)) == dict(row)  # nothing changed
        history = await db.attempts(database_url, task_id)
        assert [(a["run"], a["attempt"], a["outcome"]) for a in history] == [
            (1, 1, "lost"),
            (2, 2, "completed"),
        ]
        assert [worker_pid(a["worker_id"]) for a in history] == [stuck.pid, other.pid]
    assert stuck.process.poll() is None  # and the stuck worker carries on
    assert_clean(stuck, other)
    await assert_invariants(database_url, stuck, other)


# -- Logs and startup ----------------------------------------------------------------------------


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
    [worker] = spawn(processes, make_settings(url, redis_url, queue))
    task = await client.submit("fail", {"fail_times": 1}, conversation_id=conversation.id)
    await client.wait(task.id, timeout=15)
    worker.stop()
    output = worker.output()
    assert secret not in output
    assert "postgres:***@" in output
    [started] = events(worker, "worker.started")
    lines = [line for line in output.splitlines() if str(task.id) in line]
    assert any('"task.retrying"' in line for line in lines)
    assert any('"task.completed"' in line for line in lines)
    for line in lines:
        for key in ('"agent_id": "fail"', '"attempt": ', f'"worker_id": "{started["worker_id"]}"'):
            assert key in line, f"{key} missing from {line}"


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


async def test_sigusr2_prints_where_each_asyncio_task_waits_and_the_worker_goes_on(
    settings: Settings, processes: list[WorkerProcess]
) -> None:
    """`kill -USR2` (TasklaneWorker.dump_tasks): every task's await chain on stderr, for a
    worker that seems stuck; the worker keeps serving and still stops cleanly on SIGTERM."""
    [worker] = spawn(processes, settings)
    worker.signal(signal.SIGUSR2)
    worker.wait_for_output("asyncio tasks")
    dump = worker.output()
    for place in ("reconciler.py", "heartbeat.py", "worker/app.py"):
        assert place in dump, dump[-3000:]
    worker.stop()
    assert worker.process.returncode == 0, worker.output()[-3000:]
