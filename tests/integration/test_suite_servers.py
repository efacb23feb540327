"""The suite's own servers: embedded ones when nothing answers at the configured addresses, and
private servers run from the embedded packages' programs, so that no test needs a server or a
server program installed on the machine (tests/support/servers.py, tests/support/tools.py)."""

from __future__ import annotations

import asyncpg
import pytest
import redis

from tests.support import servers
from tests.support.databases import plain_url_for
from tests.support.pgcluster import PrivatePostgres
from tests.support.services import PrivateRedis
from tests.support.tools import embedded_postgres, embedded_redis_server

NOWHERE_POSTGRES = "postgresql://postgres@127.0.0.1:1/postgres"
NOWHERE_REDIS = "redis://127.0.0.1:1/14"


async def postgres_version(server_url: str) -> str:
    conn = await asyncpg.connect(plain_url_for("postgres", server_url))
    try:
        return str(await conn.fetchval("SHOW server_version"))
    finally:
        await conn.close()


def redis_version(url: str) -> str:
    client = redis.Redis.from_url(url)
    try:
        return str(client.info("server")["redis_version"])
    finally:
        client.close()


async def test_nothing_answering_starts_embedded_servers_until_the_session_ends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(servers.POSTGRES_ENV, NOWHERE_POSTGRES)
    monkeypatch.setenv(servers.REDIS_ENV, NOWHERE_REDIS)
    fallback = servers.Fallback().start()
    try:
        postgres, redis_url = servers.postgres_url(), servers.redis_url()
        assert NOWHERE_POSTGRES not in postgres
        assert redis_url.endswith("/14")
        assert (await postgres_version(postgres)).startswith("16.")
        assert redis_version(redis_url)
        assert fallback.report == [
            f"PostgreSQL: embedded at {postgres} (none at {NOWHERE_POSTGRES})",
            f"Redis: embedded at {redis_url} (none at {NOWHERE_REDIS})",
        ]
    finally:
        fallback.stop()
    assert not servers.answers(postgres, 5432)
    assert not servers.answers(redis_url, 6379)


def test_servers_that_answer_are_used_as_configured() -> None:
    configured = servers.postgres_url(), servers.redis_url()
    fallback = servers.Fallback().start()
    try:
        assert (servers.postgres_url(), servers.redis_url()) == configured
        assert fallback.servers == []
    finally:
        fallback.stop()


async def test_private_servers_run_from_the_embedded_programs() -> None:
    postgres = PrivatePostgres(embedded_postgres()).start()
    try:
        assert (await postgres_version(postgres.server_url)).startswith("16.")
        postgres.restart()
        assert (await postgres_version(postgres.server_url)).startswith("16.")
    finally:
        postgres.stop()

    private_redis = PrivateRedis(embedded_redis_server()).start()
    try:
        assert redis_version(private_redis.url)
        private_redis.restart()
        assert redis_version(private_redis.url)
    finally:
        private_redis.stop()
