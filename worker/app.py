"""The worker's wiring: arq options, startup and shutdown, the `run_task` job.

`arq worker.settings.WorkerSettings` and `tasklane worker` both run this.

The settings class only wires things together; everything a job needs is built once at startup
and put in arq's `ctx`. Choices that matter (see docs/architecture.md):
- JSON job serialisation on both sides; pickle is refused;
- no arq results are kept (arq's job-id dedup would block re-dispatch while one is kept);
- arq's own timeout is longer than any task's, and arq never gives up on a doorbell: retries
  and timeouts are ours, counted in Postgres;
- Redis connections retry, so a blip does not end the worker;
- on SIGTERM arq stops taking jobs and waits `TASKLANE_SHUTDOWN_GRACE_SECONDS` for running
  ones; what is still running then is released back to pending without spending an attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import os
import signal
import socket
import sys
import uuid
from pathlib import Path
from typing import Any

from arq.constants import job_key_prefix
from arq.jobs import SerializationError, deserialize_job_raw
from arq.utils import ms_to_datetime, timestamp_ms
from arq.worker import Function, Worker, func
from redis.commands.core import AsyncScript

from domain.entities import Agent
from persistence import pg
from persistence.errors import find_postgres_error
from persistence.lifecycle import Lifecycle, LifecycleConfig
from persistence.repositories.flow_repository import Declared
from persistence.schema import SchemaError, check_schema
from persistence.session import PooledUnitOfWork
from persistence.startup import StartupError as StartupFailed
from persistence.startup import reach_database
from worker import metrics, tracing  # observability
from worker.agents import AgentSpec, load_agents
from worker.config import Settings, redact_url
from worker.dispatch import JOB_FUNCTION, Dispatcher
from worker.doorbell_jobs import START_DOORBELLS, DoorbellEnds, start_args
from worker.liveness import stamp_forever
from worker.logs import configure_logging, get_logger
from worker.loops import raise_if_cancelled
from worker.outage import REDIS_UNREACHABLE, RedisOutage
from worker.reconciler import Reconciler
from worker.redis_conn import create_arq_pool, redis_settings
from worker.runtime import WorkerRuntime
from worker.serialization import deserialize, serialize
from worker.watch import Watched

# arq polls its queue (one ZRANGEBYSCORE) every `poll_delay`; here the worker decides when to
# poll next (arq's own delay is 0). A busy worker polls every POLL_DELAY_SECONDS, so a doorbell
# waits a few ms at most; each poll that finds nothing new doubles the wait, up to
# IDLE_POLL_SECONDS: an idle worker polls Redis 20 times a second. (Polling as soon as a job
# frees a slot was faster — 1.09 against 0.90 of bare arq — but starved a second worker
# whose polls had backed off: tests/reliability/test_infrastructure.py's skewed-clock test.)
POLL_DELAY_SECONDS = 0.005
IDLE_POLL_SECONDS = 0.05


class StartupError(RuntimeError):
    """The worker cannot start; the message says why in one line."""


class TasklaneWorker(Worker):
    """arq's worker, hardened against junk in its queue and quicker to start jobs.

    arq's poll loop decodes each queue member's name as UTF-8 and turns its score into an int
    outside any error handling: one member with a non-UTF-8 name or a score of -inf, which
    anyone who can write to Redis can add, would end the worker process. Such members are
    removed (with their job keys) before arq sees them. Job payloads are checked by
    `worker.serialization`. (`arq worker.settings.WorkerSettings` builds arq's own class, which
    lacks this guard; `tasklane worker` uses this one.)

    For speed, measured with bench/run.py: the poll delay adapts (see POLL_DELAY_SECONDS), and
    a doorbell costs two script calls shared with the others of its poll and its finish, where
    arq spends two dozen Redis replies per job (`worker.doorbell_jobs`). Jobs it is already
    running, which arq reads again on every poll, are skipped without asking Redis.
    """

    _idle_wait = 0.0  # extra wait before the next poll, grown while polls find nothing
    _found_new = False
    _start_script: AsyncScript | None = None
    _ends: DoorbellEnds | None = None
    _outage: RedisOutage | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._log = get_logger("tasklane.worker")  # once: `_run_doorbell` logs through it
        # arq sleeps `poll_delay` between polls; this worker decides when to poll next itself
        # (`_poll_redis`, `_claim_from_postgres`), so arq's sleep would only add to it.
        self.poll_delay_s = 0.0

    def dump_tasks(self) -> None:
        """SIGUSR2: every asyncio task's stack on stderr — where a worker that does not stop, or
        does nothing, is waiting (py-spy shows threads, not coroutines)."""
        tasks = asyncio.all_tasks(self.loop)
        print(f"== {len(tasks)} asyncio tasks", file=sys.stderr)
        for task in tasks:
            print(f"-- {task!r:.300}", file=sys.stderr)
            for where in _awaiting(task.get_coro()):
                print(f"     {where}", file=sys.stderr)
        sys.stderr.flush()

    async def main(self) -> None:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            self.loop.add_signal_handler(signal.SIGUSR2, self.dump_tasks)
        # Our own pool, with socket timeouts and bounded retries (arq's settings have neither):
        # a Redis that stops answering is noticed within seconds, and the worker claims from
        # Postgres meanwhile instead of hanging in its poll loop.
        settings: Settings = self.ctx["settings"]
        if self._pool is None:
            self._pool = create_arq_pool(
                settings.redis_url,
                serializer=self.job_serializer,
                deserializer=self.job_deserializer,
                queue=self.queue_name,
                socket_timeout=settings.redis_timeout_seconds,
            )
        self._outage = RedisOutage(settings.redis_url, self._log)
        self.ctx["tasklane_outage"] = self._outage
        await super().main()

    async def _poll_iteration(self) -> None:
        raise_if_cancelled()  # arq stops the worker by cancelling this loop (worker.loops)
        outage = self._outage
        if outage is not None and outage.active and not await outage.redis_is_back():
            await self._claim_from_postgres(outage)
            return
        try:
            await self._poll_redis()
        except REDIS_UNREACHABLE as exc:
            metrics.backend_error("redis", "poll")  # observability
            if outage is None:
                raise
            outage.begin(exc)

    async def _poll_redis(self) -> None:
        self._found_new = False
        looked = self.job_counter < self.max_jobs
        await super()._poll_iteration()
        if self._found_new or not looked:
            self._idle_wait = 0.0
            await asyncio.sleep(POLL_DELAY_SECONDS)
            return
        self._idle_wait = min(max(2 * self._idle_wait, POLL_DELAY_SECONDS), IDLE_POLL_SECONDS)
        await asyncio.sleep(self._idle_wait)

    async def _claim_from_postgres(self, outage: RedisOutage) -> None:
        """Redis is away: fill the free slots with due tasks claimed straight from Postgres
        (`TaskRepository.find_pending_for_agent`, oldest due first)."""
        for name, job in list(self.tasks.items()):
            if job.done():
                del self.tasks[name]
        runtime: WorkerRuntime | None = self.ctx.get("tasklane")
        free = self.max_jobs - self.job_counter
        if runtime is None or free <= 0:
            await asyncio.sleep(outage.poll_seconds)
            return
        claimed = await outage.claim(runtime, free)
        for claimed_task in claimed:
            await self.sem.acquire()  # free slots were counted: this never waits
            self.job_counter += 1
            job = self.loop.create_task(runtime.run_claimed(claimed_task))
            job.add_done_callback(lambda _: self._release_sem_dec_counter_on_complete())
            self.tasks[f"postgres:{claimed_task.id}:{claimed_task.runs}"] = job
        # A poll that filled every free slot may have left more due tasks: look again soon.
        await asyncio.sleep(POLL_DELAY_SECONDS if len(claimed) == free else outage.poll_seconds)

    async def close(self) -> None:
        """arq's close, which ends without our shutdown (connections closed, the worker's row
        forgotten) when Redis is away: then that is done here."""
        try:
            await super().close()
        except REDIS_UNREACHABLE:
            if self.on_shutdown:
                await self.on_shutdown(self.ctx)
            with contextlib.suppress(Exception):
                await self.pool.close(close_connection_pool=True)
        if self._outage is not None:
            await self._outage.close()

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        not_utf8 = [job_id for job_id in job_ids if not _is_utf8(job_id)]
        if not_utf8:
            await self._discard(not_utf8)
        free = self.max_jobs - self.job_counter
        runtime: WorkerRuntime | None = self.ctx.get("tasklane")
        if runtime is not None:  # Postgres answering slowly, or not at all: take fewer
            free = runtime.doorbells_wanted(free)
        candidates = [
            job_id.decode()
            for job_id in job_ids
            if job_id not in not_utf8 and not self._running_here(job_id)
        ]
        if free <= 0 or not candidates:
            return
        if self._start_script is None:
            self._start_script = self.pool.register_script(START_DOORBELLS)
        in_progress_ms = int(self.in_progress_timeout_s * 1000)
        started, payloads, junk = await self._start_script(
            keys=[self.queue_name],
            args=start_args(timestamp_ms(), in_progress_ms, free, candidates),
        )
        if junk:
            await self._discard(junk)
        self._found_new = bool(started)
        for job_id, score, payload in zip(started[::2], started[1::2], payloads, strict=True):
            await self.sem.acquire()  # free slots were counted: this never waits
            self.job_counter += 1
            name = job_id.decode()
            task = self.loop.create_task(self._run_doorbell(name, float(score), payload))
            task.add_done_callback(lambda _: self._release_sem_dec_counter_on_complete())
            self.tasks[name] = task
            if runtime is not None:
                # Started, its claim not yet sent: the claim window counts it already (the
                # next poll may come first). It leaves the set when its job begins, or ends.
                runtime.starting.add(name)
                task.add_done_callback(functools.partial(_began, runtime.starting, name))

    async def _run_doorbell(self, job_id: str, score: float, payload: bytes | None) -> None:
        """arq's `run_job` for a doorbell started by `start_jobs`, whose payload came with it.
        arq's try counter is not kept: attempts are counted in Postgres."""
        log = self._log
        job = self._parse_job(job_id, int(score), payload, log)
        remove = True
        if job is not None:
            function, args, kwargs, ctx = job
            timeout = self.job_timeout_s if function.timeout_s is None else function.timeout_s
            try:
                async with asyncio.timeout(timeout):
                    await function.coroutine(ctx, *args, **kwargs)
                self.jobs_complete += 1
            except asyncio.CancelledError:
                # Shutdown: queue the doorbell again for the next worker, as arq does.
                self.jobs_retried += 1
                remove = False
            except Exception as exc:
                self.jobs_failed += 1
                log.error("doorbell.failed", job_id=job_id, error=f"{type(exc).__name__}: {exc}")
        else:
            self.jobs_failed += 1
        if self._ends is None:
            self._ends = DoorbellEnds(self.pool, self.queue_name)
        failed = await asyncio.shield(self._ends.end(job_id, remove=remove, score=score))
        if failed is not None:
            log.debug("doorbell.end_failed", job_id=job_id, error=repr(failed))

    def _parse_job(
        self, job_id: str, score: int, payload: bytes | None, log: Any
    ) -> tuple[Function, tuple[Any, ...], dict[str, Any], dict[str, Any]] | None:
        """The function, arguments and ctx of a doorbell's job; None (logged) for a job that
        expired, cannot be read or names no function of ours: its doorbell is removed."""
        if payload is None:
            log.warning("doorbell.expired", job_id=job_id)
            return None
        try:
            name, args, kwargs, _, enqueue_ms = deserialize_job_raw(
                payload, deserializer=self.job_deserializer
            )
        except SerializationError as exc:
            log.warning("doorbell.malformed", job_id=job_id, error=str(exc.__cause__ or exc))
            return None
        function = self.functions.get(name)
        if not isinstance(function, Function):
            log.warning("doorbell.unknown_function", job_id=job_id, function=name[:80])
            return None
        ctx = {
            **self.ctx,
            "job_id": job_id,
            "job_try": 1,
            "enqueue_time": ms_to_datetime(enqueue_ms),
            "score": score,
        }
        return function, tuple(args), kwargs, ctx

    def _running_here(self, job_id: bytes) -> bool:
        task = self.tasks.get(job_id.decode())
        return task is not None and not task.done()

    async def _discard(self, members: list[bytes]) -> None:
        async with self.pool.pipeline(transaction=False) as pipe:
            pipe.zrem(self.queue_name, *members)
            pipe.delete(*(job_key_prefix.encode() + member for member in members))
            await pipe.execute()
        self._log.warning(
            "queue.junk_removed",
            reason="a queue entry whose name is not UTF-8 or whose score is -inf",
            entries=[repr(member)[:80] for member in members[:10]],
            count=len(members),
        )


