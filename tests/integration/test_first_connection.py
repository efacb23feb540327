"""The first connection to PostgreSQL, as `tasklane migrate` and `tasklane worker` make it: the
database created when missing (or the `createdb` to run), a server that opens late waited for —
one line per wait, for a bounded time."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from collections.abc import Iterator

import asyncpg
import pytest

from persistence.schema import SCHEMA_REVISION
from tests.support import databases, db, servers
from tests.support.pgproxy import PgProxy
from tests.support.services import free_port
from tests.support.workers import make_settings, settings_env

WAIT_LINE = re.compile(
    r"^tasklane: waiting for PostgreSQL at 127\.0\.0\.1:(\d+) \((.+)\); "
    r"trying again in (\d+\.\d)s, for (\d+)s more at most$"
)


def cli(database_url: str, *args: str, wait: float = 0) -> subprocess.Popen[str]:
    settings = make_settings(database_url, "redis://127.0.0.1:1/0", "unused")
    env = settings_env(settings, {"TASKLANE_STARTUP_WAIT_SECONDS": str(wait)})
    return subprocess.Popen(
        [sys.executable, "-m", "worker.cli", *args],
        env=env,
        cwd=databases.ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen[str]) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=120)
    return process.returncode, out, err


@pytest.fixture
def missing_database() -> Iterator[str]:
    """A database name nobody created; dropped afterwards in case a test created it."""
    name = databases.unique_name()
    yield name
    asyncio.run(databases.drop_database(name))


async def _exists(name: str) -> bool:
    found = await db.value(
        databases.url_for("postgres"), f"SELECT count(*) FROM pg_database WHERE datname = '{name}'"
    )
    return bool(found)


def test_migrate_creates_a_missing_database(missing_database: str) -> None:
    code, out, err = finish(cli(databases.url_for(missing_database), "migrate"))
    assert code == 0, err
    assert err.splitlines() == [
        f'tasklane: created database "{missing_database}" on 127.0.0.1:5432'
    ]
    assert "is at the latest schema revision" in out
    revision = asyncio.run(
        db.value(databases.url_for(missing_database), "SELECT version_num FROM alembic_version")
    )
    assert revision == SCHEMA_REVISION

    # Again: nothing to create, nothing said.
    code, out, err = finish(cli(databases.url_for(missing_database), "migrate"))
    assert (code, err) == (0, "")


@pytest.fixture
def role_without_createdb() -> Iterator[str]:
    role = databases.unique_name("tasklane_test_role")
    admin = databases.plain_url_for("postgres")

    async def run(sql: str) -> None:
        conn = await asyncpg.connect(admin)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(run(f'CREATE ROLE "{role}" LOGIN NOCREATEDB'))
    yield role
    asyncio.run(run(f'DROP ROLE IF EXISTS "{role}"'))


def test_a_role_that_may_not_create_databases_gets_the_createdb_to_run(
    missing_database: str, role_without_createdb: str
) -> None:
    url = f"postgresql://{role_without_createdb}@127.0.0.1:5432/{missing_database}"
    code, out, err = finish(cli(url, "migrate"))
    assert code == 1
    assert out == ""
    [line] = err.splitlines()
    assert f'database "{missing_database}" does not exist on 127.0.0.1:5432' in line
    assert f'role "{role_without_createdb}" may not create databases' in line
    assert f"`createdb -h 127.0.0.1 -p 5432 -O {role_without_createdb} {missing_database}`" in line
    assert not asyncio.run(_exists(missing_database))


def test_the_worker_does_not_create_the_database_and_names_migrate(missing_database: str) -> None:
    code, _, err = finish(cli(databases.url_for(missing_database), "worker"))
    assert code == 1
    [line] = err.splitlines()
    assert f'database "{missing_database}" does not exist' in line
    assert "`tasklane migrate` creates it" in line
    assert not asyncio.run(_exists(missing_database))


def test_migrate_waits_for_a_server_that_opens_late(missing_database: str) -> None:
    port = free_port()
    url = f"postgresql://postgres@127.0.0.1:{port}/{missing_database}"
    process = cli(url, "migrate", wait=120)
    assert process.stderr is not None
    waits = [process.stderr.readline() for _ in range(2)]  # it is waiting, and says so each time
    proxy = PgProxy(servers.postgres_url()).start(port=port)  # the server "comes up"
    try:
        code, out, err = finish(process)
    finally:
        proxy.stop()
    assert code == 0, err
    lines = [line.rstrip("\n") for line in waits] + err.splitlines()
    *waited, created = lines
    assert len(waited) >= 2
    for line in waited:
        match = WAIT_LINE.match(line)
        assert match, line
        assert match[1] == str(port)
    assert created == f'tasklane: created database "{missing_database}" on 127.0.0.1:{port}'
    assert "is at the latest schema revision" in out


def test_migrate_gives_up_after_the_startup_wait() -> None:
    port = free_port()  # nothing ever listens here
    code, out, err = finish(
        cli(f"postgresql://postgres@127.0.0.1:{port}/tasklane", "migrate", wait=2)
    )
    assert code == 1
    assert out == ""
    *waited, last = err.splitlines()
    assert waited, "no wait was announced"
    pauses = []
    for line in waited:
        match = WAIT_LINE.match(line)
        assert match, line
        pauses.append(float(match[3]))
    assert sum(pauses) <= 2.0 + 0.1 * len(pauses)  # the waits announced fit in the bound
    assert last.startswith(
        f"tasklane: cannot connect to PostgreSQL at postgresql://postgres@127.0.0.1:{port}/tasklane"
        " after 2s: "
    )
