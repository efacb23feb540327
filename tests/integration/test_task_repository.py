"""Every `TaskRepository` method against real PostgreSQL (a fresh database per test)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any
from uuid import UUID, uuid4

import pytest
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from domain.entities import Conversation, Task
from domain.exceptions import (
    ConcurrentUpdateError,
    EntityAlreadyExistsError,
    EntityNotFoundError,
    InvalidFilterError,
    InvalidInputError,
    TaskNotEditableError,
)
from domain.value_objects import AttemptOutcome, TaskStatus
from persistence.session import UnitOfWork

# -- helpers ------------------------------------------------------------------------------------


@pytest.fixture
async def conv(uow: UnitOfWork) -> Conversation:
    async with uow:
        created = await uow.conversations.create(Conversation(user_id="u1", title="t"))
        await uow.commit()
    return created


def make(conv: Conversation, agent_id: str = "echo", **kwargs: Any) -> Task:
    return Task(conversation_id=conv.id, agent_id=agent_id, **kwargs)


async def insert(uow: UnitOfWork, *tasks: Task) -> list[Task]:
    async with uow:
        created = await uow.tasks.create_many(tasks)
        await uow.commit()
    return created


async def run_sql(uow: UnitOfWork, statement: str, **params: Any) -> None:
    async with uow:
        await uow.session.execute(text(statement), params)
        await uow.commit()


async def set_created(uow: UnitOfWork, ages: dict[UUID, float]) -> None:
    """Back-date tasks' created_at by `ages[id]` seconds, all from the same now()."""
    async with uow:
        for task_id, seconds in ages.items():
            await uow.session.execute(
                text(
                    "UPDATE tasks SET created_at = now() - make_interval(secs => :s) WHERE id = :id"
                ),
                {"s": float(seconds), "id": task_id},
            )
        await uow.commit()


async def set_finished(
    uow: UnitOfWork, task_id: UUID, status: TaskStatus, days_ago: float = 0
) -> None:
    await run_sql(
        uow,
        "UPDATE tasks SET status = :status, completed_at = now() - make_interval(days => :d)"
        " WHERE id = :id",
        status=status.value,
        d=int(days_ago),
        id=task_id,
    )


async def fetch(uow: UnitOfWork, task_id: UUID) -> Task:
    async with uow:
        task = await uow.tasks.get_by_id(task_id)
    assert task is not None
    return task


@contextmanager
def statements(engine: AsyncEngine) -> Iterator[list[str]]:
    """Every SQL statement sent through `engine` inside the block."""
    sent: list[str] = []

    def on_execute(*args: Any) -> None:
        sent.append(args[2])

    event.listen(engine.sync_engine, "before_cursor_execute", on_execute)
    try:
        yield sent
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", on_execute)


async def wait_until_a_backend_waits_for_a_lock(engine: AsyncEngine, timeout: float = 10) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    async with engine.connect() as conn:
        while True:
            waiting = (
                await conn.execute(
                    text(
                        "SELECT count(*) FROM pg_stat_activity"
                        " WHERE datname = current_database() AND wait_event_type = 'Lock'"
                    )
                )
            ).scalar_one()
            await conn.rollback()  # pg_stat_activity is a per-transaction snapshot
            if waiting:
                return
            assert asyncio.get_running_loop().time() < deadline, "nobody waited for the lock"
            await asyncio.sleep(0.01)


# -- create -------------------------------------------------------------------------------------


async def test_create_returns_the_stored_row_with_server_values(
    uow: UnitOfWork, conv: Conversation
) -> None:
    task = make(conv, input={"x": 1}, metadata={"m": "v"}, max_attempts=5, idempotency_key="k1")
    async with uow:
        created = await uow.tasks.create(task)
        await uow.commit()
    assert created.id == task.id
    assert created.status is TaskStatus.PENDING
    assert (created.input, created.metadata) == ({"x": 1}, {"m": "v"})
    assert (created.attempts, created.max_attempts, created.runs, created.version) == (0, 5, 0, 1)
    assert created.created_at is not None
    assert created.run_after == created.created_at  # due at once, by the database clock
    assert created.updated_at == created.created_at
    assert created.idempotency_key == "k1"
    assert await fetch(uow, task.id) == created


