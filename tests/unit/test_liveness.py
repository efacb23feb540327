"""The liveness stamp: written by the worker's event loop, read by `tasklane health --live`."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from worker.config import ConfigError, Settings
from worker.health import liveness
from worker.liveness import STALE_AFTER_SECONDS, stamp_forever


class Log:
    def __init__(self) -> None:
        self.errors: list[tuple[str, dict[str, object]]] = []

    def error(self, event: str, **fields: object) -> None:
        self.errors.append((event, fields))


async def eventually(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"not within {timeout}s: {predicate}")


def settings_for(path: Path) -> Settings:
    return replace(Settings(), liveness_path=str(path))


async def test_the_stamp_is_touched_while_the_loop_turns_and_removed_when_it_stops(
    tmp_path: Path,
) -> None:
    path = tmp_path / "run" / "alive"  # its directory is created too
    stamping = asyncio.create_task(stamp_forever(path, log=Log(), every=0.01))
    await eventually(path.exists)
    first = path.stat().st_mtime_ns
    await eventually(lambda: path.stat().st_mtime_ns != first)
    stamping.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stamping
    assert not path.exists()


async def test_a_blocked_loop_stops_the_stamp(tmp_path: Path) -> None:
    """The stamp proves the loop turns: nothing touches it while the loop is blocked."""
    path = tmp_path / "alive"
    stamping = asyncio.create_task(stamp_forever(path, log=Log(), every=0.01))
    await eventually(path.exists)
    seen: list[int] = []

    def watch() -> None:  # from another thread, while the loop is blocked
        time.sleep(0.1)  # let a touch already handed to a thread land
        seen.append(path.stat().st_mtime_ns)
        time.sleep(0.4)
        seen.append(path.stat().st_mtime_ns)

    watcher = threading.Thread(target=watch)
    watcher.start()
    time.sleep(0.6)  # noqa: ASYNC251 - blocking the loop is the point
    watcher.join()
    stamping.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stamping
    assert seen[0] == seen[1], "the stamp moved while the event loop was blocked"


async def test_an_unwritable_stamp_is_logged_once_per_failure_streak(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    log = Log()
    stamping = asyncio.create_task(stamp_forever(blocker / "alive", log=log, every=0.01))
    await asyncio.sleep(0.2)
    stamping.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stamping
    assert [event for event, _ in log.errors] == ["liveness.stamp_failed"]


def test_liveness_passes_on_a_fresh_stamp_only(tmp_path: Path) -> None:
    path = tmp_path / "alive"
    missing = liveness(settings_for(path))
    assert not missing.ok
    assert missing.checks[0].detail == f"no stamp at {path}: no worker runs here, or it stopped"

    path.touch()
    fresh = liveness(settings_for(path))
    assert fresh.ok, fresh
    assert fresh.checks[0].name == "loop"

    old = time.time() - STALE_AFTER_SECONDS - 5
    os.utime(path, (old, old))
    stale = liveness(settings_for(path))
    assert not stale.ok
    assert "the worker's event loop is blocked or gone" in stale.checks[0].detail


def test_the_liveness_path_must_be_absolute() -> None:
    with pytest.raises(ConfigError, match="TASKLANE_LIVENESS_PATH: must be an absolute path"):
        Settings.from_env({"TASKLANE_LIVENESS_PATH": "alive"})
    assert Settings.from_env({"TASKLANE_LIVENESS_PATH": "/run/x"}).liveness_path == "/run/x"


def test_the_liveness_probe_loads_no_driver(tmp_path: Path) -> None:
    """A probe runs it every few seconds: it reads a file and must not pay for asyncpg, redis,
    arq or the ORM (the readiness probe does, since it talks to the services)."""
    stamp = tmp_path / "alive"
    stamp.touch()
    script = (
        "import sys\n"
        "from worker.cli import main\n"
        "code = main(['health', '--live'])\n"
        "heavy = {'asyncpg', 'redis', 'arq', 'sqlalchemy.orm'} & set(sys.modules)\n"
        "print(sorted(heavy))\n"
        "sys.exit(code)\n"
    )
    env = {**os.environ, "TASKLANE_LIVENESS_PATH": str(stamp)}
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines()[-1] == "[]", result.stdout
