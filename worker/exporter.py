"""`tasklane metrics`: queue-level gauges from PostgreSQL, one query per scrape.

Workers count what they do themselves (worker/metrics.py); what only the database knows — how
many tasks are due and for how long the oldest has waited, per queue and agent; parents waiting
for subtasks; live workers per queue — is served here, by one small process, so that N workers
do not each run the query. Run one (or two, both are read-only) per deployment.

Each scrape runs `GaugeRepository.read` (one statement, index-backed) on the exporter's event
loop; the HTTP server (prometheus_client's, in a thread) waits for it at most SCRAPE_TIMEOUT.
While PostgreSQL cannot answer, `tasklane_exporter_up` is 0 and the other gauges are left out
(a missing series is "unknown", where a 0 would say "no work"); the reason is logged once when it
starts and once when it recovers.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Iterable, Iterator
from typing import Any

import asyncpg
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from persistence import pg
from persistence.errors import find_postgres_error
from persistence.repositories.gauge_repository import DueGauge, GaugeRepository, QueueGauges
from persistence.schema import SchemaError, check_schema
from persistence.sql import ConnectionExecutor
from worker.config import Settings, redact_url
from worker.logs import get_logger

DEFAULT_PORT = 9465
SCRAPE_TIMEOUT = 10.0  # seconds; Prometheus's own default scrape timeout
# Series per gauge family at most: beyond, the smallest are summed into one OTHER series (agent
# ids are chosen by producers; a runaway set of them must not flood Prometheus).
MAX_SERIES = 500
OTHER = "(other)"


class GaugeReader:
    """Reads the gauges on its own connection, opened on first use and again after a failure."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._conn: asyncpg.Connection | None = None

    async def read(self) -> QueueGauges:
        try:
            if self._conn is None or self._conn.is_closed():
                self._conn = await self._connect()
            return await GaugeRepository(ConnectionExecutor(self._conn)).read()
        except BaseException:
            await self.close()
            raise

    async def _connect(self) -> asyncpg.Connection:
        conn = await pg.connect(
            self.settings.database_url,
            application_name="tasklane-metrics",
            timeouts=self.settings.db_timeouts,
        )
        try:
            await check_schema(conn)
        except BaseException:
            await conn.close()
            raise
        return conn

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close(timeout=2)


class GaugeCollector(Collector):
    """prometheus_client calls `collect` from its server thread at each scrape: the query runs on
    the exporter's event loop and the thread waits for it."""

    def __init__(self, reader: GaugeReader, loop: asyncio.AbstractEventLoop) -> None:
        self.reader = reader
        self.loop = loop
        self.log = get_logger("tasklane.metrics")
        self.failing: str | None = None  # why the last scrape failed, logged once

    def describe(self) -> Iterable[Any]:
        return []  # registering must not run the query

    def collect(self) -> Iterator[GaugeMetricFamily]:
        up = GaugeMetricFamily(
            "tasklane_exporter_up", "1 when the last scrape could read PostgreSQL, else 0."
        )
        try:
            future = asyncio.run_coroutine_threadsafe(self.reader.read(), self.loop)
            gauges = future.result(timeout=SCRAPE_TIMEOUT)
        except Exception as exc:
            self._failed(exc)
            up.add_metric([], 0)
            yield up
            return
        self._recovered()
        up.add_metric([], 1)
        yield up
        yield from families(gauges)

    def _failed(self, exc: BaseException) -> None:
        reason = describe_failure(exc, self.reader.settings)
        if reason != self.failing:
            self.log.error("metrics.scrape_failed", error=reason)
        self.failing = reason

    def _recovered(self) -> None:
        if self.failing is not None:
            self.log.info("metrics.scrape_recovered")
        self.failing = None


def describe_failure(exc: BaseException, settings: Settings) -> str:
    if isinstance(exc, SchemaError):
        return str(exc)
    if isinstance(exc, TimeoutError):
        return f"PostgreSQL did not answer within {SCRAPE_TIMEOUT:g}s"
    pg_error = find_postgres_error(exc)
    detail = str(pg_error.args[0]) if pg_error is not None and pg_error.args else str(exc)
    first = detail.strip().splitlines()[0] if detail.strip() else type(exc).__name__
    return f"cannot read PostgreSQL at {redact_url(settings.database_url)}: {first}"


def families(gauges: QueueGauges) -> Iterator[GaugeMetricFamily]:
    due = GaugeMetricFamily(
        "tasklane_due_tasks", "Pending tasks that are due now, per queue and agent.",
        labels=["queue", "agent"],
    )  # fmt: skip
    oldest = GaugeMetricFamily(
        "tasklane_oldest_due_seconds",
        "How long the oldest due pending task has been due (database clock).",
        labels=["queue", "agent"],
    )
    for gauge in capped_due(gauges.due):
        due.add_metric([gauge.queue, gauge.agent_id], gauge.count)
        oldest.add_metric([gauge.queue, gauge.agent_id], gauge.oldest_seconds)
    waiting = GaugeMetricFamily(
        "tasklane_waiting_tasks", "Parents waiting for their subtasks, per queue.",
        labels=["queue"],
    )  # fmt: skip
    for queue, count in capped(gauges.waiting):
        waiting.add_metric([queue], count)
    # A queue with work and no live worker is shown at 0: that is what the alert looks for.
    live_counts = dict(gauges.live_workers)
    for queue in {g.queue for g in gauges.due} | set(gauges.waiting):
        live_counts.setdefault(queue, 0)
    live = GaugeMetricFamily(
        "tasklane_live_workers",
        "Workers that refreshed their row within the last 30 s, per queue (0: work but none).",
        labels=["queue"],
    )
    for queue, count in capped(live_counts):
        live.add_metric([queue], count)
    yield from (due, oldest, waiting, live)


def capped_due(rows: list[DueGauge]) -> list[DueGauge]:
    if len(rows) <= MAX_SERIES:
        return rows
    rows = sorted(rows, key=lambda g: (-g.count, g.queue, g.agent_id))
    kept, rest = rows[: MAX_SERIES - 1], rows[MAX_SERIES - 1 :]
    other = DueGauge(
        OTHER, OTHER, sum(g.count for g in rest), max(g.oldest_seconds for g in rest)
    )  # fmt: skip
    return [*kept, other]


def capped(counts: dict[str, int]) -> list[tuple[str, int]]:
    items = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    if len(items) <= MAX_SERIES:
        return items
    kept, rest = items[: MAX_SERIES - 1], items[MAX_SERIES - 1 :]
    return [*kept, (OTHER, sum(n for _, n in rest))]


def run(settings: Settings, *, host: str, port: int) -> None:
    """Serve the gauges until SIGTERM or SIGINT."""
    asyncio.run(_serve(settings, host=host, port=port))


async def _serve(settings: Settings, *, host: str, port: int) -> None:
    log = get_logger("tasklane.metrics")
    reader = GaugeReader(settings)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(GaugeCollector(reader, asyncio.get_running_loop()))
    try:
        server, thread = start_http_server(port, host, registry=registry)
    except OSError as exc:
        raise OSError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}") from None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info(
        "metrics.started",
        address=f"http://{host}:{server.server_port}/metrics",
        database=redact_url(settings.database_url),
    )
    try:
        await stop.wait()
    finally:
        # The server thread may be waiting on this loop: stop it from another thread.
        await asyncio.to_thread(server.shutdown)
        server.server_close()
        thread.join(timeout=5)
        await reader.close()
        log.info("metrics.stopped")