async def test_create_keeps_json_values_of_every_kind(uow: UnitOfWork, conv: Conversation) -> None:
    values: list[Any] = [None, 0, 1.5, "text", [1, "two"], {"nested": {"list": [True, None]}}]
    created = await insert(uow, *[make(conv, input=v) for v in values])
    assert [t.input for t in created] == values
    assert [(await fetch(uow, t.id)).input for t in created] == values


async def test_create_many_is_one_statement_and_keeps_the_order(
    uow: UnitOfWork, conv: Conversation, engine: AsyncEngine
) -> None:
    tasks = [make(conv, "square", input={"x": i}) for i in range(50)]
    async with uow:
        with statements(engine) as sent:
            created = await uow.tasks.create_many(tasks)
        await uow.commit()
    assert len(sent) == 1
    assert sent[0].lstrip().startswith("INSERT INTO tasks")
    assert [t.id for t in created] == [t.id for t in tasks]
    assert [t.input for t in created] == [{"x": i} for i in range(50)]
    async with uow:
        page = await uow.tasks.find_paginated(filters={"agent_id": "square"})
    assert page.total == 50


async def test_create_many_of_nothing_sends_nothing(uow: UnitOfWork, engine: AsyncEngine) -> None:
    async with uow:
        with statements(engine) as sent:
            assert await uow.tasks.create_many([]) == []
    assert sent == []


async def test_unknown_conversation_is_not_found_naming_it(uow: UnitOfWork) -> None:
    missing = uuid4()
    async with uow:
        with pytest.raises(EntityNotFoundError) as info:
            await uow.tasks.create(Task(conversation_id=missing, agent_id="echo"))
    err = info.value
    assert err.entity == "Conversation"
    assert err.entity_id == str(missing)
    assert str(missing) in str(err)
    assert "already exists" not in str(err)
    assert isinstance(err.__cause__, Exception)  # the driver error stays chained


async def test_unknown_parent_is_not_found_naming_it(uow: UnitOfWork, conv: Conversation) -> None:
    missing = uuid4()
    async with uow:
        with pytest.raises(EntityNotFoundError, match=f"Task {missing} not found"):
            await uow.tasks.create(make(conv, parent_task_id=missing))


async def test_duplicate_idempotency_key_already_exists(
    uow: UnitOfWork, conv: Conversation
) -> None:
    await insert(uow, make(conv, idempotency_key="same"))
    async with uow:
        with pytest.raises(EntityAlreadyExistsError, match="idempotency_key='same'"):
            await uow.tasks.create(make(conv, idempotency_key="same"))
    async with uow:
        with pytest.raises(EntityAlreadyExistsError):
            await uow.tasks.create_many(
                [make(conv, idempotency_key="twice"), make(conv, idempotency_key="twice")]
            )
    async with uow:
        assert (await uow.tasks.find_paginated()).total == 1


async def test_duplicate_id_already_exists(uow: UnitOfWork, conv: Conversation) -> None:
    [task] = await insert(uow, make(conv))
    async with uow:
        with pytest.raises(EntityAlreadyExistsError, match=str(task.id)):
            await uow.tasks.create(make(conv, id=task.id))


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"bad": "\x00"}, "NUL character"),
        ({"big": "x" * 100}, "over the limit of 64 bytes"),
        ({"nan": float("nan")}, "not valid JSON"),
    ],
    ids=["nul", "too-big", "nan"],
)
async def test_bad_input_is_refused_before_any_sql(
    uow: UnitOfWork, conv: Conversation, engine: AsyncEngine, payload: Any, message: str
) -> None:
    async with uow:
        with statements(engine) as sent, pytest.raises(InvalidInputError, match=message):
            await uow.tasks.create_many([make(conv, input=payload)], max_input_bytes=64)
    assert sent == []


async def test_create_many_skipping_taken_keys_leaves_them_out(
    uow: UnitOfWork, conv: Conversation
) -> None:
    [existing] = await insert(uow, make(conv, idempotency_key="taken"))
    fresh, again = make(conv, idempotency_key="fresh"), make(conv, idempotency_key="taken")
    plain = make(conv)
    async with uow:
        created = await uow.tasks.create_many([fresh, again, plain], skip_taken_keys=True)
        await uow.commit()
    assert [t.id for t in created] == [fresh.id, plain.id]
    async with uow:
        assert await uow.tasks.get_by_idempotency_keys(["taken"]) == {"taken": existing}
        assert await uow.tasks.get_by_id(again.id) is None


