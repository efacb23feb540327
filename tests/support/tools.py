"""Programs some tests need besides Python, where they come from, and what a test does when one
is missing.

The servers' programs (initdb and pg_ctl, redis-server) are the system's where it has them, else
the embedded packages' of the dev dependencies (worker/embedded.py): they are never missing after
`uv sync`. For the others (libfaketime, a Compose client) a test is skipped on a developer's
machine, saying what to install; under CI (`CI=true`) it fails: .ci/run installs every one of
them, so a missing tool there means a guarantee went unchecked, which must not pass as green.
"""

from __future__ import annotations

import glob
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import pytest

from worker.embedded import Binaries, EmbeddedUnavailable, binaries


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def missing(tool: str, install: str) -> NoReturn:
    """Skip the running test for want of `tool`, or fail it under CI."""
    message = f"{tool} is not installed ({install})"
    if in_ci():
        pytest.fail(f"{message}; CI must have it: .ci/run installs it", pytrace=False)
    pytest.skip(message)


@dataclass(frozen=True)
class PostgresPrograms:
    initdb: str
    pg_ctl: str


def system_postgres() -> PostgresPrograms | None:
    """initdb and pg_ctl of one installation: on PATH, else Debian's newest (not on PATH)."""
    on_path = shutil.which("initdb")
    folders = [os.path.dirname(on_path)] if on_path else []
    folders += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    for folder in folders:
        initdb, pg_ctl = Path(folder, "initdb"), Path(folder, "pg_ctl")
        if os.access(initdb, os.X_OK) and os.access(pg_ctl, os.X_OK):
            return PostgresPrograms(str(initdb), str(pg_ctl))
    return None


def embedded_postgres() -> PostgresPrograms:
    found = _embedded("initdb and pg_ctl")
    return PostgresPrograms(str(found.initdb), str(found.pg_ctl))


def postgres_programs() -> PostgresPrograms:
    return system_postgres() or embedded_postgres()


def embedded_redis_server() -> str:
    return str(_embedded("redis-server").redis_server)


def redis_server() -> str:
    return shutil.which("redis-server") or embedded_redis_server()


def _embedded(tool: str) -> Binaries:
    try:
        return binaries()
    except EmbeddedUnavailable as exc:
        missing(tool, str(exc))
