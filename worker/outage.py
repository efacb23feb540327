"""Redis is an accelerator, not a dependency: while it is away, a worker claims from Postgres.

Doorbells in Redis only say "task X may be claimable now"; Postgres decides. When a worker's poll
of its Redis queue fails (Redis stopped, unreachable, not answering within its timeout), the
worker claims due tasks of the agents it serves straight from Postgres instead
(`TaskRepository.find_pending_for_agent` with FOR UPDATE SKIP LOCKED, oldest due first, no more
than its free slots), and probes Redis every `PROBE_SECONDS`; once Redis answers, it goes back to
doorbells. Claims are the same fenced statement as ever, so a task is never run twice because of
the switch, whichever way a doorbell and a Postgres poll meet.

What this mode costs Postgres: one short transaction per poll per worker (an index scan of due
pending tasks of its agents, then the claim), `1 / POLL_SECONDS` times a second when idle and
more often while polls keep filling every free slot.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from domain.entities import Task
from worker.redis_conn import create_redis

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from worker.runtime import WorkerRuntime

# What a Redis that is away looks like from redis-py: refused or reset connections, timeouts.
REDIS_UNREACHABLE: tuple[type[BaseException], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    OSError,
    TimeoutError,
)

POLL_SECONDS = 0.2  # between claims from Postgres while polls find less than the free slots
PROBE_SECONDS = 1.0  # between pings of Redis while it is away
PROBE_TIMEOUT_SECONDS = 1.0


class RedisOutage:
    """Whether this worker is claiming from Postgres because Redis is away, and since when."""

    poll_seconds = POLL_SECONDS

    def __init__(self, redis_url: str, log: Any) -> None:
        self._redis_url = redis_url
        self._log = log
        self._since: float | None = None
        self._last_probe = 0.0
        self._claimed = 0
        self._probe: Redis | None = None

    @property
    def active(self) -> bool:
        return self._since is not None

    def begin(self, exc: BaseException) -> None:
        self._since = time.monotonic()
        self._last_probe = self._since
        self._claimed = 0
        self._log.error(
            "redis.unreachable",
            error=repr(exc)[:300],
            action="claiming due tasks from Postgres until Redis answers",
        )

    async def redis_is_back(self) -> bool:
        """Ping Redis (at most every PROBE_SECONDS, no retries); True once, when it answers."""
        now = time.monotonic()
        if self._since is None or now - self._last_probe < PROBE_SECONDS:
            return False
        self._last_probe = now
        if self._probe is None:
            self._probe = create_redis(
                self._redis_url, retries=0, socket_timeout=PROBE_TIMEOUT_SECONDS
            )
        try:
            await asyncio.wait_for(self._probe.ping(), PROBE_TIMEOUT_SECONDS)
        except REDIS_UNREACHABLE:  # asyncio.TimeoutError is TimeoutError, in it
            return False
        self._log.warning(
            "redis.reachable",
            away_seconds=round(now - self._since, 1),
            claimed_from_postgres=self._claimed,
            action="back to doorbells",
        )
        self._since = None
        return True

    async def claim(self, runtime: WorkerRuntime, free: int) -> list[Task]:
        try:
            claimed = await runtime.claim_due(free)
        except Exception as exc:  # Postgres away too: nothing to do but wait for either
            self._log.warning("postgres_mode.claim_failed", error=repr(exc)[:300])
            return []
        if claimed:
            self._claimed += len(claimed)
            self._log.info("postgres_mode.claimed", count=len(claimed))
        return claimed

    async def close(self) -> None:
        if self._probe is not None:
            await self._probe.aclose()
