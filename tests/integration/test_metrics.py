"""A worker process's /metrics (worker/metrics.py): known work in, exact counts out."""

from __future__ import annotations

import re
import socket
import urllib.error
import uuid
from pathlib import Path
from typing import Any

import pytest

from domain.entities import Conversation
from tests.support import db
from tests.support.scrape import free_port, samples, scrape_text, value
from tests.support.workers import WorkerProcess, start_process
from worker.client import TaskClient
from worker.config import ConfigError, Settings
from worker.metrics import RUN_OUTCOMES, UNKNOWN_AGENT

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
UUID_LIKE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-")


async def submit_known_work(
    client: TaskClient, conversation: Conversation, database_url: str
) -> list[uuid.UUID]:
    """3 echo (one due 100 s ago), one retried once, one failing for good, one for an agent no
    worker serves, one running echo whose lease ran out (rescued, then run)."""
    cid = conversation.id
    ids = [(await client.submit("echo", {"i": i}, conversation_id=cid)).id for i in range(3)]
    await db.query(
        database_url,
        "UPDATE tasks SET run_after = now() - interval '100 seconds' WHERE id = $1",
        ids[0],
    )
    ids.append((await client.submit("t_retry_after", {"after": 0}, conversation_id=cid)).id)
    ids.append((await client.submit("t_permanent", {}, conversation_id=cid)).id)
    ids.append((await client.submit("nobody_serves_this", {}, conversation_id=cid)).id)
    lost = await client.submit("echo", {"lost": True}, conversation_id=cid)
    await db.query(
        database_url,
        "UPDATE tasks SET status = 'running', runs = runs + 1, worker_id = 'gone',"
        " lease_expires_at = now() - interval '1 minute' WHERE id = $1",
        lost.id,
    )
    ids.append(lost.id)
    return ids


async def test_a_scrape_counts_every_run_by_agent_and_outcome(
    settings: Settings,
    client: TaskClient,
    conversation: Conversation,
    database_url: str,
    processes: list[WorkerProcess],
) -> None:
    ids = await submit_known_work(client, conversation, database_url)
    port = free_port()
    start_process(processes, settings, extra_env={"TASKLANE_METRICS_PORT": str(port)})
    rows = await db.wait_final(database_url, ids)
    assert sorted(r["status"] for r in rows) == ["completed"] * 5 + ["failed"] * 2

    q = settings.queue
    # The last run's outcome is counted after its row is written: poll until it shows.
    found = await db.eventually(
        lambda: _scrape(port),
        lambda f: sum(f.get("tasklane_runs_finished_total", {}).values()) == 8,
        what="8 finished runs",
    )
    started = {
        "echo": 4,  # 3 + the rescued one
        "t_retry_after": 2,
        "t_permanent": 1,
        UNKNOWN_AGENT: 1,
    }
    for agent, count in started.items():
        assert value(found, "tasklane_runs_started_total", queue=q, agent=agent) == count, agent
        assert value(found, "tasklane_queue_wait_seconds_count", queue=q, agent=agent) == count
        assert value(found, "tasklane_run_duration_seconds_count", queue=q, agent=agent) == count
    finished = {
        ("echo", "completed"): 4,
        ("t_retry_after", "retry"): 1,
        ("t_retry_after", "completed"): 1,
        ("t_permanent", "failed"): 1,
        (UNKNOWN_AGENT, "failed"): 1,
    }
    got = {
        (dict(labels)["agent"], dict(labels)["outcome"]): n
        for labels, n in found["tasklane_runs_finished_total"].items()
    }
    assert got == finished
    # One echo was due 100 s before it ran: its wait is in the 120 s bucket, not the 60 s one.
    wait_le = {
        dict(labels)["le"]: n
        for labels, n in found["tasklane_queue_wait_seconds_bucket"].items()
        if dict(labels)["agent"] == "echo"
    }
    assert wait_le["60.0"] == 3
    assert wait_le["120.0"] == 4
    assert value(found, "tasklane_reconciler_actions_total", queue=q, kind="rescued") == 1
    assert value(found, "tasklane_worker_slots", queue=q, state="busy") == 0
    assert value(found, "tasklane_worker_slots", queue=q, state="free") == settings.concurrency
    assert "tasklane_backend_errors_total" not in found or not any(
        found["tasklane_backend_errors_total"].values()
    )
    assert "process_resident_memory_bytes" in found
    # Bounded labels: the unserved agent's id and no task id appear anywhere.
    text = scrape_text(port)
    assert "nobody_serves_this" not in text
    assert not UUID_LIKE.search(text)


async def _scrape(port: int) -> dict[str, Any]:
    return samples(scrape_text(port))


async def test_metrics_are_off_unless_a_port_is_set(
    settings: Settings, processes: list[WorkerProcess]
) -> None:
    port = free_port()
    worker = start_process(processes, settings)
    assert "metrics_port': None" in worker.output() or '"metrics_port": null' in worker.output()
    with pytest.raises(urllib.error.URLError, match="refused"):
        scrape_text(port, timeout=1)


async def test_a_taken_port_stops_the_worker_with_one_line(
    settings: Settings, processes: list[WorkerProcess]
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        worker = WorkerProcess(
            settings,
            extra_env={"TASKLANE_METRICS_PORT": str(port), "TASKLANE_METRICS_HOST": "127.0.0.1"},
        )
        processes.append(worker)
        assert worker.wait(timeout=30) != 0
    assert f"cannot serve metrics on 127.0.0.1:{port} (TASKLANE_METRICS_PORT)" in worker.output()
    assert "Traceback" not in worker.output()


@pytest.mark.parametrize("raw", ["0", "70000", "http", "-1"])
def test_a_bad_metrics_port_is_one_line(raw: str) -> None:
    with pytest.raises(ConfigError, match="TASKLANE_METRICS_PORT"):
        Settings.from_env({"TASKLANE_METRICS_PORT": raw})


def test_every_run_outcome_the_table_names_is_an_event_the_runtime_logs() -> None:
    """RUN_OUTCOMES maps the runtime's closing log events; renamed there, a run would count as
    lost here. The runtime's source must still log each of them."""
    source = (ROOT / "worker" / "runtime.py").read_text()
    for event in RUN_OUTCOMES:
        assert f'"{event}"' in source, event
