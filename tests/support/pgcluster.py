"""A throwaway PostgreSQL cluster of a test's own (`initdb` + `pg_ctl` as the `postgres` user, on
a free port, in a temporary directory): for scenarios that stop or restart the whole server,
which the shared one must never be."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.support.services import free_port


def _binary(name: str) -> str | None:
    return shutil.which(name) or next(
        iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None
    )


def available() -> bool:
    return _binary("initdb") is not None and _binary("pg_ctl") is not None


class PrivatePostgres:
    def __init__(self, user: str = "postgres") -> None:
        self.user = user
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="tasklane-pg-"))
        self.data = self.dir / "data"
        self.log = self.dir / "server.log"
        shutil.chown(self.dir, user=user, group=None)

    @property
    def server_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        command = list(args)
        if os.geteuid() == 0:  # the server refuses to run as root
            command = ["runuser", "-u", self.user, "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=60)

    def start(self) -> PrivatePostgres:
        initdb = _binary("initdb")
        assert initdb is not None
        self._run(initdb, "-D", str(self.data), "-U", "postgres", "-A", "trust", "--no-sync")
        self._pg_ctl("start")
        return self

    def _pg_ctl(self, action: str, *extra: str) -> None:
        pg_ctl = _binary("pg_ctl")
        assert pg_ctl is not None
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={self.dir}"
            " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        self._run(
            pg_ctl, action, "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", *extra
        )

    def restart(self) -> None:
        """A fast restart: every session is terminated, the server is back when this returns."""
        self._pg_ctl("restart", "-m", "fast")

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._pg_ctl("stop", "-m", "immediate")
        shutil.rmtree(self.dir, ignore_errors=True)