async def test_create_many_dispatch_delays(uow: UnitOfWork, conv: Conversation) -> None:
    now_due, later = make(conv), make(conv)
    async with uow:
        await uow.tasks.create_many([now_due, later], dispatch_delays=[0, 60])
        rows = (
            await uow.session.execute(
                text("SELECT id, dispatch_after - created_at AS d FROM tasks")
            )
        ).all()
        await uow.commit()
    delays = {row.id: row.d for row in rows}
    assert delays == {now_due.id: timedelta(0), later.id: timedelta(seconds=60)}


async def test_create_many_needs_one_dispatch_delay_per_task(
    uow: UnitOfWork, conv: Conversation, engine: AsyncEngine
) -> None:
    async with uow:
        with statements(engine) as sent, pytest.raises(ValueError, match="2 tasks, 1 dispatch"):
            await uow.tasks.create_many([make(conv), make(conv)], dispatch_delays=[0.0])
    assert sent == []


# -- read ---------------------------------------------------------------------------------------


async def test_get_by_id_and_by_idempotency_keys(uow: UnitOfWork, conv: Conversation) -> None:
    a, b = await insert(uow, make(conv, idempotency_key="ka"), make(conv))
    async with uow:
        assert await uow.tasks.get_by_id(a.id) == a
        assert await uow.tasks.get_by_id(uuid4()) is None
        assert await uow.tasks.get_by_idempotency_keys(["ka", "nope"]) == {"ka": a}
        assert await uow.tasks.get_by_idempotency_keys([]) == {}
        assert (await uow.tasks.get_by_id(b.id)) == b


async def test_lookups_by_many_keys_return_every_match(uow: UnitOfWork, conv: Conversation) -> None:
    tasks = await insert(uow, *[make(conv, idempotency_key=f"k{i}") for i in range(1500)])
    ids = [t.id for t in tasks]
    keys = [f"k{i}" for i in range(1500)]
    async with uow:
        by_key = await uow.tasks.get_by_idempotency_keys([*keys, "k0", "unknown"])
    assert {k: t.id for k, t in by_key.items()} == dict(zip(keys, ids, strict=True))


# -- update (optimistic) ------------------------------------------------------------------------


async def test_update_writes_an_operators_edit_and_bumps_the_version(
    uow: UnitOfWork, conv: Conversation
) -> None:
    [task] = await insert(uow, make(conv, max_attempts=3))
    later = task.created_at + timedelta(hours=1) if task.created_at else None
    task.metadata = {"note": "by update"}
    task.max_attempts = 5
    task.run_after = later
    task.status = TaskStatus.COMPLETED  # a lifecycle column: `update` never writes it
    task.attempts = 2
    async with uow:
        updated = await uow.tasks.update(task)
        await uow.commit()
    assert updated.version == 2
    assert (updated.status, updated.attempts) == (TaskStatus.PENDING, 0)
    assert (updated.metadata, updated.max_attempts, updated.run_after) == (
        {"note": "by update"},
        5,
        later,
    )
    assert updated.updated_at is not None
    assert task.created_at is not None
    assert updated.updated_at >= task.created_at
    assert await fetch(uow, task.id) == updated


async def test_update_of_a_stale_copy_is_a_concurrent_update(
    uow: UnitOfWork, conv: Conversation
) -> None:
    [task] = await insert(uow, make(conv))
    stale = await fetch(uow, task.id)
    fresh = await fetch(uow, task.id)
    fresh.metadata = {"first": True}
    async with uow:
        await uow.tasks.update(fresh)
        await uow.commit()
    stale.metadata = {"second": True}
    async with uow:
        with pytest.raises(ConcurrentUpdateError, match="expected version 1") as info:
            await uow.tasks.update(stale)
    assert info.value.entity_id == task.id
    assert (await fetch(uow, task.id)).metadata == {"first": True}


