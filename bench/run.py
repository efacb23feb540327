"""tasklane's benchmark: how much of arq's raw speed survives the lifecycle bookkeeping.

    uv run python bench/run.py            # the full run (about 6 minutes on 2 cores)
    uv run python bench/run.py --quick    # a smaller run, under a minute
    uv run python bench/run.py --cases bare,lifecycle --concurrency 100 --poll-delay 0.01
    uv run python bench/run.py --cases fanout --fanout-children 1000,10000
    uv run python bench/run.py --profile /tmp/prof   # py-spy on a bare and a lifecycle worker

In one run, on the same PostgreSQL and Redis, with the shipped worker defaults (concurrency, poll
delay, queue read limit, JSON serializer, JSON logs to stderr) and the cases interleaved and
repeated (median and min–max):

1. bare arq      — a no-op arq job in a burst worker built from the same `worker_options`: the
                   ceiling;
2. lifecycle     — N `echo` tasks submitted with `submit_many`, then a tasklane burst worker; every
                   task must end `completed` with exactly one attempt, which is checked;
3. submit        — `TaskClient.submit` one at a time next to one INSERT + one enqueue by hand;
                   `submit_many` (batches of 1000) next to raw asyncpg `executemany` of the same
                   rows (alone, and with the doorbells rung);
4. latency       — submit → handler start (`task_attempts.started_at − tasks.created_at`, both
                   the database clock) at a steady rate, p50/p99;
5. backlog       — the lifecycle again with extra pending tasks that are not due yet;
6. memory        — the worker's peak RSS over a long run, and its growth from 20 % to 100 % done;
7. cli           — each `tasklane` command, ten times in a fresh process on an empty database
                   (bytecode cached), median wall and CPU time;
8. fanout        — one `fanout` parent spawning K `square` children in a burst worker, against
                   K independent `square` tasks in another (paired, at each K of
                   `--fanout-children`, default 1,000 and 10,000): children/s and roots/s, each
                   from the first start to the last finish (task_attempts, the database clock),
                   their ratio (goal ≥ 0.8) and how often the parent was resumed (goal: once);
9. scale         — only with `--cases scale`: a table of millions of finished tasks built once
                   (tests/support/big_table.py); the lifecycle beside it against an empty table,
                   paired, and the p95 of each operator command's work on it.

A ratio is only comparable when the machine was the benchmark's: each bare and lifecycle run
records the share of the CPU other processes took, and past OTHERS_LIMIT_PCT in any pair the
last line says `n/a` and why.

Workers are separate processes (`bench/worker_proc.py`), timed from the end of their startup to
the end of the burst; each run gets a fresh queue and emptied tables. The benchmark creates its
own database (`tasklane_bench_*`, dropped at the end) and uses Redis database 9 (BENCH_REDIS).
The last line is `lifecycle/bare_arq = R`, the median of the per-repetition ratios; the lines
before it hold issue 19's three goals with their measured values: the fan-out's ratio at each K,
the lean lifecycle (the ratio and PostgreSQL CPU per task) and the CLI's slowest medians.

Besides rates, each worker run reports CPU per task of the worker process (getrusage), of
redis-server and of the PostgreSQL backends of the benchmark's database (/proc), and how busy the
whole machine was: on a shared machine, compare runs by the paired ratios and CPU per task.
`BENCH_WORKER_PRELOAD=patch.py` (see `worker_proc.py`) tries a change in the workers first.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import resource
import shutil
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import asyncpg
from redis.asyncio import Redis
from sqlalchemy.engine import make_url

from domain.entities import Doorbell
from domain.value_objects import FINISHED_STATUSES, TaskStatus
from persistence import pg
from persistence.migrate import migrate
from tests.support import big_table
from worker.client import SUBMIT_BATCH, TaskClient, TaskSpec
from worker.config import Settings
from worker.demo_agents import MAX_FANOUT
from worker.dispatch import Dispatcher
from worker.redis_conn import create_redis

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORKER_PROC = HERE / "worker_proc.py"
SERVER_URL = os.environ.get("BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("BENCH_REDIS", "redis://127.0.0.1:6379/9")
SHIPPED = Settings()  # the shipped defaults: what a worker runs with when nothing is set


@dataclass(frozen=True)
class Plan:
    reps: int  # repetitions of bare arq and lifecycle (interleaved, paired)
    side_reps: int  # repetitions of backlog, submit and latency (the last `side_reps` reps)
    n: int  # tasks (jobs) per bare / lifecycle / backlog run
    warmup_n: int  # one bare + one lifecycle run of this size first, discarded
    singles: int  # submits one at a time, per repetition
    many: int  # tasks through submit_many, per repetition
    latency_rate: float  # tasks/s during the latency case
    latency_seconds: float  # measured, after `latency_warmup` seconds at the same rate
    latency_warmup: float
    backlog: int  # extra not-yet-due pending tasks in the backlog case (0: skip)
    memory_n: int  # tasks in the memory run (0: skip)
    scale_finished: int  # the scale case's table: finished tasks
    scale_pending: int  # and due pending ones
    cli_runs: int  # runs of each command in the cli case (median)
    fanout_children: tuple[int, ...]  # K: children of the fanout case's parent, one pair per K
    fanout_reps: int  # pairs (children run, roots run) at each K


FULL = Plan(
    reps=5,
    side_reps=5,
    n=20_000,
    warmup_n=5_000,
    singles=2_000,
    many=20_000,
    latency_rate=200,
    latency_seconds=15,
    latency_warmup=3,
    backlog=100_000,
    memory_n=100_000,
    scale_finished=5_000_000,
    scale_pending=100_000,
    cli_runs=10,
    fanout_children=(1_000, 10_000),
    fanout_reps=3,
)
QUICK = Plan(
    reps=5,  # five pairs: one noisy pair moves the median little (it printed 0.52 and 0.65 at 3)
    side_reps=1,
    n=2_000,
    warmup_n=500,
    singles=300,
    many=5_000,
    latency_rate=200,
    latency_seconds=3,
    latency_warmup=2,
    backlog=20_000,
    memory_n=0,
    scale_finished=500_000,
    scale_pending=10_000,
    cli_runs=10,
    fanout_children=(1_000,),
    fanout_reps=1,
)
CASES = (
    "bare", "lifecycle", "submit", "latency", "backlog", "limited", "memory", "cli", "fanout",
    "scale",
)  # fmt: skip
# The limited case: an agent limited to 10 running tasks, across this many keys (tenants).
LIMITED_KEYS = 20
# `scale` builds a table of millions of rows (about 70 s for 5M on a quiet 2-core machine): only
# when asked for (--cases scale).
DEFAULT_CASES = tuple(c for c in CASES if c != "scale")

# The cli case: each command as a person runs it, in a fresh process, on an empty database.
# Goals (issue 19): ≤ 0.3 s for every read command and submit, ≤ 0.15 s for --help.
CLI_GOALS = {"--help": 0.15}
CLI_GOAL = 0.3
# The fanout case (issue 19): a fan-out's children complete at ≥ 0.8× the rate of as many
# independent tasks, with exactly one resume per wait. The demo `fanout` spawns at most
# MAX_FANOUT children.
FANOUT_GOAL = 0.8
# A leaner lifecycle (issue 19): lifecycle/bare_arq ≥ 0.9 and PostgreSQL CPU per task ≤ 0.15 ms.
LIFECYCLE_GOAL = 0.9
PG_MS_GOAL = 0.15
# The scale case: p95 of each operator command on the big table (issue 13: ≤ 100 ms), and the
# lifecycle beside that table against an empty one (≥ 0.9).
SCALE_COMMAND_RUNS = 20
SCALE_GOAL_MS = 100.0


class BenchError(RuntimeError):
    """A run went wrong (a worker died, a task did not complete): the numbers would lie."""


# -- small helpers ---------------------------------------------------------------------------------


def server_url(database: str, driver: str = "postgresql") -> str:
    url = make_url(SERVER_URL).set(drivername=driver, database=database)
    return url.render_as_string(hide_password=False)


async def admin(sql: str) -> None:
    conn = await asyncpg.connect(server_url("postgres"))
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def machine_cpu() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs, from /proc/stat."""
    with open("/proc/stat") as stat:
        values = [int(v) for v in stat.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    total = sum(values[:8])  # guest time is already counted in user
    return total - idle, total


# A run during which other processes took more than this share of the machine's CPU gives no
# ratio: two spinning processes moved the quick ratio from 0.76 to 0.54 on the 2-core CI host.
OTHERS_LIMIT_PCT = 20.0


@dataclass(frozen=True)
class CpuMark:
    """What the machine and this benchmark (itself and its waited-for children) had used."""

    machine_busy: int  # jiffies, all CPUs
    own_seconds: float
    wall: float

    @staticmethod
    def now() -> CpuMark:
        me = resource.getrusage(resource.RUSAGE_SELF)
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        own = me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime
        return CpuMark(machine_cpu()[0], own, time.monotonic())


def others_percent(before: CpuMark, services: ServiceCpu) -> float:
    """The share of the machine's CPU (all cores) that processes other than this benchmark, its
    worker, redis-server and the benchmark database's backends took since `before`."""
    after = CpuMark.now()
    busy = (after.machine_busy - before.machine_busy) / CLOCK_TICKS
    ours = after.own_seconds - before.own_seconds + services.redis_seconds
    ours += services.postgres_seconds
    capacity = (after.wall - before.wall) * (os.cpu_count() or 1)
    return max(0.0, 100.0 * (busy - ours) / capacity) if capacity else 0.0


def busy_percent(before: tuple[int, int], after: tuple[int, int]) -> float:
    busy, total = after[0] - before[0], after[1] - before[1]
    return 100.0 * busy / total if total else 0.0


def proc_memory_kb(pid: int) -> dict[str, int]:
    found: dict[str, int] = {}
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                found[key] = int(value.split()[0])
    return found


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def proc_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process, None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


class ServiceCpu:
    """CPU used by the services while a worker runs: redis-server (the whole server: other
    clients count too) and the PostgreSQL backends connected to the benchmark's database
    (the worker's connections, autovacuum), sampled every 0.25 s so short-lived backends are
    seen (approximate: a backend's CPU before its first sample is not counted)."""

    def __init__(self, bench: Bench) -> None:
        self.bench = bench
        self.first: dict[int, float] = {}
        self.last: dict[int, float] = {}
        self.redis_pid = 0
        self.redis_before = 0.0
        self.redis_seconds = 0.0
        self._conn: asyncpg.Connection | None = None
        self._sampler: asyncio.Task[None] | None = None

    async def start(self) -> ServiceCpu:
        info = await self.bench.redis.info("server")
        self.redis_pid = int(info["process_id"])
        self.redis_before = proc_cpu_seconds(self.redis_pid) or 0.0
        self._conn = await asyncpg.connect(server_url(self.bench.database))
        await self._refresh()
        self._sampler = asyncio.create_task(self._sample())
        return self

    async def _sample(self) -> None:
        while True:
            await asyncio.sleep(0.25)
            await self._refresh()

    async def _refresh(self) -> None:
        assert self._conn is not None
        rows = await self._conn.fetch(
            "SELECT pid FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        for row in rows:
            cpu = proc_cpu_seconds(row["pid"])
            if cpu is not None:
                self.first.setdefault(row["pid"], cpu)
                self.last[row["pid"]] = cpu

    async def stop(self) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sampler
        if self._conn is not None:
            await self._refresh()
            await self._conn.close()
        self.redis_seconds = (proc_cpu_seconds(self.redis_pid) or 0.0) - self.redis_before

    @property
    def postgres_seconds(self) -> float:
        return sum(self.last[pid] - self.first[pid] for pid in self.last)


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of already sorted values."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- the worker process ----------------------------------------------------------------------------


class WorkerChild:
    """`bench/worker_proc.py` as a process: its stdout carries the ready and summary lines, its
    stderr (the JSON logs, shipped defaults) goes to a temporary file read only on failure."""

    def __init__(
        self,
        bench: Bench,
        mode: str,
        queue: str,
        *,
        burst: bool,
        wrapper: Sequence[str] = (),
    ) -> None:
        self.bench = bench
        self.mode = mode
        self.queue = queue
        self.burst = burst
        self.wrapper = list(wrapper)
        self.proc: asyncio.subprocess.Process | None = None
        self.log_path: Path | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def start(self) -> WorkerChild:
        fd, name = tempfile.mkstemp(prefix=f"tasklane-bench-{self.mode}-", suffix=".log")
        self.log_path = Path(name)
        command_line = [*self.wrapper, sys.executable, str(WORKER_PROC), "--mode", self.mode]
        if self.burst:
            command_line.append("--burst")
        if self.bench.poll_delay is not None:
            command_line += ["--poll-delay", str(self.bench.poll_delay)]
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *command_line,
                env=self.bench.worker_env(self.queue),
                cwd=ROOT,
                stdout=asyncio.subprocess.PIPE,
                stderr=fd,
            )
        finally:
            os.close(fd)
        return self

    async def _event(self, event: str, within: float) -> dict[str, Any]:
        assert self.proc is not None
        assert self.proc.stdout is not None
        deadline = time.monotonic() + within
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BenchError(f"{self.mode} worker: no {event!r} within {within:.0f}s")
            try:
                raw = await asyncio.wait_for(self.proc.stdout.readline(), remaining)
            except TimeoutError:
                continue
            if not raw:
                code = await self.proc.wait()
                raise BenchError(
                    f"{self.mode} worker exited ({code}) before {event!r}:\n{self.tail()}"
                )
            try:
                data = json.loads(raw)
            except ValueError:
                continue
            if isinstance(data, dict) and data.get("event") == event:
                return data

    async def ready(self, within: float = 60.0) -> dict[str, Any]:
        return await self._event("ready", within)

    async def summary(self, within: float) -> dict[str, Any]:
        data = await self._event("summary", within)
        assert self.proc is not None
        code = await asyncio.wait_for(self.proc.wait(), 60)
        if code != 0:
            raise BenchError(f"{self.mode} worker exited with {code}:\n{self.tail()}")
        return data

    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def stop(self, within: float = 30.0) -> dict[str, Any]:
        """SIGTERM (graceful), then its summary."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return await self.summary(within)

    def tail(self, lines: int = 30) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    async def close(self) -> None:
        if self.running():
            assert self.proc is not None
            self.proc.kill()
            await self.proc.wait()
        if self.log_path is not None:
            self.log_path.unlink(missing_ok=True)


@contextlib.asynccontextmanager
async def worker_process(
    bench: Bench, mode: str, queue: str, *, burst: bool, wrapper: Sequence[str] = ()
) -> AsyncIterator[WorkerChild]:
    child = WorkerChild(bench, mode, queue, burst=burst, wrapper=wrapper)
    try:
        yield await child.start()
    finally:
        await child.close()


# -- results ---------------------------------------------------------------------------------------


@dataclass
class Results:
    values: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    notes: list[str] = field(default_factory=list)

    def add(self, key: str, value: float) -> None:
        self.values[key].append(value)

    def has(self, key: str) -> bool:
        return bool(self.values.get(key))

    def median(self, key: str) -> float:
        return statistics.median(self.values[key])


# -- the benchmark ---------------------------------------------------------------------------------


class Bench:
    def __init__(
        self,
        plan: Plan,
        database: str,
        *,
        concurrency: int | None,
        poll_delay: float | None,
    ) -> None:
        self.plan = plan
        self.database = database
        self.database_url = server_url(database, "postgresql+asyncpg")
        self.concurrency = concurrency
        self.poll_delay = poll_delay
        self.run_id = uuid.uuid4().hex[:6]
        self.queues: list[str] = []
        self.results = Results()
        # Why the paired ratio cannot be trusted (other load during a run); empty: it can.
        self.untrusted: list[str] = []
        self.fanout_untrusted: dict[int, list[str]] = defaultdict(list)  # the same, by K
        self.conversation_id: UUID = uuid.uuid4()
        self._conn: asyncpg.Connection | None = None
        self._redis: Redis | None = None

    # -- plumbing ----------------------------------------------------------------------------------

    @property
    def conn(self) -> asyncpg.Connection:
        assert self._conn is not None
        return self._conn

    @property
    def redis(self) -> Redis:
        assert self._redis is not None
        return self._redis

    async def open(self) -> None:
        self._conn = await pg.connect(self.database_url)
        self._redis = Redis.from_url(REDIS_URL)
        await self.redis.ping()
        await self.conn.execute(
            "INSERT INTO conversations (id, user_id, title) VALUES ($1, 'bench', 'bench')",
            self.conversation_id,
        )

    async def close(self) -> None:
        if self._redis is not None:
            await self.clean_redis()
            await self._redis.aclose()
        if self._conn is not None:
            await self._conn.close()

    async def clean_redis(self) -> None:
        """Delete what this run left in Redis: its queues, their jobs and health-check keys."""
        for queue in self.queues:
            job_ids = [j.decode() for j in await self.redis.zrange(queue, 0, -1)]
            for start in range(0, len(job_ids), 1000):
                keys = [
                    f"{prefix}{job_id}"
                    for job_id in job_ids[start : start + 1000]
                    for prefix in ("arq:job:", "arq:in-progress:", "arq:retry:", "arq:result:")
                ]
                await self.redis.delete(*keys)
            await self.redis.delete(queue, f"{queue}:health-check")

    def new_queue(self, case: str) -> str:
        queue = f"bench_{self.run_id}_{case}_{len(self.queues)}"
        self.queues.append(queue)
        return queue

    def settings(self, queue: str) -> Settings:
        settings = replace(
            SHIPPED, database_url=self.database_url, redis_url=REDIS_URL, queue=queue
        )
        if self.concurrency is not None:
            settings = replace(settings, concurrency=self.concurrency)
        return settings

    def worker_env(self, queue: str) -> dict[str, str]:
        """The shipped defaults (no TASKLANE_*/LOG_* inherited), this run's services and queue."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TASKLANE_", "LOG_"))}
        env["DATABASE_URL"] = self.database_url
        env["REDIS_URL"] = REDIS_URL
        env["TASKLANE_QUEUE"] = queue
        # The limited case's agent (bench/bench_agents.py) beside the demo agents.
        env["TASKLANE_AGENTS"] = "worker.demo_agents,bench_agents"
        here = str(Path(__file__).resolve().parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
        if self.concurrency is not None:
            env["TASKLANE_CONCURRENCY"] = str(self.concurrency)
        return env

    async def reset_tables(self) -> None:
        await self.conn.execute("TRUNCATE tasks, task_attempts, task_signals")

    async def analyze(self) -> None:
        await self.conn.execute("VACUUM ANALYZE tasks, task_attempts")

    def specs(self, n: int, *, limited: bool = False) -> list[TaskSpec]:
        if limited:
            return [
                TaskSpec(
                    "limited_echo",
                    {"i": i},
                    conversation_id=self.conversation_id,
                    metadata={"tenant": f"t{i % LIMITED_KEYS}"},
                )
                for i in range(n)
            ]
        return [TaskSpec("echo", {"i": i}, conversation_id=self.conversation_id) for i in range(n)]

    async def submit_many(
        self, queue: str, n: int, *, limited: bool = False
    ) -> tuple[list[UUID], float]:
        """Submit n echo tasks with `submit_many`; their ids and the rate."""
        specs = self.specs(n, limited=limited)
        async with TaskClient.from_settings(self.settings(queue)) as client:
            started = time.perf_counter()
            tasks = await client.submit_many(specs)
            elapsed = time.perf_counter() - started
        return [t.id for t in tasks], n / elapsed

    async def insert_backlog(self, queue: str, n: int) -> None:
        """n pending echo tasks due in a day, in the same queue."""
        await self.conn.execute(
            """
            INSERT INTO tasks (conversation_id, agent_id, queue, input, run_after)
            SELECT $1, 'echo', $2, jsonb_build_object('backlog', g), now() + interval '1 day'
            FROM generate_series(1, $3) AS g
            """,
            self.conversation_id,
            queue,
            n,
        )

    async def check_completed(self, ids: Sequence[UUID], *, backlog: int = 0) -> None:
        rows = await self.conn.fetch(
            "SELECT status, count(*) AS n FROM tasks WHERE id = ANY($1::uuid[]) GROUP BY status",
            list(ids),
        )
        by_status = {r["status"]: r["n"] for r in rows}
        attempts = await self.conn.fetchrow(
            "SELECT count(*) AS runs, count(*) FILTER (WHERE outcome = 'completed') AS done,"
            " count(DISTINCT task_id) AS tasks FROM task_attempts"
        )
        assert attempts is not None
        problems = []
        if by_status != {"completed": len(ids)}:
            problems.append(f"statuses {by_status}, expected {len(ids)} completed")
        if not attempts["runs"] == attempts["done"] == attempts["tasks"] == len(ids):
            problems.append(f"task_attempts {dict(attempts)}, expected {len(ids)} single runs")
        if backlog:
            waiting = await self.conn.fetchval(
                "SELECT count(*) FROM tasks WHERE status = 'pending' AND run_after > now()"
                " AND runs = 0"
            )
            if waiting != backlog:
                problems.append(f"backlog: {waiting} untouched, expected {backlog}")
        if problems:
            raise BenchError("; ".join(problems))

    async def ring(self, queue: str, n: int) -> None:
        """n doorbells for random task ids, exactly as tasklane writes them."""
        dispatcher = Dispatcher(self.redis, queue)
        for start in range(0, n, SUBMIT_BATCH):
            count = min(SUBMIT_BATCH, n - start)
            await dispatcher.ring([Doorbell(uuid.uuid4(), 0) for _ in range(count)])

    # -- cases -------------------------------------------------------------------------------------

    async def bare(self, n: int, key: str = "bare") -> float:
        queue = self.new_queue("bare")
        await self.ring(queue, n)
        before = machine_cpu()
        mark = CpuMark.now()
        services = await ServiceCpu(self).start()
        try:
            async with worker_process(self, "bare", queue, burst=True) as child:
                summary = await child.summary(within=n / 100 + 60)
        finally:
            await services.stop()
        if summary["jobs_complete"] != n or summary["jobs_failed"]:
            raise BenchError(f"bare arq ran {summary}, expected {n} complete")
        rate = n / summary["seconds"]
        self.results.add(key, rate)
        self.results.add(f"{key}.cpu_ms", 1000 * summary["cpu_seconds"] / n)
        self.results.add(f"{key}.machine", busy_percent(before, machine_cpu()))
        self.results.add(f"{key}.redis_ms", 1000 * services.redis_seconds / n)
        others = others_percent(mark, services)
        self.results.add(f"{key}.others", others)
        say(
            f"{key}: {rate:,.0f} jobs/s ({1000 * summary['cpu_seconds'] / n:.3f} ms CPU/job;"
            f" other processes {others:.0f}% of the machine)"
        )
        return rate

    async def lifecycle(
        self, n: int, *, backlog: int = 0, key: str = "lifecycle", limited: bool = False
    ) -> float:
        await self.reset_tables()
        queue = self.new_queue(key)
        if backlog:
            await self.insert_backlog(queue, backlog)
        if limited:  # declared before the tasks go in, as a worker that ran before would have
            await self.conn.execute(
                "INSERT INTO flow_limits (queue, agent_id, declared_concurrency, key_source,"
                " key_field) VALUES ($1, 'limited_echo', 10, 'metadata', 'tenant')",
                queue,
            )
        ids, submit_rate = await self.submit_many(queue, n, limited=limited)
        await self.analyze()
        db_before = await self.db_counters()
        before = machine_cpu()
        mark = CpuMark.now()
        services = await ServiceCpu(self).start()
        try:
            async with worker_process(self, "lifecycle", queue, burst=True) as child:
                summary = await child.summary(within=n / 50 + 60)
        finally:
            await services.stop()
        # A limited agent's tasks also start through flow doorbells (more jobs than tasks):
        # its tasks are checked in the database below, one completed run each.
        if summary["jobs_failed"] or (not limited and summary["jobs_complete"] != n):
            raise BenchError(f"lifecycle worker ran {summary}, expected {n} complete")
        await self.check_completed(ids, backlog=backlog)
        rate = n / summary["seconds"]
        self.results.add(key, rate)
        self.results.add(f"{key}.cpu_ms", 1000 * summary["cpu_seconds"] / n)
        self.results.add(f"{key}.machine", busy_percent(before, machine_cpu()))
        self.results.add(f"{key}.redis_ms", 1000 * services.redis_seconds / n)
        self.results.add(f"{key}.pg_ms", 1000 * services.postgres_seconds / n)
        others = others_percent(mark, services)
        self.results.add(f"{key}.others", others)
        db_after = await self.db_counters()
        self.results.add(f"{key}.xacts", (db_after[0] - db_before[0]) / n)
        self.results.add(f"{key}.buffers", (db_after[1] - db_before[1]) / n)
        say(
            f"{key}: {rate:,.0f} tasks/s ({1000 * summary['cpu_seconds'] / n:.3f} ms CPU/task;"
            f" pre-submit {submit_rate:,.0f}/s; other processes {others:.0f}% of the machine),"
            f" all {n} completed"
        )
        return rate

    async def db_counters(self) -> tuple[int, int]:
        """This database's (transactions, buffers read or hit) so far. A backend reports its
        counts when it ends (the worker's have) or within a second: wait that second."""
        await asyncio.sleep(1.1)
        await self.conn.execute("SELECT pg_stat_clear_snapshot()")
        row = await self.conn.fetchrow(
            "SELECT xact_commit + xact_rollback AS xacts, blks_hit + blks_read AS buffers"
            " FROM pg_stat_database WHERE datname = current_database()"
        )
        assert row is not None
        return int(row["xacts"]), int(row["buffers"])

    async def submit(self, rep: int) -> None:
        queue = self.new_queue("submit")
        singles, many = self.plan.singles, self.plan.many
        async with TaskClient.from_settings(self.settings(queue)) as client:
            # Warm the client's pools and prepared statements, and the by-hand connection.
            await self.reset_tables()
            for i in range(20):
                await client.submit("echo", {"warm": i}, conversation_id=self.conversation_id)
            await client.submit_many(self.specs(200))
            hand = await pg.connect(self.database_url)
            # As a producer's client (worker.submission.producer_redis): no timer per reply.
            redis = create_redis(REDIS_URL, retries=3, socket_timeout=None)
            dispatcher = Dispatcher(redis, queue)
            try:
                specs = self.specs(many)
                steps: list[tuple[str, Callable[[], Any], int]] = [
                    ("submit.one", lambda: self._submit_singles(client, singles), singles),
                    ("submit.by_hand", lambda: self._by_hand(hand, dispatcher, singles), singles),
                    ("submit.many", lambda: client.submit_many(specs), many),
                    ("submit.executemany", lambda: self._executemany(hand, queue, many), many),
                    (
                        "submit.executemany_ring",
                        lambda: self._executemany(hand, queue, many, dispatcher),
                        many,
                    ),
                ]
                if rep % 2:
                    steps.reverse()
                for key, step, count in steps:
                    await self.reset_tables()
                    started = time.perf_counter()
                    await step()
                    rate = count / (time.perf_counter() - started)
                    self.results.add(key, rate)
                    say(f"{key}: {rate:,.0f} tasks/s")
            finally:
                await hand.close()
                await redis.aclose()
        self.results.add(
            "submit.one/by_hand",
            self.results.values["submit.one"][-1] / self.results.values["submit.by_hand"][-1],
        )
        await self.reset_tables()

    async def _submit_singles(self, client: TaskClient, n: int) -> None:
        for i in range(n):
            await client.submit("echo", {"i": i}, conversation_id=self.conversation_id)

    _INSERT_ONE = """
        INSERT INTO tasks (id, conversation_id, agent_id, queue, input, metadata, dispatch_after)
        VALUES ($1, $2, $3, $4, $5, $6, now() + make_interval(secs => $7))
    """

    async def _by_hand(self, conn: asyncpg.Connection, dispatcher: Dispatcher, n: int) -> None:
        """One INSERT (autocommit) and one enqueue (arq's job key + queue entry, one pipelined
        round trip), one task at a time."""
        delay = SHIPPED.redispatch_seconds
        for i in range(n):
            task_id = uuid.uuid4()
            await conn.execute(
                self._INSERT_ONE,
                task_id,
                self.conversation_id,
                "echo",
                dispatcher.queue,
                json.dumps({"i": i}),
                "{}",
                delay,
            )
            await dispatcher.ring([Doorbell(task_id, 0)])

    async def _executemany(
        self,
        conn: asyncpg.Connection,
        queue: str,
        n: int,
        dispatcher: Dispatcher | None = None,
    ) -> None:
        """The same rows with asyncpg's executemany, in batches of 1000 (each its own
        transaction), optionally with their doorbells rung after each batch."""
        delay = SHIPPED.redispatch_seconds
        for start in range(0, n, SUBMIT_BATCH):
            rows = [
                (
                    uuid.uuid4(),
                    self.conversation_id,
                    "echo",
                    queue,
                    json.dumps({"i": i}),
                    "{}",
                    delay,
                )
                for i in range(start, min(n, start + SUBMIT_BATCH))
            ]
            await conn.executemany(self._INSERT_ONE, rows)
            if dispatcher is not None:
                await dispatcher.ring([Doorbell(row[0], 0) for row in rows])

    async def latency(self) -> None:
        rate, seconds = self.plan.latency_rate, self.plan.latency_seconds
        # A fresh worker and client open connections and prepare statements during the first
        # seconds: those tasks run but are not counted.
        skip = int(rate * self.plan.latency_warmup)
        n = skip + int(rate * seconds)
        await self.reset_tables()
        queue = self.new_queue("latency")
        async with (
            worker_process(self, "lifecycle", queue, burst=False) as child,
            TaskClient.from_settings(self.settings(queue)) as client,
        ):
            await child.ready()
            await client.submit("echo", {"warm": 0}, conversation_id=self.conversation_id)
            loop = asyncio.get_running_loop()
            submits: list[asyncio.Task[Any]] = []
            start = loop.time() + 0.05
            for i in range(n):
                delay = start + i / rate - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                submits.append(
                    asyncio.create_task(
                        client.submit("echo", {"i": i}, conversation_id=self.conversation_id)
                    )
                )
            tasks = await asyncio.gather(*submits)
            achieved = n / (loop.time() - start)  # to be sure the producer kept the pace
            ids = [t.id for t in tasks]
            deadline = time.monotonic() + 60
            while await self.conn.fetchval(
                "SELECT count(*) FROM tasks WHERE id = ANY($1::uuid[]) AND status = 'completed'",
                ids,
            ) < len(ids):
                if time.monotonic() > deadline or not child.running():
                    raise BenchError(f"latency: tasks not completed in time\n{child.tail()}")
                await asyncio.sleep(0.1)
            await child.stop()
        rows = await self.conn.fetch(
            """
            SELECT extract(epoch FROM a.started_at - t.created_at) * 1000 AS ms
            FROM tasks AS t JOIN task_attempts AS a ON a.task_id = t.id AND a.run = 1
            WHERE t.id = ANY($1::uuid[])
            ORDER BY t.created_at
            """,
            ids,
        )
        values = sorted(float(r["ms"]) for r in rows[skip:])
        p50, p99 = percentile(values, 50), percentile(values, 99)
        self.results.add("latency.p50", p50)
        self.results.add("latency.p99", p99)
        self.results.add("latency.max", values[-1])
        self.results.add("latency.rate", achieved)
        say(
            f"latency at {achieved:,.0f}/s: p50 {p50:.1f} ms, p99 {p99:.1f} ms,"
            f" max {values[-1]:.1f} ms"
        )
        await self.reset_tables()

    async def memory(self, n: int) -> None:
        await self.reset_tables()
        queue = self.new_queue("memory")
        ids, submit_rate = await self.submit_many(queue, n)
        say(f"memory: {n:,} tasks submitted ({submit_rate:,.0f}/s)")
        await self.analyze()
        mark = n // 5
        at_mark: dict[str, int] | None = None
        async with worker_process(self, "lifecycle", queue, burst=True) as child:
            ready = await child.ready()
            while child.running():
                sample = proc_memory_kb(child.pid)
                # A started doorbell leaves the queue: what is off it has started (or ended).
                started = n - int(await self.redis.zcard(queue))
                if at_mark is None and started >= mark and sample:
                    at_mark = {**sample, "started": started}
                await asyncio.sleep(0.2)
            summary = await child.summary(within=60)
        await self.check_completed(ids)
        if at_mark is None:
            raise BenchError("memory: no sample at 20 % started")
        growth = 100.0 * (summary["VmRSS"] - at_mark["VmRSS"]) / at_mark["VmRSS"]
        self.results.add("memory.start_mb", ready["VmRSS"] / 1024)
        self.results.add("memory.mark_mb", at_mark["VmRSS"] / 1024)
        self.results.add("memory.end_mb", summary["VmRSS"] / 1024)
        self.results.add("memory.peak_mb", summary["VmHWM"] / 1024)
        self.results.add("memory.growth_pct", growth)
        self.results.add("memory.rate", n / summary["seconds"])
        say(
            f"memory: RSS {ready['VmRSS'] / 1024:.0f} MB at start, "
            f"{at_mark['VmRSS'] / 1024:.0f} MB at {at_mark['started']:,} started, "
            f"{summary['VmRSS'] / 1024:.0f} MB at {n:,}; peak {summary['VmHWM'] / 1024:.0f} MB;"
            f" {n / summary['seconds']:,.0f} tasks/s"
        )

    async def cli(self) -> None:
        """Each command `cli_runs` times in a fresh process on an empty database (after one
        discarded run, which writes the bytecode caches); the median of each."""
        await self.reset_tables()
        queue = self.new_queue("cli")
        env = self.worker_env(queue)
        # As an installed package runs: with bytecode (the discarded first run writes it where
        # PYTHONDONTWRITEBYTECODE kept it from being written; compiling is most of a cold start).
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        row = await self.conn.fetchrow(
            "INSERT INTO tasks (conversation_id, agent_id, queue) VALUES ($1, 'echo', $2)"
            " RETURNING id",
            self.conversation_id,
            queue,
        )
        assert row is not None
        task_id = str(row["id"])
        commands = {
            "--help": ["--help"],
            "submit": ["submit", "echo", "--input", "{}"],
            "show": ["show", task_id],
            "list": ["list"],
            "tree": ["tree", task_id],
            "stats": ["stats"],
            "prune --dry-run": ["prune", "--older-than", "7d", "--dry-run"],
            "health": ["health"],
        }
        script = Path(sys.executable).parent / "tasklane"
        for name, argv in commands.items():
            times, cpu = [], []
            for run in range(self.plan.cli_runs + 1):
                cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
                started = time.perf_counter()
                proc = await asyncio.create_subprocess_exec(
                    str(script),
                    *argv,
                    env=env,
                    cwd=ROOT,
                    stdout=asyncio.subprocess.DEVNULL,
                    stderr=asyncio.subprocess.PIPE,
                )
                _, err = await proc.communicate()
                elapsed = time.perf_counter() - started
                cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
                cpu_seconds = (cpu_after.ru_utime + cpu_after.ru_stime) - (
                    cpu_before.ru_utime + cpu_before.ru_stime
                )
                if proc.returncode not in (0, 1) or (proc.returncode and name != "health"):
                    raise BenchError(f"tasklane {' '.join(argv)}: {err.decode()[-500:]}")
                if run:  # the first wrote the bytecode caches
                    times.append(elapsed)
                    cpu.append(cpu_seconds)
            median = statistics.median(times)
            goal = CLI_GOALS.get(name, CLI_GOAL)
            self.results.add(f"cli.{name}", median)
            self.results.add(f"cli.{name}.cpu", statistics.median(cpu))
            verdict = "meets" if median <= goal else "MISSES"
            say(
                f"cli {name}: median {median:.3f} s wall, {statistics.median(cpu):.3f} s CPU"
                f" over {len(times)} runs ({verdict} ≤ {goal} s; load {load()})"
            )
        await self.reset_tables()

    async def fanout(self, k: int, rep: int) -> None:
        """One pair at K: a `fanout` parent of K `square` children run by a burst worker, and K
        `square` roots run by another (roots first in odd repetitions, so a drift in the
        machine's load favours neither). Each rate is K over the time from the first start to
        the last finish, from task_attempts (the database clock); the parent must run exactly
        twice (one resume for its one wait) and sum its children's squares."""
        rates: dict[str, float] = {}
        others: list[float] = []
        resumes = 0
        for kind in ("children", "roots") if rep % 2 == 0 else ("roots", "children"):
            if kind == "children":
                rates[kind], other, resumes = await self._fanout_children(k)
            else:
                rates[kind], other = await self._fanout_roots(k)
            others.append(other)
        ratio = rates["children"] / rates["roots"]
        self.results.add(f"fanout.{k}.children", rates["children"])
        self.results.add(f"fanout.{k}.roots", rates["roots"])
        self.results.add(f"ratio.fanout.{k}", ratio)
        self.results.add(f"fanout.{k}.resumes", resumes)
        self.results.add(f"fanout.{k}.others", max(others))
        if max(others) > OTHERS_LIMIT_PCT:
            self.fanout_untrusted[k].append(
                f"pair {rep + 1}: other processes took {max(others):.0f}% of the CPU"
            )
        verdict = "meets" if ratio >= FANOUT_GOAL else "MISSES"
        once = "meets" if resumes == 1 else "MISSES"
        say(
            f"fanout {k:,}: children {rates['children']:,.0f}/s, roots {rates['roots']:,.0f}/s,"
            f" children/roots {ratio:.3f} ({verdict} ≥ {FANOUT_GOAL}); parent resumed"
            f" {resumes}× ({once} exactly 1); other processes {max(others):.0f}% of the"
            f" machine; load {load()}"
        )

    async def _fanout_children(self, k: int) -> tuple[float, float, int]:
        """The children's rate, the other processes' share of the CPU, the parent's resumes."""
        await self.reset_tables()
        queue = self.new_queue(f"fanout_{k}")
        async with TaskClient.from_settings(self.settings(queue)) as client:
            parent = await client.submit("fanout", {"n": k}, conversation_id=self.conversation_id)
        others = await self._burst(queue, jobs=k + 2, within=k / 20 + 60)
        resumes = await self._parent_resumes(parent.id, k)
        rate = await self._span_rate("t.parent_task_id = $1", parent.id, k)
        return rate, others, resumes

    async def _fanout_roots(self, k: int) -> tuple[float, float]:
        """The roots' rate, the other processes' share of the CPU."""
        await self.reset_tables()
        queue = self.new_queue(f"fanout_roots_{k}")
        specs = [TaskSpec("square", {"x": i}, self.conversation_id) for i in range(k)]
        async with TaskClient.from_settings(self.settings(queue)) as client:
            ids = [t.id for t in await client.submit_many(specs)]
        others = await self._burst(queue, jobs=k, within=k / 20 + 60)
        return await self._span_rate("t.id = ANY($1::uuid[])", ids, k), others

    async def _burst(self, queue: str, *, jobs: int, within: float) -> float:
        """A lifecycle burst worker on `queue` until it is empty; the share of the machine's
        CPU that other processes took meanwhile."""
        mark = CpuMark.now()
        services = await ServiceCpu(self).start()
        try:
            async with worker_process(self, "lifecycle", queue, burst=True) as child:
                summary = await child.summary(within=within)
        finally:
            await services.stop()
        if summary["jobs_failed"] or summary["jobs_complete"] != jobs:
            raise BenchError(f"burst worker on {queue} ran {summary}, expected {jobs} jobs")
        return others_percent(mark, services)

    async def _span_rate(self, where: str, arg: Any, k: int) -> float:
        """K tasks over the time from the first's start to the last's finish; each of the K
        (the tasks matching `where`) must have completed in its one run."""
        row = await self.conn.fetchrow(
            "SELECT count(*) AS runs, count(DISTINCT a.task_id) AS tasks,"
            " count(*) FILTER (WHERE a.outcome = 'completed') AS done,"
            " extract(epoch FROM max(a.finished_at) - min(a.started_at)) AS seconds"
            f" FROM task_attempts AS a JOIN tasks AS t ON t.id = a.task_id WHERE {where}",
            arg,
        )
        assert row is not None
        if not row["runs"] == row["done"] == row["tasks"] == k:
            raise BenchError(f"fanout: task_attempts {dict(row)}, expected {k} single runs")
        return k / float(row["seconds"])

    async def _parent_resumes(self, parent_id: UUID, k: int) -> int:
        """How many times the parent ran again after its first run (its resumes)."""
        parent = await self.conn.fetchrow(
            "SELECT status, output FROM tasks WHERE id = $1", parent_id
        )
        runs = await self.conn.fetchval(
            "SELECT count(*) FROM task_attempts WHERE task_id = $1", parent_id
        )
        assert parent is not None
        squares = (k - 1) * k * (2 * k - 1) // 6  # Σ i² for i < k
        if parent["status"] != "completed" or parent["output"] != {"sum": squares}:
            raise BenchError(f"fanout parent ended {dict(parent)}, expected sum {squares}")
        return int(runs) - 1

    async def scale(self) -> None:
        """The table of a long-running deployment (millions of finished tasks), built once in a
        database of its own: the lifecycle beside it against the lifecycle on an empty table
        (paired, interleaved), then each operator command's p95 on it."""
        plan = self.plan
        name = f"{self.database}_scale"
        await admin(f'CREATE DATABASE "{name}"')
        try:
            await asyncio.to_thread(migrate, server_url(name, "postgresql+asyncpg"))
            say(
                f"scale: building {plan.scale_finished:,} finished + {plan.scale_pending:,} pending"
            )
            built = await big_table.build(
                name,
                finished=plan.scale_finished,
                pending=plan.scale_pending,
                server_url=SERVER_URL,
            )
            self.results.add("scale.build_s", built.seconds)
            say(f"scale: built in {built.seconds:.0f} s")
            await admin("CHECKPOINT")  # the build's writes flushed before anything is measured
            big = BigTableBench(plan, name, concurrency=self.concurrency, poll_delay=None)
            big.results = self.results
            await big.open()
            try:
                for rep in range(max(1, plan.side_reps)):
                    order = [self, big] if rep % 2 == 0 else [big, self]
                    rates = {}
                    for bench in order:
                        key = "scale.present" if bench is big else "scale.empty"
                        rates[key] = await bench.lifecycle(plan.n, key=key)
                    self.results.add(
                        "ratio.scale.present/empty", rates["scale.present"] / rates["scale.empty"]
                    )
                await big.reset_tables()
                await self.command_times(big)
            finally:
                await big.close()
        finally:
            await admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    async def command_times(self, big: Bench) -> None:
        """p95 of each operator command's work (what runs after the process started) on the big
        table: SCALE_COMMAND_RUNS runs each, on one connection, as the CLI runs them."""
        from worker.health import health
        from worker.operator import Operator

        settings = big.settings(big.new_queue("commands"))
        conn = await pg.connect(big.database_url)
        try:
            op = Operator(settings, conn)
            failed, _ = await op.list_tasks(
                agent_id=None, status=TaskStatus.FAILED, conversation_id=None, limit=1
            )
            some = failed[0]
            agent = str(some["agent_id"])
            conversation = str(some["conversation_id"])
            steps: dict[str, Callable[[], Awaitable[Any]]] = {
                "stats": op.stats,
                "list": lambda: op.list_tasks(
                    agent_id=None, status=None, conversation_id=None, limit=50
                ),
                "list --status": lambda: op.list_tasks(
                    agent_id=None, status=TaskStatus.COMPLETED, conversation_id=None, limit=50
                ),
                "list --agent": lambda: op.list_tasks(
                    agent_id=agent, status=None, conversation_id=None, limit=50
                ),
                "list --conversation": lambda: op.list_tasks(
                    agent_id=None, status=None, conversation_id=conversation, limit=50
                ),
                "show": lambda: op.show(some["id"]),
                "tree": lambda: op.tree(some["id"]),
                "prune --dry-run": lambda: op.prune(
                    older_than=timedelta(days=7),
                    statuses=sorted(FINISHED_STATUSES),
                    dry_run=True,
                    batch_size=1000,
                ),
                "health": lambda: health(settings),
            }
            for name, step in steps.items():
                times = []
                for _ in range(SCALE_COMMAND_RUNS):
                    started = time.perf_counter()
                    await step()
                    times.append(1000 * (time.perf_counter() - started))
                p95 = percentile(sorted(times), 95)
                self.results.add(f"scale.cmd.{name}", p95)
                verdict = "meets" if p95 <= SCALE_GOAL_MS else "MISSES"
                say(f"scale: {name} p95 {p95:.1f} ms ({verdict} ≤ {SCALE_GOAL_MS:.0f} ms)")
        finally:
            await conn.close()

    # -- the whole run -----------------------------------------------------------------------------

    async def background_load(self) -> float:
        """Machine CPU busy % over one second while the benchmark does nothing: other load."""
        before = machine_cpu()
        await asyncio.sleep(1.0)
        return busy_percent(before, machine_cpu())

    async def run(self, cases: Sequence[str]) -> None:
        plan = self.plan
        self.results.notes.append(f"load average at start: {load()}")
        if {"bare", "lifecycle", "backlog"} & set(cases):
            say(f"warm-up ({plan.warmup_n:,} jobs each, discarded)")
            if "bare" in cases:
                await self.bare(plan.warmup_n, key="warmup.bare")
            if {"lifecycle", "backlog"} & set(cases):
                await self.lifecycle(plan.warmup_n, key="warmup.lifecycle")
        for rep in range(plan.reps):
            idle = await self.background_load()
            self.results.add("background_cpu", idle)
            say(f"repetition {rep + 1}/{plan.reps} (load {load()}, idle machine {idle:.0f}% busy)")
            # Mirror the order every other repetition, so a drift in machine load does not
            # favour one case; bare and lifecycle stay adjacent (their ratio is paired).
            side = rep >= plan.reps - plan.side_reps
            order = [
                c
                for c in ("bare", "lifecycle", "limited", "backlog", "submit", "latency")
                if c in cases and (side or c in ("bare", "lifecycle", "limited"))
            ]
            if rep % 2:
                order.reverse()
            pair: dict[str, float] = {}
            for case in order:
                if case == "bare":
                    pair["bare"] = await self.bare(plan.n)
                elif case == "lifecycle":
                    pair["lifecycle"] = await self.lifecycle(plan.n)
                elif case == "limited":
                    pair["limited"] = await self.lifecycle(plan.n, key="limited", limited=True)
                elif case == "backlog" and plan.backlog:
                    pair["backlog"] = await self.lifecycle(
                        plan.n, backlog=plan.backlog, key="backlog"
                    )
                elif case == "submit":
                    await self.submit(rep)
                elif case == "latency":
                    await self.latency()
            if "bare" in pair and "lifecycle" in pair:
                self.results.add("ratio.lifecycle/bare", pair["lifecycle"] / pair["bare"])
                others = max(
                    self.results.values["bare.others"][-1],
                    self.results.values["lifecycle.others"][-1],
                )
                if others > OTHERS_LIMIT_PCT:
                    self.untrusted.append(
                        f"repetition {rep + 1}: other processes took {others:.0f}% of the CPU"
                    )
            if "backlog" in pair and "lifecycle" in pair:
                self.results.add("ratio.backlog/lifecycle", pair["backlog"] / pair["lifecycle"])
            if "limited" in pair and "lifecycle" in pair:
                self.results.add("ratio.limited/lifecycle", pair["limited"] / pair["lifecycle"])
        if "memory" in cases and plan.memory_n:
            await self.memory(plan.memory_n)
        if "cli" in cases:
            await self.cli()
        if "fanout" in cases:
            for rep in range(plan.fanout_reps):
                for k in plan.fanout_children:
                    await self.fanout(k, rep)
        if "scale" in cases:
            await self.scale()
        self.results.notes.append(f"load average at end: {load()}")


class BigTableBench(Bench):
    """A Bench on the scale case's database: between runs it removes only its own tasks, so
    the big table stays."""

    async def reset_tables(self) -> None:
        await self.conn.execute("DELETE FROM task_attempts")
        await self.conn.execute("DELETE FROM tasks WHERE queue LIKE 'bench\\_%'")

    async def analyze(self) -> None:
        # VACUUM reads all of the big table and its indexes (the last run's rows were deleted)
        # and leaves its writes to the checkpointer: flushed here, so that they do not compete
        # with the run it precedes (autovacuum, off on the CI machine, would spread this out).
        await super().analyze()
        await self.conn.execute("CHECKPOINT")


# -- the table -------------------------------------------------------------------------------------

ROWS: list[tuple[str, str, str, str]] = [
    # key, label, unit, format
    ("bare", "1. bare arq, no-op job (ceiling)", "jobs/s", ",.0f"),
    ("bare.cpu_ms", "   worker CPU per job", "ms", ".3f"),
    ("bare.redis_ms", "   redis-server CPU per job", "ms", ".3f"),
    ("lifecycle", "2. tasklane lifecycle, echo", "tasks/s", ",.0f"),
    ("lifecycle.cpu_ms", "   worker CPU per task", "ms", ".3f"),
    ("lifecycle.redis_ms", "   redis-server CPU per task", "ms", ".3f"),
    ("lifecycle.pg_ms", "   PostgreSQL CPU per task (this db)", "ms", ".3f"),
    ("lifecycle.xacts", "   PostgreSQL transactions per task", "xacts", ".2f"),
    ("lifecycle.buffers", "   PostgreSQL buffers hit+read per task", "buffers", ".1f"),
    ("ratio.lifecycle/bare", "   lifecycle / bare arq (paired)", "ratio", ".3f"),
    ("submit.one", "3. submit, one at a time", "tasks/s", ",.0f"),
    ("submit.by_hand", "   one INSERT + one enqueue by hand", "tasks/s", ",.0f"),
    ("submit.one/by_hand", "   submit / by hand (paired)", "ratio", ".3f"),
    ("submit.many", "   submit_many, batches of 1000", "tasks/s", ",.0f"),
    ("submit.executemany", "   asyncpg executemany, same rows", "rows/s", ",.0f"),
    ("submit.executemany_ring", "   executemany + doorbells", "tasks/s", ",.0f"),
    ("latency.p50", "4. latency submit→start p50", "ms", ".1f"),
    ("latency.p99", "   latency p99", "ms", ".1f"),
    ("latency.max", "   latency max", "ms", ".1f"),
    ("latency.rate", "   offered load", "tasks/s", ",.0f"),
    ("backlog", "5. lifecycle with a backlog", "tasks/s", ",.0f"),
    ("backlog.cpu_ms", "   worker CPU per task", "ms", ".3f"),
    ("backlog.pg_ms", "   PostgreSQL CPU per task (this db)", "ms", ".3f"),
    ("ratio.backlog/lifecycle", "   backlog / lifecycle (paired)", "ratio", ".3f"),
    ("limited", "6. lifecycle, one agent limited to 10 across 20 keys", "tasks/s", ",.0f"),
    ("limited.cpu_ms", "   worker CPU per task", "ms", ".3f"),
    ("limited.pg_ms", "   PostgreSQL CPU per task (this db)", "ms", ".3f"),
    ("ratio.limited/lifecycle", "   limited / unlimited lifecycle (paired)", "ratio", ".3f"),
    ("memory.peak_mb", "6. worker peak RSS (VmHWM)", "MB", ".0f"),
    ("memory.start_mb", "   RSS after startup", "MB", ".0f"),
    ("memory.mark_mb", "   RSS at 20 % done", "MB", ".0f"),
    ("memory.end_mb", "   RSS at 100 % done", "MB", ".0f"),
    ("memory.growth_pct", "   growth 20 % → 100 %", "%", "+.1f"),
    ("memory.rate", "   rate of that run", "tasks/s", ",.0f"),
    *[
        row
        for i, name in enumerate(
            ("--help", "submit", "show", "list", "tree", "stats", "prune --dry-run", "health")
        )
        for row in (
            (
                f"cli.{name}",
                f"{'7.' if i == 0 else '  '} tasklane {name} (≤ {CLI_GOALS.get(name, CLI_GOAL)})",
                "s",
                ".3f",
            ),
            (f"cli.{name}.cpu", "     its CPU time", "s", ".3f"),
        )
    ],
    ("scale.build_s", "9. scale: building the big table", "s", ".0f"),
    ("scale.empty", "   lifecycle, empty table", "tasks/s", ",.0f"),
    ("scale.present", "   lifecycle, big table present", "tasks/s", ",.0f"),
    ("ratio.scale.present/empty", "   present / empty (paired; goal ≥ 0.9)", "ratio", ".3f"),
    *[
        (f"scale.cmd.{name}", f"   {name} p95 (goal ≤ 100)", "ms", ".1f")
        for name in (
            "stats",
            "list",
            "list --status",
            "list --agent",
            "list --conversation",
            "show",
            "tree",
            "prune --dry-run",
            "health",
        )
    ],
    ("bare.machine", "machine CPU busy during bare", "%", ".0f"),
    ("bare.others", "   of it, other processes", "%", ".0f"),
    ("lifecycle.machine", "machine CPU busy during lifecycle", "%", ".0f"),
    ("lifecycle.others", "   of it, other processes", "%", ".0f"),
    ("background_cpu", "machine CPU busy, bench idle", "%", ".0f"),
]


def fanout_rows(children: Sequence[int]) -> list[tuple[str, str, str, str]]:
    return [
        row
        for i, k in enumerate(children)
        for row in (
            (f"fanout.{k}.children", f"{'8.' if i == 0 else '  '} fan-out of {k:,}: children",
             "tasks/s", ",.0f"),
            (f"fanout.{k}.roots", "   as many independent tasks", "tasks/s", ",.0f"),
            (f"ratio.fanout.{k}", f"   children / roots (goal ≥ {FANOUT_GOAL})", "ratio", ".3f"),
            (f"fanout.{k}.resumes", "   resumes of the parent (goal: 1)", "resumes", ".0f"),
            (f"fanout.{k}.others", "   other processes, worse of the pair", "%", ".0f"),
        )
    ]  # fmt: skip


def table_rows(plan: Plan) -> list[tuple[str, str, str, str]]:
    """ROWS with the fanout case's rows for each K in their place, before the scale case's."""
    at = next(i for i, row in enumerate(ROWS) if row[0] == "scale.build_s")
    return [*ROWS[:at], *fanout_rows(plan.fanout_children), *ROWS[at:]]


def table(bench: Bench, cases: Sequence[str], elapsed: float) -> str:
    plan, results = bench.plan, bench.results
    concurrency = bench.concurrency or SHIPPED.concurrency
    lines = [
        "",
        f"tasklane benchmark — {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} CPUs,"
        f" Python {sys.version.split()[0]}, {elapsed:.0f} s",
        f"concurrency {concurrency}"
        + (f", poll_delay {bench.poll_delay} (override)" if bench.poll_delay is not None else "")
        + f"; N = {plan.n:,} per run, {plan.reps} interleaved repetitions (+1 warm-up discarded),"
        f" {plan.side_reps} of backlog/submit/latency; backlog {plan.backlog:,};"
        f" memory run {plan.memory_n:,}; latency at {plan.latency_rate:.0f}/s"
        f" for {plan.latency_seconds:.0f} s",
        *results.notes,
        "",
        f"{'case':<40} {'unit':<8} {'median':>10} {'min – max':>22} {'n':>3}",
        "-" * 87,
    ]
    for key, label, unit, fmt in table_rows(plan):
        if not results.has(key):
            continue
        values = results.values[key]
        median = format(statistics.median(values), fmt)
        spread = f"{format(min(values), fmt)} – {format(max(values), fmt)}"
        lines.append(f"{label:<40} {unit:<8} {median:>10} {spread:>22} {len(values):>3}")
    lines.append("")
    return "\n".join(lines)


# -- profiling -------------------------------------------------------------------------------------


async def profile(bench: Bench, out: Path, n: int, native: bool) -> None:
    """One bare and one lifecycle burst run under `py-spy record` (raw collapsed stacks in
    `out`), then the top functions by own and cumulative samples."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    for mode in ("bare", "lifecycle"):
        queue = bench.new_queue(f"profile_{mode}")
        if mode == "bare":
            await bench.ring(queue, n)
        else:
            await bench.reset_tables()
            await bench.submit_many(queue, n)
            await bench.analyze()
        stacks = out / f"{mode}.txt"
        async with worker_process(bench, mode, queue, burst=True) as child:
            await child.ready()
            args = [spy, "record", "--pid", str(child.pid), "--rate", "250", "--nonblocking"]
            args += ["--format", "raw", "--output", str(stacks), "--nolineno"]
            if native:
                args.append("--native")
            spy_proc = await asyncio.create_subprocess_exec(
                *args, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
            )
            summary = await child.summary(within=n / 20 + 60)
            await asyncio.wait_for(spy_proc.wait(), 60)
        say(f"profile {mode}: {n / summary['seconds']:,.0f}/s under py-spy; stacks in {stacks}")
        print(summarize_stacks(stacks, title=f"{mode} worker"))


def summarize_stacks(path: Path, *, title: str, top: int = 25) -> str:
    own: dict[str, int] = defaultdict(int)
    cumulative: dict[str, int] = defaultdict(int)
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        frames = [f.strip() for f in stack.split(";") if f.strip()]
        frames = [f for f in frames if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            cumulative[frame] += count
    lines = [f"\n{title}: {total} samples (on CPU)", f"{'own %':>7}  function"]
    for frame, count in sorted(own.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"{100 * count / total:>6.1f}%  {frame}")
    lines.append(f"{'cum %':>7}  function")
    for frame, count in sorted(cumulative.items(), key=lambda kv: -kv[1])[: top + 10]:
        lines.append(f"{100 * count / total:>6.1f}%  {frame}")
    return "\n".join(lines)


# -- main ------------------------------------------------------------------------------------------


def fanout_sizes(raw: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in raw.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 1000,10000, got {raw!r}") from None
    if not sizes or not all(1 <= k <= MAX_FANOUT for k in sizes):
        raise argparse.ArgumentTypeError(f"each K must be between 1 and {MAX_FANOUT:,}")
    return sizes


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="tasklane benchmark (see the module docstring)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="a smaller run, under 90 s")
    parser.add_argument("--reps", type=int, help="repetitions of bare arq and lifecycle")
    parser.add_argument("--side-reps", type=int, help="repetitions of backlog, submit, latency")
    parser.add_argument("-n", type=int, help="tasks per bare/lifecycle/backlog run")
    parser.add_argument("--backlog", type=int, help="extra not-yet-due tasks (0: skip)")
    parser.add_argument("--memory-n", type=int, help="tasks in the memory run (0: skip)")
    parser.add_argument(
        "--cases",
        default=",".join(DEFAULT_CASES),
        help=f"comma-separated subset of {','.join(CASES)} (default: all but scale)",
    )
    parser.add_argument(
        "--scale-finished", type=int, help="finished tasks in the scale case's table"
    )
    parser.add_argument(
        "--fanout-children",
        type=fanout_sizes,
        metavar="K,K",
        help=f"children of the fanout case's parent, one pair per K (1…{MAX_FANOUT:,};"
        " default 1000,10000; --quick 1000)",
    )
    parser.add_argument(
        "--concurrency", type=int, help="TASKLANE_CONCURRENCY for every worker (exploration)"
    )
    parser.add_argument(
        "--poll-delay",
        type=float,
        help="override bare arq's poll_delay (exploration; TasklaneWorker polls when a slot frees)",
    )
    parser.add_argument(
        "--profile", type=Path, metavar="DIR", help="only profile both workers with py-spy"
    )
    parser.add_argument("--native", action="store_true", help="py-spy --native with --profile")
    return parser.parse_args(argv)


async def run_bench(args: argparse.Namespace, plan: Plan, database: str) -> str:
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = set(cases) - set(CASES)
    if unknown:
        raise SystemExit(f"unknown cases: {', '.join(sorted(unknown))}")
    bench = Bench(plan, database, concurrency=args.concurrency, poll_delay=args.poll_delay)
    started = time.monotonic()
    await bench.open()
    try:
        if args.profile is not None:
            await profile(bench, args.profile, plan.n, args.native)
            return ""
        await bench.run(cases)
    finally:
        await bench.close()
    out = table(bench, cases, time.monotonic() - started)
    goals = fanout_lines(bench) + lifecycle_goal_lines(bench) + cli_goal_lines(bench)
    return out + "".join(line + "\n" for line in goals) + final_line(bench)


def fanout_lines(bench: Bench) -> list[str]:
    """At each K: the median children/roots ratio against its goal, and the parent's resumes
    (exactly one per wait), or n/a and why, as the last line says for lifecycle/bare_arq."""
    values = bench.results.values
    lines = []
    for k in bench.plan.fanout_children:
        ratios = values.get(f"ratio.fanout.{k}")
        if not ratios:
            continue
        median = statistics.median(ratios)
        spread = f"{min(ratios):.3f} – {max(ratios):.3f} over {len(ratios)} pairs"
        verdict = "meets" if median >= FANOUT_GOAL else "MISSES"
        resumes = sorted({int(r) for r in values[f"fanout.{k}.resumes"]})
        once = (
            "one resume per wait in every pair: meets"
            if resumes == [1]
            else f"resumes of the parent {', '.join(map(str, resumes))}: MISSES one per wait"
        )
        goals = f"goal ≥ {FANOUT_GOAL}: {verdict}; {once}"
        untrusted = bench.fanout_untrusted.get(k)
        if untrusted:
            lines.append(
                f"fanout children/roots at {k:,} = n/a (other load: {'; '.join(untrusted)}."
                f" Measured anyway: median {median:.3f}, {spread}; {goals})"
            )
        else:
            lines.append(f"fanout children/roots at {k:,} = {median:.3f} ({spread}; {goals})")
    return lines


def lifecycle_goal_lines(bench: Bench) -> list[str]:
    """Issue 19's leaner lifecycle: the paired ratio and PostgreSQL's CPU per task against
    their goals (the ratio n/a, as on the last line, when other load made it incomparable)."""
    values = bench.results.values
    ratios, pg_ms = values.get("ratio.lifecycle/bare"), values.get("lifecycle.pg_ms")
    if not ratios or not pg_ms:
        return []
    ratio, pg = statistics.median(ratios), statistics.median(pg_ms)
    ratio_text = f"n/a (other load; measured {ratio:.3f})" if bench.untrusted else f"{ratio:.3f}"
    ratio_verdict = (
        "not judged" if bench.untrusted else "meets" if ratio >= LIFECYCLE_GOAL else "MISSES"
    )
    pg_verdict = "meets" if pg <= PG_MS_GOAL else "MISSES"
    return [
        f"lean lifecycle: lifecycle/bare_arq {ratio_text} (goal ≥ {LIFECYCLE_GOAL}:"
        f" {ratio_verdict}); PostgreSQL CPU per task {pg:.3f} ms (goal ≤ {PG_MS_GOAL} ms:"
        f" {pg_verdict})"
    ]


def cli_goal_lines(bench: Bench) -> list[str]:
    """Issue 19's CLI that answers at once: the slowest median against each goal."""
    values = bench.results.values
    medians = {
        key.removeprefix("cli."): statistics.median(v)
        for key, v in values.items()
        if key.startswith("cli.") and not key.endswith(".cpu")
    }
    if not medians:
        return []
    parts = []
    for goal in sorted({CLI_GOALS.get(name, CLI_GOAL) for name in medians}):
        names = [n for n in medians if CLI_GOALS.get(n, CLI_GOAL) == goal]
        slowest = max(names, key=medians.__getitem__)
        verdict = "meets" if medians[slowest] <= goal else "MISSES"
        parts.append(
            f"{', '.join(names)} ≤ {goal} s: {verdict} (slowest {slowest} {medians[slowest]:.3f} s)"
        )
    return ["cli medians: " + "; ".join(parts)]


def final_line(bench: Bench) -> str:
    """The paired ratio, or n/a and why: a ratio measured while other processes took more
    than OTHERS_LIMIT_PCT of the machine is not comparable with another."""
    ratios = bench.results.values.get("ratio.lifecycle/bare")
    if not ratios:
        return "lifecycle/bare_arq = n/a (bare and lifecycle not both run)"
    spread = f"{min(ratios):.3f} – {max(ratios):.3f} over {len(ratios)} pairs"
    if bench.untrusted:
        return (
            f"lifecycle/bare_arq = n/a (other load: {'; '.join(bench.untrusted)}; over"
            f" {OTHERS_LIMIT_PCT:.0f}% the ratio is not comparable. Measured anyway: median"
            f" {statistics.median(ratios):.3f}, {spread})"
        )
    return f"lifecycle/bare_arq = {statistics.median(ratios):.3f} ({spread})"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    plan = QUICK if args.quick else FULL
    overrides = {
        "reps": args.reps,
        "side_reps": args.side_reps,
        "n": args.n,
        "backlog": args.backlog,
        "memory_n": args.memory_n,
        "scale_finished": args.scale_finished,
        "fanout_children": args.fanout_children,
    }
    plan = replace(plan, **{k: v for k, v in overrides.items() if v is not None})
    plan = replace(plan, side_reps=min(plan.side_reps, plan.reps))
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
    database = f"tasklane_bench_{uuid.uuid4().hex[:10]}"
    say(f"database {database}, Redis {REDIS_URL}, load {load()}")
    asyncio.run(admin(f'CREATE DATABASE "{database}"'))
    try:
        migrate(server_url(database, "postgresql+asyncpg"))
        output = asyncio.run(run_bench(args, plan, database))
    finally:
        asyncio.run(admin(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'))
    if output:
        print(output, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
