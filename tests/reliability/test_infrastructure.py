"""The services under the worker fail: Redis lost, Postgres connections dropped (and commits made
ambiguous), worker clocks minutes off, a database pool of one connection.

Real worker processes (`python -m worker.cli worker`) throughout; faults are injected on services
or connections of the test's own: a private redis-server, a private Postgres cluster, the worker's
own Postgres backends (`pg_terminate_backend`, found by their `application_name`), or a TCP proxy
between the worker and Postgres (`tests/support/pgproxy.py`). Every scenario ends with the
invariant checker, after the workers were stopped: they must still be alive then, and exit cleanly.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import json
import random
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import asyncpg
import pytest
from arq.constants import in_progress_key_prefix
from redis.asyncio import Redis

from domain.entities import Conversation, Doorbell
from persistence import pg
from tests.support import databases, db, servers
from tests.support.invariants import check_invariants, idle_in_transaction
from tests.support.pgcluster import PrivatePostgres
from tests.support.pgproxy import PgProxy
from tests.support.services import PrivateRedis
from tests.support.tools import missing
from tests.support.workers import WorkerProcess, make_settings, start_process
from worker.client import TaskClient, TaskSpec
from worker.config import Settings
from worker.dispatch import Dispatcher
from worker.runtime import CLAIM_WINDOW

pytestmark = [pytest.mark.reliability, pytest.mark.slow]

WORKER_APP = "tasklane-worker %"
# Fragments of the lifecycle statements as pg_stat_activity shows them (persistence/lifecycle_sql).
# A claim retried after a dropped connection first adopts what the lost attempt may have claimed.
CLAIM_SQL = ["%candidates AS%", "%a.claim_token = u.claim_token%"]  # the claim, the adoption
HEARTBEAT_SQL = ["%held AS%"]
COMPLETE_SQL = ["%SET status = 'completed'%"]


# -- fixtures and helpers ------------------------------------------------------------------------


@pytest.fixture
def proxy() -> Iterator[PgProxy]:
    server = PgProxy(servers.postgres_url()).start()
    yield server
    server.stop()


def behind(proxy: PgProxy, settings: Settings, database: str) -> Settings:
    """`settings` with the worker's Postgres traffic going through `proxy`."""
    return replace(settings, database_url=databases.url_for(database, proxy.server_url()))


def worker_id(process: WorkerProcess) -> str:
    """The worker id a process announced at start (under faketime its pid is not the worker's)."""
    for line in process.output().splitlines():
        if '"worker.started"' in line:
            return str(json.loads(line)["worker_id"])
    raise AssertionError("no worker.started line")


def assert_alive(processes: list[WorkerProcess]) -> None:
    for process in processes:
        assert process.process.poll() is None, f"worker died:\n{process.output()[-3000:]}"


async def stop_and_check(
    url: str, processes: list[WorkerProcess], *, task_ids: list[UUID] | None = None
) -> str:
    """Every worker survived until now and stops cleanly; then the invariants hold and no
    connection is left inside a transaction. Returns the workers' logs."""
    assert_alive(processes)
    for process in processes:
        process.stop()
        assert process.process.returncode == 0, process.output()[-3000:]
    logs = "\n".join(process.output() for process in processes)
    await check_invariants(url, task_ids=task_ids, logs=logs.splitlines())
    assert await idle_in_transaction(url) == []
    return logs


# Worker backends of this database, optionally only those running a statement like one of $2
# (a text[]), optionally only those waiting for a lock ($3).
WORKER_BACKENDS = (
    "FROM pg_stat_activity WHERE datname = current_database() AND application_name LIKE $1"
    " AND ($2::text[] IS NULL OR query LIKE ANY($2::text[]))"
    " AND (NOT $3 OR wait_event_type = 'Lock')"
)


async def terminate_worker_backends(
    url: str, *, query: list[str] | None = None, waiting_on_lock: bool = False
) -> int:
    """pg_terminate_backend on the worker processes' connections to this database (optionally
    only those running a statement like one of `query`, or waiting for a lock). How many were
    hit."""
    rows = await db.query(
        url,
        f"SELECT pg_terminate_backend(pid) {WORKER_BACKENDS}",
        WORKER_APP,
        query,
        waiting_on_lock,
    )
    return sum(1 for row in rows if row[0])


