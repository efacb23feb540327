"""`tasklane metrics` (worker/exporter.py): queue gauges from PostgreSQL, one query per scrape."""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from domain.entities import Conversation
from persistence.repositories.gauge_repository import GAUGES, DueGauge
from tests.support import databases, db, servers
from tests.support.databases import ROOT
from tests.support.pgproxy import PgProxy
from tests.support.scrape import free_port, samples, scrape_text, value
from tests.support.workers import settings_env
from worker.client import TaskClient
from worker.config import Settings
from worker.exporter import MAX_SERIES, OTHER, capped, capped_due

pytestmark = pytest.mark.slow

METRICS_COMMAND = (sys.executable, "-m", "worker.cli", "metrics", "--host", "127.0.0.1")
CONVERSATION = "00000000-0000-0000-0000-000000000001"


class Exporter:
    """`tasklane metrics` as a process, its output in a file."""

    def __init__(self, settings: Settings) -> None:
        self.port = free_port()
        self.log_path = Path(tempfile.mkstemp(prefix="tasklane-metrics-", suffix=".log")[1])
        self._log = self.log_path.open("wb")
        env = settings_env(replace(settings, log_level="INFO"))
        self.process = subprocess.Popen(
            [*METRICS_COMMAND, "--port", str(self.port)],
            env=env,
            cwd=ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 20
        while '"metrics.started"' not in self.output():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the exporter did not start:\n{self.output()}")
            time.sleep(0.05)

    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def scrape(self) -> dict[str, Any]:
        return samples(scrape_text(self.port, timeout=15))

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=15)
        self._log.close()
        return code


@pytest.fixture
def exporters() -> Iterator[list[Exporter]]:
    started: list[Exporter] = []
    yield started
    for exporter in started:
        if exporter.process.poll() is None:
            exporter.stop()


async def test_gauges_per_queue_and_agent_are_exact(
    settings: Settings,
    client: TaskClient,
    conversation: Conversation,
    database_url: str,
    exporters: list[Exporter],
) -> None:
    """No worker runs: what is submitted stays where the test put it."""
    q, cid = settings.queue, conversation.id
    echo = [(await client.submit("echo", {"i": i}, conversation_id=cid)).id for i in range(3)]
    await db.query(
        database_url, "UPDATE tasks SET run_after = now() - interval '100 seconds' WHERE id = $1",
        echo[0],
    )  # fmt: skip
    await db.query(  # not due: scheduled for later
        database_url, "UPDATE tasks SET run_after = now() + interval '1 hour' WHERE id = $1",
        echo[1],
    )  # fmt: skip
    await client.submit("square", {"x": 2}, conversation_id=cid)
    parent = await client.submit("t_collect", {"children": []}, conversation_id=cid)
    await db.query(database_url, "UPDATE tasks SET status = 'waiting' WHERE id = $1", parent.id)
    async with TaskClient.from_settings(replace(settings, queue="other-q")) as other:
        await other.submit("echo", {}, conversation_id=cid)
    await db.query(
        database_url,
        "INSERT INTO workers (id, hostname, pid, queue, agents, last_seen_at) VALUES"
        " ('w-live', 'h', 1, $1, '{echo}', now()),"
        " ('w-gone', 'h', 2, 'other-q', '{echo}', now() - interval '5 minutes')",
        q,
    )

    exporter = Exporter(settings)
    exporters.append(exporter)
    found = exporter.scrape()
    assert value(found, "tasklane_exporter_up") == 1
    assert found["tasklane_due_tasks"] == {
        (("agent", "echo"), ("queue", q)): 2,
        (("agent", "square"), ("queue", q)): 1,
        (("agent", "echo"), ("queue", "other-q")): 1,
    }
    oldest = value(found, "tasklane_oldest_due_seconds", queue=q, agent="echo")
    assert oldest is not None
    assert 100 <= oldest < 160
    assert value(found, "tasklane_waiting_tasks", queue=q) == 1
    assert found["tasklane_live_workers"] == {(("queue", q),): 1, (("queue", "other-q"),): 0}
    assert exporter.stop() == 0


