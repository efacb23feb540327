"""The dashboard in this process (httpx on the ASGI app) on the test's own database."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import httpx
import pytest

from tests.support import db
from worker.client import TaskClient
from worker.config import Settings
from worker.web.app import create_app

TOKEN = "test-operator-token-0123456789"
BASE = "http://dash.test"


@dataclass
class Web:
    http: httpx.AsyncClient
    url: str  # the database

    async def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return await self.http.get(path, **kwargs)

    async def sign_in(self, name: str = "ada") -> str:
        """Sign in; the CSRF token of the session."""
        response = await self.http.post(
            "/login", data={"name": name, "token": TOKEN, "next": "/tasks"}
        )
        assert response.status_code == 303, response.text
        return await self.csrf()

    async def csrf(self) -> str:
        page = await self.http.get("/tasks")
        found = re.search(r'name="csrf" value="([^"]+)"', page.text)
        assert found, "no CSRF token on the page"
        return found[1]

    async def post(self, path: str, data: Any, **kwargs: Any) -> httpx.Response:
        return await self.http.post(path, data=data, **kwargs)


async def _web(settings: Settings, token: str | None) -> AsyncIterator[Web]:
    app = create_app(settings, token=token)
    dashboard = app.state.dashboard
    dashboard.client = TaskClient.from_settings(dashboard.settings)
    transport = httpx.ASGITransport(app=app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url=BASE) as http:
            yield Web(http, settings.database_url)
    finally:
        for job in list(dashboard.background):
            await job
        await dashboard.client.close()


@pytest.fixture
async def web(settings: Settings) -> AsyncIterator[Web]:
    """The dashboard with an operator token."""
    async for w in _web(settings, TOKEN):
        yield w


@pytest.fixture
async def read_only_web(settings: Settings) -> AsyncIterator[Web]:
    async for w in _web(settings, None):
        yield w


async def insert_tasks(url: str, rows: list[dict[str, Any]]) -> list[UUID]:
    """Tasks inserted in plain SQL (one conversation), created one millisecond apart in order;
    their ids in the same order."""
    conv = await db.value(
        url, "INSERT INTO conversations (user_id, title) VALUES ('web-test', 't') RETURNING id"
    )
    ids = []
    for i, row in enumerate(rows):
        status = row.get("status", "pending")
        finished = status in ("completed", "failed", "cancelled")
        ids.append(
            await db.value(
                url,
                """
INSERT INTO tasks (conversation_id, parent_task_id, agent_id, queue, status, input, error,
                   attempts, max_attempts, created_at, completed_at)
VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7, $8, 3,
        now() - interval '1 hour' + $9 * interval '1 millisecond',
        CASE WHEN $10 THEN now() - interval '1 minute' END)
RETURNING id
""",
                conv,
                row.get("parent"),
                row.get("agent", "echo"),
                row.get("queue", "tasklane"),
                status,
                row.get("input", "{}"),
                row.get("error"),
                1 if status == "failed" else 0,
                i,
                finished,
            )
        )
    return ids