async def test_two_sessions_update_the_same_task_exactly_one_wins(
    session_factory: async_sessionmaker[AsyncSession],
    engine: AsyncEngine,
    uow: UnitOfWork,
    conv: Conversation,
) -> None:
    [task] = await insert(uow, make(conv))
    first, second = UnitOfWork(session_factory), UnitOfWork(session_factory)
    async with first, second:
        mine = await first.tasks.get_by_id(task.id)
        theirs = await second.tasks.get_by_id(task.id)
        assert mine is not None
        assert theirs is not None
        mine.metadata = {"by": "first"}
        theirs.metadata = {"by": "second"}
        await first.tasks.update(mine)  # holds the row lock until `first` commits
        blocked = asyncio.create_task(second.tasks.update(theirs))
        await wait_until_a_backend_waits_for_a_lock(engine)
        assert not blocked.done()
        await first.commit()
        with pytest.raises(ConcurrentUpdateError):
            await asyncio.wait_for(blocked, 10)
    final = await fetch(uow, task.id)
    assert final.metadata == {"by": "first"}
    assert final.version == 2


async def test_racing_updates_exactly_one_wins(
    session_factory: async_sessionmaker[AsyncSession], uow: UnitOfWork, conv: Conversation
) -> None:
    [task] = await insert(uow, make(conv))
    both_read = asyncio.Barrier(2)

    async def writer(name: str) -> str:
        async with UnitOfWork(session_factory) as mine:
            copy = await mine.tasks.get_by_id(task.id)
            assert copy is not None
            await both_read.wait()
            copy.metadata = {"by": name}
            await mine.tasks.update(copy)
            await mine.commit()
        return name

    results = await asyncio.wait_for(
        asyncio.gather(writer("a"), writer("b"), return_exceptions=True), 20
    )
    winners = [r for r in results if isinstance(r, str)]
    losers = [r for r in results if isinstance(r, ConcurrentUpdateError)]
    assert (len(winners), len(losers)) == (1, 1), results
    final = await fetch(uow, task.id)
    assert final.metadata == {"by": winners[0]}
    assert final.version == 2


@pytest.mark.parametrize("status", [TaskStatus.COMPLETED, TaskStatus.CANCELLED, TaskStatus.FAILED])
async def test_update_refuses_a_task_that_is_not_pending(
    uow: UnitOfWork, conv: Conversation, status: TaskStatus
) -> None:
    [task] = await insert(uow, make(conv))
    await set_finished(uow, task.id, status)
    stored = await fetch(uow, task.id)
    stored.metadata = {"too": "late"}
    async with uow:
        with pytest.raises(TaskNotEditableError, match=f"is {status.value}") as info:
            await uow.tasks.update(stored)
    assert info.value.task_id == task.id
    assert (await fetch(uow, task.id)).metadata == {}


async def test_update_refuses_max_attempts_below_the_attempts_used(
    uow: UnitOfWork, conv: Conversation, engine: AsyncEngine
) -> None:
    [task] = await insert(uow, make(conv))
    await run_sql(uow, "UPDATE tasks SET attempts = 2 WHERE id = :id", id=task.id)
    stored = await fetch(uow, task.id)
    stored.max_attempts = 1
    async with uow:
        with statements(engine) as sent, pytest.raises(InvalidInputError, match="below the 2"):
            await uow.tasks.update(stored)
    assert sent == []


async def test_update_of_a_deleted_task_is_not_found(uow: UnitOfWork, conv: Conversation) -> None:
    [task] = await insert(uow, make(conv))
    await run_sql(uow, "DELETE FROM tasks WHERE id = :id", id=task.id)
    async with uow:
        with pytest.raises(EntityNotFoundError, match=f"Task {task.id} not found"):
            await uow.tasks.update(task)


async def test_update_refuses_a_bad_payload_before_any_sql(
    uow: UnitOfWork, conv: Conversation, engine: AsyncEngine
) -> None:
    [task] = await insert(uow, make(conv))
    task.metadata = {"s": "nul \x00"}
    async with uow:
        with statements(engine) as sent, pytest.raises(InvalidInputError, match="metadata"):
            await uow.tasks.update(task)
    assert sent == []


# -- find_pending_for_agent ---------------------------------------------------------------------


