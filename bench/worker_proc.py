"""One benchmark worker process: tasklane's lifecycle worker, or bare arq with a no-op job.

Both are built from the same `worker.app.worker_options(settings)` (the shipped defaults read
from the environment: concurrency, poll delay, queue read limit, JSON serializer, no results
kept) and start the same way `tasklane worker` does (logging configured, then `Worker.run()`).
The bare variant only swaps the job function for a no-op and drops tasklane's startup/shutdown.

Run by `bench/run.py`; not meant to be started by hand:

    python bench/worker_proc.py --mode lifecycle|bare [--burst] [--poll-delay S]

stdout carries two JSON lines for the parent: `{"event": "ready", ...}` once startup is done
(the clock starts there) and `{"event": "summary", ...}` at exit. Logs go to stderr, as shipped.

For experiments, `BENCH_WORKER_PRELOAD=/path/to/patch.py` runs that file before the worker is
built (e.g. to monkeypatch a candidate optimisation and compare it with the shipped code).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import runpy
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from arq.worker import Worker, func

import worker.app
from worker.app import worker_options
from worker.config import Settings
from worker.dispatch import JOB_FUNCTION
from worker.logs import configure_logging

Hook = Callable[[dict[str, Any]], Awaitable[None]]


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def memory_kb() -> dict[str, int]:
    """VmRSS and VmHWM of this process, in kB."""
    found: dict[str, int] = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                found[key] = int(value.split()[0])
    return found


def emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


async def noop(ctx: dict[str, Any], *args: Any, **kwargs: Any) -> None:
    return None


async def _nothing(ctx: dict[str, Any]) -> None:
    return None


class Timing:
    """Mixed into a worker class: timed from the end of startup to the end of its main loop."""

    t0: float | None = None
    t1: float | None = None
    cpu0 = 0.0
    cpu1 = 0.0
    memory_at_end: dict[str, int] | None = None

    async def main(self) -> None:
        await super().main()  # type: ignore[misc]
        self.t1 = time.perf_counter()
        self.cpu1 = cpu_seconds()
        self.memory_at_end = memory_kb()


class TimedArqWorker(Timing, Worker):
    """Bare arq: arq's own worker class."""


# tasklane's worker: the class `tasklane worker` runs (its subclass of arq's, where there is one).
_TASKLANE_WORKER: type[Worker] = getattr(worker.app, "TasklaneWorker", Worker)


class TimedTasklaneWorker(Timing, _TASKLANE_WORKER):  # type: ignore[misc,valid-type]
    """The worker class `tasklane worker` runs."""


def build_worker(mode: str, *, burst: bool, poll_delay: float | None) -> Any:
    settings = Settings.from_env()
    configure_logging(fmt=settings.log_format, level=settings.log_level)  # as `tasklane worker`
    options = worker_options(settings, burst=burst)
    if mode == "bare":
        options["functions"] = [
            func(
                noop,
                name=JOB_FUNCTION,
                timeout=options["job_timeout"],
                max_tries=options["max_tries"],
            )
        ]
        options["on_startup"] = _nothing
        options["on_shutdown"] = _nothing
    if poll_delay is not None:
        options["poll_delay"] = poll_delay
    startup: Hook = options["on_startup"]

    async def timed_startup(ctx: dict[str, Any]) -> None:
        await startup(ctx)
        worker.t0 = time.perf_counter()
        worker.cpu0 = cpu_seconds()
        emit("ready", mode=mode, **memory_kb())

    options["on_startup"] = timed_startup
    worker = (TimedArqWorker if mode == "bare" else TimedTasklaneWorker)(**options)
    return worker


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mode", choices=["lifecycle", "bare"], required=True)
    parser.add_argument("--burst", action="store_true")
    parser.add_argument("--poll-delay", type=float, default=None)
    args = parser.parse_args()

    preload = os.environ.get("BENCH_WORKER_PRELOAD")
    if preload:
        runpy.run_path(preload)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    worker = build_worker(args.mode, burst=args.burst, poll_delay=args.poll_delay)
    worker.run()
    seconds = None
    cpu = None
    if worker.t0 is not None and worker.t1 is not None:
        seconds = worker.t1 - worker.t0
        cpu = worker.cpu1 - worker.cpu0
    emit(
        "summary",
        mode=args.mode,
        jobs_complete=worker.jobs_complete,
        jobs_failed=worker.jobs_failed,
        jobs_retried=worker.jobs_retried,
        seconds=seconds,
        cpu_seconds=cpu,
        poll_delay=worker.poll_delay_s,
        max_jobs=worker.max_jobs,
        queue_read_limit=worker.queue_read_limit,
        **(worker.memory_at_end or memory_kb()),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
