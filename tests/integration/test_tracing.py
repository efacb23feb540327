"""OpenTelemetry traces across processes (worker/tracing.py): the producer's span in this process
(an in-memory exporter), the runs in a worker process (TASKLANE_TRACING=file:…), one trace."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from domain.entities import Conversation
from tests.support import db
from tests.support.databases import ROOT
from tests.support.workers import WorkerProcess, start_process
from worker.client import TaskClient
from worker.config import Settings

pytestmark = pytest.mark.slow

Span = dict[str, Any]


def memory_exporter() -> InMemorySpanExporter:
    """This process's spans, kept in memory (one SDK provider per process, set once)."""
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter


def file_spans(path: Path) -> list[Span]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def hex_id(value: int, width: int) -> str:
    return "0x" + format(value, f"0{width}x")


async def test_one_trace_from_submit_through_a_retry_and_a_subtask_run(
    settings: Settings,
    client: TaskClient,
    conversation: Conversation,
    database_url: str,
    processes: list[WorkerProcess],
) -> None:
    memory = memory_exporter()
    tracer = trace.get_tracer("tests")
    with tracer.start_as_current_span("app.request") as app:
        task = await client.submit("t_retry_then_spawn", {}, conversation_id=conversation.id)
    # Submitted outside any span, a submit starts a trace of its own; a task with no stored
    # context (a producer without OpenTelemetry, plain SQL) is simulated by clearing it.
    untraced = await client.submit("echo", {}, conversation_id=conversation.id)
    assert untraced.trace_context is not None
    await db.query(database_url, "UPDATE tasks SET trace_context = NULL WHERE id = $1", untraced.id)
    trace_id = app.get_span_context().trace_id
    submit = next(
        s
        for s in memory.get_finished_spans()
        if s.name == "tasklane.submit" and s.context is not None and s.context.trace_id == trace_id
    )
    assert submit.context is not None
    assert submit.context.trace_id == trace_id
    assert submit.parent is not None
    assert submit.parent.span_id == app.get_span_context().span_id
    stored = (await db.task_row(database_url, task.id))["trace_context"]
    assert stored["traceparent"].split("-")[2] == format(submit.context.span_id, "016x")

    spans_path = Path(tempfile.mkstemp(prefix="tasklane-spans-", suffix=".jsonl")[1])
    worker_settings = replace(
        settings, agent_modules=(*settings.agent_modules, "tests.tracing_agents")
    )
    worker = start_process(
        processes, worker_settings, extra_env={"TASKLANE_TRACING": f"file:{spans_path}"}
    )
    await db.wait_final(database_url, [task.id, untraced.id])
    worker.stop()  # every span written
    spans = file_spans(spans_path)
    runs = [s for s in spans if s["name"] == "tasklane.run"]
    by_id = {s["context"]["span_id"]: s for s in spans}

    parent_runs = sorted(
        (s for s in runs if s["attributes"]["tasklane.task_id"] == str(task.id)),
        key=lambda s: s["attributes"]["tasklane.run"],
    )
    assert [s["attributes"]["tasklane.outcome"] for s in parent_runs] == [
        "retry",
        "waiting",
        "completed",
    ]
    assert parent_runs[0]["status"]["status_code"] == "ERROR"
    assert parent_runs[2]["status"]["status_code"] == "UNSET"
    for run in parent_runs:
        assert run["context"]["trace_id"] == hex_id(trace_id, 32)
        assert run["parent_id"] == hex_id(submit.context.span_id, 16)  # continues the submit
        steps = sorted(s["name"] for s in spans if s["parent_id"] == run["context"]["span_id"])
        assert steps == ["claim", "finish", "handler"], steps
        assert run["attributes"]["tasklane.agent"] == "t_retry_then_spawn"

    (child_run,) = [s for s in runs if s["attributes"]["tasklane.parent_task_id"] == str(task.id)]
    assert child_run["context"]["trace_id"] == hex_id(trace_id, 32)
    spawned_from = by_id[child_run["parent_id"]]  # the handler span of the run that spawned it
    assert spawned_from["name"] == "handler"
    assert spawned_from["parent_id"] == parent_runs[1]["context"]["span_id"]
    assert child_run["attributes"]["tasklane.outcome"] == "completed"

    # A task submitted outside any trace: its runs form a trace whose id is the task's.
    (plain,) = [s for s in runs if s["attributes"]["tasklane.task_id"] == str(untraced.id)]
    assert plain["context"]["trace_id"] == "0x" + untraced.id.hex

    # Log lines written inside a run carry its trace and span ids.
    lines = [json.loads(line) for line in worker.output().splitlines() if line.startswith("{")]
    completed = [
        line
        for line in lines
        if line.get("event") == "task.completed" and line.get("task_id") == str(task.id)
    ]
    assert completed
    assert completed[0]["trace_id"] == format(trace_id, "032x")
    assert "0x" + completed[0]["span_id"] in {
        s["context"]["span_id"]
        for s in spans
        if s["parent_id"] == parent_runs[2]["context"]["span_id"]
    }


def run_python(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def test_nothing_imports_opentelemetry_while_tracing_is_off() -> None:
    done = run_python(
        "import sys, asyncio\n"
        "import tasklane, worker.app, worker.cli, worker.client, worker.logs, worker.runtime\n"
        "from worker import tracing\n"
        "from worker.config import Settings\n"
        "Settings.from_env({})\n"
        "assert tracing.carrier() is None and tracing.current_ids() is None\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('opentelemetry'))\n"
        "print(loaded)\n"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


BLOCK_OTEL = "import sys; sys.modules['opentelemetry'] = None\n"


def test_tracing_without_the_extra_is_one_line_naming_it() -> None:
    done = run_python(
        BLOCK_OTEL + "from worker.cli import main\nsys.exit(main(['worker']))\n",
        env={**_plain_env(), "TASKLANE_TRACING": "otlp"},
    )
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0, done.stderr
    assert "TASKLANE_TRACING: otlp needs OpenTelemetry" in done.stderr
    assert "tasklane[otel]" in done.stderr


def test_a_submit_without_the_extra_stores_no_trace() -> None:
    done = run_python(BLOCK_OTEL + "from worker import tracing\nprint(tracing.carrier())\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "None"


@pytest.mark.parametrize("raw", ["bogus", "file:relative/path", "file:"])
def test_a_bad_tracing_setting_is_refused(raw: str) -> None:
    from worker.config import ConfigError

    with pytest.raises(ConfigError, match="TASKLANE_TRACING"):
        Settings.from_env({"TASKLANE_TRACING": raw})


def _plain_env() -> dict[str, str]:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith(("TASKLANE_", "LOG_"))}
    env["PYTHONPATH"] = str(ROOT)
    return env
