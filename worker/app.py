"""The worker's wiring: arq options, startup and shutdown, the `run_task` job.

`arq worker.settings.WorkerSettings` and `tasklane worker` both run this.

The settings class only wires things together; everything a job needs is built once at startup
and put in arq's `ctx`. Choices that matter (see DESIGN.md §4):
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
import math
import os
import socket
import uuid
from typing import Any

from arq.constants import job_key_prefix
from arq.worker import Worker, func
from sqlalchemy.ext.asyncio import AsyncEngine

from domain.entities import Agent
from persistence import pg
from persistence.errors import find_postgres_error
from persistence.schema import SchemaError, check_schema
from persistence.session import UnitOfWork, create_engine, create_session_factory
from persistence.store import LifecycleConfig, LifecycleStore
from worker.agents import AgentSpec, load_agents
from worker.config import Settings, redact_url
from worker.dispatch import JOB_FUNCTION, Dispatcher
from worker.logs import configure_logging, get_logger
from worker.reconciler import Reconciler
from worker.redis_conn import redis_settings
from worker.runtime import WorkerRuntime
from worker.serialization import deserialize, serialize

# How long arq waits for an idle queue before polling again. The poll is one ZRANGEBYSCORE;
# at this delay an idle worker polls Redis 20 times a second.
POLL_DELAY_SECONDS = 0.05


class StartupError(RuntimeError):
    """The worker cannot start; the message says why in one line."""


class TasklaneWorker(Worker):
    """arq's worker, hardened against junk in its queue.

    arq's poll loop decodes each queue member's name as UTF-8 and turns its score into an int
    outside any error handling: one member with a non-UTF-8 name or a score of -inf, which
    anyone who can write to Redis can add, would end the worker process. Such members are
    removed (with their job keys) before arq sees them. Job payloads are checked by
    `worker.serialization`. (`arq worker.settings.WorkerSettings` builds arq's own class, which
    lacks this guard; `tasklane worker` uses this one.)
    """

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        if job_ids:
            junk = {job_id for job_id in job_ids if not _is_utf8(job_id)}
            junk.update(await self.pool.zrangebyscore(self.queue_name, "-inf", "-inf"))
            if junk:
                await self._discard(sorted(junk))
                job_ids = [job_id for job_id in job_ids if job_id not in junk]
        await super().start_jobs(job_ids)

    async def _discard(self, members: list[bytes]) -> None:
        async with self.pool.pipeline(transaction=False) as pipe:
            pipe.zrem(self.queue_name, *members)
            pipe.delete(*(job_key_prefix.encode() + member for member in members))
            await pipe.execute()
        get_logger("tasklane.worker").warning(
            "queue.junk_removed",
            reason="a queue entry whose name is not UTF-8 or whose score is -inf",
            entries=[repr(member)[:80] for member in members[:10]],
            count=len(members),
        )


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
        "poll_delay": POLL_DELAY_SECONDS,
        "queue_read_limit": max(100, settings.concurrency * 2),
        "job_serializer": serialize,
        "job_deserializer": deserialize,
        "job_completion_wait": math.ceil(settings.shutdown_grace_seconds),
        "burst": burst,
        "log_results": False,
        "ctx": {"settings": settings, "agents": agents},
    }


async def run_task(ctx: dict[str, Any], *args: Any, **kwargs: Any) -> None:
    """The arq job: a doorbell for one task. Its only argument is the task id."""
    runtime: WorkerRuntime = ctx["tasklane"]
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
    try:
        pool = await pg.create_pool(
            settings.database_url,
            max_size=settings.db_pool_size,
            statement_cache=settings.db_statement_cache,
            application_name=f"tasklane-worker {worker_id}",
        )
    except Exception as exc:
        raise StartupError(_unreachable(settings, exc)) from None
    ctx["tasklane_pool"] = pool
    try:
        async with pool.acquire() as conn:
            await check_schema(conn)
    except SchemaError as exc:
        raise StartupError(str(exc)) from None

    engine = create_engine(
        settings.database_url,
        pool_size=max(1, min(5, settings.db_pool_size)),
        max_overflow=0,
        statement_cache=settings.db_statement_cache,
        application_name=f"tasklane-worker {worker_id}",
    )
    ctx["tasklane_engine"] = engine
    session_factory = create_session_factory(engine)
    await _register_agents(session_factory, agents)

    runtime: WorkerRuntime | None = None
    store = LifecycleStore(
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
    ctx["tasklane_store"] = store
    dispatcher = Dispatcher(ctx["redis"], settings.queue)
    runtime = WorkerRuntime(
        settings=settings,
        worker_id=worker_id,
        store=store,
        dispatcher=dispatcher,
        agents=agents,
        session_factory=session_factory,
    )
    reconciler = Reconciler(
        store=store, dispatcher=dispatcher, settings=settings, agents=list(agents), log=log
    )
    # One pass before the first poll: tasks already due are dispatched (a burst worker then
    # sees them), the worker row exists, expired leases are rescued.
    await reconciler.tick()
    ctx["tasklane"] = runtime
    ctx["tasklane_background"] = [
        asyncio.create_task(runtime.heartbeat.run_forever(), name="tasklane-heartbeat"),
        asyncio.create_task(reconciler.run_forever(), name="tasklane-reconciler"),
    ]
    log.info(
        "worker.started",
        worker_id=worker_id,
        agents=sorted(agents),
        settings=settings.describe(),
    )


async def _register_agents(session_factory: Any, agents: dict[str, AgentSpec]) -> None:
    async with UnitOfWork(session_factory) as uow:
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
    store: LifecycleStore | None = ctx.pop("tasklane_store", None)
    if store is not None:
        with contextlib.suppress(Exception):
            await store.forget_worker()
        await store.close()
    elif (pool := ctx.pop("tasklane_pool", None)) is not None:
        await pool.close()
    engine: AsyncEngine | None = ctx.pop("tasklane_engine", None)
    if engine is not None:
        await engine.dispose()
    if ctx.pop("tasklane", None) is not None:
        log.info("worker.stopped")
