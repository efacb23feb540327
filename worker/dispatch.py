"""Doorbells: the arq jobs that tell a worker "task X may be claimable now".

A doorbell carries only the task id; Postgres decides whether there is anything to do. Ringing
writes arq's job key and queue entry directly, many at once in one pipelined round trip, with
the same layout `ArqRedis.enqueue_job` uses. Both writes are NX: a doorbell still queued (same
task, same run) is not queued twice.

Every doorbell is for a task that is due now (later work is left to the reconciler). Its queue
score is when the task became due, by the database clock, in *seconds* since the epoch: arq
serves members whose score is at most its own clock in *milliseconds*, so every doorbell is
visible at once whatever the machines' clocks say, and doorbells are served in the order their
tasks became due — by one clock, whoever inserted the task (a producer, plain SQL, the
reconciler). Job ids no longer decide the order (an id from `gen_random_uuid()` would otherwise
wait behind every time-ordered one).

A worker that starts a doorbell takes it off the queue and sets arq's in-progress key for it until
its job ends (`worker.doorbell_jobs`). If that worker dies between starting it and claiming the
task in Postgres, the task stays pending, and a doorbell rung again for it would be blocked for as
long as the key lives (longer than any task may run). The reconciler re-rings pending tasks that
nobody claimed in time with `ring_again`, which also clears such stale keys.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from datetime import datetime

from arq.constants import expires_extra_ms, in_progress_key_prefix, job_key_prefix
from arq.jobs import serialize_job
from arq.utils import timestamp_ms
from redis.asyncio import Redis
from redis.commands.core import AsyncScript

from domain.entities import Doorbell
from worker.serialization import serialize

JOB_FUNCTION = "run_task"
# A flow doorbell's argument: FLOW_PREFIX + JSON [queue, agent id]. It asks a worker for a
# limited agent's next start (whichever task's turn it is), not for one task.
FLOW_PREFIX = "flow:"


def flow_argument(queue: str, agent_id: str) -> str:
    return FLOW_PREFIX + json.dumps([queue, agent_id])


def parse_flow_argument(raw: object) -> tuple[str, str] | None:
    """(queue, agent id) of a flow doorbell's argument; None for anything else."""
    if not isinstance(raw, str) or not raw.startswith(FLOW_PREFIX) or len(raw) > 1000:
        return None
    try:
        value = json.loads(raw[len(FLOW_PREFIX) :])
    except ValueError:
        return None
    if isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) and v for v in value):
        return value[0], value[1]
    return None


def score(doorbell: Doorbell) -> float:
    """A doorbell's place in its queue: when its task became due (seconds since the epoch, by the
    database clock; the ringer's clock only for a doorbell that does not say)."""
    due = doorbell.due_at.timestamp() if doorbell.due_at is not None else time.time()
    return max(due, 1.0)  # arq reads a zero score as "no such job"


# Lua: `now_ms`, Redis's clock in ms. A started doorbell's in-progress key holds this, taken when
# it was set (worker.app's start script; arq itself writes "1").
REDIS_NOW_MS_LUA = """
local clock = redis.call('TIME')
local now_ms = clock[1] * 1000 + math.floor(clock[2] / 1000)
"""

# Deletes each in-progress key (KEYS) set more than ARGV[1] ms ago; arq's "1" reads as long ago.
# Returns those deleted.
_CLEAR_STALE_STARTS = (
    REDIS_NOW_MS_LUA
    + """
local cleared = {}
for _, key in ipairs(KEYS) do
  local started_at = tonumber(redis.call('GET', key))
  if started_at and now_ms - started_at >= tonumber(ARGV[1]) then
    redis.call('DEL', key)
    table.insert(cleared, key)
  end
end
return cleared
"""
)


class Dispatcher:
    def __init__(self, redis: Redis, queue: str) -> None:
        self.redis = redis
        self.queue = queue
        self._clear_stale_starts: AsyncScript | None = None

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
                pipe.zadd(doorbell.queue or self.queue, {doorbell.job_id: score(doorbell)}, nx=True)
            await pipe.execute()

    async def ring_flow(
        self, queue: str, agent_id: str, *, count: int = 1, at: datetime | None = None
    ) -> None:
        """Ask for a limited agent's next start(s): `count` flow doorbells now, each its own job
        (one rung while another runs must not be absorbed by it), or one at `at` (a rate's next
        start), absorbed by any other for the same moment."""
        argument = flow_argument(queue, agent_id)
        now = timestamp_ms()
        if at is not None:
            when = int(at.timestamp() * 1000)
            ids = [f"{argument}@{when}"]
            score: float = max(when, now)
        else:
            ids = [f"{argument}#{uuid.uuid4().hex}" for _ in range(count)]
            score = 1.0  # ahead of every per-task doorbell: a freed slot is taken at once
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in ids:
                job = serialize_job(JOB_FUNCTION, (argument,), {}, None, now, serializer=serialize)
                pipe.set(job_key_prefix + job_id, job, px=expires_extra_ms, nx=True)
                pipe.zadd(queue, {job_id: score}, nx=True)
            await pipe.execute()

    async def ring_again(
        self, doorbells: Sequence[Doorbell], *, stale_after_seconds: float
    ) -> list[Doorbell]:
        """Ring doorbells for tasks that are still pending although rung before, and unblock
        those a worker started more than `stale_after_seconds` ago without claiming the task:
        a claim takes milliseconds, so that worker died (or lost Postgres; if it comes back,
        Postgres lets only one claim win). Returns the doorbells unblocked."""
        await self.ring(doorbells)
        if not doorbells:
            return []
        if self._clear_stale_starts is None:
            self._clear_stale_starts = self.redis.register_script(_CLEAR_STALE_STARTS)
        by_key = {in_progress_key_prefix + d.job_id: d for d in doorbells}
        cleared = await self._clear_stale_starts(
            keys=list(by_key), args=[int(stale_after_seconds * 1000)]
        )
        return [by_key[key.decode()] for key in cleared]

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