def _awaiting(coro: Any) -> list[str]:
    """Where a coroutine and those it awaits are suspended, outermost first."""
    places: list[str] = []
    while coro is not None and len(places) < 40:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "ag_frame", None)
        if frame is not None:
            places.append(f"{frame.f_code.co_filename}:{frame.f_lineno} {frame.f_code.co_name}")
        coro = getattr(coro, "cr_await", None) or getattr(coro, "ag_await", None)
    return places


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True


def new_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def job_timeout(settings: Settings, agents: dict[str, AgentSpec]) -> float:
    """arq's timeout for a doorbell job: longer than any handler may run plus its bookkeeping."""
    longest = max(
        [settings.task_timeout, *(a.timeout for a in agents.values() if a.timeout is not None)]
    )
    return longest + settings.lease_seconds + 60


def worker_options(settings: Settings, *, burst: bool = False) -> dict[str, Any]:
    """Keyword arguments for `arq.worker.Worker` (and the attributes of `WorkerSettings`)."""
    agents = load_agents(settings.agent_modules)
    timeout = job_timeout(settings, agents)
    return {
        "functions": [func(run_task, name=JOB_FUNCTION, timeout=timeout, max_tries=1_000_000)],
        "queue_name": settings.queue,
        "redis_settings": redis_settings(settings.redis_url),
        "on_startup": startup,
        "on_shutdown": shutdown,
        "max_jobs": settings.concurrency,
        "job_timeout": timeout,
        "keep_result": 0,
        "max_tries": 1_000_000,
        "poll_delay": POLL_DELAY_SECONDS,  # arq's own Worker; TasklaneWorker waits itself
        "queue_read_limit": max(100, settings.concurrency * 2),
        "job_serializer": serialize,
        "job_deserializer": deserialize,
        "job_completion_wait": math.ceil(settings.shutdown_grace_seconds),
        "burst": burst,
        "log_results": False,
        "ctx": {"settings": settings, "agents": agents},
    }


