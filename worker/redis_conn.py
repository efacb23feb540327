"""Redis connections with retries, so that a blip or a restart does not end the worker.

redis-py's default is to give up at the first connection error, which would take arq's poll
loop (and the process) down with it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import BusyLoadingError, ConnectionError, TimeoutError

# arq is imported by what uses it (a worker), not by `tasklane health`, which pings Redis only.
if TYPE_CHECKING:
    from arq.connections import ArqRedis, RedisSettings
    from arq.jobs import Deserializer, Serializer

# ~60 s of retrying (backoff capped at 1 s) before a command gives up.
_RETRIES = 60
# A worker retries for a few seconds only (a blip), then claims from Postgres (worker.outage).
WORKER_RETRIES = 8
# How long a command may wait for Redis's answer: a Redis that accepts connections but never
# answers must not hang a worker or a producer.
SOCKET_TIMEOUT_SECONDS = 5.0
# OSError: a refused or reset connect. redis-py retries commands on its own ConnectionError, but
# (re)connecting a pooled connection before a command (after Redis went away while the connection
# sat idle) retries only the errors listed here; without OSError the first refused connect
# raised straight into arq's poll loop and ended the worker.
_RETRY_ON = [ConnectionError, TimeoutError, BusyLoadingError, OSError]


def _retry(retries: int = _RETRIES) -> Retry:
    return Retry(ExponentialBackoff(cap=1.0, base=0.05), retries=retries)


def redis_settings(url: str) -> RedisSettings:
    """arq's settings for `url`, with retries."""
    from arq.connections import RedisSettings

    settings = RedisSettings.from_dsn(url)
    settings.conn_timeout = 2
    settings.conn_retries = 2
    settings.conn_retry_delay = 1
    settings.retry_on_timeout = True
    settings.retry_on_error = list(_RETRY_ON)
    settings.retry = _retry()
    return settings


def _client_options(retries: int, socket_timeout: float | None) -> dict[str, Any]:
    return {
        "socket_connect_timeout": 2,
        "socket_timeout": socket_timeout,
        "retry": _retry(retries),
        "retry_on_timeout": True,
        "retry_on_error": list(_RETRY_ON),
        "health_check_interval": 30,
    }


def create_redis(
    url: str, *, retries: int = _RETRIES, socket_timeout: float | None = SOCKET_TIMEOUT_SECONDS
) -> Redis:
    """A client for `url`. Producers pass few `retries`: a doorbell that cannot be rung is rung
    later by the reconciler, so a submit should not hang while Redis is away. `socket_timeout`
    None: no timeout per reply, for a caller that bounds each of its calls as a whole."""
    client: Redis = Redis.from_url(url, **_client_options(retries, socket_timeout))
    return client


def create_arq_pool(
    url: str,
    *,
    serializer: Serializer | None,
    deserializer: Deserializer | None,
    queue: str,
    retries: int = WORKER_RETRIES,
    socket_timeout: float = SOCKET_TIMEOUT_SECONDS,
) -> ArqRedis:
    """arq's Redis client for a worker, as `arq.connections.create_pool` makes it, with socket
    timeouts and bounded retries. It connects on first use."""
    from arq.connections import ArqRedis

    pool: ArqRedis = ArqRedis.from_url(url, **_client_options(retries, socket_timeout))
    pool.job_serializer = serializer
    pool.job_deserializer = deserializer
    pool.default_queue_name = queue
    return pool
