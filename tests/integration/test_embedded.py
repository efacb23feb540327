"""worker.embedded: real PostgreSQL and Redis servers from the dev extra's wheels, owned through a
lock, kept between runs, shared or adopted."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
import redis

from tests.support.databases import ROOT
from tests.support.dev import alive, server_processes, shared_folder
from worker.embedded import EmbeddedPostgres, EmbeddedRedis, InUse, Opened, binaries

pytestmark = pytest.mark.slow


@pytest.fixture
def folder() -> Iterator[Path]:
    with shared_folder() as path:
        yield path
        for name in ("postgres", "redis", "server"):  # whatever a failing test left running
            for server in (EmbeddedPostgres(path / name), EmbeddedRedis(path / name)):
                with contextlib.suppress(Exception):
                    server.stop()


def pg_value(url: str, sql: str) -> object:
    async def query() -> object:
        conn = await asyncpg.connect(url)
        try:
            return await conn.fetchval(sql)
        finally:
            await conn.close()

    return asyncio.run(query())


def test_the_binaries_are_there_and_run() -> None:
    found = binaries()
    version = subprocess.run(
        [str(found.postgres), "--version"], capture_output=True, text=True, check=True
    )
    assert "PostgreSQL) 16." in version.stdout
    for program in (found.initdb, found.pg_ctl, found.psql):
        subprocess.run([str(program), "--version"], capture_output=True, check=True)
    server = subprocess.run(
        [str(found.redis_server), "--version"], capture_output=True, text=True, check=True
    )
    assert "v=" in server.stdout


def test_postgres_is_created_then_kept_then_wiped(folder: Path) -> None:
    pg = EmbeddedPostgres(folder / "postgres")
    assert pg.open() is Opened.CREATED
    port = pg.port
    pg_value(pg.url(), "CREATE TABLE kept (x int)")
    pg.close()
    assert not pg.running()

    assert pg.open() is Opened.STARTED
    assert pg.port == port  # the URLs a developer pasted elsewhere stay right
    assert pg_value(pg.url(), "SELECT to_regclass('kept') IS NOT NULL") is True
    pg.close()

    assert pg.open(fresh=True) is Opened.CREATED
    assert pg_value(pg.url(), "SELECT to_regclass('kept') IS NOT NULL") is False
    pg.close()


def test_redis_keeps_its_data_between_runs(folder: Path) -> None:
    server = EmbeddedRedis(folder / "redis")
    assert server.open() is Opened.CREATED
    client = redis.Redis.from_url(server.url())
    client.set("kept", "yes")
    client.close()
    server.close()
    assert not server.running()

    assert server.open() is Opened.STARTED
    client = redis.Redis.from_url(server.url())
    assert client.get("kept") == b"yes"
    client.close()
    server.close()

    assert server.open(fresh=True) is Opened.CREATED
    client = redis.Redis.from_url(server.url())
    assert client.get("kept") is None
    client.close()
    server.close()


@pytest.mark.parametrize("kind", [EmbeddedPostgres, EmbeddedRedis])
def test_an_owned_server_is_in_use_for_others_unless_shared(
    folder: Path, kind: type[EmbeddedPostgres] | type[EmbeddedRedis]
) -> None:
    owner = kind(folder / "server")
    owner.open()
    other = kind(folder / "server")
    with pytest.raises(InUse, match="is in use by process") as caught:
        other.open()
    assert caught.value.pid is not None
    assert other.open(share=True) is Opened.SHARED
    other.close()
    assert owner.running()  # a sharer never stops it
    owner.close()
    assert not owner.running()


@pytest.mark.parametrize("kind", ["EmbeddedPostgres", "EmbeddedRedis"])
def test_a_server_whose_owner_died_is_adopted(folder: Path, kind: str) -> None:
    # An owner killed without a chance to stop its server (os._exit: no cleanup runs).
    subprocess.run(
        [
            sys.executable,
            "-c",
            "import os, sys; from worker import embedded; "
            f"embedded.{kind}(sys.argv[1]).open(); os._exit(0)",
            str(folder / "server"),
        ],
        cwd=ROOT,
        check=True,
        timeout=120,
    )
    server = {"EmbeddedPostgres": EmbeddedPostgres, "EmbeddedRedis": EmbeddedRedis}[kind](
        folder / "server"
    )
    assert server.running()
    assert server.open() is Opened.REUSED
    server.close()
    assert not server.running()


def test_a_port_taken_meanwhile_is_given_up_for_a_free_one(folder: Path) -> None:
    pg = EmbeddedPostgres(folder / "postgres")
    pg.open()
    port = pg.port
    pg.close()
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        pg.open()
        try:
            assert pg.port != port
            assert pg_value(pg.url(), "SELECT 1") == 1
        finally:
            pg.close()


def test_close_leaves_no_process(folder: Path) -> None:
    pg = EmbeddedPostgres(folder / "postgres")
    server = EmbeddedRedis(folder / "redis")
    pg.open()
    server.open()
    started = server_processes(folder)
    assert set(started) == {"postgres", "redis-server"}
    assert len(started["postgres"]) > 1  # the postmaster and its background processes
    pg.close()
    server.close()
    assert not [pid for pids in started.values() for pid in pids if alive(pid)]
