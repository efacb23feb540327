"""TasklaneWorker starts a poll's doorbells with one Redis script instead of arq's four round trips
per job. These tests hold the script to arq's rules on the real Redis: start only what is queued,
due and not in progress anywhere; never start one doorbell twice, even from two workers at once;
never take more than the free slots; remove -inf junk."""

from __future__ import annotations

import asyncio
import math
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from arq import create_pool
from arq.connections import ArqRedis, RedisSettings
from arq.constants import in_progress_key_prefix, job_key_prefix
from arq.jobs import serialize_job
from arq.utils import timestamp_ms
from arq.worker import func
from redis.asyncio import Redis

from worker.app import IDLE_POLL_SECONDS, POLL_DELAY_SECONDS, TasklaneWorker
from worker.dispatch import JOB_FUNCTION
from worker.doorbell_jobs import DoorbellEnds
from worker.serialization import deserialize, serialize


async def _hold(ctx: dict[str, Any], *args: Any) -> None:
    await asyncio.Event().wait()  # runs until the test cancels it


@pytest.fixture
async def arq_redis(redis_url: str) -> AsyncIterator[ArqRedis]:
    pool = await create_pool(RedisSettings.from_dsn(redis_url))
    yield pool
    await pool.aclose()


async def _return(ctx: dict[str, Any], *args: Any) -> None:
    return None


def make_worker(
    pool: ArqRedis, queue: str, *, max_jobs: int = 10, job: Any = _hold
) -> TasklaneWorker:
    return TasklaneWorker(
        functions=[func(job, name=JOB_FUNCTION)],
        queue_name=queue,
        redis_pool=pool,
        max_jobs=max_jobs,
        keep_result=0,
        handle_signals=False,
        job_serializer=serialize,
        job_deserializer=deserialize,
    )


async def stop(worker: TasklaneWorker) -> None:
    for task in worker.tasks.values():
        task.cancel()
    await asyncio.gather(*worker.tasks.values(), return_exceptions=True)


def ids(n: int) -> list[str]:
    return [f"{uuid.uuid4()}:1" for _ in range(n)]


# A doorbell's score is its task's due time in seconds (worker.dispatch.score): always due.
DUE_SCORE = 1_764_000_000.0


async def enqueue(pool: ArqRedis, queue: str, job_ids: list[str], score: float = DUE_SCORE) -> None:
    """Queue doorbells the way `Dispatcher.ring` does (job key + queue entry), at `score`."""
    for job_id in job_ids:
        task_id = job_id.partition(":")[0]
        job = serialize_job(JOB_FUNCTION, (task_id,), {}, None, 1, serializer=serialize)
        await pool.set(job_key_prefix + job_id, job, px=60_000)
    await pool.zadd(queue, {job_id: score for job_id in job_ids})


async def in_progress(pool: ArqRedis, job_ids: list[str]) -> list[bool]:
    return [bool(await pool.exists(in_progress_key_prefix + job_id)) for job_id in job_ids]


async def test_starts_due_queued_doorbells_and_marks_them_in_progress(
    arq_redis: ArqRedis, queue: str
) -> None:
    worker = make_worker(arq_redis, queue)
    due = ids(3)
    await enqueue(arq_redis, queue, due)
    try:
        await worker.start_jobs([job_id.encode() for job_id in due])

        assert sorted(worker.tasks) == sorted(due)
        assert worker.job_counter == 3
        assert await in_progress(arq_redis, due) == [True, True, True]
        # Off the queue (no poll reads them again), their jobs kept until they end.
        assert await arq_redis.zcard(queue) == 0
        assert await arq_redis.exists(*(job_key_prefix + job_id for job_id in due)) == 3
        ttl_ms = await arq_redis.pttl(in_progress_key_prefix + due[0])
        assert 0 < ttl_ms <= worker.in_progress_timeout_s * 1000
        # Each key says when it was set, by Redis's clock: the reconciler judges staleness by it.
        seconds, micros = await arq_redis.time()
        redis_now_ms = int(seconds) * 1000 + int(micros) // 1000
        for job_id in due:
            started_at = int(await arq_redis.get(in_progress_key_prefix + job_id))
            assert redis_now_ms - 5_000 < started_at <= redis_now_ms
    finally:
        await stop(worker)
        await arq_redis.delete(*(in_progress_key_prefix + job_id for job_id in due))


