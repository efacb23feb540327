"""`Dispatcher` on the real Redis: ringing is idempotent, and ringing again unblocks a doorbell
that a worker started long ago without claiming its task, but never one started just now."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
from arq.constants import in_progress_key_prefix, job_key_prefix
from redis.asyncio import Redis

from domain.entities import Doorbell
from worker.dispatch import Dispatcher, score


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    yield client
    await client.aclose()


async def redis_ms(redis: Redis) -> int:
    seconds, micros = await redis.time()
    return int(seconds) * 1000 + int(micros) // 1000


DUE = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def doorbells(n: int, queue: str) -> list[Doorbell]:
    return [Doorbell(uuid.uuid4(), 0, queue, DUE + timedelta(seconds=i)) for i in range(n)]


async def test_ringing_twice_queues_each_doorbell_once(redis: Redis, queue: str) -> None:
    rung = doorbells(3, queue)
    dispatcher = Dispatcher(redis, queue)
    await dispatcher.ring(rung)
    await dispatcher.ring(rung)
    queued = await redis.zrange(queue, 0, -1, withscores=True)
    assert sorted(queued) == sorted((d.job_id.encode(), score(d)) for d in rung)
    assert all([await redis.exists(job_key_prefix + d.job_id) for d in rung])


async def test_doorbells_queue_in_the_order_their_tasks_became_due(
    redis: Redis, queue: str
) -> None:
    """Whatever their ids (a v4 id from gen_random_uuid() sorts after every time-ordered one)
    and whoever rings them: the score is the due time, in seconds, which arq always sees as due
    (its clock is in milliseconds)."""
    early = Doorbell(uuid.UUID("ffffffff-0000-4000-8000-000000000000"), 0, queue, DUE)
    late = Doorbell(
        uuid.UUID("00000000-0000-7000-8000-000000000000"), 0, queue, DUE.replace(minute=1)
    )
    await Dispatcher(redis, queue).ring([late, early])
    assert await redis.zrange(queue, 0, -1) == [early.job_id.encode(), late.job_id.encode()]
    assert score(late) < await redis_ms(redis)  # due for arq at once, whatever the clocks


async def test_ring_again_unblocks_only_doorbells_started_long_ago(
    redis: Redis, queue: str
) -> None:
    dead_worker, arq_worker, live_worker, not_started = doorbells(4, queue)
    now = await redis_ms(redis)
    keys = {d: in_progress_key_prefix + d.job_id for d in (dead_worker, arq_worker, live_worker)}
    try:
        # The value is when the key was set (Redis's clock); arq itself writes "1".
        await redis.psetex(keys[dead_worker], 600_000, now - 10_000)
        await redis.psetex(keys[arq_worker], 600_000, b"1")
        await redis.psetex(keys[live_worker], 600_000, now)
        unblocked = await Dispatcher(redis, queue).ring_again(
            [dead_worker, arq_worker, live_worker, not_started], stale_after_seconds=5
        )
        assert sorted(unblocked, key=str) == sorted([dead_worker, arq_worker], key=str)
        assert not await redis.exists(keys[dead_worker], keys[arq_worker])
        assert await redis.pttl(keys[live_worker]) > 500_000  # untouched
        queued = {member.decode() for member in await redis.zrange(queue, 0, -1)}
        assert queued == {d.job_id for d in (dead_worker, arq_worker, live_worker, not_started)}
    finally:
        await redis.delete(*keys.values())


async def test_ring_again_with_nothing_to_ring(redis: Redis, queue: str) -> None:
    assert await Dispatcher(redis, queue).ring_again([], stale_after_seconds=5) == []
    assert await redis.zcard(queue) == 0