def _began(starting: set[str], name: str, _: object) -> None:
    starting.discard(name)


async def run_task(ctx: dict[str, Any], *args: Any, **kwargs: Any) -> None:
    """The arq job: a doorbell for one task. Its only argument is the task id."""
    runtime: WorkerRuntime = ctx["tasklane"]
    runtime.starting.discard(ctx.get("job_id", ""))
    await runtime.run(args[0] if len(args) == 1 and not kwargs else (args, kwargs))


async def startup(ctx: dict[str, Any]) -> None:
    settings: Settings = ctx["settings"]
    agents: dict[str, AgentSpec] = ctx["agents"]
    configure_logging(fmt=settings.log_format, level=settings.log_level)
    log = get_logger("tasklane.worker")
    try:
        await _start(ctx, settings, agents, log)
    except Exception as exc:
        # One line, not a traceback from deep inside a driver; the cause is logged at DEBUG.
        log.debug("worker.startup_traceback", exc_info=exc)
        log.error("worker.startup_failed", error=_startup_reason(exc))
        await shutdown(ctx)
        raise SystemExit(1) from None


def _startup_reason(exc: Exception) -> str:
    if isinstance(exc, StartupError):
        return str(exc)
    pg_error = find_postgres_error(exc)
    detail = pg_error.args[0] if pg_error is not None and pg_error.args else str(exc)
    first_line = str(detail).strip().splitlines()[0] if str(detail).strip() else ""
    return f"startup failed: {first_line or type(exc).__name__}"