async def test_skips_what_arq_would_skip(arq_redis: ArqRedis, queue: str) -> None:
    worker = make_worker(arq_redis, queue)
    elsewhere, future, gone, zero, due = ids(5)
    await enqueue(arq_redis, queue, [elsewhere, due])
    await arq_redis.psetex(in_progress_key_prefix + elsewhere, 60_000, b"1")  # another worker's
    await enqueue(arq_redis, queue, [future], score=timestamp_ms() + 60_000)
    await enqueue(arq_redis, queue, [zero], score=0)
    everything = [elsewhere, future, gone, zero, due]
    try:
        await worker.start_jobs([job_id.encode() for job_id in everything])

        assert list(worker.tasks) == [due]
        assert await in_progress(arq_redis, everything) == [True, False, False, False, True]
    finally:
        await stop(worker)
        await arq_redis.delete(*(in_progress_key_prefix + job_id for job_id in everything))


async def test_takes_no_more_than_the_free_slots(arq_redis: ArqRedis, queue: str) -> None:
    worker = make_worker(arq_redis, queue, max_jobs=4)
    due = ids(10)
    await enqueue(arq_redis, queue, due)
    try:
        await worker.start_jobs([job_id.encode() for job_id in due[:3]])
        await worker.start_jobs([job_id.encode() for job_id in due])  # re-read: 3 run here

        assert worker.job_counter == 4
        assert sorted(worker.tasks) == sorted(due[:4])
        assert await in_progress(arq_redis, due) == [True] * 4 + [False] * 6
    finally:
        await stop(worker)
        await arq_redis.delete(*(in_progress_key_prefix + job_id for job_id in due))


async def test_a_head_held_by_another_worker_does_not_hide_what_waits_behind_it(
    arq_redis: ArqRedis, queue: str
) -> None:
    """A worker reads the queue from its head, where doorbells rung again while another worker
    runs them (or left behind by a worker that died) sit behind in-progress keys. With two free
    slots it must start the two due doorbells behind four such, not give up after trying as many
    ids as it has slots (which starved an idle worker while a busy one held the head)."""
    worker = make_worker(arq_redis, queue, max_jobs=2)
    held, behind = ids(4), ids(3)
    await enqueue(arq_redis, queue, held, score=DUE_SCORE)
    await enqueue(arq_redis, queue, behind, score=DUE_SCORE + 1)
    for job_id in held:
        await arq_redis.psetex(in_progress_key_prefix + job_id, 60_000, b"1")
    everything = held + behind
    try:
        queued = await arq_redis.zrangebyscore(queue, "-inf", "+inf")
        assert sorted(job_id.decode() for job_id in queued[:4]) == sorted(held)

        await worker.start_jobs(queued)

        assert sorted(worker.tasks) == sorted(job_id.decode() for job_id in queued[4:6])
        assert sum(await in_progress(arq_redis, everything)) == 6
    finally:
        await stop(worker)
        await arq_redis.delete(*(in_progress_key_prefix + job_id for job_id in everything))


async def test_two_workers_racing_for_the_same_doorbells_start_each_once(
    arq_redis: ArqRedis, queue: str
) -> None:
    workers = [make_worker(arq_redis, queue, max_jobs=100) for _ in range(2)]
    due = ids(60)
    await enqueue(arq_redis, queue, due)
    raw = [job_id.encode() for job_id in due]
    try:
        await asyncio.gather(
            *(w.start_jobs(order) for w, order in zip(workers, (raw, raw[::-1]), strict=True))
        )

        started = [job_id for w in workers for job_id in w.tasks]
        assert sorted(started) == sorted(due)
    finally:
        for w in workers:
            await stop(w)
        await arq_redis.delete(*(in_progress_key_prefix + job_id for job_id in due))


async def test_minus_inf_members_are_removed_with_their_job_keys(
    arq_redis: ArqRedis, queue: str
) -> None:
    worker = make_worker(arq_redis, queue)
    junk, due = ids(2)
    await arq_redis.set(job_key_prefix + junk, b"{}")
    await enqueue(arq_redis, queue, [junk], score=-math.inf)
    await enqueue(arq_redis, queue, [due])
    try:
        await worker.start_jobs([junk.encode(), due.encode()])

        assert list(worker.tasks) == [due]
        assert await arq_redis.zscore(queue, junk) is None
        assert not await arq_redis.exists(job_key_prefix + junk)
    finally:
        await stop(worker)
        await arq_redis.delete(in_progress_key_prefix + due)


