"""The reconciler's steps on real Postgres and Redis, one tick at a time: each step runs and
fails on its own, a set-based statement that hits one bad row goes row by row, and a step that
keeps failing keeps saying so."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any
from uuid import UUID

import pytest
from redis.asyncio import Redis

from domain.entities import Conversation
from persistence.lifecycle import Lifecycle
from tests.support import db
from tests.support.lifecycles import pooled_lifecycle
from worker.client import TaskClient
from worker.config import Settings
from worker.dispatch import Dispatcher
from worker.reconciler import Reconciler


class Log:
    """Records what the reconciler logs, by event name."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, dict[str, Any]]] = []

    def _record(self, event: str, **fields: Any) -> None:
        self.lines.append((event, fields))

    error = warning = info = debug = _record

    def events(self, name: str) -> list[dict[str, Any]]:
        return [fields for event, fields in self.lines if event == name]


@pytest.fixture
async def lifecycle(database_url: str, settings: Settings) -> AsyncIterator[Lifecycle]:
    async with pooled_lifecycle(
        database_url, worker_id="reconcile-test", queue=settings.queue
    ) as lifecycle:
        yield lifecycle


@pytest.fixture
async def reconciler(
    lifecycle: Lifecycle, settings: Settings, redis_url: str
) -> AsyncIterator[tuple[Reconciler, Log]]:
    redis = Redis.from_url(redis_url)
    log = Log()
    yield (
        Reconciler(
            lifecycle=lifecycle,
            dispatcher=Dispatcher(redis, settings.queue),
            settings=settings,
            agents=["echo"],
            log=log,
        ),
        log,
    )
    await redis.aclose()


async def running_with_expired_lease(
    database_url: str, client: TaskClient, conversation: Conversation, **columns: Any
) -> UUID:
    """A task some worker claimed and then lost (its lease back-dated), as the rescuer finds it."""
    task = await client.submit("echo", {}, conversation_id=conversation.id)
    sets = ", ".join(f"{name} = ${i + 2}" for i, name in enumerate(columns))
    await db.query(
        database_url,
        "UPDATE tasks SET status = 'running', runs = runs + 1, worker_id = 'gone',"
        " lease_expires_at = now() - interval '1 minute'"
        + (f", {sets}" if sets else "")
        + " WHERE id = $1",
        task.id,
        *columns.values(),
    )
    return task.id


async def test_a_huge_attempt_count_is_rescued_like_any_other(
    reconciler: tuple[Reconciler, Log],
    client: TaskClient,
    conversation: Conversation,
    database_url: str,
) -> None:
    """The backoff's exponent is capped in SQL as in Python: attempts 1500 of 10000 no longer
    overflow float8 and fail the whole rescue statement for every expired task."""
    big = await running_with_expired_lease(
        database_url, client, conversation, attempts=1500, max_attempts=10000
    )
    plain = await running_with_expired_lease(database_url, client, conversation, attempts=1)
    rec, log = reconciler
    await rec.tick()
    rows = {r["id"]: r for r in await db.query(database_url, "SELECT * FROM tasks")}
    assert (rows[big]["status"], rows[plain]["status"]) == ("pending", "pending")
    assert log.events("reconcile.step_failed") == []


async def test_one_bad_row_does_not_stop_the_rescue_of_the_others(
    reconciler: tuple[Reconciler, Log],
    client: TaskClient,
    conversation: Conversation,
    database_url: str,
) -> None:
    poison = await running_with_expired_lease(database_url, client, conversation)
    others = [
        await running_with_expired_lease(database_url, client, conversation) for _ in range(3)
    ]
    # A row Postgres refuses to change (a trigger here; a CHECK or a data error in real life).
    await db.query(
        database_url,
        "CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$"
        " BEGIN RAISE EXCEPTION 'poison row'; END $$",
    )
    await db.query(
        database_url,
        "CREATE TRIGGER refuse_poison BEFORE UPDATE ON tasks FOR EACH ROW"
        f" WHEN (OLD.id = '{poison}') EXECUTE FUNCTION refuse_poison()",
    )
    rec, _ = reconciler
    await rec.tick()
    rows = {r["id"]: r["status"] for r in await db.query(database_url, "SELECT * FROM tasks")}
    assert rows == {poison: "running", **dict.fromkeys(others, "pending")}


async def test_steps_fail_on_their_own_and_keep_saying_so(
    reconciler: tuple[Reconciler, Log],
    client: TaskClient,
    conversation: Conversation,
    database_url: str,
    settings: Settings,
) -> None:
    """Redis away: the dispatch step fails, the rescue still runs; the failure is logged when it
    starts, again once a minute, and its recovery too."""
    rec, log = reconciler
    expired = await running_with_expired_lease(database_url, client, conversation)
    dead = Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
    good = rec.dispatcher
    rec.dispatcher = Dispatcher(dead, settings.queue)
    clock = [1000.0]
    rec.clock = lambda: clock[0]
    try:
        await rec.tick()
        clock[0] += 30
        await rec.tick()  # still failing, but logged a minute apart at most
        clock[0] += 31
        await rec.tick()
    finally:
        await dead.aclose()
    assert (await db.task_row(database_url, expired))["status"] == "pending"  # rescued anyway
    failures = [f for f in log.events("reconcile.step_failed") if f["step"] == "dispatch"]
    assert [f["failures"] for f in failures] == [1, 3]
    rec.dispatcher = good
    await rec.tick()
    # (The rescue step failed too: it takes a rescued run's doorbell off the queue in Redis.)
    assert "dispatch" in [f["step"] for f in log.events("reconcile.step_recovered")]


async def test_dispatch_marks_commits_then_rings_and_unmarks_what_it_could_not_ring(
    reconciler: tuple[Reconciler, Log],
    database_url: str,
    conversation: Conversation,
    settings: Settings,
    redis_url: str,
) -> None:
    rec, _ = reconciler
    await db.query(
        database_url,
        "INSERT INTO tasks (conversation_id, agent_id, queue) VALUES ($1, 'echo', $2)",
        conversation.id,
        settings.queue,
    )
    dead = Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
    good, rec.dispatcher = rec.dispatcher, Dispatcher(dead, settings.queue)
    try:
        with pytest.raises(Exception, match="Connect"):
            await _dispatch_ignoring_queue(rec)
    finally:
        await dead.aclose()
    [row] = await db.query(database_url, "SELECT dispatch_after <= now() AS due FROM tasks")
    assert row["due"]  # taken back: the next tick rings it, no redispatch interval to wait out
    rec.dispatcher = good
    assert await rec.dispatch() == 1
    [row] = await db.query(database_url, "SELECT dispatch_after > now() AS marked FROM tasks")
    assert row["marked"]
    client = Redis.from_url(redis_url)
    try:
        assert await client.zcard(settings.queue) == 1
    finally:
        await client.aclose()


async def _dispatch_ignoring_queue(rec: Reconciler) -> None:
    """The dispatch step past its backpressure check (which asks Redis first)."""
    doorbells = await rec.lifecycle.mark_due_dispatched(queue=rec.settings.queue, limit=10)
    assert doorbells
    await rec._ring_due(doorbells)


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return replace(settings, reconcile_seconds=1.0)