async def _start(
    ctx: dict[str, Any], settings: Settings, agents: dict[str, AgentSpec], log: Any
) -> None:
    worker_id = new_worker_id()
    # `arq worker.settings.WorkerSettings` starts here with no preflight: the first connection
    # waits for PostgreSQL too (one line per wait), as `tasklane worker`'s does.
    try:
        await reach_database(
            settings.database_url,
            wait_seconds=settings.startup_wait_seconds,
            create=False,
            say=lambda line: log.info("worker.waiting_for_postgres", detail=line),
        )
    except StartupFailed as exc:
        raise StartupError(str(exc)) from None
    try:
        pool = await pg.create_pool(
            settings.database_url,
            max_size=settings.db_pool_size,
            statement_cache=settings.db_statement_cache,
            application_name=f"tasklane-worker {worker_id}",
            timeouts=settings.db_timeouts,
        )
    except Exception as exc:
        raise StartupError(_unreachable(settings, exc)) from None
    ctx["tasklane_pool"] = pool
    try:
        async with pool.acquire() as conn:
            await check_schema(conn)
    except SchemaError as exc:
        raise StartupError(str(exc)) from None

    await _register_agents(pool, agents, queue=settings.queue)

    runtime: WorkerRuntime | None = None
    lifecycle = Lifecycle(
        pool,
        LifecycleConfig(
            worker_id=worker_id,
            lease_seconds=settings.lease_seconds,
            default_max_attempts=settings.max_attempts,
            retry_base_seconds=settings.retry_base_seconds,
            retry_max_seconds=settings.retry_max_seconds,
            redispatch_seconds=settings.redispatch_seconds,
            queue=settings.queue,
        ),
        busy=lambda: runtime is not None and runtime.busy(),
    )
    ctx["tasklane_lifecycle"] = lifecycle
    dispatcher = Dispatcher(ctx["redis"], settings.queue)
    watched = Watched(ctx["redis"])
    runtime = WorkerRuntime(
        settings=settings,
        worker_id=worker_id,
        lifecycle=lifecycle,
        dispatcher=dispatcher,
        agents=agents,
        watched=watched,
    )
    if settings.metrics_port is not None:  # observability
        _serve_metrics(settings, agents, runtime)
    try:  # observability
        tracing.start(settings.tracing)
    except tracing.TracingError as exc:
        raise StartupError(str(exc)) from None
    outage: RedisOutage | None = ctx.get("tasklane_outage")
    reconciler = Reconciler(
        lifecycle=lifecycle,
        dispatcher=dispatcher,
        settings=settings,
        agents=list(agents),
        log=log,
        redis_away=lambda: outage is not None and outage.active,
        abandoned=lambda: len(runtime.abandoned),
        watched=watched,
    )
    # One pass before the first poll: tasks already due are dispatched (a burst worker then
    # sees them), the worker row exists, expired leases are rescued.
    await reconciler.tick()
    ctx["tasklane"] = runtime
    ctx["tasklane_background"] = [
        asyncio.create_task(runtime.heartbeat.run_forever(), name="tasklane-heartbeat"),
        asyncio.create_task(reconciler.run_forever(), name="tasklane-reconciler"),
        asyncio.create_task(
            stamp_forever(Path(settings.liveness_path), log=log), name="tasklane-liveness"
        ),
    ]
    log.info(
        "worker.started",
        worker_id=worker_id,
        agents=sorted(agents),
        settings=settings.describe(),
    )