async def test_find_pending_for_agent_due_only_oldest_first_with_limit(
    uow: UnitOfWork, conv: Conversation
) -> None:
    due = [make(conv) for _ in range(4)]
    later = make(conv)
    other_agent = make(conv, "other")
    running = make(conv)
    await insert(uow, *due, later, other_agent, running)
    # Oldest due first, whatever the ids say.
    ages = {t.id: age for t, age in zip(due, [10, 40, 20, 30], strict=True)}
    for task_id, age in ages.items():
        await run_sql(
            uow,
            "UPDATE tasks SET run_after = now() - make_interval(secs => :s) WHERE id = :id",
            s=float(age),
            id=task_id,
        )
    await run_sql(
        uow, "UPDATE tasks SET run_after = now() + interval '1 hour' WHERE id = :id", id=later.id
    )
    await run_sql(uow, "UPDATE tasks SET status = 'running' WHERE id = :id", id=running.id)
    oldest_first = sorted(ages, key=lambda i: -ages[i])
    async with uow:
        found = await uow.tasks.find_pending_for_agent("echo")
        assert [t.id for t in found] == oldest_first
        limited = await uow.tasks.find_pending_for_agent("echo", limit=2)
        assert [t.id for t in limited] == oldest_first[:2]
        assert await uow.tasks.find_pending_for_agent("nobody") == []


async def test_find_pending_breaks_due_time_ties_by_id(uow: UnitOfWork, conv: Conversation) -> None:
    tasks = await insert(uow, *[make(conv) for _ in range(5)])  # one transaction: one now()
    assert len({t.run_after for t in tasks}) == 1
    async with uow:
        found = await uow.tasks.find_pending_for_agent("echo")
    assert [t.id for t in found] == sorted(t.id for t in tasks)


async def test_skip_locked_never_hands_the_same_task_to_two_transactions(
    session_factory: async_sessionmaker[AsyncSession], uow: UnitOfWork, conv: Conversation
) -> None:
    tasks = await insert(uow, *[make(conv) for _ in range(10)])
    first_holds_locks = asyncio.Event()
    second_done = asyncio.Event()

    async def first() -> tuple[list[Task], list[Task]]:
        async with UnitOfWork(session_factory) as mine:
            claimed = await mine.tasks.find_pending_for_agent("echo", limit=4, skip_locked=True)
            first_holds_locks.set()
            await second_done.wait()  # the transaction stays open while the second one looks
            return claimed, await mine.tasks.find_pending_for_agent("echo", limit=100)

    async def second() -> tuple[list[Task], list[Task]]:
        try:
            await first_holds_locks.wait()
            async with UnitOfWork(session_factory) as mine:
                claimed = await mine.tasks.find_pending_for_agent(
                    "echo", limit=10, skip_locked=True
                )
                plain = await mine.tasks.find_pending_for_agent("echo", limit=100)
            return claimed, plain
        finally:
            second_done.set()

    (a, _), (b, plain) = await asyncio.wait_for(asyncio.gather(first(), second()), 20)
    assert len(a) == 4
    assert len(b) == 6
    assert {t.id for t in a}.isdisjoint({t.id for t in b})
    assert {t.id for t in a} | {t.id for t in b} == {t.id for t in tasks}
    assert len(plain) == 10  # without locking, reads see every task: the locks made the split


async def test_concurrent_claimers_split_the_work(
    session_factory: async_sessionmaker[AsyncSession], uow: UnitOfWork, conv: Conversation
) -> None:
    tasks = await insert(uow, *[make(conv) for _ in range(20)])
    all_claimed = asyncio.Barrier(2)

    async def claimer() -> set[UUID]:
        async with UnitOfWork(session_factory) as mine:
            claimed = await mine.tasks.find_pending_for_agent("echo", limit=10, skip_locked=True)
            await all_claimed.wait()  # nobody lets go of its locks before both have claimed
            return {t.id for t in claimed}

    a, b = await asyncio.wait_for(asyncio.gather(claimer(), claimer()), 20)
    assert a.isdisjoint(b)
    assert a | b == {t.id for t in tasks}


# -- subtasks -----------------------------------------------------------------------------------


async def test_get_subtasks_in_creation_order_ties_by_id(
    uow: UnitOfWork, conv: Conversation
) -> None:
    [parent] = await insert(uow, make(conv, "fanout"))
    children = await insert(uow, *[make(conv, parent_task_id=parent.id) for _ in range(4)])
    [unrelated] = await insert(uow, make(conv))
    oldest, *same_age = children
    await set_created(uow, {oldest.id: 60, **{c.id: 10 for c in same_age}})
    async with uow:
        found = await uow.tasks.get_subtasks(parent.id)
        assert await uow.tasks.get_subtasks(unrelated.id) == []
    assert [t.id for t in found] == [oldest.id, *sorted(c.id for c in same_age)]
    assert all(t.parent_task_id == parent.id for t in found)