async def waiting_on_lock(url: str, query: list[str]) -> int:
    """How many worker statements like one of `query` wait for a lock."""
    count: int = await db.value(url, f"SELECT count(*) {WORKER_BACKENDS}", WORKER_APP, query, True)
    return count


async def drop_connection_of(url: str, query: list[str], *, times: int) -> None:
    """Wait for a worker statement like `query` to block on a lock, then terminate its backend;
    `times` times over (the store retries the statement on a new connection)."""
    for _ in range(times):
        await db.eventually(
            lambda: terminate_worker_backends(url, query=query, waiting_on_lock=True),
            lambda hit: hit > 0,
            timeout=20,
            what=f"a worker statement like {query!r} waiting on the lock",
        )


class TableLock:
    """`LOCK TABLE tasks IN EXCLUSIVE MODE` held by the test: plain reads go on, every statement
    that writes or row-locks tasks (claim, heartbeat, finish, rescue) waits behind it."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.conn: asyncpg.Connection | None = None

    async def __aenter__(self) -> TableLock:
        self.conn = await pg.connect(self.url)
        await self.conn.execute("BEGIN; LOCK TABLE tasks IN EXCLUSIVE MODE")
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.conn is not None
        try:
            await self.conn.execute("ROLLBACK")
        finally:
            await self.conn.close()


async def insert_undispatched(
    url: str, conversation_id: UUID, queue: str, agent_id: str, payload: Any
) -> UUID:
    """A due pending task, inserted by plain SQL, that the reconciler leaves alone for an hour:
    only the doorbell the test rings will reach a worker."""
    task_id: UUID = await db.value(
        url,
        "INSERT INTO tasks (conversation_id, agent_id, queue, input, dispatch_after)"
        " VALUES ($1, $2, $3, $4, now() + interval '1 hour') RETURNING id",
        conversation_id,
        agent_id,
        queue,
        json.dumps(payload),
    )
    return task_id


@contextlib.asynccontextmanager
async def redis_at(redis_url: str) -> AsyncIterator[Redis]:
    redis = Redis.from_url(redis_url)
    try:
        yield redis
    finally:
        await redis.aclose()


async def ring(redis_url: str, queue: str, doorbells: list[Doorbell]) -> None:
    async with redis_at(redis_url) as redis:
        await Dispatcher(redis, queue).ring(doorbells)


async def queued(redis_url: str, queue: str) -> int:
    async with redis_at(redis_url) as redis:
        return int(await redis.zcard(queue))


async def outcomes(url: str, task_id: UUID) -> list[str]:
    return [a["outcome"] for a in await db.attempts(url, task_id)]


async def run_marks(url: str) -> dict[UUID, int]:
    """Handler runs per task, as the test agents marked them."""
    rows = await db.query(
        url, "SELECT task_id, count(*) AS n FROM test_marks WHERE label = 'run' GROUP BY task_id"
    )
    return {row["task_id"]: row["n"] for row in rows}


# -- 3. Redis lost -------------------------------------------------------------------------------


async def test_redis_restarted_empty_while_tasks_are_pending_and_running(
    settings: Settings,
    database_url: str,
    conversation: Conversation,
    private_redis: PrivateRedis,
    processes: list[WorkerProcess],
) -> None:
    settings = replace(settings, redis_url=private_redis.url, concurrency=2)
    for _ in range(2):
        start_process(processes, settings)
    async with TaskClient.from_settings(settings) as client:
        running = [
            await client.submit("t_marked_sleep", {"seconds": 2}, conversation_id=conversation.id)
            for _ in range(4)
        ]
        # Every slot is busy: these wait in Redis, as doorbells only.
        pending = await client.submit_many(
            [TaskSpec("t_count_runs", {}, conversation_id=conversation.id) for _ in range(20)]
        )
    await db.eventually(
        lambda: db.marks(database_url, label="started"),
        lambda marks: len(marks) == 4,
        what="4 handlers running",
    )
    assert await queued(private_redis.url, settings.queue) > 0  # pending doorbells in Redis…
    async with redis_at(private_redis.url) as redis:
        await redis.set("restart-sentinel", b"1")
    private_redis.restart()  # …and now they are gone, with everything else
    # Not `queued(...) == 0`: a reconciler may already be ringing the lost doorbells again.
    async with redis_at(private_redis.url) as redis:
        assert not await redis.exists("restart-sentinel")
    assert_alive(processes)

    ids = [t.id for t in running + pending]
    rows = await db.wait_final(database_url, ids, timeout=60)
    assert {(r["status"], r["attempts"]) for r in rows} == {("completed", 1)}
    for task in running:
        assert len(await db.marks(database_url, task.id, "started")) == 1
    assert await run_marks(database_url) == {t.id: 1 for t in pending}
    logs = await stop_and_check(database_url, processes, task_ids=ids)
    assert '"reconcile.dispatched"' in logs  # the reconciler rang the lost doorbells again


OUTAGE_SECONDS = 60.0


async def test_redis_down_for_a_minute_under_steady_load(
    settings: Settings,
    database_url: str,
    conversation: Conversation,
    private_redis: PrivateRedis,
    processes: list[WorkerProcess],
) -> None:
    """Redis is an accelerator, not a dependency: stopped for a minute under a steady load,
    producers keep committing, the worker keeps completing tasks (claimed straight from
    Postgres), none is lost or run twice, and doorbells take over again once Redis is back."""
    settings = replace(settings, redis_url=private_redis.url)
    worker = start_process(processes, settings)
    submitted: list[UUID] = []
    async with TaskClient.from_settings(settings) as client:

        async def submit_for(seconds: float) -> None:
            until = time.monotonic() + seconds
            while time.monotonic() < until:
                began = time.monotonic()
                if len(submitted) % 5 == 4:
                    batch = await client.submit_many(
                        [TaskSpec("t_count_runs", {}, conversation_id=conversation.id)] * 3
                    )
                    submitted.extend(t.id for t in batch)
                else:
                    task = await client.submit("t_count_runs", {}, conversation_id=conversation.id)
                    submitted.append(task.id)
                # The submit returned: its Postgres write stands, whatever Redis does. It did
                # not hang on Redis (a generous bound: 2 shared cores).
                assert time.monotonic() - began < 5
                await asyncio.sleep(0.1)

        await submit_for(2)
        private_redis.kill()
        down_at = datetime.now(UTC)
        backlog = await client.submit_many(
            [TaskSpec("t_count_runs", {}, conversation_id=conversation.id)] * 500
        )
        submitted.extend(t.id for t in backlog)
        await submit_for(OUTAGE_SECONDS)
        up_at = datetime.now(UTC)
        worker.wait_for_output('"redis.unreachable"')
        done = await db.query(
            database_url,
            "SELECT min(completed_at) AS first, max(completed_at) AS last, count(*) AS n"
            " FROM tasks WHERE status = 'completed' AND completed_at BETWEEN $1 AND $2",
            down_at,
            up_at,
        )
        # The backlog of 500 and the steady load (about 2 submits a second while each
        # producer's ring fails) all ran while Redis was away.
        assert done[0]["n"] >= 500 + OUTAGE_SECONDS
        [span] = await db.query(
            database_url,
            "SELECT max(completed_at) - min(started_at) AS took FROM tasks WHERE id = ANY($1)",
            [t.id for t in backlog],
        )
        rate = len(backlog) / max(span["took"].total_seconds(), 0.001)
        print(f"\nwhile Redis was away: {done[0]['n']} completed; the backlog at {rate:.0f}/s")

        assert_alive(processes)
        private_redis.start()  # back, empty, on the same port
        worker.wait_for_output('"redis.reachable"', timeout=20)
        mark = len(worker.output())
        await submit_for(3)
        rows = await db.wait_final(database_url, submitted, timeout=90)
    assert {(r["status"], r["attempts"]) for r in rows} == {("completed", 1)}
    assert await run_marks(database_url) == dict.fromkeys(submitted, 1)  # none ran twice
    # After Redis came back, tasks were started by their doorbells, not from Postgres.
    assert '"postgres_mode.claimed"' not in worker.output()[mark:]
    await stop_and_check(database_url, processes, task_ids=submitted)


async def test_a_worker_whose_postgres_hangs_stops_taking_doorbells(
    settings: Settings,
    database_url: str,
    conversation: Conversation,
    processes: list[WorkerProcess],
) -> None:
    """Claims that Postgres does not answer (every write to tasks waits behind a table lock):
    the worker takes no more doorbells than its claim window, instead of filling all of its
    slots and marking every queued doorbell in progress behind the hang."""
    start_process(processes, replace(settings, concurrency=50))
    task_ids = [
        await insert_undispatched(database_url, conversation.id, settings.queue, "echo", {})
        for _ in range(100)
    ]
    doorbells = [Doorbell(t, 0) for t in task_ids]
    async with TableLock(database_url):
        await ring(settings.redis_url, settings.queue, doorbells)
        await asyncio.sleep(3)  # many polls: without the window, 50 doorbells would start
        async with redis_at(settings.redis_url) as redis:
            started = await redis.exists(*(in_progress_key_prefix + d.job_id for d in doorbells))
    assert started == CLAIM_WINDOW
    rows = await db.wait_final(database_url, task_ids, timeout=60)
    assert {(r["status"], r["attempts"]) for r in rows} == {("completed", 1)}


# -- 4. Postgres connections dropped -------------------------------------------------------------


async def test_connection_dropped_during_claim(
    settings: Settings,
    database_url: str,
    conversation: Conversation,
    processes: list[WorkerProcess],
) -> None:
    start_process(processes, settings)
    task_id = await insert_undispatched(
        database_url, conversation.id, settings.queue, "t_count_runs", {}
    )
    async with TableLock(database_url):
        await ring(settings.redis_url, settings.queue, [Doorbell(task_id, 0)])
        # The claim blocks behind the lock; its connection is killed there, twice.
        await drop_connection_of(database_url, CLAIM_SQL, times=2)
    rows = await db.wait_final(database_url, [task_id])
    assert (rows[0]["status"], rows[0]["attempts"]) == ("completed", 1)
    assert await outcomes(database_url, task_id) == ["completed"]
    assert await run_marks(database_url) == {task_id: 1}
    await stop_and_check(database_url, processes)


async def test_a_worker_killed_between_taking_a_doorbell_and_claiming_its_task(
    settings: Settings,
    database_url: str,
    conversation: Conversation,
    processes: list[WorkerProcess],
) -> None:
    """A worker marks a doorbell in progress in Redis, then claims its task in Postgres. Killed
    in between, it leaves the task pending and the doorbell behind arq's in-progress key, which
    outlives any task (here six minutes): other workers skip it. The reconciler sees that
    nobody claimed the task and unblocks the doorbell."""
    victim = start_process(processes, settings)
    task_id = await insert_undispatched(
        database_url, conversation.id, settings.queue, "t_count_runs", {}
    )
    async with TableLock(database_url):
        await ring(settings.redis_url, settings.queue, [Doorbell(task_id, 0)])
        await db.eventually(
            lambda: waiting_on_lock(database_url, CLAIM_SQL), bool, what="the claim waiting"
        )
        victim.kill()
        # The server has not noticed yet: its backend would claim once the lock is gone.
        await drop_connection_of(database_url, CLAIM_SQL, times=1)
    assert (await db.task_row(database_url, task_id))["status"] == "pending"
    async with redis_at(settings.redis_url) as redis:
        blocked_for_ms = await redis.pttl(in_progress_key_prefix + Doorbell(task_id, 0).job_id)
    assert blocked_for_ms > 300_000
    # Its redispatch delay passes (insert_undispatched held it back an hour).
    await db.query(database_url, "UPDATE tasks SET dispatch_after = now() WHERE id = $1", task_id)

    survivor = start_process(processes, settings)
    rows = await db.wait_final(database_url, [task_id], timeout=30)
    assert (rows[0]["status"], rows[0]["attempts"]) == ("completed", 1)
    assert await run_marks(database_url) == {task_id: 1}
    logs = await stop_and_check(database_url, [survivor], task_ids=[task_id])
    assert '"doorbell.unblocked"' in logs


async def test_connection_dropped_during_heartbeat(
    settings: Settings,
    database_url: str,
    client: TaskClient,
    conversation: Conversation,
    processes: list[WorkerProcess],
) -> None:
    start_process(processes, settings)  # lease 3 s, a heartbeat every second
    task = await client.submit("t_marked_sleep", {"seconds": 3}, conversation_id=conversation.id)
    await db.eventually(lambda: db.marks(database_url, task.id, "started"), bool)
    async with TableLock(database_url):
        await drop_connection_of(database_url, HEARTBEAT_SQL, times=2)
    rows = await db.wait_final(database_url, [task.id])
    assert (rows[0]["status"], rows[0]["attempts"]) == ("completed", 1)
    assert await outcomes(database_url, task.id) == ["completed"]  # the lease was never lost
    logs = await stop_and_check(database_url, processes)
    assert "run.claim_lost" not in logs


async def test_connection_dropped_during_finish(
    settings: Settings,
    database_url: str,
    client: TaskClient,
    conversation: Conversation,
    processes: list[WorkerProcess],
) -> None:
    start_process(processes, settings)
    task = await client.submit("t_marked_sleep", {"seconds": 0.3}, conversation_id=conversation.id)
    await db.eventually(lambda: db.marks(database_url, task.id, "started"), bool)
    async with TableLock(database_url):
        await drop_connection_of(database_url, COMPLETE_SQL, times=2)
    rows = await db.wait_final(database_url, [task.id])
    assert (rows[0]["status"], rows[0]["attempts"]) == ("completed", 1)
    assert rows[0]["output"] == {"slept": 0.3, "attempt": 1}
    assert await outcomes(database_url, task.id) == ["completed"]
    assert len(await db.marks(database_url, task.id, "finished")) == 1
    await stop_and_check(database_url, processes)


async def test_many_short_tasks_while_worker_connections_keep_dropping(
    settings: Settings,
    database_url: str,
    client: TaskClient,
    conversation: Conversation,
    processes: list[WorkerProcess],
) -> None:
    settings = replace(settings, concurrency=10)
    for _ in range(2):
        start_process(processes, settings)
    rng = random.Random(4)
    tasks = await client.submit_many(
        [
            TaskSpec(
                "t_count_runs",
                {"seconds": rng.choice([0, 0.05, 0.2, 0.5])},
                conversation_id=conversation.id,
                max_attempts=5,
            )
            for _ in range(80)
        ]
    )
    ids = [t.id for t in tasks]
    terminated = 0
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        terminated += await terminate_worker_backends(database_url)
        unfinished = await db.value(
            database_url,
            "SELECT count(*) FROM tasks WHERE status NOT IN ('completed', 'failed', 'cancelled')",
        )
        if unfinished == 0:
            break
        await asyncio.sleep(rng.uniform(0.05, 0.3))
    assert terminated > 10
    rows = await db.wait_final(database_url, ids, timeout=60)
    assert {r["status"] for r in rows} == {"completed"}
    assert all(1 <= r["attempts"] <= 5 for r in rows)
    marks = await run_marks(database_url)
    assert all(marks.get(task_id, 0) >= 1 for task_id in ids)  # every handler ran
    await stop_and_check(database_url, processes, task_ids=ids)


async def test_a_connection_the_server_just_dropped_is_not_the_end_of_a_finish(
    settings: Settings,
    database_url: str,
    database: str,
    client: TaskClient,
    conversation: Conversation,
    proxy: PgProxy,
    processes: list[WorkerProcess],
) -> None:
    """The server's goodbye (FATAL, then end of stream) takes a moment to be read in full; a
    statement sent on the connection meanwhile fails inside asyncpg ("cannot switch to state
    12; another operation (2) is in progress"). The proxy stretches that moment to 2 s."""
    proxy.linger = 2.0
    # No heartbeat and no reconcile tick in the window: the completion is the first statement to
    # use a dropped connection.
    start_process(
        processes,
        replace(behind(proxy, settings, database), lease_seconds=30, reconcile_seconds=10),
    )
    task = await client.submit("t_marked_sleep", {"seconds": 0.5}, conversation_id=conversation.id)
    await db.eventually(lambda: db.marks(database_url, task.id, "started"), bool)
    assert await terminate_worker_backends(database_url) > 0  # all idle: the handler sleeps
    rows = await db.wait_final(database_url, [task.id], timeout=15)
    assert (rows[0]["status"], rows[0]["attempts"]) == ("completed", 1)
    assert await outcomes(database_url, task.id) == ["completed"]
    logs = await stop_and_check(database_url, processes)
    assert "finish.failed" not in logs


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    server = PrivatePostgres().start()
    yield server
    server.stop()


async def test_postgres_restarted_under_running_tasks(
    redis_url: str,
    queue: str,
    private_postgres: PrivatePostgres,
    processes: list[WorkerProcess],
) -> None:
    """The whole server restarts (fast shutdown: every session terminated, then a few moments
    of refusing connections) while handlers run and more tasks wait."""
    name = await asyncio.to_thread(databases.create_migrated_template, private_postgres.server_url)
    url = databases.url_for(name, private_postgres.server_url)
    settings = make_settings(url, redis_url, queue, concurrency=10)
    start_process(processes, settings)
    async with TaskClient.from_settings(settings) as client:
        conversation = await client.create_conversation(user_id="u", title="restart")
        running = await client.submit_many(
            [TaskSpec("sleep", {"seconds": 3}, conversation_id=conversation.id)] * 5
        )
        await db.eventually(
            lambda: db.value(url, "SELECT count(*) FROM tasks WHERE status = 'running'"),
            lambda n: n == 5,
            what="5 handlers running",
        )
        await asyncio.to_thread(private_postgres.restart)
        after = await client.submit_many(
            [TaskSpec("echo", {"i": i}, conversation_id=conversation.id) for i in range(20)]
        )
        ids = [t.id for t in running + after]
        rows = await db.wait_final(url, ids, timeout=60)
    assert {r["status"] for r in rows} == {"completed"}
    assert [r["output"] for r in rows if r["agent_id"] == "sleep"] == [{"slept": 3}] * 5
    await stop_and_check(url, processes, task_ids=ids)  # the worker lived through it


# -- 4. Around the commit: the answer lost, or followed at once by the server's goodbye ---------


async def test_ambiguous_claim_commit_runs_the_task_without_losing_an_attempt(
    settings: Settings,
    database_url: str,
    database: str,
    client: TaskClient,
    conversation: Conversation,
    proxy: PgProxy,
    processes: list[WorkerProcess],
) -> None:
    """The claim commits; the worker sees its connection die. Retried, a claim would find the
    task already running — under this very worker — and miss it."""
    start_process(processes, behind(proxy, settings, database))
    fired = proxy.drop_after_commit("candidates AS")  # the claim statement
    # One attempt only: a claim that committed but was not adopted would spend it, and the
    # task would fail by lease expiry without its handler ever running.
    task = await client.submit("t_count_runs", {}, conversation_id=conversation.id, max_attempts=1)
    assert await asyncio.to_thread(fired.wait, 20), "the claim never ran"
    rows = await db.wait_final(database_url, [task.id])
    assert (rows[0]["status"], rows[0]["attempts"]) == ("completed", 1), rows[0]["error"]
    assert await outcomes(database_url, task.id) == ["completed"]
    assert await run_marks(database_url) == {task.id: 1}
    await stop_and_check(database_url, processes)


@pytest.mark.parametrize("kind", ["root", "subtask"])
async def test_ambiguous_finish_commit_is_applied_once(
    kind: str,
    settings: Settings,
    database_url: str,
    database: str,
    client: TaskClient,
    conversation: Conversation,
    proxy: PgProxy,
    processes: list[WorkerProcess],
) -> None:
    """The completion commits (a root's one statement; a subtask's transaction that also
    resumes its parent); the worker sees its connection die and retries. The fenced retry
    changes nothing but recognises its own write (the run's history says `completed`), and
    nothing is lost: a parent resumed by the unanswered transaction is rung by the reconciler."""
    start_process(processes, behind(proxy, settings, database))
    fired = proxy.drop_after_commit("SET status = 'completed'")
    if kind == "root":
        task = await client.submit("t_count_runs", {}, conversation_id=conversation.id)
        expected: dict[str, Any] = {"attempt": 1}
    else:
        task = await client.submit("fanout", {"n": 2}, conversation_id=conversation.id)
        expected = {"sum": 1}
    assert await asyncio.to_thread(fired.wait, 20), "no completion ran"
    rows = await db.wait_final(database_url, [task.id])
    assert (rows[0]["status"], rows[0]["output"]) == ("completed", expected)
    everything = await db.query(database_url, "SELECT id, status, attempts FROM tasks")
    assert len(everything) == (1 if kind == "root" else 3)
    assert {(r["status"], r["attempts"]) for r in everything} == {("completed", 1)}
    history = await db.query(database_url, "SELECT outcome FROM task_attempts")
    assert {h["outcome"] for h in history} <= {"completed", "waiting"}  # nothing lost or rerun
    logs = await stop_and_check(database_url, processes)
    assert "run.discarded" not in logs  # it was not: it landed before the connection died


async def test_an_answer_followed_by_the_servers_goodbye_stands(
    settings: Settings,
    database_url: str,
    database: str,
    client: TaskClient,
    conversation: Conversation,
    proxy: PgProxy,
    processes: list[WorkerProcess],
) -> None:
    """The completion commits and is answered; the server drops the connection right after,
    before it is back in the pool. The answer must stand: not a failed finish (the
    lease would run out and the handler run again), nor a retry that finds its own write and
    calls the run discarded."""
    proxy.linger = 1.0
    start_process(processes, behind(proxy, settings, database))
    fired = proxy.terminate_after_answer("SET status = 'completed'")
    task = await client.submit("t_count_runs", {}, conversation_id=conversation.id, max_attempts=1)
    assert await asyncio.to_thread(fired.wait, 20), "the completion never ran"
    rows = await db.wait_final(database_url, [task.id])
    assert (rows[0]["status"], rows[0]["attempts"]) == ("completed", 1), rows[0]["error"]
    assert await outcomes(database_url, task.id) == ["completed"]
    assert await run_marks(database_url) == {task.id: 1}
    logs = await stop_and_check(database_url, processes)
    assert '"task.completed"' in logs
    assert "run.discarded" not in logs


async def test_a_claim_answered_then_dropped_runs_its_task(
    settings: Settings,
    database_url: str,
    database: str,
    client: TaskClient,
    conversation: Conversation,
    proxy: PgProxy,
    processes: list[WorkerProcess],
) -> None:
    proxy.linger = 1.0
    start_process(processes, behind(proxy, settings, database))
    fired = proxy.terminate_after_answer("candidates AS")
    task = await client.submit("t_count_runs", {}, conversation_id=conversation.id, max_attempts=1)
    assert await asyncio.to_thread(fired.wait, 20), "the claim never ran"
    rows = await db.wait_final(database_url, [task.id])
    assert (rows[0]["status"], rows[0]["attempts"]) == ("completed", 1), rows[0]["error"]
    assert await outcomes(database_url, task.id) == ["completed"]
    assert await run_marks(database_url) == {task.id: 1}
    logs = await stop_and_check(database_url, processes)
    assert "claim.failed" not in logs


# -- 8. Clock skew -------------------------------------------------------------------------------


# libfaketime, as the `faketime` command preloads it. The command itself forks and does not pass
# SIGTERM on to the worker (which would be orphaned), so the library is preloaded directly.
LIBFAKETIME = next(iter(sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1"))), None)


def skewed(offset: str) -> dict[str, str]:
    if LIBFAKETIME is None:
        missing("faketime (libfaketime)", "apt-get install faketime")
    return {"LD_PRELOAD": LIBFAKETIME, "FAKETIME": offset}


def started_at(process: WorkerProcess) -> datetime:
    """The worker's own clock when it logged its start."""
    for line in process.output().splitlines():
        if '"worker.started"' in line:
            return datetime.fromisoformat(json.loads(line)["timestamp"])
    raise AssertionError("no worker.started line")


async def test_workers_with_skewed_clocks_follow_the_database_clock(
    settings: Settings,
    database_url: str,
    client: TaskClient,
    conversation: Conversation,
    processes: list[WorkerProcess],
) -> None:
    settings = replace(settings, concurrency=4)
    ahead = start_process(processes, settings, extra_env=skewed("+5m"))
    assert started_at(ahead) > datetime.now(UTC) + timedelta(minutes=4)  # the skew is real

    # A task due in 3 s (database clock) whose doorbell rings at once, and only the worker five
    # minutes ahead to hear it: by its own clock the task is long due. It must wait.
    run_after = await db.value(database_url, "SELECT now()") + timedelta(seconds=3)
    scheduled = await client.submit(
        "t_count_runs", {}, conversation_id=conversation.id, run_after=run_after
    )
    await ring(settings.redis_url, settings.queue, [Doorbell(scheduled.id, 0)])
    ahead.wait_for_output("pending but not due")

    behind = start_process(processes, settings, extra_env=skewed("-5m"))
    assert started_at(behind) < datetime.now(UTC) - timedelta(minutes=4)
    # Some handlers outlive the 3 s lease: only heartbeats keep them, and a rescuer that read
    # its own clock would take them away early (or never).
    tasks = await client.submit_many(
        [
            TaskSpec("t_count_runs", {"seconds": s}, conversation_id=conversation.id)
            for s in [0.2, 0.5, 1.0, 4.0] * 4
        ]
    )
    ids = [t.id for t in tasks] + [scheduled.id]
    rows = await db.wait_final(database_url, ids, timeout=60)
    assert {(r["status"], r["attempts"]) for r in rows} == {("completed", 1)}
    assert await run_marks(database_url) == dict.fromkeys(ids, 1)
    history = await db.query(database_url, "SELECT outcome, worker_id FROM task_attempts")
    assert {h["outcome"] for h in history} == {"completed"}  # nothing rescued, nothing lost
    # Both skewed workers took tasks.
    assert {h["worker_id"] for h in history} == {worker_id(ahead), worker_id(behind)}
    # Not run early by a worker whose clock says it is already due.
    row = await db.task_row(database_url, scheduled.id)
    mark = (await db.marks(database_url, scheduled.id, "run"))[0]
    assert row["started_at"] >= run_after
    assert mark["at"] >= run_after
    logs = await stop_and_check(database_url, processes, task_ids=ids)
    assert "run.claim_lost" not in logs
    assert "task.rescued" not in logs


# -- 9. Pool pressure ----------------------------------------------------------------------------


@pytest.mark.parametrize("pool_size", [1, 2])
async def test_a_tiny_pool_under_full_concurrency_loses_no_lease(
    pool_size: int,
    settings: Settings,
    database_url: str,
    client: TaskClient,
    conversation: Conversation,
    processes: list[WorkerProcess],
) -> None:
    start_process(processes, replace(settings, db_pool_size=pool_size, concurrency=20))
    rng = random.Random(pool_size)

    def spec(i: int) -> TaskSpec:
        if i % 20 == 0:  # outlives the 3 s lease: its heartbeats must get through the crowd
            return TaskSpec("sleep", {"seconds": 4.0}, conversation_id=conversation.id)
        if i % 3 == 0:
            seconds = rng.choice([0.1, 0.3, 0.8])
            return TaskSpec("sleep", {"seconds": seconds}, conversation_id=conversation.id)
        return TaskSpec("echo", {"i": i}, conversation_id=conversation.id)

    specs = [spec(i) for i in range(200)]
    tasks = await client.submit_many(specs)
    ids = [t.id for t in tasks]
    rows = await db.wait_final(database_url, ids, timeout=90)
    assert {(r["status"], r["attempts"]) for r in rows} == {("completed", 1)}
    lost = await db.value(database_url, "SELECT count(*) FROM task_attempts WHERE outcome = 'lost'")
    assert lost == 0
    logs = await stop_and_check(database_url, processes, task_ids=ids)
    assert "run.claim_lost" not in logs
    assert "task.rescued" not in logs
