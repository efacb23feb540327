from __future__ import annotations

from domain.entities import Conversation, Task
from persistence import lifecycle, pg
from persistence.session import UnitOfWork
from persistence.sql import ConnectionExecutor
from tests.support.databases import plain_url_for


async def test_smoke(uow: UnitOfWork, database: str) -> None:
    async with uow:
        conv = await uow.conversations.create(Conversation(user_id="u1"))
        tasks = await uow.tasks.create_many(
            [Task(conversation_id=conv.id, agent_id="echo", input={"i": i}) for i in range(3)]
        )
        await uow.commit()
    conn = await pg.connect(plain_url_for(database))
    try:
        ex = ConnectionExecutor(conn)
        claimed = await lifecycle.claim(
            ex, [t.id for t in tasks], worker_id="w1", lease_seconds=30, default_max_attempts=3
        )
        assert len(claimed) == 3
        print(claimed[0])
        done = await lifecycle.complete(ex, [(claimed[0].id, claimed[0].runs, '{"ok":1}')])
        assert done
        assert await lifecycle.retry_later(ex, claimed[1].id, 1, "boom", delay_seconds=0)
        lost = await lifecycle.heartbeat(ex, {c.id: c.runs for c in claimed}, lease_seconds=30)
        assert lost == {claimed[0].id, claimed[1].id}
        miss = await lifecycle.explain_miss(ex, claimed[0].id)
        print(miss)
        async with conn.transaction():
            bells = await lifecycle.wait_for_children(
                ex,
                claimed[2].id,
                claimed[2].runs,
                [Task(conversation_id=conv.id, agent_id="square", input={"x": 2})],
                dispatch_delay=30,
            )
        print(bells)
        rescued = await lifecycle.rescue_roots(
            ex, limit=10, retry_base_seconds=1, retry_max_seconds=10
        )
        print(rescued)
        due = await lifecycle.dispatch_due(ex, queue="tasklane", limit=10, redispatch_seconds=30)
        print(due)
        async with conn.transaction():
            c = await lifecycle.cancel_tree(ex, claimed[2].id, dispatch_delay=0)
        print(c)
        async with conn.transaction():
            c = await lifecycle.cancel_tree(ex, claimed[2].id, dispatch_delay=0)
        print(c)
    finally:
        await conn.close()
    async with uow:
        r = await uow.tasks.cancel(claimed[1].id)
        print(r)
        r2 = await uow.tasks.retry(claimed[1].id)
        print(r2)
        print(await uow.tasks.list_attempts(claimed[1].id))
        print(await uow.tasks.get_descendants(claimed[2].id))
        await uow.commit()