# -- search and pagination ----------------------------------------------------------------------


async def test_search_by_fields_newest_first(uow: UnitOfWork, conv: Conversation) -> None:
    async with uow:
        other_conv = await uow.conversations.create(Conversation(user_id="u2"))
        await uow.commit()
    t1, t2, t3, t4 = await insert(
        uow, make(conv), make(conv, "other"), make(conv), make(other_conv, "echo")
    )
    await set_created(uow, {t.id: 100 - i for i, t in enumerate([t1, t2, t3, t4])})  # t4 newest
    await set_finished(uow, t3.id, TaskStatus.COMPLETED)
    async with uow:
        ids = lambda ts: [t.id for t in ts]  # noqa: E731
        assert ids(await uow.tasks.search()) == [t4.id, t3.id, t2.id, t1.id]
        assert ids(await uow.tasks.search(conversation_id=conv.id)) == [t3.id, t2.id, t1.id]
        assert ids(await uow.tasks.search(agent_id="echo")) == [t4.id, t3.id, t1.id]
        assert ids(await uow.tasks.search(status=TaskStatus.COMPLETED)) == [t3.id]
        assert ids(await uow.tasks.search(conversation_id=conv.id, agent_id="echo")) == [
            t3.id,
            t1.id,
        ]
        assert ids(await uow.tasks.search(limit=2)) == [t4.id, t3.id]
        assert await uow.tasks.search(agent_id="nobody") == []


async def test_search_text_treats_percent_and_underscore_literally(
    uow: UnitOfWork, conv: Conversation
) -> None:
    pct, no_pct, under, x = await insert(
        uow,
        make(conv, input={"q": "100% Sure"}),
        make(conv, input={"q": "1000 sure"}),
        make(conv, input={"q": "a_b"}),
        make(conv, input={"q": "axb"}),
    )
    async with uow:
        assert [t.id for t in await uow.tasks.search(text="100%")] == [pct.id]
        assert [t.id for t in await uow.tasks.search(text="a_b")] == [under.id]
        assert {t.id for t in await uow.tasks.search(text="SURE")} == {pct.id, no_pct.id}
        assert [t.id for t in await uow.tasks.search(text="axb")] == [x.id]
        assert await uow.tasks.search(text="%%") == []
        assert [t.id for t in await uow.tasks.search(text="_")] == [under.id]


async def test_find_paginated_items_and_total(uow: UnitOfWork, conv: Conversation) -> None:
    tasks = await insert(uow, *[make(conv, input={"i": i}) for i in range(7)])
    await insert(uow, make(conv, "other"))
    await set_created(uow, {t.id: 100 - i for i, t in enumerate(tasks)})  # tasks[6] newest
    newest_first = [t.id for t in reversed(tasks)]
    async with uow:
        pages = [
            await uow.tasks.find_paginated(page=p, page_size=3, filters={"agent_id": "echo"})
            for p in (1, 2, 3, 4)
        ]
        everything = await uow.tasks.find_paginated()
    assert [p.total for p in pages] == [7, 7, 7, 7]
    assert [[t.id for t in p.items] for p in pages] == [
        newest_first[0:3],
        newest_first[3:6],
        newest_first[6:7],
        [],
    ]
    assert (pages[1].page, pages[1].page_size) == (2, 3)
    assert everything.total == 8


async def test_find_paginated_filters(uow: UnitOfWork, conv: Conversation) -> None:
    [parent] = await insert(uow, make(conv))
    c1, c2 = await insert(
        uow, make(conv, parent_task_id=parent.id), make(conv, parent_task_id=parent.id)
    )
    await set_finished(uow, c2.id, TaskStatus.FAILED)
    async with uow:
        roots = await uow.tasks.find_paginated(filters={"parent_task_id": None})
        children = await uow.tasks.find_paginated(filters={"parent_task_id": str(parent.id)})
        some = await uow.tasks.find_paginated(filters={"id": [c1.id, str(c2.id)]})
        failed = await uow.tasks.find_paginated(filters={"status": TaskStatus.FAILED})
        by_attempts = await uow.tasks.find_paginated(filters={"attempts": 0})
    assert [t.id for t in roots.items] == [parent.id]
    assert {t.id for t in children.items} == {c1.id, c2.id}
    assert {t.id for t in some.items} == {c1.id, c2.id}
    assert [t.id for t in failed.items] == [c2.id]
    assert by_attempts.total == 3


