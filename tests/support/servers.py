"""The PostgreSQL and Redis the suite shares, and embedded ones when nothing answers there.

The addresses come from TASKLANE_TEST_POSTGRES (a superuser's URL, trust or password in it) and
TASKLANE_TEST_REDIS (a URL with the database number the tests may use), by default the local
servers. When nothing accepts a connection at one of them, the test session starts an embedded
server of that kind (worker/embedded.py: PostgreSQL 16 and Valkey from the dev dependencies) in
a temporary folder, points the variable at it for every test process, and stops it at the end.
So `uv run pytest` passes on a machine with neither server installed.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path

from sqlalchemy.engine import make_url

from worker.embedded import EmbeddedPostgres, EmbeddedRedis

POSTGRES_ENV = "TASKLANE_TEST_POSTGRES"
REDIS_ENV = "TASKLANE_TEST_REDIS"
DEFAULT_POSTGRES = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_REDIS = "redis://127.0.0.1:6379/14"
REDIS_DB = 14  # on an embedded Redis too: the same URLs in every run
PROBE_TIMEOUT_SECONDS = 2.0


def postgres_url() -> str:
    """The server the tests create their databases on (read at each call: the session may
    have pointed it at an embedded server since this module was imported)."""
    return os.environ.get(POSTGRES_ENV, DEFAULT_POSTGRES)


def redis_url() -> str:
    return os.environ.get(REDIS_ENV, DEFAULT_REDIS)


def answers(url: str, default_port: int) -> bool:
    """Whether something accepts a TCP connection at the URL's host and port."""
    parsed = make_url(url)
    address = (parsed.host or "127.0.0.1", parsed.port or default_port)
    try:
        with socket.create_connection(address, timeout=PROBE_TIMEOUT_SECONDS):
            return True
    except OSError:
        return False


class Fallback:
    """Embedded servers for the addresses where nothing answers, for one test session."""

    def __init__(self) -> None:
        self.directory: Path | None = None
        self.servers: list[EmbeddedPostgres | EmbeddedRedis] = []
        self.report: list[str] = []  # one line per server, for pytest's header

    def start(self) -> Fallback:
        try:
            self._ensure("PostgreSQL", POSTGRES_ENV, postgres_url(), 5432, self._postgres)
            self._ensure("Redis", REDIS_ENV, redis_url(), 6379, self._redis)
        except BaseException:
            self.stop()
            raise
        return self

    def _ensure(
        self, kind: str, variable: str, configured: str, port: int, embedded: Callable[[], str]
    ) -> None:
        """Keep the configured server if it answers; else start an embedded one and point
        `variable` at it."""
        shown = make_url(configured).render_as_string()  # password hidden
        if answers(configured, port):
            self.report.append(f"{kind}: {shown}")
            return
        url = embedded()
        os.environ[variable] = url
        self.report.append(f"{kind}: embedded at {url} (none at {shown})")

    def _postgres(self) -> str:
        server = EmbeddedPostgres(self._folder() / "postgres", durable=False)
        self._open(server)
        return server.url()

    def _redis(self) -> str:
        server = EmbeddedRedis(self._folder() / "redis", durable=False)
        self._open(server)
        return server.url(REDIS_DB)

    def _open(self, server: EmbeddedPostgres | EmbeddedRedis) -> None:
        self.servers.append(server)
        server.open()

    def _folder(self) -> Path:
        if self.directory is None:
            self.directory = Path(tempfile.mkdtemp(prefix="tasklane-test-servers-"))
            # Run as root, PostgreSQL runs as another user, who must reach its data folder.
            self.directory.chmod(0o755)
        return self.directory

    def stop(self) -> None:
        for server in reversed(self.servers):
            server.close()
        self.servers.clear()
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None
