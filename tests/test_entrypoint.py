"""The image's entrypoint (the Dockerfile's ENTRYPOINT, then the command), run as a process.

`docker stop` sends SIGTERM to PID 1. The kernel drops a signal that PID 1 installed no handler
for, so a `tasklane migrate` running as PID 1 would ignore it until the SIGKILL. With the
image's init (tini) in front, SIGTERM reaches migrate, which has the default disposition and
stops at once — even while it waits for a database that does not answer.

The first test runs the entrypoint as a plain process; the second makes it PID 1 of a new PID
namespace (what a container is), next to a control that shows the hazard without it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.deployment import ROOT_PATH, dockerfile_instructions
from tests.support.services import wait_until

TASKLANE = str(Path(sys.executable).parent / "tasklane")
SIGTERM_EXIT = 128 + signal.SIGTERM


def entrypoint() -> list[str]:
    instructions = dockerfile_instructions(ROOT_PATH / "Dockerfile")
    command: list[str] = json.loads([a for w, a in instructions if w == "ENTRYPOINT"][-1])
    if not Path(command[0]).exists():
        pytest.fail(f"{command[0]} (the image's init) is not installed: apt-get install tini")
    return command


class SilentServer:
    """A TCP port that accepts connections and never answers: a database that hangs."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.accepted: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                self.accepted.append(self.sock.accept()[0])

    def close(self) -> None:
        for conn in self.accepted:
            conn.close()
        self.sock.close()


@pytest.fixture
def hanging_database() -> Iterator[SilentServer]:
    server = SilentServer()
    yield server
    server.close()


def migrate_env(server: SilentServer) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TASKLANE_", "DATABASE_"))}
    env["DATABASE_URL"] = f"postgresql://postgres@127.0.0.1:{server.port}/tasklane"
    return env


@contextlib.contextmanager
def running(command: list[str], server: SilentServer) -> Iterator[subprocess.Popen[bytes]]:
    """`command`, once it is waiting on the database; killed (its group) if still running."""
    connections = len(server.accepted)
    process = subprocess.Popen(
        command,
        env=migrate_env(server),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        wait_until(
            lambda: len(server.accepted) > connections or process.poll() is not None, timeout=30
        )
        assert process.poll() is None, f"exited {process.returncode} before connecting"
        yield process
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.communicate(timeout=10)


def stopped_by_sigterm(pid: int, process: subprocess.Popen[bytes], within: float) -> bool:
    os.kill(pid, signal.SIGTERM)
    try:
        process.wait(timeout=within)
    except subprocess.TimeoutExpired:
        return False
    return True


def test_sigterm_stops_migrate_waiting_on_a_hanging_database(
    hanging_database: SilentServer,
) -> None:
    with running([*entrypoint(), TASKLANE, "migrate"], hanging_database) as process:
        assert stopped_by_sigterm(process.pid, process, within=10), "SIGTERM was ignored"
        assert process.returncode == SIGTERM_EXIT


def _namespace_init(unshare: subprocess.Popen[bytes]) -> int:
    """The host pid of the process `unshare --fork` runs as PID 1 of its namespace."""
    children = Path(f"/proc/{unshare.pid}/task/{unshare.pid}/children")
    wait_until(lambda: children.read_text().split(), timeout=10)
    return int(children.read_text().split()[0])


def _pid_namespaces_allowed() -> bool:
    unshare = shutil.which("unshare")
    if unshare is None:
        return False
    probe = subprocess.run(
        [unshare, "--pid", "--fork", "--kill-child", "true"], capture_output=True, timeout=30
    )
    return probe.returncode == 0


@pytest.mark.skipif(
    not _pid_namespaces_allowed(), reason="cannot create a PID namespace here (needs root)"
)
def test_as_pid_1_only_the_init_makes_sigterm_stop_migrate(
    hanging_database: SilentServer,
) -> None:
    unshare = ["unshare", "--pid", "--fork", "--kill-child"]
    # Control: migrate itself as PID 1 ignores SIGTERM (why the image needs an init).
    with running([*unshare, TASKLANE, "migrate"], hanging_database) as bare:
        assert not stopped_by_sigterm(_namespace_init(bare), bare, within=3), (
            "migrate as PID 1 stopped on SIGTERM: this control no longer shows the hazard"
        )
    # The image's entrypoint as PID 1 forwards it, and migrate stops.
    with running([*unshare, *entrypoint(), TASKLANE, "migrate"], hanging_database) as init:
        assert stopped_by_sigterm(_namespace_init(init), init, within=10), "SIGTERM was ignored"