@pytest.mark.parametrize(
    "filters",
    [{"input": {"x": 1}}, {"__class__": "x"}, {"metadata_": {}}, {"status; DROP TABLE": 1}],
    ids=["not-allow-listed", "dunder", "attribute-name", "injection"],
)
async def test_unknown_filter_field_is_refused_without_sql(
    uow: UnitOfWork, engine: AsyncEngine, filters: dict[str, Any]
) -> None:
    async with uow:
        with statements(engine) as sent, pytest.raises(InvalidFilterError) as info:
            await uow.tasks.find_paginated(filters=filters)
    assert sent == []
    field = next(iter(filters))
    assert info.value.field == field
    assert f"cannot filter Task by {field!r}" in str(info.value)
    assert "agent_id" in info.value.allowed


@pytest.mark.parametrize(
    ("filters", "message"),
    [
        ({"id": "not-a-uuid"}, "id must be a UUID, got 'not-a-uuid'"),
        ({"conversation_id": ["x"]}, "conversation_id must be a UUID"),
        ({"attempts": "many"}, "attempts must be an integer, got 'many'"),
    ],
    ids=["uuid", "uuid-list", "integer"],
)
async def test_bad_filter_values_are_clear_input_errors_without_sql(
    uow: UnitOfWork, engine: AsyncEngine, filters: dict[str, Any], message: str
) -> None:
    async with uow:
        with statements(engine) as sent, pytest.raises(InvalidInputError) as info:
            await uow.tasks.find_paginated(filters=filters)
    assert sent == []
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("page", "page_size", "message"),
    [(0, 10, "page must be at least 1"), (1, 0, "limit must be between"), (1, 5000, "5000")],
)
async def test_bad_page_is_refused_without_sql(
    uow: UnitOfWork, engine: AsyncEngine, page: int, page_size: int, message: str
) -> None:
    async with uow:
        with statements(engine) as sent, pytest.raises(InvalidInputError, match=message):
            await uow.tasks.find_paginated(page=page, page_size=page_size)
    assert sent == []


# -- attempts history ---------------------------------------------------------------------------


async def test_list_attempts_oldest_first(uow: UnitOfWork, conv: Conversation) -> None:
    [task] = await insert(uow, make(conv, max_attempts=3))
    for _ in range(2):
        async with uow:
            [claimed] = await uow.tasks.claim(
                [task.id], worker_id="w1", lease_seconds=30, default_max_attempts=3
            )
            assert await uow.tasks.retry_later(claimed, "flaky", delay_seconds=0)
            await uow.commit()
    async with uow:
        [claimed] = await uow.tasks.claim(
            [task.id], worker_id="w2", lease_seconds=30, default_max_attempts=3
        )
        await uow.commit()
    async with uow:
        history = await uow.tasks.list_attempts(task.id)
        assert await uow.tasks.list_attempts(uuid4()) == []
    assert [(a.run, a.attempt, a.worker_id) for a in history] == [
        (1, 1, "w1"),
        (2, 2, "w1"),
        (3, 3, "w2"),
    ]
    assert [a.outcome for a in history] == [AttemptOutcome.RETRY, AttemptOutcome.RETRY, None]
    assert [a.error for a in history] == ["flaky", "flaky", None]
    assert history[0].finished_at is not None
    assert history[2].finished_at is None


# -- cancel -------------------------------------------------------------------------------------


async def test_cancel_cancels_the_unfinished_subtree(uow: UnitOfWork, conv: Conversation) -> None:
    [root] = await insert(uow, make(conv))
    [child, done_child] = await insert(
        uow, make(conv, parent_task_id=root.id), make(conv, parent_task_id=root.id)
    )
    [grandchild] = await insert(uow, make(conv, parent_task_id=child.id))
    [bystander] = await insert(uow, make(conv))
    await set_finished(uow, done_child.id, TaskStatus.COMPLETED)
    async with uow:
        result = await uow.tasks.cancel(root.id)
        await uow.commit()
    assert result.cancelled == 3
    assert result.changed
    assert result.doorbells == []
    assert result.task.status is TaskStatus.CANCELLED
    assert result.task.error == "cancelled"
    assert result.task.completed_at is not None
    statuses = {t: (await fetch(uow, t)).status for t in (child.id, grandchild.id)}
    assert set(statuses.values()) == {TaskStatus.CANCELLED}
    assert (await fetch(uow, grandchild.id)).error == f"cancelled with ancestor {root.id}"
    assert (await fetch(uow, done_child.id)).status is TaskStatus.COMPLETED
    assert (await fetch(uow, bystander.id)).status is TaskStatus.PENDING


