"""The worker's batched statements on real PostgreSQL: claims and completions of concurrent runs
share one statement, and a batch that fails is retried row by row, so one bad row never fails
its neighbours."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from domain.entities import Conversation
from domain.exceptions import InvalidInputError
from persistence import pg
from persistence.lifecycle import Lifecycle
from tests.support.lifecycles import pooled_lifecycle
from worker.client import TaskClient


@pytest.fixture
async def lifecycle(database_url: str) -> AsyncIterator[Lifecycle]:
    async with pooled_lifecycle(
        database_url,
        worker_id="batch-test",
        pool_size=2,
        busy=lambda: True,  # every claim and root completion goes through the batchers
        batch_window=0.05,
    ) as lifecycle:
        yield lifecycle


async def test_one_bad_completion_does_not_fail_its_batch(
    lifecycle: Lifecycle, client: TaskClient, conversation: Conversation, database_url: str
) -> None:
    submitted = [
        await client.submit("echo", {"i": i}, conversation_id=conversation.id) for i in range(4)
    ]

    claimed = await asyncio.gather(*(lifecycle.claim(task.id) for task in submitted))
    assert all(task is not None for task in claimed)
    outputs = ['{"ok": 0}', '{"ok": 1}', '{"not json', '{"ok": 3}']
    finishes = await asyncio.gather(
        *(
            lifecycle.complete(task, output)
            for task, output in zip(claimed, outputs, strict=True)
            if task is not None
        ),
        return_exceptions=True,
    )

    assert [getattr(f, "landed", None) for f in finishes] == [True, True, None, True]
    assert isinstance(finishes[2], InvalidInputError)  # translated: bad input, not a retry
    rows = {task.id: await client.get(task.id) for task in submitted}
    assert [rows[t.id].status.value for t in submitted] == [
        "completed",
        "completed",
        "running",
        "completed",
    ]
    assert rows[submitted[3].id].output == {"ok": 3}


async def test_a_duplicate_claim_in_one_batch_gets_the_task_once(
    lifecycle: Lifecycle, client: TaskClient, conversation: Conversation
) -> None:
    task = await client.submit("echo", {}, conversation_id=conversation.id)

    claims = await asyncio.gather(*(lifecycle.claim(task.id) for _ in range(3)))

    assert sum(claim is not None for claim in claims) == 1
    assert (await client.get(task.id)).attempts == 1


async def test_a_released_connection_never_carries_an_open_transaction(database_url: str) -> None:
    # The pool skips asyncpg's reset query (see persistence.pg); the rollback must still happen.
    pool = await pg.create_pool(database_url, min_size=1, max_size=1)
    try:
        async with pool.acquire() as conn:
            await conn.execute("BEGIN")
            await conn.execute("INSERT INTO conversations (user_id) VALUES ('left-open')")
        async with pool.acquire() as conn:
            assert not conn.is_in_transaction()
            left = await conn.fetchval(
                "SELECT count(*) FROM conversations WHERE user_id = 'left-open'"
            )
        assert left == 0
    finally:
        await pool.close()