@pytest.fixture
def proxy() -> Iterator[PgProxy]:
    server = PgProxy(servers.postgres_url()).start()
    yield server
    server.stop()


async def test_up_is_0_while_postgres_is_away_and_1_once_it_is_back(
    settings: Settings, database: str, proxy: PgProxy, exporters: list[Exporter]
) -> None:
    proxied = replace(settings, database_url=databases.url_for(database, proxy.server_url()))
    exporter = Exporter(proxied)
    exporters.append(exporter)
    assert value(exporter.scrape(), "tasklane_exporter_up") == 1
    port = proxy.port
    proxy.stop()
    for _ in range(3):
        found = exporter.scrape()
        assert value(found, "tasklane_exporter_up") == 0
        assert "tasklane_due_tasks" not in found  # unknown, not "no work"
    assert exporter.output().count('"metrics.scrape_failed"') == 1  # logged once, not per scrape
    back = PgProxy(servers.postgres_url()).start(port=port)
    try:
        found = exporter.scrape()
        assert value(found, "tasklane_exporter_up") == 1
        assert '"metrics.scrape_recovered"' in exporter.output()
    finally:
        exporter.stop()
        back.stop()


async def test_an_unmigrated_database_is_one_line_and_up_0(
    settings: Settings, exporters: list[Exporter]
) -> None:
    name = databases.unique_name()
    await databases.create_database(name)
    try:
        exporter = Exporter(replace(settings, database_url=databases.url_for(name)))
        exporters.append(exporter)
        assert value(exporter.scrape(), "tasklane_exporter_up") == 0
        assert "the database is not migrated: run `tasklane migrate`" in exporter.output()
        assert "Traceback" not in exporter.output()
        exporter.stop()
    finally:
        await databases.drop_database(name)


async def test_the_query_reads_indexes_not_the_whole_table(database_url: str) -> None:
    """300 000 finished tasks and a few hundred unfinished: the plan must not scan `tasks`."""
    await db.query(
        database_url,
        "INSERT INTO conversations (id, user_id) VALUES ($1, 'u')",
        uuid.UUID(CONVERSATION),
    )
    await db.bulk(
        database_url,
        """
        INSERT INTO tasks (id, conversation_id, agent_id, input, status, queue, run_after,
                           attempts, completed_at, limit_key, due_rank)
        SELECT gen_random_uuid(), $1, 'a' || (i % 7), '{}',
               CASE WHEN i % 1000 = 0 THEN 'pending' WHEN i % 997 = 0 THEN 'waiting'
                    ELSE 'completed' END,
               'q' || (i % 3), now() - make_interval(secs => i % 50), 1,
               CASE WHEN i % 1000 = 0 OR i % 997 = 0 THEN NULL ELSE now() END,
               '', now() - make_interval(secs => i % 50)  -- the flow trigger stays out
        FROM generate_series(1, 300000) AS i
        """,
        uuid.UUID(CONVERSATION),
    )
    await db.query(database_url, "ANALYZE tasks")
    rows = await db.query(database_url, "EXPLAIN " + GAUGES.pg.replace("$1", "30.0"))
    plan = "\n".join(r[0] for r in rows)
    assert "Seq Scan on tasks" not in plan, plan
    assert "ix_tasks_" in plan, plan


def test_series_are_capped_and_the_rest_summed() -> None:
    many = [DueGauge("q", f"agent-{i}", i + 1, float(i)) for i in range(MAX_SERIES + 10)]
    kept = capped_due(many)
    assert len(kept) == MAX_SERIES
    assert kept[-1].queue == kept[-1].agent_id == OTHER
    assert sum(g.count for g in kept) == sum(g.count for g in many)
    assert kept[-1].oldest_seconds == max(g.oldest_seconds for g in many[:11])
    counts = {f"q{i}": 1 for i in range(MAX_SERIES + 1)}
    assert capped(counts)[-1] == (OTHER, 2)
    assert capped({"a": 1}) == [("a", 1)]