async def test_cancel_of_a_finished_task_changes_nothing(
    uow: UnitOfWork, conv: Conversation
) -> None:
    [task] = await insert(uow, make(conv))
    await set_finished(uow, task.id, TaskStatus.COMPLETED)
    before = await fetch(uow, task.id)
    async with uow:
        result = await uow.tasks.cancel(task.id)
        await uow.commit()
    assert result.cancelled == 0
    assert not result.changed
    assert result.task == before
    assert await fetch(uow, task.id) == before


async def test_cancel_of_an_unknown_task_is_not_found(uow: UnitOfWork) -> None:
    missing = uuid4()
    async with uow:
        with pytest.raises(EntityNotFoundError, match=f"Task {missing} not found"):
            await uow.tasks.cancel(missing)


async def test_cancelling_the_last_open_child_resumes_the_waiting_parent(
    uow: UnitOfWork, conv: Conversation
) -> None:
    [parent] = await insert(uow, make(conv))
    [child] = await insert(uow, make(conv, parent_task_id=parent.id))
    await run_sql(uow, "UPDATE tasks SET status = 'waiting', runs = 1 WHERE id = :id", id=parent.id)
    async with uow:
        result = await uow.tasks.cancel(child.id)
        await uow.commit()
    assert result.cancelled == 1
    assert [(d.task_id, d.runs, d.queue) for d in result.doorbells] == [(parent.id, 1, "tasklane")]
    assert result.doorbells[0].due_at is not None  # it queues by the time it became due
    resumed = await fetch(uow, parent.id)
    assert resumed.status is TaskStatus.PENDING
    assert (resumed.step, resumed.attempts) == (1, 0)


async def test_cancel_records_the_running_attempt(uow: UnitOfWork, conv: Conversation) -> None:
    [task] = await insert(uow, make(conv))
    async with uow:
        await uow.tasks.claim(
            [task.id],
            worker_id="w1",
            lease_seconds=30,
            default_max_attempts=3,
        )
        await uow.commit()
    async with uow:
        await uow.tasks.cancel(task.id)
        await uow.commit()
    async with uow:
        [attempt] = await uow.tasks.list_attempts(task.id)
    assert attempt.outcome is AttemptOutcome.CANCELLED
    assert attempt.finished_at is not None


# -- operator retry -----------------------------------------------------------------------------


async def test_retry_of_a_failed_task_starts_over(uow: UnitOfWork, conv: Conversation) -> None:
    [task] = await insert(uow, make(conv, max_attempts=2))
    await run_sql(
        uow,
        "UPDATE tasks SET status = 'failed', attempts = 2, runs = 2, error = 'boom',"
        " completed_at = now() WHERE id = :id",
        id=task.id,
    )
    async with uow:
        result = await uow.tasks.retry(task.id)
        await uow.commit()
    assert result.retried
    assert [(d.task_id, d.runs, d.queue) for d in result.doorbells] == [(task.id, 2, "tasklane")]
    retried = result.task
    assert retried.status is TaskStatus.PENDING
    assert (retried.attempts, retried.runs, retried.error, retried.completed_at) == (
        0,
        2,
        None,
        None,
    )
    assert await fetch(uow, task.id) == retried


@pytest.mark.parametrize("status", ["pending", "running", "waiting", "completed", "cancelled"])
async def test_retry_only_from_failed(uow: UnitOfWork, conv: Conversation, status: str) -> None:
    [task] = await insert(uow, make(conv))
    await run_sql(uow, "UPDATE tasks SET status = :s WHERE id = :id", s=status, id=task.id)
    before = await fetch(uow, task.id)
    async with uow:
        result = await uow.tasks.retry(task.id)
        await uow.commit()
    assert not result.retried
    assert result.doorbells == []
    assert result.task == before
    assert await fetch(uow, task.id) == before


async def test_retry_of_an_unknown_task_is_not_found(uow: UnitOfWork) -> None:
    async with uow:
        with pytest.raises(EntityNotFoundError):
            await uow.tasks.retry(uuid4())
