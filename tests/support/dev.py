"""`tasklane dev` as a developer runs it: a real process, its printed URLs, the processes it
started, and proof that none of them is left once it stopped."""

from __future__ import annotations

import contextlib
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.support import offline
from tests.support.databases import ROOT
from tests.support.services import wait_until
from tests.support.workers import py_spy_dump

READY_TIMEOUT_SECONDS = 180.0  # a cold start on a busy machine, or `uv run` building a venv
STOP_TIMEOUT_SECONDS = 60.0
_EXPORT = re.compile(r"^  export DATABASE_URL=(\S+) REDIS_URL=(\S+)$", re.M)
_WORKER = re.compile(r"^  worker      pid (\d+),", re.M)


@contextlib.contextmanager
def shared_folder() -> Iterator[Path]:
    """A temporary folder that other users may enter. Run as root, the embedded PostgreSQL runs
    as another user (worker.embedded.server_user), who must reach its data; pytest's `tmp_path`
    is private to root."""
    path = Path(tempfile.mkdtemp(prefix="tasklane-dev-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def fresh_env(**extra: str) -> dict[str, str]:
    """This environment without tasklane's settings: what a new shell on a new machine has."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("TASKLANE_", "LOG_", "DATABASE_URL", "REDIS_URL"))
    }
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


def tasklane_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "worker.cli", *args]


def tasklane(
    *args: str,
    cwd: Path,
    env: dict[str, str] | None = None,
    inside: Namespace | None = None,
    timeout: float = 240,
) -> subprocess.CompletedProcess[str]:
    """Run `tasklane ARGS` to its end in `cwd` (in network namespace `inside`, if given), with
    `env` (default: a new shell's, `fresh_env()`)."""
    command = tasklane_command(*args)
    return run(inside.run(command) if inside else command, cwd=cwd, env=env, timeout=timeout)


def run(
    command: list[str], *, cwd: Path, env: dict[str, str] | None = None, timeout: float = 240
) -> subprocess.CompletedProcess[str]:
    """Run `command` to its end. One that outlives `timeout` (a `tasklane dev` that should
    have stopped) gets a Ctrl-C — its process group, so it stops what it started — then a
    SIGKILL, and the test fails."""
    process = subprocess.Popen(
        command,
        cwd=cwd,
        env=env or fresh_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGINT)
        try:
            out, err = process.communicate(timeout=STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            out, err = process.communicate()
        raise AssertionError(
            f"{command} still ran after {timeout:g}s\nstdout:\n{out}\nstderr:\n{err}"
        ) from None
    return subprocess.CompletedProcess(command, process.returncode, out, err)


def urls_env(ready: Ready) -> dict[str, str]:
    """Another shell, with the URLs `tasklane dev` printed."""
    return fresh_env(DATABASE_URL=ready.database_url, REDIS_URL=ready.redis_url)


@dataclass
class Ready:
    database_url: str
    redis_url: str
    worker_pid: int
    text: str  # what it printed on stdout up to and including "Ctrl-C stops…"


@dataclass
class Dev:
    """A started `tasklane dev` (or any command that prints what it does): stdout is read by a
    thread, stderr goes to a file."""

    process: subprocess.Popen[str]
    stderr_path: Path
    session: bool
    worker_pid: int | None = None
    lines: queue.Queue[str | None] = field(default_factory=queue.Queue)
    stdout: list[str] = field(default_factory=list)

    @classmethod
    def start(
        cls,
        command: list[str],
        cwd: Path,
        env: dict[str, str],
        *,
        session: bool = False,
        stderr_pipe: bool = False,
    ) -> Dev:
        """`session`: in a process group of its own, as a shell runs a command, so that
        `interrupt_group` is a terminal's Ctrl-C. `stderr_pipe`: stderr is a pipe (the test
        may close it, as a closed terminal would be) instead of a file."""
        stderr_path = cwd / f"stderr-{time.monotonic_ns()}.txt"
        with stderr_path.open("w") as stderr:
            process = subprocess.Popen(
                command,
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE if stderr_pipe else stderr,
                text=True,
                start_new_session=session,
            )
        dev = cls(process, stderr_path, session)
        threading.Thread(target=dev._read, daemon=True).start()
        return dev

    def _read(self) -> None:
        assert self.process.stdout is not None
        with self.process.stdout:
            for line in self.process.stdout:
                self.lines.put(line)
        self.lines.put(None)

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def explain(self) -> str:
        return f"stdout:\n{''.join(self.stdout)}\nstderr:\n{self.stderr}"

    def wait_ready(self, timeout: float = READY_TIMEOUT_SECONDS) -> Ready:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"not ready within {timeout:g}s\n{self.explain()}") from None
            if line is None:
                self.process.wait(10)
                raise AssertionError(f"exited {self.process.returncode}\n{self.explain()}")
            self.stdout.append(line)
            if line.startswith("Ctrl-C stops"):
                break
        text = "".join(self.stdout)
        export = _EXPORT.search(text)
        worker = _WORKER.search(text)
        assert export, text
        assert worker, text
        self.worker_pid = int(worker[1])
        return Ready(export[1], export[2], self.worker_pid, text)

    def finish(self, timeout: float = STOP_TIMEOUT_SECONDS) -> int:
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            # Say where it hangs: its own stacks, and the worker's asyncio tasks (SIGUSR2,
            # TasklaneWorker.dump_tasks, printed to the stderr that `explain` shows).
            if self.worker_pid is not None and alive(self.worker_pid):
                os.kill(self.worker_pid, signal.SIGUSR2)
                time.sleep(1)
            stacks = py_spy_dump(self.process.pid)
            raise AssertionError(
                f"did not stop within {timeout:g}s\n{self.explain()}\npy-spy dump:\n{stacks}"
            ) from None
        while (line := self.lines.get(timeout=10)) is not None:
            self.stdout.append(line)
        return code

    def interrupt(self, sig: signal.Signals = signal.SIGINT) -> int:
        """Send `sig` to the process alone; its exit code."""
        self.process.send_signal(sig)
        return self.finish()

    def interrupt_group(self) -> int:
        """Ctrl-C in a terminal: SIGINT to the whole process group (`session=True`)."""
        os.killpg(self.process.pid, signal.SIGINT)
        return self.finish()

    def kill(self) -> None:
        """Stop it whatever state it is in: a Ctrl-C first (it stops its worker and servers),
        then SIGKILL for it and its worker."""
        with contextlib.suppress(ProcessLookupError):
            if self.session:
                os.killpg(self.process.pid, signal.SIGINT)
            else:
                self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            self.process.kill()
        if self.worker_pid is not None and alive(self.worker_pid):
            os.kill(self.worker_pid, signal.SIGKILL)
        self.finish()


# -- what it started, and whether any of it is left ------------------------------------------------


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead, only not yet reaped


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                stat = (entry / "stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
    return found


def server_processes(directory: Path) -> dict[str, list[int]]:
    """The embedded servers' processes under `directory` (./.tasklane) now: the postmaster and
    its children, the Redis server."""
    found: dict[str, list[int]] = {}
    with contextlib.suppress(OSError, ValueError, IndexError):
        postmaster = int((directory / "postgres" / "postmaster.pid").read_text().split()[0])
        found["postgres"] = [postmaster, *children(postmaster)]
    with contextlib.suppress(OSError, ValueError):
        found["redis-server"] = [int((directory / "redis" / "server.pid").read_text().strip())]
    return found


def in_namespace(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/ns/net")


def processes_in_namespace(namespace: str) -> list[str]:
    """Every process in network namespace `namespace`, with its command line."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if os.readlink(entry / "ns" / "net") == namespace and alive(int(entry.name)):
                    cmdline = (entry / "cmdline").read_text().replace("\0", " ").strip()
                    found.append(f"{entry.name}: {cmdline}")
    return found


def port_closed(url: str) -> bool:
    match = re.search(r"@?([\d.]+):(\d+)/", url)
    assert match, url
    try:
        with socket.create_connection((match[1], int(match[2])), timeout=1):
            return False
    except OSError:
        return True


@dataclass
class Namespace:
    """A network namespace with nothing listening in it: a fresh machine, as far as ports go
    (tests/support/offline.py). A `sleep` holds it open while a test runs commands in it."""

    holder: subprocess.Popen[bytes]
    id: str

    @classmethod
    @contextlib.contextmanager
    def start(cls) -> Iterator[Namespace]:
        holder = subprocess.Popen(offline.offline(["sleep", "infinity"]))
        try:
            # Once `sleep` runs, the namespace exists and its loopback is up.
            wait_until(lambda: Path(f"/proc/{holder.pid}/cmdline").read_bytes().startswith(b"sl"))
            space = cls(holder, in_namespace(holder.pid))
            assert space.id != in_namespace(os.getpid())
            yield space
            for line in space.leftovers():  # a failed test's processes: gone, whatever they are
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(line.split(":")[0]), signal.SIGKILL)
        finally:
            holder.kill()
            holder.wait()

    def run(self, command: list[str]) -> list[str]:
        """`command`, to be run in this namespace."""
        return offline.joined(self.holder.pid, command)

    def leftovers(self) -> list[str]:
        """The processes in this namespace, but for the one holding it."""
        mine = f"{self.holder.pid}:"
        return [p for p in processes_in_namespace(self.id) if not p.startswith(mine)]
