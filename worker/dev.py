"""`tasklane dev`: everything a developer needs, in one process tree, from one command.

1. Servers: the configured ones (DATABASE_URL / REDIS_URL), or whatever answers on the default
   addresses; else — or with `--embedded` — the embedded PostgreSQL and Redis of
   `worker.embedded`, under ./.tasklane (data kept between runs, `--fresh` wipes it).
2. The database: created when missing, migrated.
3. A worker process (`tasklane worker`) serving the demo agents and TASKLANE_AGENTS.
4. The URLs, and the lines to paste into another shell.

Then it waits. On SIGINT (Ctrl-C), SIGTERM or SIGHUP the worker stops first (running tasks get
the shutdown grace), then the servers this process started: nothing is left running. The worker
runs in its own session, so a Ctrl-C reaches it once, through this process, in that order.

`tasklane demo` finds its servers the same way (`servers`), sharing embedded ones that a
`tasklane dev` in the same folder is running.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from types import FrameType
from urllib.parse import urlsplit

from sqlalchemy.engine import make_url

from domain.entities import WorkerInfo
from worker import embedded
from worker.cli import DEMO_AGENTS, CommandError, prepare_database
from worker.config import DEFAULT_DATABASE_URL, DEFAULT_REDIS_URL, Settings, redact_url

DEV_DIR = ".tasklane"
DATABASE = make_url(DEFAULT_DATABASE_URL).database or "tasklane"  # the name tasklane expects
PROBE_TIMEOUT_SECONDS = 0.5
WORKER_START_TIMEOUT_SECONDS = 60.0
WORKER_STOP_MARGIN_SECONDS = 15.0  # beyond the shutdown grace, before the worker is killed
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

Say = Callable[[str], None]


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP: stop as Ctrl-C would (the CLI exits 130 if it reaches it)."""


# -- the servers ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Service:
    name: str  # "PostgreSQL" or "Redis"
    url: str
    server: embedded.EmbeddedPostgres | embedded.EmbeddedRedis | None  # None: not embedded
    opened: embedded.Opened | None = None

    def describe(self) -> str:
        if self.server is None:
            return redact_url(self.url)
        where = os.path.relpath(self.server.directory)
        return f"{self.url}  (embedded, {self.opened}, data in {where})"


@dataclass(frozen=True, slots=True)
class Servers:
    settings: Settings  # with the URLs of the servers in use
    postgres: Service
    redis: Service

    @property
    def embedded_services(self) -> list[Service]:
        return [s for s in (self.postgres, self.redis) if s.server is not None]


@contextlib.contextmanager
def servers(
    settings: Settings,
    *,
    embedded_only: bool,
    fresh: bool = False,
    share: bool,
    directory: Path | None = None,
    say: Say,
) -> Iterator[Servers]:
    """The servers to use, running for the duration of the block.

    Each of PostgreSQL and Redis is the configured one when its URL was set (it differs from the
    default) or when something answers on the default address; otherwise, or with
    `embedded_only`, the embedded one under `directory` (./.tasklane), started here and stopped
    on exit — or, with `share`, used as it is when another process runs it.
    """
    root = directory or Path.cwd() / DEV_DIR
    database_embedded = embedded_only or _unset_and_silent(
        settings.database_url, DEFAULT_DATABASE_URL
    )
    redis_embedded = embedded_only or _unset_and_silent(settings.redis_url, DEFAULT_REDIS_URL)
    with contextlib.ExitStack() as stack:
        pg = embedded.EmbeddedPostgres(root / "postgres")
        rd = embedded.EmbeddedRedis(root / "redis")
        postgres = Service("PostgreSQL", settings.database_url, None)
        redis = Service("Redis", settings.redis_url, None)
        try:
            if database_embedded:
                opened = _open(pg, stack, fresh=fresh, share=share, say=say)
                postgres = Service("PostgreSQL", pg.url(DATABASE), pg, opened)
            if redis_embedded:
                opened = _open(rd, stack, fresh=fresh, share=share, say=say)
                redis = Service("Redis", rd.url(), rd, opened)
        except embedded.InUse as exc:
            raise CommandError(f"{exc} (a `tasklane dev`?): {_in_use_hint(pg, rd)}") from None
        if fresh and not (database_embedded and redis_embedded):
            kept = ", ".join(
                f"{s.name} at {redact_url(s.url)}" for s in (postgres, redis) if not s.server
            )
            say(f"--fresh wipes embedded servers only; not embedded: {kept} (see --embedded)")
        yield Servers(
            replace(settings, database_url=postgres.url, redis_url=redis.url), postgres, redis
        )


