"""The quick commands import no ORM, no structlog, no arq: they answer in about a tenth of a
second; `submit` imports Redis's client and arq's job format to ring the doorbell, and nothing
more, in about a quarter (bench/run.py's `cli` case measures them). Each runs in a fresh
interpreter, which then lists what it imported."""

from __future__ import annotations

import asyncio
import json
import sys
from uuid import UUID

import pytest

from tests.support import db
from tests.support.databases import ROOT
from tests.support.workers import settings_env
from worker.config import Settings

# Packages a quick command must not import, and the exceptions: `health` pings Redis, `submit`
# rings a doorbell (an arq job).
HEAVY = {"sqlalchemy", "structlog", "arq", "alembic", "redis", "valkey", "greenlet"}
MAY_IMPORT = {"health": {"redis"}, "submit": {"redis", "arq"}}

SCRIPT = """
import json, sys
from worker.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
print(json.dumps({"code": code, "modules": sorted({m.split(".")[0] for m in sys.modules})}),
      file=sys.stderr)
"""


async def imported(settings: Settings, *argv: str) -> tuple[int, set[str]]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        SCRIPT,
        *argv,
        cwd=ROOT,
        env=settings_env(settings),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await proc.communicate()
    report = json.loads(err.decode().strip().splitlines()[-1])
    return report["code"], set(report["modules"])


@pytest.fixture
async def conversation_id(settings: Settings) -> UUID:
    return await db.value(  # type: ignore[no-any-return]
        settings.database_url,
        "INSERT INTO conversations (user_id) VALUES ('imports') RETURNING id",
    )


@pytest.fixture
async def task_id(settings: Settings, conversation_id: UUID) -> UUID:
    return await db.value(  # type: ignore[no-any-return]
        settings.database_url,
        "INSERT INTO tasks (conversation_id, agent_id) VALUES ($1, 'echo') RETURNING id",
        conversation_id,
    )


async def test_the_quick_commands_import_no_orm_nor_structlog(
    settings: Settings, task_id: UUID
) -> None:
    commands = [
        ("--help",),
        ("list",),
        ("list", "--status", "pending", "--agent", "echo"),
        ("show", str(task_id)),
        ("tree", str(task_id)),
        ("stats",),
        ("stats", "--json"),
        ("prune", "--older-than", "7d", "--dry-run"),
        ("prune", "--older-than", "7d"),
        ("health",),
        # No worker runs: --wait times out (exit 1).
        ("submit", "echo", "--input", '{"x": 1}', "--wait", "--timeout", "0.1"),
    ]
    for argv in commands:
        code, modules = await imported(settings, *argv)
        assert code in (0, 1), argv  # health: no worker is running (exit 1)
        heavy = (modules & HEAVY) - MAY_IMPORT.get(argv[0], set())
        assert not heavy, f"tasklane {' '.join(argv)} imported {sorted(heavy)}"


async def test_a_command_that_changes_tasks_still_logs_through_structlog(
    settings: Settings, task_id: UUID
) -> None:
    """The check above can fail: `cancel` goes through TaskClient, and imports them."""
    code, modules = await imported(settings, "cancel", str(task_id))
    assert code == 0
    assert {"sqlalchemy", "structlog"} <= modules


async def test_submit_imports_no_orm_nor_structlog_whatever_it_is_asked(
    settings: Settings, conversation_id: UUID
) -> None:
    """Every way through `tasklane submit` (a new conversation, a given one, a new and a taken
    idempotency key, a bad input refused) stays off SQLAlchemy, which would double its time."""
    keyed = ("submit", "echo", "--conversation", str(conversation_id), "--idempotency-key", "k")
    commands = [
        (0, ("submit", "echo")),
        (0, ("submit", "echo", "--json", "--priority", "5")),
        (0, keyed),
        (0, keyed),  # the key is taken now: the existing task is read back
        (1, ("submit", "echo", "--input", '{"x": NaN}')),
    ]
    for expected, argv in commands:
        code, modules = await imported(settings, *argv)
        assert code == expected, argv
        heavy = (modules & HEAVY) - MAY_IMPORT["submit"]
        assert not heavy, f"tasklane {' '.join(argv)} imported {sorted(heavy)}"
    tasks = await db.value(settings.database_url, "SELECT count(*) FROM tasks")
    assert tasks == 3
