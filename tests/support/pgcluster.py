"""A throwaway PostgreSQL cluster of a test's own (`initdb` + `pg_ctl`, on a free port, in a
temporary directory): for scenarios that stop or restart the whole server, which the shared one
must never be. The programs are the system's, else the embedded PostgreSQL's (tests/support/
tools.py); run as root, the server runs as the user the embedded one would (it refuses root)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.support.services import free_port
from tests.support.tools import PostgresPrograms, postgres_programs
from worker.embedded import server_user


class PrivatePostgres:
    def __init__(self, programs: PostgresPrograms | None = None) -> None:
        self.programs = programs or postgres_programs()
        self.user = server_user()  # None: this process's own user
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="tasklane-pg-"))
        self.data = self.dir / "data"
        self.log = self.dir / "server.log"
        if self.user is not None:
            shutil.chown(self.dir, user=self.user)

    @property
    def server_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        command = list(args)
        if self.user is not None:
            command = ["runuser", "-u", self.user, "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=60)

    START_ATTEMPTS = 5

    def start(self) -> PrivatePostgres:
        initdb = self.programs.initdb
        self._run(initdb, "-D", str(self.data), "-U", "postgres", "-A", "trust", "--no-sync")
        # The port was free when chosen, not reserved: a server of a test running in parallel
        # may have taken it since. Then try another.
        for _ in range(self.START_ATTEMPTS - 1):
            try:
                self._pg_ctl("start")
            except subprocess.CalledProcessError:
                if "Address already in use" not in self.log.read_text(errors="replace"):
                    raise
                self.log.unlink()
                self.port = free_port()
            else:
                return self
        self._pg_ctl("start")
        return self

    def _pg_ctl(self, action: str, *extra: str) -> None:
        pg_ctl = self.programs.pg_ctl
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
