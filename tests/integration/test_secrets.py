"""Secrets never print. A secret in any shape — in DATABASE_URL or REDIS_URL (user part, query
string), in a DSN given where a URL belongs, in a handler's error — is redacted in every output:
`health` (text and --json), `migrate`, `stats`, error lines, the worker's log lines and
tracebacks, and what is stored in tasks.error / task_attempts.error and shown by
`show`, `list` and `tree`.

One database and one worker process serve all the examples of a test (the function-scoped
fixtures are shared on purpose, hence the suppressed health check). The CLI runs in this
process (in a thread: it runs its own event loop), its output read through capsys.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from sqlalchemy.engine import make_url

from domain.entities import Conversation
from tests.support import db
from tests.support.cli import Output, logging_restored, run_cli, use_settings
from tests.support.secrets import SECRETS, Secret, secret_texts
from tests.support.services import free_port
from tests.support.workers import WorkerProcess
from worker.client import TaskClient
from worker.config import Settings

SHARED = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]


def fuzz(examples: int) -> Any:
    return hypothesis_settings(max_examples=examples, deadline=None, suppress_health_check=SHARED)


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    with logging_restored():
        yield


async def tasklane(capsys: pytest.CaptureFixture[str], *argv: str) -> Output:
    return await asyncio.to_thread(run_cli, capsys, *argv)


def assert_no_leak(secret: Secret, output: Output) -> None:
    leaks = secret.leaks(output.stdout + output.stderr)
    assert not leaks, f"{leaks} printed by:\n{output.explained}"
    if output.stdout.startswith(("{", "[")):
        json.loads(output.stdout)  # a --json document stays valid JSON


# -- secrets in the configuration -----------------------------------------------------------------


def configured(settings: Settings, secret: Secret, where: str) -> Settings:
    """`settings` with `secret` placed in its URLs as `where` says."""
    url = make_url(settings.database_url)
    database, q = url.database, secret.quoted
    urls = {
        "user part": f"postgresql+asyncpg://postgres:{q}@{url.host}:{url.port}/{database}",
        "query string": f"{url.render_as_string(hide_password=False)}?password={q}",
        "sslpassword": f"{url.render_as_string(hide_password=False)}?sslpassword={q}",
        "unreachable": f"postgresql+asyncpg://app:{q}@127.0.0.1:{free_port()}/{database}",
        "a DSN": f"host={url.host} port={url.port} dbname={database} password={secret.value}",
    }
    if where == "redis":
        redis = make_url(settings.redis_url)
        return replace(settings, redis_url=f"redis://:{q}@{redis.host}:{redis.port}/14")
    return replace(settings, database_url=urls[where])


@fuzz(12)
@given(
    secret=SECRETS,
    where=st.sampled_from(
        ["user part", "query string", "sslpassword", "unreachable", "a DSN", "redis"]
    ),
    level=st.sampled_from(["WARNING", "DEBUG"]),
)
async def test_configured_secrets_never_print(
    secret: Secret,
    where: str,
    level: str,
    settings: Settings,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every command that shows the configuration or fails on it, at WARNING and at DEBUG (the
    libraries' log lines, and a traceback for an unexpected error)."""
    use_settings(monkeypatch, configured(settings, secret, where), LOG_LEVEL=level)
    for argv in (
        ["health"],
        ["health", "--json"],
        ["migrate"],
        ["stats"],
        ["stats", "--json"],
        ["list", "--limit", "1"],
    ):
        assert_no_leak(secret, await tasklane(capsys, *argv))


# -- secrets in a handler's error -----------------------------------------------------------------


@pytest.fixture
def leaky_worker(settings: Settings, processes: list[WorkerProcess]) -> WorkerProcess:
    """A worker process serving the leaky agents, logging at INFO (every finish, with its
    error) into a file the test reads."""
    modules = (*settings.agent_modules, "tests.integration.leaky_agents")
    worker = WorkerProcess(replace(settings, agent_modules=modules, log_level="INFO"))
    processes.append(worker)
    return worker.wait_started()


def worker_log(worker: WorkerProcess) -> Callable[[], Awaitable[list[str]]]:
    async def lines() -> list[str]:
        return worker.output().splitlines()

    return lines


@fuzz(15)
@given(
    drawn=secret_texts(),
    agent=st.sampled_from(["t_leak_raise", "t_leak_permanent", "t_leak_retry"]),
)
async def test_handler_errors_are_stored_logged_and_shown_redacted(
    drawn: tuple[Secret, str],
    agent: str,
    leaky_worker: WorkerProcess,
    client: TaskClient,
    conversation: Conversation,
    settings: Settings,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    secret, text = drawn
    use_settings(monkeypatch, settings, LOG_LEVEL="INFO")
    task = await client.submit(
        agent, {"text": text}, conversation_id=conversation.id, max_attempts=1
    )
    done = await client.wait(task.id, timeout=15)
    assert done.status.value == "failed", done

    stored = [done.error] + [a["error"] for a in await db.attempts(settings.database_url, task.id)]
    assert all(error and "***" in error for error in stored), stored
    assert not secret.leaks("\n".join(stored)), stored
    log = await db.eventually(
        worker_log(leaky_worker),
        lambda log: any(str(task.id) in line and "task.failed" in line for line in log),
        what="the worker's line for the failure",
    )
    assert_no_leak(secret, Output(0, "", "\n".join(log)))
    for argv in (
        ["show", str(task.id)],
        ["show", str(task.id), "--json"],
        ["list", "--agent", agent],
        ["list", "--agent", agent, "--json"],
        ["tree", str(task.id)],
    ):
        output = await tasklane(capsys, *argv)
        assert output.code == 0, output.explained
        assert_no_leak(secret, output)
