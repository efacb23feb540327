"""`tasklane dev` and `tasklane demo` as a developer meets them: real processes, real servers.

"No server reachable" is made real, not pretended: those tests run tasklane in a network
namespace of its own (tests/support/offline.py), where nothing listens on 127.0.0.1 — not the
PostgreSQL and Redis that the rest of the suite uses on the default ports. Other tests force the
embedded servers with `--embedded` instead.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import offline
from tests.support.dev import (
    Dev,
    Namespace,
    Ready,
    alive,
    fresh_env,
    port_closed,
    server_processes,
    shared_folder,
    tasklane,
    tasklane_command,
    urls_env,
)
from tests.support.services import wait_until
from worker.embedded import EmbeddedPostgres, EmbeddedRedis, binaries

pytestmark = pytest.mark.slow

needs_namespace = pytest.mark.skipif(
    offline.available() is not None, reason=f"no private network: {offline.available()}"
)


@pytest.fixture
def folder() -> Iterator[Path]:
    """The developer's project folder; its embedded servers are stopped afterwards whatever
    happened (they are daemons: nothing else would)."""
    with shared_folder() as path:
        yield path
        for server in (
            EmbeddedPostgres(path / ".tasklane" / "postgres"),
            EmbeddedRedis(path / ".tasklane" / "redis"),
        ):
            with contextlib.suppress(Exception):
                server.stop()


@pytest.fixture
def started() -> Iterator[list[Dev]]:
    """Processes a test starts; killed at the end if still running."""
    devs: list[Dev] = []
    yield devs
    for dev in devs:
        if dev.process.poll() is None:
            dev.kill()


@pytest.fixture
def namespace() -> Iterator[Namespace]:
    with Namespace.start() as space:
        yield space


def submit(ready: Ready, folder: Path, inside: Namespace | None = None) -> dict[str, object]:
    """`tasklane submit … --wait` from another process, with the URLs `tasklane dev` printed."""
    run = tasklane(
        *("submit", "echo", "--input", '{"hello": "dev"}', "--wait", "--json"),
        cwd=folder,
        env=urls_env(ready),
        inside=inside,
    )
    assert run.returncode == 0, run.stderr
    task: dict[str, object] = json.loads(run.stdout)
    return task


def assert_all_gone(pids: dict[str, list[int]], ready: Ready) -> None:
    left = {name: [p for p in group if alive(p)] for name, group in pids.items()}
    assert not any(left.values()), left
    assert not alive(ready.worker_pid)
    assert port_closed(ready.database_url)
    assert port_closed(ready.redis_url)


# -- nothing reachable ----------------------------------------------------------------------------


@needs_namespace
def test_dev_on_a_machine_with_no_servers(
    folder: Path, namespace: Namespace, started: list[Dev]
) -> None:
    dev = Dev.start(namespace.run(tasklane_command("dev")), folder, fresh_env())
    started.append(dev)
    ready = dev.wait_ready()
    assert "PostgreSQL  postgresql://postgres@127.0.0.1:" in ready.text
    assert "(embedded, created, data in .tasklane/postgres)" in ready.text
    assert "(embedded, created, data in .tasklane/redis)" in ready.text
    assert ready.database_url.endswith("/tasklane")
    assert ":5432/" not in ready.database_url  # embedded, not the default address
    servers = server_processes(folder / ".tasklane")
    assert set(servers) == {"postgres", "redis-server"}

    task = submit(ready, folder, namespace)
    assert task["status"] == "completed"
    assert task["output"] == {"echo": {"hello": "dev"}}

    assert dev.interrupt(signal.SIGINT) == 0, dev.explain()
    assert namespace.leftovers() == []
    assert_all_gone(servers, ready)
    assert dev.stderr.splitlines()[-1] == "tasklane dev: stopped"


@needs_namespace
def test_dev_uses_a_server_that_answers_on_its_default_address(
    folder: Path, namespace: Namespace, started: list[Dev]
) -> None:
    # Redis answers on 6379 in this namespace; PostgreSQL on 5432 does not.
    redis = subprocess.Popen(
        namespace.run(
            [
                *(str(binaries().redis_server), "--port", "6379", "--bind", "127.0.0.1"),
                *("--save", "", "--appendonly", "no", "--dir", str(folder)),
            ]
        ),
        stdout=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: _answers_in(namespace, 6379), timeout=30)
        dev = Dev.start(namespace.run(tasklane_command("dev")), folder, fresh_env())
        started.append(dev)
        ready = dev.wait_ready()
        assert ready.redis_url == "redis://127.0.0.1:6379/0"
        assert "  Redis       redis://127.0.0.1:6379/0\n" in ready.text  # not embedded
        assert "(embedded, created, data in .tasklane/postgres)" in ready.text
        assert not (folder / ".tasklane" / "redis").exists()
        assert submit(ready, folder, namespace)["status"] == "completed"
        assert dev.interrupt(signal.SIGINT) == 0, dev.explain()
        assert redis.poll() is None  # not ours to stop
    finally:
        redis.kill()
        redis.wait()
    assert namespace.leftovers() == []


def _answers_in(namespace: Namespace, port: int) -> bool:
    probe = f"import socket; socket.create_connection(('127.0.0.1', {port}), 1)"
    command = namespace.run(["python3", "-c", probe])
    return subprocess.run(command, capture_output=True, timeout=30).returncode == 0


@needs_namespace
def test_demo_on_a_machine_with_no_servers(folder: Path, namespace: Namespace) -> None:
    run = tasklane("demo", "--n", "3", cwd=folder, inside=namespace)
    assert run.returncode == 0, run.stderr
    assert 'fanout of 3 completed: {"sum": 5}' in run.stdout
    assert "tasklane: embedded PostgreSQL created in .tasklane/postgres" in run.stderr
    assert "tasklane: embedded Redis created in .tasklane/redis" in run.stderr
    assert namespace.leftovers() == []  # it stopped the servers it started


# -- the embedded servers of one folder -----------------------------------------------------------


def test_a_second_dev_in_the_same_folder_is_told_they_are_in_use(
    folder: Path, started: list[Dev]
) -> None:
    first = Dev.start(tasklane_command("dev", "--embedded"), folder, fresh_env())
    started.append(first)
    ready = first.wait_ready()
    servers = server_processes(folder / ".tasklane")

    second = tasklane("dev", "--embedded", cwd=folder)
    assert second.returncode == 1
    [line] = second.stderr.splitlines()
    assert f"is in use by process {first.process.pid}" in line
    assert f"DATABASE_URL={ready.database_url} REDIS_URL={ready.redis_url}" in line

    # `tasklane demo` in the same folder shares them, and leaves them running.
    demo = tasklane("demo", "--embedded", "--n", "2", cwd=folder)
    assert demo.returncode == 0, demo.stderr
    assert f"using the embedded PostgreSQL that process {first.process.pid} runs" in demo.stderr
    assert submit(ready, folder)["status"] == "completed"

    assert first.interrupt(signal.SIGTERM) == 0, first.explain()
    assert_all_gone(servers, ready)


def test_data_is_kept_between_runs_and_fresh_wipes_it(folder: Path, started: list[Dev]) -> None:
    def run_once(*flags: str, show: str) -> tuple[Ready, subprocess.CompletedProcess[str]]:
        """`tasklane dev --embedded FLAGS`, `tasklane show ID` while it runs, then Ctrl-C."""
        dev = Dev.start(tasklane_command("dev", "--embedded", *flags), folder, fresh_env())
        started.append(dev)
        ready = dev.wait_ready()
        shown = tasklane("show", show, "--json", cwd=folder, env=urls_env(ready))
        servers = server_processes(folder / ".tasklane")
        assert dev.interrupt(signal.SIGINT) == 0, dev.explain()
        assert_all_gone(servers, ready)
        return ready, shown

    first = Dev.start(tasklane_command("dev", "--embedded"), folder, fresh_env())
    started.append(first)
    cold = first.wait_ready()
    task_id = str(submit(cold, folder)["id"])
    assert first.interrupt(signal.SIGINT) == 0

    warm, shown = run_once(show=task_id)
    assert "(embedded, started, data in .tasklane/postgres)" in warm.text
    assert (warm.database_url, warm.redis_url) == (cold.database_url, cold.redis_url)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["status"] == "completed"  # the first run's task is kept

    wiped, shown = run_once("--fresh", show=task_id)
    assert "(embedded, created, data in .tasklane/postgres)" in wiped.text
    assert shown.returncode == 1
    assert f"no task with id {task_id}" in shown.stderr


def test_a_closed_terminal_does_not_cut_the_stop_short(folder: Path, started: list[Dev]) -> None:
    dev = Dev.start(tasklane_command("dev", "--embedded"), folder, fresh_env(), stderr_pipe=True)
    started.append(dev)
    ready = dev.wait_ready()
    servers = server_processes(folder / ".tasklane")
    assert dev.process.stderr is not None
    dev.process.stderr.close()  # where it reports its progress is gone (EPIPE, or EIO on a tty)
    dev.interrupt(signal.SIGHUP)
    assert_all_gone(servers, ready)


def test_dev_uses_the_configured_servers(
    folder: Path, started: list[Dev], database_url: str, redis_url: str, queue: str
) -> None:
    env = fresh_env(DATABASE_URL=database_url, REDIS_URL=redis_url, TASKLANE_QUEUE=queue)
    dev = Dev.start(tasklane_command("dev"), folder, env)
    started.append(dev)
    ready = dev.wait_ready()
    assert (ready.database_url, ready.redis_url) == (database_url, redis_url)
    assert "embedded" not in ready.text.split("From another shell")[0]
    assert not (folder / ".tasklane").exists()
    assert dev.interrupt(signal.SIGINT) == 0, dev.explain()
    assert not alive(ready.worker_pid)


def test_a_worker_that_cannot_start_stops_dev_and_its_servers(folder: Path) -> None:
    run = tasklane("dev", "--embedded", cwd=folder, env=fresh_env(TASKLANE_AGENTS="no_such"))
    assert run.returncode == 1
    assert "no_such" in run.stderr
    assert "the worker exited with code 1 before it started" in run.stderr
    assert "Traceback" not in run.stderr
    assert not EmbeddedPostgres(folder / ".tasklane" / "postgres").running()
    assert not EmbeddedRedis(folder / ".tasklane" / "redis").running()
