"""Workers for tests: in-process (an arq Worker in the test's event loop) or real processes
(`python -m worker.cli worker`) that tests can SIGTERM and SIGKILL."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from tests.support.databases import ROOT
from worker.app import TasklaneWorker, worker_options
from worker.config import Settings
from worker.runtime import WorkerRuntime

# Timings that keep the suite fast while leaving real slack (leases, ticks, backoff).
FAST = {
    "lease_seconds": 3.0,
    "reconcile_seconds": 0.2,
    "redispatch_seconds": 2.0,
    "retry_base_seconds": 0.05,
    "retry_max_seconds": 0.5,
    "shutdown_grace_seconds": 2.0,
    "startup_wait_seconds": 0.0,  # an unreachable server fails at once (tests that wait say so)
    "log_level": "WARNING",  # tests that read the logs ask for INFO
}

ENV_NAMES = {
    "database_url": "DATABASE_URL",
    "redis_url": "REDIS_URL",
    "queue": "TASKLANE_QUEUE",
    "concurrency": "TASKLANE_CONCURRENCY",
    "lease_seconds": "TASKLANE_LEASE_SECONDS",
    "task_timeout": "TASKLANE_TASK_TIMEOUT",
    "max_attempts": "TASKLANE_MAX_ATTEMPTS",
    "retry_base_seconds": "TASKLANE_RETRY_BASE_SECONDS",
    "retry_max_seconds": "TASKLANE_RETRY_MAX_SECONDS",
    "reconcile_seconds": "TASKLANE_RECONCILE_SECONDS",
    "redispatch_seconds": "TASKLANE_REDISPATCH_SECONDS",
    "shutdown_grace_seconds": "TASKLANE_SHUTDOWN_GRACE_SECONDS",
    "startup_wait_seconds": "TASKLANE_STARTUP_WAIT_SECONDS",
    "db_pool_size": "TASKLANE_DB_POOL_SIZE",
    "max_input_bytes": "TASKLANE_MAX_INPUT_BYTES",
}


def make_settings(database_url: str, redis_url: str, queue: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": database_url,
        "redis_url": redis_url,
        "queue": queue,
        "log_format": "json",
        "agent_modules": ("worker.demo_agents", "tests.agents"),
        **FAST,
        **overrides,
    }
    return replace(Settings(), **values)


def settings_env(settings: Settings, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment a worker process needs to run with `settings`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TASKLANE_", "LOG_"))}
    for field, name in ENV_NAMES.items():
        env[name] = str(getattr(settings, field))
    env["TASKLANE_AGENTS"] = ",".join(settings.agent_modules)
    env["LOG_FORMAT"] = settings.log_format or "json"
    env["LOG_LEVEL"] = settings.log_level
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(extra or {})
    return env


@contextlib.asynccontextmanager
async def running_worker(settings: Settings, **worker_kwargs: Any) -> AsyncIterator[WorkerRuntime]:
    """An arq worker in this event loop; stopped (and its connections closed) on exit."""
    options = {**worker_options(settings), "handle_signals": False, **worker_kwargs}
    worker = TasklaneWorker(**options)
    run = asyncio.create_task(worker.async_run())
    deadline = time.monotonic() + 15
    while "tasklane" not in worker.ctx:
        if run.done():
            run.result()  # startup failed: raise its error here
        if time.monotonic() > deadline:
            raise AssertionError("in-process worker did not start within 15s")
        await asyncio.sleep(0.02)
    try:
        yield worker.ctx["tasklane"]
    finally:
        await stop_worker(worker, run)


async def stop_worker(worker: TasklaneWorker, run: asyncio.Task[None]) -> None:
    """Stop an in-process worker and close its connections, even with jobs still running.

    arq's `close()` cancels the running jobs and then gathers them: a cancelled job re-raises
    CancelledError out of it, which skips the worker's shutdown (its engines stay open) and, in
    a fixture, every teardown after this one — the next test would inherit this test's
    database. So the jobs are cancelled and awaited here first."""
    worker.handle_sig(signal.SIGUSR1)  # stop polling; cancel the running jobs
    jobs = list(worker.tasks.values())
    await _bounded(asyncio.gather(*jobs, return_exceptions=True), "its jobs to end")
    worker.tasks.clear()  # all done: nothing left for close() to gather
    await _bounded(worker.close(), "its shutdown")
    run.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await _bounded(run, "its main loop")


STOP_STEP_SECONDS = 60.0


async def _bounded(aw: Any, what: str) -> None:
    """Wait for one step of stopping an in-process worker; one that hangs is reported with
    every task's stack (on stderr) and left behind, so that the test's teardown goes on — a
    hang here once took the whole 300 s test timeout and said nothing about where it was."""
    future = asyncio.ensure_future(aw)
    done, _ = await asyncio.wait({future}, timeout=STOP_STEP_SECONDS)
    if future in done:
        with contextlib.suppress(asyncio.CancelledError):
            future.result()
        return
    print(f"in-process worker: waited {STOP_STEP_SECONDS:g}s for {what}; stacks:", file=sys.stderr)
    for task in asyncio.all_tasks():
        task.print_stack(file=sys.stderr)
    future.cancel()


class WorkerProcess:
    """`tasklane worker` as a real process, its output in a file."""

    def __init__(
        self,
        settings: Settings,
        *,
        extra_env: Mapping[str, str] | None = None,
        args: tuple[str, ...] = (),
        wrapper: tuple[str, ...] = (),
    ) -> None:
        self.settings = settings
        self.log_path = Path(tempfile.mkstemp(prefix="tasklane-worker-", suffix=".log")[1])
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [*wrapper, sys.executable, "-m", "worker.cli", "worker", *args],
            env=settings_env(settings, extra_env),
            cwd=ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def output(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def wait_started(self, timeout: float = 20.0) -> WorkerProcess:
        deadline = time.monotonic() + timeout
        while '"worker.started"' not in self.output():
            if self.process.poll() is not None:
                raise AssertionError(
                    f"worker exited with {self.process.returncode}:\n{self.output()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"worker did not start within {timeout}s:\n{self.output()}")
            time.sleep(0.05)
        return self

    def wait_for_output(self, text: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output():
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not in the worker's output within {timeout}s")
            time.sleep(0.05)

    def signal(self, sig: signal.Signals) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def wait(self, timeout: float = 30.0) -> int:
        return self.process.wait(timeout=timeout)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=self.settings.shutdown_grace_seconds + 15)
            except subprocess.TimeoutExpired:
                self._dump_stacks()
                self.process.kill()
                self.process.wait(timeout=10)
        self._log.close()

    def _dump_stacks(self) -> None:
        """A worker that ignored SIGTERM: its threads' and tasks' stacks (py-spy, in the dev
        group) go into its log, which the failing assertion prints, so that a hang says where."""
        self._log.write(b"\n== SIGTERM ignored; its asyncio tasks (SIGUSR2), then py-spy dump:\n")
        self._log.flush()
        self.signal(signal.SIGUSR2)  # TasklaneWorker.dump_tasks
        time.sleep(1)
        self._log.write(py_spy_dump(self.pid).encode())


def py_spy_dump(pid: int) -> str:
    """The threads' stacks of process `pid` (py-spy, in the dev group), or why there are none."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    try:
        done = subprocess.run(
            [spy, "dump", "--pid", str(pid)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return f"(py-spy dump failed: {exc!r})\n"
    return done.stdout + done.stderr


def start_process(
    processes: list[WorkerProcess], settings: Settings, **kwargs: Any
) -> WorkerProcess:
    """Start a worker process with INFO logs (`wait_started` reads its worker.started line, tests
    read the rest), add it to `processes` (the fixture stops them all) and wait until it serves."""
    process = WorkerProcess(replace(settings, log_level="INFO"), **kwargs)
    processes.append(process)
    return process.wait_started()
