"""The dashboard's pages and their JSON twins, against a real database."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any
from uuid import UUID

import pytest

from persistence.repositories import dashboard_repository
from tests.support import db
from tests.support.cli import run_cli
from tests.web.conftest import Web, insert_tasks
from worker.config import Settings

PAGES = ["/", "/tasks", "/queues", "/workers", "/audit", "/login"]
APIS = ["/api/overview", "/api/tasks", "/api/queues", "/api/workers", "/api/audit"]


async def test_every_page_and_its_json_answers(web: Web) -> None:
    [task_id] = await insert_tasks(web.url, [{"status": "failed", "error": "boom"}])
    for path in [*PAGES, f"/tasks/{task_id}"]:
        response = await web.get(path)
        assert response.status_code == 200, (path, response.text[:300])
        assert response.headers["content-type"].startswith("text/html")
        assert "script-src 'self'" in response.headers["content-security-policy"]
    for path in [*APIS, f"/api/tasks/{task_id}", f"/api/tasks/{task_id}/tree"]:
        response = await web.get(path)
        assert response.status_code == 200, (path, response.text[:300])
        json.loads(response.text)


async def test_the_json_twins_are_the_clis_documents(
    web: Web, settings: Settings, capsys: pytest.CaptureFixture[str], monkeypatch: Any
) -> None:
    ids = await insert_tasks(
        web.url,
        [{"status": "completed"}, {"status": "failed", "error": "bad"}, {"status": "pending"}],
    )
    child = await insert_tasks(web.url, [{"parent": ids[0], "status": "completed"}])
    from tests.support.workers import settings_env

    for key, value in settings_env(settings).items():
        monkeypatch.setenv(key, value)

    async def cli(*argv: str) -> Any:
        out = await asyncio.to_thread(run_cli, capsys, *argv)
        assert out.code == 0, out.explained
        return json.loads(out.stdout)

    listed = (await web.get("/api/tasks?limit=50")).json()
    assert listed == await cli("list", "--json", "--limit", "50")
    shown = (await web.get(f"/api/tasks/{ids[1]}")).json()
    cli_shown = await cli("show", "--json", str(ids[1]))
    assert shown == cli_shown
    assert shown["reason"]
    tree = (await web.get(f"/api/tasks/{ids[0]}/tree")).json()
    assert tree == await cli("tree", "--json", str(ids[0]))
    assert [c["id"] for c in tree["children"]] == [str(child[0])]


async def test_overview_counts_by_status(web: Web, monkeypatch: pytest.MonkeyPatch) -> None:
    await insert_tasks(
        web.url, [{"status": s} for s in ["pending"] * 3 + ["failed"] * 2 + ["completed"]]
    )
    doc = (await web.get("/api/overview")).json()
    assert doc["by_status"] == {
        "pending": 3,
        "running": 0,
        "waiting": 0,
        "completed": 1,
        "failed": 2,
        "cancelled": 0,
    }
    assert doc["approximate"] == []
    assert doc["failed_last_hour"] == 2
    # Above the cap a count is the planner's estimate, and says so.
    monkeypatch.setattr(dashboard_repository, "COUNT_CAP", 2)
    doc = (await web.get("/api/overview")).json()
    assert doc["approximate"] == ["pending"]
    page = (await web.get("/")).text
    assert re.search(r'data-count="pending">≈', page)


FILTERS: list[dict[str, str]] = [
    {},
    {"status": "failed"},
    {"status": "pending,cancelled"},
    {"agent": "a2"},
    {"agent": "a2", "status": "failed"},
    {"queue": "q1"},
    {"error": "disk"},
    {"error": "50%_off"},
    {"status": "failed", "error": "DISK"},
    {"queue": "q1", "agent": "a1", "status": "pending"},
]


def _matches(row: dict[str, Any], query: dict[str, str]) -> bool:
    if "status" in query and row["status"] not in query["status"].split(","):
        return False
    if "agent" in query and row["agent"] != query["agent"]:
        return False
    if "queue" in query and row["queue"] != query["queue"]:
        return False
    return not ("error" in query and query["error"].lower() not in (row["error"] or "").lower())


async def _follow(web: Web, path: str) -> list[str]:
    """Every id of a listing, following the Link headers."""
    seen: list[str] = []
    for _ in range(500):
        response = await web.get(path)
        assert response.status_code == 200, response.text
        seen += [t["id"] for t in response.json()]
        link = response.headers.get("link")
        if not link:
            return seen
        path = re.fullmatch(r'<([^>]+)>; rel="next"', link)[1]  # type: ignore[index]
    raise AssertionError("too many pages")


@pytest.mark.parametrize("window", [2000, 7])
async def test_filters_and_keyset_pages_return_exactly_what_sql_finds(
    web: Web, monkeypatch: pytest.MonkeyPatch, window: int
) -> None:
    """Every filter, followed page by page, gives the tasks a plain SQL filter gives, newest
    first, each once. With a tiny window the pages come back short and the cursors still
    cover everything."""
    monkeypatch.setattr(dashboard_repository, "WINDOW", window)
    statuses = ["pending", "running", "waiting", "completed", "failed", "cancelled"]
    # "500 off" matches the pattern 50%_off unless % and _ are escaped.
    errors = [None, "Disk full", "timeout", "50%_off sale", "disk quota", "500 off", "other"]
    rows = [
        {
            "status": statuses[i % 6],
            "agent": f"a{i % 3}",
            "queue": f"q{i % 2}",
            "error": errors[i % 7],
        }
        for i in range(90)
    ]
    ids = await insert_tasks(web.url, rows)
    newest_first = list(reversed(list(zip(ids, rows, strict=True))))
    for query in FILTERS:
        expected = [str(i) for i, row in newest_first if _matches(row, query)]
        path = "/api/tasks?" + "&".join(f"{k}={v}" for k, v in {**query, "limit": "4"}.items())
        path = path.replace("%", "%25")
        assert await _follow(web, path) == expected, query


async def test_conversation_parent_and_time_range_filters(web: Web) -> None:
    parent, *_ = await insert_tasks(web.url, [{"status": "waiting"}, {"status": "failed"}])
    children = await insert_tasks(web.url, [{"parent": parent} for _ in range(5)])
    conv = await db.value(web.url, "SELECT conversation_id FROM tasks WHERE id = $1", children[0])
    assert await _follow(web, f"/api/tasks?parent={parent}&limit=2") == [
        str(c) for c in reversed(children)
    ]
    assert await _follow(web, f"/api/tasks?conversation={conv}&limit=2") == [
        str(c) for c in reversed(children)
    ]
    created = await db.value(web.url, "SELECT created_at FROM tasks WHERE id = $1", children[2])
    since = created.isoformat().replace("+", "%2B")
    assert await _follow(web, f"/api/tasks?parent={parent}&from={since}") == [
        str(c) for c in reversed(children[2:])
    ]
    assert await _follow(web, f"/api/tasks?parent={parent}&to={since}") == [
        str(c) for c in reversed(children[:2])
    ]


async def test_bad_filters_are_one_line_400s(web: Web) -> None:
    for query, fragment in [
        ("status=bogus", "status must be one of"),
        ("conversation=xyz", "conversation must be an id"),
        ("from=yesterday", "from must be an ISO-8601 time"),
        ("limit=0", "limit must be between 1 and"),
        ("after=junk", "not a cursor"),
    ]:
        response = await web.get(f"/api/tasks?{query}")
        assert response.status_code == 400, query
        assert fragment in response.json()["error"]
        page = await web.get(f"/tasks?{query}")
        assert page.status_code == 400
        assert fragment in page.text
    assert (await web.get(f"/api/tasks/{UUID(int=1)}")).status_code == 404


async def test_secrets_are_redacted_in_pages_and_json(web: Web) -> None:
    secret = "sk-live-abcdef1234567890"
    [task_id] = await insert_tasks(
        web.url,
        [
            {
                "status": "failed",
                "input": json.dumps({"api_key": secret, "query": "fine"}),
                "error": f"request failed: Authorization: Bearer {secret}",
            }
        ],
    )
    for path in [f"/tasks/{task_id}", f"/api/tasks/{task_id}", "/api/tasks", "/tasks"]:
        text = (await web.get(path)).text
        assert secret not in text, path
    assert "fine" in (await web.get(f"/tasks/{task_id}")).text


async def test_subtasks_unfold_level_by_level(web: Web) -> None:
    [root] = await insert_tasks(web.url, [{"status": "waiting"}])
    kids = await insert_tasks(web.url, [{"parent": root, "status": "completed"} for _ in range(3)])
    page = (await web.get(f"/tasks/{root}")).text
    assert "3 subtasks: 3 completed" in page
    fragment = (await web.get(f"/tasks/{root}/children")).text
    assert all(str(k)[:8] in fragment for k in kids)


def test_templates_hold_nothing_the_content_security_policy_blocks() -> None:
    """No inline script, inline style or event-handler attribute: the CSP would block them."""
    from worker.web.app import HERE

    for template in (HERE / "templates").glob("*.html"):
        text = template.read_text()
        assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", text), template.name
        assert not re.search(r"\sstyle=", text), template.name
        assert not re.search(r"\son[a-z]+=", text), template.name
        assert not re.search(r"https?://", text), template.name  # nothing from a CDN
