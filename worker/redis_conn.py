"""Redis connections with retries, so that a blip or a restart does not end the worker.

redis-py's default is to give up at the first connection error, which would take arq's poll
loop (and the process) down with it.
"""

from __future__ import annotations

from arq.connections import RedisSettings
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import BusyLoadingError, ConnectionError, TimeoutError

# ~60 s of retrying (backoff capped at 1 s) before a command gives up.
_RETRIES = 60
# OSError: a refused or reset connect. redis-py retries commands on its own ConnectionError, but
# (re)connecting a pooled connection before a command (after Redis went away while the connection
# sat idle) retries only the errors listed here; without OSError the first refused connect
# raised straight into arq's poll loop and ended the worker.
_RETRY_ON = [ConnectionError, TimeoutError, BusyLoadingError, OSError]


def _retry(retries: int = _RETRIES) -> Retry:
    return Retry(ExponentialBackoff(cap=1.0, base=0.05), retries=retries)


def redis_settings(url: str) -> RedisSettings:
    """arq's settings for `url`, with retries."""
    settings = RedisSettings.from_dsn(url)
    settings.conn_timeout = 2
    settings.conn_retries = 2
    settings.conn_retry_delay = 1
    settings.retry_on_timeout = True
    settings.retry_on_error = list(_RETRY_ON)
    settings.retry = _retry()
    return settings


def create_redis(url: str, *, retries: int = _RETRIES) -> Redis:
    """A client for `url`. Producers pass few `retries`: a doorbell that cannot be rung is rung
    later by the reconciler, so a submit should not hang while Redis is away."""
    client: Redis = Redis.from_url(
        url,
        socket_connect_timeout=2,
        retry=_retry(retries),
        retry_on_timeout=True,
        retry_on_error=list(_RETRY_ON),
        health_check_interval=30,
    )
    return client