def _unset_and_silent(url: str, default: str) -> bool:
    """True when `url` is the default and nothing listens there: then the embedded server runs."""
    return url == default and not _answers(url)


def _answers(url: str) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection(
            (parts.hostname or "127.0.0.1", parts.port or 0), timeout=PROBE_TIMEOUT_SECONDS
        ):
            return True
    except OSError:
        return False


def _open(
    server: embedded.EmbeddedPostgres | embedded.EmbeddedRedis,
    stack: contextlib.ExitStack,
    *,
    fresh: bool,
    share: bool,
    say: Say,
) -> embedded.Opened:
    where = os.path.relpath(server.directory)
    if fresh:
        say(f"wiping the embedded {server.kind} in {where} (--fresh)")
    try:
        opened = server.open(fresh=fresh, share=share)
    except embedded.InUse:
        raise  # the caller says whose, and what to do
    except (embedded.EmbeddedUnavailable, embedded.EmbeddedError) as exc:
        raise CommandError(str(exc)) from None
    stack.callback(server.close)
    if opened is embedded.Opened.SHARED:
        say(f"using the embedded {server.kind} that process {server.owner_pid()} runs in {where}")
    else:
        say(f"embedded {server.kind} {opened} in {where}, on {server.url()}")
    return opened


def _in_use_hint(pg: embedded.EmbeddedPostgres, rd: embedded.EmbeddedRedis) -> str:
    """What to do when another process owns the embedded servers."""
    urls = []
    if pg.running():
        urls.append(f"DATABASE_URL={pg.url(DATABASE)}")
    if rd.running():
        urls.append(f"REDIS_URL={rd.url()}")
    if not urls:
        return "stop it first"
    return f"stop it first, or use its servers from another shell: {' '.join(urls)}"


# -- tasklane dev ---------------------------------------------------------------------------------


def run_dev(settings: Settings, *, embedded_only: bool, fresh: bool) -> int:
    began = time.monotonic()
    agents = tuple(dict.fromkeys((*settings.agent_modules, DEMO_AGENTS)))
    settings = replace(settings, agent_modules=agents)
    with stop_on_signals():
        try:
            with servers(
                settings, embedded_only=embedded_only, fresh=fresh, share=False, say=_say
            ) as running:
                worker = None
                try:
                    prepare_database(running.settings)
                    worker = _start_worker(running.settings)
                    info = _wait_until_serving(running.settings, worker)
                    _print_ready(running, worker.pid, info, time.monotonic() - began)
                    code = worker.wait()  # until it ends, or a signal raises in here
                    _say(f"the worker exited with code {code}; stopping")
                    return 1
                finally:
                    _calm_signals()  # whatever ended it, the stop below runs to its end
                    # The worker first: it needs the servers to hand its tasks back. The
                    # servers stop when the `with` ends.
                    if worker is not None:
                        _stop_worker(worker, settings.shutdown_grace_seconds)
        except KeyboardInterrupt:
            _say("stopped")
            return 0