def _serve_metrics(  # observability
    settings: Settings, agents: dict[str, AgentSpec], runtime: WorkerRuntime
) -> None:
    assert settings.metrics_port is not None
    try:
        metrics.start(
            port=settings.metrics_port,
            host=settings.metrics_host,
            queue=settings.queue,
            agents=agents,
            concurrency=settings.concurrency,
            busy=lambda: runtime.in_flight,
        )
    except metrics.MetricsError as exc:
        raise StartupError(str(exc)) from None


async def _register_agents(pool: Any, agents: dict[str, AgentSpec], *, queue: str) -> None:
    """The agents this worker serves, and the flow limits their code declares on its queue."""
    async with PooledUnitOfWork(pool, transaction=True) as uow:
        await uow.flow.declare(queue, [spec.flow or Declared(spec.id) for spec in agents.values()])
        for spec in agents.values():
            await uow.agents.upsert(
                Agent(
                    id=spec.id,
                    description=spec.description,
                    max_attempts=spec.max_attempts,
                    timeout_seconds=spec.timeout,
                )
            )
        await uow.commit()


def _unreachable(settings: Settings, exc: BaseException) -> str:
    reason = str(exc) or type(exc).__name__
    return f"cannot connect to PostgreSQL at {redact_url(settings.database_url)}: {reason}"


async def shutdown(ctx: dict[str, Any]) -> None:
    log = get_logger("tasklane.worker")
    for task in ctx.pop("tasklane_background", []):
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
    lifecycle: Lifecycle | None = ctx.pop("tasklane_lifecycle", None)
    if lifecycle is not None:
        with contextlib.suppress(Exception):
            await lifecycle.forget_worker()
        await lifecycle.close()
    elif (pool := ctx.pop("tasklane_pool", None)) is not None:
        await pool.close()
    metrics.stop()  # observability
    tracing.stop()  # observability
    if ctx.pop("tasklane", None) is not None:
        log.info("worker.stopped")
