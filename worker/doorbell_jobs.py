"""A doorbell's life in Redis, in fewer round trips than arq's own job handling.

arq runs each job with four round trips to start it (WATCH, EXISTS, ZSCORE, MULTI/PSETEX/EXEC),
a MULTI/EXEC transaction to read it and count a try, a second asyncio task to run the function
under `wait_for`, and another transaction to delete its keys: two dozen Redis replies per job,
each read under the socket timeout. A tasklane doorbell needs none of that, because the task's
attempts, timeouts and outcome live in Postgres. So `TasklaneWorker`:

- starts a poll's doorbells with one script call (`START_DOORBELLS`), which also returns each
  job's payload;
- runs the job function in the job's own asyncio task, under one `asyncio.timeout`;
- ends the doorbells that finish together (a batch of Postgres finishes resumes its jobs in one
  event-loop iteration) with one script call (`END_DOORBELLS`, through `DoorbellEnds`).

Both scripts do what arq's steps do, atomically, so a doorbell is never started twice and never
left half-removed. What this bought is measured with bench/run.py (README, Performance).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from arq.constants import abort_jobs_ss, in_progress_key_prefix, job_key_prefix, retry_key_prefix

from persistence.batching import Batcher
from worker.dispatch import REDIS_NOW_MS_LUA

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.commands.core import AsyncScript

# Starts a poll's doorbells in one round trip. For each job id (ARGV[6:], in queue order) still
# queued (KEYS[1]) with a score in (0, now] (ARGV[1]) and no in-progress key (prefix ARGV[2]), it
# sets that key for ARGV[3] ms and takes the doorbell off the queue, until ARGV[5] are started:
# what arq's `start_jobs` does per job with WATCH, EXISTS, ZSCORE and MULTI/PSETEX/EXEC. Returns
# three lists: [job id, score, …] of those started, their payloads (the job key, prefix ARGV[4];
# false when it expired), and the members whose score is -inf (junk, see TasklaneWorker).
# The key's value is when it was set (REDIS_NOW_MS_LUA): the reconciler reads it to tell a
# doorbell whose worker died before claiming its task (see `Dispatcher.ring_again`) from one being
# claimed right now.
#
# Unlike arq, a started doorbell leaves the queue (its job key stays until it ends): arq keeps a
# running job queued, and every worker reads the queue from its head, `queue_read_limit` ids at a
# time, so with more jobs running across the workers than that limit, the head held only running
# jobs and no worker could see the work behind them; the queue's workers together never ran more
# than about 100 at once. A doorbell is only a hint (the task is in Postgres, and the reconciler
# rings again for a pending task nobody claimed), so nothing needs it queued while it runs.
START_DOORBELLS = (
    REDIS_NOW_MS_LUA
    + """
local started, payloads, junk = {}, {}, {}
local now = tonumber(ARGV[1])
local limit = tonumber(ARGV[5])
for i = 6, #ARGV do
  if #payloads >= limit then break end
  local job_id = ARGV[i]
  local score = redis.call('ZSCORE', KEYS[1], job_id)
  local n = score and tonumber(score)
  if n == -math.huge then
    table.insert(junk, job_id)
  elseif n and n ~= 0 and n <= now
      and redis.call('EXISTS', ARGV[2] .. job_id) == 0 then
    redis.call('PSETEX', ARGV[2] .. job_id, ARGV[3], now_ms)
    redis.call('ZREM', KEYS[1], job_id)
    table.insert(started, job_id)
    table.insert(started, score)
    table.insert(payloads, redis.call('GET', ARGV[4] .. job_id))
  end
end
return {started, payloads, junk}
"""
)

# Ends doorbells (ARGV[5:], triples of job id, "1" to remove it or "0" to queue it again, and its
# score): the in-progress key goes either way; a removed doorbell also loses its job and retry keys
# and any queue (KEYS[1]) and abort-set entries (it may have been rung again while it ran); one
# queued again goes back at its score, NX: a ring meanwhile already queued it. arq's
# `finish_job` per job, for a batch.
END_DOORBELLS = """
for i = 5, #ARGV, 3 do
  local job_id = ARGV[i]
  if ARGV[i + 1] == '1' then
    redis.call('DEL', ARGV[1] .. job_id, ARGV[2] .. job_id, ARGV[3] .. job_id)
    redis.call('ZREM', KEYS[1], job_id)
    redis.call('ZREM', ARGV[4], job_id)
  else
    redis.call('DEL', ARGV[1] .. job_id)
    redis.call('ZADD', KEYS[1], 'NX', ARGV[i + 2], job_id)
  end
end
return 0
"""


def start_args(now_ms: int, in_progress_ms: int, limit: int, job_ids: list[str]) -> list[Any]:
    """START_DOORBELLS's ARGV: start at most `limit` of `job_ids`, the first startable ones."""
    return [now_ms, in_progress_key_prefix, in_progress_ms, job_key_prefix, limit, *job_ids]


class DoorbellEnds:
    """Ends doorbells in Redis, those that end in the same event-loop iteration in one call.

    A job waits for its doorbell's end before its slot frees, as under arq. If the call fails
    (Redis away), its keys expire on their own, and a doorbell that was to be queued again is
    not: its task is pending in Postgres, and the reconciler rings again for a pending task
    nobody claimed. A failed call is not retried end by end (as a failed batch of rows is): no
    one doorbell can fail it.
    """

    def __init__(self, pool: Redis, queue: str) -> None:
        self._pool = pool
        self._queue = queue
        self._script: AsyncScript | None = None
        self._batcher: Batcher[tuple[str, bool, float], Exception | None] = Batcher(
            "doorbell ends", self._end_batch, busy=lambda: True, window=0.0
        )

    async def end(self, job_id: str, *, remove: bool, score: float) -> Exception | None:
        """Clear the doorbell's in-progress mark; `remove` it for good, or queue it again at its
        `score` to start again (a job cancelled at shutdown). Returns why that failed, if it
        did."""
        return await self._batcher.submit((job_id, remove, score))

    async def _end_batch(self, ends: list[tuple[str, bool, float]]) -> list[Exception | None]:
        if self._script is None:
            self._script = self._pool.register_script(END_DOORBELLS)
        args: list[Any] = [in_progress_key_prefix, job_key_prefix, retry_key_prefix, abort_jobs_ss]
        for job_id, remove, score in ends:
            args += [job_id, "1" if remove else "0", repr(score)]
        try:
            await self._script(keys=[self._queue], args=args)
        except Exception as exc:  # the caller logs it; see the class's docstring
            return [exc] * len(ends)
        return [None] * len(ends)

    async def drain(self) -> None:
        await self._batcher.drain()