def _say(line: str) -> None:
    # Never fails: a closed terminal (SIGHUP, then EIO) or a reader gone (EPIPE) must not cut
    # the stop short and leave the worker or the servers running.
    with contextlib.suppress(OSError):
        print(f"tasklane dev: {line}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGTERM and SIGHUP stop the command as Ctrl-C does, through `finally` blocks (which
    stop what it started); the CLI exits 130 if the interruption reaches it."""

    def stop(signum: int, frame: FrameType | None) -> None:
        _calm_signals()
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise Stopped

    previous = {sig: signal.signal(sig, stop) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _calm_signals() -> None:
    """Once stopping, further signals only say so: the stop is under way and bounded (the
    worker's grace, then a kill; the servers' fast shutdown), and cutting it short would leave
    processes behind."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _still_stopping)


def _still_stopping(signum: int, frame: FrameType | None) -> None:
    _say("stopping (the worker hands its running tasks back, then the servers stop)")


def _start_worker(settings: Settings) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "DATABASE_URL": settings.database_url,
        "REDIS_URL": settings.redis_url,
        "TASKLANE_AGENTS": ",".join(settings.agent_modules),
    }
    # Its own session: a Ctrl-C in the terminal reaches this process only, which stops the
    # worker before the servers it needs.
    return subprocess.Popen(
        [sys.executable, "-m", "worker.cli", "worker"],
        env=env,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )


def _wait_until_serving(settings: Settings, worker: subprocess.Popen[bytes]) -> WorkerInfo:
    """The worker's row in `workers` once it serves (its start-up is done)."""
    from persistence.session import UnitOfWork, create_engine, create_session_factory

    hostname = socket.gethostname()

    async def poll() -> WorkerInfo:
        engine = create_engine(settings.database_url, pool_size=1, max_overflow=0)
        try:
            deadline = time.monotonic() + WORKER_START_TIMEOUT_SECONDS
            while True:
                code = worker.poll()
                if code is not None:
                    raise CommandError(
                        f"the worker exited with code {code} before it started (see above)"
                    )
                async with UnitOfWork(create_session_factory(engine)) as uow:
                    for info in await uow.workers.list_live(queue=settings.queue):
                        if info.pid == worker.pid and info.hostname == hostname:
                            return info
                if time.monotonic() > deadline:
                    raise CommandError(
                        f"the worker did not start within {WORKER_START_TIMEOUT_SECONDS:g}s"
                    )
                await asyncio.sleep(0.1)
        finally:
            await engine.dispose()

    return asyncio.run(poll())


def _stop_worker(worker: subprocess.Popen[bytes], grace: float) -> None:
    if worker.poll() is not None:
        return
    _say("stopping the worker")
    worker.send_signal(signal.SIGTERM)
    try:
        worker.wait(grace + WORKER_STOP_MARGIN_SECONDS)
    except subprocess.TimeoutExpired:
        _say("the worker did not stop in time; killing it")
        worker.kill()
        worker.wait()


def _print_ready(running: Servers, pid: int, info: WorkerInfo, took: float) -> None:
    settings = running.settings
    database = redact_url(settings.database_url)
    redis = redact_url(settings.redis_url)
    psql = "psql" if shutil.which("psql") else _embedded_psql()
    lines = [
        f"tasklane dev is ready ({took:.1f}s)",
        f"  PostgreSQL  {running.postgres.describe()}",
        f"  Redis       {running.redis.describe()}",
        f"  worker      pid {pid}, queue {settings.queue!r}, agents {', '.join(info.agents)}",
        "",
        "From another shell (tasklane submit, psql, your code):",
        f"  export DATABASE_URL={shlex.quote(database)} REDIS_URL={shlex.quote(redis)}",
        """  uv run tasklane submit echo --input '{"hello": "world"}' --wait""",
    ]
    if psql:
        lines.append(f'  {shlex.quote(psql)} "$DATABASE_URL"')
    stop = "Ctrl-C stops the worker"
    if running.embedded_services:
        where = os.path.relpath(Path.cwd() / DEV_DIR)
        stop += f" and the embedded servers (their data stays in {where}; --fresh starts empty)"
    lines += ["", stop + "."]
    print("\n".join(lines), flush=True)


def _embedded_psql() -> str | None:
    try:
        return str(embedded.binaries().psql)
    except embedded.EmbeddedUnavailable:
        return None
