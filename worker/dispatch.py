"""Doorbells: the arq jobs that tell a worker "task X may be claimable now".

A doorbell carries only the task id; Postgres decides whether there is anything to do. Ringing
writes arq's job key and queue entry directly, many at once in one pipelined round trip, with
the same layout `ArqRedis.enqueue_job` uses. Both writes are NX: a doorbell still queued (same
task, same run) is not queued twice.
"""

from __future__ import annotations

from collections.abc import Sequence

from arq.constants import expires_extra_ms, job_key_prefix
from arq.jobs import serialize_job
from arq.utils import timestamp_ms
from redis.asyncio import Redis

from domain.entities import Doorbell
from worker.serialization import serialize

JOB_FUNCTION = "run_task"


class Dispatcher:
    def __init__(self, redis: Redis, queue: str) -> None:
        self.redis = redis
        self.queue = queue

    async def ring(self, doorbells: Sequence[Doorbell]) -> None:
        if not doorbells:
            return
        now = timestamp_ms()
        async with self.redis.pipeline(transaction=False) as pipe:
            for doorbell in doorbells:
                job = serialize_job(
                    JOB_FUNCTION, (str(doorbell.task_id),), {}, None, now, serializer=serialize
                )
                pipe.set(job_key_prefix + doorbell.job_id, job, px=expires_extra_ms, nx=True)
                pipe.zadd(self.queue, {doorbell.job_id: now}, nx=True)
            await pipe.execute()

    async def queued(self) -> int:
        """Doorbells waiting in the queue (arq's queue length)."""
        return int(await self.redis.zcard(self.queue))
