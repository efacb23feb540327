"""Following a task as it changes: `TaskClient.watch` and `tasklane show --follow`.

Events travel on Redis pub/sub, one channel per task (`tasklane:task:<id>`), and only for tasks
someone follows: a follower adds the task to the sorted set `tasklane:watched` (scored by when
its interest lapses, renewed while it follows), and each worker reads that set once per reconcile
tick — one Redis call per worker per tick, none per task — and publishes the claims, progress and
finishes of those tasks. Postgres stays the truth: a follower reads the task's row when it starts,
after a reconnect, and every `SAFETY_POLL_SECONDS` without news (changes no worker publishes — a
rescue, a timer's wake — show up then), never once a second per follower.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any
from uuid import UUID

from redis.asyncio import Redis

WATCHED_KEY = "tasklane:watched"
INTEREST_SECONDS = 60.0  # a follower's interest lapses this long after its last renewal
SAFETY_POLL_SECONDS = 5.0


def channel(task_id: UUID | str) -> str:
    return f"tasklane:task:{task_id}"


class Watched:
    """The tasks someone follows, as this worker last read them (refreshed every tick)."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self.ids: frozenset[str] = frozenset()

    async def refresh(self) -> None:
        now = time.time()
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zremrangebyscore(WATCHED_KEY, "-inf", now)
            pipe.zrangebyscore(WATCHED_KEY, now, "+inf")
            _, members = await pipe.execute()
        self.ids = frozenset(m.decode() if isinstance(m, bytes) else str(m) for m in members)

    def __contains__(self, task_id: object) -> bool:
        return str(task_id) in self.ids

    async def publish(self, task_id: UUID, event: Mapping[str, Any]) -> None:
        """Publish `event` for a followed task (nothing for the others)."""
        if str(task_id) in self.ids:
            await self.redis.publish(channel(task_id), json.dumps(dict(event), default=str))


async def follow(redis: Redis, task_id: UUID) -> None:
    """Say that `task_id` is followed, for the next INTEREST_SECONDS."""
    await redis.zadd(WATCHED_KEY, {str(task_id): time.time() + INTEREST_SECONDS})