async def test_idle_polls_back_off_and_a_found_doorbell_resets_the_delay(
    arq_redis: ArqRedis, queue: str
) -> None:
    worker = make_worker(arq_redis, queue)
    try:
        waits = []
        for _ in range(6):
            await worker._poll_iteration()
            waits.append(worker._idle_wait)
        assert waits == sorted(waits)
        assert waits[0] == POLL_DELAY_SECONDS
        assert waits[-1] == pytest.approx(IDLE_POLL_SECONDS)

        due = ids(1)
        await enqueue(arq_redis, queue, due)
        await worker._poll_iteration()
        assert worker._idle_wait == 0.0
        assert list(worker.tasks) == due
    finally:
        await stop(worker)
        await arq_redis.delete(in_progress_key_prefix + due[0])


async def queued(pool: ArqRedis, queue: str, job_ids: list[str]) -> list[bool]:
    """For each job: still in the queue with its job key."""
    return [
        await pool.zscore(queue, job_id) is not None
        and bool(await pool.exists(job_key_prefix + job_id))
        for job_id in job_ids
    ]


async def test_ended_doorbells_leave_redis_and_cancelled_ones_stay_queued(
    arq_redis: ArqRedis, queue: str
) -> None:
    """The doorbells that end together are cleared with one script call (`DoorbellEnds`): a
    job that returned loses its job key and in-progress key; a job cancelled at shutdown its
    in-progress key, and goes back on the queue at its score, so that another worker starts it
    again."""
    finishing, holding = make_worker(arq_redis, queue, job=_return), make_worker(arq_redis, queue)
    done, held = ids(5), ids(2)
    await enqueue(arq_redis, queue, done + held)
    try:
        await finishing.start_jobs([job_id.encode() for job_id in done])
        await holding.start_jobs([job_id.encode() for job_id in held])
        await asyncio.gather(*finishing.tasks.values())
        assert await queued(arq_redis, queue, done) == [False] * 5
        assert await in_progress(arq_redis, done) == [False] * 5
        assert await arq_redis.exists(*(job_key_prefix + job_id for job_id in done)) == 0
        assert await in_progress(arq_redis, held) == [True, True]
        assert await queued(arq_redis, queue, held) == [False, False]  # running: off the queue

        await stop(holding)  # cancelled, as at shutdown
        assert await queued(arq_redis, queue, held) == [True, True]  # back, at their own score
        assert [await arq_redis.zscore(queue, job_id) for job_id in held] == [DUE_SCORE] * 2
        assert await in_progress(arq_redis, held) == [False, False]
        assert (finishing.jobs_complete, holding.jobs_retried) == (5, 2)
    finally:
        await arq_redis.delete(*(job_key_prefix + job_id for job_id in held))


async def test_a_doorbell_whose_job_is_gone_or_unreadable_is_removed(
    arq_redis: ArqRedis, queue: str
) -> None:
    """The start script hands each job's payload over; a doorbell whose job key expired, whose
    payload is not a job, or which names another function is logged and removed — the worker
    goes on."""
    worker = make_worker(arq_redis, queue, job=_return)
    expired, garbage, stranger, good = ids(4)
    await enqueue(arq_redis, queue, [expired, garbage, stranger, good])
    await arq_redis.delete(job_key_prefix + expired)
    await arq_redis.set(job_key_prefix + garbage, b"\x80pickled")
    other = serialize_job("not_ours", ("x",), {}, None, 1, serializer=serialize)
    await arq_redis.set(job_key_prefix + stranger, other)
    everything = [expired, garbage, stranger, good]
    await worker.start_jobs([job_id.encode() for job_id in everything])
    await asyncio.gather(*worker.tasks.values())

    assert await queued(arq_redis, queue, everything) == [False] * 4
    assert await arq_redis.zcard(queue) == 0
    assert (worker.jobs_failed, worker.jobs_complete) == (3, 1)


async def test_ends_that_cannot_reach_redis_report_it_without_raising() -> None:
    """Redis away at a job's end: the job's slot frees (the end returns the failure, which the
    worker logs at DEBUG); the doorbell's keys expire on their own."""
    nowhere = Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=1)
    try:
        ends = DoorbellEnds(nowhere, "q")
        failures = await asyncio.gather(
            *(ends.end(job_id, remove=True, score=DUE_SCORE) for job_id in ids(3))
        )
        assert all(isinstance(failure, Exception) for failure in failures), failures
    finally:
        await nowhere.aclose()
