"""The quick commands import no ORM, no structlog, no arq: they answer in about a tenth of a
second (bench/run.py's `cli` case measures it). Each runs in a fresh interpreter, which then
lists what it imported."""

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

# Packages a quick command must not import, and the one exception: `health` pings Redis.
HEAVY = {"sqlalchemy", "structlog", "arq", "alembic", "redis", "valkey", "greenlet"}
MAY_IMPORT = {"health": {"redis"}}

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
async def task_id(settings: Settings) -> UUID:
    conv = await db.value(
        settings.database_url,
        "INSERT INTO conversations (user_id) VALUES ('imports') RETURNING id",
    )
    return await db.value(  # type: ignore[no-any-return]
        settings.database_url,
        "INSERT INTO tasks (conversation_id, agent_id) VALUES ($1, 'echo') RETURNING id",
        conv,
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
