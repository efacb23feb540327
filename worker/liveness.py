"""The worker's liveness stamp: evidence, read without any network, that its event loop turns.

A background task of the worker touches a file (`TASKLANE_LIVENESS_PATH`) every
STAMP_SECONDS; `tasklane health --live` passes while the file is younger than
STALE_AFTER_SECONDS. PostgreSQL or Redis being away does not stop the stamp — the worker rides
those outages out, and restarting it would not help — while a blocked or dead event loop does:
that, and nothing else, is what a liveness probe should restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any

from worker.loops import raise_if_cancelled

STAMP_SECONDS = 5.0
# A loop blocked this long has already lost its leases (TASKLANE_LEASE_SECONDS, 30 by default);
# the same 30 s as a worker row's "live" window, so that both checks age alike.
STALE_AFTER_SECONDS = 30.0


async def stamp_forever(path: Path, *, log: Any, every: float = STAMP_SECONDS) -> None:
    """Touch `path` every `every` seconds until cancelled, then remove it: a worker that has
    stopped leaves no stamp that looks alive."""
    failing = False
    try:
        while True:
            raise_if_cancelled()  # see worker.loops
            try:
                await asyncio.to_thread(_touch, path)
            except OSError as exc:
                if not failing:  # once per failure streak, not every few seconds
                    log.error("liveness.stamp_failed", path=str(path), error=str(exc))
                failing = True
            else:
                failing = False
            await asyncio.sleep(every)
    finally:
        _remove(path)


def _touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink(missing_ok=True)


def stamp_age(path: Path) -> float | None:
    """Seconds since the stamp was last touched, or None if there is none."""
    try:
        touched = path.stat().st_mtime
    except FileNotFoundError:
        return None
    return max(0.0, time.time() - touched)
