"""The dashboard in a real browser: Debian's Chromium driven by Playwright (no browser download:
`executable_path`), against a `tasklane web` process and a worker process.

Screenshots go to TASKLANE_SCREENSHOTS when set (the README's come from
`TASKLANE_SCREENSHOTS=docs/screenshots uv run pytest tests/web/test_browser.py`), else to the
test's temporary directory.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from domain.entities import Conversation
from tests.support import db, services, tools
from tests.support.workers import ROOT, WorkerProcess, settings_env
from tests.web.conftest import TOKEN
from worker.client import TaskClient
from worker.config import Settings

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"


@pytest.fixture
def chromium() -> str:
    path = shutil.which("chromium") or (CHROMIUM if Path(CHROMIUM).exists() else None)
    if path is None:
        tools.missing("chromium", "apt-get install chromium")
    return path


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    target = Path(os.environ.get("TASKLANE_SCREENSHOTS") or tmp_path)
    target.mkdir(parents=True, exist_ok=True)
    return target


@pytest.fixture
def web_process(settings: Settings, tmp_path: Path) -> Iterator[str]:
    """`tasklane web` as a process; its base URL."""
    port = services.free_port()
    log = (tmp_path / "web.log").open("wb")
    env = settings_env(settings, {"TASKLANE_WEB_TOKEN": TOKEN})
    process = subprocess.Popen(
        [sys.executable, "-m", "worker.cli", "web", "--port", str(port)],
        env=env,
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{base}/api/workers", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(
                    "tasklane web did not start: " + (tmp_path / "web.log").read_text()
                )
            time.sleep(0.2)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


@pytest.fixture
async def browser(chromium: str) -> AsyncIterator[Any]:
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=chromium, args=["--no-sandbox", "--disable-dev-shm-usage"]
        )
        try:
            yield browser
        finally:
            await browser.close()


async def test_an_operator_looks_filters_opens_cancels_and_bulk_retries(
    settings: Settings,
    client: TaskClient,
    conversation: Conversation,
    processes: list[WorkerProcess],
    web_process: str,
    browser: Any,
    shots: Path,
) -> None:
    url = settings.database_url
    processes.append(WorkerProcess(settings))
    conv = conversation.id
    done = [await client.submit("echo", {"n": i}, conversation_id=conv) for i in range(6)]
    failing = [
        await client.submit("fail", {"message": f"upstream said no ({i})"}, conversation_id=conv)
        for i in range(4)
    ]
    tree = await client.submit("fanout", {"n": 5}, conversation_id=conv)
    await db.wait_final(url, [t.id for t in [*done, *failing, tree]], timeout=60)
    later = await client.submit(
        "echo",
        {"api_key": "sk-do-not-show-0123456789"},
        conversation_id=conv,
        run_after=await db.value(url, "SELECT now()") + timedelta(hours=2),
    )

    page = await browser.new_page(viewport={"width": 1280, "height": 900})
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.on(
        "response",
        lambda r: problems.append(f"{r.status} {r.url}") if r.status >= 400 else None,
    )

    # Overview: counts, charts (the vendored Chart.js), refreshed from /api/overview.
    await page.goto(web_process + "/")
    await page.wait_for_selector("#overview[data-loaded=true]")
    assert (await page.inner_text('[data-count="completed"]')).strip() == "12"  # 6 + 5 + 1
    assert (await page.inner_text('[data-count="failed"]')).strip() == "4"
    await page.screenshot(path=str(shots / "overview.png"), full_page=True)

    # Tasks: filter by status.
    await page.goto(web_process + "/tasks")
    await page.check('input[name="status"][value="failed"]')
    await page.click("#apply-filter")
    await page.wait_for_url("**/tasks?status=failed**")
    cells = await page.locator("table.tasks tbody .status").all_inner_texts()
    assert cells == ["failed"] * 4
    await page.screenshot(path=str(shots / "tasks.png"), full_page=True)

    # A task: the reason line, the runs, the subtasks unfolded.
    await page.goto(web_process + f"/tasks/{tree.id}")
    assert "completed" in await page.inner_text("h1")
    await page.click("#subtasks summary")
    await page.wait_for_selector("#subtasks .tree li a")
    assert await page.locator("#subtasks .tree li a").count() == 5
    await page.screenshot(path=str(shots / "task.png"), full_page=True)

    await page.goto(web_process + "/queues")
    assert "fanout" in await page.inner_text("#agents")
    await page.screenshot(path=str(shots / "queues.png"), full_page=True)
    await page.goto(web_process + "/workers")
    assert "live" in await page.inner_text("#workers")
    await page.screenshot(path=str(shots / "workers.png"), full_page=True)

    # Sign in, then cancel the scheduled task from its page (its secret stays hidden).
    await page.goto(web_process + f"/login?next=/tasks/{later.id}")
    await page.fill('input[name="name"]', "ada")
    await page.fill('input[name="token"]', TOKEN)
    await page.click("#sign-in")
    await page.wait_for_url(f"**/tasks/{later.id}")
    assert "sk-do-not-show" not in await page.content()
    await page.click("#cancel")
    await page.wait_for_selector("h1 .s-cancelled")
    assert await db.value(url, "SELECT status FROM tasks WHERE id = $1", later.id) == "cancelled"

    # Bulk: retry every failed task the filter matches, after seeing the count.
    ids = [t.id for t in failing]
    runs_sql = "SELECT min(runs) FROM tasks WHERE id = ANY($1::uuid[])"
    runs_before = await db.value(url, runs_sql, ids)
    await page.goto(web_process + "/tasks?status=failed")
    await page.click("#retry-matching")
    assert "4 tasks" in await page.inner_text("#bulk-count")
    await page.click("#confirm")
    await page.wait_for_url("**/audit**")

    async def entry() -> Any:
        rows = await db.query(url, "SELECT * FROM audit_log WHERE action = 'bulk retry'")
        return rows[0] if rows else None

    finished = await db.eventually(entry, lambda e: e is not None and e["status"] == "done")
    assert (finished["actor"], finished["matched"], finished["changed"]) == ("ada", 4, 4)
    # The worker runs each of them again.
    await db.eventually(lambda: db.value(url, runs_sql, ids), lambda n: n > runs_before)
    await page.reload()
    assert "bulk retry" in await page.inner_text("#audit")
    await page.screenshot(path=str(shots / "audit.png"), full_page=True)

    assert problems == [], problems  # no script error, nothing the CSP blocked
