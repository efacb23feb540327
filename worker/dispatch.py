"""Doorbells: the arq jobs that tell a worker "task X may be claimable now".

A doorbell carries only the task id; Postgres decides whether there is anything to do. Ringing
writes arq's job key and queue entry directly, many at once in one pipelined round trip, with
the same layout `ArqRedis.enqueue_job` uses. Both writes are NX: a doorbell still queued (same
task, same run) is not queued twice.

Every doorbell is for a task that is due now (later work is left to the reconciler), so its
queue score is a constant instead of the ringer's clock: a worker whose clock runs behind the
producer's would otherwise not see the doorbell until its own clock caught up. Equal scores are
served in job-id order, and job ids start with the task id (time-ordered), so older tasks go
first.
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
# arq treats a zero score as "no such job"; any constant in the past will do.
DUE_NOW_SCORE = 1


class Dispatcher:
    def __init__(self, redis: Redis, queue: str) -> None:
        self.redis = redis
        self.queue = queue

    async def ring(self, doorbells: Sequence[Doorbell]) -> None:
        """Queue each doorbell on its task's queue (or this dispatcher's)."""
        if not doorbells:
            return
        now = timestamp_ms()
        async with self.redis.pipeline(transaction=False) as pipe:
            for doorbell in doorbells:
                job = serialize_job(
                    JOB_FUNCTION, (str(doorbell.task_id),), {}, None, now, serializer=serialize
                )
                pipe.set(job_key_prefix + doorbell.job_id, job, px=expires_extra_ms, nx=True)
                pipe.zadd(doorbell.queue or self.queue, {doorbell.job_id: DUE_NOW_SCORE}, nx=True)
            await pipe.execute()

    async def forget(self, doorbells: Sequence[Doorbell]) -> None:
        """Take these doorbells off their queues, whether or not a job is running for them."""
        if not doorbells:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for doorbell in doorbells:
                pipe.zrem(doorbell.queue or self.queue, doorbell.job_id)
            await pipe.execute()

    async def queued(self) -> int:
        """Doorbells waiting in the queue (arq's queue length)."""
        return int(await self.redis.zcard(self.queue))
